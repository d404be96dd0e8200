//! The simulated GPU node behind Tessera's fake `libcuda.so.1` and `libnvidia-ml.so.1`.
//!
//! Both fake libraries load the same [`Config`] (which GPUs exist), and map the same state file
//! ([`state::Region`]) so that every process on the "node" shares one physical memory budget per
//! card, the way processes share a real GPU. [`visible`] applies `CUDA_VISIBLE_DEVICES` for the
//! CUDA side; [`events`] is the log of injected XID errors the fake NVML's event sets read;
//! [`cgroup`] and [`state::limits`] model NVML 13.4's per-cgroup device-memory limits.
//! Nothing here is `extern "C"`: the libraries own the ABI.

pub mod cgroup;
pub mod config;
pub mod events;
pub mod node;
pub mod state;
pub mod visible;

pub use cgroup::CgroupSet;
pub use config::{Config, ConfigError, Device, MAX_DEVICES};
pub use events::{EVENTS_ENV, events_path_from_env};
pub use node::{
    CONFIG_ENV, DEFAULT_STATE_PATH, Error, STATE_ENV, config_from_env, open_region,
    state_path_from_env,
};
pub use state::limits::{CgroupDir, CgroupDirError, LimitError, MemoryLimit, NO_LIMIT};
pub use state::{Lease, OutOfMemory, ProcessUsage, Region, StateError};
pub use visible::visible_devices;
