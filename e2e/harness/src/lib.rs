//! A real upstream Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler) on loopback, for Tessera's e2e tests.
//!
//! The binaries come from `e2e/scripts/build-k8s.sh`, one multi-call binary per
//! pinned Kubernetes version. Layers, bottom up:
//! - [`versions`]: what differs per Kubernetes minor (DRA API version, gates);
//! - [`binaries`]: where the binaries of a version are and whether they fit;
//! - [`certs`] and [`kubeconfig`]: the PKI and the credentials written to disk;
//! - [`process`]: one component as a child in its own process group, with its log;
//! - [`controlplane`]: starts, checks and stops the whole control plane.
//!
//! - [`cluster`]: the control plane plus simulated GPU nodes (a kubelet plugin and a
//!   kubelet stand-in each, on a fake GPU inventory) and `tessera-controller`.
//! - [`realnode`]: a real node for a control plane: containerd 2 with runc and CDI, and the
//!   upstream kubelet.

pub mod binaries;
pub mod certs;
pub mod cluster;
pub mod controlplane;
pub mod demo;
pub mod error;
pub mod images;
pub mod kubeconfig;
pub mod ports;
pub mod process;
pub mod promtool;
pub mod readiness;
pub mod realnode;
pub mod state;
pub mod versions;
pub mod workloads;

pub use controlplane::{ControlPlane, ControlPlaneOptions};
pub use error::{Error, Result};
pub use versions::K8sVersion;

/// A `tracing` filter for binaries and tests using the harness: kube-client
/// logs every failed request at ERROR, and polling a starting server fails
/// on purpose many times.
pub const DEFAULT_LOG_FILTER: &str = "info,kube_client::client::builder=off";
