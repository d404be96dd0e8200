//! Tessera on a real node as a user installs it: Tessera's images imported into the node's
//! containerd, the fake GPU driver under a driver root as the GPU Operator lays one out, and
//! the chart's values for such a node.

use std::path::Path;
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

/// Where the fake driver lives on a node: `<node>/gpu/driver`.
pub fn driver_root(node: &RealNode) -> std::path::PathBuf {
    node.root().join("gpu/driver")
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

/// The chart's values for `node`: Tessera's images as [`debug_images`] tags them, never
/// pulled; standalone CDI with the fake driver root; the node's kubelet root, CDI and state
/// directories. `extra` is merged over them (top-level keys replaced).
pub fn chart_values(node: &RealNode, sharing_mode: &str, tag: &str, extra: Value) -> Value {
    let driver = driver_root(node);
    let mut values = json!({
        "image": { "registry": REGISTRY, "tag": tag, "pullPolicy": "Never" },
        "sharingMode": sharing_mode,
        "kubeletPlugin": {
            "driverRoot": driver,
            "cdiMode": "standalone",
            "kubeletRoot": node.kubelet_root(),
            "cdiDir": node.cdi_dir(),
            "stateDir": node.root().join("gpu/tessera"),
            "logFormat": "text",
            "extraArgs": [format!("--dev-root={}", driver.display())],
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
    Ok(images
        .first()
        .map(|i| i.tag().to_owned())
        .unwrap_or_default())
}

/// For a cluster whose chart objects are already installed (the simulated cluster's): the
/// chart's plugin DaemonSet, on this node only; returns once its pod is Ready there and the
/// node's ResourceSlices are published.
pub async fn install_plugin(
    control_plane: &ControlPlane,
    node: &RealNode,
    timeout: Duration,
) -> Result<()> {
    let version = control_plane.version();
    let tag = prepare_node(node)?;
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
            return Ok(());
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
