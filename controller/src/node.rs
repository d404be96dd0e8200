//! The per-node slice controller, run inside `tessera-kubelet-plugin` for its node.
//!
//! It publishes the node's pool, re-publishes when the node's GPUs change (a GPU goes or turns
//! unhealthy: the caller sends the new [`NodeGpus`]) and when someone else edits or deletes its
//! slices, and retries with backoff while the API server is away. It never exits on its own.
//!
//! An unhealthy GPU's devices are published with a device taint where the API server keeps
//! taints (`resource.k8s.io/v1`, with `DRADeviceTaints` on: 1.36+ by default), so `kubectl get
//! resourceslices -o yaml` says why and an admin's tolerating claim can still get it; where the
//! server has no taints, or drops them, the devices are withdrawn instead, as before.
//!
//! Never fighting the kubelet: the kubelet deletes a driver's slices when the plugin
//! unregisters. The controller lives inside the plugin process and its task is aborted before
//! the plugin unregisters, so it cannot re-create what the kubelet just removed; a deletion it
//! does see is repaired after a debounce, not in a tight loop.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use tessera_driver::health::NodeGpus;
use tokio::sync::{mpsc, watch};

use crate::backoff::Backoff;
use crate::discovery::ServerDra;
use crate::publish::{Publisher, slice_resource};
use crate::slices::{SharingMode, build_pool_with};

/// The mode setting: one mode, or `auto` (best the server keeps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeSetting {
    Auto,
    Mode(SharingMode),
}

impl std::str::FromStr for ModeSetting {
    type Err = String;
    /// `auto`, `consumable`, `partitioned`, `exclusive`, `fixed` (4 slices) or `fixed:<n>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => ModeSetting::Auto,
            "consumable" => ModeSetting::Mode(SharingMode::Consumable),
            "partitioned" => ModeSetting::Mode(SharingMode::Partitioned),
            "exclusive" => ModeSetting::Mode(SharingMode::Exclusive),
            "fixed" => ModeSetting::Mode(SharingMode::Fixed {
                slices: DEFAULT_FIXED_SLICES,
            }),
            other => match other.strip_prefix("fixed:").map(str::parse::<u32>) {
                Some(Ok(n)) if (1..=100).contains(&n) => {
                    ModeSetting::Mode(SharingMode::Fixed { slices: n })
                }
                _ => {
                    return Err(format!(
                        "sharing mode {other:?}: expected auto, consumable, partitioned, fixed, fixed:<1-100> or exclusive"
                    ));
                }
            },
        })
    }
}

/// Slices per GPU in `fixed` mode, and in `auto`'s last resort.
pub const DEFAULT_FIXED_SLICES: u32 = 4;

#[derive(Clone, Debug)]
pub struct NodeControllerConfig {
    pub node: String,
    pub mode: ModeSetting,
    /// Re-check the slices this often even without events.
    pub resync: Duration,
    /// The Event reporter's controller name.
    pub reporter: String,
    /// The node's memory overcommit (`--memory-overcommit`); none by default.
    pub memory_overcommit: tessera_driver::MemoryOvercommit,
}

impl NodeControllerConfig {
    pub fn new(node: &str, mode: ModeSetting) -> Self {
        NodeControllerConfig {
            node: node.to_string(),
            mode,
            resync: Duration::from_secs(600),
            reporter: "tessera-kubelet-plugin".into(),
            memory_overcommit: tessera_driver::MemoryOvercommit::none(),
        }
    }
}

/// What the controller last published, for logs, metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub mode: Option<SharingMode>,
    pub version: Option<crate::ApiVersion>,
    pub generation: i64,
    pub last_error: Option<String>,
    /// Devices in the published pool (0: the node's slices were deleted, no GPU to offer).
    pub devices: usize,
    /// Devices published with a taint (0 where unhealthy GPUs are withdrawn instead).
    pub tainted: usize,
    /// Whether unhealthy GPUs are tainted (true) or withdrawn (false).
    pub taints_kept: bool,
    /// How many syncs wrote something.
    pub writes: u64,
}

pub struct NodeController {
    client: Client,
    config: NodeControllerConfig,
    inventory: watch::Receiver<NodeGpus>,
    status: watch::Sender<NodeStatus>,
    recorder: Recorder,
}

impl NodeController {
    pub fn new(
        client: Client,
        config: NodeControllerConfig,
        inventory: watch::Receiver<NodeGpus>,
    ) -> (Self, watch::Receiver<NodeStatus>) {
        let (status, status_rx) = watch::channel(NodeStatus::default());
        let reporter = Reporter {
            controller: config.reporter.clone(),
            instance: Some(config.node.clone()),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        (
            NodeController {
                client,
                config,
                inventory,
                status,
                recorder,
            },
            status_rx,
        )
    }

    /// Runs until the task is dropped or aborted.
    pub async fn run(mut self) {
        let mut backoff = Backoff::default();
        let server = loop {
            match ServerDra::discover(&self.client).await {
                Ok(s) => break s,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "discovering resource.k8s.io");
                    self.set_error(e.to_string());
                    tokio::time::sleep(delay).await;
                }
            }
        };
        backoff.reset();
        let candidates = match self.config.mode {
            ModeSetting::Auto => server.auto_candidates(DEFAULT_FIXED_SLICES),
            ModeSetting::Mode(m) if server.version.supports(m) => vec![m],
            ModeSetting::Mode(m) => {
                let why = format!(
                    "sharing mode {} needs resource.k8s.io v1 or v1beta2, the server serves {}; publishing fixed:{DEFAULT_FIXED_SLICES} instead",
                    m.name(),
                    server.version.version()
                );
                tracing::error!("{why}");
                self.event(EventType::Warning, "SharingModeUnsupported", &why)
                    .await;
                vec![SharingMode::Fixed {
                    slices: DEFAULT_FIXED_SLICES,
                }]
            }
        };
        tracing::info!(version = server.version.version(), minor = ?server.minor, modes = ?candidates, node = %self.config.node, "publishing ResourceSlices");
        let publisher = Publisher::new(self.client.clone(), &self.config.node, server.version);
        let (trigger_tx, mut trigger) = mpsc::channel::<()>(1);
        let watch_task = tokio::spawn(watch_slices(
            self.client.clone(),
            publisher.clone(),
            trigger_tx,
        ));
        let _abort_watch = AbortOnDrop(watch_task);
        let mut pick = 0;
        let mut taints_kept = server.version == crate::ApiVersion::V1;
        loop {
            let gpus = self.inventory.borrow_and_update().clone();
            let (inventory, taints) = if taints_kept {
                (gpus.known.clone(), gpus.taints_by_index())
            } else {
                (gpus.healthy(), Default::default())
            };
            let mode = candidates[pick];
            if inventory.gpus.is_empty() {
                // Nothing to offer (every GPU gone or unhealthy): the node's slices go, so the
                // scheduler stops placing claims here; they come back with a GPU.
                match publisher.delete_all().await {
                    Ok(deleted) => {
                        backoff.reset();
                        if deleted > 0 {
                            tracing::warn!(
                                deleted,
                                node = %self.config.node,
                                "no GPU to offer: deleted the node's ResourceSlices"
                            );
                        }
                        self.status.send_modify(|s| {
                            s.mode = Some(mode);
                            s.version = Some(server.version);
                            s.devices = 0;
                            s.tainted = 0;
                            s.taints_kept = taints_kept;
                            s.last_error = None;
                            s.writes += u64::from(deleted > 0);
                        });
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?delay, "deleting ResourceSlices");
                        self.set_error(e.to_string());
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
            } else {
                match build_pool_with(
                    &inventory,
                    &self.config.node,
                    mode,
                    server.counter_layout(),
                    &self.config.memory_overcommit,
                    &taints,
                ) {
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build the node's pool");
                        self.set_error(e.to_string());
                    }
                    Ok(plan) => match publisher.sync(&plan).await {
                        Ok(report) if report.dropped.iter().any(|p| p.contains(".taints")) => {
                            let why = "the API server dropped the device taints of unhealthy GPUs (DRADeviceTaints off?); withdrawing their devices instead";
                            tracing::warn!("{why}");
                            self.event(EventType::Warning, "DeviceTaintsDropped", why)
                                .await;
                            taints_kept = false;
                            continue;
                        }
                        Ok(report) if !report.dropped.is_empty() => {
                            let why = format!(
                                "the API server dropped {} of sharing mode {} (feature gate off?): {}",
                                report.dropped.len(),
                                mode.name(),
                                report
                                    .dropped
                                    .iter()
                                    .take(3)
                                    .cloned()
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            );
                            if pick + 1 < candidates.len() {
                                let next = candidates[pick + 1];
                                tracing::warn!(
                                    from = mode.name(),
                                    to = next.name(),
                                    "{why}; falling back"
                                );
                                self.event(
                                    EventType::Warning,
                                    "SharingModeFallback",
                                    &format!("{why}; falling back to {}", next.name()),
                                )
                                .await;
                                pick += 1;
                                continue;
                            }
                            tracing::error!("{why}; no mode left to fall back to");
                            self.event(EventType::Warning, "FieldsDropped", &why).await;
                            self.set_error(why);
                        }
                        Ok(report) => {
                            backoff.reset();
                            if report.changed() {
                                tracing::info!(
                                    mode = mode.name(),
                                    generation = report.generation,
                                    created = report.created,
                                    updated = report.updated,
                                    deleted = report.deleted,
                                    "ResourceSlices published"
                                );
                            }
                            let devices = plan.devices().count();
                            let tainted = plan.devices().filter(|d| !d.taints.is_empty()).count();
                            self.status.send_modify(|s| {
                                s.mode = Some(mode);
                                s.version = Some(server.version);
                                s.devices = devices;
                                s.tainted = tainted;
                                s.taints_kept = taints_kept;
                                s.generation = report.generation;
                                s.last_error = None;
                                s.writes += u64::from(report.changed());
                            });
                        }
                        Err(e) => {
                            let delay = backoff.next_delay();
                            tracing::warn!(error = %e, retry_in = ?delay, "publishing ResourceSlices");
                            self.set_error(e.to_string());
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                    },
                }
            }
            tokio::select! {
                changed = self.inventory.changed() => if changed.is_err() {
                    // The inventory source is gone: keep the slices, react to the others only.
                    self.inventory = watch::channel(gpus).1;
                },
                _ = trigger.recv() => {}
                _ = tokio::time::sleep(self.config.resync) => {}
            }
            // Our own writes come back as watch events: let them settle into one re-check.
            tokio::time::sleep(Duration::from_millis(300)).await;
            while trigger.try_recv().is_ok() {}
        }
    }

    fn set_error(&self, e: String) {
        self.status.send_modify(|s| s.last_error = Some(e));
    }

    async fn event(&self, type_: EventType, reason: &str, note: &str) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.config.node.clone()),
            ..Default::default()
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "PublishResourceSlices".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %tessera_api::error_chain::Chain(&e), reason, "cannot record Event");
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches this node's slices; any change (ours included: the sync after it is a no-op) triggers
/// a re-check, which repairs edits and deletions by others.
async fn watch_slices(client: Client, publisher: Publisher, trigger: mpsc::Sender<()>) {
    let api: Api<DynamicObject> = Api::all_with(client, &slice_resource(publisher.version()));
    let config = watcher::Config::default().fields(&publisher.field_selector());
    let mut stream = watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                let _ = trigger.try_send(());
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "watching ResourceSlices"),
        }
    }
}
