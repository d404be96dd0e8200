//! The opaque `GpuConfig` a claim gets: class and claim config entries, merged per request.
//!
//! The scheduler copies every config entry that applies into the allocation
//! (`status.allocation.devices.config[]`, each with its source `FromClass` or `FromClaim`), so
//! the allocation alone is enough. Entries for other drivers are skipped. Precedence follows the
//! upstream convention: claim entries over class entries, later entries over earlier ones; an
//! entry with no `requests` applies to all requests. A request with no entry gets the defaults.
//!
//! The shim reads one config per claim, so all requests of a claim must end up with the same
//! settings; a claim whose requests disagree is refused rather than half-applied. "The same" is
//! the parsed settings: `spillLimit: 4Gi` and `spillLimit: 4096Mi` agree (both are normalised to
//! bytes), but an absent `oversubscribe` (the node decides) and an explicit `false` do not — on a
//! node whose policy is to spill they would mean different things, and whether a claim is
//! accepted should not depend on the node it lands on.

use serde_json::Value;
use tessera_api::GpuConfig;
use tessera_api::names::{CONFIG_API_VERSION, CONFIG_KIND, DRIVER_NAME};

use crate::quantity;

/// Where an allocation config entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConfigSource {
    /// From the DeviceClass (lower precedence).
    Class,
    /// From the claim itself.
    Claim,
}

/// One `status.allocation.devices.config[]` entry with an opaque config.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigEntry {
    pub source: ConfigSource,
    /// The requests it applies to; empty: all.
    pub requests: Vec<String>,
    pub driver: String,
    pub parameters: Value,
}

/// A config entry that cannot be used; the message names the entry and the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config[{index}] ({from:?} config for driver {DRIVER_NAME}): {field}: {message}")]
    Invalid {
        index: usize,
        from: ConfigSource,
        field: String,
        message: String,
    },
    #[error(
        "requests {first:?} and {second:?} resolve to different GpuConfig settings, but a claim has one shim config; give them the same config"
    )]
    Conflict { first: String, second: String },
}

/// Parses one entry's parameters, naming the offending field. A `spillLimit` must be a
/// Kubernetes quantity of more than 0 bytes; it comes back normalised to its byte count
/// (`"4Gi"` → `"4294967296"`), which [`spill_limit_bytes`] reads.
pub fn parse_parameters(parameters: &Value) -> Result<GpuConfig, (String, String)> {
    let mut parsed: GpuConfig = serde_path_to_error::deserialize(parameters).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            "GpuConfig".to_string()
        } else {
            path
        };
        (field, e.inner().to_string())
    })?;
    if parsed.api_version != CONFIG_API_VERSION {
        return Err((
            "apiVersion".into(),
            format!(
                "is {:?}, expected {CONFIG_API_VERSION:?}",
                parsed.api_version
            ),
        ));
    }
    if parsed.kind != CONFIG_KIND {
        return Err((
            "kind".into(),
            format!("is {:?}, expected {CONFIG_KIND:?}", parsed.kind),
        ));
    }
    if let Some(text) = &parsed.spill_limit {
        let bytes = quantity::parse(text).map_err(|e| ("spillLimit".to_string(), e.to_string()))?;
        if bytes == 0 {
            return Err((
                "spillLimit".into(),
                format!(
                    "{text:?} is 0 bytes; a claim that may spill needs a spill limit above 0 (leave it out for the claim's memory limit)"
                ),
            ));
        }
        parsed.spill_limit = Some(bytes.to_string());
    }
    Ok(parsed)
}

/// The `spillLimit` of settings that came from [`parse_parameters`] or [`merge`], in bytes.
/// `None` when the claim set none (or, for settings built elsewhere, one that does not parse).
pub fn spill_limit_bytes(settings: &GpuConfig) -> Option<u64> {
    settings
        .spill_limit
        .as_deref()
        .and_then(|text| quantity::parse(text).ok())
        .filter(|&bytes| bytes > 0)
}

/// The settings for a claim whose results have the request names `requests` (full names,
/// `<request>` or `<request>/<subrequest>`).
pub fn merge(entries: &[ConfigEntry], requests: &[&str]) -> Result<GpuConfig, Error> {
    merge_with_source(entries, requests).map(|merged| merged.config)
}

/// A claim's settings and who chose them.
#[derive(Clone, Debug, PartialEq)]
pub struct Merged {
    pub config: GpuConfig,
    /// The entry whose settings won, for the request where it ranks highest: `Some(Claim)` when
    /// any request's settings came from the claim's own config (the tenant's words), `Some(Class)`
    /// when all came from DeviceClasses (the admin's), `None` for the defaults.
    pub source: Option<ConfigSource>,
}

/// [`merge`], also telling where the winning settings came from, for the settings only an
/// admin may grant (see [`Merged::source`]).
pub fn merge_with_source(entries: &[ConfigEntry], requests: &[&str]) -> Result<Merged, Error> {
    // Validate every entry of ours first, so a bad config fails the claim even when another
    // entry would have won.
    let mut ours = Vec::new();
    for (index, entry) in entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.driver == DRIVER_NAME)
    {
        let config =
            parse_parameters(&entry.parameters).map_err(|(field, message)| Error::Invalid {
                index,
                from: entry.source,
                field,
                message,
            })?;
        ours.push((entry, index, config));
    }
    // Highest precedence last: class before claim, then position.
    ours.sort_by_key(|(entry, index, _)| (entry.source, *index));
    let default = GpuConfig {
        api_version: CONFIG_API_VERSION.into(),
        kind: CONFIG_KIND.into(),
        ..GpuConfig::default()
    };
    let mut chosen: Option<(&str, GpuConfig)> = None;
    let mut source = None;
    for request in requests {
        let main = request.split('/').next().unwrap_or_default();
        let applies = |entry: &ConfigEntry| {
            entry.requests.is_empty() || entry.requests.iter().any(|r| r == request || r == main)
        };
        let winner = ours.iter().rev().find(|(entry, _, _)| applies(entry));
        source = source.max(winner.map(|(entry, _, _)| entry.source));
        let config = winner
            .map(|(_, _, config)| config.clone())
            .unwrap_or_else(|| default.clone());
        match &chosen {
            Some((first, settled)) if *settled != config => {
                return Err(Error::Conflict {
                    first: first.to_string(),
                    second: request.to_string(),
                });
            }
            Some(_) => {}
            None => chosen = Some((request, config)),
        }
    }
    Ok(Merged {
        config: chosen.map(|(_, c)| c).unwrap_or(default),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_api::{CorePolicy, Priority};

    fn entry(source: ConfigSource, requests: &[&str], parameters: Value) -> ConfigEntry {
        ConfigEntry {
            source,
            requests: requests.iter().map(|r| r.to_string()).collect(),
            driver: DRIVER_NAME.into(),
            parameters,
        }
    }

    fn config(priority: &str) -> Value {
        json!({"apiVersion": CONFIG_API_VERSION, "kind": CONFIG_KIND, "priority": priority})
    }

    #[test]
    fn claim_entries_beat_class_entries_and_later_beat_earlier() {
        let entries = vec![
            entry(ConfigSource::Claim, &[], config("low")),
            entry(ConfigSource::Class, &[], config("high")),
            entry(ConfigSource::Claim, &["gpu"], config("normal")),
        ];
        assert_eq!(
            merge(&entries, &["gpu"]).expect("valid").priority,
            Priority::Normal
        );
        assert_eq!(
            merge(&entries[..2], &["gpu"]).expect("valid").priority,
            Priority::Low
        );
        assert_eq!(
            merge(&entries[1..2], &["gpu/big"]).expect("valid").priority,
            Priority::High
        );
    }

    #[test]
    fn the_source_says_whether_the_tenant_chose_the_settings() {
        let class = entry(ConfigSource::Class, &[], config("high"));
        let claim_for_small = entry(ConfigSource::Claim, &["small"], config("high"));
        let source = |entries: &[ConfigEntry], requests: &[&str]| {
            merge_with_source(entries, requests).expect("valid").source
        };
        assert_eq!(source(&[], &["gpu"]), None);
        assert_eq!(
            source(std::slice::from_ref(&class), &["gpu"]),
            Some(ConfigSource::Class)
        );
        // One request's settings from the claim is enough: the tenant asked for them.
        assert_eq!(
            source(&[class.clone(), claim_for_small], &["big", "small"]),
            Some(ConfigSource::Claim)
        );
    }

    #[test]
    fn defaults_without_entries_and_other_drivers_are_ignored() {
        let mut theirs = entry(ConfigSource::Claim, &[], json!({"whatever": true}));
        theirs.driver = "gpu.nvidia.com".into();
        let merged = merge(&[theirs], &["gpu"]).expect("valid");
        assert_eq!(
            (
                merged.priority,
                merged.core_policy,
                merged.oversubscribe,
                merged.spill_limit
            ),
            (Priority::Normal, CorePolicy::Default, None, None)
        );
    }

    fn with(fields: Value) -> Value {
        let mut parameters = json!({"apiVersion": CONFIG_API_VERSION, "kind": CONFIG_KIND});
        for (k, v) in fields.as_object().expect("object") {
            parameters[k] = v.clone();
        }
        parameters
    }

    #[test]
    fn oversubscribe_absent_and_false_are_different_settings() {
        // Absent: the node decides; false: never spill. Two requests that disagree so are
        // refused, whatever the node's policy, as any other difference is.
        let entries = vec![entry(
            ConfigSource::Claim,
            &["a"],
            with(json!({"oversubscribe": false})),
        )];
        let err = merge(&entries, &["a", "b"])
            .expect_err("absent vs false")
            .to_string();
        assert!(err.contains("\"a\"") && err.contains("\"b\""), "{err}");
        // The same explicit value for both is one setting.
        let entries = vec![entry(
            ConfigSource::Class,
            &[],
            with(json!({"oversubscribe": false})),
        )];
        let merged = merge(&entries, &["a", "b"]).expect("agree");
        assert_eq!(merged.oversubscribe, Some(false));
        // Neither sets it: absent, for the plugin to resolve with the node's policy.
        let entries = vec![entry(ConfigSource::Claim, &["a"], config("normal"))];
        assert_eq!(
            merge(&entries, &["a", "b"]).expect("agree").oversubscribe,
            None
        );
    }

    #[test]
    fn spill_limits_are_quantities_compared_by_value() {
        let entries = vec![
            entry(
                ConfigSource::Claim,
                &["a"],
                with(json!({"spillLimit": "4Gi"})),
            ),
            entry(
                ConfigSource::Claim,
                &["b"],
                with(json!({"spillLimit": "4096Mi"})),
            ),
        ];
        let merged = merge(&entries, &["a", "b"]).expect("the same limit");
        assert_eq!(spill_limit_bytes(&merged), Some(4 << 30));
        assert_eq!(merged.spill_limit.as_deref(), Some("4294967296"));
        let entries = vec![
            entry(
                ConfigSource::Claim,
                &["a"],
                with(json!({"spillLimit": "4Gi"})),
            ),
            entry(
                ConfigSource::Claim,
                &["b"],
                with(json!({"spillLimit": "2Gi"})),
            ),
        ];
        merge(&entries, &["a", "b"]).expect_err("different limits");
        let merged = merge(&[], &["a"]).expect("defaults");
        assert_eq!(spill_limit_bytes(&merged), None);
        assert_eq!(
            spill_limit_bytes(
                &parse_parameters(&with(json!({"spillLimit": "1.5G"}))).expect("valid")
            ),
            Some(1_500_000_000)
        );
    }

    #[test]
    fn bad_spill_limits_are_refused_naming_the_field_and_value() {
        for value in ["0", "0Gi", "-1Gi", "lots", "4GB", "", "1e40"] {
            let parameters = with(json!({"spillLimit": value}));
            let (field, message) = parse_parameters(&parameters).expect_err(value);
            assert_eq!(field, "spillLimit", "{value}: {message}");
            assert!(
                message.contains(&format!("{value:?}")),
                "{value}: {message}"
            );
            let entries = vec![entry(ConfigSource::Claim, &[], parameters)];
            let err = merge(&entries, &["gpu"]).expect_err(value).to_string();
            assert!(
                err.contains("config[0]") && err.contains("spillLimit") && err.contains(value),
                "{err}"
            );
        }
        // Neither a string nor a number: serde names the field too.
        let (field, _) = parse_parameters(&with(json!({"spillLimit": true}))).expect_err("a bool");
        assert_eq!(field, "spillLimit");
        // An unquoted YAML number is a quantity of bytes; a negative one is refused.
        let parsed = parse_parameters(&with(json!({"spillLimit": 1073741824}))).expect("bytes");
        assert_eq!(spill_limit_bytes(&parsed), Some(1 << 30));
        let (field, message) =
            parse_parameters(&with(json!({"spillLimit": -5}))).expect_err("negative");
        assert_eq!(
            (field.as_str(), message.contains("\"-5\"")),
            ("spillLimit", true),
            "{message}"
        );
    }

    #[test]
    fn requests_that_disagree_are_refused() {
        let entries = vec![entry(ConfigSource::Claim, &["a"], config("high"))];
        let err = merge(&entries, &["a", "b"])
            .expect_err("conflict")
            .to_string();
        assert!(err.contains("\"a\"") && err.contains("\"b\""), "{err}");
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (config("urgent"), "priority"),
            (
                json!({"apiVersion": CONFIG_API_VERSION, "kind": CONFIG_KIND, "oversubscribe": "yes"}),
                "oversubscribe",
            ),
            (
                json!({"apiVersion": CONFIG_API_VERSION, "kind": CONFIG_KIND, "prio": "high"}),
                "prio",
            ),
            (
                json!({"apiVersion": "v1", "kind": CONFIG_KIND}),
                "apiVersion",
            ),
            (
                json!({"apiVersion": CONFIG_API_VERSION, "kind": "Other"}),
                "kind",
            ),
            (json!({"kind": CONFIG_KIND}), "apiVersion"),
        ];
        for (parameters, field) in cases {
            // A bad entry fails the claim even if it does not apply to any of its requests.
            let entries = vec![entry(ConfigSource::Class, &["other"], parameters)];
            let err = merge(&entries, &["gpu"]).expect_err(field).to_string();
            assert!(
                err.contains(field) && err.contains("config[0]"),
                "{err} should name {field}"
            );
        }
    }
}
