//! A real container from the CDI spec the plugin writes: podman (with runc) runs the test CUDA
//! application on the host's root filesystem as an overlay, with the fake driver mounted by the
//! standalone-mode spec and the shim loaded through the spec's `/etc/ld.so.preload` (no
//! `LD_PRELOAD` anywhere). The claim's memory wall holds inside the container, and the plugin
//! sees the container's usage in the region.
//!
//! Needs root, podman and runc (`scripts/install-podman.sh`) and the workspace's cdylibs
//! (`cargo build --workspace`). Without them it is skipped with the reason printed, unless
//! `TESSERA_E2E=1`, which turns a skip into a failure.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use support::*;
use tessera_driver::cdi::{CdiMode, DriverFiles};

const UID: &str = "7e57c0de-0000-4000-8000-00000000c0de";
const MIB: u64 = 1 << 20;
const CUDA_ERROR_OUT_OF_MEMORY: &str = "2";

fn exports(library: &Path, symbol: &str) -> bool {
    Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(library)
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.ends_with(&format!(" {symbol}")))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_wall_holds_inside_a_podman_container() {
    let libs = tessera_built_libs::target_dir();
    let (cuda, nvml, shim) = (
        libs.join("libcuda.so"),
        libs.join("libnvidia_ml.so"),
        libs.join("libtessera.so"),
    );
    let Some(()) = tessera_built_libs::require(
        "container",
        tessera_built_libs::on_path("podman") && tessera_built_libs::on_path("runc"),
        || "podman or runc is not installed (scripts/install-podman.sh)".into(),
    ) else {
        return;
    };
    let Some(()) =
        tessera_built_libs::require("container", nix::unistd::geteuid().is_root(), || {
            "not root".into()
        })
    else {
        return;
    };
    let Some(()) = tessera_built_libs::require(
        "container",
        shim.exists() && exports(&cuda, "cuInit") && nvml.exists(),
        || {
            format!(
                "the fake driver or the shim is not built in {} (cargo build --workspace)",
                libs.display()
            )
        },
    ) else {
        return;
    };

    // The fake node: driver libraries under a driver root, device nodes (stand-ins made from
    // /dev/null's numbers) under a dev root, one inventory file for the plugin and the fake driver.
    let env = Env::new(&["v1"]);
    let lib_dir = env.path("driver/usr/lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&lib_dir).expect("driver root");
    std::os::unix::fs::symlink(&cuda, lib_dir.join("libcuda.so.1")).expect("libcuda link");
    std::os::unix::fs::symlink(&nvml, lib_dir.join("libnvidia-ml.so.1")).expect("nvml link");
    let dev = env.path("devroot/dev");
    std::fs::create_dir_all(&dev).expect("dev root");
    for node in ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"] {
        let made = nix::sys::stat::mknod(
            &dev.join(node),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        );
        let Some(()) = tessera_built_libs::require("container", made.is_ok(), || {
            format!("cannot create device node {node}: {made:?}")
        }) else {
            return;
        };
    }
    let inventory = env.path("inventory.json");
    std::fs::write(&inventory, inventory_json()).expect("inventory");
    let app = env.path("cuda_app");
    tessera_built_libs::compile_cuda_app(&app);

    // Podman 4.3 reads CDI specs only from /etc/cdi and /var/run/cdi; newer ones take a flag.
    let podman = tessera_built_libs::Podman::detect(env.path("cdi"), Path::new("/var/run/cdi"));
    let mut config = env.node_config();
    config.cdi_dir = podman.cdi_dir.clone();
    config.cdi_mode = CdiMode::Standalone;
    config.driver_files = Some(
        DriverFiles::discover(&env.path("driver"), &env.path("devroot"))
            .expect("fake driver found"),
    );
    tessera_kubelet_plugin::install::install_shim(&shim, &config.state_dir).expect("install shim");
    let cdi_dir = config.cdi_dir.clone();
    let instance = env.start_with(config, None, None).await;

    env.api.put(claim(
        "default",
        "wall",
        UID,
        Some(vec![share(
            "gpu",
            "gpu-0",
            "9f0c4c4e-1111-4000-8000-00000000c0de",
            "1Gi",
            "50",
        )]),
        vec![],
    ));
    let claim_ref = Claim::new("default", "wall", UID);
    let devices = instance.kubelet.prepare_ok(Version::V1, &claim_ref).await;
    // Standalone mode returns only Tessera's IDs: the device and its request's metadata.
    let ids: Vec<&str> = devices[0]
        .cdi_device_ids
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        ids,
        [
            format!("gpu.tessera.dev/claim={UID}-gpu-0-9f0c4c4e-1111-4000-8000-00000000c0de"),
            format!("gpu.tessera.dev/claim={UID}-metadata-gpu"),
        ]
    );

    let container_env = [
        ("FAKEGPU_CONFIG", inventory.display().to_string()),
        (
            "FAKEGPU_STATE",
            env.path("fakegpu.state").display().to_string(),
        ),
    ];
    let podman = |args: &[&str]| podman.run_with_devices(&ids, &container_env, args);

    // The shim arrives through /etc/ld.so.preload; the config cannot be changed from inside.
    let probe = podman(&["/bin/sh", "-c", "echo preload=[$LD_PRELOAD]; cat /etc/ld.so.preload; echo config=$TESSERA_CONFIG; \
        ls /dev/nvidia0 /usr/lib/x86_64-linux-gnu/libcuda.so.1; echo hi >> /etc/tessera/config.json || echo config-read-only; \
        m=/var/run/kubernetes.io/dra-device-attributes/resourceclaims/wall/gpu/gpu.tessera.dev-metadata.json; \
        cat $m; echo hi >> $m || echo metadata-read-only"])
        .output()
        .expect("run podman");
    let out = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success(),
        "podman failed: {}\n{out}",
        String::from_utf8_lossy(&probe.stderr)
    );
    for expected in [
        "preload=[]",
        "/usr/lib/tessera/libtessera.so",
        "config=/etc/tessera/config.json",
        "/dev/nvidia0",
        "config-read-only",
        // The request's device metadata (KEP-5304), read-only, in both versions.
        "\"apiVersion\": \"metadata.resource.k8s.io/v1beta1\"",
        "\"apiVersion\": \"metadata.resource.k8s.io/v1alpha1\"",
        &format!("\"string\": \"{GPU0}\""),
        "\"memoryLimit\": {\n",
        "metadata-read-only",
    ] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }

    // The application allocates up to the claim's 1 GiB wall, and no further.
    let mut child = podman(&[app.to_str().expect("utf-8 path"), "dlsym"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start podman");
    let mut app = tessera_built_libs::LineSession::attach(&mut child);
    assert_eq!(app.ask(""), vec!["ready"]);
    assert_eq!(app.ask("init 0"), vec!["init", "0"]);
    let info = app.ask("info");
    assert_eq!(
        (info[1].as_str(), info[3].as_str()),
        ("0", (1024 * MIB).to_string().as_str()),
        "the slice, not the card: {info:?}"
    );
    assert_eq!(app.ask(&format!("alloc {}", 768 * MIB))[1], "0");
    // Seen from the host while the process lives: the region the container charges.
    let (usage, processes) =
        tessera_kubelet_plugin::regions::read_usage(&env.claim_dir(UID).join("region"))
            .expect("region");
    assert_eq!((usage[0].memory_used, processes), (768 * MIB, 1));
    assert_eq!(
        app.ask(&format!("alloc {}", 512 * MIB))[1],
        CUDA_ERROR_OUT_OF_MEMORY,
        "past the wall"
    );
    assert_eq!(
        app.ask(&format!("alloc {}", 256 * MIB))[1],
        "0",
        "up to the wall"
    );
    app.quit();
    let output = child.wait_with_output().expect("podman exits");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    instance.kubelet.unprepare_ok(Version::V1, &claim_ref).await;
    assert!(
        !cdi_dir.join(format!("tessera-{UID}.json")).exists(),
        "spec removed"
    );
    env.assert_clean(UID);
    instance.stop().await;
}
