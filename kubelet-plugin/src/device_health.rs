//! `DRAResourceHealth` (KEP-4680): the kubelet opens a stream to the plugin and shows each
//! device's health in the status of the pods using it
//! (`status.containerStatuses[].allocatedResourcesStatus`, with the message from 1.36), so a
//! pod whose GPU failed says so itself.
//!
//! Kubelets 1.34–1.36 speak `v1alpha1`, 1.37 and newer `v1` (and `v1alpha1` until 1.39); both
//! carry the same messages and are served from one [`DeviceHealthService`]. The kubelet watches
//! only where its `ResourceHealthStatus` gate is on (beta, on by default, from 1.36).
//!
//! Each report lists every device prepared on the node (the checkpoint's claims: the kubelet
//! shows health only for its pods' devices), each with the health of the GPU it lives on as the
//! node's health watcher (`node::health`) sees it. A report goes out when the stream opens, when
//! a GPU's health changes, after each prepare or unprepare of this instance, and every
//! [`RESEND`] otherwise: the kubelet turns a device `Unknown` once its last report is older than
//! the timeout each report states, so a plugin that stops reporting is never taken as healthy.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_driver::DeviceName;
use tessera_driver::checkpoint::PreparedDevice;
use tessera_driver::health::NodeGpus;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::proto::{health_v1, health_v1alpha1};

/// How often an unchanged report is sent again.
pub const RESEND: Duration = Duration::from_secs(10);

/// How long the kubelet trusts a report: three resends, so one late report does not turn a
/// healthy device `Unknown`.
pub const TIMEOUT: Duration = Duration::from_secs(3 * RESEND.as_secs());

/// The services to add to `GetInfo`'s supported versions when health is served.
pub const SERVICES: [&str; 2] = ["v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth"];

/// One device's health, in version-neutral form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceReport {
    pub pool: String,
    pub device: String,
    pub health: DeviceHealth,
    /// Why it is not healthy; empty when it is.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceHealth {
    Healthy,
    Unhealthy,
    /// The plugin cannot tell: the device is not one of its names, or names no GPU it knows.
    Unknown,
}

/// The health of each of `devices` (pool, device name; each once, however many claims share
/// it) on `gpus`.
pub fn report<'a>(
    devices: impl IntoIterator<Item = (&'a str, &'a str)>,
    gpus: &NodeGpus,
) -> Vec<DeviceReport> {
    let unique: BTreeSet<(&str, &str)> = devices.into_iter().collect();
    unique
        .into_iter()
        .map(|(pool, device)| {
            let (health, message) = device_health(device, gpus);
            DeviceReport {
                pool: pool.to_owned(),
                device: device.to_owned(),
                health,
                message,
            }
        })
        .collect()
}

fn device_health(device: &str, gpus: &NodeGpus) -> (DeviceHealth, String) {
    let index = match DeviceName::parse(device) {
        Ok(name) => name.gpu_index(),
        Err(error) => return (DeviceHealth::Unknown, error.to_string()),
    };
    let Some(gpu) = gpus.known.gpus.iter().find(|g| g.index == index) else {
        return (
            DeviceHealth::Unknown,
            format!("GPU {index} is not among this node's GPUs"),
        );
    };
    match gpus.unhealthy.get(&gpu.uuid) {
        None => (DeviceHealth::Healthy, String::new()),
        Some(unhealthy) => (
            DeviceHealth::Unhealthy,
            format!("GPU {index} ({}): {}", gpu.uuid, unhealthy.reason),
        ),
    }
}

fn names(device: &PreparedDevice) -> (&str, &str) {
    (&device.device.pool, &device.device.device)
}

/// Serves both versions of `DRAResourceHealth`.
#[derive(Clone)]
pub struct DeviceHealthService {
    node: Arc<Node>,
    gpus: watch::Receiver<NodeGpus>,
}

impl DeviceHealthService {
    /// `gpus`: the node's GPUs and which are unhealthy, from the health watcher.
    pub fn new(node: Arc<Node>, gpus: watch::Receiver<NodeGpus>) -> DeviceHealthService {
        DeviceHealthService { node, gpus }
    }

    /// A stream of reports, each converted by `convert` (report, Unix seconds now, the timeout
    /// in seconds) into a version's message; it ends when the kubelet drops it.
    fn stream<T: Send + 'static>(
        &self,
        convert: fn(Vec<DeviceReport>, i64, i64) -> T,
    ) -> ReceiverStream<Result<T, Status>> {
        let (tx, rx) = mpsc::channel(1);
        let (node, mut gpus) = (self.node.clone(), self.gpus.clone());
        let mut prepared = node.prepared_changes();
        tokio::spawn(async move {
            let streams = node.metrics().health_streams();
            streams.inc();
            tracing::info!("the kubelet is watching device health");
            let (mut gpus_open, mut prepared_open) = (true, true);
            loop {
                gpus.mark_unchanged();
                prepared.mark_unchanged();
                match node.prepared_devices() {
                    Ok(devices) => {
                        let reports = report(devices.iter().map(names), &gpus.borrow());
                        let now = SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs() as i64);
                        let timeout = TIMEOUT.as_secs() as i64;
                        if tx.send(Ok(convert(reports, now, timeout))).await.is_err() {
                            break;
                        }
                    }
                    // The kubelet turns the devices Unknown if this lasts past the timeout.
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the prepared devices for the kubelet's health report")
                    }
                }
                tokio::select! {
                    () = tx.closed() => break,
                    changed = gpus.changed(), if gpus_open => gpus_open = changed.is_ok(),
                    changed = prepared.changed(), if prepared_open => prepared_open = changed.is_ok(),
                    () = tokio::time::sleep(RESEND) => {}
                }
            }
            streams.dec();
            tracing::info!("the kubelet stopped watching device health");
        });
        ReceiverStream::new(rx)
    }
}

/// Generates one version's service: the messages are the same in both.
macro_rules! health_version {
    ($module:ident) => {
        #[tonic::async_trait]
        impl $module::dra_resource_health_server::DraResourceHealth for DeviceHealthService {
            type NodeWatchResourcesStream =
                ReceiverStream<Result<$module::NodeWatchResourcesResponse, Status>>;

            async fn node_watch_resources(
                &self,
                _: Request<$module::NodeWatchResourcesRequest>,
            ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
                Ok(Response::new(self.stream(|reports, now, timeout| {
                    $module::NodeWatchResourcesResponse {
                        devices: reports
                            .into_iter()
                            .map(|r| $module::DeviceHealth {
                                device: Some($module::DeviceIdentifier {
                                    pool_name: r.pool,
                                    device_name: r.device,
                                }),
                                health: match r.health {
                                    DeviceHealth::Healthy => $module::HealthStatus::Healthy,
                                    DeviceHealth::Unhealthy => $module::HealthStatus::Unhealthy,
                                    DeviceHealth::Unknown => $module::HealthStatus::Unknown,
                                } as i32,
                                last_updated_time: now,
                                health_check_timeout_seconds: timeout,
                                message: r.message,
                            })
                            .collect(),
                    }
                })))
            }
        }
    };
}

health_version!(health_v1);
health_version!(health_v1alpha1);

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_driver::Inventory;
    use tessera_driver::health::{Taint, TaintEffect, Unhealthy};

    fn two_gpus(unhealthy_uuid: Option<&str>) -> NodeGpus {
        let inventory: Inventory = serde_json::from_value(serde_json::json!({
            "driverVersion": "550.54.15",
            "gpus": [
                { "index": 0, "minor": 0, "uuid": "GPU-a", "productName": "NVIDIA L4", "memory": 24u64 << 30 },
                { "index": 1, "minor": 1, "uuid": "GPU-b", "productName": "NVIDIA L4", "memory": 24u64 << 30 },
            ],
        }))
        .expect("inventory");
        let mut gpus = NodeGpus::from(inventory);
        if let Some(uuid) = unhealthy_uuid {
            gpus.unhealthy.insert(
                uuid.into(),
                Unhealthy {
                    reason: "critical XID 79".into(),
                    taint: Taint {
                        key: tessera_driver::health::TAINT_XID,
                        value: "79".into(),
                        effect: TaintEffect::NoExecute,
                    },
                },
            );
        }
        gpus
    }

    #[test]
    fn each_device_has_the_health_of_its_gpu_once() {
        let devices = [
            ("node-a", "gpu-1"),
            ("node-a", "gpu-0-slice-0of2"),
            // A second claim's share of the same consumable device.
            ("node-a", "gpu-1"),
        ];
        let reports = report(devices, &two_gpus(Some("GPU-b")));
        assert_eq!(
            reports,
            [
                DeviceReport {
                    pool: "node-a".into(),
                    device: "gpu-0-slice-0of2".into(),
                    health: DeviceHealth::Healthy,
                    message: String::new(),
                },
                DeviceReport {
                    pool: "node-a".into(),
                    device: "gpu-1".into(),
                    health: DeviceHealth::Unhealthy,
                    message: "GPU 1 (GPU-b): critical XID 79".into(),
                },
            ]
        );
    }

    #[test]
    fn a_device_the_plugin_cannot_place_is_unknown_and_says_why() {
        let reports = report([("node-a", "gpu-7"), ("node-a", "nic-0")], &two_gpus(None));
        assert_eq!(reports[0].health, DeviceHealth::Unknown);
        assert_eq!(reports[0].message, "GPU 7 is not among this node's GPUs");
        assert_eq!(reports[1].health, DeviceHealth::Unknown);
        assert!(
            reports[1].message.contains("not a Tessera device name"),
            "{}",
            reports[1].message
        );
    }
}
