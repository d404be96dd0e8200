//! Watches the health of the node's GPUs and tells the slice controller which are unhealthy: an
//! unhealthy or vanished GPU stops being offered to new claims (a log line and a Node Event name
//! it and the reason) and is offered again once healthy.
//!
//! Sources: NVML (a look every interval: a GPU NVML no longer finds is gone, one it reports lost
//! is unhealthy; and critical XID events, which withdraw a GPU until the plugin restarts) or,
//! for fake nodes, the inventory file, re-read every interval (`health` per device). How the
//! slices say it is the slice controller's choice (`tessera_controller::node`): a device taint
//! where the API server keeps taints (1.36+), withdrawal of the GPU's devices elsewhere.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tessera_driver::Inventory;
use tessera_driver::health::{Change, HealthTracker, NodeGpus, Observation, xid_is_critical};
use tokio::sync::{mpsc, watch};

/// Where GPU health comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthSource {
    /// Re-read this fake inventory file.
    File(PathBuf),
    /// Ask NVML, loaded from this library (`None`: `libnvidia-ml.so.1` from the loader path).
    Nvml(Option<PathBuf>),
    /// Never withdraw a GPU.
    Off,
}

#[derive(Clone, Debug)]
pub struct HealthConfig {
    pub source: HealthSource,
    /// How often the node is looked at.
    pub interval: Duration,
}

/// What the watcher hears from its source.
#[derive(Debug)]
enum Input {
    Look(Observation),
    Xid { uuid: String, xid: u64 },
}

/// Records what happens to the node's GPUs and to the plugin itself as Events on the Node,
/// where `kubectl describe node` shows them.
#[derive(Clone)]
pub struct NodeEvents {
    recorder: Recorder,
    node: String,
}

impl NodeEvents {
    pub fn new(client: kube::Client, node: &str) -> NodeEvents {
        let reporter = Reporter {
            controller: "tessera-kubelet-plugin".into(),
            instance: Some(node.to_string()),
        };
        NodeEvents {
            recorder: Recorder::new(client, reporter),
            node: node.to_string(),
        }
    }

    /// Records one Event; a failure to record it is logged, never returned: Events are for
    /// people, and the plugin's work must not depend on them.
    pub async fn publish(&self, type_: EventType, reason: &str, action: &str, note: String) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node.clone()),
            ..Default::default()
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %tessera_api::error_chain::Chain(&e), reason, "cannot record Event");
        }
    }
}

/// Event reasons.
pub const REASON_UNHEALTHY: &str = "GpuUnhealthy";
pub const REASON_HEALTHY: &str = "GpuHealthy";
pub const REASON_NOT_OFFERED: &str = "GpuNotOffered";
/// The kubelet answered the plugin's registration with an error (NotifyRegistrationStatus).
pub const REASON_REGISTRATION_REFUSED: &str = "RegistrationRefused";
/// The plugin could not start (or stopped) on the node; the note is the error.
pub const REASON_PLUGIN_FAILED: &str = "PluginFailed";

/// The health watcher, running: [`HealthWatch::gpus`] follows the node's GPUs and which are
/// unhealthy (for the slice controller and the kubelet's health stream). Dropping it stops the
/// watcher.
pub struct HealthWatch {
    pub gpus: watch::Receiver<NodeGpus>,
    /// Whether anything looks at the GPUs (`false` with health checks off: every GPU is taken
    /// as healthy, and nothing can say otherwise).
    pub observed: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes the first look (see [`first_look`]), reports it, and starts following the source.
/// Must be called in a Tokio runtime.
pub fn watch(config: HealthConfig, known: Inventory, events: Option<NodeEvents>) -> HealthWatch {
    let observed = config.source != HealthSource::Off;
    let (tracker, changes) = first_look(&config, known);
    let (tx, gpus) = watch::channel(tracker.node_gpus());
    let task = tokio::spawn(run(config, tracker, changes, tx, events));
    HealthWatch {
        gpus,
        observed,
        task,
    }
}

/// The first look at the node, taken before anything is published, so that a GPU already
/// unhealthy at start is never offered. Returns the tracker to [`run`] with and the changes to
/// report (what to publish first is `tracker.node_gpus()`).
pub fn first_look(config: &HealthConfig, known: Inventory) -> (HealthTracker, Vec<Change>) {
    let mut tracker = HealthTracker::new(known);
    let look = match &config.source {
        HealthSource::Off => Ok(None),
        HealthSource::File(path) => Inventory::observe_file(path)
            .map_err(|e| e.to_string())
            .map(Some),
        HealthSource::Nvml(library) => {
            tessera_driver::nvml::HealthProbe::open(library.as_deref().map(|p| p.as_os_str()))
                .map(|probe| Some(probe.observe(tracker.known())))
                .map_err(|e| e.to_string())
        }
    }
    .unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot look at GPU health at start; offering every GPU");
        None
    });
    let changes = look.map(|l| tracker.observe(l)).unwrap_or_default();
    (tracker, changes)
}

/// Watches until `offered` has no receiver left: reports `changes` (from [`first_look`]), then
/// follows the source. `offered` gets the node's GPUs to publish after every change.
pub async fn run(
    config: HealthConfig,
    tracker: HealthTracker,
    changes: Vec<Change>,
    offered: watch::Sender<NodeGpus>,
    events: Option<NodeEvents>,
) {
    for change in &changes {
        report(change, events.as_ref()).await;
    }
    let (tx, rx) = mpsc::channel(16);
    match &config.source {
        HealthSource::Off => return,
        HealthSource::File(path) => {
            tokio::spawn(read_file(path.clone(), config.interval, tx));
        }
        HealthSource::Nvml(library) => {
            let (library, known, interval) =
                (library.clone(), tracker.known().clone(), config.interval);
            std::thread::Builder::new()
                .name("gpu-health".into())
                .spawn(move || ask_nvml(library, known, interval, tx))
                .map(drop)
                .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the GPU health thread; GPUs are never withdrawn"));
        }
    }
    follow(rx, tracker, offered, events).await;
}

/// Applies what the source reports until it or `offered`'s receivers are gone.
async fn follow(
    mut rx: mpsc::Receiver<Input>,
    mut tracker: HealthTracker,
    offered: watch::Sender<NodeGpus>,
    events: Option<NodeEvents>,
) {
    while let Some(input) = rx.recv().await {
        if offered.is_closed() {
            return;
        }
        let changes = match input {
            Input::Look(look) => tracker.observe(look),
            Input::Xid { uuid, xid } if xid_is_critical(xid) => tracker.mark(
                &uuid,
                xid,
                &format!(
                    "critical XID {xid} (withdrawn until the plugin restarts, after a GPU reset)"
                ),
            ),
            Input::Xid { uuid, xid } => {
                tracing::info!(gpu = %uuid, xid, "application XID; the GPU stays offered");
                Vec::new()
            }
        };
        if changes.is_empty() {
            continue;
        }
        let gpus = tracker.node_gpus();
        offered.send_if_modified(|current| {
            let modified = *current != gpus;
            *current = gpus;
            modified
        });
        for change in changes {
            report(&change, events.as_ref()).await;
        }
    }
}

async fn report(change: &Change, events: Option<&NodeEvents>) {
    let (type_, reason, note) = match change {
        Change::Withdrawn {
            uuid,
            index,
            reason,
        } => {
            tracing::warn!(gpu = %uuid, index, %reason, "GPU unhealthy: no longer offered to new claims (tainted, or withdrawn from the node's ResourceSlices)");
            (
                EventType::Warning,
                REASON_UNHEALTHY,
                format!(
                    "GPU {index} ({uuid}) is no longer offered to new claims (tainted, or withdrawn from the node's ResourceSlices): {reason}"
                ),
            )
        }
        Change::Restored { uuid, index } => {
            tracing::info!(gpu = %uuid, index, "GPU healthy again: offered in the node's ResourceSlices");
            (
                EventType::Normal,
                REASON_HEALTHY,
                format!(
                    "GPU {index} ({uuid}) is healthy again and offered in the node's ResourceSlices"
                ),
            )
        }
        Change::Unknown { uuid } => {
            tracing::warn!(gpu = %uuid, "a GPU appeared after the plugin started; restart the plugin to offer it");
            (
                EventType::Warning,
                REASON_NOT_OFFERED,
                format!(
                    "GPU {uuid} appeared after tessera-kubelet-plugin started; restart the plugin to offer it"
                ),
            )
        }
    };
    if let Some(events) = events {
        events.publish(type_, reason, "CheckGpuHealth", note).await;
    }
}

/// The fake node: re-reads the inventory file every `interval`. An unreadable or invalid file
/// changes nothing (it may be half-written) and is logged once until it is readable again.
async fn read_file(path: PathBuf, interval: Duration, tx: mpsc::Sender<Input>) {
    let mut last_error: Option<String> = None;
    loop {
        match tessera_driver::Inventory::observe_file(&path) {
            Ok(look) => {
                last_error = None;
                if tx.send(Input::Look(look)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let e = e.to_string();
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "cannot read GPU health from the inventory file; keeping the last state");
                    last_error = Some(e);
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// NVML, on a thread of its own (its calls block): XID events as they come, and a look every
/// `interval`.
fn ask_nvml(
    library: Option<PathBuf>,
    known: Inventory,
    interval: Duration,
    tx: mpsc::Sender<Input>,
) {
    let probe =
        match tessera_driver::nvml::HealthProbe::open(library.as_deref().map(|p| p.as_os_str())) {
            Ok(probe) => probe,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch GPU health; GPUs are never withdrawn");
                return;
            }
        };
    let xids = match probe.xid_events(&known) {
        Ok(xids) => Some(xids),
        Err(e) => {
            tracing::warn!(error = %e, "no XID events from NVML; GPU health is polled only");
            None
        }
    };
    let mut looked = Instant::now() - interval;
    loop {
        if looked.elapsed() >= interval {
            looked = Instant::now();
            if tx
                .blocking_send(Input::Look(probe.observe(&known)))
                .is_err()
            {
                return;
            }
        }
        let wait = interval.saturating_sub(looked.elapsed());
        match xids.as_ref().map(|x| x.wait(wait)) {
            Some(Ok(Some((uuid, xid)))) => {
                if tx.blocking_send(Input::Xid { uuid, xid }).is_err() {
                    return;
                }
            }
            Some(Ok(None)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "waiting for XID events");
                std::thread::sleep(wait);
            }
            None => std::thread::sleep(wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(devices: &[(&str, &str)]) -> String {
        let devices: Vec<_> = devices
            .iter()
            .map(|(uuid, health)| serde_json::json!({"uuid": uuid, "name": "NVIDIA L40S", "memory": 48u64 << 30, "health": health}))
            .collect();
        serde_json::json!({ "devices": devices }).to_string()
    }

    async fn offered(rx: &mut watch::Receiver<NodeGpus>) -> Vec<u32> {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("a change within 10 s")
            .expect("sender alive");
        rx.borrow_and_update()
            .healthy()
            .gpus
            .iter()
            .map(|g| g.index)
            .collect()
    }

    #[tokio::test]
    async fn a_critical_xid_withdraws_a_gpu_until_restart_an_application_xid_does_not() {
        use tessera_driver::health::{TAINT_XID, TaintEffect};
        let known = Inventory::from_json(&file(&[("GPU-a", "healthy"), ("GPU-b", "healthy")]))
            .expect("inventory");
        let (offered_tx, mut offered_rx) = watch::channel(NodeGpus::from(known.clone()));
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(follow(
            rx,
            HealthTracker::new(known.clone()),
            offered_tx,
            None,
        ));
        // XID 13 (an application's graphics exception): nothing changes.
        tx.send(Input::Xid {
            uuid: "GPU-b".into(),
            xid: 13,
        })
        .await
        .expect("send");
        tx.send(Input::Look(Observation::all_healthy(&known)))
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!offered_rx.has_changed().expect("alive"));
        // XID 79 (fallen off the bus): withdrawn, and a healthy look does not bring it back.
        tx.send(Input::Xid {
            uuid: "GPU-b".into(),
            xid: 79,
        })
        .await
        .expect("send");
        assert_eq!(offered(&mut offered_rx).await, [0]);
        tx.send(Input::Look(Observation::all_healthy(&known)))
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!offered_rx.has_changed().expect("alive"));
        assert_eq!(offered_rx.borrow().healthy().gpus.len(), 1);
        let gpus = offered_rx.borrow().clone();
        let taint = &gpus.unhealthy["GPU-b"].taint;
        assert_eq!((taint.key, taint.value.as_str()), (TAINT_XID, "79"));
        assert_eq!(taint.effect, TaintEffect::NoExecute);
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("ends with its source")
            .expect("no panic");
    }

    #[tokio::test]
    async fn the_inventory_file_withdraws_and_restores_gpus() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("inventory.json");
        let write = |text: String| {
            let tmp = dir.path().join("tmp");
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, &path).expect("rename");
        };
        // GPU-a is unhealthy at start: it is never offered.
        write(file(&[("GPU-a", "unhealthy"), ("GPU-b", "healthy")]));
        let known = Inventory::from_file(&path).expect("inventory");
        let config = HealthConfig {
            source: HealthSource::File(path.clone()),
            interval: Duration::from_millis(20),
        };
        let (tracker, changes) = first_look(&config, known);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let (tx, mut rx) = watch::channel(tracker.node_gpus());
        assert_eq!(
            rx.borrow()
                .healthy()
                .gpus
                .iter()
                .map(|g| g.index)
                .collect::<Vec<_>>(),
            [1]
        );
        let task = tokio::spawn(run(config, tracker, changes, tx, None));
        write(file(&[("GPU-a", "healthy"), ("GPU-b", "healthy")]));
        assert_eq!(offered(&mut rx).await, [0, 1]);
        write(file(&[("GPU-a", "healthy"), ("GPU-b", "unhealthy")]));
        assert_eq!(offered(&mut rx).await, [0]);
        // Half-written: nothing changes.
        write("{\"devices\": [".into());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!rx.has_changed().expect("alive"));
        write(file(&[("GPU-a", "healthy"), ("GPU-b", "healthy")]));
        assert_eq!(offered(&mut rx).await, [0, 1]);
        write(file(&[]));
        assert_eq!(offered(&mut rx).await, Vec::<u32>::new());
        write(file(&[("GPU-b", "healthy")]));
        assert_eq!(offered(&mut rx).await, [1]);
        drop(rx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the watcher ends with its receiver")
            .expect("no panic");
    }
}
