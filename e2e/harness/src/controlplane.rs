//! Starting, checking and stopping etcd, kube-apiserver, kube-controller-manager
//! and kube-scheduler on 127.0.0.1.
//!
//! [`ControlPlane::start`] returns once the apiserver is ready, the DRA API of
//! the version is discoverable, the controller-manager and scheduler answer
//! their health checks and the `default` service account exists (so a pod can
//! be created right away). Dropping the [`ControlPlane`] stops everything.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::binaries::Binaries;
use crate::certs::{self, Pki};
use crate::error::{Error, Result};
use crate::kubeconfig;
use crate::ports::free_ports;
use crate::process::{Process, ProcessSpec, stop_all};
use crate::readiness::{http_get, kube_get_ok, wait_for};
use crate::state::{ClusterRecord, ComponentRecord, StateDir};
use crate::versions::K8sVersion;

/// Indexes into `ControlPlane::processes`, in start order.
const ETCD: usize = 0;
const APISERVER: usize = 1;
const CONTROLLER_MANAGER: usize = 2;
const SCHEDULER: usize = 3;

/// What to start.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    pub version: K8sVersion,
    pub state_dir: PathBuf,
    /// Found with [`Binaries::locate`] when `None`.
    pub binaries: Option<Binaries>,
    /// Appended to the version's gates (later entries win in Kubernetes).
    pub extra_feature_gates: Vec<(String, bool)>,
    /// Appended to the version's `--runtime-config`.
    pub extra_runtime_config: Vec<String>,
    /// For the whole start-up; each wait gets what is left of it.
    pub start_timeout: Duration,
}

impl ControlPlaneOptions {
    pub fn new(version: K8sVersion, state_dir: impl Into<PathBuf>) -> Self {
        ControlPlaneOptions {
            version,
            state_dir: state_dir.into(),
            binaries: None,
            extra_feature_gates: Vec::new(),
            extra_runtime_config: Vec::new(),
            // Ample for a loaded 2-core machine, where a cold start takes ~15 s.
            start_timeout: Duration::from_secs(180),
        }
    }

    fn feature_gates(&self) -> String {
        self.version
            .feature_gates()
            .into_iter()
            .map(|(name, on)| (name.to_owned(), on))
            .chain(self.extra_feature_gates.iter().cloned())
            .map(|(name, on)| format!("{name}={on}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn runtime_config(&self) -> String {
        self.version
            .runtime_config()
            .into_iter()
            .chain(self.extra_runtime_config.iter().cloned())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Loopback ports, chosen at start.
#[derive(Debug, Clone, Copy)]
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
}

/// A running control plane. Stops when dropped.
pub struct ControlPlane {
    version: K8sVersion,
    binaries: Binaries,
    state: StateDir,
    pki: Pki,
    processes: Vec<Process>,
    record: ClusterRecord,
    config: kube::Config,
    client: kube::Client,
    started_in: Duration,
}

impl ControlPlane {
    /// Starts all four components and waits until the cluster is usable.
    pub async fn start(options: ControlPlaneOptions) -> Result<Self> {
        let began = Instant::now();
        let deadline = began + options.start_timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let version = options.version;
        let binaries = match &options.binaries {
            Some(b) => b.clone(),
            None => Binaries::locate(version)?,
        };
        let state = StateDir::create(&options.state_dir)?;
        let pki = Pki::generate(&state.pki())?;
        let ports = match free_ports(5)?.as_slice() {
            &[
                etcd_client,
                etcd_peer,
                apiserver,
                controller_manager,
                scheduler,
            ] => Ports {
                etcd_client,
                etcd_peer,
                apiserver,
                controller_manager,
                scheduler,
            },
            other => unreachable!("free_ports(5) returned {} ports", other.len()),
        };
        let server = format!("https://127.0.0.1:{}", ports.apiserver);
        kubeconfig::write(&state.kubeconfig(), &server, &pki.ca_cert, &pki.admin)?;
        kubeconfig::write(
            &state.component_kubeconfig("kube-scheduler"),
            &server,
            &pki.ca_cert,
            &pki.scheduler,
        )?;
        kubeconfig::write(
            &state.component_kubeconfig("kube-controller-manager"),
            &server,
            &pki.ca_cert,
            &pki.controller_manager,
        )?;
        tracing::info!(%version, binaries = %binaries.dir.display(), state = %state.root().display(), "starting control plane");

        // A local Vec: if any step fails, returning drops it and stops what started.
        let mut processes: Vec<Process> = Vec::with_capacity(4);
        let spawn = |name: &str, args: Vec<OsString>| {
            Process::spawn(ProcessSpec {
                name: name.to_owned(),
                program: binaries.path(name),
                args,
                log: state.log(name),
                pid_file: state.pid_file(name),
                env: Vec::new(),
            })
        };

        processes.push(spawn("etcd", etcd_args(&state, ports))?);
        let took = wait_for("etcd /health", left(), &mut processes, ETCD, || async {
            let (status, body) = http_get(ports.etcd_client, "/health").await?;
            Ok(status == 200 && body.contains("\"health\":\"true\""))
        })
        .await?;
        tracing::info!(ms = took.as_millis() as u64, "etcd is healthy");

        processes.push(spawn(
            "kube-apiserver",
            apiserver_args(&options, &state, &pki, ports),
        )?);
        let config = client_config(&state.kubeconfig()).await?;
        let client = kube::Client::try_from(config.clone())
            .map_err(Error::kube("building the admin client"))?;
        let took = wait_for(
            "kube-apiserver /readyz",
            left(),
            &mut processes,
            APISERVER,
            || {
                let client = client.clone();
                async move { kube_get_ok(&client, "/readyz").await }
            },
        )
        .await?;
        tracing::info!(ms = took.as_millis() as u64, "kube-apiserver is ready");

        processes.push(spawn(
            "kube-controller-manager",
            controller_manager_args(&options, &state, &pki, ports),
        )?);
        processes.push(spawn(
            "kube-scheduler",
            scheduler_args(&options, &state, &pki, ports),
        )?);
        for (index, port) in [
            (CONTROLLER_MANAGER, ports.controller_manager),
            (SCHEDULER, ports.scheduler),
        ] {
            let probe = health_client(&config, port)?;
            let what = format!("{} /healthz", processes[index].name());
            let took = wait_for(&what, left(), &mut processes, index, || {
                let probe = probe.clone();
                async move { kube_get_ok(&probe, "/healthz").await }
            })
            .await?;
            tracing::info!(
                component = processes[index].name(),
                ms = took.as_millis() as u64,
                "healthy"
            );
        }

        let group_version = version.resource_group_version();
        let what = format!("{group_version} in API discovery");
        wait_for(&what, left(), &mut processes, APISERVER, || {
            let client = client.clone();
            let gv = group_version.clone();
            async move { dra_api_served(&client, &gv).await }
        })
        .await?;

        // The controller-manager creates it; pods are rejected until it exists.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        wait_for(
            "service account default/default",
            left(),
            &mut processes,
            CONTROLLER_MANAGER,
            || {
                let accounts = accounts.clone();
                async move {
                    accounts
                        .get_opt("default")
                        .await
                        .map(|sa| sa.is_some())
                        .map_err(|e| e.to_string())
                }
            },
        )
        .await?;

        let started_in = began.elapsed();
        tracing::info!(%version, seconds = started_in.as_secs_f64(), "control plane is up");

        let health = [
            format!("http://127.0.0.1:{}/health", ports.etcd_client),
            format!("{server}/readyz"),
            format!("https://127.0.0.1:{}/healthz", ports.controller_manager),
            format!("https://127.0.0.1:{}/healthz", ports.scheduler),
        ];
        let record = ClusterRecord {
            version: version.dir_name(),
            version_string: binaries.version_string.clone(),
            server,
            kubeconfig: state.kubeconfig(),
            components: processes
                .iter()
                .zip(health)
                .map(|(p, health)| ComponentRecord {
                    name: p.name().to_owned(),
                    pid: p.pid(),
                    log: p.log().to_owned(),
                    pid_file: state.pid_file(p.name()),
                    health,
                })
                .collect(),
            real_nodes: Vec::new(),
        };
        state.write_record(&record)?;

        Ok(ControlPlane {
            version,
            binaries,
            state,
            pki,
            processes,
            record,
            config,
            client,
            started_in,
        })
    }

    /// An admin client (system:masters).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The admin client's configuration, to derive other clients from.
    pub fn config(&self) -> &kube::Config {
        &self.config
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.record.kubeconfig
    }

    pub fn server(&self) -> &str {
        &self.record.server
    }

    pub fn version(&self) -> K8sVersion {
        self.version
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// The PKI, to issue identities (nodes, plugins) for later layers.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    pub fn record(&self) -> &ClusterRecord {
        &self.record
    }

    /// Wall time from [`ControlPlane::start`] until the cluster was usable.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// An error with the log tail of the first component that has exited, if any.
    pub fn check_running(&mut self) -> Result<()> {
        self.processes
            .iter_mut()
            .try_for_each(Process::check_running)
    }

    /// Stops everything: the three clients of etcd first, so that they do not
    /// log a storm of connection errors, then etcd.
    pub fn stop(mut self) {
        self.stop_processes();
    }

    fn stop_processes(&mut self) {
        if self.processes.is_empty() {
            return;
        }
        let began = Instant::now();
        let grace = Duration::from_secs(10);
        let (etcd, clients) = self.processes.split_at_mut(APISERVER);
        stop_all(clients, grace);
        stop_all(etcd, grace);
        self.processes.clear();
        tracing::info!(version = %self.version, ms = began.elapsed().as_millis() as u64, "control plane stopped");
    }

    /// Leaves the components running (for `tessera-cluster up`) and returns
    /// the record that `tessera-cluster down` stops them from.
    pub fn detach(mut self) -> ClusterRecord {
        for p in self.processes.drain(..) {
            p.detach();
        }
        self.record.clone()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_processes();
    }
}

async fn client_config(kubeconfig: &Path) -> Result<kube::Config> {
    let parsed = Kubeconfig::read_from(kubeconfig)
        .map_err(Error::kube(format!("reading {}", kubeconfig.display())))?;
    kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
        .await
        .map_err(Error::kube(format!("loading {}", kubeconfig.display())))
}

/// A client for a component's own HTTPS port: same CA (we gave every
/// component our serving certificate), short timeouts because it is a probe.
fn health_client(admin: &kube::Config, port: u16) -> Result<kube::Client> {
    let mut config = admin.clone();
    config.cluster_url = format!("https://127.0.0.1:{port}")
        .parse()
        .map_err(Error::kube(format!("health URL for port {port}")))?;
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(Duration::from_secs(2));
    kube::Client::try_from(config).map_err(Error::kube("building a health-check client"))
}

/// Whether discovery lists `group_version` with the DRA resources in it.
async fn dra_api_served(
    client: &kube::Client,
    group_version: &str,
) -> std::result::Result<bool, String> {
    let resources = client
        .list_api_group_resources(group_version)
        .await
        .map_err(|e| e.to_string())?;
    let names: Vec<&str> = resources
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    Ok(["resourceslices", "resourceclaims", "deviceclasses"]
        .iter()
        .all(|n| names.contains(n)))
}

fn arg(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut s = OsString::from(format!("--{name}="));
    s.push(value.as_ref());
    s
}

fn etcd_args(state: &StateDir, ports: Ports) -> Vec<OsString> {
    let client = format!("http://127.0.0.1:{}", ports.etcd_client);
    let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
    vec![
        arg("name", "tessera-e2e"),
        arg("data-dir", state.etcd()),
        arg("listen-client-urls", &client),
        arg("advertise-client-urls", &client),
        arg("listen-peer-urls", &peer),
        arg("initial-advertise-peer-urls", &peer),
        arg("initial-cluster", format!("tessera-e2e={peer}")),
        // Test data is thrown away; fsync dominates etcd latency on CI disks.
        arg("unsafe-no-fsync", "true"),
    ]
}

fn apiserver_args(
    options: &ControlPlaneOptions,
    state: &StateDir,
    pki: &Pki,
    ports: Ports,
) -> Vec<OsString> {
    let mut args = vec![
        arg(
            "etcd-servers",
            format!("http://127.0.0.1:{}", ports.etcd_client),
        ),
        arg("bind-address", "127.0.0.1"),
        arg("advertise-address", "127.0.0.1"),
        arg("secure-port", ports.apiserver.to_string()),
        arg("tls-cert-file", &pki.serving.cert),
        arg("tls-private-key-file", &pki.serving.key),
        arg("client-ca-file", &pki.ca_cert),
        // Without a request-header CA every delegating component (scheduler,
        // controller-manager) logs an error about it several times a second.
        arg("requestheader-client-ca-file", &pki.ca_cert),
        arg("requestheader-allowed-names", certs::FRONT_PROXY.user),
        arg("requestheader-username-headers", "X-Remote-User"),
        arg("requestheader-group-headers", "X-Remote-Group"),
        arg("requestheader-extra-headers-prefix", "X-Remote-Extra-"),
        arg("proxy-client-cert-file", &pki.front_proxy.cert),
        arg("proxy-client-key-file", &pki.front_proxy.key),
        // Towards kubelets (a real node's): a client certificate, and their serving
        // certificates checked against our CA.
        arg("kubelet-client-certificate", &pki.kubelet_client.cert),
        arg("kubelet-client-key", &pki.kubelet_client.key),
        arg("kubelet-certificate-authority", &pki.ca_cert),
        // A real node reports a loopback address as its name (see `realnode`); dialling by
        // Hostname alone means the apiserver never picks another of a node's addresses, which
        // could be the machine's own interface.
        arg("kubelet-preferred-address-types", "Hostname"),
        // Unused (we pass certificates) but defaults to /var/run/kubernetes.
        arg("cert-dir", state.root().join("apiserver-certs")),
        arg(
            "service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
        ),
        arg("service-account-key-file", &pki.service_account_pub),
        arg("service-account-signing-key-file", &pki.service_account_key),
        arg("service-cluster-ip-range", certs::SERVICE_CIDR),
        // The default reconciler would publish 127.0.0.1 as the endpoint of the
        // `kubernetes` service, which endpoint validation rejects as loopback.
        arg("endpoint-reconciler-type", "none"),
        arg("authorization-mode", "Node,RBAC"),
        arg("allow-privileged", "true"),
        arg("profiling", "false"),
        arg("feature-gates", options.feature_gates()),
    ];
    let runtime_config = options.runtime_config();
    if !runtime_config.is_empty() {
        args.push(arg("runtime-config", runtime_config));
    }
    args
}

/// Flags the controller-manager and the scheduler share: their kubeconfig for
/// everything, our serving certificate on a loopback port, no leader election
/// (one replica; electing costs start-up time).
fn component_common_args(
    options: &ControlPlaneOptions,
    state: &StateDir,
    pki: &Pki,
    component: &str,
    port: u16,
) -> Vec<OsString> {
    let kubeconfig = state.component_kubeconfig(component);
    vec![
        arg("kubeconfig", &kubeconfig),
        arg("authentication-kubeconfig", &kubeconfig),
        arg("authorization-kubeconfig", &kubeconfig),
        arg("bind-address", "127.0.0.1"),
        arg("secure-port", port.to_string()),
        arg("tls-cert-file", &pki.serving.cert),
        arg("tls-private-key-file", &pki.serving.key),
        arg("leader-elect", "false"),
        arg("feature-gates", options.feature_gates()),
    ]
}

fn controller_manager_args(
    options: &ControlPlaneOptions,
    state: &StateDir,
    pki: &Pki,
    ports: Ports,
) -> Vec<OsString> {
    let mut args = component_common_args(
        options,
        state,
        pki,
        "kube-controller-manager",
        ports.controller_manager,
    );
    args.extend([
        arg("service-account-private-key-file", &pki.service_account_key),
        arg("root-ca-file", &pki.ca_cert),
        // As kubeadm does: each controller acts as its own service account with
        // its bootstrap role; system:kube-controller-manager alone may not even
        // read nodes, so the node-lifecycle controller could not lift taints.
        arg("use-service-account-credentials", "true"),
        // Controllers start one after another, each first fetching a token for
        // its service account; at the default 20 QPS that alone takes ~5 s.
        arg("kube-api-qps", "200"),
        arg("kube-api-burst", "400"),
        // Simulated nodes have no kubelet posting heartbeats; with the default
        // 40-50 s the node-lifecycle controller would taint them unreachable
        // mid-test. It still runs, to lift the not-ready taint that admission
        // puts on every new node.
        arg("node-monitor-grace-period", "1h"),
    ]);
    args
}

fn scheduler_args(
    options: &ControlPlaneOptions,
    state: &StateDir,
    pki: &Pki,
    ports: Ports,
) -> Vec<OsString> {
    let mut args = component_common_args(options, state, pki, "kube-scheduler", ports.scheduler);
    // Level 2 logs each scheduling attempt and binding: what one reads first
    // when a pod stays pending.
    args.push(arg("v", "2"));
    args
}
