//! Standalone mode: the device nodes and driver libraries that the NVIDIA Container Toolkit
//! would otherwise provide, found once at start-up under a driver root.
//!
//! Libraries are mounted at the path they have under the driver root (e.g.
//! `/usr/lib/x86_64-linux-gnu/libcuda.so.1`), by soname, from the real file behind the soname
//! link. Debian, Ubuntu and RHEL-family images search those directories by default, so no
//! `ldconfig` hook is needed for images of the host's family.

use std::path::{Path, PathBuf};

use super::spec::{DeviceNode, Mount};

/// Library directories searched under the driver root, in order; the first hit of a soname wins.
const LIBRARY_DIRS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "lib/x86_64-linux-gnu",
    "lib64",
    "usr/lib",
    "lib",
];

/// Driver user-space libraries by soname; `libcuda.so.1` is required, the rest optional.
const LIBRARIES: &[&str] = &[
    "libcuda.so.1",
    "libnvidia-ml.so.1",
    "libnvidia-ptxjitcompiler.so.1",
    "libnvidia-nvvm.so.4",
    "libcudadebugger.so.1",
    "libnvidia-allocator.so.1",
    "libnvidia-cfg.so.1",
    "libnvidia-opencl.so.1",
];

/// Driver tools, mounted where they are under the driver root when present.
const BINARIES: &[&str] = &["usr/bin/nvidia-smi", "usr/bin/nvidia-debugdump"];

/// Device nodes every GPU container needs besides its GPUs' own.
const CONTROL_NODES: &[&str] = &["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"];

/// What standalone mode adds to every claim's spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverFiles {
    /// Where device nodes are on the host (`/` normally; another root for tests).
    pub dev_root: PathBuf,
    /// `/dev/nvidiactl`, `/dev/nvidia-uvm`, … that exist.
    pub control_nodes: Vec<DeviceNode>,
    /// Library and tool mounts.
    pub mounts: Vec<Mount>,
}

/// Why standalone mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("no libcuda.so.1 under driver root {0} (searched {dirs})", dirs = LIBRARY_DIRS.join(", "))]
    NoDriver(String),
    #[error("device node {0} does not exist")]
    NoDeviceNode(String),
}

impl DriverFiles {
    /// Finds the driver's files under `driver_root` and device nodes under `dev_root`.
    pub fn discover(driver_root: &Path, dev_root: &Path) -> Result<DriverFiles, StandaloneError> {
        let mut mounts = Vec::new();
        for soname in LIBRARIES {
            let found = LIBRARY_DIRS.iter().find_map(|dir| {
                let candidate = driver_root.join(dir).join(soname);
                // canonicalize resolves the soname link to the versioned file (and fails for a
                // dangling link, which is skipped like an absent one).
                candidate
                    .canonicalize()
                    .ok()
                    .map(|real| (format!("/{dir}/{soname}"), real))
            });
            match found {
                Some((container, real)) => {
                    mounts.push(Mount::read_only(real.display().to_string(), container))
                }
                None if *soname == "libcuda.so.1" => {
                    return Err(StandaloneError::NoDriver(driver_root.display().to_string()));
                }
                None => {}
            }
        }
        for binary in BINARIES {
            if let Ok(real) = driver_root.join(binary).canonicalize() {
                mounts.push(Mount::read_only(
                    real.display().to_string(),
                    format!("/{binary}"),
                ));
            }
        }
        let files = DriverFiles {
            dev_root: dev_root.to_path_buf(),
            control_nodes: Vec::new(),
            mounts,
        };
        let control_nodes = CONTROL_NODES
            .iter()
            .filter(|path| files.host_node(path).exists())
            .map(|path| files.node(path))
            .collect();
        Ok(DriverFiles {
            control_nodes,
            ..files
        })
    }

    /// Checks that the GPU node for `minor` exists, so a missing node fails the prepare call
    /// with its name instead of the container start with a runtime error.
    pub fn check_gpu_node(&self, minor: u32) -> Result<(), StandaloneError> {
        let path = format!("/dev/nvidia{minor}");
        if self.host_node(&path).exists() {
            Ok(())
        } else {
            Err(StandaloneError::NoDeviceNode(
                self.host_node(&path).display().to_string(),
            ))
        }
    }

    /// `/dev/nvidia<minor>`.
    pub fn gpu_node(&self, minor: u32) -> DeviceNode {
        self.node(&format!("/dev/nvidia{minor}"))
    }

    fn host_node(&self, path: &str) -> PathBuf {
        self.dev_root.join(path.trim_start_matches('/'))
    }

    fn node(&self, path: &str) -> DeviceNode {
        // hostPath only when it differs: it raises the spec's minimum CDI version to 0.5.0.
        let host_path =
            (self.dev_root != Path::new("/")).then(|| self.host_node(path).display().to_string());
        DeviceNode {
            path: path.to_string(),
            host_path,
            permissions: Some("rw".into()),
        }
    }
}
