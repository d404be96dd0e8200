//! Names published to Kubernetes: the driver, device attributes and capacities.

/// The DRA driver name, also the suffix of every DeviceClass Tessera creates.
pub const DRIVER_NAME: &str = "gpu.tessera.dev";

/// API group and version of the opaque claim configuration.
pub const CONFIG_API_VERSION: &str = "gpu.tessera.dev/v1alpha1";
/// Kind of the opaque claim configuration.
pub const CONFIG_KIND: &str = "GpuConfig";

/// Device attributes, named as NVIDIA's DRA driver names them so existing CEL carries over.
pub mod attribute {
    pub const UUID: &str = "uuid";
    pub const PRODUCT_NAME: &str = "productName";
    pub const BRAND: &str = "brand";
    pub const ARCHITECTURE: &str = "architecture";
    pub const CUDA_COMPUTE_CAPABILITY: &str = "cudaComputeCapability";
    pub const DRIVER_VERSION: &str = "driverVersion";
    pub const INDEX: &str = "index";
    pub const MINOR: &str = "minor";
    /// `true` where the NVIDIA driver itself also holds each claim's containers to the claim's
    /// memory (NVML 13.4 per-cgroup limits), so programs that bypass the shim stop there too.
    pub const DRIVER_MEMORY_WALL: &str = "driverMemoryWall";
    pub const PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";
    /// The PCIe root complex (`pci0000:00`), standard since 1.33.
    pub const PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
    /// The NUMA node (int), standard since 1.37; absent where the GPU has no affinity.
    pub const NUMA_NODE: &str = "resource.kubernetes.io/numaNode";
    /// The node's memory overcommit factor on this GPU, in percent (150 = 1.5× the physical
    /// memory is offered); published only on GPUs whose factor is above 1.
    pub const MEMORY_OVERCOMMIT_PERCENT: &str = "memoryOvercommitPercent";
}

/// Device capacities.
pub mod capacity {
    /// Device memory in bytes.
    pub const MEMORY: &str = "memory";
    /// Compute share; 100 is the whole GPU.
    pub const CORES: &str = "cores";
}

/// Environment variable naming the shim's config file inside a container.
pub const SHIM_CONFIG_ENV: &str = "TESSERA_CONFIG";
/// Where the shim looks when `TESSERA_CONFIG` is unset, so processes that drop their environment
/// (sshd sessions, `env -i`) are limited too.
pub const SHIM_CONFIG_DEFAULT_PATH: &str = "/etc/tessera/config.json";

/// Namespace label with which the cluster admin lets the claims of a namespace ask for
/// `priority: high` in their own config (`"true"`). A claim elsewhere gets high priority only from
/// a DeviceClass's config, which the admin writes; tenants cannot label their namespaces.
pub const HIGH_PRIORITY_NAMESPACE_LABEL: &str = "gpu.tessera.dev/allow-high-priority";
