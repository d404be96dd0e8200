//! The GPU's board: which claims on one GPU are active, at what priority — how a claim learns
//! that a higher-priority neighbour wants the GPU, or that the GPU is otherwise idle.
//!
//! One small file per GPU, `<board dir>/<GPU UUID>`, mapped by every process of every claim on
//! the GPU on this node. A claim takes an entry (by a hash of its UID) and, while it launches,
//! stamps it with the limiter's clock. Nothing here is a limit: a claim that does not stamp (an
//! old shim) is simply invisible, and a forged entry can only make its neighbours yield, which
//! is why the directory is the kubelet plugin's to create and mount.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const ENTRIES: usize = 64;
const FILE_SIZE: usize = ENTRIES * size_of::<Entry>();
/// An entry not stamped for this long (ns) may be taken by another claim.
const ABANDONED_NS: u64 = 60_000_000_000;

#[repr(C, align(64))]
struct Entry {
    claim: AtomicU64,
    /// Priority rank + 1 (0 = not yet written).
    rank: AtomicU32,
    cores: AtomicU32,
    last_active: AtomicU64,
    _reserved: [u64; 5],
}

const _: () = assert!(size_of::<Entry>() == 64);

/// What the other claims on the GPU are doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Neighbours {
    /// A claim of higher priority was active within the window.
    pub higher: bool,
    /// A claim of the same or higher priority was active within the window.
    pub peer_or_higher: bool,
}

pub struct Board {
    base: *mut Entry,
    mine: usize,
    claim: u64,
}

// SAFETY: a shared mapping accessed only through atomics.
unsafe impl Send for Board {}
unsafe impl Sync for Board {}

impl Board {
    /// Maps (creating it if absent) the board of `uuid` in `dir` and takes an entry for `claim`.
    /// `None` when the board cannot be used: the limiter then assumes neighbours it cannot see.
    pub fn open(dir: &str, uuid: &str, claim: u64, now: u64) -> Option<Board> {
        let (fd, base) = crate::shared_file::map_shared(&format!("{dir}/{uuid}"), FILE_SIZE)?;
        // SAFETY: our descriptor; the mapping stays valid after close.
        unsafe { libc::close(fd) };
        let mut board = Board {
            base: base.cast(),
            mine: 0,
            claim,
        };
        board.mine = board.take_entry(claim, now)?;
        Some(board)
    }

    fn entry(&self, index: usize) -> &Entry {
        // SAFETY: index < ENTRIES, inside the mapping, which lives as long as self.
        unsafe { &*self.base.add(index.min(ENTRIES - 1)) }
    }

    fn take_entry(&self, claim: u64, now: u64) -> Option<usize> {
        if let Some(index) =
            (0..ENTRIES).find(|&i| self.entry(i).claim.load(Ordering::Acquire) == claim)
        {
            return Some(index);
        }
        for index in 0..ENTRIES {
            let entry = self.entry(index);
            let current = entry.claim.load(Ordering::Acquire);
            let free = current == 0
                || now.saturating_sub(entry.last_active.load(Ordering::Acquire)) > ABANDONED_NS;
            if free
                && entry
                    .claim
                    .compare_exchange(current, claim, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                // Taking an entry stamps it (or the next claim would find it "abandoned"), but
                // leaves it unpublished (rank 0), so it counts as active only once it launches.
                entry.rank.store(0, Ordering::Relaxed);
                entry.last_active.store(now.max(1), Ordering::Release);
                return Some(index);
            }
        }
        None
    }

    /// Stamps the claim active at `now`.
    pub fn publish(&self, now: u64, rank: u32, cores: u32) {
        let entry = self.entry(self.mine);
        if entry.claim.load(Ordering::Relaxed) != self.claim {
            return;
        }
        entry.rank.store(rank + 1, Ordering::Relaxed);
        entry.cores.store(cores, Ordering::Relaxed);
        entry.last_active.fetch_max(now.max(1), Ordering::Release);
    }

    /// The other claims active within `window` ns before `now`, relative to `rank`.
    pub fn neighbours(&self, now: u64, window: u64, rank: u32) -> Neighbours {
        let mut seen = Neighbours::default();
        for index in (0..ENTRIES).filter(|&i| i != self.mine) {
            let entry = self.entry(index);
            let claim = entry.claim.load(Ordering::Acquire);
            let stamp = entry.last_active.load(Ordering::Acquire);
            let their_rank = entry.rank.load(Ordering::Relaxed);
            if claim == 0 || claim == self.claim || stamp == 0 || their_rank == 0 {
                continue;
            }
            if stamp.saturating_add(window) < now {
                continue;
            }
            let their_rank = their_rank - 1;
            seen.higher |= their_rank > rank;
            seen.peer_or_higher |= their_rank >= rank;
        }
        seen
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        // SAFETY: the mapping made in open.
        unsafe { libc::munmap(self.base.cast(), FILE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 100_000_000_000;
    const WINDOW: u64 = 50_000_000;

    fn board(dir: &std::path::Path, claim: u64) -> Board {
        let dir = dir.to_str().expect("utf-8 temp dir");
        Board::open(dir, "GPU-test", claim, NOW).expect("board")
    }

    #[test]
    fn claims_see_who_is_active_above_and_beside_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (high, normal, low) = (
            board(dir.path(), 11),
            board(dir.path(), 21),
            board(dir.path(), 31),
        );
        assert_eq!(
            low.neighbours(NOW, WINDOW, 0),
            Neighbours::default(),
            "nobody stamped yet"
        );

        high.publish(NOW, 2, 100);
        low.publish(NOW, 0, 100);
        assert_eq!(
            low.neighbours(NOW, WINDOW, 0),
            Neighbours {
                higher: true,
                peer_or_higher: true
            }
        );
        assert_eq!(
            high.neighbours(NOW, WINDOW, 2),
            Neighbours::default(),
            "only lower ones around"
        );
        assert_eq!(
            normal.neighbours(NOW, WINDOW, 1),
            Neighbours {
                higher: true,
                peer_or_higher: true
            }
        );
        // Once the high claim has been quiet for the window, it no longer counts.
        assert_eq!(
            low.neighbours(NOW + WINDOW + 1, WINDOW, 0),
            Neighbours::default(),
            "the low claim's own stamp never counts"
        );
    }

    #[test]
    fn a_claim_keeps_its_entry_and_an_abandoned_one_is_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = board(dir.path(), 7);
        let again = board(dir.path(), 7);
        assert_eq!(
            first.mine, again.mine,
            "processes of one claim share its entry"
        );
        let boards: Vec<Board> = (100..100 + ENTRIES as u64 - 1)
            .map(|c| board(dir.path(), c))
            .collect();
        for b in &boards {
            b.publish(NOW, 1, 10);
        }
        first.publish(NOW, 1, 10);
        assert!(
            Board::open(dir.path().to_str().unwrap(), "GPU-test", 999, NOW).is_none(),
            "full"
        );
        let later = NOW + ABANDONED_NS + 1;
        boards[0].publish(later, 1, 10);
        assert!(Board::open(dir.path().to_str().unwrap(), "GPU-test", 999, later).is_some());
    }

    proptest::proptest! {
        /// Every claim on the GPU can write the board file: whatever it holds (any length, any
        /// bytes), opening it, stamping and reading the neighbours neither panics nor reads past
        /// the mapping.
        #[test]
        fn any_board_contents_are_survived(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2 * FILE_SIZE),
            rank in 0u32..3,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("GPU-test"), &raw).expect("planting the board");
            if let Some(board) = Board::open(dir.path().to_str().expect("utf-8"), "GPU-test", 5, NOW) {
                board.publish(NOW, rank, 50);
                board.neighbours(NOW, WINDOW, rank);
                board.neighbours(u64::MAX, u64::MAX, rank);
            }
        }
    }
}
