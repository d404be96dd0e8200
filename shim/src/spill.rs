//! Memory oversubscription: where an opted-in claim's allocation goes when the GPU's physical
//! memory is overcommitted (see `docs/oversubscription.md`).
//!
//! The claims on one GPU meet on a **memory board**, `<board dir>/<GPU UUID>.memory`: 64 entries
//! of {claim key, memory limit, flags, device-resident bytes}. Every claim on an overcommitted
//! GPU publishes its limit and whether it may spill when it starts; a claim that may spill also
//! publishes, after each of its device allocations and frees, the bytes it holds on the card.
//! From that, an opted-in claim computes how much of the card it may use:
//!
//! ```text
//! allowance = physical − Σ limits of live claims that may not spill
//!                      − Σ device-resident bytes of the other live claims that may spill
//! ```
//!
//! so the claims that did not opt in always find their whole limit on the card. An entry is
//! live while a process of its claim holds a shared open-file-description lock on its bytes (the
//! kernel drops it when the process dies, however it dies); taking an entry needs the exclusive
//! lock, so a live claim's entry is never taken. No PIDs, no clocks.
//!
//! Claims that did not opt in only write their entry once, at start-up: their allocation path
//! is unchanged.

use std::sync::atomic::{AtomicU64, Ordering};

use tessera_api::memory_board::{
    CLAIM_OFFSET, ENTRIES, ENTRY_SIZE, FILE_SIZE, FLAG_SPILLS, FLAGS_OFFSET, LIMIT_OFFSET,
    RESIDENT_OFFSET, board_file_name, reservation_file_name,
};

#[repr(C, align(64))]
struct Entry {
    claim: AtomicU64,
    limit: AtomicU64,
    flags: AtomicU64,
    resident: AtomicU64,
    _reserved: [u64; 4],
}

const _: () = {
    assert!(size_of::<Entry>() == ENTRY_SIZE);
    assert!(std::mem::offset_of!(Entry, claim) == CLAIM_OFFSET);
    assert!(std::mem::offset_of!(Entry, limit) == LIMIT_OFFSET);
    assert!(std::mem::offset_of!(Entry, flags) == FLAGS_OFFSET);
    assert!(std::mem::offset_of!(Entry, resident) == RESIDENT_OFFSET);
};

pub struct MemoryBoard {
    fd: i32,
    base: *mut Entry,
    mine: usize,
    claim: u64,
    reservation: Reservation,
}

/// How often the plugin's reservation file is read again: it changes when claims are prepared
/// or unprepared, which comes well before their containers start.
const RESERVATION_REFRESH_NS: u64 = 100_000_000;

/// The plugin's `<reservations dir>/<UUID>.reserved` (decimal bytes): what the GPU's prepared claims
/// that may not spill are owed on the card, whether or not their processes have started (their
/// board entries appear only then). Missing or unreadable reads as 0: the board alone decides.
struct Reservation {
    /// `None` without a reservations directory.
    path: Option<std::path::PathBuf>,
    bytes: AtomicU64,
    read_at: AtomicU64,
}

impl Reservation {
    fn bytes(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer; a vDSO read. Real time, not the fake driver's clock.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        let now = (ts.tv_sec as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(ts.tv_nsec as u64)
            .max(1);
        let last = self.read_at.load(Ordering::Relaxed);
        if last == 0 || now.wrapping_sub(last) >= RESERVATION_REFRESH_NS {
            let value = self
                .path
                .as_ref()
                .and_then(|path| std::fs::read_to_string(path).ok())
                .and_then(|text| text.trim().parse::<u64>().ok())
                .unwrap_or(0);
            self.bytes.store(value, Ordering::Relaxed);
            self.read_at.store(now, Ordering::Relaxed);
        }
        self.bytes.load(Ordering::Relaxed)
    }
}

// SAFETY: a shared mapping accessed only through atomics; the descriptor is only used for locks.
unsafe impl Send for MemoryBoard {}
unsafe impl Sync for MemoryBoard {}

impl MemoryBoard {
    /// Maps (creating it if absent) the memory board of `uuid` in `dir` and publishes `claim`'s
    /// `limit` and whether it `spills`. `None` when the board cannot be used.
    pub fn open(
        dir: &str,
        reservations: Option<&str>,
        uuid: &str,
        claim: u64,
        limit: u64,
        spills: bool,
    ) -> Option<Self> {
        // The descriptor stays open: it holds our entry's lock.
        let (fd, base) =
            crate::shared_file::map_shared(&format!("{dir}/{}", board_file_name(uuid)), FILE_SIZE)?;
        let mut board = MemoryBoard {
            fd,
            base: base.cast(),
            mine: 0,
            claim,
            reservation: Reservation {
                path: reservations
                    .map(|dir| std::path::Path::new(dir).join(reservation_file_name(uuid))),
                bytes: AtomicU64::new(0),
                read_at: AtomicU64::new(0),
            },
        };
        board.mine = board.take_entry(limit, if spills { FLAG_SPILLS } else { 0 })?;
        Some(board)
    }

    fn entry(&self, index: usize) -> &Entry {
        // SAFETY: index < ENTRIES, inside the mapping, which lives as long as self.
        unsafe { &*self.base.add(index.min(ENTRIES - 1)) }
    }

    fn lock(&self, index: usize, kind: i32, cmd: i32) -> bool {
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = kind as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = (index * ENTRY_SIZE) as libc::off_t;
        lock.l_len = ENTRY_SIZE as libc::off_t;
        loop {
            // SAFETY: fcntl with a valid flock on our descriptor.
            if unsafe { libc::fcntl(self.fd, cmd, &mut lock) } == 0 {
                return cmd != libc::F_OFD_GETLK || lock.l_type != libc::F_UNLCK as libc::c_short;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return false;
            }
        }
    }

    fn take_entry(&self, limit: u64, flags: u64) -> Option<usize> {
        // Join the claim's entry if one of its processes holds it (shared lock).
        for index in 0..ENTRIES {
            let entry = self.entry(index);
            if entry.claim.load(Ordering::Acquire) != self.claim {
                continue;
            }
            if self.lock(index, libc::F_RDLCK, libc::F_OFD_SETLK) {
                if entry.claim.load(Ordering::Acquire) == self.claim {
                    entry.limit.store(limit, Ordering::Release);
                    entry.flags.store(flags, Ordering::Release);
                    return Some(index);
                }
                self.lock(index, libc::F_UNLCK, libc::F_OFD_SETLK);
            }
        }
        // Take an entry nobody alive holds (exclusive lock), fill it, then share it.
        for index in 0..ENTRIES {
            if !self.lock(index, libc::F_WRLCK, libc::F_OFD_SETLK) {
                continue;
            }
            let entry = self.entry(index);
            entry.limit.store(limit, Ordering::Release);
            entry.flags.store(flags, Ordering::Release);
            entry.resident.store(0, Ordering::Release);
            entry.claim.store(self.claim, Ordering::Release);
            // Converting our own lock to a shared one is atomic: nobody can take it between.
            self.lock(index, libc::F_RDLCK, libc::F_OFD_SETLK);
            return Some(index);
        }
        None
    }

    /// Publishes the claim's device-resident bytes (claims that may spill). Sequentially
    /// consistent with the loads in [`others`](Self::others): of two claims that each publish
    /// and then read the other, at least one sees the other's figure (see [`Spill::admit`]).
    #[inline]
    pub fn publish_resident(&self, bytes: u64) {
        let entry = self.entry(self.mine);
        if entry.claim.load(Ordering::Relaxed) == self.claim {
            entry.resident.store(bytes, Ordering::SeqCst);
        }
    }

    /// What the claims other than this one hold or reserve on the card: the limits of those
    /// that may not spill (at least what the plugin says prepared ones are owed), the resident
    /// bytes of those that may. With `live_only`, entries no process holds are left out (one
    /// `fcntl` per entry in use); without, every entry counts, which can only over-state the
    /// others (no system call but the reservation file's, at most every 100 ms).
    pub fn others(&self, live_only: bool) -> u64 {
        let mut reserved = 0u64;
        let mut resident = 0u64;
        for index in (0..ENTRIES).filter(|&i| i != self.mine) {
            let entry = self.entry(index);
            let claim = entry.claim.load(Ordering::Acquire);
            if claim == 0 || claim == self.claim {
                continue;
            }
            // Live: some process holds a lock that conflicts with an exclusive one.
            if live_only && !self.lock(index, libc::F_WRLCK, libc::F_OFD_GETLK) {
                continue;
            }
            if entry.flags.load(Ordering::Acquire) & FLAG_SPILLS != 0 {
                resident = resident.saturating_add(entry.resident.load(Ordering::SeqCst));
            } else {
                reserved = reserved.saturating_add(entry.limit.load(Ordering::Acquire));
            }
        }
        reserved
            .max(self.reservation.bytes())
            .saturating_add(resident)
    }
}

impl Drop for MemoryBoard {
    fn drop(&mut self) {
        // SAFETY: the mapping and descriptor made in open.
        unsafe {
            libc::munmap(self.base.cast(), FILE_SIZE);
            libc::close(self.fd);
        }
    }
}

/// The spill policy of one claim device.
pub struct Spill {
    /// The GPU's physical memory.
    pub physical: u64,
    /// Host bytes the claim may spill to, across its processes.
    pub limit: u64,
    /// The memory board; `None` when there is none (the claim then spills only when the driver
    /// itself reports the card full).
    pub board: Option<MemoryBoard>,
}

impl Spill {
    /// Publishes the claim's device-resident bytes on the board, if there is one.
    #[inline]
    pub fn publish(&self, resident: u64) {
        if let Some(board) = &self.board {
            board.publish_resident(resident);
        }
    }

    /// Whether the claim may take the card bytes that bring it to `resident`: publishes
    /// `resident` first, then checks it [`fits`](Self::fits). Publishing before looking is what
    /// keeps two opted-in claims from both taking the card's last bytes: each publishes, then
    /// reads the other's figure, and sequential consistency lets at most one of them miss the
    /// other's (two that both see each other may both spill, which costs speed, never a
    /// non-opted claim its share). When it does not fit, the caller publishes its figure without
    /// these bytes again.
    #[inline]
    pub fn admit(&self, resident: u64) -> bool {
        self.publish(resident);
        self.fits(resident)
    }

    /// Whether the claim may hold `resident` device bytes on the card without eating the
    /// others' share. Clearly within the card (even counting entries of claims that are gone),
    /// this is a few atomic loads; only near the edge are the entries' owners checked alive.
    #[inline]
    pub fn fits(&self, resident: u64) -> bool {
        match &self.board {
            Some(board) => {
                resident <= self.physical.saturating_sub(board.others(false))
                    || resident <= self.physical.saturating_sub(board.others(true))
            }
            None => resident <= self.physical,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, claim: u64, limit: u64, spills: bool) -> MemoryBoard {
        let dir = dir.to_str().expect("utf-8");
        MemoryBoard::open(dir, Some(dir), "GPU-t", claim, limit, spills).expect("board")
    }

    #[test]
    fn reserved_limits_and_resident_bytes_count_for_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        // All in one process: OFD locks of different descriptors still conflict, as between
        // processes, so liveness reads the same.
        let fixed = open(dir.path(), 3, 6 << 30, false);
        let a = open(dir.path(), 5, 6 << 30, true);
        let b = open(dir.path(), 7, 6 << 30, true);
        assert_eq!(a.others(true), 6 << 30, "the non-spilling claim's limit");
        b.publish_resident(1 << 30);
        assert_eq!(a.others(true), 7 << 30);
        assert_eq!(b.others(true), 6 << 30, "its own bytes do not count");
        let again = open(dir.path(), 5, 6 << 30, true);
        assert_eq!(again.mine, a.mine, "processes of one claim share its entry");
        drop(fixed);
        assert_eq!(
            a.others(true),
            1 << 30,
            "a claim with no live process counts nothing"
        );
        assert_eq!(a.others(false), 7 << 30, "the quick bound still counts it");
        let spill = Spill {
            physical: 8 << 30,
            limit: 6 << 30,
            board: Some(a),
        };
        assert!(spill.fits(7 << 30), "near the edge, only live claims count");
        assert!(!spill.fits((7 << 30) + 1));
        let a = spill.board.expect("board");
        let c = open(dir.path(), 9, 2 << 30, false);
        assert_eq!(c.mine, 0, "the dead claim's entry is taken");
        assert_eq!(a.others(true), 3 << 30);
    }

    #[test]
    fn two_claims_racing_for_the_last_bytes_never_both_get_them() {
        // 6 + 6 GiB on an 8 GiB card: either claim fits alone, never both at once. Each thread
        // plays one claim taking and giving back 6 GiB as fast as it can; `on_card` is what the
        // admitted claims hold, and must never pass the card.
        let dir = tempfile::tempdir().expect("tempdir");
        let physical = 8u64 << 30;
        let on_card = std::sync::Arc::new(AtomicU64::new(0));
        let admitted = std::sync::Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = [5u64, 7]
            .into_iter()
            .map(|claim| {
                let spill = Spill {
                    physical,
                    limit: 6 << 30,
                    board: Some(open(dir.path(), claim, 6 << 30, true)),
                };
                let (on_card, admitted) = (on_card.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..200_000 {
                        if spill.admit(6 << 30) {
                            let held = on_card.fetch_add(6 << 30, Ordering::SeqCst) + (6 << 30);
                            assert!(held <= physical, "both claims hold 6 GiB on the card");
                            admitted.fetch_add(1, Ordering::Relaxed);
                            on_card.fetch_sub(6 << 30, Ordering::SeqCst);
                        }
                        spill.publish(0);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no claim overran the card");
        }
        assert!(
            admitted.load(Ordering::Relaxed) > 0,
            "the card was used at all"
        );
    }

    #[test]
    fn the_plugins_reservation_counts_for_claims_not_started_yet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = open(dir.path(), 5, 6 << 30, true);
        assert_eq!(a.others(true), 0, "no reservation file: the board alone");
        // Two claims that may not spill are prepared; neither has a process yet.
        std::fs::write(
            dir.path().join("GPU-t.reserved"),
            format!("{}\n", 5u64 << 30),
        )
        .expect("reserve");
        let b = open(dir.path(), 7, 6 << 30, true);
        assert_eq!(b.others(true), 5 << 30);
        // One of them starts: its live entry and the reservation overlap, counted once.
        let fixed = open(dir.path(), 3, 3 << 30, false);
        assert_eq!(b.others(true), 5 << 30);
        drop(fixed);
        std::fs::write(dir.path().join("GPU-t.reserved"), "garbage").expect("corrupt");
        let c = open(dir.path(), 9, 6 << 30, true);
        assert_eq!(c.others(true), 0, "an unreadable reservation reads as 0");
    }

    proptest::proptest! {
        /// Every claim on the GPU can write the memory board, and the reservation file is read
        /// as text: whatever they hold, the sums saturate and nothing panics or reads past the
        /// mapping.
        #[test]
        fn any_board_and_reservation_contents_are_survived(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2 * FILE_SIZE),
            reservation in "\\PC{0,24}",
            resident in proptest::prelude::any::<u64>(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join(board_file_name("GPU-t")), &raw).expect("board");
            std::fs::write(dir.path().join(reservation_file_name("GPU-t")), reservation)
                .expect("reservation");
            let board = MemoryBoard::open(
                dir.path().to_str().expect("utf-8"),
                Some(dir.path().to_str().expect("utf-8")),
                "GPU-t",
                5,
                1 << 30,
                true,
            );
            let spill = Spill { physical: 8 << 30, limit: 4 << 30, board };
            spill.admit(resident);
            spill.fits(resident);
            if let Some(board) = &spill.board {
                board.others(true);
            }
        }
    }
}
