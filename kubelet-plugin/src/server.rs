//! The plugin's two unix sockets and their gRPC servers.
//!
//! The DRA socket (`<plugin-dir>/dra.sock`) serves all three DRA versions; the registration
//! socket in the kubelet's `plugins_registry` directory tells the kubelet where it is. With an
//! instance ID (the pod UID) both names carry it, so during a rolling update the new pod's
//! sockets do not replace the old pod's while it still serves calls (kubelet 1.33+).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tessera_api::names::DRIVER_NAME;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::device_health::DeviceHealthService;
use crate::grpc::{DraService, Registration};
use crate::h2_authority::RewriteIncoming;
use crate::node::Node;
use crate::node::health::NodeEvents;
use crate::proto::{health_v1, health_v1alpha1, registration, v1, v1alpha3, v1beta1};
use tessera_driver::health::NodeGpus;

/// The longest path a unix socket address holds (`sun_path`, with its NUL).
const UNIX_PATH_MAX: usize = 107;

/// Where the plugin's sockets are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sockets {
    pub registration: PathBuf,
    pub dra: PathBuf,
}

impl Sockets {
    /// Socket paths, unique per `instance` when one is given. Only the instance's first
    /// [`INSTANCE_TAG_LEN`] name-safe characters go into the names: a pod UID in full makes
    /// the registration socket's path too long for `sun_path` under kubelet roots such as
    /// MicroK8s' `/var/snap/microk8s/common/var/lib/kubelet`, and two instances on one node
    /// differ long before that (a UID's first 12 characters carry 44 random bits).
    pub fn new(registrar_dir: &Path, plugin_dir: &Path, instance: Option<&str>) -> Sockets {
        match instance.map(instance_tag).filter(|t| !t.is_empty()) {
            Some(id) => Sockets {
                registration: registrar_dir.join(format!("{DRIVER_NAME}-{id}-reg.sock")),
                dra: plugin_dir.join(format!("dra-{id}.sock")),
            },
            None => Sockets {
                registration: registrar_dir.join(format!("{DRIVER_NAME}-reg.sock")),
                dra: plugin_dir.join("dra.sock"),
            },
        }
    }
}

/// How many characters of the instance ID name the sockets.
pub const INSTANCE_TAG_LEN: usize = 12;

fn instance_tag(instance: &str) -> String {
    instance
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(INSTANCE_TAG_LEN)
        .collect()
}

/// A running plugin; [`Plugin::stop`] shuts it down and removes its sockets.
pub struct Plugin {
    pub sockets: Sockets,
    pub registered: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Plugin {
    /// Binds both sockets (the DRA one first, so the kubelet never learns of a socket that does
    /// not answer yet) and starts serving.
    /// A registration the kubelet refuses is reported to `events` too. With `health` (the
    /// node's GPUs as the health watcher sees them) the plugin also serves and advertises
    /// `DRAResourceHealth`; without it (health checks off) the kubelet is not offered it.
    pub async fn start(
        node: Arc<Node>,
        sockets: Sockets,
        events: Option<NodeEvents>,
        health: Option<watch::Receiver<NodeGpus>>,
    ) -> io::Result<Plugin> {
        let (shutdown, signal) = watch::channel(false);
        let registered = Arc::new(AtomicBool::new(false));
        let supported_versions = crate::grpc::supported_versions(health.is_some());
        let health = health.map(|gpus| DeviceHealthService::new(node.clone(), gpus));
        let service = DraService { node };
        let dra = bind(&sockets.dra)?;
        let until = shutdown_signal(signal.clone());
        let dra_server =
            tokio::spawn(
                Server::builder()
                    .add_service(v1::dra_plugin_server::DraPluginServer::new(service.clone()))
                    .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(
                        service.clone(),
                    ))
                    .add_service(v1alpha3::node_server::NodeServer::new(service))
                    .add_optional_service(
                        health.clone().map(
                            health_v1::dra_resource_health_server::DraResourceHealthServer::new,
                        ),
                    )
                    .add_optional_service(health.map(
                        health_v1alpha1::dra_resource_health_server::DraResourceHealthServer::new,
                    ))
                    .serve_with_incoming_shutdown(any_authority(dra), until),
            );
        // The kubelet dials the endpoint from its own working directory: always absolute.
        let endpoint = std::path::absolute(&sockets.dra)
            .unwrap_or_else(|_| sockets.dra.clone())
            .display()
            .to_string();
        let registrar = Registration {
            endpoint,
            supported_versions,
            registered: registered.clone(),
            events,
        };
        let reg = bind(&sockets.registration)?;
        let reg_server = tokio::spawn(
            Server::builder()
                .add_service(registration::registration_server::RegistrationServer::new(
                    registrar,
                ))
                .serve_with_incoming_shutdown(any_authority(reg), shutdown_signal(signal)),
        );
        tracing::info!(registration = %sockets.registration.display(), dra = %sockets.dra.display(), "serving");
        Ok(Plugin {
            sockets,
            registered,
            shutdown,
            servers: vec![dra_server, reg_server],
        })
    }

    /// Stops serving: the registration socket goes first, so the kubelet stops routing calls here
    /// (to the other instance, during a rolling update).
    pub async fn stop(self) {
        let _ = std::fs::remove_file(&self.sockets.registration);
        let _ = self.shutdown.send(true);
        for server in self.servers {
            match server.await {
                Ok(Err(error)) => tracing::warn!(%error, "gRPC server ended with an error"),
                Err(error) => tracing::warn!(%error, "gRPC server task failed"),
                Ok(Ok(())) => {}
            }
        }
        let _ = std::fs::remove_file(&self.sockets.dra);
    }
}

/// The connections a socket accepts, each answering whatever `:authority` its client sends: the
/// kubelet's grpc-go sends a percent-encoded socket path to the registration socket, which h2
/// would refuse (see [`crate::h2_authority`]).
fn any_authority(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = io::Result<RewriteIncoming<tokio::net::UnixStream>>> {
    UnixListenerStream::new(listener)
        .map(|connection| connection.map(|stream| RewriteIncoming::new(stream, "localhost")))
}

async fn shutdown_signal(mut signal: watch::Receiver<bool>) {
    let _ = signal.wait_for(|stop| *stop).await;
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.as_os_str().len() > UNIX_PATH_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is longer than {UNIX_PATH_MAX} bytes",
                path.display()
            ),
        ));
    }
    let context =
        |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(context(format!(
            "creating the socket directory {}",
            dir.display()
        )))?;
    }
    // A socket left by a previous run of this instance: nobody can be serving on it.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(context(format!(
                "removing the old socket {}",
                path.display()
            ))(e));
        }
        _ => {}
    }
    UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_uid_names_sockets_that_fit_under_long_kubelet_roots() {
        let root = Path::new("/var/snap/microk8s/common/var/lib/kubelet");
        let sockets = Sockets::new(
            &root.join("plugins_registry"),
            &root.join("plugins/gpu.tessera.dev"),
            Some("431d9893-8903-4a73-8f40-39691540f45d"),
        );
        assert_eq!(
            sockets.registration,
            root.join("plugins_registry/gpu.tessera.dev-431d9893-890-reg.sock")
        );
        assert_eq!(
            sockets.dra,
            root.join("plugins/gpu.tessera.dev/dra-431d9893-890.sock")
        );
        for path in [&sockets.registration, &sockets.dra] {
            assert!(path.as_os_str().len() <= UNIX_PATH_MAX, "{path:?}");
        }
    }

    #[test]
    fn an_instance_id_is_cut_to_name_safe_characters() {
        let dir = Path::new("/r");
        let named = |id: &str| Sockets::new(dir, dir, Some(id)).dra;
        assert_eq!(named("pod-1"), dir.join("dra-pod-1.sock"));
        assert_eq!(named("../../etc/x"), dir.join("dra-etcx.sock"));
        // Nothing name-safe left: the plain names, as without an instance.
        assert_eq!(named("/./"), dir.join("dra.sock"));
    }
}
