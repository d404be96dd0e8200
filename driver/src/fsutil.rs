//! Crash-safe file writes: a reader (the container runtime, the shim, a restarted plugin) sees
//! either the old file or the complete new one, never a torn one.
//!
//! Two strengths. [`write_atomic`] is atomic against a crash of the writing process (the page
//! cache outlives it), which is all that claim files need: a power loss means a reboot, after
//! which the checkpoint's boot ID makes every claim be prepared afresh, and `/var/run/cdi` is
//! gone anyway. [`write_durable`] also survives a power loss: the new file's data is fsynced
//! before the rename, so after a power cut the name points at the old contents or the new ones,
//! both complete. (The directory is not fsynced: that would only guarantee *which* of the two
//! survives, and either is a valid state.) The plugin uses it only for the shim copy: each
//! fsync costs milliseconds (and on ext4 a journal commit that waits for every dirty page of
//! the file system), and the checkpoint copes with a power cut without it (see
//! `Checkpoint::load_since_boot`).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `bytes` to `path` atomically with permission bits `mode`: a temporary file in the same
/// directory, renamed over the target.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write(path, bytes, mode, false)
}

/// Like [`write_atomic`], and the data is on disk before the rename, so a power cut leaves the
/// old or the new contents, never an empty file.
pub fn write_durable(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write(path, bytes, mode, true)
}

fn write(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // A leading dot keeps half-written files out of directory watchers that skip dotfiles (the
    // CDI cache ignores names that do not end in .json/.yaml; the pid keeps instances apart).
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits of `mode` (0666 regions must stay world-writable).
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes a file; a file that is already gone is success (unprepare is idempotent).
pub fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes a directory tree; one that is already gone is success.
pub fn remove_dir_all(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_whole_files_with_the_mode_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("region");
        write_atomic(&path, b"first", 0o666).expect("write");
        write_durable(&path, b"second", 0o666).expect("rewrite");
        assert_eq!(fs::read(&path).expect("read"), b"second");
        assert_eq!(
            fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
            0o666
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path()).expect("list").collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        remove_file(&path).expect("remove");
        remove_file(&path).expect("removing twice is fine");
        remove_dir_all(&dir.path().join("absent")).expect("absent dir is fine");
    }
}
