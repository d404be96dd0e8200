//! The GPU's board, compute side: which claims on one GPU are active, at what priority — how a
//! claim learns that a higher-priority neighbour wants the GPU, or that the GPU is otherwise
//! idle.
//!
//! Each claim has its own entry per GPU (`tessera_api::board`): its processes stamp it, with the
//! limiter's clock, while they launch; they read the other claims' entries to see who else is
//! active. Nothing here is a limit: a claim that does not stamp (an old shim) is simply
//! invisible, and what a claim writes into its own entry can only make its neighbours yield —
//! which is why high priority is the admin's to grant. A claim can change its own entry and
//! nobody else's.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tessera_api::board::{ENTRY_SIZE, EntryKind, granted_priority};

use super::rank_of;

use crate::board_files::{BoardPaths, Neighbours as Others, OwnEntry};

#[repr(C, align(64))]
struct Entry {
    claim: AtomicU64,
    /// Priority rank + 1 (0 = not yet written).
    rank: AtomicU32,
    cores: AtomicU32,
    last_active: AtomicU64,
    _reserved: [u64; 5],
}

const _: () = assert!(size_of::<Entry>() == ENTRY_SIZE);

/// Byte offsets of the fields other claims read.
const CLAIM_OFFSET: usize = 0;
const RANK_OFFSET: usize = 8;
const ACTIVE_OFFSET: usize = 16;

/// What the other claims on the GPU are doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Neighbours {
    /// A claim of higher priority was active within the window.
    pub higher: bool,
    /// A claim of the same or higher priority was active within the window.
    pub peer_or_higher: bool,
}

pub struct Board {
    own: OwnEntry,
    others: Others,
    claim: u64,
}

impl Board {
    /// Maps `claim`'s entry for GPU `uuid` (see [`BoardPaths`]). `None` when the board cannot be
    /// used: the limiter then assumes neighbours it cannot see.
    pub fn open(paths: &BoardPaths, uuid: &str, claim: u64) -> Option<Board> {
        let own = paths.own(uuid, EntryKind::Compute)?;
        let board = Board {
            own,
            others: paths.neighbours(uuid, EntryKind::Compute),
            claim,
        };
        let entry = board.entry();
        if entry.claim.swap(claim, Ordering::AcqRel) != claim {
            // A fresh entry (or one a process of this claim scribbled over): unpublished (rank 0)
            // until the claim launches.
            entry.rank.store(0, Ordering::Relaxed);
            entry.last_active.store(0, Ordering::Release);
        }
        Some(board)
    }

    fn entry(&self) -> &Entry {
        // SAFETY: the mapping holds one Entry and lives as long as self.
        unsafe { &*self.own.base.cast::<Entry>() }
    }

    /// Stamps the claim active at `now`.
    pub fn publish(&self, now: u64, rank: u32, cores: u32) {
        let entry = self.entry();
        entry.claim.store(self.claim, Ordering::Relaxed);
        entry.rank.store(rank + 1, Ordering::Relaxed);
        entry.cores.store(cores, Ordering::Relaxed);
        entry.last_active.fetch_max(now.max(1), Ordering::Release);
    }

    /// The other claims active within `window` ns before `now`, relative to `rank`.
    pub fn neighbours(&self, now: u64, window: u64, rank: u32) -> Neighbours {
        let mut seen = Neighbours::default();
        self.others.visit(|name, bytes, _| {
            let u64_at = |at: usize| {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&bytes[at..at + 8]);
                u64::from_ne_bytes(raw)
            };
            let mut raw = [0u8; 4];
            raw.copy_from_slice(&bytes[RANK_OFFSET..RANK_OFFSET + 4]);
            let (claim, their_rank, stamp) = (
                u64_at(CLAIM_OFFSET),
                u32::from_ne_bytes(raw),
                u64_at(ACTIVE_OFFSET),
            );
            if claim == 0 || claim == self.claim || stamp == 0 || their_rank == 0 {
                return;
            }
            if stamp.saturating_add(window) < now {
                return;
            }
            // An entry is its claim's to write, its name is the plugin's: the priority the claim
            // was granted caps the one it claims.
            let granted = granted_priority(name).map_or(0, rank_of);
            let their_rank = (their_rank - 1).min(granted);
            seen.higher |= their_rank > rank;
            seen.peer_or_higher |= their_rank >= rank;
        });
        seen
    }
}

const _: () = {
    assert!(std::mem::offset_of!(Entry, claim) == CLAIM_OFFSET);
    assert!(std::mem::offset_of!(Entry, rank) == RANK_OFFSET);
    assert!(std::mem::offset_of!(Entry, last_active) == ACTIVE_OFFSET);
};

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::Priority;

    const NOW: u64 = 100_000_000_000;
    const WINDOW: u64 = 50_000_000;

    fn board_as(dir: &std::path::Path, owner: &str, claim: u64, priority: Priority) -> Board {
        let paths = BoardPaths::resolve(Some(dir.to_str().expect("utf-8").into()), owner, priority)
            .expect("paths");
        Board::open(&paths, "GPU-test", claim).expect("board")
    }

    fn board(dir: &std::path::Path, owner: &str, claim: u64) -> Board {
        board_as(dir, owner, claim, Priority::High)
    }

    #[test]
    fn claims_see_who_is_active_above_and_beside_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (high, normal, low) = (
            board_as(dir.path(), "high", 11, Priority::High),
            board_as(dir.path(), "normal", 21, Priority::Normal),
            board_as(dir.path(), "low", 31, Priority::Low),
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
    fn processes_of_a_claim_share_its_entry_and_any_number_of_claims_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = board(dir.path(), "seven", 7);
        let again = board(dir.path(), "seven", 7);
        again.publish(NOW, 2, 10);
        assert_eq!(first.entry().rank.load(Ordering::Relaxed), 3, "one entry");
        // No fixed number of entries: the 65th claim on a GPU is seen like the first.
        let boards: Vec<Board> = (0..100)
            .map(|c| board(dir.path(), &format!("claim-{c}"), 100 + c))
            .collect();
        boards[99].publish(NOW, 2, 10);
        assert!(boards[0].neighbours(NOW, WINDOW, 1).higher);
    }

    /// A claim writes its own entry, so it can write any rank there; its file name, which the
    /// plugin chose from the priority the claim was granted, caps what its neighbours believe.
    #[test]
    fn a_claim_cannot_promote_itself_by_writing_its_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let normal = board_as(dir.path(), "normal", 21, Priority::Normal);
        let promoted = board_as(dir.path(), "promoted", 31, Priority::Normal);
        promoted.publish(NOW, rank_of(Priority::High), 100);
        assert_eq!(
            normal.neighbours(NOW, WINDOW, rank_of(Priority::Normal)),
            Neighbours {
                higher: false,
                peer_or_higher: true
            },
            "seen as the normal claim it was prepared as"
        );
    }

    /// A claim can truncate, grow or scribble over its own entry file: its neighbours neither
    /// fault nor read past what is there. (With one file shared by every claim, truncating it
    /// made every other claim's process die of SIGBUS at its next refresh.)
    #[test]
    fn a_neighbour_that_truncates_or_grows_its_entry_harms_nobody() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = board(dir.path(), "victim", 1);
        let hostile = board(dir.path(), "hostile", 2);
        hostile.publish(NOW, 2, 100);
        assert!(victim.neighbours(NOW, WINDOW, 1).higher);
        let file = dir.path().join("GPU-test").join("hostile.high.compute");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("own file")
            .set_len(0)
            .expect("truncate");
        assert_eq!(victim.neighbours(NOW, WINDOW, 1), Neighbours::default());
        victim.publish(NOW, 1, 50);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("own file")
            .set_len(1 << 40)
            .expect("a sparse TiB");
        victim.neighbours(NOW, WINDOW, 1);
        drop(hostile);
    }

    proptest::proptest! {
        /// Whatever a neighbour's entry holds (any length, any bytes), reading the neighbours
        /// neither panics nor reads past what is there, and one's own entry still works.
        #[test]
        fn any_neighbour_contents_are_survived(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3 * ENTRY_SIZE),
            rank in 0u32..3,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let mine = board(dir.path(), "mine", 5);
            std::fs::write(dir.path().join("GPU-test").join("theirs.high.compute"), &raw)
                .expect("planting an entry");
            mine.publish(NOW, rank, 50);
            mine.neighbours(NOW, WINDOW, rank);
            mine.neighbours(u64::MAX, u64::MAX, rank);
        }
    }
}
