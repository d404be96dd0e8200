//! The opaque configuration a ResourceClaim (or DeviceClass) may carry for `gpu.tessera.dev`.
//!
//! ```yaml
//! config:
//! - opaque:
//!     driver: gpu.tessera.dev
//!     parameters:
//!       apiVersion: gpu.tessera.dev/v1alpha1
//!       kind: GpuConfig
//!       priority: high
//!       oversubscribe: false
//!       corePolicy: default
//! ```

use serde::{Deserialize, Serialize};

use crate::names::{CONFIG_API_VERSION, CONFIG_KIND};

/// Scheduling priority between claims sharing a GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

/// Whether a claim's `cores` share is a cap even when the GPU is otherwise idle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum CorePolicy {
    /// The share is guaranteed under contention; an idle GPU may be used beyond it.
    #[default]
    Default,
    /// The share is a hard cap at all times.
    Force,
}

/// `gpu.tessera.dev/v1alpha1` `GpuConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuConfig {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub oversubscribe: bool,
    #[serde(default)]
    pub core_policy: CorePolicy,
}

/// Why a `GpuConfig` was refused; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum GpuConfigError {
    #[error("GpuConfig is not valid JSON for {CONFIG_API_VERSION} {CONFIG_KIND}: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("GpuConfig apiVersion is {found:?}, expected {CONFIG_API_VERSION:?}")]
    ApiVersion { found: String },
    #[error("GpuConfig kind is {found:?}, expected {CONFIG_KIND:?}")]
    Kind { found: String },
}

impl GpuConfig {
    /// Parses and checks the `parameters` of an opaque config entry.
    pub fn from_json(raw: &[u8]) -> Result<Self, GpuConfigError> {
        let config: GpuConfig = serde_json::from_slice(raw)?;
        if config.api_version != CONFIG_API_VERSION {
            return Err(GpuConfigError::ApiVersion { found: config.api_version });
        }
        if config.kind != CONFIG_KIND {
            return Err(GpuConfigError::Kind { found: config.kind });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let raw = br#"{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GpuConfig","priority":"high","oversubscribe":true,"corePolicy":"force"}"#;
        let config = GpuConfig::from_json(raw).expect("valid");
        assert_eq!(config.priority, Priority::High);
        assert!(config.oversubscribe);
        assert_eq!(config.core_policy, CorePolicy::Force);
    }

    #[test]
    fn names_the_bad_field() {
        let raw = br#"{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GpuConfig","priority":"urgent"}"#;
        let err = GpuConfig::from_json(raw).expect_err("bad priority").to_string();
        assert!(err.contains("urgent"), "{err}");
        let raw = br#"{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GpuConfig","prio":"high"}"#;
        let err = GpuConfig::from_json(raw).expect_err("unknown field").to_string();
        assert!(err.contains("prio"), "{err}");
        let raw = br#"{"apiVersion":"v1","kind":"GpuConfig"}"#;
        let err = GpuConfig::from_json(raw).expect_err("bad version").to_string();
        assert!(err.contains("apiVersion"), "{err}");
    }
}
