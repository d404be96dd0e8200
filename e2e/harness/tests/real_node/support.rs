//! What every real-node test uses: a control plane with a real node, waiting for pods and
//! logs, and the watch that nothing leaves loopback.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use tessera_built_libs::require;
use tessera_e2e_harness::process::log_tail;
use tessera_e2e_harness::realnode::{
    NodeBinaries, OffLoopback, PidFinder, RealNode, RealNodeOptions, sockets_off_loopback,
};
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions, K8sVersion};

use crate::common;

/// The value when `found` is `Ok`; for an `Err`, what `require` decides (skip the test, or
/// fail it under `TESSERA_E2E=1`), with the error as the reason.
pub(crate) fn required<T, E: std::fmt::Display>(test: &str, found: Result<T, E>) -> Option<T> {
    let reason = found.as_ref().err().map(ToString::to_string);
    require(test, reason.is_none(), || {
        reason.clone().unwrap_or_default()
    })?;
    found.ok()
}

pub(crate) const POD_TIMEOUT: Duration = Duration::from_secs(120);

/// Samples the sockets of every process of the cluster and the node until dropped; what it saw
/// off loopback is kept.
pub(crate) struct LoopbackWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashSet<OffLoopback>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopbackWatch {
    pub(crate) fn start(control_plane_pids: Vec<i32>, node: PidFinder) -> LoopbackWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let thread = {
            let stop = stop.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut pids = control_plane_pids.clone();
                    pids.extend(node.pids());
                    let found = sockets_off_loopback(&pids);
                    seen.lock().expect("watch lock").extend(found);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        LoopbackWatch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns everything seen off loopback.
    pub(crate) fn finish(mut self) -> Vec<OffLoopback> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut seen: Vec<_> = self.seen.lock().expect("watch lock").drain().collect();
        seen.sort_by_key(|o| (o.pid, o.local.clone(), o.remote.clone()));
        seen
    }

    /// Stops sampling and fails the test, listing them, if any socket was off loopback.
    pub(crate) fn assert_nothing_left_loopback(self) {
        let off_loopback = self.finish();
        assert!(
            off_loopback.is_empty(),
            "sockets off loopback:\n{}",
            off_loopback
                .iter()
                .map(|o| format!("  {o}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

impl Drop for LoopbackWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits for one of `phases`; the panic shows the pod's status and the kubelet's log tail.
pub(crate) async fn wait_for_phase(
    pods: &Api<Pod>,
    name: &str,
    phases: &[&str],
    node: &RealNode,
) -> Pod {
    let start = Instant::now();
    loop {
        let pod = pods.get(name).await.expect("reading pod");
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phases.contains(&phase.as_str()) {
            return pod;
        }
        if start.elapsed() > POD_TIMEOUT {
            panic!(
                "pod {name} is {phase:?}, not one of {phases:?}, after {POD_TIMEOUT:?}; status: {:#?}\nkubelet log ({}):\n{}",
                pod.status,
                node.kubelet_log().display(),
                node.kubelet_log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn wait_gone(pods: &Api<Pod>, name: &str, node: &RealNode) {
    let start = Instant::now();
    while pods.get_opt(name).await.expect("reading pod").is_some() {
        assert!(
            start.elapsed() < POD_TIMEOUT,
            "pod {name} not gone after {POD_TIMEOUT:?}; kubelet log:\n{}",
            node.kubelet_log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A control plane and a real node, or `None` where the test cannot run (see `require`).
/// Fields drop in reverse order: the node before the control plane, the directory last.
pub(crate) struct Setup {
    pub(crate) test: String,
    pub(crate) began: Instant,
    pub(crate) node: RealNode,
    pub(crate) control_plane: ControlPlane,
    _state: common::StateDir,
}

pub(crate) async fn setup(version: K8sVersion, name: &str, kubelet_verbosity: u8) -> Option<Setup> {
    setup_with(version, name, kubelet_verbosity, |_| Vec::new()).await
}

/// [`setup`], with containerd's environment from `containerd_env` (given the test's state
/// directory).
pub(crate) async fn setup_with(
    version: K8sVersion,
    name: &str,
    kubelet_verbosity: u8,
    containerd_env: impl FnOnce(&std::path::Path) -> Vec<(std::ffi::OsString, std::ffi::OsString)>,
) -> Option<Setup> {
    let test = format!("{name}_{}", version.dir_name().replace('.', "_"));
    let binaries = common::binaries_or_skip(version, &test)?;
    let node_binaries = required(&test, NodeBinaries::locate(&binaries))?;
    common::init_tracing();
    let began = Instant::now();
    let state = common::StateDir::new(&test);
    let control_plane = ControlPlane::start(ControlPlaneOptions {
        binaries: Some(binaries),
        ..ControlPlaneOptions::new(version, state.path())
    })
    .await
    .unwrap_or_else(|e| panic!("starting the control plane: {e}"));
    let node = RealNode::start(
        &control_plane,
        RealNodeOptions {
            kubelet_verbosity,
            keep_dir: std::env::var("TESSERA_E2E_KEEP").as_deref() == Ok("1"),
            containerd_env: containerd_env(state.path()),
            ..RealNodeOptions::new(node_binaries)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("starting the real node: {e}"));
    eprintln!(
        "{test}: node {} Ready {:.1}s after the kubelet started ({:.1}s after the test began)",
        node.name(),
        node.ready_in().as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    Some(Setup {
        test,
        began,
        node,
        control_plane,
        _state: state,
    })
}

/// Stops the node and checks that it left no mount behind.
pub(crate) fn stop_node(node: RealNode) {
    let root = node.root().to_owned();
    let problems = node.stop();
    assert!(problems.is_empty(), "stopping the node: {problems:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&*root.to_string_lossy()))
        .collect();
    assert!(
        left.is_empty(),
        "mounts left under {}: {left:#?}",
        root.display()
    );
}

/// Polls `check` (which says what it is waiting for when not yet done) until it is done; the
/// panic names the last state and the kubelet's log tail.
pub(crate) async fn wait_until<F, Fut>(what: &str, node: &RealNode, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(state) => state,
        };
        if start.elapsed() > POD_TIMEOUT {
            panic!(
                "{what}: not after {POD_TIMEOUT:?}; last: {last}\ncontainer logs:\n{}\nkubelet log ({}):\n{}",
                container_logs_tail(node, 15),
                node.kubelet_log().display(),
                node.kubelet_log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The last lines of every container log on the node (`<node>/pod-logs/<pod>/<container>/N.log`).
pub(crate) fn container_logs_tail(node: &RealNode, lines: usize) -> String {
    let mut out = String::new();
    let pods = std::fs::read_dir(node.root().join("pod-logs"))
        .into_iter()
        .flatten();
    for pod in pods.flatten() {
        let containers = std::fs::read_dir(pod.path()).into_iter().flatten();
        for container in containers.flatten() {
            let logs = std::fs::read_dir(container.path()).into_iter().flatten();
            for log in logs.flatten() {
                out.push_str(&format!(
                    "--- {}\n{}\n",
                    log.path().display(),
                    log_tail(&log.path(), lines)
                ));
            }
        }
    }
    out
}

pub(crate) fn pod_summary(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let containers: Vec<String> = status
        .container_statuses
        .unwrap_or_default()
        .iter()
        .map(|c| {
            format!(
                "{} ready={} restarts={} state={}",
                c.name,
                c.ready,
                c.restart_count,
                serde_json::to_string(&c.state).unwrap_or_default()
            )
        })
        .collect();
    format!(
        "{} {} on {:?}: [{}]",
        pod.metadata.name.as_deref().unwrap_or_default(),
        status.phase.unwrap_or_default(),
        pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        containers.join("; ")
    )
}

pub(crate) fn all_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.ready))
}
