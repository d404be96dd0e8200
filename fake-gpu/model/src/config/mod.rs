//! The fake node's hardware description: which GPUs exist and what they report.
//!
//! Read from the JSON file named by `FAKEGPU_CONFIG` (see the crate's README for the format), or
//! [`Config::default`] without one. Parsing is strict — unknown fields are rejected — because a
//! misspelt optional field silently falling back to a default would make a test pass for the
//! wrong reason. Every error names the field, and serde_json adds the line and column.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

/// The most GPUs one fake node may have: the state file has a fixed number of device records.
pub const MAX_DEVICES: usize = 16;

/// A config that could not be parsed or validated; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// The whole fake node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// What `nvmlSystemGetDriverVersion` answers, e.g. `570.86.15`.
    pub driver_version: String,
    /// What `cuDriverGetVersion` answers (1000 × major + 10 × minor), e.g. 12090.
    pub cuda_driver_version: i32,
    /// The GPUs in NVML (PCI) order.
    pub devices: Vec<Device>,
}

/// One GPU, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub uuid: Uuid,
    pub name: String,
    /// The card's memory in bytes: the physical limit every process shares.
    pub memory: u64,
    pub pci: PciAddress,
    /// `(device id << 16) | vendor id`, as `nvmlPciInfo_t.pciDeviceId` has it.
    pub pci_device_id: u32,
    pub pci_subsystem_id: u32,
    pub compute_capability: ComputeCapability,
    pub architecture: Architecture,
    pub brand: Brand,
    pub sm_count: u32,
    pub max_threads_per_sm: u32,
    pub cuda_cores: u32,
    pub managed_memory: bool,
    pub minor_number: u32,
    /// Device memory a context costs when it becomes active (0 by default, which keeps test
    /// arithmetic exact; set it to exercise a shim's handling of context overhead).
    pub context_memory: u64,
    /// `CU_DEVICE_ATTRIBUTE_CLOCK_RATE`, in kHz.
    pub clock_rate_khz: u32,
    /// Virtual time one wave of blocks holds the SMs (the fake's unit of kernel time).
    pub wave_ns: u64,
    /// Whether NVML's per-cgroup memory limits (`nvmlDeviceSetMemoryLimits_v1`, NVML 13.4) are
    /// available. Off by default: the default node models driver 570, which lacks the call.
    pub memory_limits: bool,
}

impl Config {
    /// Parses and validates a config document.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile =
            serde_json::from_str(text).map_err(|e| ConfigError::new(e.to_string()))?;
        file.resolve()
    }

    /// Reads, parses and validates a config file; the error does not repeat the path (the caller
    /// knows it and says it once).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(format!("cannot read it: {e}")))?;
        Self::from_json(&text)
    }

    /// A 64-bit digest of what processes sharing a state file must agree on: the devices'
    /// identities and capacities, in order.
    pub fn fingerprint(&self) -> u64 {
        let mut hash = Fnv1a::new();
        hash.write(&(self.devices.len() as u64).to_le_bytes());
        for device in &self.devices {
            hash.write(device.uuid.as_str().as_bytes());
            hash.write(&device.memory.to_le_bytes());
        }
        hash.finish()
    }
}

/// Without `FAKEGPU_CONFIG`: an RTX 4090 (24 GiB) and an L40S (48 GiB) with fixed UUIDs, a
/// consumer card and a data-centre card, the two kinds the product's users run.
impl Default for Config {
    fn default() -> Self {
        const DEFAULT: &str = r#"{
            "driverVersion": "570.86.15",
            "cudaDriverVersion": 12090,
            "devices": [
                {
                    "uuid": "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b",
                    "name": "NVIDIA GeForce RTX 4090",
                    "memory": 25769803776,
                    "pciBusId": "0000:01:00.0",
                    "pciDeviceId": 646189278,
                    "computeCapability": "8.9",
                    "brand": "geforce",
                    "smCount": 128,
                    "maxThreadsPerSm": 1536
                },
                {
                    "uuid": "GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d",
                    "name": "NVIDIA L40S",
                    "memory": 51539607552,
                    "pciBusId": "0000:41:00.0",
                    "pciDeviceId": 649662686,
                    "computeCapability": "8.9",
                    "brand": "nvidia",
                    "smCount": 142,
                    "maxThreadsPerSm": 1536
                }
            ]
        }"#;
        match Self::from_json(DEFAULT) {
            Ok(config) => config,
            // The literal above is covered by a unit test; this arm is unreachable in practice.
            Err(e) => unreachable!("the built-in default config is invalid: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file format. Field types parse through `serde_json::Value` so that a type error can be
// reported with the field's name (serde_json alone names only the expected type) while serde_json
// still appends the line and column.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default, deserialize_with = "driver_version")]
    driver_version: Option<DriverVersion>,
    #[serde(default, deserialize_with = "cuda_driver_version")]
    cuda_driver_version: Option<i32>,
    // Not through `named`: each device's own fields then keep their exact line.
    devices: Vec<DeviceEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DeviceEntry {
    #[serde(deserialize_with = "uuid")]
    uuid: Uuid,
    #[serde(deserialize_with = "name")]
    name: String,
    #[serde(deserialize_with = "memory")]
    memory: u64,
    #[serde(default, deserialize_with = "pci_bus_id")]
    pci_bus_id: Option<PciAddress>,
    #[serde(default, deserialize_with = "pci_device_id")]
    pci_device_id: Option<u32>,
    #[serde(default, deserialize_with = "pci_sub_system_id")]
    pci_sub_system_id: Option<u32>,
    #[serde(default, deserialize_with = "compute_capability")]
    compute_capability: Option<ComputeCapability>,
    #[serde(default, deserialize_with = "architecture")]
    architecture: Option<Architecture>,
    #[serde(default, deserialize_with = "brand")]
    brand: Option<Brand>,
    #[serde(default, deserialize_with = "sm_count")]
    sm_count: Option<u32>,
    #[serde(default, deserialize_with = "max_threads_per_sm")]
    max_threads_per_sm: Option<u32>,
    #[serde(default, deserialize_with = "cuda_cores")]
    cuda_cores: Option<u32>,
    #[serde(default, deserialize_with = "managed_memory")]
    managed_memory: Option<bool>,
    #[serde(default, deserialize_with = "minor_number")]
    minor_number: Option<u32>,
    #[serde(default, deserialize_with = "context_memory")]
    context_memory: Option<u64>,
    #[serde(default, deserialize_with = "clock_rate_khz")]
    clock_rate_khz: Option<u32>,
    #[serde(default, deserialize_with = "wave_ns")]
    wave_ns: Option<u64>,
    #[serde(default, deserialize_with = "memory_limits")]
    memory_limits: Option<bool>,
    /// The kubelet plugin's health fields: the same file is the plugin's fake inventory. The
    /// fake driver keeps serving a GPU marked unhealthy, as a real one may until it falls off
    /// the bus; withdrawing it is the plugin's job.
    #[serde(default, rename = "health")]
    _health: Option<String>,
    #[serde(default, rename = "healthReason")]
    _health_reason: Option<String>,
    /// The plugin's topology fields (what a real node reads from sysfs); NVML's fake does not
    /// report them.
    #[serde(default, rename = "pcieRoot")]
    _pcie_root: Option<String>,
    #[serde(default, rename = "numaNode")]
    _numa_node: Option<u32>,
}

/// Deserializes one field through a `Value` so the error can carry the field's name.
fn named<'de, D: Deserializer<'de>, T: DeserializeOwned>(
    field: &str,
    deserializer: D,
) -> Result<T, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    T::deserialize(value).map_err(|e| D::Error::custom(format_args!("{field}: {e}")))
}

macro_rules! field_parsers {
    ($($parser:ident: $ty:ty => $field:literal;)*) => {$(
        fn $parser<'de, D: Deserializer<'de>>(deserializer: D) -> Result<$ty, D::Error> {
            named($field, deserializer)
        }
    )*};
}

field_parsers! {
    driver_version: Option<DriverVersion> => "driverVersion";
    cuda_driver_version: Option<i32> => "cudaDriverVersion";
    uuid: Uuid => "uuid";
    name: String => "name";
    memory: u64 => "memory";
    pci_bus_id: Option<PciAddress> => "pciBusId";
    pci_device_id: Option<u32> => "pciDeviceId";
    pci_sub_system_id: Option<u32> => "pciSubSystemId";
    compute_capability: Option<ComputeCapability> => "computeCapability";
    architecture: Option<Architecture> => "architecture";
    brand: Option<Brand> => "brand";
    sm_count: Option<u32> => "smCount";
    max_threads_per_sm: Option<u32> => "maxThreadsPerSm";
    cuda_cores: Option<u32> => "cudaCores";
    managed_memory: Option<bool> => "managedMemory";
    minor_number: Option<u32> => "minorNumber";
    context_memory: Option<u64> => "contextMemory";
    clock_rate_khz: Option<u32> => "clockRateKhz";
    wave_ns: Option<u64> => "waveNs";
    memory_limits: Option<bool> => "memoryLimits";
}

impl ConfigFile {
    fn resolve(self) -> Result<Config, ConfigError> {
        if self.devices.is_empty() {
            return Err(ConfigError::new(
                "devices: a fake node needs at least one device",
            ));
        }
        if self.devices.len() > MAX_DEVICES {
            return Err(ConfigError::new(format!(
                "devices: {} devices listed, at most {MAX_DEVICES} are supported",
                self.devices.len()
            )));
        }
        let cuda_driver_version = self.cuda_driver_version.unwrap_or(12090);
        if cuda_driver_version < 2000 {
            return Err(ConfigError::new(format!(
                "cudaDriverVersion: {cuda_driver_version} is not a CUDA version \
                 (1000 * major + 10 * minor, e.g. 12090)"
            )));
        }
        let mut devices: Vec<Device> = Vec::with_capacity(self.devices.len());
        for (index, entry) in self.devices.into_iter().enumerate() {
            let device = entry.resolve(index)?;
            for (other_index, other) in devices.iter().enumerate() {
                if other.uuid == device.uuid {
                    return Err(ConfigError::new(format!(
                        "devices[{index}].uuid: {} is also devices[{other_index}]'s UUID",
                        device.uuid
                    )));
                }
                if other.pci == device.pci {
                    return Err(ConfigError::new(format!(
                        "devices[{index}].pciBusId: {} is also devices[{other_index}]'s bus id",
                        device.pci
                    )));
                }
            }
            devices.push(device);
        }
        Ok(Config {
            driver_version: self
                .driver_version
                .map(|v| v.0)
                .unwrap_or_else(|| "570.86.15".to_owned()),
            cuda_driver_version,
            devices,
        })
    }
}

impl DeviceEntry {
    fn resolve(self, index: usize) -> Result<Device, ConfigError> {
        let at = |field: &str, message: &str| {
            ConfigError::new(format!("devices[{index}].{field}: {message}"))
        };
        if self.name.is_empty() || self.name.len() >= 96 {
            return Err(at(
                "name",
                "must be 1 to 95 bytes (NVML's name buffer is 96)",
            ));
        }
        if self.memory == 0 {
            return Err(at("memory", "must be a positive number of bytes"));
        }
        let compute_capability = self
            .compute_capability
            .unwrap_or(ComputeCapability { major: 8, minor: 9 });
        let architecture = match self.architecture {
            Some(a) => a,
            None => Architecture::for_compute_capability(compute_capability).ok_or_else(|| {
                at(
                    "architecture",
                    &format!(
                        "cannot be derived from compute capability {compute_capability}; set it"
                    ),
                )
            })?,
        };
        let sm_count = self.sm_count.unwrap_or(128);
        if sm_count == 0 {
            return Err(at("smCount", "must be positive"));
        }
        let max_threads_per_sm = self.max_threads_per_sm.unwrap_or(1536);
        if max_threads_per_sm < 32 {
            return Err(at("maxThreadsPerSm", "must be at least one warp (32)"));
        }
        let pci = self.pci_bus_id.unwrap_or(PciAddress {
            domain: 0,
            bus: (index + 1) as u8,
            device: 0,
            function: 0,
        });
        Ok(Device {
            uuid: self.uuid,
            name: self.name,
            memory: self.memory,
            pci,
            pci_device_id: self.pci_device_id.unwrap_or(0x10de),
            pci_subsystem_id: self.pci_sub_system_id.unwrap_or(0),
            compute_capability,
            architecture,
            brand: self.brand.unwrap_or(Brand::Nvidia),
            sm_count,
            max_threads_per_sm,
            cuda_cores: self
                .cuda_cores
                .unwrap_or(sm_count * cores_per_sm(compute_capability)),
            managed_memory: self.managed_memory.unwrap_or(true),
            minor_number: self.minor_number.unwrap_or(index as u32),
            context_memory: self
                .context_memory
                .unwrap_or_else(|| default_context_memory(compute_capability)),
            clock_rate_khz: self.clock_rate_khz.unwrap_or(2_520_000),
            wave_ns: self.wave_ns.unwrap_or(100_000).max(1),
            memory_limits: self.memory_limits.unwrap_or(false),
        })
    }
}

/// What a context costs where the config does not say: a model, not a measurement — about what a
/// bare primary context takes with CUDA 12's lazy loading (a few hundred MiB, more on the large
/// data-centre parts). Tests whose arithmetic must be exact set `contextMemory: 0`.
pub fn default_context_memory(cc: ComputeCapability) -> u64 {
    const MIB: u64 = 1 << 20;
    if cc.major >= 9 { 512 * MIB } else { 320 * MIB }
}

/// FP32 cores per SM, what `nvmlDeviceGetNumGpuCores` multiplies by.
fn cores_per_sm(cc: ComputeCapability) -> u32 {
    match (cc.major, cc.minor) {
        (7, _) => 64,
        (8, 0) => 64,
        _ => 128,
    }
}

// ---------------------------------------------------------------------------------------------
// Field types that carry their own validation.

macro_rules! from_string {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(D::Error::custom)
            }
        }
    };
}

/// A driver version string such as `570.86.15`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DriverVersion(String);

impl FromStr for DriverVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let well_formed = !s.is_empty()
            && s.len() < 80
            && s.split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
        if well_formed {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!("{s:?} is not a driver version like \"570.86.15\""))
        }
    }
}
from_string!(DriverVersion);

/// A GPU UUID in NVIDIA's text form, `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, kept lower-case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uuid(String);

impl Uuid {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 16 bytes `cuDeviceGetUuid` returns.
    pub fn bytes(&self) -> [u8; 16] {
        let hex: Vec<u8> = self.0[4..].bytes().filter(|b| *b != b'-').collect();
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            out[i] = (hex_value(pair[0]) << 4) | hex_value(pair[1]);
        }
        out
    }
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

impl FromStr for Uuid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let groups: Vec<&str> = s
            .strip_prefix("GPU-")
            .map(|rest| rest.split('-').collect())
            .unwrap_or_default();
        let lengths_ok = groups.len() == 5
            && groups
                .iter()
                .zip([8, 4, 4, 4, 12])
                .all(|(g, n)| g.len() == n)
            && groups
                .iter()
                .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
        if lengths_ok {
            Ok(Self(format!(
                "GPU-{}",
                groups.join("-").to_ascii_lowercase()
            )))
        } else {
            Err(format!(
                "{s:?} is not a GPU UUID like \"GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b\""
            ))
        }
    }
}
from_string!(Uuid);

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A PCI address, `domain:bus:device.function` in hex; the domain may have 4 (CUDA's form) or 8
/// (NVML's form) digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    /// CUDA's form, `0000:01:00.0` (what `cuDeviceGetPCIBusId` writes).
    pub fn cuda_form(&self) -> String {
        format!(
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }

    /// NVML's form, `00000000:01:00.0` (`nvmlPciInfo_t.busId`).
    pub fn nvml_form(&self) -> String {
        format!(
            "{:08X}:{:02X}:{:02X}.{:X}",
            self.domain, self.bus, self.device, self.function
        )
    }

    /// NVML's legacy form, `0000:01:00.0` (`nvmlPciInfo_t.busIdLegacy`).
    pub fn nvml_legacy_form(&self) -> String {
        format!(
            "{:04X}:{:02X}:{:02X}.{:X}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a PCI bus id like \"0000:01:00.0\"");
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, rest) = match parts.as_slice() {
            [domain, bus, rest] => (*domain, *bus, *rest),
            [bus, rest] => ("0", *bus, *rest),
            _ => return Err(bad()),
        };
        let (device, function) = rest.split_once('.').ok_or_else(bad)?;
        let field = |text: &str, max_digits: usize| -> Result<u32, String> {
            if text.is_empty() || text.len() > max_digits {
                return Err(bad());
            }
            u32::from_str_radix(text, 16).map_err(|_| bad())
        };
        let address = Self {
            domain: field(domain, 8)?,
            bus: field(bus, 2)? as u8,
            device: field(device, 2)? as u8,
            function: field(function, 1)? as u8,
        };
        if address.device > 0x1f || address.function > 7 {
            return Err(bad());
        }
        Ok(address)
    }
}
from_string!(PciAddress);

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.cuda_form())
    }
}

/// A CUDA compute capability such as `8.9`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeCapability {
    pub major: u32,
    pub minor: u32,
}

impl FromStr for ComputeCapability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a compute capability like \"8.9\"");
        let (major, minor) = s.split_once('.').ok_or_else(bad)?;
        let parse = |t: &str| {
            if t.is_empty() || t.len() > 2 || !t.bytes().all(|b| b.is_ascii_digit()) {
                Err(bad())
            } else {
                t.parse::<u32>().map_err(|_| bad())
            }
        };
        let cc = Self {
            major: parse(major)?,
            minor: parse(minor)?,
        };
        if cc.major < 3 {
            return Err(bad());
        }
        Ok(cc)
    }
}
from_string!(ComputeCapability);

impl fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

macro_rules! named_enum {
    ($(#[$doc:meta])* $name:ident: $repr:ty, $what:literal {
        $($variant:ident = $text:literal => $value:expr,)*
    }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant,)* }

        impl $name {
            /// The name used in the config file.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text,)* }
            }

            /// The value NVML reports for it.
            pub fn nvml_value(self) -> $repr {
                match self { $(Self::$variant => $value,)* }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($text => Ok(Self::$variant),)*
                    _ => Err(format!(
                        concat!("{:?} is not ", $what, " (one of {})"),
                        s,
                        [$($text),*].join(", ")
                    )),
                }
            }
        }
        from_string!($name);
    };
}

named_enum! {
    /// A GPU architecture; its NVML value is `nvmlDeviceArchitecture_t`.
    Architecture: u32, "an architecture" {
        Kepler = "kepler" => 2,
        Maxwell = "maxwell" => 3,
        Pascal = "pascal" => 4,
        Volta = "volta" => 5,
        Turing = "turing" => 6,
        Ampere = "ampere" => 7,
        Ada = "ada" => 8,
        Hopper = "hopper" => 9,
        Blackwell = "blackwell" => 10,
    }
}

impl Architecture {
    fn for_compute_capability(cc: ComputeCapability) -> Option<Self> {
        Some(match (cc.major, cc.minor) {
            (3, _) => Self::Kepler,
            (5, _) => Self::Maxwell,
            (6, _) => Self::Pascal,
            (7, 0) | (7, 2) => Self::Volta,
            (7, 5) => Self::Turing,
            (8, 9) => Self::Ada,
            (8, _) => Self::Ampere,
            (9, _) => Self::Hopper,
            (10, _) | (12, _) => Self::Blackwell,
            _ => return None,
        })
    }
}

named_enum! {
    /// A product brand; its NVML value is `nvmlBrandType_t`.
    Brand: i32, "a brand" {
        Quadro = "quadro" => 1,
        Tesla = "tesla" => 2,
        Nvs = "nvs" => 3,
        Grid = "grid" => 4,
        Geforce = "geforce" => 5,
        Titan = "titan" => 6,
        QuadroRtx = "quadro_rtx" => 12,
        NvidiaRtx = "nvidia_rtx" => 13,
        Nvidia = "nvidia" => 14,
        GeforceRtx = "geforce_rtx" => 15,
        TitanRtx = "titan_rtx" => 16,
    }
}

/// FNV-1a: a stable hash (std's `DefaultHasher` may change between Rust releases, and processes
/// built by different toolchains share one state file).
pub(crate) struct Fnv1a(u64);

impl Fnv1a {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests;
