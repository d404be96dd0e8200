//! Tessera's own programs and libraries, as `cargo build --workspace` leaves them.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `TESSERA_BIN_DIR`, else the directory of the running executable (`<target>/debug` for
/// `tessera-cluster`, its parent for a test binary in `deps/`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESSERA_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        return dir.parent().map(Path::to_path_buf).unwrap_or(dir);
    }
    dir
}

/// Paths of everything a simulated node and the cluster controller run.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kubelet_plugin: PathBuf,
    pub gpu_probe: PathBuf,
    pub kubelet_standin: PathBuf,
    pub controller: PathBuf,
    pub gpu_worker: PathBuf,
    pub fake_cuda: PathBuf,
    pub fake_nvml: PathBuf,
    pub shim: PathBuf,
}

impl Artifacts {
    pub fn locate(dir: &Path) -> Result<Artifacts> {
        let find = |name: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::State {
                    dir: dir.to_owned(),
                    reason: format!(
                        "{name} is not built there: run `cargo build --workspace` (make test and make cluster-up do), or point TESSERA_BIN_DIR at the build"
                    ),
                })
            }
        };
        Ok(Artifacts {
            kubelet_plugin: find("tessera-kubelet-plugin")?,
            gpu_probe: find("tessera-gpu-probe")?,
            kubelet_standin: find("tessera-kubelet-standin")?,
            controller: find("tessera-controller")?,
            gpu_worker: find("tessera-gpu-worker")?,
            fake_cuda: find("libcuda.so")?,
            fake_nvml: find("libnvidia_ml.so")?,
            shim: find("libtessera.so")?,
        })
    }
}
