//! Starts `tessera-controller`'s per-node slice controller inside the plugin (issue 4): the
//! node's GPUs are published as ResourceSlices in the configured sharing mode.
//!
//! The returned guard aborts the controller when dropped; `main` drops it before the plugin
//! unregisters, so the controller can never re-create slices the kubelet removes for a plugin
//! that is going away.

use tessera_controller::node::{ModeSetting, NodeController, NodeControllerConfig};
use tessera_driver::Inventory;

/// Aborts the slice controller on drop.
pub struct SliceController {
    task: Option<tokio::task::JoinHandle<()>>,
    /// Keeps the inventory channel open; later inventory/health updates go through it.
    pub inventory: tokio::sync::watch::Sender<Inventory>,
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
pub fn start(
    client: kube::Client,
    node: &str,
    mode: &str,
    inventory: Inventory,
) -> anyhow::Result<SliceController> {
    let (tx, rx) = tokio::sync::watch::channel(inventory);
    if mode == "off" {
        tracing::info!("--sharing-mode off: not publishing ResourceSlices");
        return Ok(SliceController {
            task: None,
            inventory: tx,
        });
    }
    let mode: ModeSetting = mode
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--sharing-mode: {e}"))?;
    let (controller, _status) =
        NodeController::new(client, NodeControllerConfig::new(node, mode), rx);
    Ok(SliceController {
        task: Some(tokio::spawn(controller.run())),
        inventory: tx,
    })
}
