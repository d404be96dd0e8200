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

//!
//! Some directories the plugin reads are writable by containers (the board directory; a claim's
//! region is the claim's own to write). [`open_untrusted`] and [`read_prefix`] read there
//! without following a planted symlink, without blocking on a planted FIFO, and without reading
//! more than the format's size, whatever a container did to the file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
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
    // CDI cache ignores names that do not end in .json/.yaml). The temporary is created with
    // O_EXCL under a random name: whatever sits in the directory (a planted symlink, another
    // instance's temporary), it is never opened, followed or truncated.
    let mut file = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    // The umask may have cleared bits of `mode` (0666 regions must stay world-writable).
    file.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    if durable {
        file.as_file().sync_all()?;
    }
    // rename(2) replaces the name itself: a symlink there is replaced, not followed. On an
    // error the temporary is removed when `file` drops.
    file.persist(path).map(drop).map_err(|e| e.error)
}

/// Opens for reading a file that a container may have written or replaced: never through a
/// symlink (`O_NOFOLLOW`), never blocking (`O_NONBLOCK`: a FIFO opens at once and is then
/// refused), and only a regular file. The error names the path.
pub fn open_untrusted(path: &Path) -> io::Result<File> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is a symbolic link; refusing to follow it",
                    path.display()
                ),
            ),
            _ => named(e),
        })?;
    if !file.metadata().map_err(named)?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// The first `limit` bytes of `file` (fewer if it is shorter): a file extended to any size, a
/// sparse terabyte included, costs one bounded read.
pub fn read_prefix(mut file: &File, limit: usize) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(limit.min(1 << 20));
    Read::by_ref(&mut file)
        .take(limit as u64)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
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

    /// A container that can write the directory plants symlinks under every name a temporary
    /// could have (the old names were `.<name>.<pid>.tmp`): the victim stays untouched.
    #[test]
    fn a_planted_symlink_never_redirects_a_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"host file").expect("victim");
        let target = dir.path().join("GPU-x.reserved");
        let pid = std::process::id();
        for name in [
            format!(".GPU-x.reserved.{pid}.tmp"),
            ".GPU-x.reserved.tmp".into(),
        ] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).expect("plant");
        }
        write_atomic(&target, b"42\n", 0o644).expect("write");
        assert_eq!(fs::read(&victim).expect("victim"), b"host file");
        assert_eq!(fs::read(&target).expect("target"), b"42\n");
        // A symlink at the target's own name is replaced, not followed.
        fs::remove_file(&target).expect("remove");
        std::os::unix::fs::symlink(&victim, &target).expect("plant at the target");
        write_durable(&target, b"7\n", 0o644).expect("write");
        assert!(
            !fs::symlink_metadata(&target)
                .expect("stat")
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&victim).expect("victim"), b"host file");
    }

    #[test]
    fn untrusted_files_are_read_without_following_blocking_or_reading_past_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"secret").expect("victim");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).expect("symlink");
        let error = open_untrusted(&link).expect_err("a symlink is refused");
        assert!(error.to_string().contains("is a symbolic link"), "{error}");

        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(status.success());
        // No writer ever opens the FIFO: a blocking open would hang here for good.
        let error = open_untrusted(&fifo).expect_err("a FIFO is refused");
        assert!(
            error.to_string().contains("is not a regular file"),
            "{error}"
        );
        let error = open_untrusted(dir.path()).expect_err("a directory is refused");
        assert!(
            error.to_string().contains("is not a regular file"),
            "{error}"
        );

        let sparse = dir.path().join("sparse");
        let file = File::create(&sparse).expect("create");
        file.set_len(1 << 40).expect("a 1 TiB sparse file");
        let file = open_untrusted(&sparse).expect("a regular file opens");
        assert_eq!(read_prefix(&file, 4096).expect("read").len(), 4096);
        assert_eq!(
            read_prefix(&open_untrusted(&victim).expect("open"), 4096).expect("read"),
            b"secret"
        );
    }
}
