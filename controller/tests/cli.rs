//! `tessera-controller --render-inventory`: slices from an inventory file, a bad file refused
//! with the file, field and line named, and with `--memory-overcommit` the slices an
//! overcommitted node would publish and the guard rail's refusals, without an API server.

use std::process::Command;

fn run(file: &str, extra: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("inventory.json");
    std::fs::write(&path, file).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-controller"))
        .arg("--render-inventory")
        .arg(&path)
        .args(extra)
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn renders_slices_from_an_inventory_file() {
    let file = r#"{"driverVersion": "570.86.15", "devices": [{"uuid": "GPU-1", "name": "NVIDIA L40S", "memory": 51539607552, "computeCapability": "8.9"}]}"#;
    let (ok, stdout, stderr) = run(
        file,
        &[
            "--mode",
            "fixed:2",
            "--api-version",
            "v1alpha3",
            "--node",
            "n1",
        ],
    );
    assert!(ok, "{stderr}");
    let slice: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON slice");
    assert_eq!(slice["apiVersion"], "resource.k8s.io/v1alpha3");
    assert_eq!(slice["spec"]["devices"][1]["name"], "gpu-0-slice-1of2");
    assert_eq!(
        slice["spec"]["devices"][1]["basic"]["capacity"]["memory"],
        "25769803776"
    );
}

#[test]
fn bad_inventory_is_refused_with_the_field_named() {
    let file =
        "{\"devices\": [\n  {\"uuid\": \"GPU-1\", \"name\": \"x\", \"memory\": \"lots\"}\n]}";
    let (ok, _, stderr) = run(file, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("inventory.json")
            && stderr.contains("devices[0].memory")
            && stderr.contains("line 2"),
        "{stderr}"
    );
    // Said once, and without colour codes in a log that is not a terminal.
    assert_eq!(
        stderr.matches("devices[0].memory").count(),
        1,
        "the error printed twice:\n{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI codes in a log file:\n{stderr}"
    );
    let (ok, _, stderr) = run(
        r#"{"devices": [{"uuid": "GPU-1", "name": "x", "memory": 1}]}"#,
        &["--mode", "consumable"],
    );
    assert!(!ok);
    assert!(
        stderr.contains("GPU 0") && stderr.contains("too small"),
        "{stderr}"
    );
}

// --memory-overcommit

const L40S: &str = r#"{"devices": [{"uuid": "GPU-1", "name": "NVIDIA L40S", "memory": 51539607552, "computeCapability": "8.9"}]}"#;

#[test]
fn renders_the_offered_memory() {
    let (ok, stdout, stderr) = run(
        L40S,
        &[
            "--mode",
            "consumable",
            "--memory-overcommit",
            "NVIDIA L40S=1.5",
        ],
    );
    assert!(ok, "{stderr}");
    let slice: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON slice");
    let device = &slice["spec"]["devices"][0];
    assert_eq!(
        device["capacity"]["memory"]["value"],
        (72u64 << 30).to_string()
    );
    assert_eq!(
        device["capacity"]["memory"]["requestPolicy"]["default"],
        (48u64 << 30).to_string(),
        "naming no memory still gets the card"
    );
    assert_eq!(device["attributes"]["memoryOvercommitPercent"]["int"], 150);
    // Factor 1 (the default) renders as before: no attribute, the card.
    let (ok, stdout, _) = run(L40S, &["--mode", "consumable"]);
    assert!(ok);
    let slice: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(
        slice["spec"]["devices"][0]["capacity"]["memory"]["value"],
        (48u64 << 30).to_string()
    );
    assert!(slice["spec"]["devices"][0]["attributes"]["memoryOvercommitPercent"].is_null());
}

#[test]
fn refuses_factors_out_of_range_and_gpus_without_on_demand_paging() {
    let (ok, _, stderr) = run(L40S, &["--memory-overcommit", "4.5"]);
    assert!(!ok);
    assert!(
        stderr.contains("--memory-overcommit") && stderr.contains("outside 1.0–4.0"),
        "{stderr}"
    );
    let k80 = r#"{"devices": [{"uuid": "GPU-2", "name": "Tesla K80", "memory": 12884901888, "computeCapability": "3.7"}]}"#;
    let (ok, _, stderr) = run(k80, &["--memory-overcommit", "2"]);
    assert!(!ok);
    assert!(
        stderr.contains("--memory-overcommit") && stderr.contains("compute capability 3.7"),
        "{stderr}"
    );
}

/// A kubeconfig for an API server nobody serves (a port just closed on loopback).
fn unreachable_kubeconfig(dir: &std::path::Path) -> std::path::PathBuf {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .expect("kubeconfig");
    path
}

/// The controller with `args` and `kubeconfig`, text logs; its exit status and stderr.
fn controller(args: &[&str], kubeconfig: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-controller"))
        .args(["--log-format", "text"])
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--once` with an API server that does not answer ends within seconds with an error saying
/// so, instead of retrying for ever as the long-running controller does.
#[test]
fn once_with_an_unreachable_api_server_fails_saying_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = unreachable_kubeconfig(dir.path());
    let started = std::time::Instant::now();
    let (ok, stderr) = controller(&["--once"], &kubeconfig);
    assert!(!ok, "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains("--once: the API server did not answer discovery of resource.k8s.io"),
        "{stderr}"
    );
}

/// A `--listen` address in use stops the controller at once, naming the address, before it
/// talks to the API server.
#[test]
fn an_address_in_use_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = unreachable_kubeconfig(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let address = taken.local_addr().expect("address");
    let (ok, stderr) = controller(&["--listen", &address.to_string()], &kubeconfig);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(&format!("listening on {address} (--listen)")) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(!stderr.contains("leader election"), "{stderr}");
}
