//! TCP between the host's loopback and the node's network namespace.
//!
//! The kubelet and containerd share a network namespace of their own, so the kubelet reaches
//! the pods' bridge (probes, port-forward) and containerd's streaming server (exec, attach)
//! exactly as on a real node, while nothing of the node is reachable from outside it. Three
//! forwards join it to the control plane, which stays on the host's loopback:
//! - the kubelet's apiserver URL (`127.0.0.1:<port>`) inside the namespace, to the apiserver;
//! - the `kubernetes` Service's ClusterIP (`10.0.0.1:443`) inside the namespace, to the
//!   apiserver, which is what in-cluster clients (the chart's pods) dial; there is no
//!   kube-proxy, and the address is a local one of the namespace;
//! - the node's address and kubelet port on the host, to the kubelet inside, which is what
//!   the apiserver dials for logs, exec and port-forward.
//!
//! A socket belongs to the network namespace of the thread that created it, whichever thread
//! uses it later: listeners and outgoing connections for the namespace are made on a short
//! thread that first enters it, and served by tokio like any other.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sched::{CloneFlags, setns};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// The node's network namespace, held open for as long as this lives.
#[derive(Debug, Clone)]
pub(crate) struct Netns {
    file: Arc<File>,
}

impl Netns {
    /// The network namespace process `pid` is in.
    pub(crate) fn of_process(pid: i32) -> Result<Netns> {
        Netns::open(Path::new(&format!("/proc/{pid}/ns/net")))
    }

    /// A network namespace by path (`/proc/<pid>/ns/net`, a bind mount of one).
    pub(crate) fn open(path: &Path) -> Result<Netns> {
        let file = File::open(path).map_err(Error::io(path, "opening the node's netns"))?;
        Ok(Netns {
            file: Arc::new(file),
        })
    }

    /// A path to the namespace that lives as long as this does (the process it was taken
    /// from may exit): this process's descriptor, for `nsenter --net=`.
    pub(crate) fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }

    /// Runs `f` on a new thread inside the namespace; what it makes stays in there.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let file = self.file.clone();
        std::thread::spawn(move || {
            setns(&*file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            f()
        })
        .join()
        .map_err(|_| std::io::Error::other("the thread entering the node's netns panicked"))?
    }

    fn listen(&self, address: SocketAddr) -> std::io::Result<TcpListener> {
        let listener = self.run(move || {
            let l = std::net::TcpListener::bind(address)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        TcpListener::from_std(listener)
    }

    async fn connect(&self, address: SocketAddr) -> std::io::Result<TcpStream> {
        let netns = self.clone();
        // Loopback and the node's bridge answer at once: blocking here is brief.
        let stream = tokio::task::spawn_blocking(move || {
            netns.run(move || {
                let s = std::net::TcpStream::connect(address)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
        })
        .await
        .map_err(std::io::Error::other)??;
        TcpStream::from_std(stream)
    }
}

/// Where a forward's connections end.
#[derive(Debug, Clone)]
enum Target {
    Host(SocketAddr),
    Inside(Netns, SocketAddr),
}

/// A running forward; stops (closing its listener and connections) when dropped.
#[derive(Debug)]
pub(crate) struct Forward {
    task: JoinHandle<()>,
    pub(crate) description: String,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `listen` inside `netns` and connects each connection to `to` on the host.
pub(crate) fn into_host(netns: &Netns, listen: SocketAddr, to: SocketAddr) -> Result<Forward> {
    let listener = netns.listen(listen).map_err(Error::io(
        listen.to_string(),
        "listening inside the node's netns",
    ))?;
    Ok(spawn(
        listener,
        Target::Host(to),
        format!("{listen} in the node's netns -> {to}"),
    ))
}

/// Listens on `listen` on the host and connects each connection to `to` inside `netns`.
pub(crate) fn into_netns(netns: &Netns, listen: SocketAddr, to: SocketAddr) -> Result<Forward> {
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(TcpListener::from_std)
        .map_err(Error::io(listen.to_string(), "listening on the host"))?;
    Ok(spawn(
        listener,
        Target::Inside(netns.clone(), to),
        format!("{listen} -> {to} in the node's netns"),
    ))
}

fn spawn(listener: TcpListener, target: Target, description: String) -> Forward {
    let what = description.clone();
    let task = tokio::spawn(async move {
        // Owned here, so aborting the forward ends its connections too.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let (mut inbound, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(forward = %what, error = %e, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let target = target.clone();
            let what = what.clone();
            connections.spawn(async move {
                let outbound = match &target {
                    Target::Host(to) => TcpStream::connect(to).await,
                    Target::Inside(netns, to) => netns.connect(*to).await,
                };
                let mut outbound = match outbound {
                    Ok(s) => s,
                    Err(e) => {
                        // The client sees its connection closed, as if nothing listened.
                        tracing::debug!(forward = %what, error = %e, "connecting onwards");
                        return;
                    }
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    Forward { task, description }
}

/// The forwards of one node as arguments of `tessera-cluster node-forwards`: which way each
/// goes, where it listens and where it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardSpec {
    /// Listens inside the node's namespace, connects on the host.
    IntoHost { listen: SocketAddr, to: SocketAddr },
    /// Listens on the host, connects inside the node's namespace.
    IntoNetns { listen: SocketAddr, to: SocketAddr },
}

impl ForwardSpec {
    /// `--into-host L=T` or `--into-netns L=T`.
    pub fn to_args(self) -> [String; 2] {
        match self {
            ForwardSpec::IntoHost { listen, to } => {
                ["--into-host".into(), format!("{listen}={to}")]
            }
            ForwardSpec::IntoNetns { listen, to } => {
                ["--into-netns".into(), format!("{listen}={to}")]
            }
        }
    }

    /// The inverse of [`ForwardSpec::to_args`].
    pub fn from_args(flag: &str, value: &str) -> std::result::Result<ForwardSpec, String> {
        let (listen, to) = value.split_once('=').ok_or_else(|| {
            format!("{flag} {value:?}: expected <listen address>=<target address>")
        })?;
        let parse = |a: &str| {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("{flag} {value:?}: {a:?} is not an address: {e}"))
        };
        let (listen, to) = (parse(listen)?, parse(to)?);
        match flag {
            "--into-host" => Ok(ForwardSpec::IntoHost { listen, to }),
            "--into-netns" => Ok(ForwardSpec::IntoNetns { listen, to }),
            other => Err(format!("{other} is neither --into-host nor --into-netns")),
        }
    }

    pub(crate) fn start(self, netns: &Netns) -> Result<Forward> {
        match self {
            ForwardSpec::IntoHost { listen, to } => into_host(netns, listen, to),
            ForwardSpec::IntoNetns { listen, to } => into_netns(netns, listen, to),
        }
    }
}

/// Running forwards of one node; they stop when this is dropped.
#[derive(Debug)]
pub struct Forwards {
    _forwards: Vec<Forward>,
}

/// Starts `specs` for the network namespace at `netns` (in this process, on the current tokio
/// runtime): what `tessera-cluster node-forwards` runs for a node left running by `up`.
pub fn start_forwards(netns: &Path, specs: &[ForwardSpec]) -> Result<Forwards> {
    let netns = Netns::open(netns)?;
    let forwards = specs
        .iter()
        .map(|s| s.start(&netns))
        .collect::<Result<Vec<_>>>()?;
    Ok(Forwards {
        _forwards: forwards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs_round_trip_through_arguments() {
        for spec in [
            ForwardSpec::IntoHost {
                listen: "10.0.0.1:443".parse().expect("addr"),
                to: "127.0.0.1:6443".parse().expect("addr"),
            },
            ForwardSpec::IntoNetns {
                listen: "127.1.2.3:10250".parse().expect("addr"),
                to: "127.1.2.3:10250".parse().expect("addr"),
            },
        ] {
            let [flag, value] = spec.to_args();
            assert_eq!(ForwardSpec::from_args(&flag, &value), Ok(spec));
        }
        assert!(ForwardSpec::from_args("--into-host", "127.0.0.1:1").is_err());
        assert!(ForwardSpec::from_args("--into-host", "x=127.0.0.1:1").is_err());
    }
}
