//! The harness's own promises: a failing component is reported with its log,
//! and nothing outlives a test that panics.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{StateDir, binaries_or_skip, init_tracing};
use tessera_e2e_harness::process::is_alive;
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions, Error, K8sVersion};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_feature_gate_fails_with_the_apiserver_log() {
    let test = "unknown_feature_gate_fails_with_the_apiserver_log";
    init_tracing();
    let version = K8sVersion::newest();
    let Some(binaries) = binaries_or_skip(version, test) else {
        return;
    };
    let state = StateDir::new(test);
    let mut options = ControlPlaneOptions::new(version, state.path());
    options.binaries = Some(binaries);
    options
        .extra_feature_gates
        .push(("TesseraNoSuchGate".to_owned(), true));
    let Err(err) = ControlPlane::start(options).await else {
        panic!("started with an unknown feature gate")
    };
    let text = err.to_string();
    assert!(
        matches!(err, Error::ComponentExited { ref name, .. } if name == "kube-apiserver"),
        "{text}"
    );
    assert!(
        text.contains("TesseraNoSuchGate"),
        "log tail should name the gate: {text}"
    );
    // etcd was started before the apiserver failed; the error path must stop it.
    let pid_file = state.path().join("run").join("etcd.pid");
    assert!(!pid_file.exists(), "etcd pid file left behind");
}

#[test]
fn a_panicking_test_leaves_no_processes() {
    let test = "a_panicking_test_leaves_no_processes";
    init_tracing();
    let version = K8sVersion::newest();
    let Some(binaries) = binaries_or_skip(version, test) else {
        return;
    };
    let state = StateDir::new(test);
    let state_path = state.path().to_owned();
    let (tx, rx) = mpsc::channel();
    let panicking = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let mut options = ControlPlaneOptions::new(version, &state_path);
            options.binaries = Some(binaries);
            let cp = ControlPlane::start(options).await.expect("control plane");
            let pids: Vec<i32> = cp.record().components.iter().map(|c| c.pid).collect();
            tx.send(pids).expect("send pids");
            panic!("deliberate panic with a running control plane");
        })
    });
    assert!(panicking.join().is_err(), "the thread was meant to panic");
    let pids = rx.recv().expect("pids");
    assert_eq!(pids.len(), 4);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| is_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let alive: Vec<_> = pids.iter().filter(|p| is_alive(**p)).collect();
    assert!(alive.is_empty(), "still running after the panic: {alive:?}");
}
