//! The kubelet's plugin watcher, and the DRA gRPC client of the registered plugin.
//!
//! Like the kubelet, the stand-in polls the registration directory for sockets, asks each new
//! one `GetInfo`, accepts a `DRAPlugin` offering the DRA API version it speaks, tells it so with
//! `NotifyRegistrationStatus`, and from then on calls the endpoint the plugin named. A socket
//! that is replaced (a restarted plugin makes a new one) is registered again; one that vanishes
//! unregisters the plugin.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use tessera_kubelet_plugin::ClaimRef;
use tessera_kubelet_plugin::kubelet_client;
pub use tessera_kubelet_plugin::kubelet_client::DraApi;
use tessera_kubelet_plugin::proto::registration;
use tokio::sync::watch;
use tonic::transport::Channel;

const DRIVER: &str = "gpu.tessera.dev";
const POLL: Duration = Duration::from_millis(300);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One device of a prepare answer, as the stand-in's checkpoint records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    pub request_names: Vec<String>,
    pub device_name: String,
    pub cdi_device_ids: Vec<String>,
}

impl From<kubelet_client::PreparedDevice> for PreparedDevice {
    fn from(device: kubelet_client::PreparedDevice) -> Self {
        PreparedDevice {
            request_names: device.request_names,
            device_name: device.device_name,
            cdi_device_ids: device.cdi_device_ids,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no {DRIVER} plugin is registered on this node")]
    NotRegistered,
    #[error("the plugin's gRPC call failed: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("connecting to the plugin at {path}: {source}")]
    Connect {
        path: String,
        source: tonic::transport::Error,
    },
    #[error("the plugin did not answer within {CALL_TIMEOUT:?}")]
    Timeout,
    #[error("the plugin's answer has no entry for claim {0}")]
    Missing(String),
    #[error("the plugin refused claim {uid}: {message}")]
    Refused { uid: String, message: String },
}

/// The registered plugin, if any.
#[derive(Clone, Debug)]
pub struct Registered {
    pub endpoint: PathBuf,
    api: DraApi,
}

/// The plugin watcher's published view.
#[derive(Clone)]
pub struct Watcher {
    current: watch::Receiver<Option<Registered>>,
}

impl Watcher {
    pub fn start(dir: PathBuf, api: DraApi) -> Watcher {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(watch_registrations(dir, api, tx));
        Watcher { current: rx }
    }

    fn registered(&self) -> Option<Registered> {
        self.current.borrow().clone()
    }

    /// Prepares one claim; the CDI devices of every device of ours on success.
    pub async fn prepare(&self, claim: &ClaimRef) -> Result<Vec<PreparedDevice>, CallError> {
        let plugin = self.registered().ok_or(CallError::NotRegistered)?;
        // Outer: the call; inner: the plugin's answer for the claim.
        tokio::time::timeout(CALL_TIMEOUT, prepare(&plugin, claim))
            .await
            .map_err(|_| CallError::Timeout)??
    }

    /// Unprepares one claim.
    pub async fn unprepare(&self, claim: &ClaimRef) -> Result<(), CallError> {
        let plugin = self.registered().ok_or(CallError::NotRegistered)?;
        tokio::time::timeout(CALL_TIMEOUT, unprepare(&plugin, claim))
            .await
            .map_err(|_| CallError::Timeout)?
    }
}

async fn connect(socket: &Path) -> Result<Channel, CallError> {
    kubelet_client::connect(socket)
        .await
        .map_err(|source| CallError::Connect {
            path: socket.display().to_string(),
            source,
        })
}

/// Dials a registration socket as the kubelet's plugin watcher does, with the same
/// `:authority` (the percent-encoded path).
async fn connect_registration(socket: &Path) -> Result<Channel, CallError> {
    kubelet_client::connect_registration(socket)
        .await
        .map_err(|source| CallError::Connect {
            path: socket.display().to_string(),
            source,
        })
}

/// Registration sockets seen, by path, with the inode they had (a restarted plugin's new socket
/// has a new inode).
type Seen = BTreeMap<PathBuf, u64>;

async fn watch_registrations(
    dir: PathBuf,
    api: DraApi,
    current: watch::Sender<Option<Registered>>,
) {
    let mut seen: Seen = BTreeMap::new();
    // Which registration socket the current registration came from.
    let mut source: Option<PathBuf> = None;
    loop {
        let sockets = list_sockets(&dir);
        if let Some(path) = &source
            && !sockets.contains_key(path)
        {
            tracing::warn!(socket = %path.display(), "the plugin's registration socket is gone; plugin unregistered");
            current.send_replace(None);
            source = None;
        }
        seen.retain(|path, _| sockets.contains_key(path));
        for (path, inode) in sockets {
            if seen.get(&path) == Some(&inode) {
                continue;
            }
            match register(&path, api).await {
                Ok(Some(registered)) => {
                    tracing::info!(socket = %path.display(), endpoint = %registered.endpoint.display(), "registered plugin {DRIVER}");
                    current.send_replace(Some(registered));
                    source = Some(path.clone());
                    seen.insert(path, inode);
                }
                Ok(None) => {
                    seen.insert(path, inode);
                }
                // A socket that does not answer yet is tried again on the next poll.
                Err(e) => {
                    tracing::debug!(socket = %path.display(), "registration not possible yet: {e}")
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

fn list_sockets(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "sock"))
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.ino())))
        .collect()
}

/// GetInfo and NotifyRegistrationStatus; `None` for a plugin that is not ours.
async fn register(socket: &Path, api: DraApi) -> Result<Option<Registered>, CallError> {
    let mut client = registration::registration_client::RegistrationClient::new(
        connect_registration(socket).await?,
    );
    let info = client
        .get_info(registration::InfoRequest {})
        .await?
        .into_inner();
    if info.r#type != "DRAPlugin" || info.name != DRIVER {
        tracing::info!(socket = %socket.display(), kind = %info.r#type, name = %info.name, "ignoring a plugin that is not {DRIVER}");
        return Ok(None);
    }
    if !info
        .supported_versions
        .iter()
        .any(|v| v == api.advertised_as())
    {
        let error = format!(
            "plugin supports {:?}, this kubelet speaks {}",
            info.supported_versions,
            api.advertised_as()
        );
        let _ = client
            .notify_registration_status(registration::RegistrationStatus {
                plugin_registered: false,
                error: error.clone(),
            })
            .await;
        tracing::error!(socket = %socket.display(), "{error}");
        return Ok(None);
    }
    client
        .notify_registration_status(registration::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await?;
    Ok(Some(Registered {
        endpoint: PathBuf::from(info.endpoint),
        api,
    }))
}

/// The outer error is the call's; the inner one the plugin's answer for the claim.
async fn prepare(
    plugin: &Registered,
    claim: &ClaimRef,
) -> Result<Result<Vec<PreparedDevice>, CallError>, CallError> {
    let channel = connect(&plugin.endpoint).await?;
    let mut answer =
        kubelet_client::prepare(channel, plugin.api, std::slice::from_ref(claim)).await?;
    let response = answer
        .remove(&claim.uid)
        .ok_or_else(|| CallError::Missing(claim.uid.clone()))?;
    if !response.error.is_empty() {
        return Ok(Err(CallError::Refused {
            uid: claim.uid.clone(),
            message: response.error,
        }));
    }
    Ok(Ok(response.devices.into_iter().map(Into::into).collect()))
}

async fn unprepare(plugin: &Registered, claim: &ClaimRef) -> Result<(), CallError> {
    let channel = connect(&plugin.endpoint).await?;
    let mut answer =
        kubelet_client::unprepare(channel, plugin.api, std::slice::from_ref(claim)).await?;
    let error = answer
        .remove(&claim.uid)
        .ok_or_else(|| CallError::Missing(claim.uid.clone()))?;
    if error.is_empty() {
        Ok(())
    } else {
        Err(CallError::Refused {
            uid: claim.uid.clone(),
            message: error,
        })
    }
}
