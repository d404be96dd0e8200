//! Serialises prepare and unprepare across plugin instances: during a rolling update two plugin
//! pods run at once and the kubelet may call either, so every call takes an exclusive `flock` on
//! `<plugin-dir>/serialize.lock` (the same file name the upstream Go helper uses) and reloads its
//! state from disk under it.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// A held lock; dropping it (closing the file) releases it.
pub struct CallLock {
    _file: File,
}

/// The lock file of a plugin directory.
pub fn lock_path(plugin_dir: &Path) -> PathBuf {
    plugin_dir.join("serialize.lock")
}

/// Waits for the lock without blocking the async runtime.
pub async fn acquire(plugin_dir: &Path) -> io::Result<CallLock> {
    let path = lock_path(plugin_dir);
    tokio::task::spawn_blocking(move || {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // flock: held per open file description, released by the kernel if the process dies.
        file.lock()?;
        Ok(CallLock { _file: file })
    })
    .await
    .map_err(io::Error::other)?
}
