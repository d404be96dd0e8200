//! Device names, and the limits a name stands for.
//!
//! A device name alone (plus the node's inventory) says which GPU a device is and what share of
//! it the device gives, so preparing a claim never reads ResourceSlices: the controller publishes
//! exactly the capacity [`DeviceName::limits`] computes, from the same function.
//!
//! | name | mode | GPU | memory | cores |
//! |---|---|---|---|---|
//! | `gpu-<i>` | exclusive, consumable | index `i` | all (consumable: the consumed capacity) | 100 (consumable: consumed) |
//! | `gpu-<i>-slice-<n>of<m>` | fixed, partitioned | index `i` | ⌊memory / m⌋, rounded down to a MiB | ⌊100 / m⌋, at least 1 |
//! | `gpu-<i>-mem-<MiB>mi-<n>` | partitioned by size | index `i` | `<MiB>` MiB | share of the card's memory, rounded up, 1–100 |
//!
//! `n` numbers the devices of one shape on one GPU from 0. Names are DNS labels (at most 63
//! lowercase characters), as the API requires.

use std::fmt;

use crate::inventory::Gpu;

const MIB: u64 = 1 << 20;

/// A parsed device name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceName {
    /// `gpu-<index>`: the whole GPU, or in consumable mode the GPU that shares are taken from.
    Whole { index: u32 },
    /// `gpu-<index>-slice-<n>of<m>`: slice `n` of `m` equal slices.
    Slice { index: u32, n: u32, of: u32 },
    /// `gpu-<index>-mem-<mib>mi-<n>`: the `n`th device of `mib` MiB on the GPU.
    Memory { index: u32, mib: u64, n: u32 },
}

/// What a device gives on its GPU when nothing else (consumed capacity) says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceShare {
    pub memory: u64,
    pub cores: u32,
}

/// A name that is not one of Tessera's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "device name {name:?} is not a Tessera device name (gpu-<i>, gpu-<i>-slice-<n>of<m>, gpu-<i>-mem-<MiB>mi-<n>): {why}"
)]
pub struct ParseError {
    pub name: String,
    pub why: &'static str,
}

impl DeviceName {
    /// Parses a device name.
    pub fn parse(name: &str) -> Result<DeviceName, ParseError> {
        let err = |why| ParseError {
            name: name.to_string(),
            why,
        };
        let rest = name
            .strip_prefix("gpu-")
            .ok_or_else(|| err("no gpu- prefix"))?;
        let mut parts = rest.split('-');
        let index = number(parts.next()).ok_or_else(|| err("bad GPU index"))?;
        let parsed = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (None, ..) => DeviceName::Whole { index },
            (Some("slice"), Some(shape), None, _) => {
                let (n, of) = shape
                    .split_once("of")
                    .ok_or_else(|| err("slice without <n>of<m>"))?;
                let (n, of) = (number(Some(n)), number(Some(of)));
                match (n, of) {
                    (Some(n), Some(of)) if (1..=100).contains(&of) && n < of => {
                        DeviceName::Slice { index, n, of }
                    }
                    _ => return Err(err("slice needs 0 <= n < m <= 100")),
                }
            }
            (Some("mem"), Some(size), Some(n), None) => {
                let mib = size.strip_suffix("mi").and_then(|s| number(Some(s)));
                match (mib, number(Some(n))) {
                    (Some(mib), Some(n)) if mib > 0 => DeviceName::Memory {
                        index,
                        mib: mib.into(),
                        n,
                    },
                    _ => return Err(err("mem needs <MiB>mi-<n> with MiB > 0")),
                }
            }
            _ => return Err(err("unknown shape")),
        };
        // Only the canonical spelling (no leading zeros) is ours, so a name maps to one device.
        if parsed.to_string() != name {
            return Err(err("not in canonical form"));
        }
        Ok(parsed)
    }

    /// The GPU index the device lives on.
    pub fn gpu_index(&self) -> u32 {
        match *self {
            DeviceName::Whole { index }
            | DeviceName::Slice { index, .. }
            | DeviceName::Memory { index, .. } => index,
        }
    }

    /// The memory and cores this device gives on `gpu`; `None` if the device does not fit it
    /// (a `mem` device larger than the card).
    pub fn limits(&self, gpu: &Gpu) -> Option<DeviceShare> {
        match *self {
            DeviceName::Whole { .. } => Some(DeviceShare {
                memory: gpu.memory,
                cores: 100,
            }),
            DeviceName::Slice { of, .. } => {
                let memory = gpu.memory / u64::from(of) / MIB * MIB;
                (memory > 0).then_some(DeviceShare {
                    memory,
                    cores: (100 / of).max(1),
                })
            }
            DeviceName::Memory { mib, .. } => {
                let memory = mib.checked_mul(MIB).filter(|m| *m <= gpu.memory)?;
                // Cores in proportion to memory, rounded up so a small slice still runs.
                let cores = (memory as u128 * 100)
                    .div_ceil(gpu.memory as u128)
                    .clamp(1, 100) as u32;
                Some(DeviceShare { memory, cores })
            }
        }
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DeviceName::Whole { index } => write!(f, "gpu-{index}"),
            DeviceName::Slice { index, n, of } => write!(f, "gpu-{index}-slice-{n}of{of}"),
            DeviceName::Memory { index, mib, n } => write!(f, "gpu-{index}-mem-{mib}mi-{n}"),
        }
    }
}

fn number(part: Option<&str>) -> Option<u32> {
    let part = part?;
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    part.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gpu(memory: u64) -> Gpu {
        Gpu {
            uuid: "GPU-1".into(),
            index: 0,
            minor: 0,
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
        }
    }

    #[test]
    fn parses_every_shape() {
        assert_eq!(
            DeviceName::parse("gpu-3"),
            Ok(DeviceName::Whole { index: 3 })
        );
        assert_eq!(
            DeviceName::parse("gpu-0-slice-1of4"),
            Ok(DeviceName::Slice {
                index: 0,
                n: 1,
                of: 4
            })
        );
        assert_eq!(
            DeviceName::parse("gpu-1-mem-4096mi-2"),
            Ok(DeviceName::Memory {
                index: 1,
                mib: 4096,
                n: 2
            })
        );
    }

    #[test]
    fn refuses_foreign_and_odd_names() {
        for name in [
            "gpu",
            "gpu-",
            "cpu-0",
            "gpu-a",
            "gpu-01",
            "gpu-0-slice-4of4",
            "gpu-0-slice-0of0",
            "gpu-0-slice-1of200",
            "gpu-0-mem-0mi-0",
            "gpu-0-mem-10-0",
            "gpu-0-part-1",
            "gpu-0-slice-1of2-x",
        ] {
            assert!(DeviceName::parse(name).is_err(), "{name} should be refused");
        }
    }

    #[test]
    fn limits_follow_the_table() {
        let card = gpu(24 << 30);
        let whole = DeviceName::Whole { index: 0 }.limits(&card);
        assert_eq!(
            whole,
            Some(DeviceShare {
                memory: 24 << 30,
                cores: 100
            })
        );
        let quarter = DeviceName::Slice {
            index: 0,
            n: 0,
            of: 4,
        }
        .limits(&card);
        assert_eq!(
            quarter,
            Some(DeviceShare {
                memory: 6 << 30,
                cores: 25
            })
        );
        let third = DeviceName::Slice {
            index: 0,
            n: 0,
            of: 3,
        }
        .limits(&card)
        .expect("fits");
        assert_eq!((third.memory % MIB, third.cores), (0, 33));
        let small = DeviceName::Memory {
            index: 0,
            mib: 1024,
            n: 0,
        }
        .limits(&card);
        assert_eq!(
            small,
            Some(DeviceShare {
                memory: 1 << 30,
                cores: 5
            })
        );
        assert_eq!(
            DeviceName::Memory {
                index: 0,
                mib: 25 << 10,
                n: 0
            }
            .limits(&card),
            None
        );
    }

    proptest! {
        #[test]
        fn names_round_trip_and_are_dns_labels(index in 0u32..64, of in 1u32..=100, n in 0u32..100, mib in 1u64..(1 << 24)) {
            let names = [
                DeviceName::Whole { index },
                DeviceName::Slice { index, n: n % of, of },
                DeviceName::Memory { index, mib, n },
            ];
            for name in names {
                let text = name.to_string();
                prop_assert!(text.len() <= 63);
                prop_assert!(text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                prop_assert_eq!(DeviceName::parse(&text), Ok(name));
            }
        }

        #[test]
        fn shares_never_exceed_the_card(memory in 1u64 << 20..1u64 << 40, of in 1u32..=100, mib in 1u64..(1 << 20)) {
            let card = gpu(memory);
            for name in [DeviceName::Slice { index: 0, n: 0, of }, DeviceName::Memory { index: 0, mib, n: 0 }] {
                if let Some(share) = name.limits(&card) {
                    prop_assert!(share.memory <= memory && share.memory > 0);
                    prop_assert!((1..=100).contains(&share.cores));
                }
            }
        }
    }
}
