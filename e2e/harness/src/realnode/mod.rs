//! A real node for a running [`ControlPlane`]: containerd 2 with runc and CDI, and the upstream
//! kubelet of the same multi-call binary as the control plane.
//!
//! Everything lives in the node's directory, `$TMPDIR/tessera-node-<name>/` (linked from
//! `<state>/nodes/<name>`; short, because the kubelet's and containerd's unix sockets live in it
//! and a socket path may not exceed 104 bytes): containerd's root, state and socket, the
//! kubelet's root directory, pod logs, the CNI configuration and the CDI spec directory. Logs
//! are in the control plane's `<state>/logs/`.
//! What cannot live there is taken back by [`RealNode::stop`] (and on drop): the kubelet's
//! cgroup root, container processes and containerd shims (in process groups of their own),
//! and the mounts containerd and the kubelet made under the node's directory.
//!
//! Network: every connection stays on loopback or inside the node's own network namespace.
//! The kubelet refuses a loopback node IP only when it has to look one up; a node named after
//! its own loopback address (`127.x.y.z`, the kubelet's `--hostname-override`) reports that
//! address as its `InternalIP` and `Hostname`, the kubelet serves on it, and the apiserver
//! dials nodes by `Hostname` only. containerd and the kubelet share a network namespace of
//! their own, so the pods' bridge exists only in there; [`netns`] joins it to the control
//! plane's loopback.

mod config;
mod host;
mod netns;
pub mod tessera;

use std::ffi::OsString;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use crate::binaries::{Binaries, cache_root};
use crate::certs::{Identity, KUBERNETES_SERVICE_IP};
use crate::controlplane::ControlPlane;
use crate::error::{Error, Result};
use crate::kubeconfig;
use crate::ports::free_ports;
use crate::process::{Process, ProcessSpec, log_tail, stop_all};
use crate::readiness::wait_for;
use crate::state::{ComponentRecord, RealNodeRecord};

pub use host::{OffLoopback, sockets_off_loopback};
pub use netns::{ForwardSpec, Forwards, start_forwards};

/// What `tessera-cluster node-forwards` logs once every listener is bound.
pub const FORWARDS_READY: &str = "node forwards ready";

/// The sandbox ("pause") image containerd is pinned to, and the image workloads run; both made
/// by `e2e/scripts/make-node-images.sh` and imported before the kubelet starts.
pub const SANDBOX_IMAGE: &str = "localhost/tessera-pause:1";
pub const BUSYBOX_IMAGE: &str = "localhost/tessera-busybox:1";

const CONTAINERD: usize = 0;
const KUBELET: usize = 1;

/// The programs a real node runs, and the host's pieces it uses.
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    pub kubelet: PathBuf,
    pub containerd_dir: PathBuf,
    pub runc: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub images_script: PathBuf,
}

impl NodeBinaries {
    /// The kubelet beside the control plane's binaries, containerd from
    /// `e2e/scripts/build-containerd.sh`, runc and the CNI plugins from Debian's packages.
    /// The error says which is missing and what builds or installs it.
    pub fn locate(control_plane: &Binaries) -> Result<NodeBinaries> {
        let missing = |what: &str, hint: &str| Error::MissingNodePrerequisite {
            what: what.to_owned(),
            hint: hint.to_owned(),
        };
        let kubelet = control_plane.path("kubelet");
        if !kubelet.is_file() {
            return Err(missing(
                &format!("the kubelet ({})", kubelet.display()),
                &format!(
                    "rebuild with e2e/scripts/build-k8s.sh e2e/k8s/{}",
                    control_plane.version.dir_name()
                ),
            ));
        }
        let containerd_dir = std::env::var_os("TESSERA_CONTAINERD_BIN_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_root().join("containerd/bin"));
        for name in ["containerd", "ctr", "containerd-shim-runc-v2"] {
            if !containerd_dir.join(name).is_file() {
                return Err(missing(
                    &format!("{} in {}", name, containerd_dir.display()),
                    "build it with e2e/scripts/build-containerd.sh",
                ));
            }
        }
        let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| missing("runc", "install it with scripts/install-node-packages.sh"))?;
        let cni_bin_dir = PathBuf::from("/usr/lib/cni");
        for plugin in ["bridge", "host-local", "loopback"] {
            if !cni_bin_dir.join(plugin).is_file() {
                return Err(missing(
                    &format!("the CNI plugin {}", cni_bin_dir.join(plugin).display()),
                    "install containernetworking-plugins with scripts/install-node-packages.sh",
                ));
            }
        }
        if !Path::new("/bin/busybox").is_file() {
            return Err(missing(
                "/bin/busybox (the images' only program)",
                "install busybox-static with scripts/install-node-packages.sh",
            ));
        }
        let images_script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-node-images.sh");
        if !nix::unistd::geteuid().is_root() {
            return Err(missing(
                "root (containerd, runc and the kubelet need it)",
                "run the tests as root",
            ));
        }
        Ok(NodeBinaries {
            kubelet,
            containerd_dir,
            runc,
            cni_bin_dir,
            images_script,
        })
    }
}

/// How to start a real node.
#[derive(Debug, Clone)]
pub struct RealNodeOptions {
    pub binaries: NodeBinaries,
    /// Extra CDI spec directories for containerd, beside the node's own `<node>/cdi`.
    pub extra_cdi_dirs: Vec<PathBuf>,
    /// Until the Node is Ready.
    pub start_timeout: Duration,
    /// The kubelet's `--v`.
    pub kubelet_verbosity: u8,
    /// Leave the node's directory in place at stop (it is removed otherwise).
    pub keep_dir: bool,
    /// Runs the forwards between the host and the node's network namespace in a process of
    /// their own, this program's `node-forwards` command (`tessera-cluster`), so the node can
    /// outlive this process ([`RealNode::detach`]). `None`: in this process.
    pub forwarder: Option<PathBuf>,
    /// Set in containerd's environment, which the OCI hooks it runs inherit (the fake driver's
    /// node and state for a driver-wall hook).
    pub containerd_env: Vec<(OsString, OsString)>,
}

impl RealNodeOptions {
    pub fn new(binaries: NodeBinaries) -> RealNodeOptions {
        RealNodeOptions {
            binaries,
            extra_cdi_dirs: Vec::new(),
            // Ready in ~2 s on an idle 2-core machine; a loaded one is many times slower.
            start_timeout: Duration::from_secs(120),
            kubelet_verbosity: 2,
            keep_dir: false,
            forwarder: None,
            containerd_env: Vec::new(),
        }
    }
}

/// A running real node. Stops (and cleans up) when dropped.
pub struct RealNode {
    name: String,
    address: Ipv4Addr,
    root: PathBuf,
    kubelet_root: PathBuf,
    cdi_dir: PathBuf,
    containerd_socket: PathBuf,
    ctr: PathBuf,
    kubelet_port: u16,
    cgroup: Option<host::CgroupRoot>,
    processes: Vec<Process>,
    /// How the kubelet was started, to start it again.
    kubelet_spec: Option<ProcessSpec>,
    /// containerd's command line after the network setup, and the directory its shim is found
    /// in (on PATH): to start it again in the same network namespace ([`RealNode::reboot`]).
    containerd_command: Vec<OsString>,
    containerd_env: Vec<(OsString, OsString)>,
    containerd_dir: PathBuf,
    /// Dropped after the processes: the kubelet's connections go through them.
    forwards: Vec<netns::Forward>,
    netns: Option<netns::Netns>,
    /// The forwards' process, when they run in one.
    forwarder: Option<Process>,
    /// What `nsenter --net=` enters.
    netns_path: Option<PathBuf>,
    ready_in: Duration,
    keep_dir: bool,
    stopped: bool,
}

impl RealNode {
    /// Starts containerd and the kubelet for `control_plane` and waits until the Node is
    /// Ready. On failure everything started so far is stopped and the error names the
    /// component and its log.
    pub async fn start(control_plane: &ControlPlane, options: RealNodeOptions) -> Result<RealNode> {
        let began = Instant::now();
        let deadline = began + options.start_timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let (address, root) = pick_loopback_address()?;
        let name = address.to_string();
        let state = control_plane.state();
        std::fs::create_dir(&root).map_err(Error::io(&root, "creating the node's directory"))?;
        // Mount points are compared with it as the kernel spells them.
        let root = std::fs::canonicalize(&root).map_err(Error::io(&root, "resolving"))?;
        let link = state.root().join("nodes").join(&name);
        let linked = link
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::os::unix::fs::symlink(&root, &link));
        if let Err(e) = linked {
            let _ = std::fs::remove_dir(&root);
            return Err(Error::io(&link, "linking the node's directory")(e));
        }
        let kubelet_root = root.join("kubelet");
        let cdi_dir = root.join("cdi");
        let containerd_socket = root.join("containerd/containerd.sock");
        let mut node = RealNode {
            name: name.clone(),
            address,
            root: root.clone(),
            kubelet_root: kubelet_root.clone(),
            cdi_dir: cdi_dir.clone(),
            containerd_socket: containerd_socket.clone(),
            ctr: options.binaries.containerd_dir.join("ctr"),
            kubelet_port: 0,
            cgroup: None,
            processes: Vec::with_capacity(2),
            kubelet_spec: None,
            containerd_command: Vec::new(),
            containerd_env: options.containerd_env.clone(),
            containerd_dir: options.binaries.containerd_dir.clone(),
            forwards: Vec::new(),
            netns: None,
            forwarder: None,
            netns_path: None,
            ready_in: Duration::ZERO,
            keep_dir: options.keep_dir,
            stopped: false,
        };
        for dir in [
            root.join("containerd"),
            root.join("cni/net.d"),
            root.join("cni/ipam"),
            root.join("images"),
            root.join("pod-logs"),
            config::runc_root(&root),
            root.join("volume-plugins"),
            kubelet_root.join("pki"),
            cdi_dir.clone(),
        ] {
            std::fs::create_dir_all(&dir).map_err(Error::io(&dir, "creating"))?;
        }

        // Shared, so that host paths mounted into pods with HostToContainer propagation (the
        // chart's driver root) are allowed; the host's own mounts may well be private.
        host::make_shared_mount(&root)?;

        let pki = control_plane.pki();
        let user = format!("system:node:{name}");
        let file = format!("node-{name}");
        let client = pki.issue_client(Identity {
            file: &file,
            user: &user,
            groups: &["system:nodes"],
        })?;
        let serving = pki.issue_server(&format!("kubelet-{name}"), &[], &[IpAddr::V4(address)])?;
        let node_kubeconfig = root.join("kubelet.kubeconfig");
        kubeconfig::write(
            &node_kubeconfig,
            control_plane.server(),
            &pki.ca_cert,
            &client,
        )?;

        // Unique per node and process: two suites may run real nodes at once.
        let cgroup = host::CgroupRoot::create(&format!(
            "tessera-e2e-{}-{}",
            std::process::id(),
            name.replace('.', "-")
        ))?;
        let cgroup_root = cgroup.name.clone();
        node.cgroup = Some(cgroup);

        let [kubelet_port, healthz_port] = match free_ports(2)?.as_slice() {
            &[a, b] => [a, b],
            other => unreachable!("free_ports(2) returned {} ports", other.len()),
        };
        node.kubelet_port = kubelet_port;
        let mut cdi_dirs = vec![cdi_dir.clone()];
        cdi_dirs.extend(options.extra_cdi_dirs.iter().cloned());
        let gates: Vec<(String, bool)> = control_plane
            .version()
            .feature_gates()
            .into_iter()
            .map(|(n, on)| (n.to_owned(), on))
            .collect();
        let files = config::NodeConfig {
            root: &root,
            containerd_socket: &containerd_socket,
            runc: &options.binaries.runc,
            cni_bin_dir: &options.binaries.cni_bin_dir,
            cdi_dirs: &cdi_dirs,
            sandbox_image: SANDBOX_IMAGE,
            address,
            kubelet_port,
            healthz_port,
            cgroup_root: &cgroup_root,
            ca_cert: &pki.ca_cert,
            serving_cert: &serving.cert,
            serving_key: &serving.key,
            feature_gates: &gates,
        };
        let containerd_config = root.join("containerd.toml");
        let kubelet_config = root.join("kubelet.yaml");
        for (path, text) in [
            (&containerd_config, config::containerd(&files)),
            (
                &root.join("cni/net.d/10-tessera-e2e.conflist"),
                config::cni(&files),
            ),
            (&kubelet_config, config::kubelet(&files)),
        ] {
            std::fs::write(path, text).map_err(Error::io(path, "writing"))?;
        }

        let images = root.join("images");
        run_tool(
            "make-node-images.sh",
            Command::new(&options.binaries.images_script).arg(&images),
        )?;

        tracing::info!(node = %name, root = %root.display(), "starting a real node");
        let containerd_bin = options.binaries.containerd_dir.join("containerd");
        // A network namespace of its own, loopback up (the CRI streaming server and the
        // kubelet listen there) with the `kubernetes` Service's address on it; the shim is
        // found on PATH.
        let mut containerd_args: Vec<OsString> = vec![
            "--net".into(),
            "--".into(),
            "/bin/sh".into(),
            "-c".into(),
            r#"ip link set lo up && ip addr add "$1/32" dev lo && export PATH="$0:$PATH" && shift && exec "$@""#.into(),
            options.binaries.containerd_dir.clone().into(),
            KUBERNETES_SERVICE_IP.to_string().into(),
        ];
        node.containerd_command = vec![
            containerd_bin.into(),
            // Through `<state>/nodes/<name>`: the command line then names the state directory,
            // which is how `tessera-cluster down` knows the process is its own.
            "--config".into(),
            link.join("containerd.toml").into(),
        ];
        containerd_args.extend(node.containerd_command.iter().cloned());
        node.processes.push(Process::spawn(ProcessSpec {
            name: format!("containerd@{name}"),
            program: PathBuf::from("unshare"),
            args: containerd_args,
            log: state.log(&format!("containerd-{name}")),
            pid_file: state.pid_file(&format!("containerd-{name}")),
            env: node.containerd_env.clone(),
        })?);
        let socket = containerd_socket.clone();
        wait_for(
            "containerd's socket",
            left(),
            &mut node.processes,
            CONTAINERD,
            || {
                let socket = socket.clone();
                async move { Ok(tokio::net::UnixStream::connect(&socket).await.is_ok()) }
            },
        )
        .await?;
        node.connect_netns(control_plane, options.forwarder.as_deref(), left())
            .await?;
        node.import_images(&[&images.join("pause.tar"), &images.join("busybox.tar")])?;

        // In containerd's network namespace, entered through this process's handle on it.
        let mut kubelet_args: Vec<OsString> = vec![
            node.nsenter_net_arg()?,
            "--".into(),
            options.binaries.kubelet.clone().into(),
        ];
        kubelet_args.extend([
            arg("config", link.join("kubelet.yaml")),
            arg("kubeconfig", &node_kubeconfig),
            arg("root-dir", &kubelet_root),
            arg("cert-dir", kubelet_root.join("pki")),
            arg("hostname-override", &name),
            // Otherwise /usr/libexec/kubernetes/... on the host.
            arg("volume-plugin-dir", root.join("volume-plugins")),
            arg("v", options.kubelet_verbosity.to_string()),
        ]);
        let kubelet_spec = ProcessSpec {
            name: format!("kubelet@{name}"),
            program: PathBuf::from("nsenter"),
            args: kubelet_args,
            log: state.log(&format!("kubelet-{name}")),
            pid_file: state.pid_file(&format!("kubelet-{name}")),
            env: Vec::new(),
        };
        node.processes.push(Process::spawn(kubelet_spec.clone())?);
        node.kubelet_spec = Some(kubelet_spec);
        let kubelet_started = Instant::now();
        let nodes: Api<Node> = Api::all(control_plane.client());
        let took = wait_for(
            &format!("Node {name} Ready"),
            left(),
            &mut node.processes,
            KUBELET,
            || {
                let nodes = nodes.clone();
                let name = name.clone();
                async move {
                    let node = nodes.get_opt(&name).await.map_err(|e| e.to_string())?;
                    Ok(node.as_ref().is_some_and(node_ready))
                }
            },
        )
        .await?;
        node.ready_in = took;
        tracing::info!(
            node = %name,
            ready_after_kubelet_start_ms = kubelet_started.elapsed().as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            "real node is Ready"
        );
        Ok(node)
    }

    /// Forwards between the host's loopback and containerd's network namespace, which the
    /// kubelet joins (see [`netns`]): in this process, or in `forwarder`'s.
    async fn connect_netns(
        &mut self,
        control_plane: &ControlPlane,
        forwarder: Option<&Path>,
        timeout: Duration,
    ) -> Result<()> {
        let containerd = self.processes[CONTAINERD].pid();
        let apiserver = apiserver_address(control_plane.server())?;
        let kubelet = std::net::SocketAddr::from((self.address, self.kubelet_port));
        let specs = [
            ForwardSpec::IntoHost {
                listen: apiserver,
                to: apiserver,
            },
            ForwardSpec::IntoHost {
                listen: std::net::SocketAddr::from((KUBERNETES_SERVICE_IP, 443)),
                to: apiserver,
            },
            ForwardSpec::IntoNetns {
                listen: kubelet,
                to: kubelet,
            },
        ];
        let Some(program) = forwarder else {
            let netns = netns::Netns::of_process(containerd)?;
            self.forwards = specs
                .iter()
                .map(|spec| spec.start(&netns))
                .collect::<Result<Vec<_>>>()?;
            for f in &self.forwards {
                tracing::debug!(node = %self.name, forward = %f.description, "forwarding");
            }
            // Held open by this process, so it outlives containerd.
            self.netns_path = Some(netns.fd_path());
            self.netns = Some(netns);
            return Ok(());
        };
        let netns_path = PathBuf::from(format!("/proc/{containerd}/ns/net"));
        let state = control_plane.state();
        let mut args: Vec<OsString> = vec![
            "node-forwards".into(),
            "--netns".into(),
            netns_path.clone().into(),
            // `tessera-cluster down` stops only processes that name their state directory.
            "--owner".into(),
            state.root().into(),
        ];
        for spec in specs {
            args.extend(spec.to_args().map(OsString::from));
        }
        let name = format!("node-forwards@{}", self.name);
        let mut process = Process::spawn(ProcessSpec {
            name: name.clone(),
            program: program.to_owned(),
            args,
            log: state.log(&format!("node-forwards-{}", self.name)),
            pid_file: state.pid_file(&format!("node-forwards-{}", self.name)),
            env: Vec::new(),
        })?;
        let log = process.log().to_owned();
        let ready = wait_for(
            "the node's forwards",
            timeout,
            std::slice::from_mut(&mut process),
            0,
            || {
                let log = log.clone();
                async move {
                    Ok(std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .contains(FORWARDS_READY))
                }
            },
        )
        .await;
        self.forwarder = Some(process);
        ready?;
        self.netns_path = Some(netns_path);
        Ok(())
    }

    /// `--net=<the node's netns>` for nsenter.
    fn nsenter_net_arg(&self) -> Result<OsString> {
        let path = self.netns_path.as_ref().ok_or_else(|| Error::State {
            dir: self.root.clone(),
            reason: "the node's network namespace is not open yet".into(),
        })?;
        Ok(arg("net", path))
    }

    /// Leaves the node running (for `tessera-cluster up`). Returns its processes as
    /// components, in the order `tessera-cluster down` stops them backwards (the kubelet, the
    /// forwards, containerd), and what else `down` cleans up ([`clean_up`]). Only a node whose
    /// forwards run in a process of their own ([`RealNodeOptions::forwarder`]) can be left.
    pub fn detach(mut self) -> Result<(Vec<ComponentRecord>, RealNodeRecord)> {
        let Some(forwarder) = self.forwarder.take() else {
            return Err(Error::State {
                dir: self.root.clone(),
                reason: "the node's forwards run in this process, which is about to end; start it with RealNodeOptions::forwarder".into(),
            });
        };
        self.stopped = true;
        let kubelet_health = format!("https://{}:{}/healthz", self.address, self.kubelet_port);
        let containerd_health = format!("unix://{}", self.containerd_socket.display());
        let mut processes = std::mem::take(&mut self.processes).into_iter();
        let (Some(containerd), Some(kubelet)) = (processes.next(), processes.next()) else {
            return Err(Error::State {
                dir: self.root.clone(),
                reason: "the node is not running".into(),
            });
        };
        let components = [
            (containerd, containerd_health),
            (forwarder, String::new()),
            (kubelet, kubelet_health),
        ]
        .into_iter()
        .map(|(process, health)| {
            let name = process.name().to_owned();
            let log = process.log().to_owned();
            let pid_file = process.pid_file().to_owned();
            ComponentRecord {
                name,
                pid: process.detach(),
                log,
                pid_file,
                health,
            }
        })
        .collect();
        let record = RealNodeRecord {
            name: self.name.clone(),
            root: self.root.clone(),
            cgroup: self.cgroup.take().map(host::CgroupRoot::keep),
            containerd_socket: self.containerd_socket.clone(),
        };
        Ok((components, record))
    }

    /// Stops the kubelet (SIGTERM, as systemd does) and starts it again with the same
    /// configuration; containers keep running under containerd meanwhile. Returns once the
    /// new kubelet runs; its log continues the old one after a `=== tessera-e2e-harness:
    /// starting` line (see [`RealNode::kubelet_log_since_start`]).
    pub fn restart_kubelet(&mut self) -> Result<()> {
        let spec = self.kubelet_spec.clone().ok_or_else(|| Error::State {
            dir: self.root.clone(),
            reason: "the kubelet was never started".into(),
        })?;
        self.processes[KUBELET].stop(Duration::from_secs(10));
        self.processes[KUBELET] = Process::spawn(spec)?;
        Ok(())
    }

    /// A reboot, as far as the node's own state goes: the kubelet, every container and
    /// containerd stop; what a reboot clears goes (every mount under the node's directory, so
    /// the pods' volumes, root filesystems and network namespaces; the containers' cgroups;
    /// containerd's and runc's state; the CDI spec directory, which is `/var/run/cdi` on a real
    /// node); what a disk keeps stays (containerd's images and metadata, the kubelet's root
    /// with its checkpoints and plugin sockets, the pod logs, Tessera's state directory). Then
    /// containerd and the kubelet start again, which restart the pods bound to the node. The
    /// host's boot ID cannot change: a program that reads it must be pointed at a file the
    /// test rewrites (the plugin's `--boot-id-file`). The network namespace, held by this
    /// process, is kept, so only a node whose forwards run in this process can reboot.
    pub async fn reboot(&mut self, timeout: Duration) -> Result<()> {
        if self.netns.is_none() {
            return Err(Error::State {
                dir: self.root.clone(),
                reason: "only a node whose forwards run in this process can reboot (its network namespace must outlive containerd)".into(),
            });
        }
        let spec = self.kubelet_spec.clone().ok_or_else(|| Error::State {
            dir: self.root.clone(),
            reason: "the kubelet was never started".into(),
        })?;
        let grace = Duration::from_secs(10);
        self.processes[KUBELET].stop(grace);
        self.kill_containers();
        self.processes[CONTAINERD].stop(grace);
        let stuck = host::unmount_below(&self.root);
        if !stuck.is_empty() {
            return Err(Error::State {
                dir: self.root.clone(),
                reason: format!("rebooting: cannot unmount {}", stuck.join(", ")),
            });
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.remove_below();
        }
        let volatile = [
            config::containerd_state_dir(&self.root),
            config::runc_root(&self.root),
            self.cdi_dir.clone(),
        ];
        for dir in &volatile {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(dir, "clearing, for a reboot,")(e)),
            }
            std::fs::create_dir_all(dir).map_err(Error::io(dir, "creating"))?;
        }
        host::make_shared_mount(&self.root)?;

        let containerd = &self.processes[CONTAINERD];
        let mut args: Vec<OsString> = vec![
            self.nsenter_net_arg()?,
            "--".into(),
            "/bin/sh".into(),
            "-c".into(),
            r#"export PATH="$0:$PATH" && exec "$@""#.into(),
            self.containerd_dir.clone().into(),
        ];
        args.extend(self.containerd_command.iter().cloned());
        let containerd_spec = ProcessSpec {
            name: containerd.name().to_owned(),
            program: PathBuf::from("nsenter"),
            args,
            log: containerd.log().to_owned(),
            pid_file: containerd.pid_file().to_owned(),
            env: self.containerd_env.clone(),
        };
        self.processes[CONTAINERD] = Process::spawn(containerd_spec)?;
        let socket = self.containerd_socket.clone();
        // Only containerd runs now: the kubelet has exited, as it should have.
        wait_for(
            "containerd's socket after the reboot",
            timeout,
            std::slice::from_mut(&mut self.processes[CONTAINERD]),
            0,
            || {
                let socket = socket.clone();
                async move { Ok(tokio::net::UnixStream::connect(&socket).await.is_ok()) }
            },
        )
        .await?;
        self.processes[KUBELET] = Process::spawn(spec)?;
        tracing::info!(node = %self.name, "real node rebooted");
        Ok(())
    }

    /// Makes `to`, an address inside the node's network namespace (a pod's, on the pods'
    /// bridge), reachable on the host at the node's address and the same port, for as long as
    /// the node runs; returns the host address. Only for a node whose forwards run in this
    /// process.
    pub fn forward_into_netns(&mut self, to: std::net::SocketAddr) -> Result<std::net::SocketAddr> {
        let netns = self.netns.as_ref().ok_or_else(|| Error::State {
            dir: self.root.clone(),
            reason: "the node's forwards run in another process".into(),
        })?;
        let address = std::net::SocketAddr::from((self.address, to.port()));
        let forward = ForwardSpec::IntoNetns {
            listen: address,
            to,
        }
        .start(netns)?;
        self.forwards.push(forward);
        Ok(address)
    }

    /// Kills the containers and the containerd shims, which live outside containerd's process
    /// group, until none is left (bounded).
    fn kill_containers(&self) {
        let socket = self.containerd_socket.to_string_lossy().into_owned();
        for _ in 0..50 {
            let mut pids = self.cgroup.as_ref().map(|c| c.pids()).unwrap_or_default();
            pids.extend(host::pids_with_cmdline(&socket));
            if pids.is_empty() {
                break;
            }
            host::kill_all(&pids);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The kubelet's log since its last start.
    pub fn kubelet_log_since_start(&self) -> String {
        let text = std::fs::read_to_string(self.kubelet_log()).unwrap_or_default();
        match text.rfind("=== tessera-e2e-harness: starting") {
            Some(at) => text[at..].to_owned(),
            None => text,
        }
    }

    /// The Node's name, which is also its loopback address.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The node's directory, `$TMPDIR/tessera-node-<name>` (`<state>/nodes/<name>` links to it).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The kubelet's `--root-dir`: its plugin registry is `plugins_registry/` below it.
    pub fn kubelet_root(&self) -> &Path {
        &self.kubelet_root
    }

    /// Where the kubelet's plugin watcher looks for registration sockets.
    pub fn plugins_registry(&self) -> PathBuf {
        self.kubelet_root.join("plugins_registry")
    }

    /// A CDI spec directory containerd reads.
    pub fn cdi_dir(&self) -> &Path {
        &self.cdi_dir
    }

    pub fn containerd_socket(&self) -> &Path {
        &self.containerd_socket
    }

    /// Imports docker-archive tarballs into containerd's `k8s.io` namespace, where the
    /// kubelet's images are.
    pub fn import_images(&self, tarballs: &[&Path]) -> Result<()> {
        for tarball in tarballs {
            run_tool(
                &format!("ctr images import {}", tarball.display()),
                Command::new(&self.ctr)
                    .arg("--address")
                    .arg(&self.containerd_socket)
                    .args(["--namespace", "k8s.io", "images", "import"])
                    .arg(tarball),
            )?;
        }
        Ok(())
    }

    pub fn kubelet_port(&self) -> u16 {
        self.kubelet_port
    }

    /// From the kubelet's start until the Node was Ready.
    pub fn ready_in(&self) -> Duration {
        self.ready_in
    }

    pub fn kubelet_log(&self) -> &Path {
        self.processes[KUBELET].log()
    }

    pub fn containerd_log(&self) -> &Path {
        self.processes[CONTAINERD].log()
    }

    /// Finds the node's host processes at any moment: the kubelet and containerd, the
    /// containerd shims and the containers. Can be moved to a watching thread.
    pub fn pid_finder(&self) -> PidFinder {
        PidFinder {
            fixed: self.processes.iter().map(Process::pid).collect(),
            shim_marker: self.containerd_socket.to_string_lossy().into_owned(),
            cgroups: self
                .cgroup
                .as_ref()
                .map(host::CgroupRoot::dirs)
                .unwrap_or_default(),
        }
    }

    /// An error with the log tail of containerd or the kubelet if either has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.processes
            .iter_mut()
            .try_for_each(Process::check_running)
    }

    /// The last `lines` lines of the kubelet's log, for assertion messages.
    pub fn kubelet_log_tail(&self, lines: usize) -> String {
        log_tail(self.kubelet_log(), lines)
    }

    /// Stops the kubelet, the containers, the shims and containerd, unmounts what they
    /// mounted under the node's directory and removes the cgroup root. Returns what could not
    /// be cleaned up (empty when all went well).
    pub fn stop(mut self) -> Vec<String> {
        self.stop_everything()
    }

    fn stop_everything(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.stopped {
            return problems;
        }
        self.stopped = true;
        let began = Instant::now();
        let grace = Duration::from_secs(10);
        // The kubelet first, so it restarts nothing; then the containers and the shims, which
        // live outside containerd's process group; containerd last.
        if self.processes.len() > KUBELET {
            stop_all(&mut self.processes[KUBELET..], grace);
        }
        self.kill_containers();
        stop_all(&mut self.processes, grace);
        self.processes.clear();
        if let Some(mut forwarder) = self.forwarder.take() {
            forwarder.stop(grace);
        }
        self.forwards.clear();
        self.netns = None;
        for failed in host::unmount_below(&self.root) {
            problems.push(format!("cannot unmount {failed}"));
        }
        if let Some(mut cgroup) = self.cgroup.take() {
            cgroup.remove();
        }
        host::remove_log_links_into(&self.root);
        // Only with nothing mounted below: removing through a mount would delete what it shows.
        if !self.keep_dir
            && problems.is_empty()
            && host::unmount_below(&self.root).is_empty()
            && let Err(e) = std::fs::remove_dir_all(&self.root)
        {
            problems.push(format!("cannot remove {}: {e}", self.root.display()));
        }
        tracing::info!(node = %self.name, ms = began.elapsed().as_millis() as u64, "real node stopped");
        for p in &problems {
            tracing::warn!(node = %self.name, "{p}");
        }
        problems
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop_everything();
    }
}

/// Stops what a node left by [`RealNode::detach`] still has once its processes are stopped:
/// containers and containerd shims, the mounts under its directory, its cgroup root, its
/// directory. Returns what could not be cleaned up.
pub fn clean_up(record: &RealNodeRecord) -> Vec<String> {
    let mut cgroup = record.cgroup.as_deref().map(host::CgroupRoot::existing);
    let socket = record.containerd_socket.to_string_lossy().into_owned();
    for _ in 0..50 {
        let mut pids = cgroup.as_ref().map(|c| c.pids()).unwrap_or_default();
        pids.extend(host::pids_with_cmdline(&socket));
        if pids.is_empty() {
            break;
        }
        host::kill_all(&pids);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut problems: Vec<String> = host::unmount_below(&record.root)
        .into_iter()
        .map(|failed| format!("cannot unmount {failed}"))
        .collect();
    if let Some(cgroup) = cgroup.as_mut() {
        cgroup.remove();
    }
    host::remove_log_links_into(&record.root);
    if problems.is_empty()
        && record.root.exists()
        && let Err(e) = std::fs::remove_dir_all(&record.root)
    {
        problems.push(format!("cannot remove {}: {e}", record.root.display()));
    }
    problems
}

/// See [`RealNode::pid_finder`].
#[derive(Debug, Clone)]
pub struct PidFinder {
    fixed: Vec<i32>,
    shim_marker: String,
    cgroups: Vec<PathBuf>,
}

impl PidFinder {
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = self.fixed.clone();
        pids.extend(host::pids_with_cmdline(&self.shim_marker));
        pids.extend(host::pids_in_cgroups(&self.cgroups));
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A random address in 127.0.0.0/8 that can be bound, and a node directory for it that does not
/// exist yet.
fn pick_loopback_address() -> Result<(Ipv4Addr, PathBuf)> {
    for attempt in 0u64..100 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(attempt);
        let h = hasher.finish().to_le_bytes();
        // 127.1.0.1 – 127.254.255.254: clear of 127.0.0.x, which other tools like to use.
        let address = Ipv4Addr::new(127, h[0].clamp(1, 254), h[1], h[2].clamp(1, 254));
        let root = std::env::temp_dir().join(format!("tessera-node-{address}"));
        if !root.exists() && TcpListener::bind((address, 0)).is_ok() {
            return Ok((address, root));
        }
    }
    Err(Error::io(
        "127.0.0.0/8",
        "choosing a loopback address for a node",
    )(std::io::Error::other(
        "no address in 127.0.0.0/8 can be bound",
    )))
}

/// `127.0.0.1:6443` of `https://127.0.0.1:6443`.
fn apiserver_address(server: &str) -> Result<std::net::SocketAddr> {
    server
        .strip_prefix("https://")
        .map(|s| s.trim_end_matches('/'))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::State {
            dir: PathBuf::from(server),
            reason: "the apiserver's URL is not https://<ip>:<port>".into(),
        })
}

fn arg(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut s = OsString::from(format!("--{name}="));
    s.push(value.as_ref());
    s
}

/// Runs a short helper to completion; its output goes into the error if it fails.
fn run_tool(what: &str, command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .map_err(Error::io(command.get_program(), "starting"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::State {
        dir: PathBuf::from(command.get_program()),
        reason: format!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}
