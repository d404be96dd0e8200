//! Reading ResourceClaims from the API server, in whichever `resource.k8s.io` version it serves.
//!
//! NodePrepareResources carries only namespace, name and UID; the allocation is in the claim's
//! status. Servers differ: 1.34+ serve `v1`, 1.33 may serve `v1beta2`/`v1beta1`, 1.32
//! `v1beta1`, 1.31 only `v1alpha3`. The served versions are discovered (and re-discovered every
//! few minutes, so an API server upgrade is followed) and the newest one is used. Every version
//! is reduced to one [`Claim`] shape.

mod convert;
pub mod status;

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroup;
use kube::Client;
use tessera_driver::allocation::DeviceResult;
use tessera_driver::claim_config::ConfigEntry;
use tokio::sync::Mutex;

/// The API group of DRA.
pub const GROUP: &str = "resource.k8s.io";
/// How long a discovered version is trusted.
const DISCOVERY_TTL: Duration = Duration::from_secs(300);

/// A `resource.k8s.io` version the plugin can read claims in, newest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiVersion {
    V1,
    V1beta2,
    V1beta1,
    V1alpha3,
}

impl ApiVersion {
    pub const ALL: [ApiVersion; 4] = [
        ApiVersion::V1,
        ApiVersion::V1beta2,
        ApiVersion::V1beta1,
        ApiVersion::V1alpha3,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V1 => "v1",
            ApiVersion::V1beta2 => "v1beta2",
            ApiVersion::V1beta1 => "v1beta1",
            ApiVersion::V1alpha3 => "v1alpha3",
        }
    }
}

/// A claim as the kubelet names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRef {
    pub namespace: String,
    pub uid: String,
    pub name: String,
}

impl ClaimRef {
    pub fn new(namespace: &str, name: &str, uid: &str) -> ClaimRef {
        ClaimRef {
            namespace: namespace.into(),
            uid: uid.into(),
            name: name.into(),
        }
    }
}

/// What the plugin needs of a claim.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Claim {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `None` when the claim is not allocated.
    pub allocation: Option<Allocation>,
    /// Tessera's entries of `status.devices`, as the server returned them (see [`status`]).
    pub device_status: Vec<serde_json::Value>,
    /// For a claim made from a ResourceClaimTemplate, the pod's name for it
    /// (`pod.spec.resourceClaims[].name`, the `resource.kubernetes.io/pod-claim-name`
    /// annotation): where its containers find their device metadata.
    pub pod_claim_name: Option<String>,
}

/// The annotation the resource claim controller puts on a claim it made from a template.
pub const POD_CLAIM_NAME_ANNOTATION: &str = "resource.kubernetes.io/pod-claim-name";

/// `status.allocation.devices`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocation {
    pub results: Vec<DeviceResult>,
    pub config: Vec<ConfigEntry>,
}

impl Allocation {
    /// The names of the requests Tessera's devices were allocated for.
    pub fn requests_of_ours(&self) -> Vec<&str> {
        self.results
            .iter()
            .filter(|r| r.driver == tessera_api::names::DRIVER_NAME)
            .map(|r| r.request.as_str())
            .collect()
    }
}

/// Why a claim could not be read; per-claim, the message goes back to the kubelet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ResourceClaim {namespace}/{name} not found")]
    NotFound { namespace: String, name: String },
    #[error(
        "ResourceClaim {namespace}/{name} has UID {found}, expected {expected}: the claim was deleted and replaced"
    )]
    Replaced {
        namespace: String,
        name: String,
        found: String,
        expected: String,
    },
    #[error("ResourceClaim {namespace}/{name} is not allocated")]
    NotAllocated { namespace: String, name: String },
    #[error(
        "the API server serves no resource.k8s.io version this plugin reads (v1, v1beta2, v1beta1, v1alpha3); served: {0:?}"
    )]
    NoVersion(Vec<String>),
    // The causes are in the messages (a client error alone says only `client error
    // (Connect)`), so the kube errors are not also `source`s.
    #[error("reading ResourceClaim {namespace}/{name} ({version}): {}", tessera_api::error_chain::Chain(.error))]
    Api {
        namespace: String,
        name: String,
        version: &'static str,
        error: kube::Error,
    },
    #[error("discovering resource.k8s.io versions: {}", tessera_api::error_chain::Chain(.0))]
    Discovery(kube::Error),
    #[error("ResourceClaim {namespace}/{name} ({version}) could not be decoded: {message}")]
    Decode {
        namespace: String,
        name: String,
        version: &'static str,
        message: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads claims through one client, remembering the version the server serves.
pub struct ClaimReader {
    client: Client,
    version: Mutex<Option<(ApiVersion, Instant)>>,
}

impl ClaimReader {
    pub fn new(client: Client) -> ClaimReader {
        ClaimReader {
            client,
            version: Mutex::new(None),
        }
    }

    /// The version claims are read in, discovering it when unknown or stale.
    pub async fn version(&self) -> Result<ApiVersion> {
        let mut cached = self.version.lock().await;
        if let Some((version, at)) = *cached
            && at.elapsed() < DISCOVERY_TTL
        {
            return Ok(version);
        }
        let request = http::Request::get(format!("/apis/{GROUP}"))
            .body(Vec::new())
            .map_err(|e| Error::Discovery(kube::Error::HttpError(e)))?;
        let group: APIGroup = self
            .client
            .request(request)
            .await
            .map_err(Error::Discovery)?;
        let served: Vec<String> = group.versions.iter().map(|v| v.version.clone()).collect();
        let version = ApiVersion::ALL
            .into_iter()
            .find(|v| served.iter().any(|s| s == v.as_str()))
            .ok_or(Error::NoVersion(served))?;
        tracing::info!(
            version = version.as_str(),
            "reading ResourceClaims as {GROUP}/{}",
            version.as_str()
        );
        *cached = Some((version, Instant::now()));
        Ok(version)
    }

    /// Reads `namespace/name` and checks that it is the claim with `uid` and is allocated.
    pub async fn get(&self, namespace: &str, name: &str, uid: &str) -> Result<Claim> {
        let version = self.version().await?;
        let claim = convert::get(&self.client, version, namespace, name).await?;
        let claim = claim.ok_or_else(|| Error::NotFound {
            namespace: namespace.into(),
            name: name.into(),
        })?;
        if claim.uid != uid {
            return Err(Error::Replaced {
                namespace: namespace.into(),
                name: name.into(),
                found: claim.uid,
                expected: uid.into(),
            });
        }
        if claim.allocation.is_none() {
            return Err(Error::NotAllocated {
                namespace: namespace.into(),
                name: name.into(),
            });
        }
        Ok(claim)
    }
}
