//! The kubelet's side of the DRA gRPC protocol this plugin serves, in every version a kubelet
//! speaks: a connection over the plugin's unix socket, and NodePrepareResources /
//! NodeUnprepareResources with version-neutral requests and answers. The e2e harness's kubelet
//! stand-in and this crate's tests both call the plugin through it, so the protocol has one
//! client, next to the server it must match.

use std::collections::BTreeMap;
use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::h2_authority::{RewriteOutgoing, grpc_go_authority};
use crate::node::ClaimRef;
use crate::proto::{v1, v1alpha3, v1beta1};

/// The DRA gRPC API a kubelet release speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DraApi {
    /// `k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin` (kubelet 1.34+).
    V1,
    /// `k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin` (kubelet 1.32+).
    V1beta1,
    /// `v1alpha3.Node` (kubelet 1.31).
    V1alpha3,
}

impl DraApi {
    pub const ALL: [DraApi; 3] = [DraApi::V1, DraApi::V1beta1, DraApi::V1alpha3];

    /// The entry of the registration's `supported_versions` that offers this API.
    pub fn advertised_as(self) -> &'static str {
        match self {
            DraApi::V1 => "v1.DRAPlugin",
            DraApi::V1beta1 => "v1beta1.DRAPlugin",
            DraApi::V1alpha3 => "v1alpha3.Node",
        }
    }
}

/// One device of a claim's prepare answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedDevice {
    pub request_names: Vec<String>,
    pub pool_name: String,
    pub device_name: String,
    pub cdi_device_ids: Vec<String>,
    /// The consumable-capacity share; always `None` before v1.
    pub share_id: Option<String>,
}

/// One claim's prepare answer: its devices, or the plugin's error (`""`: none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimPrepared {
    pub devices: Vec<PreparedDevice>,
    pub error: String,
}

/// Connects to a plugin's DRA socket, as the kubelet does: it dials `unix:<path>`, so grpc-go
/// sends `localhost` as `:authority`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// Connects to a plugin's registration socket, as the kubelet's plugin watcher does: it dials
/// the bare path, so grpc-go sends the percent-encoded path as `:authority` (which no `http::Uri`
/// can hold, hence the rewrite of the outgoing header blocks).
pub async fn connect_registration(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    let authority = grpc_go_authority(&socket.to_string_lossy());
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            let authority = authority.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(RewriteOutgoing::new(stream, authority)))
            }
        }))
        .await
}

/// `claims` as `$module`'s request claims.
macro_rules! claims_in {
    ($module:ident, $claims:expr) => {
        $claims
            .iter()
            .map(|c| $module::Claim {
                namespace: c.namespace.clone(),
                uid: c.uid.clone(),
                name: c.name.clone(),
            })
            .collect()
    };
}

macro_rules! prepare_in {
    ($module:ident, $client:ty, $channel:expr, $claims:expr, $share:expr) => {{
        let request = $module::NodePrepareResourcesRequest {
            claims: claims_in!($module, $claims),
        };
        let answer = <$client>::new($channel)
            .node_prepare_resources(request)
            .await?
            .into_inner();
        answer
            .claims
            .into_iter()
            .map(|(uid, claim)| {
                let devices = claim
                    .devices
                    .into_iter()
                    .map(|d| PreparedDevice {
                        share_id: $share(&d),
                        request_names: d.request_names,
                        pool_name: d.pool_name,
                        device_name: d.device_name,
                        cdi_device_ids: d.cdi_device_ids,
                    })
                    .collect();
                let error = claim.error;
                (uid, ClaimPrepared { devices, error })
            })
            .collect()
    }};
}

macro_rules! unprepare_in {
    ($module:ident, $client:ty, $channel:expr, $claims:expr) => {{
        let request = $module::NodeUnprepareResourcesRequest {
            claims: claims_in!($module, $claims),
        };
        let answer = <$client>::new($channel)
            .node_unprepare_resources(request)
            .await?
            .into_inner();
        answer
            .claims
            .into_iter()
            .map(|(uid, claim)| (uid, claim.error))
            .collect()
    }};
}

/// NodePrepareResources in `api`: claim UID → its answer.
pub async fn prepare(
    channel: Channel,
    api: DraApi,
    claims: &[ClaimRef],
) -> Result<BTreeMap<String, ClaimPrepared>, Status> {
    Ok(match api {
        DraApi::V1 => prepare_in!(
            v1,
            v1::dra_plugin_client::DraPluginClient<Channel>,
            channel,
            claims,
            |d: &v1::Device| d.share_id.clone()
        ),
        DraApi::V1beta1 => prepare_in!(
            v1beta1,
            v1beta1::dra_plugin_client::DraPluginClient<Channel>,
            channel,
            claims,
            |_: &v1beta1::Device| None
        ),
        DraApi::V1alpha3 => prepare_in!(
            v1alpha3,
            v1alpha3::node_client::NodeClient<Channel>,
            channel,
            claims,
            |_: &v1alpha3::Device| None
        ),
    })
}

/// NodeUnprepareResources in `api`: claim UID → the plugin's error (`""`: unprepared).
pub async fn unprepare(
    channel: Channel,
    api: DraApi,
    claims: &[ClaimRef],
) -> Result<BTreeMap<String, String>, Status> {
    Ok(match api {
        DraApi::V1 => unprepare_in!(
            v1,
            v1::dra_plugin_client::DraPluginClient<Channel>,
            channel,
            claims
        ),
        DraApi::V1beta1 => unprepare_in!(
            v1beta1,
            v1beta1::dra_plugin_client::DraPluginClient<Channel>,
            channel,
            claims
        ),
        DraApi::V1alpha3 => unprepare_in!(
            v1alpha3,
            v1alpha3::node_client::NodeClient<Channel>,
            channel,
            claims
        ),
    })
}
