//! What a CUDA context costs on each GPU of this node: the device memory a process holds once it
//! has a context and has allocated nothing. The shim charges this figure per context against the
//! claim's wall, so a claim's processes cannot take more of the card than the wall says.
//!
//! Two readings, the first that works: NVML's per-process figure for this process (exact, but
//! NVML reports host PIDs, which a containerised probe without the host's PID namespace does
//! not have), else the card's used memory before, during and after the context, trusted only
//! when nothing else on the card changed meanwhile.

use std::ffi::c_int;

use serde::{Deserialize, Serialize};

use crate::driver_libs::{self, Cuda, Nvml};

/// How much the card's used memory may move by other processes while a context is measured
/// for the reading to count.
const STABLE_SLACK: u64 = 2 << 20;
/// Tries per GPU before the card is declared too busy to measure.
const ATTEMPTS: usize = 3;
/// `NVML_VALUE_NOT_AVAILABLE` for 64-bit values: what NVML reports when it cannot say.
const NOT_AVAILABLE: u64 = u64::MAX;

/// How the figure was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Method {
    /// NVML's used memory of this process.
    Process,
    /// The card's used memory with and without the context.
    Device,
}

/// One GPU's context cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    pub uuid: String,
    pub context_overhead: u64,
    pub method: Method,
}

/// A GPU that could not be measured, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub uuid: String,
    pub error: String,
}

/// Whether the driver holds a cgroup to a memory limit on one GPU (see
/// [`driver_libs::MemoryLimits`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverWall {
    pub uuid: String,
    pub supported: bool,
    /// Why not, where not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The probe's answer, one line of JSON on its standard output.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub gpus: Vec<Measurement>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Failure>,
    /// Per GPU: whether the driver's own memory wall can be set (NVML 13.4).
    #[serde(default)]
    pub driver_walls: Vec<DriverWall>,
}

/// Measures every GPU NVML lists. A GPU that fails is reported in `errors`; the others are
/// still measured.
pub fn measure_all(cuda: &Cuda, nvml: &Nvml) -> driver_libs::Result<Report> {
    let cuda_uuids = (0..cuda.device_count()?)
        .map(|ordinal| {
            let device = cuda.device(ordinal)?;
            Ok((device, cuda.uuid(device)?))
        })
        .collect::<driver_libs::Result<Vec<_>>>()?;
    let mut report = Report::default();
    for index in 0..nvml.device_count()? {
        let device = nvml.device(index)?;
        let uuid = nvml.uuid(device)?;
        let (supported, reason) = match nvml.memory_limits(device) {
            driver_libs::MemoryLimits::Supported => (true, None),
            driver_libs::MemoryLimits::Unsupported(why) => (false, Some(why)),
            driver_libs::MemoryLimits::Absent => (
                false,
                Some("NVML has no nvmlDeviceSetMemoryLimits_v1 (a driver before CUDA 13.4)".into()),
            ),
        };
        report.driver_walls.push(DriverWall {
            uuid: uuid.clone(),
            supported,
            reason,
        });
        let ordinal = driver_libs::uuid_bytes(&uuid)
            .and_then(|bytes| cuda_uuids.iter().find(|(_, b)| *b == bytes))
            .map(|(d, _)| *d);
        let result = match ordinal {
            Some(ordinal) => measure_one(cuda, nvml, device, ordinal),
            None => Err(
                "CUDA does not see this GPU (CUDA_VISIBLE_DEVICES, or a MIG-enabled card)"
                    .to_string(),
            ),
        };
        match result {
            Ok((context_overhead, method)) => report.gpus.push(Measurement {
                uuid,
                context_overhead,
                method,
            }),
            Err(error) => report.errors.push(Failure { uuid, error }),
        }
    }
    Ok(report)
}

fn measure_one(
    cuda: &Cuda,
    nvml: &Nvml,
    device: tessera_gpu_abi::nvml::nvmlDevice_t,
    ordinal: c_int,
) -> Result<(u64, Method), String> {
    let pid = std::process::id();
    for _ in 0..ATTEMPTS {
        let before = nvml.used(device).map_err(|e| e.to_string())?;
        cuda.open_primary_context(ordinal)
            .map_err(|e| format!("creating a context: {e}"))?;
        // Read while the context is live; released whatever the readings say.
        let own = nvml.compute_processes(device).ok().and_then(|list| {
            list.into_iter()
                .find(|p| p.pid == pid && p.used_gpu_memory != NOT_AVAILABLE)
        });
        let during = nvml.used(device);
        cuda.close_primary_context(ordinal)
            .map_err(|e| format!("releasing the context: {e}"))?;
        if let Some(own) = own {
            return Ok((own.used_gpu_memory, Method::Process));
        }
        let during = during.map_err(|e| e.to_string())?;
        let after = nvml.used(device).map_err(|e| e.to_string())?;
        if let Some(reading) = card_reading(before, during, after) {
            return Ok((reading, Method::Device));
        }
    }
    Err(format!(
        "the card's used memory kept changing while a context was measured ({ATTEMPTS} tries): \
         other processes are allocating; set the figure by hand (--context-overhead)"
    ))
}

/// The context's cost from the card's used memory before, during and after it, or `None` when
/// other processes changed the card meanwhile (the difference would be theirs too).
fn card_reading(before: u64, during: u64, after: u64) -> Option<u64> {
    let baseline = before.max(after);
    (before.abs_diff(after) <= STABLE_SLACK && during >= baseline).then(|| during - baseline)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_card_reading_counts_only_when_the_card_was_otherwise_still() {
        assert_eq!(
            card_reading(1000 * MIB, 1300 * MIB, 1000 * MIB),
            Some(300 * MIB)
        );
        // Another process's small churn is tolerated and never inflates the figure.
        assert_eq!(
            card_reading(1000 * MIB, 1301 * MIB, 1001 * MIB),
            Some(300 * MIB)
        );
        // Someone allocated (or freed) meanwhile: no reading.
        assert_eq!(card_reading(1000 * MIB, 1800 * MIB, 1500 * MIB), None);
        assert_eq!(card_reading(1500 * MIB, 1300 * MIB, 1000 * MIB), None);
        // A freed buffer during the context must not make the figure negative.
        assert_eq!(card_reading(1000 * MIB, 999 * MIB, 1000 * MIB), None);
    }
}
