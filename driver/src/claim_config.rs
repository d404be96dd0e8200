//! The opaque `GpuConfig` a claim gets: class and claim config entries, merged per request.
//!
//! The scheduler copies every config entry that applies into the allocation
//! (`status.allocation.devices.config[]`, each with its source `FromClass` or `FromClaim`), so
//! the allocation alone is enough. Entries for other drivers are skipped. Precedence follows the
//! upstream convention: claim entries over class entries, later entries over earlier ones; an
//! entry with no `requests` applies to all requests. A request with no entry gets the defaults.
//!
//! The shim reads one config per claim, so all requests of a claim must end up with the same
//! settings; a claim whose requests disagree is refused rather than half-applied.

use serde_json::Value;
use tessera_api::GpuConfig;
use tessera_api::names::{CONFIG_API_VERSION, CONFIG_KIND, DRIVER_NAME};

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

/// Parses one entry's parameters, naming the offending field.
pub fn parse_parameters(parameters: &Value) -> Result<GpuConfig, (String, String)> {
    let parsed: GpuConfig = serde_path_to_error::deserialize(parameters).map_err(|e| {
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
    Ok(parsed)
}

/// The settings for a claim whose results have the request names `requests` (full names,
/// `<request>` or `<request>/<subrequest>`).
pub fn merge(entries: &[ConfigEntry], requests: &[&str]) -> Result<GpuConfig, Error> {
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
    for request in requests {
        let main = request.split('/').next().unwrap_or_default();
        let applies = |entry: &ConfigEntry| {
            entry.requests.is_empty() || entry.requests.iter().any(|r| r == request || r == main)
        };
        let config = ours
            .iter()
            .rev()
            .find(|(entry, _, _)| applies(entry))
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
    Ok(chosen.map(|(_, c)| c).unwrap_or(default))
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
    fn defaults_without_entries_and_other_drivers_are_ignored() {
        let mut theirs = entry(ConfigSource::Claim, &[], json!({"whatever": true}));
        theirs.driver = "gpu.nvidia.com".into();
        let merged = merge(&[theirs], &["gpu"]).expect("valid");
        assert_eq!(
            (merged.priority, merged.core_policy, merged.oversubscribe),
            (Priority::Normal, CorePolicy::Default, false)
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
