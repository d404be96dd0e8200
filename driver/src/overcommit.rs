//! Node-level memory overcommit (issue 8): a factor per GPU model by which the `memory` a node
//! offers to the scheduler exceeds the GPUs' physical memory, and the guard rail that refuses it
//! on GPUs that cannot page memory on demand.
//!
//! The policy is written `1.5` (every GPU) or `NVIDIA L40S=2,default=1.2` (per product name as
//! NVML prints it, with a default for the others). Factors are kept in thousandths so that every
//! computation on bytes is integer arithmetic and the same on every node.
//!
//! What the factor changes, and what it does not, is in `docs/oversubscription.md`: the
//! published capacity of shared devices is physical × factor; a claim's own limit stays what it
//! was allocated, and a whole GPU (`gpu-<i>` without consumed capacity) stays the physical card.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::inventory::{Gpu, Inventory};

/// The smallest and largest factors accepted, in thousandths.
pub const MIN_PERMILLE: u32 = 1000;
pub const MAX_PERMILLE: u32 = 4000;
/// The compute capability from which a GPU pages managed memory on demand (Pascal, 6.0): what
/// spilling a claim's allocations to host memory needs.
pub const MANAGED_MEMORY_MIN_CC: (u32, u32) = (6, 0);

const MIB: u64 = 1 << 20;

/// Why a policy is refused; the messages are what `--memory-overcommit` prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{text:?} is not a number (expected a factor such as 1.5)")]
    NotANumber { text: String },
    #[error("factor {text} is outside 1.0–4.0")]
    OutOfRange { text: String },
    #[error("{entry:?}: expected <factor> or <GPU model>=<factor>, entries separated by commas")]
    Entry { entry: String },
    #[error("{model:?} is given twice")]
    Duplicate { model: String },
    #[error(
        "GPU {index} ({uuid}, {model}) cannot be overcommitted ({factor}): {why}; overcommit needs managed memory with on-demand paging (compute capability 6.0, Pascal, or newer)"
    )]
    NoManagedMemory {
        index: u32,
        uuid: String,
        model: String,
        factor: Factor,
        why: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One factor, in thousandths (1000 = no overcommit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Factor(u32);

impl Factor {
    /// No overcommit.
    pub const ONE: Factor = Factor(MIN_PERMILLE);

    /// The factor in thousandths.
    pub fn permille(self) -> u32 {
        self.0
    }

    /// Whether this factor offers more than the card.
    pub fn overcommits(self) -> bool {
        self.0 > MIN_PERMILLE
    }

    /// `physical` × factor; above 1 rounded down to a MiB (shares and steps are MiB-based).
    pub fn apply(self, physical: u64) -> u64 {
        if !self.overcommits() {
            return physical;
        }
        let scaled = u128::from(physical) * u128::from(self.0) / u128::from(MIN_PERMILLE);
        let scaled = u64::try_from(scaled).unwrap_or(u64::MAX);
        (scaled / MIB * MIB).max(physical)
    }
}

impl FromStr for Factor {
    type Err = Error;

    /// A finite number from 1.0 to 4.0, kept to a thousandth.
    fn from_str(text: &str) -> Result<Factor> {
        let text = text.trim();
        let value: f64 = text.parse().map_err(|_| Error::NotANumber {
            text: text.to_string(),
        })?;
        if !value.is_finite() {
            return Err(Error::NotANumber {
                text: text.to_string(),
            });
        }
        let permille = (value * 1000.0).round();
        if !(f64::from(MIN_PERMILLE)..=f64::from(MAX_PERMILLE)).contains(&permille) {
            return Err(Error::OutOfRange {
                text: text.to_string(),
            });
        }
        Ok(Factor(permille as u32))
    }
}

impl fmt::Display for Factor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let frac = format!("{frac:03}");
            write!(f, "{whole}.{}", frac.trim_end_matches('0'))
        }
    }
}

/// A node's overcommit policy: a default factor and factors per GPU model (product name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryOvercommit {
    default: Option<Factor>,
    by_model: BTreeMap<String, Factor>,
}

impl MemoryOvercommit {
    /// No overcommit anywhere (the default).
    pub fn none() -> Self {
        Self::default()
    }

    /// One factor for every GPU.
    pub fn uniform(factor: Factor) -> Self {
        MemoryOvercommit {
            default: Some(factor),
            by_model: BTreeMap::new(),
        }
    }

    /// The models named per model that none of `inventory`'s GPUs is (a typo, or a model this
    /// node does not have: one setting serves every node of a DaemonSet).
    pub fn models_not_on(&self, inventory: &Inventory) -> Vec<&str> {
        self.by_model
            .keys()
            .filter(|model| !inventory.gpus.iter().any(|g| &&g.product_name == model))
            .map(String::as_str)
            .collect()
    }

    /// The factor of `gpu`: its model's, else the default, else 1.
    pub fn factor(&self, gpu: &Gpu) -> Factor {
        self.by_model
            .get(&gpu.product_name)
            .or(self.default.as_ref())
            .copied()
            .unwrap_or(Factor::ONE)
    }

    /// Whether any GPU model gets a factor above 1.
    pub fn is_none(&self) -> bool {
        self.default.is_none_or(|f| !f.overcommits())
            && self.by_model.values().all(|f| !f.overcommits())
    }

    /// The memory offered for `gpu`: physical × its factor.
    pub fn offered_memory(&self, gpu: &Gpu) -> u64 {
        self.factor(gpu).apply(gpu.memory)
    }

    /// `gpu` as offered: the same GPU with its memory scaled by its factor.
    pub fn offered(&self, gpu: &Gpu) -> Gpu {
        Gpu {
            memory: self.offered_memory(gpu),
            ..gpu.clone()
        }
    }

    /// The guard rail: every GPU that gets a factor above 1 must page managed memory on demand
    /// (compute capability 6.0 or newer). An unknown compute capability is refused too: the
    /// spill path would have nothing to fall back on.
    pub fn check(&self, inventory: &Inventory) -> Result<()> {
        for gpu in &inventory.gpus {
            let factor = self.factor(gpu);
            if !factor.overcommits() {
                continue;
            }
            let refuse = |why: String| Error::NoManagedMemory {
                index: gpu.index,
                uuid: gpu.uuid.clone(),
                model: gpu.product_name.clone(),
                factor,
                why,
            };
            let Some(text) = gpu.cuda_compute_capability.as_deref() else {
                return Err(refuse("its compute capability is unknown".into()));
            };
            match compute_capability(text) {
                Some(cc) if cc >= MANAGED_MEMORY_MIN_CC => {}
                Some(_) => {
                    return Err(refuse(format!(
                        "compute capability {text} has no on-demand paging of managed memory"
                    )));
                }
                None => {
                    return Err(refuse(format!(
                        "its compute capability {text:?} cannot be read"
                    )));
                }
            }
        }
        Ok(())
    }
}

impl FromStr for MemoryOvercommit {
    type Err = Error;

    /// `1.5`, or `NVIDIA L40S=2,default=1.2`; an empty string is no overcommit.
    fn from_str(text: &str) -> Result<Self> {
        let mut policy = MemoryOvercommit::none();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (model, factor) = match entry.rsplit_once('=') {
                Some((model, factor)) => (model.trim(), factor),
                None => ("default", entry),
            };
            if model.is_empty() {
                return Err(Error::Entry {
                    entry: entry.to_string(),
                });
            }
            let factor: Factor = factor.parse()?;
            let duplicate = if model == "default" {
                policy.default.replace(factor).is_some()
            } else {
                policy.by_model.insert(model.to_string(), factor).is_some()
            };
            if duplicate {
                return Err(Error::Duplicate {
                    model: model.to_string(),
                });
            }
        }
        Ok(policy)
    }
}

impl fmt::Display for MemoryOvercommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .by_model
            .iter()
            .map(|(model, factor)| format!("{model}={factor}"))
            .collect();
        parts.push(format!("default={}", self.default.unwrap_or(Factor::ONE)));
        f.write_str(&parts.join(","))
    }
}

/// `8.9` → (8, 9).
fn compute_capability(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().map_or(Some(0), |m| m.parse().ok())?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, model: &str, cc: Option<&str>) -> Gpu {
        Gpu {
            uuid: format!("GPU-{index}"),
            index,
            minor: index,
            product_name: model.into(),
            memory: 8 << 30,
            brand: None,
            architecture: None,
            cuda_compute_capability: cc.map(str::to_string),
            pci_bus_id: None,
            pcie_root: None,
            numa_node: None,
            context_overhead: 0,
            driver_memory_wall: false,
        }
    }

    #[test]
    fn models_the_node_does_not_have_are_named() {
        let inventory = Inventory {
            driver_version: None,
            gpus: vec![gpu(0, "NVIDIA L40S", Some("8.9"))],
        };
        let setting: MemoryOvercommit = "NVIDIA L40S=2,Tesla T5=2,default=1.5".parse().unwrap();
        assert_eq!(setting.models_not_on(&inventory), ["Tesla T5"]);
        let setting: MemoryOvercommit = "1.5".parse().unwrap();
        assert!(setting.models_not_on(&inventory).is_empty());
    }

    #[test]
    fn factors_parse_within_range() {
        assert_eq!("1.5".parse::<Factor>(), Ok(Factor(1500)));
        assert_eq!(" 2 ".parse::<Factor>(), Ok(Factor(2000)));
        assert_eq!("4.0".parse::<Factor>(), Ok(Factor(4000)));
        assert_eq!("1".parse::<Factor>(), Ok(Factor::ONE));
        for bad in ["0.5", "4.01", "-1", "100"] {
            assert_eq!(
                bad.parse::<Factor>(),
                Err(Error::OutOfRange { text: bad.into() }),
                "{bad}"
            );
        }
        for bad in ["NaN", "inf", "-inf", "", "two", "1,5"] {
            assert!(
                matches!(bad.parse::<Factor>(), Err(Error::NotANumber { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            "5".parse::<Factor>().expect_err("out").to_string(),
            "factor 5 is outside 1.0–4.0"
        );
    }

    #[test]
    fn factor_scales_bytes_down_to_a_mib() {
        assert_eq!(Factor::ONE.apply(8 << 30), 8 << 30);
        assert_eq!(Factor(2000).apply(8 << 30), 16 << 30);
        assert_eq!(Factor(1500).apply(24 << 30), 36 << 30);
        // 1 GiB + 1 byte at 1.333: rounded down to a MiB, never below the card.
        let odd = (1 << 30) + 1;
        let got = Factor(1333).apply(odd);
        assert_eq!(got % MIB, 0);
        assert!(got >= odd && got <= odd * 1333 / 1000);
        // Factor 1 keeps an odd card exact (today's capacity, byte for byte).
        assert_eq!(Factor::ONE.apply(odd), odd);
        assert_eq!(Factor(1250).to_string(), "1.25");
        assert_eq!(Factor(2000).to_string(), "2");
    }

    #[test]
    fn policy_per_model_with_a_default() {
        let policy: MemoryOvercommit = "NVIDIA L40S=2, default=1.2".parse().expect("valid");
        assert_eq!(policy.factor(&gpu(0, "NVIDIA L40S", None)), Factor(2000));
        assert_eq!(policy.factor(&gpu(1, "Tesla T4", None)), Factor(1200));
        assert_eq!(policy.to_string(), "NVIDIA L40S=2,default=1.2");
        let only_model: MemoryOvercommit = "NVIDIA L40S=1.5".parse().expect("valid");
        assert_eq!(only_model.factor(&gpu(1, "Tesla T4", None)), Factor::ONE);
        assert!(!only_model.is_none());
        let one: MemoryOvercommit = "1".parse().expect("valid");
        assert!(one.is_none());
        assert!("".parse::<MemoryOvercommit>().expect("valid").is_none());
        assert_eq!(
            one.offered_memory(&gpu(0, "x", None)),
            8 << 30,
            "factor 1 offers the card"
        );
    }

    #[test]
    fn policy_errors_name_the_entry() {
        let err = |text: &str| text.parse::<MemoryOvercommit>().expect_err(text);
        assert_eq!(
            err("1.5,default=2"),
            Error::Duplicate {
                model: "default".into()
            }
        );
        assert_eq!(err("A=2,A=3"), Error::Duplicate { model: "A".into() });
        assert!(matches!(err("=2"), Error::Entry { .. }));
        assert!(matches!(err("A=9"), Error::OutOfRange { .. }));
        assert!(matches!(err("A=x"), Error::NotANumber { .. }));
    }

    #[test]
    fn guard_rail_refuses_gpus_without_on_demand_paging() {
        let inventory = |cc: Option<&str>| Inventory {
            driver_version: None,
            gpus: vec![gpu(0, "NVIDIA L40S", Some("8.9")), gpu(1, "Tesla K80", cc)],
        };
        let policy = MemoryOvercommit::uniform(Factor(1500));
        assert_eq!(policy.check(&inventory(Some("6.0"))), Ok(()));
        let err = policy.check(&inventory(Some("3.7"))).expect_err("Kepler");
        assert!(
            matches!(&err, Error::NoManagedMemory { index: 1, .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("GPU 1 (GPU-1, Tesla K80)"), "{text}");
        assert!(text.contains("compute capability 3.7"), "{text}");
        assert!(
            policy
                .check(&inventory(None))
                .expect_err("unknown")
                .to_string()
                .contains("unknown")
        );
        assert!(matches!(
            policy.check(&inventory(Some("x.y"))),
            Err(Error::NoManagedMemory { .. })
        ));
        // Only GPUs that get a factor above 1 are checked.
        let l40s_only: MemoryOvercommit = "NVIDIA L40S=2".parse().expect("valid");
        assert_eq!(l40s_only.check(&inventory(Some("3.7"))), Ok(()));
        assert_eq!(MemoryOvercommit::none().check(&inventory(None)), Ok(()));
    }
}
