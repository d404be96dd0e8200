//! The layout of a control plane's state directory, and the record
//! (`cluster.json`) that lets `tessera-cluster status|down` find a control
//! plane started by an earlier `up`.
//!
//! ```text
//! <state>/cluster.json    what runs where (this module's ClusterRecord)
//! <state>/kubeconfig      admin credentials
//! <state>/pki/            CA, certificates, service-account key
//! <state>/etcd/           etcd data
//! <state>/logs/<component>.log
//! <state>/run/<component>.pid
//! <state>/<component>.kubeconfig
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Paths inside one state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Uses `root` (created if needed). The path is made absolute because it
    /// is handed to components and written into kubeconfigs.
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(Error::io(root, "creating state directory"))?;
        let root =
            std::fs::canonicalize(root).map_err(Error::io(root, "resolving state directory"))?;
        let dir = StateDir { root };
        for sub in [dir.logs(), dir.run(), dir.pki(), dir.etcd()] {
            std::fs::create_dir_all(&sub)
                .map_err(Error::io(&sub, "creating state subdirectory"))?;
        }
        Ok(dir)
    }

    /// Opens an existing state directory without creating anything.
    pub fn open(root: &Path) -> Result<Self> {
        let root =
            std::fs::canonicalize(root).map_err(Error::io(root, "opening state directory"))?;
        Ok(StateDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn etcd(&self) -> PathBuf {
        self.root.join("etcd")
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }
    pub fn component_kubeconfig(&self, component: &str) -> PathBuf {
        self.root.join(format!("{component}.kubeconfig"))
    }
    pub fn log(&self, component: &str) -> PathBuf {
        self.logs().join(format!("{component}.log"))
    }
    pub fn pid_file(&self, component: &str) -> PathBuf {
        self.run().join(format!("{component}.pid"))
    }
    pub fn record(&self) -> PathBuf {
        self.root.join("cluster.json")
    }

    /// Text that occurs in the command line of every component started for
    /// this directory (they all get paths inside it), used to recognise them.
    pub fn owner_marker(&self) -> String {
        self.root.to_string_lossy().into_owned()
    }

    pub fn write_record(&self, record: &ClusterRecord) -> Result<()> {
        let path = self.record();
        let text = serde_json::to_string_pretty(record).map_err(|e| Error::State {
            dir: self.root.clone(),
            reason: format!("serialising cluster.json: {e}"),
        })?;
        std::fs::write(&path, text).map_err(Error::io(&path, "writing"))
    }

    pub fn read_record(&self) -> Result<ClusterRecord> {
        let path = self.record();
        let text = std::fs::read_to_string(&path)
            .map_err(Error::io(&path, "reading (was `up` run here?)"))?;
        serde_json::from_str(&text).map_err(|e| Error::State {
            dir: self.root.clone(),
            reason: format!("cluster.json does not parse: {e}"),
        })
    }
}

/// What a started control plane looks like from outside.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    /// e.g. `v1.37`.
    pub version: String,
    /// e.g. `Kubernetes v1.37.1`.
    pub version_string: String,
    pub server: String,
    pub kubeconfig: PathBuf,
    pub components: Vec<ComponentRecord>,
    /// Real nodes left running (their processes are among `components`): what
    /// `tessera-cluster down` cleans up besides stopping processes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub real_nodes: Vec<RealNodeRecord>,
}

/// A real node left running by `tessera-cluster up`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RealNodeRecord {
    pub name: String,
    /// `$TMPDIR/tessera-node-<name>`: containerd's and the kubelet's directories, mounts below.
    pub root: PathBuf,
    /// The kubelet's cgroup root (`/tessera-e2e-…`), in every hierarchy.
    pub cgroup: Option<String>,
    /// Its containerd shims name it on their command lines.
    pub containerd_socket: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComponentRecord {
    pub name: String,
    pub pid: i32,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    /// The URL of its health endpoint.
    pub health: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::create(dir.path()).expect("state");
        let record = ClusterRecord {
            version: "v1.37".into(),
            version_string: "Kubernetes v1.37.1".into(),
            server: "https://127.0.0.1:1234".into(),
            kubeconfig: state.kubeconfig(),
            components: vec![ComponentRecord {
                name: "etcd".into(),
                pid: 42,
                log: state.log("etcd"),
                pid_file: state.pid_file("etcd"),
                health: "http://127.0.0.1:2379/health".into(),
            }],
            real_nodes: vec![RealNodeRecord {
                name: "127.1.2.3".into(),
                root: "/tmp/tessera-node-127.1.2.3".into(),
                cgroup: Some("/tessera-e2e-1-127-1-2-3".into()),
                containerd_socket: "/tmp/tessera-node-127.1.2.3/containerd/containerd.sock".into(),
            }],
        };
        state.write_record(&record).expect("write");
        assert_eq!(state.read_record().expect("read"), record);
        assert!(state.pki().is_dir() && state.logs().is_dir() && state.run().is_dir());
    }
}
