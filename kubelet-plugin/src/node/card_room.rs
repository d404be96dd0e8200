//! Whether a claim that may not spill finds its share free on an overcommitted GPU's card.
//!
//! The shims of claims that opted in to oversubscription leave the card memory owed to prepared
//! claims that did not alone (the reservation file), but what they already hold when such a
//! claim arrives stays on the card: cuMemAlloc memory cannot be moved. So before the first
//! preparation of a claim that may not spill, the plugin adds up what is taken on each of its
//! overcommitted GPUs — bytes the live opted-in claims hold there (their memory board) and the
//! shares of the other prepared claims that may not spill — and refuses the preparation, with
//! the figures, when the claim's share is not left. The kubelet retries it; meanwhile the claim
//! is counted as reserved, so the opted-in claims take nothing more and the card frees up as
//! they free memory. The claim starts late instead of starting and failing to allocate.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::fcntl::{FcntlArg, fcntl};
use tessera_api::board::{EntryKind, is_board_name};
use tessera_api::memory_board::{ENTRY_SIZE, parse_entry};
use tessera_driver::fsutil;

/// Bytes the live claims that may spill hold on the card of GPU `uuid`, from their memory
/// entries in `boards_dir/<uuid>/` (0 when no claim has an entry there). Each claim writes its
/// own entry: files are opened as untrusted (a symlink or a FIFO is an error, never followed or
/// waited on) and only one entry's bytes are read from each.
pub fn held_by_spilling_claims(boards_dir: &Path, uuid: &str) -> io::Result<u64> {
    let dir = boards_dir.join(uuid);
    let listing = match std::fs::read_dir(&dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    };
    let mut held = 0u64;
    for name in listing {
        let name = name?.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.ends_with(EntryKind::Memory.suffix()) || !is_board_name(name) {
            continue;
        }
        let path = dir.join(name);
        let file = match fsutil::open_untrusted(&path) {
            Ok(file) => file,
            // Unprepared meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let bytes = fsutil::read_prefix(&file, ENTRY_SIZE)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let Some(entry) = parse_entry(&bytes).filter(|e| e.spills) else {
            continue;
        };
        if live(&file).map_err(|e| io::Error::other(format!("{}: locks: {e}", path.display())))? {
            held = held.saturating_add(entry.resident);
        }
    }
    Ok(held)
}

/// Whether some process holds a lock on the entry (its claim has a live process).
fn live(file: &File) -> nix::Result<bool> {
    let mut lock = entry_lock(nix::libc::F_WRLCK);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut lock))?;
    Ok(lock.l_type != nix::libc::F_UNLCK as nix::libc::c_short)
}

/// A lock of `kind` on an entry's bytes.
fn entry_lock(kind: nix::libc::c_int) -> nix::libc::flock {
    nix::libc::flock {
        l_type: kind as nix::libc::c_short,
        l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
        l_start: 0,
        l_len: ENTRY_SIZE as nix::libc::off_t,
        l_pid: 0,
    }
}

/// One GPU's card as a claim that may not spill would find it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardRoom {
    pub physical: u64,
    /// What the live opted-in claims hold on it.
    pub held_by_spilling: u64,
    /// The shares of the other prepared (or waiting) claims that may not spill.
    pub reserved: u64,
}

impl CardRoom {
    pub fn free(&self) -> u64 {
        self.physical
            .saturating_sub(self.held_by_spilling)
            .saturating_sub(self.reserved)
    }

    /// `Err` with the reason when `need` bytes are not free.
    pub fn check(&self, uuid: &str, need: u64) -> Result<(), String> {
        if need <= self.free() {
            return Ok(());
        }
        Err(format!(
            "GPU {uuid} is overcommitted and its card has {} free for claims that may not spill ({} of {} held by claims that opted in to oversubscription, {} owed to other prepared claims); this claim needs {} on the card, so it is not prepared until that much is free (the kubelet retries; until then the opted-in claims take no more of the card)",
            gib(self.free()),
            gib(self.held_by_spilling),
            gib(self.physical),
            gib(self.reserved),
            gib(need),
        ))
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use tessera_api::memory_board::{
        CLAIM_OFFSET, FLAG_SPILLS, FLAGS_OFFSET, LIMIT_OFFSET, RESIDENT_OFFSET,
    };

    const GIB: u64 = 1 << 30;

    /// Writes `owner`'s memory entry on GPU-x as its shim would and, when `alive`, holds its
    /// lock the way a process of the claim does (an open file description of its own).
    fn entry(
        boards: &Path,
        owner: &str,
        claim: u64,
        spills: bool,
        resident: u64,
        alive: bool,
    ) -> Option<File> {
        let dir = boards.join("GPU-x");
        std::fs::create_dir_all(&dir).expect("GPU dir");
        let path = dir.join(format!("{owner}.memory"));
        std::fs::write(&path, [0u8; ENTRY_SIZE]).expect("entry");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("entry");
        for (offset, value) in [
            (CLAIM_OFFSET, claim),
            (LIMIT_OFFSET, 6 * GIB),
            (FLAGS_OFFSET, if spills { FLAG_SPILLS } else { 0 }),
            (RESIDENT_OFFSET, resident),
        ] {
            file.write_all_at(&value.to_ne_bytes(), offset as u64)
                .expect("write entry");
        }
        alive.then(|| {
            let lock = entry_lock(nix::libc::F_RDLCK);
            fcntl(&file, FcntlArg::F_OFD_SETLK(&lock)).expect("lock");
            file
        })
    }

    #[test]
    fn only_live_opted_in_claims_count_with_their_bytes_on_the_card() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            held_by_spilling_claims(dir.path(), "GPU-x").expect("no board"),
            0
        );
        let _a = entry(dir.path(), "a", 5, true, 3 * GIB, true);
        let _b = entry(dir.path(), "b", 7, true, 2 * GIB, true);
        // Its process is gone: its bytes went with it.
        let dead = entry(dir.path(), "dead", 9, true, 4 * GIB, false);
        assert!(dead.is_none());
        // Not opted in: counted by the reservation, not here.
        let _fixed = entry(dir.path(), "fixed", 11, false, 0, true);
        // Compute entries are not memory entries.
        std::fs::write(dir.path().join("GPU-x/a.compute"), [0xffu8; ENTRY_SIZE]).expect("compute");
        assert_eq!(
            held_by_spilling_claims(dir.path(), "GPU-x").expect("board"),
            5 * GIB
        );
    }

    /// Whatever sits at an entry's name, the plugin neither follows it, waits on it, nor reads
    /// more than an entry. (Tenants cannot plant these any more: the GPU directories are the
    /// plugin's and a container's own entries are bind mounts; the checks stay as a second wall.)
    #[test]
    fn a_hostile_entry_is_refused_or_read_bounded_never_followed_or_waited_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gpu = dir.path().join("GPU-x");
        std::fs::create_dir_all(&gpu).expect("GPU dir");
        let path = gpu.join("hostile.memory");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, [0u8; ENTRY_SIZE]).expect("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("symlink");
        let error = held_by_spilling_claims(dir.path(), "GPU-x").expect_err("symlink");
        assert!(error.to_string().contains("symbolic link"), "{error}");

        std::fs::remove_file(&path).expect("remove");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o666))
            .expect("mkfifo");
        // No writer ever opens the FIFO: a blocking open would hang the plugin here.
        let error = held_by_spilling_claims(dir.path(), "GPU-x").expect_err("FIFO");
        assert!(error.to_string().contains("not a regular file"), "{error}");
        std::fs::remove_file(&path).expect("remove");

        let file = entry(dir.path(), "hostile", 5, true, 3 * GIB, true).expect("live");
        file.set_len(1 << 40).expect("extended to a sparse TiB");
        assert_eq!(
            held_by_spilling_claims(dir.path(), "GPU-x").expect("extended"),
            3 * GIB
        );
        file.set_len(10).expect("truncated");
        assert_eq!(
            held_by_spilling_claims(dir.path(), "GPU-x").expect("truncated"),
            0
        );
    }

    #[test]
    fn a_share_that_is_not_free_is_refused_with_the_figures() {
        let room = CardRoom {
            physical: 16 * GIB,
            held_by_spilling: 10 * GIB,
            reserved: 2 * GIB,
        };
        assert_eq!(room.free(), 4 * GIB);
        assert!(room.check("GPU-x", 4 * GIB).is_ok());
        let error = room.check("GPU-x", 6 * GIB).expect_err("6 GiB do not fit");
        for part in [
            "GPU GPU-x",
            "4.00 GiB free",
            "10.00 GiB of 16.00 GiB held by claims that opted in",
            "2.00 GiB owed",
            "needs 6.00 GiB",
            "retries",
        ] {
            assert!(error.contains(part), "{part:?} in {error}");
        }
    }
}
