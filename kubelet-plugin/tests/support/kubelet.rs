//! A kubelet stand-in: the generated gRPC clients of every DRA version, over the plugin's unix
//! socket, with version-neutral answers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tessera_kubelet_plugin::proto::{registration, v1, v1alpha3, v1beta1};
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

/// Which DRA gRPC API the stand-in speaks, as kubelets of different releases do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// `k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin` (1.34+).
    V1,
    /// `k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin` (1.32+).
    V1beta1,
    /// `v1alpha3.Node` (1.31).
    V1alpha3,
}

pub const ALL_VERSIONS: [Version; 3] = [Version::V1, Version::V1beta1, Version::V1alpha3];

/// A claim as the kubelet sends it.
#[derive(Clone, Debug)]
pub struct Claim {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Claim {
    pub fn new(namespace: &str, name: &str, uid: &str) -> Claim {
        Claim {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }
}

/// One device of a prepare answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub request_names: Vec<String>,
    pub pool_name: String,
    pub device_name: String,
    pub cdi_device_ids: Vec<String>,
    /// Always `None` below v1.
    pub share_id: Option<String>,
}

/// One claim's prepare answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub devices: Vec<Device>,
    pub error: String,
}

/// Connects to a unix socket as the kubelet does.
pub async fn channel(socket: &Path) -> Channel {
    let socket: PathBuf = socket.to_path_buf();
    Endpoint::try_from("http://[::1]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to the plugin socket")
}

/// The stand-in.
#[derive(Clone)]
pub struct Kubelet {
    channel: Channel,
}

macro_rules! call {
    ($module:ident, $client:ty, $channel:expr, $claims:expr, prepare, $share:expr) => {{
        let mut client = <$client>::new($channel);
        let claims = $claims
            .iter()
            .map(|c| $module::Claim {
                namespace: c.namespace.clone(),
                uid: c.uid.clone(),
                name: c.name.clone(),
            })
            .collect();
        let response = client
            .node_prepare_resources($module::NodePrepareResourcesRequest { claims })
            .await?
            .into_inner();
        response
            .claims
            .into_iter()
            .map(|(uid, r)| {
                let devices = r
                    .devices
                    .into_iter()
                    .map(|d| Device {
                        share_id: $share(&d),
                        request_names: d.request_names,
                        pool_name: d.pool_name,
                        device_name: d.device_name,
                        cdi_device_ids: d.cdi_device_ids,
                    })
                    .collect();
                (
                    uid,
                    Prepared {
                        devices,
                        error: r.error,
                    },
                )
            })
            .collect()
    }};
    ($module:ident, $client:ty, $channel:expr, $claims:expr, unprepare) => {{
        let mut client = <$client>::new($channel);
        let claims = $claims
            .iter()
            .map(|c| $module::Claim {
                namespace: c.namespace.clone(),
                uid: c.uid.clone(),
                name: c.name.clone(),
            })
            .collect();
        let response = client
            .node_unprepare_resources($module::NodeUnprepareResourcesRequest { claims })
            .await?
            .into_inner();
        response
            .claims
            .into_iter()
            .map(|(uid, r)| (uid, r.error))
            .collect()
    }};
}

impl Kubelet {
    pub async fn connect(socket: &Path) -> Kubelet {
        Kubelet {
            channel: channel(socket).await,
        }
    }

    /// NodePrepareResources in `version`.
    pub async fn prepare(
        &self,
        version: Version,
        claims: &[Claim],
    ) -> Result<BTreeMap<String, Prepared>, Status> {
        let channel = self.channel.clone();
        Ok(match version {
            Version::V1 => call!(
                v1,
                v1::dra_plugin_client::DraPluginClient<Channel>,
                channel,
                claims,
                prepare,
                |d: &v1::Device| d.share_id.clone()
            ),
            Version::V1beta1 => call!(
                v1beta1,
                v1beta1::dra_plugin_client::DraPluginClient<Channel>,
                channel,
                claims,
                prepare,
                |_: &v1beta1::Device| None
            ),
            Version::V1alpha3 => call!(
                v1alpha3,
                v1alpha3::node_client::NodeClient<Channel>,
                channel,
                claims,
                prepare,
                |_: &v1alpha3::Device| None
            ),
        })
    }

    /// NodeUnprepareResources in `version`; claim UID → error ("" is success).
    pub async fn unprepare(
        &self,
        version: Version,
        claims: &[Claim],
    ) -> Result<BTreeMap<String, String>, Status> {
        let channel = self.channel.clone();
        Ok(match version {
            Version::V1 => call!(
                v1,
                v1::dra_plugin_client::DraPluginClient<Channel>,
                channel,
                claims,
                unprepare
            ),
            Version::V1beta1 => call!(
                v1beta1,
                v1beta1::dra_plugin_client::DraPluginClient<Channel>,
                channel,
                claims,
                unprepare
            ),
            Version::V1alpha3 => call!(
                v1alpha3,
                v1alpha3::node_client::NodeClient<Channel>,
                channel,
                claims,
                unprepare
            ),
        })
    }

    /// Prepares one claim and returns its successful answer.
    pub async fn prepare_ok(&self, version: Version, claim: &Claim) -> Vec<Device> {
        let answer = self
            .prepare(version, std::slice::from_ref(claim))
            .await
            .expect("prepare call");
        let prepared = answer
            .get(&claim.uid)
            .unwrap_or_else(|| panic!("no entry for {}", claim.uid));
        assert_eq!(prepared.error, "", "prepare of {} failed", claim.uid);
        prepared.devices.clone()
    }

    /// Unprepares one claim and asserts success.
    pub async fn unprepare_ok(&self, version: Version, claim: &Claim) {
        let answer = self
            .unprepare(version, std::slice::from_ref(claim))
            .await
            .expect("unprepare call");
        assert_eq!(
            answer.get(&claim.uid).map(String::as_str),
            Some(""),
            "unprepare of {} failed: {answer:?}",
            claim.uid
        );
    }
}

/// The plugin watcher's view: GetInfo on the registration socket.
pub async fn get_info(socket: &Path) -> registration::PluginInfo {
    let mut client =
        registration::registration_client::RegistrationClient::new(channel(socket).await);
    client
        .get_info(registration::InfoRequest {})
        .await
        .expect("GetInfo")
        .into_inner()
}
