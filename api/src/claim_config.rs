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
//!       oversubscribe: true
//!       spillLimit: 4Gi
//!       corePolicy: default
//! ```
//!
//! - `oversubscribe` (bool, optional): whether the claim may spill to host memory on a GPU the
//!   node overcommits (`docs/oversubscription.md`). Absent: the node decides (the kubelet
//!   plugin's `--oversubscribe-by-default`); an explicit `false` opts out even on a node whose
//!   policy is to spill.
//! - `spillLimit` (Kubernetes quantity, optional, more than 0): the host memory the claim may
//!   spill to on each GPU, across its processes, at most its memory limit there. Absent: its
//!   memory limit. Kept as the string the claim wrote; the driver parses and checks it
//!   (`tessera_driver::claim_config::parse_parameters`), so this crate needs no quantity parser.

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
    /// Spill to host memory on overcommitted GPUs. `None`: the node's policy decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oversubscribe: Option<bool>,
    /// Host memory the claim may spill to per GPU, a Kubernetes quantity (`4Gi`). `None`: the
    /// claim's memory limit on that GPU. Validated by the driver, not here. A number
    /// (`spillLimit: 1073741824`, unquoted YAML) is taken as its decimal text.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity_text"
    )]
    pub spill_limit: Option<String>,
    #[serde(default)]
    pub core_policy: CorePolicy,
}

/// A quantity field as text: a string as written, a JSON number as its decimal form.
fn quantity_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        String(String),
        Unsigned(u64),
        Signed(i64),
        Float(f64),
    }
    Ok(Option::<Text>::deserialize(d)?.map(|t| match t {
        Text::String(s) => s,
        Text::Unsigned(n) => n.to_string(),
        Text::Signed(n) => n.to_string(),
        Text::Float(n) => n.to_string(),
    }))
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
            return Err(GpuConfigError::ApiVersion {
                found: config.api_version,
            });
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
        let raw = br#"{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GpuConfig","priority":"high","oversubscribe":true,"spillLimit":"4Gi","corePolicy":"force"}"#;
        let config = GpuConfig::from_json(raw).expect("valid");
        assert_eq!(config.priority, Priority::High);
        assert_eq!(config.oversubscribe, Some(true));
        assert_eq!(config.spill_limit.as_deref(), Some("4Gi"));
        assert_eq!(config.core_policy, CorePolicy::Force);
    }

    #[test]
    fn oversubscribe_absent_is_not_false() {
        let parse = |extra: &str| {
            let raw =
                format!(r#"{{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GpuConfig"{extra}}}"#);
            GpuConfig::from_json(raw.as_bytes()).expect("valid")
        };
        assert_eq!(parse("").oversubscribe, None, "absent: the node decides");
        assert_eq!(
            parse(r#","oversubscribe":false"#).oversubscribe,
            Some(false)
        );
        assert_eq!(parse("").spill_limit, None);
        assert_eq!(
            parse(r#","spillLimit":1073741824"#).spill_limit.as_deref(),
            Some("1073741824"),
            "unquoted YAML numbers are quantities too"
        );
        // Absent fields stay absent when written back.
        let json = serde_json::to_string(&parse("")).expect("serialise");
        assert!(
            !json.contains("oversubscribe") && !json.contains("spillLimit"),
            "{json}"
        );
    }

    #[test]
    fn names_the_bad_field() {
        let raw =
            br#"{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GpuConfig","priority":"urgent"}"#;
        let err = GpuConfig::from_json(raw)
            .expect_err("bad priority")
            .to_string();
        assert!(err.contains("urgent"), "{err}");
        let raw = br#"{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GpuConfig","prio":"high"}"#;
        let err = GpuConfig::from_json(raw)
            .expect_err("unknown field")
            .to_string();
        assert!(err.contains("prio"), "{err}");
        let raw = br#"{"apiVersion":"v1","kind":"GpuConfig"}"#;
        let err = GpuConfig::from_json(raw)
            .expect_err("bad version")
            .to_string();
        assert!(err.contains("apiVersion"), "{err}");
    }
}
