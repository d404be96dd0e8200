//! Starts `tessera-controller`'s per-node slice controller inside the plugin (issue 4): the
//! node's GPUs are published as ResourceSlices in the configured sharing mode, and the GPU
//! health watcher (`node::health`) says which are unhealthy (tainted or withdrawn there).
//!
//! The returned guard aborts the controller when dropped; `main` drops it before the plugin
//! unregisters, so the controller can never re-create slices the kubelet removes for a plugin
//! that is going away.

use tessera_controller::node::{ModeSetting, NodeController, NodeControllerConfig, NodeStatus};
use tessera_driver::{Inventory, MemoryOvercommit};

use crate::node::health::{self, HealthConfig, HealthWatch, NodeEvents};

/// Aborts the slice controller and the health watcher on drop.
pub struct SliceController {
    task: Option<tokio::task::JoinHandle<()>>,
    /// The health watcher the controller follows, held to be dropped (stopped) with it.
    _health: HealthWatch,
    /// What the controller last published (`None` with `--sharing-mode off`).
    pub status: Option<tokio::sync::watch::Receiver<NodeStatus>>,
}

impl Drop for SliceController {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
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
    let events = NodeEvents::new(client.clone(), node);
    let health = health::watch(health, inventory, Some(events));
    start_with(client, node, mode, health, MemoryOvercommit::none())
}

/// [`start`] with the health watcher already running (the plugin starts it before it
/// registers, so the kubelet's health stream has it), on a node whose memory may be
/// overcommitted (`--memory-overcommit`): the slices offer physical × factor
/// (`docs/oversubscription.md`).
pub fn start_with(
    client: kube::Client,
    node: &str,
    mode: &str,
    health: HealthWatch,
    memory_overcommit: MemoryOvercommit,
) -> anyhow::Result<SliceController> {
    if mode == "off" {
        tracing::info!("--sharing-mode off: not publishing ResourceSlices");
        return Ok(SliceController {
            task: None,
            _health: health,
            status: None,
        });
    }
    let mode: ModeSetting = mode
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--sharing-mode: {e}"))?;
    let mut config = NodeControllerConfig::new(node, mode);
    config.memory_overcommit = memory_overcommit;
    let (controller, status) = NodeController::new(client, config, health.gpus.clone());
    Ok(SliceController {
        task: Some(tokio::spawn(controller.run())),
        _health: health,
        status: Some(status),
    })
}
