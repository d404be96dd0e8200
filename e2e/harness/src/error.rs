//! The harness's error type: every failure says which component or file it is about.

use std::path::PathBuf;

/// Everything that can go wrong while bringing up or tearing down a control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binaries for a version are not built (or not where we look).
    #[error(
        "Kubernetes binaries for {version} not found in {dir}: {reason}\n  build them with: {hint}"
    )]
    MissingBinaries {
        version: String,
        dir: PathBuf,
        reason: String,
        hint: String,
    },

    /// Something a real node needs is not built or installed.
    #[error("real node: {what} is missing; {hint}")]
    MissingNodePrerequisite { what: String, hint: String },

    #[error("{path}: {context}")]
    Io {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("generating certificate {what}")]
    Certificate {
        what: String,
        #[source]
        source: rcgen::Error,
    },

    #[error("{name} exited during start-up ({status}); last lines of {log}:\n{tail}")]
    ComponentExited {
        name: String,
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error("timed out after {seconds}s waiting for {what}; last lines of {log}:\n{tail}")]
    Timeout {
        what: String,
        seconds: u64,
        log: PathBuf,
        tail: String,
    },

    #[error("Kubernetes client: {context}")]
    Kube {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("state directory {dir}: {reason}")]
    State { dir: PathBuf, reason: String },

    #[error("invalid Kubernetes version {input:?}: {reason}")]
    Version { input: String, reason: String },

    #[error("stopping {name} (pid {pid}): {reason}")]
    Stop {
        name: String,
        pid: i32,
        reason: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        context: &'static str,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            path,
            context,
            source,
        }
    }

    pub(crate) fn kube<E>(context: impl Into<String>) -> impl FnOnce(E) -> Error
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let context = context.into();
        move |source| Error::Kube {
            context,
            source: Box::new(source),
        }
    }
}
