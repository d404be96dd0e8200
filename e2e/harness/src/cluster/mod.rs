//! A whole simulated cluster: the control plane, Tessera's chart (its cluster-scoped objects),
//! simulated GPU nodes (each a `tessera-kubelet-plugin` and a `tessera-kubelet-standin` on a
//! fake GPU inventory) and `tessera-controller`, which adds a DeviceClass per GPU model.
//!
//! [`SimCluster::start`] returns once every node is Ready, has published its ResourceSlices,
//! and the generic and per-model DeviceClasses exist. Dropping it stops everything, the
//! containers the stand-ins started included; [`SimCluster::detach`] leaves it running for
//! `tessera-cluster up`.

pub mod node;
pub mod workspace;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use serde_json::json;

use crate::controlplane::{ControlPlane, ControlPlaneOptions};
use crate::error::{Error, Result};
use crate::ports::free_ports;
use crate::process::{Process, ProcessSpec, log_tail, stop_all};
use crate::state::{ClusterRecord, ComponentRecord};
use crate::versions::K8sVersion;
pub use node::{NodeSpec, SimNode};
pub use workspace::Artifacts;

/// The controller's Lease lives here, as it does when installed by the chart.
pub const TESSERA_NAMESPACE: &str = "tessera-system";
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// The chart's values for a simulated cluster: no controller pods (it runs as a process).
const CHART_VALUES: &str = "controller:\n  enabled: false\n";

/// What to start.
pub struct ClusterOptions {
    pub control_plane: ControlPlaneOptions,
    pub nodes: Vec<NodeSpec>,
    pub artifacts: Artifacts,
    /// The plugins' `--sharing-mode`.
    pub sharing_mode: String,
}

impl ClusterOptions {
    /// Nodes from `nodes_dir` (one fake inventory per node), Tessera's programs from
    /// [`workspace::bin_dir`], and the sharing mode each version supports best: `auto` (which
    /// picks consumable capacity on 1.34+), tenths of a GPU (`fixed:10`) on older releases.
    pub fn new(version: K8sVersion, state_dir: &Path, nodes_dir: &Path) -> Result<ClusterOptions> {
        Ok(ClusterOptions {
            control_plane: ControlPlaneOptions::new(version, state_dir),
            nodes: NodeSpec::from_dir(nodes_dir)?,
            artifacts: Artifacts::locate(&workspace::bin_dir())?,
            sharing_mode: default_sharing_mode(version).to_owned(),
        })
    }
}

pub fn default_sharing_mode(version: K8sVersion) -> &'static str {
    if version.minor() >= 34 {
        "auto"
    } else {
        "fixed:10"
    }
}

/// Container names of a cluster start with this: derived from its state directory, so
/// `tessera-cluster down` finds them again, and two clusters on one host never share one.
pub fn container_prefix(state_dir: &Path) -> String {
    // FNV-1a: stable across runs and Rust versions, unlike std's hasher.
    let hash = state_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
        });
    format!("tsim{:08x}", hash as u32)
}

/// Removes every container whose name starts with `prefix` (what the stand-ins left running).
pub fn remove_containers(prefix: &str) {
    let listed = std::process::Command::new("podman")
        .args(["ps", "--all", "--format", "{{.Names}}", "--filter"])
        .arg(format!("name=^{prefix}-"))
        .output();
    let Ok(listed) = listed else { return };
    let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return;
    }
    let _ = std::process::Command::new("podman")
        .args(["rm", "--force", "--ignore", "--time", "1"])
        .args(&names)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

pub struct SimCluster {
    control_plane: Option<ControlPlane>,
    pub nodes: Vec<SimNode>,
    pub artifacts: Artifacts,
    controller: Option<Process>,
    controller_port: u16,
    container_prefix: String,
}

impl SimCluster {
    pub async fn start(options: ClusterOptions) -> Result<SimCluster> {
        let began = Instant::now();
        let cp = ControlPlane::start(options.control_plane).await?;
        let client = cp.client();
        let namespace: Namespace = serde_json::from_value(
            json!({ "metadata": { "name": TESSERA_NAMESPACE } }),
        )
        .map_err(|e| Error::State {
            dir: cp.state().root().to_owned(),
            reason: e.to_string(),
        })?;
        match Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                return Err(Error::kube(format!(
                    "creating namespace {TESSERA_NAMESPACE}"
                ))(e));
            }
        }
        // What `helm install` would create that is not a pod: RBAC, the admission policy, the
        // generic DeviceClass. The plugins and the controller run here as local processes.
        let helm = tessera_chart_tests::Helm::locate().map_err(|e| Error::State {
            dir: cp.state().root().to_owned(),
            reason: format!(
                "{e} (e2e/scripts/build-helm.sh builds it; make test and make cluster-up run it)"
            ),
        })?;
        let release =
            tessera_chart_tests::Release::new("tessera", TESSERA_NAMESPACE).values(CHART_VALUES);
        tessera_chart_tests::install(
            &client,
            &helm,
            &release,
            Some(tessera_chart_tests::CLUSTER_OBJECT_KINDS),
        )
        .await
        .map_err(|e| Error::State {
            dir: tessera_chart_tests::chart_dir(),
            reason: format!("installing the chart's cluster objects: {e}"),
        })?;
        let prefix = container_prefix(cp.state().root());
        let version = cp.version();
        let version_string = cp.record().version_string.clone();
        let mut cluster = SimCluster {
            nodes: Vec::new(),
            artifacts: options.artifacts.clone(),
            controller: None,
            controller_port: free_ports(1)?[0],
            container_prefix: prefix.clone(),
            control_plane: None,
        };
        let setup = node::NodeSetup {
            state: cp.state(),
            artifacts: &options.artifacts,
            version,
            version_string: &version_string,
            sharing_mode: &options.sharing_mode,
            container_prefix: &prefix,
        };
        for spec in &options.nodes {
            let mut node = SimNode::prepare(&setup, spec)?;
            node.start_standin()?;
            node.start_plugin()?;
            cluster.nodes.push(node);
        }
        let controller = Process::spawn(ProcessSpec {
            name: "tessera-controller".into(),
            program: options.artifacts.controller.clone(),
            args: [
                "--kubeconfig".into(),
                OsString::from(cp.kubeconfig()),
                "--listen".into(),
                format!("127.0.0.1:{}", cluster.controller_port).into(),
                // Per-model classes follow the nodes' slices within seconds, not the default 30 s.
                "--resync-seconds".into(),
                "2".into(),
                "--namespace".into(),
                TESSERA_NAMESPACE.into(),
                "--identity".into(),
                "tessera-controller-0".into(),
            ]
            .into(),
            log: cp.state().log("tessera-controller"),
            pid_file: cp.state().pid_file("tessera-controller"),
            env: Vec::new(),
        })?;
        cluster.controller = Some(controller);
        cluster.control_plane = Some(cp);
        let models = distinct_models(&options.nodes)?;
        cluster.wait_ready(models).await?;
        tracing::info!(
            ms = began.elapsed().as_millis() as u64,
            nodes = cluster.nodes.len(),
            "simulated cluster is ready"
        );
        Ok(cluster)
    }

    pub fn control_plane(&self) -> &ControlPlane {
        self.control_plane
            .as_ref()
            .expect("the control plane runs while the cluster exists")
    }

    pub fn client(&self) -> kube::Client {
        self.control_plane().client()
    }

    pub fn version(&self) -> K8sVersion {
        self.control_plane().version()
    }

    pub fn node(&mut self, name: &str) -> &mut SimNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no simulated node {name}"))
    }

    pub fn controller_metrics_port(&self) -> u16 {
        self.controller_port
    }

    pub fn controller_metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.controller_port)
    }

    /// `resource.k8s.io` objects of `kind` in the version the cluster serves.
    pub fn resource_api(&self, kind: &str, plural: &str) -> ApiResource {
        self.version().resource_api(kind, plural)
    }

    /// An error naming the first Tessera process that has exited, with its log tail.
    pub fn check_running(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            node.check_running()?;
        }
        if let Some(c) = self.controller.as_mut() {
            c.check_running()?;
        }
        Ok(())
    }

    /// Waits until DeviceClass `name` exists (tessera-controller adds one per GPU model it
    /// finds in the slices, a real node's included).
    pub async fn wait_device_class(&mut self, name: &str, timeout: Duration) -> Result<()> {
        let classes: Api<DynamicObject> = Api::all_with(
            self.client(),
            &self.resource_api("DeviceClass", "deviceclasses"),
        );
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            if let Ok(Some(_)) = classes.get_opt(name).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self
                    .controller
                    .as_ref()
                    .map(|c| c.log().to_owned())
                    .unwrap_or_default();
                return Err(Error::Timeout {
                    what: format!("DeviceClass {name}"),
                    seconds: timeout.as_secs(),
                    tail: log_tail(&log, 30),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn wait_ready(&mut self, models: usize) -> Result<()> {
        let client = self.client();
        let nodes_api: Api<Node> = Api::all(client.clone());
        let slices: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &self.resource_api("ResourceSlice", "resourceslices"),
        );
        let classes: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &self.resource_api("DeviceClass", "deviceclasses"),
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut missing;
        loop {
            self.check_running()?;
            missing = Vec::new();
            let ready_nodes: BTreeSet<String> = nodes_api
                .list(&ListParams::default())
                .await
                .map(|l| {
                    l.items
                        .into_iter()
                        .filter(|n| {
                            n.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| {
                                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                        })
                        .filter_map(|n| n.metadata.name)
                        .collect()
                })
                .unwrap_or_default();
            let sliced: BTreeSet<String> = slices
                .list(&ListParams::default())
                .await
                .map(|l| {
                    l.items
                        .iter()
                        .filter_map(|s| s.data["spec"]["nodeName"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for node in &self.nodes {
                if !ready_nodes.contains(&node.name) {
                    missing.push(format!("node {} Ready", node.name));
                }
                if !sliced.contains(&node.name) {
                    missing.push(format!("ResourceSlices of {}", node.name));
                }
            }
            let class_count = classes
                .list(&ListParams::default())
                .await
                .map(|l| l.items.len())
                .unwrap_or(0);
            if class_count < models + 1 {
                missing.push(format!("DeviceClasses ({class_count} of {})", models + 1));
            }
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self
                    .nodes
                    .first()
                    .map(|n| n.plugin_log().to_owned())
                    .unwrap_or_default();
                return Err(Error::Timeout {
                    what: format!("the simulated cluster ({})", missing.join(", ")),
                    seconds: READY_TIMEOUT.as_secs(),
                    tail: log_tail(&log, 30),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Leaves everything running (for `tessera-cluster up`) and returns the record, with the
    /// nodes' processes and the controller added, that `tessera-cluster down` stops them from.
    pub fn detach(mut self) -> ClusterRecord {
        let mut extra = Vec::new();
        for node in &mut self.nodes {
            let url = node.metrics_url();
            for process in node.take_processes() {
                extra.push(component_record(process, url.clone()));
            }
        }
        if let Some(controller) = self.controller.take() {
            extra.push(component_record(controller, self.controller_metrics_url()));
        }
        let cp = self.control_plane.take().expect("control plane");
        let state = cp.state().clone();
        let mut record = cp.detach();
        record.components.extend(extra);
        if let Err(e) = state.write_record(&record) {
            tracing::error!("writing the cluster record: {e}");
        }
        record
    }

    fn stop_tessera(&mut self) {
        let grace = Duration::from_secs(5);
        let mut processes: Vec<Process> = self
            .nodes
            .iter_mut()
            .flat_map(|n| n.take_processes())
            .collect();
        processes.extend(self.controller.take());
        stop_all(&mut processes, grace);
        if self.control_plane.is_some() {
            remove_containers(&self.container_prefix);
        }
    }
}

fn component_record(process: Process, health: String) -> ComponentRecord {
    let name = process.name().to_owned();
    let log = process.log().to_owned();
    let pid_file = process.pid_file().to_owned();
    let pid = process.detach();
    ComponentRecord {
        name,
        pid,
        log,
        pid_file,
        health,
    }
}

fn distinct_models(nodes: &[NodeSpec]) -> Result<usize> {
    let mut models = BTreeSet::new();
    for node in nodes {
        let bytes =
            std::fs::read(&node.inventory).map_err(Error::io(&node.inventory, "reading"))?;
        let inventory: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::State {
                dir: node.inventory.clone(),
                reason: format!("not a fake inventory: {e}"),
            })?;
        for device in inventory["devices"].as_array().into_iter().flatten() {
            if let Some(name) = device["name"].as_str() {
                models.insert(name.to_owned());
            }
        }
    }
    Ok(models.len())
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        self.stop_tessera();
        // The control plane stops when its field drops, after Tessera's processes.
    }
}
