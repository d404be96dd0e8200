//! A kubelet stand-in for the plugin's tests: the crate's kubelet-side client
//! (`tessera_kubelet_plugin::kubelet_client`) with the assertions tests want.

use std::collections::BTreeMap;
use std::path::Path;

use tessera_kubelet_plugin::kubelet_client;
use tessera_kubelet_plugin::proto::registration;
use tonic::Status;
use tonic::transport::Channel;

/// A claim as the kubelet sends it.
pub use tessera_kubelet_plugin::ClaimRef as Claim;
/// Which DRA gRPC API the stand-in speaks, as kubelets of different releases do.
pub use tessera_kubelet_plugin::kubelet_client::DraApi as Version;
/// One device of a prepare answer, and one claim's answer.
pub use tessera_kubelet_plugin::kubelet_client::{
    ClaimPrepared as Prepared, PreparedDevice as Device,
};

pub const ALL_VERSIONS: [Version; 3] = Version::ALL;

/// Connects to a unix socket as the kubelet does.
pub async fn channel(socket: &Path) -> Channel {
    kubelet_client::connect(socket)
        .await
        .expect("connect to the plugin socket")
}

/// The stand-in.
#[derive(Clone)]
pub struct Kubelet {
    channel: Channel,
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
        kubelet_client::prepare(self.channel.clone(), version, claims).await
    }

    /// NodeUnprepareResources in `version`; claim UID → error ("" is success).
    pub async fn unprepare(
        &self,
        version: Version,
        claims: &[Claim],
    ) -> Result<BTreeMap<String, String>, Status> {
        kubelet_client::unprepare(self.channel.clone(), version, claims).await
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

/// The plugin watcher's view: GetInfo on the registration socket, dialled with the kubelet's
/// `:authority`.
pub async fn get_info(socket: &Path) -> registration::PluginInfo {
    let channel = kubelet_client::connect_registration(socket)
        .await
        .expect("connect to the registration socket");
    let mut client = registration::registration_client::RegistrationClient::new(channel);
    client
        .get_info(registration::InfoRequest {})
        .await
        .expect("GetInfo")
        .into_inner()
}
