//! Tessera's contracts: the names the scheduler and users see, the opaque claim config, the
//! shim's config file, the layout of the per-claim accounting region, and the formats
//! `/metrics` answers in.
//!
//! Everything here is shared between processes that are built and upgraded separately (the
//! kubelet plugin on the host, the shim inside arbitrary container images), so every format is
//! versioned and documented in `docs/reference/`.

pub mod board;
pub mod claim_config;
pub mod error_chain;
pub mod exposition;
pub mod memory_board;
pub mod names;
pub mod region;
pub mod shim_config;

pub use claim_config::{CorePolicy, GpuConfig, Priority};
pub use shim_config::{ShimConfig, ShimDevice};
