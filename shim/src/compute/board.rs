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

use crate::board_files::{BoardPaths, Neighbours as Others, OwnEntry, RESCAN_NS};

#[repr(C, align(64))]
struct Entry {
    claim: AtomicU64,
    /// Priority rank + 1 (0 = not yet written).
    rank: AtomicU32,
    cores: AtomicU32,
    last_active: AtomicU64,
    /// When the work the claim has queued on the GPU is expected to end (its launches' measured
    /// costs); written only while a lower-priority claim is watching.
    busy_until: AtomicU64,
    /// When the claim's current burst of work began: a launch after the GPU had been idle for
    /// the claim for `BURST_GAP_NS`, as a request arriving at an inference server.
    burst_start: AtomicU64,
    /// The 0.5th percentile of the claim's times between bursts, as learned so far (0 = not
    /// known yet): a lower claim may use the GPU until `burst_start + period`, when the next
    /// one can come.
    period: AtomicU64,
    /// Bursts so far: claims filling the gaps take turns by it.
    bursts: AtomicU64,
    /// GPU time of all the claim's launches so far while watched (ns, their measured costs):
    /// lower claims take its rate as the claim's load, and fill no gaps of a busy claim.
    busy_total: AtomicU64,
}

const _: () = assert!(size_of::<Entry>() == ENTRY_SIZE);

/// Byte offsets of the fields other claims read.
const CLAIM_OFFSET: usize = 0;
const RANK_OFFSET: usize = 8;
const ACTIVE_OFFSET: usize = 16;
pub(super) const BUSY_OFFSET: usize = 24;
const BURST_OFFSET: usize = 32;
const PERIOD_OFFSET: usize = 40;
const BURSTS_OFFSET: usize = 48;
const BUSY_TOTAL_OFFSET: usize = 56;

/// The GPU idle for a claim this long before its next launch makes that launch the start of a
/// new burst (a request). Longer than the host-side gaps between the kernels of one request,
/// far shorter than the time between requests of a server.
const BURST_GAP_NS: u64 = 200_000;
/// The step (a fraction of the estimate) by which the learned period follows the intervals.
const QUANTILE_STEP: u64 = 16;

/// What the other claims on the GPU are doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Neighbours {
    /// A claim of higher priority was active within the window.
    pub higher: bool,
    /// A claim of the same or higher priority was active within the window.
    pub peer_or_higher: bool,
    /// A claim of lower priority was active within the window (and may be watching for gaps).
    pub lower: bool,
}

/// When the active higher-priority claims leave the GPU to others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gap {
    /// Until when their queued work runs: a kernel launched now starts no earlier.
    pub busy_until: u64,
    /// When the next burst of any of them can come; 0 when one's pattern is unknown or its
    /// next burst is due: no gap to fill.
    pub ends: u64,
    /// Whether every one of them has a pattern of bursts to go by: a period learned, and its
    /// last burst less than four periods ago. Without one (a claim that keeps the GPU busy, or
    /// one that paused) there is no gap to wait for either.
    pub pattern: bool,
    /// The GPU time the higher claims' launches have taken so far (ns): its rate over time is
    /// their load.
    pub busy_total: u64,
    /// Whether this gap is this claim's to fill. The claims below the top priority take whole
    /// gaps in turn (by the higher claims' burst count): claims that read the board at the same
    /// moment cannot both fill one gap, and a kernel too long for a share of a gap can still
    /// fill one whole.
    pub turn: bool,
}

pub struct Board {
    own: OwnEntry,
    others: Others,
    claim: u64,
    /// When this process first published (limiter clock, as the listings' rescans).
    published_since: AtomicU64,
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
            published_since: AtomicU64::new(0),
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
        let _ = self.published_since.compare_exchange(
            0,
            now.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        let entry = self.entry();
        entry.claim.store(self.claim, Ordering::Relaxed);
        entry.rank.store(rank + 1, Ordering::Relaxed);
        entry.cores.store(cores, Ordering::Relaxed);
        entry.last_active.fetch_max(now.max(1), Ordering::Release);
    }

    /// Whether every other claim's process has listed this entry since this process first
    /// published: they rescan the GPU's directory every `RESCAN_NS`, and taking turns at filling
    /// gaps needs every filler to count the same fillers.
    pub fn settled(&self, now: u64) -> bool {
        let since = self.published_since.load(Ordering::Relaxed);
        since != 0 && now.saturating_sub(since) >= 2 * RESCAN_NS
    }

    /// Notes a launch of `cost` ns at `now` for lower claims looking for gaps: extends the
    /// claim's busy time and, when the GPU had been idle for it, starts a burst and learns the
    /// time between bursts.
    pub fn note_launch(&self, now: u64, cost: u64) {
        let entry = self.entry();
        entry.busy_total.fetch_add(cost, Ordering::Relaxed);
        let before = entry
            .busy_until
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |until| {
                Some(until.max(now).saturating_add(cost))
            })
            .unwrap_or(now);
        if now <= before.saturating_add(BURST_GAP_NS) {
            return;
        }
        entry.bursts.fetch_add(1, Ordering::Relaxed);
        let last = entry.burst_start.swap(now, Ordering::Relaxed);
        let Some(interval) = now.checked_sub(last).filter(|_| last != 0) else {
            return;
        };
        let period = entry.period.load(Ordering::Relaxed);
        // A running estimate of the 0.5th percentile of the intervals (stochastic quantile
        // tracking: down by a step when an interval is shorter, up by a 199th of a step when
        // longer), so that a lower claim that fills the gap until then delays one burst in 200.
        let learned = if period == 0 {
            interval
        } else if interval < period {
            period - period / QUANTILE_STEP
        } else if interval > 4 * period {
            // A pause, not the pattern.
            period
        } else {
            period + period / (QUANTILE_STEP * 199)
        };
        entry.period.store(learned, Ordering::Relaxed);
    }

    /// The other claims active within `window` ns before `now`, relative to `rank`.
    pub fn neighbours(&self, now: u64, window: u64, rank: u32) -> Neighbours {
        let mut seen = Neighbours::default();
        self.visit_active(now, window, |their_rank, _| {
            seen.higher |= their_rank > rank;
            seen.peer_or_higher |= their_rank >= rank;
            seen.lower |= their_rank < rank;
        });
        seen
    }

    /// When the claims above `rank` that were active within `window` leave the GPU free.
    pub fn gap(&self, now: u64, window: u64, rank: u32) -> Gap {
        let (mut busy_until, mut ends, mut bursts, mut pattern) = (0u64, u64::MAX, 0u64, true);
        let mut busy_total = 0u64;
        // Per rank: the other active claims, and those of them ordered before this one.
        let (mut at_rank, mut before_me) = ([0u64; 4], [0u64; 4]);
        let mut top = rank;
        self.visit_active(now, window, |their_rank, field| {
            let r = their_rank.min(3) as usize;
            at_rank[r] += 1;
            before_me[r] += u64::from(field(CLAIM_OFFSET) < self.claim);
            top = top.max(their_rank);
            if their_rank <= rank {
                return;
            }
            busy_until = busy_until.max(field(BUSY_OFFSET));
            bursts = bursts.wrapping_add(field(BURSTS_OFFSET));
            busy_total = busy_total.wrapping_add(field(BUSY_TOTAL_OFFSET));
            let (start, period) = (field(BURST_OFFSET), field(PERIOD_OFFSET));
            let next = start.saturating_add(period);
            // An interval four times the period is a pause (see `note_launch`), not the pattern.
            if start == 0 || period == 0 || start.saturating_add(period.saturating_mul(4)) <= now {
                pattern = false;
            }
            // Due now or unknown: its next burst may come at any moment.
            ends = ends.min(if start == 0 || period == 0 || next <= now {
                0
            } else {
                next
            });
        });
        if ends == u64::MAX {
            // Nobody above: nothing to fit between.
            return Gap::default();
        }
        let below_top = (top.min(3) as usize).min(at_rank.len());
        let fillers = 1 + at_rank[..below_top].iter().sum::<u64>();
        let index = before_me[..below_top].iter().sum::<u64>();
        Gap {
            busy_until,
            ends,
            pattern,
            busy_total,
            turn: bursts % fillers == index,
        }
    }

    /// Calls `f` with the rank (as far as its name grants it) and a field reader of every
    /// other claim that stamped within `window` before `now`.
    fn visit_active(&self, now: u64, window: u64, mut f: impl FnMut(u32, &dyn Fn(usize) -> u64)) {
        self.others.visit(now, |name, bytes, _| {
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
            f((their_rank - 1).min(granted), &u64_at);
        });
    }
}

const _: () = {
    assert!(std::mem::offset_of!(Entry, claim) == CLAIM_OFFSET);
    assert!(std::mem::offset_of!(Entry, rank) == RANK_OFFSET);
    assert!(std::mem::offset_of!(Entry, last_active) == ACTIVE_OFFSET);
    assert!(std::mem::offset_of!(Entry, busy_until) == BUSY_OFFSET);
    assert!(std::mem::offset_of!(Entry, burst_start) == BURST_OFFSET);
    assert!(std::mem::offset_of!(Entry, period) == PERIOD_OFFSET);
    assert!(std::mem::offset_of!(Entry, bursts) == BURSTS_OFFSET);
    assert!(std::mem::offset_of!(Entry, busy_total) == BUSY_TOTAL_OFFSET);
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
                peer_or_higher: true,
                lower: false
            }
        );
        assert_eq!(
            high.neighbours(NOW, WINDOW, 2),
            Neighbours {
                higher: false,
                peer_or_higher: false,
                lower: true
            },
            "only lower ones around"
        );
        assert_eq!(
            normal.neighbours(NOW, WINDOW, 1),
            Neighbours {
                higher: true,
                peer_or_higher: true,
                lower: true
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

    /// A server's bursts, as a lower claim sees them: busy while its kernels run, then a gap
    /// until the learned period (the intervals' low percentile) has passed since the burst
    /// began.
    #[test]
    fn a_lower_claim_sees_the_gap_until_the_next_burst_can_come() {
        const MS: u64 = 1_000_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let high = board_as(dir.path(), "high", 11, Priority::High);
        let low = board_as(dir.path(), "low", 31, Priority::Low);
        // On the board from the start (listings are cached), active only once it publishes.
        let other = board_as(dir.path(), "other", 41, Priority::Low);
        high.publish(NOW, 2, 30);
        low.publish(NOW, 0, 70);
        assert!(high.neighbours(NOW, WINDOW, 2).lower);
        // One burst: its length is known, its period not yet.
        high.note_launch(NOW, MS / 5);
        assert_eq!(
            low.gap(NOW, WINDOW, 0),
            Gap {
                busy_until: NOW + MS / 5,
                ends: 0,
                pattern: false,
                busy_total: MS / 5,
                turn: true
            },
            "no period known: no gap to fill"
        );
        // Requests every 2 ms, two kernels each (the second launched while the first runs).
        for k in 1..=4 {
            let at = NOW + k * 2 * MS;
            high.note_launch(at, MS / 10);
            high.note_launch(at + MS / 20, MS / 10);
        }
        let last = NOW + 8 * MS;
        let gap = low.gap(last + MS / 2, WINDOW, 0);
        assert_eq!(gap.busy_until, last + MS / 5);
        assert!(gap.turn);
        // Exactly periodic intervals keep the estimate within a step below the period.
        assert!(
            gap.ends >= last + 2 * MS - 2 * MS / QUANTILE_STEP
                && gap.ends < last + 2 * MS + MS / 500,
            "the next burst 2 ms after this one: {}",
            gap.ends - last
        );
        assert!(gap.pattern);
        let due = low.gap(last + 2 * MS + MS / 500, WINDOW, 0);
        assert_eq!(due.ends, 0, "the next burst is due");
        assert!(due.pattern, "due, not yet paused");
        assert!(
            !low.gap(last + 8 * MS + MS / 10, WINDOW, 0).pattern,
            "four periods without a burst: a pause, no pattern to wait for"
        );
        // A shorter interval lowers the period by a step at once; longer ones raise it by far
        // less (it follows the intervals' 0.5th percentile).
        let before = gap.ends - last;
        high.note_launch(last + 3 * MS / 2, MS / 10);
        let lowered = low.gap(last + 2 * MS, WINDOW, 0).ends - (last + 3 * MS / 2);
        assert_eq!(lowered, before - before / QUANTILE_STEP);
        let again = last + 4 * MS;
        high.note_launch(again, MS / 10);
        let raised = low.gap(again + MS / 2, WINDOW, 0).ends - again;
        assert!(
            raised > lowered && raised - lowered < lowered / 1000,
            "raised from {lowered} to {raised}"
        );
        // A pause is not the pattern.
        let base = again + 100 * MS;
        high.publish(base, 2, 30);
        low.publish(base, 0, 70);
        high.note_launch(base, MS / 10);
        assert_eq!(low.gap(base + MS / 2, WINDOW, 0).ends - base, raised);
        // Claims at or below see no gap to fill.
        assert_eq!(high.gap(last + MS / 2, WINDOW, 2), Gap::default());

        // A second low claim: the two take the gaps in turn, burst by burst.
        other.publish(base, 0, 70);
        let turns = |at: u64| (low.gap(at, WINDOW, 0).turn, other.gap(at, WINDOW, 0).turn);
        let first = turns(base + MS / 2);
        assert!(first.0 != first.1, "one of the two: {first:?}");
        high.note_launch(base + 2 * MS, MS / 10);
        let second = turns(base + 2 * MS + MS / 2);
        assert_eq!(second, (first.1, first.0), "the other one's turn");
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
                peer_or_higher: true,
                lower: false
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
            mine.gap(NOW, WINDOW, rank);
            mine.gap(u64::MAX, u64::MAX, rank);
        }

        /// A low claim writes whatever it likes into its own entry — any claim key, any rank
        /// up to its own, any burst fields — yet two honest low claims never both own one gap
        /// of the high claim: the hostile one can take or waste turns, never make two honest
        /// fillers pile into the same gap.
        #[test]
        fn a_hostile_filler_cannot_make_two_honest_ones_share_a_gap(
            hostile_key in proptest::prelude::any::<u64>(),
            hostile_rank in 0u32..3,
            bursts in 0u64..1000,
            noise in proptest::prelude::any::<[u64; 3]>(),
        ) {
            const MS: u64 = 1_000_000;
            let dir = tempfile::tempdir().expect("tempdir");
            let high = board_as(dir.path(), "high", 11, Priority::High);
            let a = board_as(dir.path(), "a", 31, Priority::Low);
            let b = board_as(dir.path(), "b", 41, Priority::Low);
            let hostile = board_as(dir.path(), "hostile", 51, Priority::Low);
            for (board, rank) in [(&high, 2), (&a, 0), (&b, 0), (&hostile, hostile_rank)] {
                board.publish(NOW, rank, 50);
            }
            let entry = hostile.entry();
            entry.claim.store(hostile_key, Ordering::Relaxed);
            entry.busy_until.store(noise[0], Ordering::Relaxed);
            entry.burst_start.store(noise[1], Ordering::Relaxed);
            entry.period.store(noise[2], Ordering::Relaxed);
            let high_entry = high.entry();
            high_entry.burst_start.store(NOW, Ordering::Relaxed);
            high_entry.period.store(2 * MS, Ordering::Relaxed);
            high_entry.bursts.store(bursts, Ordering::Relaxed);
            let at = NOW + MS / 2;
            let (ta, tb) = (a.gap(at, WINDOW, 0).turn, b.gap(at, WINDOW, 0).turn);
            proptest::prop_assert!(!(ta && tb), "both honest fillers own burst {}", bursts);
        }
    }
}
