//! Starts `tessera-controller`'s per-node slice controller inside the plugin (issue 4): the
//! node's GPUs are published as ResourceSlices in the configured sharing mode, and the GPU
//! health watcher (`node::health`) says which are unhealthy (tainted or withdrawn there).
//!
//! The returned guard aborts the controller when dropped; `main` drops it before the plugin
//! unregisters, so the controller can never re-create slices the kubelet removes for a plugin
//! that is going away.

use tessera_controller::node::{ModeSetting, NodeController, NodeControllerConfig, NodeStatus};
use tessera_driver::health::NodeGpus;
use tessera_driver::{Inventory, MemoryOvercommit};

use crate::node::health::{self, HealthConfig, NodeEvents};

/// Aborts the slice controller and the health watcher on drop.
pub struct SliceController {
    task: Option<tokio::task::JoinHandle<()>>,
    health: Option<tokio::task::JoinHandle<()>>,
    /// The node's GPUs being published, and which are unhealthy.
    pub inventory: tokio::sync::watch::Receiver<NodeGpus>,
    /// What the controller last published (`None` with `--sharing-mode off`).
    pub status: Option<tokio::sync::watch::Receiver<NodeStatus>>,
}

impl Drop for SliceController {
    fn drop(&mut self) {
        for task in [self.task.take(), self.health.take()].into_iter().flatten() {
            task.abort();
        }
    }
}

/// `mode`: `off` publishes nothing (slices come from elsewhere); otherwise a
/// [`ModeSetting`] (`auto`, `consumable`, `partitioned`, `fixed`, `fixed:<n>`, `exclusive`).
/// `inventory` is the start-up inventory; `health` says how GPUs are withdrawn and restored.
pub fn start(
    client: kube::Client,
    node: &str,
    mode: &str,
    inventory: Inventory,
    health: HealthConfig,
) -> anyhow::Result<SliceController> {
    start_with(
        client,
        node,
        mode,
        inventory,
        health,
        MemoryOvercommit::none(),
    )
}

/// [`start`] on a node whose memory is overcommitted (`--memory-overcommit`): the slices offer
/// physical × factor (`docs/oversubscription.md`).
pub fn start_with(
    client: kube::Client,
    node: &str,
    mode: &str,
    inventory: Inventory,
    health: HealthConfig,
    memory_overcommit: MemoryOvercommit,
) -> anyhow::Result<SliceController> {
    if mode == "off" {
        let (_tx, rx) = tokio::sync::watch::channel(NodeGpus::from(inventory));
        tracing::info!("--sharing-mode off: not publishing ResourceSlices");
        return Ok(SliceController {
            task: None,
            health: None,
            inventory: rx,
            status: None,
        });
    }
    let mode: ModeSetting = mode
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--sharing-mode: {e}"))?;
    // The first look before the first publish: a GPU unhealthy at start is never offered.
    let (tracker, changes) = health::first_look(&health, inventory);
    let (tx, rx) = tokio::sync::watch::channel(tracker.node_gpus());
    let events = NodeEvents::new(client.clone(), node);
    let health = tokio::spawn(health::run(health, tracker, changes, tx, Some(events)));
    let mut config = NodeControllerConfig::new(node, mode);
    config.memory_overcommit = memory_overcommit;
    let (controller, status) = NodeController::new(client, config, rx.clone());
    Ok(SliceController {
        task: Some(tokio::spawn(controller.run())),
        health: Some(health),
        inventory: rx,
        status: Some(status),
    })
}
