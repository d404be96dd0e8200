//! Tessera on a real node as a user installs it: Tessera's images imported into the node's
//! containerd, the fake GPU driver under a driver root as the GPU Operator lays one out, and
//! the chart's values for such a node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use serde_json::{Value, json};

use super::RealNode;
use crate::cluster::default_sharing_mode;
use crate::cluster::workspace::{Artifacts, bin_dir};
use crate::controlplane::ControlPlane;
use crate::error::{Error, Result};
use crate::images::{REGISTRY, debug_images};

/// The release and namespace the chart is installed as.
pub const RELEASE: &str = "tessera";
pub const NAMESPACE: &str = "tessera-system";
/// The plugin's metrics port (`kubeletPlugin.metricsPort`), on its pod's IP.
pub const PLUGIN_METRICS_PORT: u16 = 9477;

/// Where the fake driver lives on a node: `<node>/gpu/driver`.
pub fn driver_root(node: &RealNode) -> PathBuf {
    node.root().join("gpu/driver")
}

/// Tessera's state directory on the node (`kubeletPlugin.stateDir`): the checkpoint, claims'
/// files, the boards.
pub fn state_dir(node: &RealNode) -> PathBuf {
    node.root().join("gpu/tessera")
}

/// The node's boot ID as the plugin reads it (`--boot-id-file`), in the driver root the
/// plugin's pod mounts: the host's own cannot change without a reboot.
pub fn boot_id_file(node: &RealNode) -> PathBuf {
    driver_root(node).join("proc/sys/kernel/random/boot_id")
}

/// Gives the node a new boot ID (for [`RealNode::reboot`]); returns it.
pub fn new_boot_id(node: &RealNode) -> Result<String> {
    let random = Path::new("/proc/sys/kernel/random/uuid");
    let id = std::fs::read_to_string(random).map_err(Error::io(random, "reading"))?;
    let file = boot_id_file(node);
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(dir, "creating"))?;
    }
    std::fs::write(&file, &id).map_err(Error::io(&file, "writing"))?;
    Ok(id.trim().to_owned())
}

/// The fake driver under `driver`, as the GPU Operator's driver root has it, for a plugin pod
/// that sees only what is mounted into it: the libraries copied (not linked) under
/// `usr/lib/x86_64-linux-gnu`, the device nodes (with `/dev/null`'s numbers) under `dev`.
pub fn fake_driver_root(driver: &Path, artifacts: &Artifacts) -> Result<()> {
    let lib_dir = driver.join("usr/lib/x86_64-linux-gnu");
    let dev_dir = driver.join("dev");
    for dir in [&lib_dir, &dev_dir] {
        std::fs::create_dir_all(dir).map_err(Error::io(dir, "creating"))?;
    }
    for (from, name) in [
        (&artifacts.fake_cuda, "libcuda.so.1"),
        (&artifacts.fake_nvml, "libnvidia-ml.so.1"),
    ] {
        let to = lib_dir.join(name);
        std::fs::copy(from, &to).map_err(Error::io(&to, "copying the fake driver to"))?;
    }
    let nodes = (0..8)
        .map(|i| format!("nvidia{i}"))
        .chain(["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"].map(String::from));
    for name in nodes {
        let path = dev_dir.join(&name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .map_err(|e| Error::io(&path, "creating a fake device node")(e.into()))?;
    }
    Ok(())
}

/// Where the plugin's fake NVML reads XID events on `node` (`FAKEGPU_EVENTS`): a line
/// `{"uuid": …, "xid": …}` appended here is an XID on that GPU, as the driver would report it.
pub fn fake_xid_events(node: &RealNode) -> PathBuf {
    node.root().join("gpu/fake-events/events")
}

/// The chart's values for `node`: Tessera's images as [`debug_images`] tags them, never
/// pulled; standalone CDI with the fake driver root; the node's kubelet root, CDI and state
/// directories; the node's own boot ID ([`boot_id_file`]); the fake driver's XID events
/// ([`fake_xid_events`]). `extra` is merged over them (top-level keys replaced).
pub fn chart_values(node: &RealNode, sharing_mode: &str, tag: &str, extra: Value) -> Value {
    let driver = driver_root(node);
    let events = fake_xid_events(node);
    let events_dir = events.parent().unwrap_or(&events);
    let mut values = json!({
        "image": { "registry": REGISTRY, "tag": tag, "pullPolicy": "Never" },
        "sharingMode": sharing_mode,
        "kubeletPlugin": {
            "driverRoot": driver,
            "cdiMode": "standalone",
            "kubeletRoot": node.kubelet_root(),
            "cdiDir": node.cdi_dir(),
            "stateDir": state_dir(node),
            "logFormat": "text",
            "metricsPort": PLUGIN_METRICS_PORT,
            "extraArgs": [
                format!("--dev-root={}", driver.display()),
                format!("--boot-id-file={}", boot_id_file(node).display()),
            ],
            "extraEnv": [{ "name": "FAKEGPU_EVENTS", "value": "/fake-gpu-events/events" }],
            "extraVolumes": [{ "name": "fake-gpu-events", "hostPath": {
                "path": events_dir, "type": "DirectoryOrCreate" } }],
            "extraVolumeMounts": [{ "name": "fake-gpu-events", "mountPath": "/fake-gpu-events" }],
        },
        "controller": { "logFormat": "text" },
        "monitoring": { "enabled": false },
    });
    if let (Some(values), Some(extra)) = (values.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            values.insert(key.clone(), value.clone());
        }
    }
    values
}

/// Makes Tessera's images from this build and imports them into the node's containerd, and
/// lays out the fake driver; returns the images' tag.
pub fn prepare_node(node: &RealNode) -> Result<String> {
    let artifacts = Artifacts::locate(&bin_dir())?;
    let images = debug_images()?;
    let tarballs: Vec<&Path> = images.iter().map(|i| i.tarball.as_path()).collect();
    node.import_images(&tarballs)?;
    fake_driver_root(&driver_root(node), &artifacts)?;
    new_boot_id(node)?;
    Ok(images
        .first()
        .map(|i| i.tag().to_owned())
        .unwrap_or_default())
}

/// One container of a worker pod: its name and `tessera-gpu-worker`'s arguments.
pub struct Worker<'a> {
    pub name: &'a str,
    pub args: Vec<String>,
}

/// What workload pods on the node are made of: `tessera-gpu-worker`'s image (only the test
/// CUDA program and glibc) and the fake GPU's node-wide state.
#[derive(Debug, Clone)]
pub struct Workloads {
    pub image: String,
    /// Shared by every container of the node, as a card's memory is.
    pub fake_gpu_state: PathBuf,
    /// The fake GPU node's config as containers see it (`FAKEGPU_CONFIG`), where the node has
    /// one of its own in `fake_gpu_state` (`node.json`); the fake driver's default node else.
    pub fake_gpu_config: Option<String>,
}

impl Workloads {
    /// For images tagged `tag` ([`prepare_node`]); makes the fake GPU's state directory.
    pub fn for_node(node: &RealNode, tag: &str) -> Result<Workloads> {
        let fake_gpu_state = node.root().join("gpu/fake-state");
        std::fs::create_dir_all(&fake_gpu_state).map_err(Error::io(&fake_gpu_state, "creating"))?;
        Ok(Workloads {
            image: format!("{REGISTRY}/tessera-gpu-worker:{tag}"),
            fake_gpu_state,
            fake_gpu_config: None,
        })
    }

    /// For images tagged `tag`, with the fake GPU's state and its node config (`node.json`) in
    /// `dir`, a host directory the caller made.
    pub fn with_fake_gpu(tag: &str, dir: &Path) -> Workloads {
        Workloads {
            image: format!("{REGISTRY}/tessera-gpu-worker:{tag}"),
            fake_gpu_state: dir.to_owned(),
            fake_gpu_config: Some("/fakegpu/node.json".to_owned()),
        }
    }

    /// A pod of the workload image whose workers all use the claim `claim`
    /// (`{"resourceClaimTemplateName": …}` or `{"resourceClaimName": …}`), with `shared`
    /// (a volume source: a `hostPath` the caller writes into, an `emptyDir`) mounted at `mount`
    /// in each. The shim, its config and the driver come from the claim's CDI spec alone; the
    /// pod adds only what the fake driver needs to behave like the real one: its node-wide
    /// state, and enumerating only the GPUs whose device nodes the container has.
    pub fn pod(
        &self,
        name: &str,
        claim: Value,
        workers: &[Worker<'_>],
        shared: Value,
        mount: &str,
    ) -> Result<Pod> {
        let mut claim_ref = json!({ "name": "gpu" });
        if let (Some(to), Some(from)) = (claim_ref.as_object_mut(), claim.as_object()) {
            to.extend(from.clone());
        }
        let mut shared_volume = json!({ "name": "shared" });
        if let (Some(to), Some(from)) = (shared_volume.as_object_mut(), shared.as_object()) {
            to.extend(from.clone());
        }
        let mut env = vec![
            json!({ "name": "FAKEGPU_DEVICE_NODES", "value": "/dev" }),
            json!({ "name": "FAKEGPU_STATE", "value": "/fakegpu/state" }),
        ];
        if let Some(config) = &self.fake_gpu_config {
            env.push(json!({ "name": "FAKEGPU_CONFIG", "value": config }));
        }
        let containers: Vec<Value> = workers
            .iter()
            .map(|w| {
                json!({
                    "name": w.name,
                    "image": self.image,
                    "imagePullPolicy": "Never",
                    "args": w.args,
                    "env": env,
                    "resources": { "claims": [{ "name": "gpu" }] },
                    "volumeMounts": [
                        { "name": "shared", "mountPath": mount },
                        { "name": "fakegpu", "mountPath": "/fakegpu" },
                    ],
                })
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": "default" },
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 2,
                "resourceClaims": [claim_ref],
                "containers": containers,
                "volumes": [
                    shared_volume,
                    { "name": "fakegpu", "hostPath": { "path": self.fake_gpu_state, "type": "Directory" } },
                ],
            },
        }))
        .map_err(|e| Error::State {
            dir: self.fake_gpu_state.clone(),
            reason: format!("worker pod {name}: {e}"),
        })
    }
}

/// Where the plugin's pod on `node` serves its metrics: its pod IP, on the pods' bridge inside
/// the node's network namespace.
pub async fn plugin_metrics_address(
    client: &kube::Client,
    node: &RealNode,
) -> Result<std::net::SocketAddr> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=kubelet-plugin"))
        .await
        .map_err(Error::kube("listing the plugin's pods".to_owned()))?;
    let ip = list
        .items
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.name()))
        .find_map(|p| {
            p.status
                .as_ref()?
                .pod_ip
                .as_deref()?
                .parse::<std::net::IpAddr>()
                .ok()
        })
        .ok_or_else(|| Error::State {
            dir: node.root().to_owned(),
            reason: format!("no plugin pod with an IP on node {}", node.name()),
        })?;
    Ok(std::net::SocketAddr::from((ip, PLUGIN_METRICS_PORT)))
}

/// For a cluster whose chart objects are already installed (the simulated cluster's): the
/// chart's plugin DaemonSet, on this node only; returns once its pod is Ready there and the
/// node's ResourceSlices are published, with what workload pods there are made of.
pub async fn install_plugin(
    control_plane: &ControlPlane,
    node: &RealNode,
    timeout: Duration,
) -> Result<Workloads> {
    let version = control_plane.version();
    let tag = prepare_node(node)?;
    let workloads = Workloads::for_node(node, &tag)?;
    let only_this_node = json!({
        "gpuOperator": false,
        "nfd": false,
        "manualLabel": false,
        "extraTerms": [[{
            "key": "kubernetes.io/hostname", "operator": "In", "values": [node.name()],
        }]],
    });
    let values = chart_values(
        node,
        default_sharing_mode(version),
        &tag,
        json!({ "nodeSelection": only_this_node, "controller": { "enabled": false } }),
    );
    let helm = tessera_chart_tests::Helm::locate().map_err(|e| Error::State {
        dir: tessera_chart_tests::chart_dir(),
        reason: format!("{e} (e2e/scripts/build-helm.sh builds it)"),
    })?;
    let client = control_plane.client();
    tessera_chart_tests::install(
        &client,
        &helm,
        &tessera_chart_tests::Release::new(RELEASE, NAMESPACE).values(&values.to_string()),
        Some(&["DaemonSet"]),
    )
    .await
    .map_err(|e| Error::State {
        dir: tessera_chart_tests::chart_dir(),
        reason: format!("installing the plugin's DaemonSet: {e}"),
    })?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<DynamicObject> = Api::all_with(
        client,
        &version.resource_api("ResourceSlice", "resourceslices"),
    );
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let ready = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=kubelet-plugin"))
            .await
            .map(|l| {
                l.items.iter().any(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.name())
                        && p.status
                            .as_ref()
                            .and_then(|s| s.container_statuses.as_ref())
                            .is_some_and(|cs| cs.iter().all(|c| c.ready))
                })
            })
            .unwrap_or(false);
        let published = slices
            .list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .any(|s| s.data["spec"]["nodeName"].as_str() == Some(node.name()))
            })
            .unwrap_or(false);
        if ready && published {
            return Ok(workloads);
        }
        last = format!("plugin pod Ready: {ready}, slices published: {published}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(Error::Timeout {
        what: format!("Tessera's plugin on the real node {}", node.name()),
        seconds: timeout.as_secs(),
        log: node.kubelet_log().to_owned(),
        tail: last,
    })
}
