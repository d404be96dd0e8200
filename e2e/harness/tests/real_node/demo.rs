//! `tessera-cluster demo` (what `make demo` runs): the two workers run on the real node,
//! through the upstream kubelet and containerd, with Tessera from its chart and images. Worker A
//! hits its wall with CUDA_ERROR_OUT_OF_MEMORY, worker B finishes beside it, and the plugin's
//! metrics show B's limit and usage; afterwards nothing of the node is left.

use std::path::Path;
use std::process::Command;

use tessera_e2e_harness::K8sVersion;
use tessera_e2e_harness::realnode::NodeBinaries;

use crate::common;
use crate::support::required;

async fn demo(version: K8sVersion) {
    let test = format!("real_node_demo_{}", version.dir_name().replace('.', "_"));
    let Some(binaries) = common::binaries_or_skip(version, &test) else {
        return;
    };
    if required(&test, NodeBinaries::locate(&binaries)).is_none() {
        return;
    }
    // A short directory: the simulated nodes' sockets live under it.
    let state = common::StateDir::new("demo");
    let run = Command::new(env!("CARGO_BIN_EXE_tessera-cluster"))
        .args(["demo", "--k8s-version", &version.dir_name()])
        .arg("--state-dir")
        .arg(state.path())
        .arg("--nodes")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../nodes"))
        .output()
        .expect("running tessera-cluster demo");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    let printed = format!("{stdout}\n-- stderr --\n{stderr}");
    assert!(run.status.success(), "the demo failed:\n{printed}");

    let node = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("real node "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the demo names no real node:\n{printed}"))
        .to_owned();
    assert!(
        stdout.contains(&format!(
            "of the real node {node} (upstream kubelet and containerd)"
        )),
        "the workers should run on the real node:\n{printed}"
    );
    // Both workers were bound to the real node.
    let on_node = stdout
        .lines()
        .filter(|l| {
            let mut fields = l.split_whitespace();
            matches!(fields.next(), Some("worker-a" | "worker-b")) && fields.next() == Some(&node)
        })
        .count();
    assert!(
        on_node >= 4,
        "worker-a and worker-b should be listed on {node}:\n{printed}"
    );
    // A's wall: 2 GiB from 1.34 on, two tenths of the 24 GiB GPU before; its context takes
    // what the fake driver's default node charges per context (320 MiB), as the plugin measured.
    let a_wall: f64 = if version.minor() >= 34 { 2.0 } else { 4.8 };
    let a_free = a_wall - 320.0 / 1024.0;
    let seen = format!("cuMemGetInfo: {a_free:.2} GiB free of {a_wall:.2} GiB");
    assert!(
        stdout
            .lines()
            .any(|l| l.trim().starts_with("worker-a | ") && l.contains(&seen)),
        "worker-a should see its {a_wall} GiB slice less its context ({seen}):\n{printed}"
    );
    for expected in [
        "CUDA_ERROR_OUT_OF_MEMORY".to_owned(),
        "worker-b | ".to_owned(),
        "allocated 2.50 GiB".to_owned(),
        "== Done: worker-a hit its memory wall, worker-b finished beside it".to_owned(),
    ] {
        assert!(stdout.contains(&expected), "no {expected:?} in:\n{printed}");
    }
    // The plugin's metrics while B ran alone: B's limit and its 2.5 GiB with its context, on
    // the RTX 4090.
    let b_limit = if version.minor() >= 34 {
        "3.00 GiB"
    } else {
        "7.20 GiB"
    };
    let b_used = format!("{:.2} GiB", 2.5 + 320.0 / 1024.0);
    assert!(
        stdout.lines().any(|l| l.contains("NVIDIA GeForce RTX 4090")
            && l.contains(b_limit)
            && l.contains(&b_used)),
        "no usage line with B's limit {b_limit} and {b_used} used:\n{printed}"
    );
    let root = std::env::temp_dir().join(format!("tessera-node-{node}"));
    assert!(!root.exists(), "{} is left after the demo", root.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*root.to_string_lossy()),
        "mounts left under {}",
        root.display()
    );
    eprintln!("{test}: passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_demo_v1_37() {
    demo(K8sVersion::newest()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_demo_v1_31() {
    demo(tessera_e2e_harness::versions::PINNED[0]).await;
}
