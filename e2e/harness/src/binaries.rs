//! Where the control-plane binaries of a version live, and a check that they
//! are the version asked for.
//!
//! Lookup order: `TESSERA_K8S_BIN_DIR` (one directory, for whichever version
//! is asked; a version mismatch is reported as missing binaries), then
//! `${TESSERA_CACHE:-$HOME/.cache/tessera}/k8s/v1.<minor>/bin`, which is where
//! `e2e/scripts/build-k8s.sh` puts them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::versions::K8sVersion;

/// The four components, as names of executables in the bin directory (the
/// build script makes them symlinks to one multi-call binary; separately
/// built upstream binaries work as well).
pub const COMPONENTS: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// A checked set of binaries for one version.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub version: K8sVersion,
    pub dir: PathBuf,
    /// What `kube-apiserver --version` prints, e.g. `Kubernetes v1.37.1`.
    pub version_string: String,
}

impl Binaries {
    /// Finds and checks the binaries for `version` in the default place.
    pub fn locate(version: K8sVersion) -> Result<Self> {
        Self::locate_in(version, &default_dir(version))
    }

    /// Checks that `dir` holds all four components built for `version`.
    pub fn locate_in(version: K8sVersion, dir: &Path) -> Result<Self> {
        let missing = |reason: String| Error::MissingBinaries {
            version: version.to_string(),
            dir: dir.to_owned(),
            reason,
            hint: build_hint(version),
        };
        for name in COMPONENTS {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(missing(format!("{name} is missing")));
            }
        }
        let apiserver = dir.join("kube-apiserver");
        let output = Command::new(&apiserver)
            .arg("--version")
            .output()
            .map_err(|e| missing(format!("cannot run {}: {e}", apiserver.display())))?;
        let version_string = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success() {
            return Err(missing(format!(
                "`kube-apiserver --version` failed: {}",
                output.status
            )));
        }
        let reported = version_string
            .split_whitespace()
            .last()
            .and_then(|v| v.parse::<K8sVersion>().ok());
        if reported != Some(version) {
            return Err(missing(format!(
                "binaries report {version_string:?}, not {version}"
            )));
        }
        Ok(Binaries {
            version,
            dir: dir.to_owned(),
            version_string,
        })
    }

    /// The binaries of `version` for a test named `test`, gated by `TESSERA_E2E` as every test of
    /// the workspace is (`tessera_built_libs::require`): `1` makes missing binaries a failure,
    /// `0` skips, unset runs when they are built and otherwise prints why it skips.
    pub fn for_test(version: K8sVersion, test: &str) -> Option<Binaries> {
        let located = Self::locate(version);
        let missing = located.as_ref().err().map(ToString::to_string);
        tessera_built_libs::require(test, located.is_ok(), || missing.unwrap_or_default())?;
        located.ok()
    }

    pub fn path(&self, component: &str) -> PathBuf {
        self.dir.join(component)
    }
}

/// The Tessera cache root shared with the build script.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESSERA_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("tessera")
}

/// Where the binaries of `version` are expected.
pub fn default_dir(version: K8sVersion) -> PathBuf {
    match std::env::var_os("TESSERA_K8S_BIN_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => cache_root()
            .join("k8s")
            .join(version.dir_name())
            .join("bin"),
    }
}

fn build_hint(version: K8sVersion) -> String {
    format!("e2e/scripts/build-k8s.sh e2e/k8s/{}", version.dir_name())
}
