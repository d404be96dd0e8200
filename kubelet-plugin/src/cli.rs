//! Command-line flags; `docs/reference/kubelet-plugin.md` documents each one.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Tessera's kubelet plugin for the DRA driver gpu.tessera.dev.
#[derive(Debug, Clone, Parser)]
#[command(name = "tessera-kubelet-plugin", version, about)]
pub struct Args {
    /// This node's name (the pool name of its devices).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// How the node's GPUs are published as ResourceSlices: auto, consumable, partitioned, fixed,
    /// fixed:<1-100>, exclusive, or off (publish nothing).
    #[arg(long, env = "TESSERA_SHARING_MODE", default_value = "auto", value_parser = sharing_mode)]
    pub sharing_mode: String,
    /// kubeconfig file; the in-cluster service account is used without it.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Where the kubelet's plugin watcher looks for registration sockets.
    #[arg(long, default_value = "/var/lib/kubelet/plugins_registry")]
    pub registrar_dir: PathBuf,
    /// The plugin's own directory: the DRA socket and the cross-instance lock.
    #[arg(long, default_value = "/var/lib/kubelet/plugins/gpu.tessera.dev")]
    pub plugin_dir: PathBuf,
    /// Where CDI specs are written (a directory the container runtime reads).
    #[arg(long, default_value = "/var/run/cdi")]
    pub cdi_dir: PathBuf,
    /// Tessera's host state: the shim copy, claim configs and regions, the checkpoint.
    #[arg(long, default_value = "/var/lib/tessera")]
    pub state_dir: PathBuf,
    /// Memory overcommit: the `memory` the node's slices offer is the GPUs' physical memory times
    /// this factor (1.0–4.0), `1.5` for every GPU or per model, `NVIDIA L40S=2,default=1.2`.
    /// Refused on GPUs without on-demand paging (compute capability below 6.0).
    #[arg(long, env = "TESSERA_MEMORY_OVERCOMMIT", default_value = "1")]
    pub memory_overcommit: tessera_driver::MemoryOvercommit,
    /// On GPUs this node overcommits, claims that do not set `oversubscribe` in their GpuConfig
    /// spill as if they had set it to true; a claim's explicit `oversubscribe: false` still opts
    /// it out.
    #[arg(long, env = "TESSERA_OVERSUBSCRIBE_BY_DEFAULT")]
    pub oversubscribe_by_default: bool,
    /// A fake inventory file (the fake GPU node's JSON) instead of asking NVML.
    #[arg(long)]
    pub inventory: Option<PathBuf>,
    /// Seconds between looks at the GPUs' health (NVML, or the --inventory file); 0 turns
    /// health checks off (GPUs are never withdrawn).
    #[arg(long, default_value_t = 5)]
    pub health_interval: u64,
    /// Load NVML from this file instead of the default `libnvidia-ml.so.1`.
    #[arg(long)]
    pub nvml_library: Option<PathBuf>,
    /// What a CUDA context costs on each GPU, charged per context against a claim's wall:
    /// `auto` measures it at start-up with tessera-gpu-probe (with the driver of
    /// --nvml-library; a fake --inventory without one is charged nothing), a quantity (`600Mi`)
    /// sets it for every GPU, for example to cover programs with large module images.
    #[arg(long, env = "TESSERA_CONTEXT_OVERHEAD", default_value = "auto")]
    pub context_overhead: crate::context_overhead::Setting,
    /// The GPU probe to run for `--context-overhead=auto` (default: tessera-gpu-probe beside
    /// this program).
    #[arg(long)]
    pub gpu_probe: Option<PathBuf>,
    /// Where the NVIDIA driver keeps device-memory limits per cgroup (NVML 13.4), also give
    /// each container of a claim the claim's memory as the driver's hard limit: `auto` on every
    /// GPU whose driver has it, `off` never.
    #[arg(long, env = "TESSERA_DRIVER_MEMORY_WALL", default_value = "auto")]
    pub driver_memory_wall: crate::driver_wall::Setting,
    /// tessera-cdi-hook to install into `<state-dir>/bin` for claims' CDI specs (default: beside
    /// this program).
    #[arg(long)]
    pub cdi_hook_path: Option<PathBuf>,
    /// The driver root as the host sees it (the hook runs on the host); default: --driver-root.
    #[arg(long)]
    pub host_driver_root: Option<PathBuf>,
    /// The CUDA driver library the probe loads (default: `libcuda.so.1` beside
    /// --nvml-library, as the driver installs them).
    #[arg(long)]
    pub cuda_library: Option<PathBuf>,
    /// libtessera.so to install into `<state-dir>/lib` for containers.
    #[arg(long, default_value = "/usr/lib/tessera/libtessera.so")]
    pub shim_path: PathBuf,
    /// Whether the NVIDIA Container Toolkit provides GPUs (toolkit) or Tessera's specs do.
    #[arg(long, value_enum, default_value_t = CdiModeArg::Toolkit)]
    pub cdi_mode: CdiModeArg,
    /// Standalone mode: the root the driver's libraries are found under.
    #[arg(long, default_value = "/")]
    pub driver_root: PathBuf,
    /// Standalone mode: the root `/dev/nvidia*` nodes are found under.
    #[arg(long, default_value = "/")]
    pub dev_root: PathBuf,
    /// Address of `/metrics` and `/healthz`.
    #[arg(long, default_value = "0.0.0.0:9477")]
    pub metrics_address: SocketAddr,
    /// Who may read `/metrics`: anyone who reaches the port (none), or, over TLS, scrapers whose
    /// bearer token the API server accepts and whose user may `get` the non-resource URL
    /// `/metrics` (kubernetes; needs `create` on tokenreviews and subjectaccessreviews).
    #[arg(long, env = "TESSERA_METRICS_AUTH", value_enum, default_value_t = MetricsAuthArg::None)]
    pub metrics_auth: MetricsAuthArg,
    /// With `--metrics-auth=kubernetes`: the serving certificate (PEM, chain first) and its key;
    /// without them the plugin makes a self-signed certificate for the node at start.
    #[arg(long, requires = "metrics_tls_key_file")]
    pub metrics_tls_cert_file: Option<PathBuf>,
    #[arg(long, requires = "metrics_tls_cert_file")]
    pub metrics_tls_key_file: Option<PathBuf>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Makes socket names unique (the pod UID, from the downward API) so two instances can run
    /// during a rolling update; kubelet 1.33 or newer.
    #[arg(long, env = "POD_UID")]
    pub instance_id: Option<String>,
    /// Where this boot's ID is read: claims prepared in another boot are prepared again, since
    /// the runtime's state and the CDI directory did not survive the reboot. Only tests that
    /// simulate a reboot point it elsewhere.
    #[arg(long, default_value = "/proc/sys/kernel/random/boot_id", hide = true)]
    pub boot_id_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricsAuthArg {
    None,
    Kubernetes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CdiModeArg {
    Toolkit,
    Standalone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--sharing-mode`, checked when the flags are parsed, before anything is loaded.
fn sharing_mode(text: &str) -> Result<String, String> {
    if text == "off" {
        return Ok(text.to_owned());
    }
    text.parse::<tessera_controller::node::ModeSetting>()
        .map(|_| text.to_owned())
        .map_err(|e| format!("{e}, or off (publish no ResourceSlices)"))
}
