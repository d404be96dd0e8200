//! `tessera-gpu-probe`, run once at start-up against the node's driver: what a CUDA context
//! costs on each GPU ([`crate::context_overhead`]) and whether the driver keeps a memory wall per
//! cgroup ([`crate::driver_wall`]). A separate program because creating a context needs
//! `unsafe` FFI and leaves state in the process that the long-lived plugin should not carry.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use tessera_node_tools::context_probe::Report;

/// How long the probe may take: creating a context on a busy or failing GPU can hang.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the probe runs against which driver.
pub struct Probe<'a> {
    pub program: &'a Path,
    /// `libnvidia-ml.so.1`; `None`: the loader's.
    pub nvml_library: Option<&'a Path>,
    /// `libcuda.so.1`; `None`: beside `nvml_library`.
    pub cuda_library: Option<&'a Path>,
}

/// The program beside this one, as the image and a build directory both have it.
pub fn beside_this_program(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The probe's report, or why there is none.
pub async fn run(probe: &Probe<'_>) -> Result<Report, String> {
    let mut command = tokio::process::Command::new(probe.program);
    if let Some(nvml) = probe.nvml_library {
        command.arg("--nvml-library").arg(nvml);
    }
    if let Some(cuda) = probe.cuda_library {
        command.arg("--cuda-library").arg(cuda);
    }
    // Every GPU, measured bare: not a subset, and never through a shim.
    command
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("LD_PRELOAD")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(PROBE_TIMEOUT, command.output()).await {
        Err(_) => {
            return Err(format!(
                "{} took over {} s",
                probe.program.display(),
                PROBE_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(e)) => return Err(format!("cannot run {}: {e}", probe.program.display())),
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "{} failed ({}): {}",
            probe.program.display(),
            output.status,
            stderr.trim()
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| {
        format!(
            "{} printed no report: {e}: {:?}",
            probe.program.display(),
            String::from_utf8_lossy(&output.stdout)
        )
    })
}
