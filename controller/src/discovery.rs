//! What the API server serves: the newest `resource.k8s.io` version with ResourceSlices, and its
//! minor version (where shared counters may live depends on it).

use kube::Client;

use crate::slices::{ApiVersion, CounterLayout, SharingMode};

/// The server's DRA facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerDra {
    pub version: ApiVersion,
    /// Kubernetes minor version (`31` for 1.31); `None` when the server's answer is unreadable.
    pub minor: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// Its causes are in the message (a client error alone says only `client error
    /// (Connect)`), so it is not also a `source`.
    #[error("API server: {}", tessera_api::error_chain::Chain(.0))]
    Api(kube::Error),
    #[error(
        "the API server serves no resource.k8s.io version with ResourceSlices (DRA is off; on 1.31-1.33 it needs --runtime-config and the DynamicResourceAllocation gate)"
    )]
    NoDra,
}

impl From<kube::Error> for DiscoveryError {
    fn from(error: kube::Error) -> Self {
        DiscoveryError::Api(error)
    }
}

impl ServerDra {
    /// Asks the server.
    pub async fn discover(client: &Client) -> Result<ServerDra, DiscoveryError> {
        let groups = client.list_api_groups().await?;
        let served: Vec<String> = groups
            .groups
            .iter()
            .filter(|g| g.name == "resource.k8s.io")
            .flat_map(|g| g.versions.iter().map(|v| v.version.clone()))
            .collect();
        let mut version = None;
        for candidate in ApiVersion::ALL {
            if !served.iter().any(|v| v == candidate.version()) {
                continue;
            }
            // 1.33+ serve v1alpha3 only for DeviceTaintRule: the version must list resourceslices.
            let resources = client
                .list_api_group_resources(&candidate.api_version())
                .await?;
            if resources
                .resources
                .iter()
                .any(|r| r.name == "resourceslices")
            {
                version = Some(candidate);
                break;
            }
        }
        let version = version.ok_or(DiscoveryError::NoDra)?;
        let info = client.apiserver_version().await?;
        let minor = info
            .minor
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok();
        Ok(ServerDra { version, minor })
    }

    /// 1.35 made devices and shared counters exclusive per slice; before, counters had to sit
    /// with their devices.
    pub fn counter_layout(&self) -> CounterLayout {
        match self.minor {
            Some(m) if m <= 34 => CounterLayout::Combined,
            _ => CounterLayout::Separate,
        }
    }

    /// The modes `auto` tries, best first, that this version can express at all.
    pub fn auto_candidates(&self, fixed_slices: u32) -> Vec<SharingMode> {
        [
            SharingMode::Consumable,
            SharingMode::Partitioned,
            SharingMode::Fixed {
                slices: fixed_slices,
            },
        ]
        .into_iter()
        .filter(|m| self.version.supports(*m))
        .collect()
    }
}
