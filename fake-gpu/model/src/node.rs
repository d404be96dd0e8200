//! The fake node as a process finds it: config and state file located through the environment.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::state::{Region, StateError};

/// Names the JSON config file; without it the node is [`Config::default`].
pub const CONFIG_ENV: &str = "FAKEGPU_CONFIG";
/// Names the shared state file; defaults to the config path plus `.state`.
pub const STATE_ENV: &str = "FAKEGPU_STATE";
/// The state file without a config or `FAKEGPU_STATE`.
pub const DEFAULT_STATE_PATH: &str = "/tmp/fakegpu-default.state";

/// Why the node could not be set up; the message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fake GPU config {} ({CONFIG_ENV}): {source}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("fake GPU state file {} ({STATE_ENV}): {source}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: StateError,
    },
}

/// The config this process should use, and the file it came from (`None`: the default node).
pub fn config_from_env() -> Result<(Config, Option<PathBuf>), Error> {
    match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
        None => Ok((Config::default(), None)),
        Some(path) => {
            let path = PathBuf::from(path);
            let config = Config::from_file(&path).map_err(|source| Error::Config {
                path: path.clone(),
                source,
            })?;
            Ok((config, Some(path)))
        }
    }
}

/// Where the state file lives: `FAKEGPU_STATE`, else `<config>.state`, else the default.
pub fn state_path_from_env(config_path: Option<&Path>) -> PathBuf {
    if let Some(path) = std::env::var_os(STATE_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    match config_path {
        Some(config) => {
            let mut state = config.as_os_str().to_owned();
            state.push(".state");
            PathBuf::from(state)
        }
        None => PathBuf::from(DEFAULT_STATE_PATH),
    }
}

/// Opens the state file for `config` at `path`.
pub fn open_region(path: &Path, config: &Config) -> Result<Arc<Region>, Error> {
    Region::open(path, config).map_err(|source| Error::State {
        path: path.to_owned(),
        source,
    })
}
