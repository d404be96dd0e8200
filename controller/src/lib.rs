//! Tessera's ResourceSlices and cluster controller.
//!
//! - [`slices`]: pure building of a node's pool for each sharing mode and API version;
//! - [`publish`]: writing a pool to the API server and reading it back;
//! - [`discovery`]: which `resource.k8s.io` version the server serves;
//! - [`node`]: the per-node slice controller that runs inside `tessera-kubelet-plugin`;
//! - [`cluster`]: the `tessera-controller` Deployment's DeviceClasses and metrics.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod cluster;
pub mod discovery;
pub mod node;
pub mod publish;
pub mod slices;

pub use slices::{ApiVersion, CounterLayout, PoolPlan, SharingMode};
