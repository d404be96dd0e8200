//! One simulated GPU node: its fake driver files, a `tessera-kubelet-plugin` and a
//! `tessera-kubelet-standin`, each a [`Process`] with its log in the cluster's state directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};

use crate::cluster::workspace::Artifacts;
use crate::error::{Error, Result};
use crate::ports::free_ports;
use crate::process::{Process, ProcessSpec};
use crate::state::StateDir;
use crate::versions::K8sVersion;

/// Where podman finds CDI specs: podman 4.3 has no flag for another directory.
pub const CDI_DIR: &str = "/var/run/cdi";
/// Device nodes a GPU node has; the fake ones are made with `/dev/null`'s numbers.
const DEVICE_NODES: [&str; 3] = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];
/// Labels a GPU node carries when the NVIDIA GPU Operator (or NFD) has seen it.
const GPU_NODE_LABELS: [(&str, &str); 2] = [
    ("nvidia.com/gpu.present", "true"),
    ("feature.node.kubernetes.io/pci-10de.present", "true"),
];

/// A node to simulate: its name, the fake inventory describing its GPUs, and flags of its own
/// for its `tessera-kubelet-plugin` (a node overcommitting its memory, say).
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub inventory: PathBuf,
    pub plugin_args: Vec<String>,
}

impl NodeSpec {
    /// One node per `*.json` file of `dir`, named after the file, in name order; its plugin's
    /// extra flags from `<name>.plugin-args` beside it, if there is one (one flag per line;
    /// blank lines and lines starting with `#` skipped).
    pub fn from_dir(dir: &Path) -> Result<Vec<NodeSpec>> {
        let entries = std::fs::read_dir(dir).map_err(Error::io(dir, "listing node inventories"))?;
        let mut nodes = Vec::new();
        for inventory in entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
        {
            let Some(name) = inventory.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let args_file = dir.join(format!("{name}.plugin-args"));
            let plugin_args = match std::fs::read_to_string(&args_file) {
                Ok(text) => text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned)
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(Error::io(&args_file, "reading")(e)),
            };
            nodes.push(NodeSpec {
                name: name.to_owned(),
                inventory: inventory.clone(),
                plugin_args,
            });
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        if nodes.is_empty() {
            return Err(Error::State {
                dir: dir.to_owned(),
                reason: "no node inventory (*.json) in it".into(),
            });
        }
        Ok(nodes)
    }
}

/// A running simulated node.
pub struct SimNode {
    pub name: String,
    pub inventory: PathBuf,
    /// `<state>/nodes/<name>`.
    pub root: PathBuf,
    pub metrics_port: u16,
    plugin_spec: ProcessSpec,
    standin_spec: ProcessSpec,
    plugin: Option<Process>,
    standin: Option<Process>,
}

/// How nodes are started; shared by all nodes of a cluster.
pub struct NodeSetup<'a> {
    pub state: &'a StateDir,
    pub artifacts: &'a Artifacts,
    pub version: K8sVersion,
    pub version_string: &'a str,
    /// `--sharing-mode` of the plugin.
    pub sharing_mode: &'a str,
    /// Makes container names unique on the host when several clusters run at once.
    pub container_prefix: &'a str,
}

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_owned()
}

impl SimNode {
    /// Lays out the node's directories and fake driver; starts nothing.
    pub fn prepare(setup: &NodeSetup<'_>, spec: &NodeSpec) -> Result<SimNode> {
        let root = setup.state.root().join("nodes").join(&spec.name);
        let lib_dir = root.join("driver/usr/lib/x86_64-linux-gnu");
        let dev_dir = root.join("devroot/dev");
        let fakegpu = root.join("fakegpu");
        for dir in [
            &lib_dir,
            &dev_dir,
            &fakegpu,
            &root.join("registry"),
            &root.join("plugin"),
            &root.join("tessera"),
            &root.join("standin"),
        ] {
            std::fs::create_dir_all(dir).map_err(Error::io(dir, "creating"))?;
        }
        for (target, link) in [
            (&setup.artifacts.fake_cuda, "libcuda.so.1"),
            (&setup.artifacts.fake_nvml, "libnvidia-ml.so.1"),
        ] {
            let link = lib_dir.join(link);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, &link)
                .map_err(Error::io(&link, "linking the fake driver"))?;
        }
        let inventory: serde_json::Value = std::fs::read(&spec.inventory)
            .map_err(Error::io(&spec.inventory, "reading"))
            .and_then(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| Error::State {
                    dir: spec.inventory.clone(),
                    reason: format!("not a fake inventory: {e}"),
                })
            })?;
        let gpus = inventory["devices"].as_array().map_or(0, Vec::len);
        let nodes = (0..gpus)
            .map(|i| format!("nvidia{i}"))
            .chain(DEVICE_NODES.iter().map(|s| s.to_string()));
        for node in nodes {
            let path = dev_dir.join(&node);
            if path.exists() {
                continue;
            }
            mknod(
                &path,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(1, 3),
            )
            .map_err(|e| Error::State {
                dir: dev_dir.clone(),
                reason: format!("cannot create the fake device node {node} (needs root): {e}"),
            })?;
        }
        let metrics_port = free_ports(1)?[0];
        let kubeconfig = setup.state.kubeconfig();
        let name = &spec.name;
        let fakegpu_state = fakegpu.join("state");
        let plugin_spec = ProcessSpec {
            name: format!("kubelet-plugin@{name}"),
            program: setup.artifacts.kubelet_plugin.clone(),
            args: vec![
                os("--node-name"),
                os(name),
                os("--kubeconfig"),
                os(&kubeconfig),
                os("--sharing-mode"),
                os(setup.sharing_mode),
                os("--registrar-dir"),
                os(root.join("registry")),
                os("--plugin-dir"),
                os(root.join("plugin")),
                os("--cdi-dir"),
                os(CDI_DIR),
                os("--state-dir"),
                os(root.join("tessera")),
                os("--inventory"),
                os(&spec.inventory),
                os("--shim-path"),
                os(&setup.artifacts.shim),
                os("--cdi-mode"),
                os("standalone"),
                os("--driver-root"),
                os(root.join("driver")),
                os("--dev-root"),
                os(root.join("devroot")),
                os("--metrics-address"),
                os(format!("127.0.0.1:{metrics_port}")),
                // The driver under the node's driver root, as the chart finds it: the plugin
                // measures what a context costs on the node's fake GPUs (libcuda beside it).
                os("--nvml-library"),
                os(lib_dir.join("libnvidia-ml.so.1")),
                os("--gpu-probe"),
                os(&setup.artifacts.gpu_probe),
            ]
            .into_iter()
            .chain(spec.plugin_args.iter().map(os))
            .collect(),
            log: setup.state.log(&format!("kubelet-plugin-{name}")),
            pid_file: setup.state.pid_file(&format!("kubelet-plugin-{name}")),
            env: vec![
                (os("FAKEGPU_CONFIG"), os(&spec.inventory)),
                (os("FAKEGPU_STATE"), os(&fakegpu_state)),
            ],
        };
        let mut standin_args = vec![
            os("--node-name"),
            os(name),
            os("--kubeconfig"),
            os(&kubeconfig),
            os("--registrar-dir"),
            os(root.join("registry")),
            os("--state-dir"),
            os(root.join("standin")),
            os("--dra-api"),
            os(if setup.version.minor() >= 34 {
                "v1"
            } else if setup.version.minor() >= 32 {
                "v1beta1"
            } else {
                "v1alpha3"
            }),
            os("--kubelet-version"),
            os(setup
                .version_string
                .rsplit(' ')
                .next()
                .unwrap_or(setup.version_string)),
            os("--container-prefix"),
            os(format!("{}-{name}", setup.container_prefix)),
            os("--container-env"),
            os(format!("FAKEGPU_CONFIG={}", spec.inventory.display())),
            os("--container-env"),
            os(format!("FAKEGPU_STATE={}", fakegpu_state.display())),
            // The fake driver then sees only the GPUs whose device nodes the CDI spec gave.
            os("--container-env"),
            os("FAKEGPU_DEVICE_NODES=/dev"),
            // The fake GPU's shared state, so all containers of the node see one GPU.
            os("--container-volume"),
            os(format!("{}:{}", fakegpu.display(), fakegpu.display())),
        ];
        for (key, value) in GPU_NODE_LABELS {
            standin_args.push(os("--node-label"));
            standin_args.push(os(format!("{key}={value}")));
        }
        let standin_spec = ProcessSpec {
            name: format!("kubelet-standin@{name}"),
            program: setup.artifacts.kubelet_standin.clone(),
            args: standin_args,
            log: setup.state.log(&format!("kubelet-standin-{name}")),
            pid_file: setup.state.pid_file(&format!("kubelet-standin-{name}")),
            env: Vec::new(),
        };
        Ok(SimNode {
            name: name.clone(),
            inventory: spec.inventory.clone(),
            root,
            metrics_port,
            plugin_spec,
            standin_spec,
            plugin: None,
            standin: None,
        })
    }

    pub fn start_plugin(&mut self) -> Result<()> {
        self.plugin = Some(Process::spawn(self.plugin_spec.clone())?);
        Ok(())
    }

    pub fn start_standin(&mut self) -> Result<()> {
        self.standin = Some(Process::spawn(self.standin_spec.clone())?);
        Ok(())
    }

    /// SIGKILL, as a crash or an OOM kill would end it.
    pub fn kill_plugin(&mut self) {
        if let Some(mut p) = self.plugin.take() {
            p.signal(Signal::SIGKILL);
            p.wait_exit(Duration::from_secs(10));
        }
    }

    /// SIGKILL, as a crashed kubelet.
    pub fn kill_standin(&mut self) {
        if let Some(mut p) = self.standin.take() {
            p.signal(Signal::SIGKILL);
            p.wait_exit(Duration::from_secs(10));
        }
    }

    /// The plugin's host state directory (claims' configs and regions, the checkpoint).
    pub fn plugin_state_dir(&self) -> PathBuf {
        self.root.join("tessera")
    }

    /// Where the stand-in keeps each pod's container logs.
    pub fn pod_dir(&self, namespace: &str, pod: &str, uid: &str) -> PathBuf {
        self.root
            .join("standin/pods")
            .join(format!("{namespace}_{pod}_{uid}"))
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// An error naming the first of the node's processes that has exited.
    pub fn check_running(&mut self) -> Result<()> {
        for p in self.plugin.iter_mut().chain(self.standin.iter_mut()) {
            p.check_running()?;
        }
        Ok(())
    }

    pub fn plugin_log(&self) -> &Path {
        &self.plugin_spec.log
    }

    pub fn standin_log(&self) -> &Path {
        &self.standin_spec.log
    }

    /// The running processes, stand-in first (it calls the plugin).
    pub(crate) fn take_processes(&mut self) -> Vec<Process> {
        self.standin
            .take()
            .into_iter()
            .chain(self.plugin.take())
            .collect()
    }
}
