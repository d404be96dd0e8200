//! Tessera's kubelet plugin: it registers with the kubelet, serves the DRA gRPC services of
//! every kubelet from 1.31 on, prepares claims (config, accounting region and CDI spec) and
//! unprepares them, and exports node metrics.
//!
//! The binary (`main.rs`) parses flags and wires these modules; tests and benchmarks start the
//! same [`Plugin`] in-process with a mocked API server.
#![forbid(unsafe_code)]

pub mod claims;
pub mod cli;
pub mod context_overhead;
pub mod device_health;
pub mod driver_wall;
pub mod gpu_probe;
pub mod grpc;
pub mod h2_authority;
pub mod http;
pub mod install;
pub mod kubelet_client;
pub mod lock;
pub mod metrics;
pub mod metrics_auth;
pub mod node;
pub mod proto;
pub mod regions;
pub mod server;
pub mod slices;

pub use node::{ClaimRef, Node, NodeConfig, PreparedClaimResult, Step};

/// A node of GPUs `GPU-<index>` with these memories and nothing else known, for unit tests.
#[cfg(test)]
pub(crate) fn test_inventory(memories: &[u64]) -> tessera_driver::Inventory {
    let gpus = memories
        .iter()
        .zip(0u32..)
        .map(|(&memory, index)| tessera_driver::Gpu {
            uuid: format!("GPU-{index}"),
            index,
            minor: index,
            product_name: "test".into(),
            memory,
            brand: None,
            architecture: None,
            cuda_compute_capability: None,
            pci_bus_id: None,
            pcie_root: None,
            numa_node: None,
            context_overhead: 0,
            driver_memory_wall: false,
        })
        .collect();
    tessera_driver::Inventory {
        driver_version: None,
        gpus,
    }
}
pub use server::{Plugin, Sockets};
