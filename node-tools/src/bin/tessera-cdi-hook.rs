//! `tessera-cdi-hook`: the OCI hook a claim's CDI spec runs as each of its containers is created
//! (`createRuntime`: in the runtime's namespaces, once the container's cgroup exists and before
//! any of its code runs). It sets the driver's own memory wall (NVML 13.4,
//! `nvmlDeviceSetMemoryLimits_v1`) on the container's cgroup for each of the claim's GPUs, so a
//! program that never loads the shim (a static binary, `dlmopen`, a scrubbed environment) still
//! stops at the claim's limit.
//!
//! Its inputs are the runtime's state on standard input (the container's PID) and the arguments
//! the kubelet plugin wrote into the spec; nothing a container wrote.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use tessera_node_tools::driver_libs::{self, Nvml};

const USAGE: &str = "usage: tessera-cdi-hook memory-limit --driver-root DIR [--nvml-library PATH] --limit GPU-UUID=BYTES...

Reads the OCI state of a container being created from standard input and sets the NVIDIA
driver's hard memory limit of each GPU on the container's cgroup.
--driver-root   the host's driver root, searched for libnvidia-ml.so.1
--nvml-library  libnvidia-ml.so.1 to load (instead of searching --driver-root)
--limit         a GPU and the claim's memory on it, in bytes (repeatable)";

/// Library directories of the driver's installs, as the chart's start script searches them.
const LIBRARY_DIRS: &[&str] = &[
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
];

/// The state a runtime hands a hook is a small JSON document; more is not a runtime's.
const MAX_STATE: u64 = 1 << 20;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tessera-cdi-hook: {error:#}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    driver_root: Option<PathBuf>,
    nvml_library: Option<PathBuf>,
    limits: Vec<(String, u64)>,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut args = std::env::args_os().skip(1);
    match args.next().as_deref().and_then(|a| a.to_str()) {
        Some("memory-limit") => {}
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return Ok(None);
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
    let mut parsed = Args {
        driver_root: None,
        nvml_library: None,
        limits: Vec::new(),
    };
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value\n{USAGE}"))
        };
        match arg.to_str() {
            Some("--driver-root") => parsed.driver_root = Some(value("--driver-root")?.into()),
            Some("--nvml-library") => parsed.nvml_library = Some(value("--nvml-library")?.into()),
            Some("--limit") => {
                let text = value("--limit")?;
                let text = text.to_str().context("--limit is not UTF-8")?;
                let (uuid, bytes) = text
                    .split_once('=')
                    .with_context(|| format!("--limit {text:?}: expected GPU-UUID=BYTES"))?;
                let bytes = bytes
                    .parse::<u64>()
                    .with_context(|| format!("--limit {text:?}: {bytes:?} is not a byte count"))?;
                parsed.limits.push((uuid.to_string(), bytes));
            }
            _ => bail!("unknown argument {arg:?}\n{USAGE}"),
        }
    }
    if parsed.limits.is_empty() {
        bail!("no --limit given\n{USAGE}");
    }
    Ok(Some(parsed))
}

fn run() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let mut state = String::new();
    std::io::stdin()
        .take(MAX_STATE)
        .read_to_string(&mut state)
        .context("reading the container's state from standard input")?;
    let pid = container_pid(&state)?;
    let cgroups = driver_libs::cgroup_dirs_of(pid)
        .with_context(|| format!("finding the cgroups of the container's process {pid}"))?;
    let library = match (&args.nvml_library, &args.driver_root) {
        (Some(path), _) => path.clone(),
        (None, Some(root)) => find_nvml(root)?,
        (None, None) => PathBuf::from("libnvidia-ml.so.1"),
    };
    let nvml = Nvml::open(&library)?;
    for (uuid, bytes) in &args.limits {
        let device = nvml
            .device_by_uuid(uuid)
            .with_context(|| format!("GPU {uuid}"))?;
        // Set on every cgroup directory of the container that takes it (a hybrid host has
        // two); the wall holds if one does.
        let mut refused = Vec::new();
        for cgroup in &cgroups {
            if let Err(error) = nvml.set_hard_limit(device, cgroup, *bytes) {
                refused.push(format!("{}: {error}", cgroup.display()));
            }
        }
        if refused.len() == cgroups.len() {
            bail!(
                "setting GPU {uuid}'s memory limit of {bytes} bytes on the container's cgroups: {}",
                refused.join("; ")
            );
        }
    }
    Ok(())
}

/// The `pid` of an OCI state document.
fn container_pid(state: &str) -> anyhow::Result<u32> {
    let value: serde_json::Value =
        serde_json::from_str(state).context("the container's state is not JSON")?;
    value
        .get("pid")
        .and_then(serde_json::Value::as_u64)
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|pid| *pid > 0)
        .context("the container's state has no pid (is this hook run as createRuntime?)")
}

fn find_nvml(root: &Path) -> anyhow::Result<PathBuf> {
    LIBRARY_DIRS
        .iter()
        .map(|dir| root.join(dir).join("libnvidia-ml.so.1"))
        .find(|path| path.exists())
        .with_context(|| {
            format!(
                "no libnvidia-ml.so.1 under the driver root {} ({})",
                root.display(),
                LIBRARY_DIRS.join(", ")
            )
        })
}
