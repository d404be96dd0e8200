//! The gRPC services: registration, and the DRA node service in each kubelet version (`v1`,
//! `v1beta1`, 1.31's `v1alpha3.Node`), all thin adapters over [`Node`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::runtime::events::EventType;
use tessera_api::names::DRIVER_NAME;
use tessera_driver::checkpoint::PreparedDevice;
use tonic::{Request, Response, Status};

use crate::node::health::{NodeEvents, REASON_REGISTRATION_REFUSED};
use crate::node::{CallError, ClaimRef, Node, PreparedClaimResult};
use crate::proto::{registration, v1, v1alpha3, v1beta1};

/// What GetInfo advertises, newest first. The kubelet (1.32+) takes the first entry it knows.
/// A 1.31 kubelet instead parses every entry as a version number and needs one `1.x`: the
/// service names fail to parse and are skipped, `1.0.0` registers the plugin, and the 1.31
/// kubelet then speaks `v1alpha3.Node`, which is served too.
pub const SUPPORTED_VERSIONS: [&str; 4] = [
    "v1.DRAPlugin",
    "v1beta1.DRAPlugin",
    "v1alpha3.Node",
    "1.0.0",
];

/// What GetInfo advertises: [`SUPPORTED_VERSIONS`], and the health services
/// ([`crate::device_health::SERVICES`]) when `health` is served. Unknown entries are skipped by
/// every kubelet, so the health services may come after the DRA ones.
pub fn supported_versions(health: bool) -> Vec<String> {
    let (dra, oldest) = SUPPORTED_VERSIONS.split_at(2);
    let health: &[&str] = if health {
        &crate::device_health::SERVICES
    } else {
        &[]
    };
    dra.iter()
        .chain(health)
        .chain(oldest)
        .map(|v| v.to_string())
        .collect()
}

/// `pluginregistration.Registration`.
pub struct Registration {
    pub endpoint: String,
    /// What GetInfo answers ([`supported_versions`]).
    pub supported_versions: Vec<String>,
    /// Whether the kubelet last reported the registration as successful.
    pub registered: Arc<AtomicBool>,
    /// Where a refused registration is reported, besides the log.
    pub events: Option<NodeEvents>,
}

#[tonic::async_trait]
impl registration::registration_server::Registration for Registration {
    async fn get_info(
        &self,
        _: Request<registration::InfoRequest>,
    ) -> Result<Response<registration::PluginInfo>, Status> {
        // Called periodically by the plugin watcher: keep it cheap and always answering.
        Ok(Response::new(registration::PluginInfo {
            r#type: "DRAPlugin".into(),
            name: DRIVER_NAME.into(),
            endpoint: self.endpoint.clone(),
            supported_versions: self.supported_versions.clone(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<registration::RegistrationStatus>,
    ) -> Result<Response<registration::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        self.registered
            .store(status.plugin_registered, Ordering::Relaxed);
        if status.plugin_registered {
            tracing::info!("registered with the kubelet");
        } else {
            tracing::error!(error = %status.error, "the kubelet refused the registration");
            if let Some(events) = &self.events {
                events
                    .publish(
                        EventType::Warning,
                        REASON_REGISTRATION_REFUSED,
                        "Register",
                        format!(
                            "the kubelet refused the registration of {DRIVER_NAME}: {}",
                            status.error
                        ),
                    )
                    .await;
            }
        }
        Ok(Response::new(registration::RegistrationStatusResponse {}))
    }
}

/// The DRA node service; one value serves every version.
#[derive(Clone)]
pub struct DraService {
    pub node: Arc<Node>,
}

/// A device in version-neutral form, converted into each version's message.
struct Answer {
    devices: Vec<PreparedDevice>,
}

impl DraService {
    async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> Result<BTreeMap<String, Result<Answer, String>>, Status> {
        let results = match self.node.prepare(&claims).await {
            Ok(results) => results,
            Err(error) => whole_call_failed(&claims, error)?,
        };
        Ok(results
            .into_iter()
            .map(|(uid, r): (String, PreparedClaimResult)| {
                (uid, r.map(|devices| Answer { devices }))
            })
            .collect())
    }

    async fn unprepare(&self, claims: Vec<ClaimRef>) -> Result<BTreeMap<String, String>, Status> {
        let results = match self.node.unprepare(&claims).await {
            Ok(results) => results,
            Err(error) => whole_call_failed(&claims, error)?,
        };
        Ok(results
            .into_iter()
            .map(|(uid, r)| (uid, r.err().unwrap_or_default()))
            .collect())
    }
}

/// A failure of the whole call becomes each claim's error, so the pod's events say why; a
/// simulated crash is a transport-level failure, as a real one would be.
fn whole_call_failed<T>(
    claims: &[ClaimRef],
    error: CallError,
) -> Result<BTreeMap<String, Result<T, String>>, Status> {
    if let CallError::Crashed(_) = error {
        return Err(Status::unavailable(error.to_string()));
    }
    tracing::error!(%error, "call failed");
    Ok(claims
        .iter()
        .map(|c| (c.uid.clone(), Err(error.to_string())))
        .collect())
}

/// Generates the service trait impl of one DRA version: the messages differ only in `share_id`.
macro_rules! dra_version {
    ($module:ident, $server:ident, $trait:ident, share_id: $share:tt) => {
        #[tonic::async_trait]
        impl $module::$server::$trait for DraService {
            async fn node_prepare_resources(
                &self,
                request: Request<$module::NodePrepareResourcesRequest>,
            ) -> Result<Response<$module::NodePrepareResourcesResponse>, Status> {
                let claims = request.into_inner().claims.into_iter().map(|c| ClaimRef { namespace: c.namespace, uid: c.uid, name: c.name }).collect();
                let claims = self
                    .prepare(claims)
                    .await?
                    .into_iter()
                    .map(|(uid, result)| {
                        let response = match result {
                            Ok(answer) => $module::NodePrepareResourceResponse {
                                devices: answer.devices.into_iter().map(|d| dra_version!(@device $module, d, $share)).collect(),
                                error: String::new(),
                            },
                            Err(error) => $module::NodePrepareResourceResponse { devices: Vec::new(), error },
                        };
                        (uid, response)
                    })
                    .collect();
                Ok(Response::new($module::NodePrepareResourcesResponse { claims }))
            }

            async fn node_unprepare_resources(
                &self,
                request: Request<$module::NodeUnprepareResourcesRequest>,
            ) -> Result<Response<$module::NodeUnprepareResourcesResponse>, Status> {
                let claims = request.into_inner().claims.into_iter().map(|c| ClaimRef { namespace: c.namespace, uid: c.uid, name: c.name }).collect();
                let claims = self
                    .unprepare(claims)
                    .await?
                    .into_iter()
                    .map(|(uid, error)| (uid, $module::NodeUnprepareResourceResponse { error }))
                    .collect();
                Ok(Response::new($module::NodeUnprepareResourcesResponse { claims }))
            }
        }
    };
    (@device $module:ident, $d:ident, true) => {
        $module::Device {
            request_names: vec![$d.device.request],
            pool_name: $d.device.pool,
            device_name: $d.device.device,
            cdi_device_ids: $d.cdi_device_ids,
            share_id: $d.device.share_id,
        }
    };
    (@device $module:ident, $d:ident, false) => {
        $module::Device {
            request_names: vec![$d.device.request],
            pool_name: $d.device.pool,
            device_name: $d.device.device,
            cdi_device_ids: $d.cdi_device_ids,
        }
    };
}

dra_version!(v1, dra_plugin_server, DraPlugin, share_id: true);
dra_version!(v1beta1, dra_plugin_server, DraPlugin, share_id: false);
dra_version!(v1alpha3, node_server, Node, share_id: false);
