//! Which of the claim's devices a CUDA ordinal is.
//!
//! Ordinals depend on `CUDA_VISIBLE_DEVICES` and differ between processes; the claim names GPUs
//! by UUID. After `cuInit` the shim asks the driver for every visible device's UUID once and
//! keeps an ordinal → claim-device table in atomics.

use std::sync::atomic::{AtomicU8, Ordering};

use tessera_gpu_abi::cuda::{CUDA_SUCCESS, CUuuid};

use crate::real;

/// Ordinals the table covers; larger ones are treated as not granted.
const MAX_ORDINALS: usize = 64;
/// Table value: not looked up yet.
const UNMAPPED: u8 = 0xff;
/// Table value: a visible device that is not part of the claim.
const NOT_GRANTED: u8 = 0xfe;

static ORDINALS: [AtomicU8; MAX_ORDINALS] = [const { AtomicU8::new(UNMAPPED) }; MAX_ORDINALS];

/// Where an ordinal stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Index into the claim's devices.
    Claim(usize),
    /// Visible but not part of the claim: nothing may be allocated on it.
    NotGranted,
}

/// The claim device for `ordinal`, mapping it on first use. `uuids` are the claim's devices.
pub fn grant(ordinal: i32, uuids: &[String]) -> Grant {
    let Ok(slot) = usize::try_from(ordinal) else {
        return Grant::NotGranted;
    };
    let Some(entry) = ORDINALS.get(slot) else {
        return Grant::NotGranted;
    };
    let mut value = entry.load(Ordering::Relaxed);
    if value == UNMAPPED {
        value = map_one(ordinal, uuids);
        entry.store(value, Ordering::Relaxed);
    }
    match value {
        NOT_GRANTED | UNMAPPED => Grant::NotGranted,
        index => Grant::Claim(index as usize),
    }
}

fn map_one(ordinal: i32, uuids: &[String]) -> u8 {
    // The v2 call is CUDA 13's only spelling; the v1 symbol is kept for older drivers.
    let Some(get_uuid) = real::cuda::cuDeviceGetUuid_v2
        .get()
        .or_else(|| real::cuda::cuDeviceGetUuid.get())
    else {
        return UNMAPPED;
    };
    let mut uuid = CUuuid::default();
    // SAFETY: real driver call with a valid out-pointer; the CUdevice of ordinal N is N.
    if unsafe { get_uuid(&mut uuid, ordinal) } != CUDA_SUCCESS {
        // Not initialised yet, or a bad ordinal: look again next time.
        return UNMAPPED;
    }
    let text = format_uuid(&uuid);
    match uuids.iter().position(|u| u.eq_ignore_ascii_case(&text)) {
        Some(index) => index as u8,
        None => NOT_GRANTED,
    }
}

/// Forgets every mapping (after `fork`, the child re-initialises the driver).
pub fn reset() {
    for entry in &ORDINALS {
        entry.store(UNMAPPED, Ordering::Relaxed);
    }
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as `nvidia-smi` and NVML print it.
pub fn format_uuid(uuid: &CUuuid) -> String {
    let b = &uuid.bytes;
    let hex = |range: std::ops::Range<usize>| {
        b[range]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    format!(
        "GPU-{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_nvml() {
        let uuid = CUuuid {
            bytes: [
                0x8e, 0x1b, 0x1c, 0x4f, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xa, 0xb,
            ],
        };
        assert_eq!(
            format_uuid(&uuid),
            "GPU-8e1b1c4f-0001-0203-0405-060708090a0b"
        );
    }
}
