//! What differs between the Kubernetes minors the harness runs: the served
//! `resource.k8s.io` version, the feature gates to turn on and `--runtime-config`.
//!
//! Gates are listed with the minors that know them because a component exits
//! at start-up on a gate name it does not know. The ranges were read from
//! `pkg/features/kube_features.go` of each pinned release (see
//! /work/shared/reference/dra-api.md §1.2 for the history).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A Kubernetes minor version (`1.<minor>`); the patch is whatever the pinned
/// module under `e2e/k8s/v1.<minor>/` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct K8sVersion {
    minor: u32,
}

/// Oldest minor with structured-parameters DRA (`resource.k8s.io/v1alpha3`).
const OLDEST: u32 = 31;

/// The versions with a module under `e2e/k8s/`, oldest first. The default test run uses the
/// oldest and the newest; `make e2e-matrix` runs the simulated cluster on every one.
pub const PINNED: [K8sVersion; 7] = [
    K8sVersion { minor: 31 },
    K8sVersion { minor: 32 },
    K8sVersion { minor: 33 },
    K8sVersion { minor: 34 },
    K8sVersion { minor: 35 },
    K8sVersion { minor: 36 },
    K8sVersion { minor: 37 },
];

/// DRA gates worth turning on wherever they exist: (name, first minor, last minor).
/// The last minor is where the gate is still known (GA gates are removed a few
/// releases after they lock); `None` means "known in every minor we pin".
const WANTED_GATES: &[(&str, u32, Option<u32>)] = &[
    // Alpha in 1.31, beta (default off) in 1.32-1.33, GA from 1.34, locked from 1.35.
    ("DynamicResourceAllocation", 31, Some(33)),
    // Alpha (default off) in 1.32 only; beta and on from 1.33.
    ("DRAResourceClaimDeviceStatus", 32, Some(32)),
    ("DRAPrioritizedList", 33, Some(39)),
    ("DRADeviceTaints", 33, None),
    ("DRAPartitionableDevices", 33, None),
    ("DRAConsumableCapacity", 34, None),
];

impl K8sVersion {
    pub const fn minor(self) -> u32 {
        self.minor
    }

    /// The newest pinned version.
    pub fn newest() -> Self {
        PINNED[PINNED.len() - 1]
    }

    /// Name of the module directory under `e2e/k8s/` and of the cache directory.
    pub fn dir_name(self) -> String {
        format!("v1.{}", self.minor)
    }

    /// `resource.k8s.io` objects of `kind` (`plural` in URLs) in the version this release
    /// serves.
    pub fn resource_api(self, kind: &str, plural: &str) -> kube::core::ApiResource {
        let gvk =
            kube::core::GroupVersionKind::gvk("resource.k8s.io", self.resource_api_version(), kind);
        kube::core::ApiResource::from_gvk_with_plural(&gvk, plural)
    }

    /// The `resource.k8s.io` version the harness expects served, and tests use.
    pub fn resource_api_version(self) -> &'static str {
        match self.minor {
            31 => "v1alpha3",
            32 | 33 => "v1beta1",
            _ => "v1",
        }
    }

    /// `group/version` of the DRA API, as discovery lists it.
    pub fn resource_group_version(self) -> String {
        format!("resource.k8s.io/{}", self.resource_api_version())
    }

    /// Feature gates for every component, in `--feature-gates` order.
    pub fn feature_gates(self) -> Vec<(&'static str, bool)> {
        WANTED_GATES
            .iter()
            .filter(|(_, first, last)| {
                self.minor >= *first && last.is_none_or(|last| self.minor <= last)
            })
            .map(|(name, _, _)| (*name, true))
            .collect()
    }

    /// `--runtime-config` entries: API versions that are off by default.
    pub fn runtime_config(self) -> Vec<String> {
        // 1.33-1.35 serve DeviceTaintRule only in v1alpha3, off by default; with the
        // DRADeviceTaints gate on, the scheduler watches it and waits for that watch before it
        // schedules anything.
        let taint_rules = "resource.k8s.io/v1alpha3=true".to_owned();
        match self.minor {
            31 => vec!["resource.k8s.io/v1alpha3=true".to_owned()],
            32 => vec!["resource.k8s.io/v1beta1=true".to_owned()],
            33 => vec!["resource.k8s.io/v1beta1=true".to_owned(), taint_rules],
            34 | 35 => vec![taint_rules],
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for K8sVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1.{}", self.minor)
    }
}

impl FromStr for K8sVersion {
    type Err = Error;

    /// Accepts `1.37`, `v1.37` and `v1.37.1` (the patch is ignored).
    fn from_str(input: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Version {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = input.trim().trim_start_matches('v');
        let mut parts = trimmed.split('.');
        let major = parts.next().ok_or_else(|| bad("empty"))?;
        if major != "1" {
            return Err(bad("only Kubernetes 1.x exists"));
        }
        let minor: u32 = parts
            .next()
            .ok_or_else(|| bad("expected 1.<minor>"))?
            .parse()
            .map_err(|_| bad("minor is not a number"))?;
        if let Some(patch) = parts.next() {
            // Prerelease suffixes (1.38.0-alpha.1) are not something we pin.
            patch
                .parse::<u32>()
                .map_err(|_| bad("patch is not a number"))?;
        }
        if parts.next().is_some() {
            return Err(bad("too many components"));
        }
        if minor < OLDEST {
            return Err(bad(
                "structured-parameters DRA needs Kubernetes 1.31 or newer",
            ));
        }
        Ok(K8sVersion { minor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> K8sVersion {
        s.parse().expect("valid version")
    }

    #[test]
    fn parses_the_usual_spellings() {
        assert_eq!(v("1.37"), v("v1.37"));
        assert_eq!(v("v1.37.1").minor(), 37);
        assert!("v1.30".parse::<K8sVersion>().is_err());
        assert!("2.1".parse::<K8sVersion>().is_err());
        assert!("v1.37.0-alpha.1".parse::<K8sVersion>().is_err());
        assert!("v1.x".parse::<K8sVersion>().is_err());
    }

    #[test]
    fn oldest_needs_alpha_api_and_gate() {
        let old = v("1.31");
        assert_eq!(old.resource_api_version(), "v1alpha3");
        assert_eq!(
            old.feature_gates(),
            vec![("DynamicResourceAllocation", true)]
        );
        assert_eq!(old.runtime_config(), vec!["resource.k8s.io/v1alpha3=true"]);
    }

    /// Where device taints are alpha, their rules' API version must be served, or the scheduler
    /// (which watches it once the gate is on) never schedules.
    #[test]
    fn alpha_device_taints_get_their_rules_api() {
        for minor in ["1.33", "1.34", "1.35"] {
            assert!(
                v(minor)
                    .runtime_config()
                    .contains(&"resource.k8s.io/v1alpha3=true".to_owned()),
                "{minor}"
            );
            assert!(
                v(minor)
                    .feature_gates()
                    .contains(&("DRADeviceTaints", true)),
                "{minor}"
            );
        }
        assert!(v("1.36").runtime_config().is_empty());
    }

    /// 1.32 serves claim device status only behind its alpha gate, which is off by default.
    #[test]
    fn v1_32_turns_on_claim_device_status() {
        assert_eq!(
            v("1.32").feature_gates(),
            vec![
                ("DynamicResourceAllocation", true),
                ("DRAResourceClaimDeviceStatus", true)
            ]
        );
        assert!(
            !v("1.33")
                .feature_gates()
                .contains(&("DRAResourceClaimDeviceStatus", true)),
            "on by default from 1.33"
        );
    }

    #[test]
    fn newest_uses_v1_and_sharing_gates() {
        let new = v("1.37");
        assert_eq!(new.resource_api_version(), "v1");
        assert!(new.runtime_config().is_empty());
        let gates: Vec<_> = new.feature_gates().into_iter().map(|(g, _)| g).collect();
        assert_eq!(
            gates,
            [
                "DRAPrioritizedList",
                "DRADeviceTaints",
                "DRAPartitionableDevices",
                "DRAConsumableCapacity"
            ]
        );
    }

    #[test]
    fn pinned_is_sorted_and_newest_is_last() {
        assert!(PINNED.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(K8sVersion::newest().dir_name(), "v1.37");
    }
}
