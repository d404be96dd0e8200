//! `tessera cdi generate` then `podman run --device gpu.tessera.dev/slice=<name>`: a real
//! container (podman with runc, the host's root filesystem as an overlay) gets the shim through
//! the spec's `/etc/ld.so.preload`, the fake driver through the spec's standalone edits, and a
//! program in it hits the memory wall at exactly the slice's `--memory`.
//!
//! Needs root, podman and runc (`scripts/install-podman.sh`) and the workspace's cdylibs
//! (`cargo build --workspace`). Without them it is skipped with the reason printed, unless
//! `TESSERA_E2E=1`, which turns a skip into a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CUDA_ERROR_OUT_OF_MEMORY: &str = "2";

/// Removes the slice however the test ends: its spec lives in a system directory.
struct Cleanup {
    name: String,
    cdi_dir: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["cdi", "remove", "--name", &self.name, "--cdi-dir"])
            .arg(&self.cdi_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output();
    }
}

#[test]
fn a_podman_container_hits_the_slices_memory_wall() {
    let libs = tessera_built_libs::target_dir();
    let (cuda, nvml, shim) = (
        libs.join("libcuda.so"),
        libs.join("libnvidia_ml.so"),
        libs.join("libtessera.so"),
    );
    let Some(()) = tessera_built_libs::require(
        "podman",
        tessera_built_libs::on_path("podman") && tessera_built_libs::on_path("runc"),
        || "podman or runc is not installed (scripts/install-podman.sh)".into(),
    ) else {
        return;
    };
    let Some(()) = tessera_built_libs::require("podman", nix::unistd::geteuid().is_root(), || {
        "not root".into()
    }) else {
        return;
    };
    let Some(()) = tessera_built_libs::require(
        "podman",
        cuda.exists() && nvml.exists() && shim.exists(),
        || {
            format!(
                "the fake driver or the shim is not built in {} (cargo build --workspace)",
                libs.display()
            )
        },
    ) else {
        return;
    };

    // The fake host: driver libraries under a driver root, device nodes (stand-ins made from
    // /dev/null's numbers) under a dev root, and the fake node's description.
    let dir = tempfile::Builder::new()
        .prefix("tessera-cli-")
        .tempdir()
        .expect("tempdir");
    let path = |rel: &str| dir.path().join(rel);
    let lib_dir = path("driver/usr/lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&lib_dir).expect("driver root");
    std::os::unix::fs::symlink(&cuda, lib_dir.join("libcuda.so.1")).expect("libcuda link");
    std::os::unix::fs::symlink(&nvml, lib_dir.join("libnvidia-ml.so.1")).expect("nvml link");
    std::fs::create_dir_all(path("devroot/dev")).expect("dev root");
    for node in ["nvidia0", "nvidiactl", "nvidia-uvm"] {
        let made = nix::sys::stat::mknod(
            &path("devroot/dev").join(node),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        );
        let Some(()) = tessera_built_libs::require("podman", made.is_ok(), || {
            format!("cannot create device node {node}: {made:?}")
        }) else {
            return;
        };
    }
    let inventory = path("inventory.json");
    std::fs::write(
        &inventory,
        serde_json::json!({"driverVersion": "570.86.15", "devices": [
            {"uuid": "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b", "name": "NVIDIA GeForce RTX 4090",
             "memory": 24 * GIB, "pciBusId": "0000:01:00.0", "computeCapability": "8.9"}]})
        .to_string(),
    )
    .expect("inventory");
    let app = path("cuda_app");
    tessera_built_libs::compile_cuda_app(&app);

    // Podman 4.3 reads CDI specs only from /etc/cdi and /var/run/cdi: the CLI's default.
    let podman = tessera_built_libs::Podman::detect(path("cdi"), Path::new("/etc/cdi"));
    let cdi_dir = podman.cdi_dir.clone();
    let name = format!("clitest-{}", std::process::id());
    let _cleanup = Cleanup {
        name: name.clone(),
        cdi_dir: cdi_dir.clone(),
        state_dir: path("state"),
    };

    let generated = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["cdi", "generate", "--name", &name, "--gpu", "0"])
        .args(["--memory", "1Gi", "--cores", "50", "--inventory"])
        .arg(&inventory)
        .arg("--cdi-dir")
        .arg(&cdi_dir)
        .arg("--state-dir")
        .arg(path("state"))
        .arg("--shim-path")
        .arg(&shim)
        .arg("--driver-root")
        .arg(path("driver"))
        .arg("--dev-root")
        .arg(path("devroot"))
        .output()
        .expect("run tessera");
    let out = String::from_utf8_lossy(&generated.stdout);
    assert!(
        generated.status.success(),
        "tessera cdi generate: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let device = format!("gpu.tessera.dev/slice={name}");
    assert!(out.contains(&format!("--device {device}")), "{out}");

    let container_env = [
        ("FAKEGPU_CONFIG", inventory.display().to_string()),
        ("FAKEGPU_STATE", path("fakegpu.state").display().to_string()),
    ];
    let podman = |args: &[&str]| podman.run(&device, &container_env, args);
    // The test program in a container, spoken to line by line.
    let start = |args: &[&str]| {
        let mut child = podman(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start podman");
        let session = tessera_built_libs::LineSession::attach(&mut child);
        (child, session)
    };

    // Another slice's entry on the same GPU, as its shim would have left it.
    let gpu = "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b";
    let neighbour = path("state/boards")
        .join(gpu)
        .join("neighbour.normal.compute");
    std::fs::write(&neighbour, [7u8; 64]).expect("a neighbour's entry");
    // The shim arrives through /etc/ld.so.preload, with the slice's config; the slice can write
    // its own board entries and nothing else on the board.
    let probe = podman(&[
        "/bin/sh",
        "-c",
        &format!(
            "cat /etc/ld.so.preload; cat /etc/tessera/config.json; ls /dev/nvidia0; \
             test -w /run/tessera/board/{gpu}.compute && test -w /run/tessera/board/{gpu}.memory && echo own-entries-writable; \
             test -r /run/tessera/boards/{gpu}/neighbour.normal.compute && ! (: > /run/tessera/boards/{gpu}/neighbour.normal.compute) 2>/dev/null && echo neighbour-read-only; \
             ! touch /run/tessera/boards/{gpu}/planted 2>/dev/null && echo boards-read-only; \
             test -d /run/tessera/reservations && ! touch /run/tessera/reservations/x 2>/dev/null && echo reservations-read-only"
        ),
    ])
    .output()
    .expect("run podman");
    let seen = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success(),
        "podman failed: {}\n{seen}",
        String::from_utf8_lossy(&probe.stderr)
    );
    for expected in [
        "/usr/lib/tessera/libtessera.so",
        &format!("\"claimUid\":\"{name}\""),
        &format!("\"memoryLimit\":{}", GIB),
        "\"cores\":50",
        "/dev/nvidia0",
        "own-entries-writable",
        "neighbour-read-only",
        "boards-read-only",
        "reservations-read-only",
    ] {
        let compact: String = seen.split_whitespace().collect();
        assert!(compact.contains(expected), "{expected:?} not in:\n{seen}");
    }

    // A program allocates up to the slice's 1 GiB wall, and no further.
    let app_path = app.clone();
    let (child, mut app) = start(&[app.to_str().expect("utf-8 path"), "dlsym"]);
    assert_eq!(app.ask(""), vec!["ready"]);
    assert_eq!(app.ask("init 0"), vec!["init", "0"]);
    let info = app.ask("info");
    assert_eq!(
        (info[1].as_str(), info[3].as_str()),
        ("0", GIB.to_string().as_str()),
        "cuMemGetInfo shows the slice, not the card: {info:?}"
    );
    assert_eq!(app.ask(&format!("alloc {}", 768 * MIB))[1], "0");
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
    assert_eq!(
        app.ask("alloc 1")[1],
        CUDA_ERROR_OUT_OF_MEMORY,
        "not one byte more"
    );
    // A launch stamps the slice's own entry on its GPU's board, through the spec's mount: how
    // slices sharing a GPU see each other's priority. The neighbour's entry is as it was.
    assert_eq!(app.ask("launch 1"), vec!["launch", "0"]);
    let own = path("state/boards")
        .join(gpu)
        .join(format!("{name}.normal.compute"));
    let stamped = std::fs::read(&own).unwrap_or_else(|e| panic!("{}: {e}", own.display()));
    assert!(
        stamped.len() == 64 && stamped.iter().any(|&b| b != 0),
        "{} not stamped: {stamped:?}",
        own.display()
    );
    assert_eq!(std::fs::read(&neighbour).expect("neighbour"), [7u8; 64]);
    app.quit();
    let output = child.wait_with_output().expect("podman exits");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A process that names its own config, with four times the memory, in TESSERA_CONFIG still
    // meets the mounted config's wall.
    let forge = format!(
        "sed -E 's/\"memoryLimit\": *[0-9]+/\"memoryLimit\": {}/' /etc/tessera/config.json > /tmp/forged.json && grep -q {} /tmp/forged.json && TESSERA_CONFIG=/tmp/forged.json exec {} dlsym",
        4 * GIB,
        4 * GIB,
        app_path.display()
    );
    let (child, mut app) = start(&["/bin/sh", "-c", &forge]);
    assert_eq!(app.ask(""), vec!["ready"], "the forged config was written");
    assert_eq!(app.ask("init 0"), vec!["init", "0"]);
    assert_eq!(
        app.ask("info")[3],
        GIB.to_string(),
        "the slice is the mounted config's"
    );
    assert_eq!(
        app.ask(&format!("alloc {}", 2 * GIB))[1],
        CUDA_ERROR_OUT_OF_MEMORY,
        "the forged limit is not the wall"
    );
    app.quit();
    let output = child.wait_with_output().expect("podman exits");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let removed = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["cdi", "remove", "--name", &name, "--cdi-dir"])
        .arg(&cdi_dir)
        .arg("--state-dir")
        .arg(path("state"))
        .output()
        .expect("run tessera");
    assert!(removed.status.success());
    assert!(!cdi_dir.join(format!("tessera-slice-{name}.json")).exists());
    assert!(!own.exists(), "the slice's board entries go with it");
    assert!(neighbour.exists(), "and nobody else's");
}
