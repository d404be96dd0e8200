//! Memory oversubscription: where an opted-in claim's allocation goes when the GPU's physical
//! memory is overcommitted (see `docs/oversubscription.md`).
//!
//! The claims on one GPU meet on a **memory board**: each claim has its own entry per GPU
//! (`tessera_api::board`), {claim key, memory limit, flags, device-resident bytes}. Every claim on an overcommitted
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
//! lock, so a claim's first process resets the entry only when no other process of it is alive.
//! No PIDs, no clocks.
//!
//! Claims that did not opt in only write their entry once, at start-up: their allocation path
//! is unchanged.

use std::sync::atomic::{AtomicU64, Ordering};

use tessera_api::board::EntryKind;
use tessera_api::memory_board::{
    CLAIM_OFFSET, ENTRY_SIZE, FLAG_SPILLS, FLAGS_OFFSET, LIMIT_OFFSET, RESIDENT_OFFSET,
    parse_entry, reservation_file_name,
};

use crate::board_files::{BoardPaths, Neighbours, OwnEntry, coarse_now};

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
    own: OwnEntry,
    others: Neighbours,
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
        let now = coarse_now();
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

/// An OFD lock request on an entry's 64 bytes.
fn entry_lock(fd: i32, kind: i32, cmd: i32) -> bool {
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = ENTRY_SIZE as libc::off_t;
    loop {
        // SAFETY: fcntl with a valid flock on a descriptor the caller holds.
        if unsafe { libc::fcntl(fd, cmd, &mut lock) } == 0 {
            return cmd != libc::F_OFD_GETLK || lock.l_type != libc::F_UNLCK as libc::c_short;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

impl MemoryBoard {
    /// Maps `claim`'s memory entry for GPU `uuid` (see [`BoardPaths`]) and publishes its `limit`
    /// and whether it `spills`. `None` when the board cannot be used.
    pub fn open(
        paths: &BoardPaths,
        reservations: Option<&str>,
        uuid: &str,
        claim: u64,
        limit: u64,
        spills: bool,
    ) -> Option<Self> {
        let board = MemoryBoard {
            own: paths.own(uuid, EntryKind::Memory)?,
            others: paths.neighbours(uuid, EntryKind::Memory),
            claim,
            reservation: Reservation {
                path: reservations
                    .map(|dir| std::path::Path::new(dir).join(reservation_file_name(uuid))),
                bytes: AtomicU64::new(0),
                read_at: AtomicU64::new(0),
            },
        };
        board.join(limit, if spills { FLAG_SPILLS } else { 0 })?;
        Some(board)
    }

    fn entry(&self) -> &Entry {
        // SAFETY: the mapping holds one Entry and lives as long as self.
        unsafe { &*self.own.base.cast::<Entry>() }
    }

    /// Publishes the claim's entry and holds it live (a shared lock, for as long as this
    /// process lives). The first live process of the claim resets it (exclusive lock first, so
    /// that nobody reads a half-written entry as live); later ones join it.
    fn join(&self, limit: u64, flags: u64) -> Option<()> {
        let fd = self.own.fd;
        let entry = self.entry();
        if entry_lock(fd, libc::F_WRLCK, libc::F_OFD_SETLK) {
            entry.resident.store(0, Ordering::Release);
        }
        entry.limit.store(limit, Ordering::Release);
        entry.flags.store(flags, Ordering::Release);
        entry.claim.store(self.claim, Ordering::Release);
        // Converting our own lock to a shared one is atomic; a process of the claim that holds
        // the exclusive lock right now is done with it in microseconds.
        entry_lock(fd, libc::F_RDLCK, libc::F_OFD_SETLKW).then_some(())
    }

    /// Publishes the claim's device-resident bytes (claims that may spill). Sequentially
    /// consistent, and read by the others with a system call after it: of two claims that each
    /// publish and then read the other, at least one sees the other's figure (see
    /// [`Spill::admit`]).
    #[inline]
    pub fn publish_resident(&self, bytes: u64) {
        self.entry().resident.store(bytes, Ordering::SeqCst);
    }

    /// What the claims other than this one hold or reserve on the card: the limits of those
    /// that may not spill (at least what the plugin says prepared ones are owed), the resident
    /// bytes of those that may. With `live_only`, entries no process holds are left out (one
    /// `fcntl` per entry); without, every entry counts, which can only over-state the others.
    /// Each entry is read fresh from its file (a `pread`): a claim's entry is its own to
    /// truncate, so no other claim maps it.
    pub fn others(&self, live_only: bool) -> u64 {
        let mut reserved = 0u64;
        let mut resident = 0u64;
        self.others
            .visit(crate::board_files::coarse_now(), |_, bytes, fd| {
                let Some(entry) = parse_entry(bytes) else {
                    return;
                };
                if entry.claim == self.claim {
                    return;
                }
                // Live: some process holds a lock that conflicts with an exclusive one.
                if live_only && !entry_lock(fd, libc::F_WRLCK, libc::F_OFD_GETLK) {
                    return;
                }
                if entry.spills {
                    resident = resident.saturating_add(entry.resident);
                } else {
                    reserved = reserved.saturating_add(entry.limit);
                }
            });
        reserved
            .max(self.reservation.bytes())
            .saturating_add(resident)
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
        let paths = BoardPaths::resolve(
            Some(dir.into()),
            &format!("claim-{claim}"),
            tessera_api::Priority::Normal,
        )
        .expect("paths");
        MemoryBoard::open(&paths, Some(dir), "GPU-t", claim, limit, spills).expect("board")
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
        again.publish_resident(1);
        assert_eq!(
            a.entry().resident.load(Ordering::SeqCst),
            1,
            "processes of one claim share its entry"
        );
        again.publish_resident(0);
        drop(again);
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
        // A new entry file is seen at the next listing of the GPU's directory (on a node the
        // plugin creates it when it prepares the claim, long before the claim's processes run).
        std::thread::sleep(std::time::Duration::from_millis(150));
        assert_eq!(a.others(true), 3 << 30);
        drop(c);
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
        /// Another claim's entry holds whatever that claim wrote (any length, any bytes), and
        /// the reservation file is read as text: the sums saturate and nothing panics or reads
        /// past what is there.
        #[test]
        fn any_neighbour_and_reservation_contents_are_survived(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3 * ENTRY_SIZE),
            reservation in "\\PC{0,24}",
            resident in proptest::prelude::any::<u64>(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let spill = Spill {
                physical: 8 << 30,
                limit: 4 << 30,
                board: Some(open(dir.path(), 5, 1 << 30, true)),
            };
            std::fs::write(dir.path().join("GPU-t").join("theirs.memory"), &raw).expect("entry");
            std::fs::write(dir.path().join(reservation_file_name("GPU-t")), reservation)
                .expect("reservation");
            spill.admit(resident);
            spill.fits(resident);
            if let Some(board) = &spill.board {
                board.others(true);
            }
        }
    }
}
