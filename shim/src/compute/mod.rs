//! The compute limiter: each claim gets its `cores` share of the GPU's time, on every launch
//! path, across all of its processes. See `docs/compute.md` for the design and why.
//!
//! In one sentence: every launch reserves its kernel's measured GPU time divided by the share in
//! a claim-wide schedule in the region (a "theoretical arrival time", GCRA: a token bucket
//! counted in nanoseconds), and waits if its place is more than a small burst ahead of the clock.
//! The hot path under the share is a clock read, a table lookup and one atomic update.

pub mod board;
pub mod clock;
mod cost;
mod usage;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use tessera_api::claim_config::{CorePolicy, Priority};
use tessera_api::region::MAX_DEVICES;
use tessera_api::shim_config::ShimConfig;
use tessera_gpu_abi::cuda::*;

use board::Board;

use crate::board_files::BoardPaths;
use crate::devices::Grant;
use crate::ledger::Ledger;

pub use cost::key;

/// How far ahead of the clock a claim's charges may run: the burst it may launch at once, and
/// the finest grain at which its share holds.
const BURST_NS: u64 = 5_000_000;
/// How often (limiter clock) a process re-reads its neighbours and stamps its own activity.
const REFRESH_NS: u64 = 10_000_000;
/// A claim that stamped within this window counts as active.
const ACTIVE_NS: u64 = 50_000_000;
/// What a claim keeps while a higher-priority one is active: enough to make progress, little
/// enough to leave the GPU to the other.
const YIELD_SHARE: u32 = 1;
/// A schedule further ahead of the clock than this, when a process first launches, is taken
/// for one written on another clock (a region that outlived a reboot, when `CLOCK_MONOTONIC`
/// restarted; a fake GPU that was reset) and dropped rather than waited out. Checked once per
/// process and device, not per launch: a claim yielding with long kernels can legitimately run
/// a debt this large, and a new process forgiving it once is harmless.
const IMPLAUSIBLE_NS: u64 = 10_000_000_000;
/// The share meaning "no limit".
const UNLIMITED: u32 = 100;
/// How often a claim filling a higher claim's gaps re-reads when they are: it decides each launch
/// on what it read at most this long ago.
const GAP_READ_NS: u64 = 100_000;
/// A kernel fills a gap only if it is expected to end this long before the next burst can come:
/// room for the error in the costs and the clocks (and, on the fake GPU, for the lockstep's
/// 100 µs, within which processes may reach the device out of order).
const GAP_MARGIN_NS: u64 = 100_000;
/// How often a claim waiting for a gap looks again when a higher claim's next burst is due.
const GAP_POLL_NS: u64 = 200_000;
/// How far ahead of the clock filling gaps may put a claim's yielding schedule.
const FILL_DEBT_NS: u64 = 100_000_000;
/// How long a launch the yielding schedule allows may wait for a gap it fits (a kernel longer
/// than every gap goes when this runs out, as it would have without the pattern).
const MAX_DEFER_NS: u64 = 20_000_000;
/// Over how long a filler measures the higher claims' load.
const LOAD_WINDOW_NS: u64 = 50_000_000;
/// Gaps are filled only while the higher claims' load is at most this (per mille of the GPU):
/// a claim busy most of the time has no gaps, and what looks like one (its work delayed by a
/// neighbour's kernel) is not idle time.
const MAX_FILLED_LOAD_PERMILLE: u64 = 500;

pub struct Limiter {
    device_count: usize,
    cores: [u32; MAX_DEVICES],
    rank: u32,
    policy: CorePolicy,
    boards: Vec<Option<Board>>,
    /// The share in force per device, percent; `UNLIMITED` skips the limiter.
    share: [AtomicU32; MAX_DEVICES],
    next_refresh: [AtomicU64; MAX_DEVICES],
    /// Whether this process has looked at the device's schedule for another clock's values.
    clock_checked: [AtomicBool; MAX_DEVICES],
    /// A lower-priority claim is active on the device: publish when this claim's bursts come.
    watched: [AtomicBool; MAX_DEVICES],
    /// A higher-priority claim is active and the policy lets this claim fill its gaps.
    filling: [AtomicBool; MAX_DEVICES],
    /// The gap last read per device ([`board::Gap`]), and when.
    gap_busy_until: [AtomicU64; MAX_DEVICES],
    gap_ends: [AtomicU64; MAX_DEVICES],
    gap_turn: [AtomicBool; MAX_DEVICES],
    gap_pattern: [AtomicBool; MAX_DEVICES],
    gap_read_at: [AtomicU64; MAX_DEVICES],
    /// When the work this process queued while filling gaps is expected to end.
    queued_until: [AtomicU64; MAX_DEVICES],
    /// The higher claims' load: their `busy_total` and the time it was read at the start of the
    /// current window, and the load of the last whole window (per mille; `u64::MAX` = unknown).
    load_mark_total: [AtomicU64; MAX_DEVICES],
    load_mark_at: [AtomicU64; MAX_DEVICES],
    load_permille: [AtomicU64; MAX_DEVICES],
}

impl Limiter {
    pub fn new(config: &ShimConfig, board: Option<&BoardPaths>) -> Limiter {
        let mut cores = [UNLIMITED; MAX_DEVICES];
        for (slot, device) in cores.iter_mut().zip(&config.devices) {
            *slot = device.cores.clamp(1, UNLIMITED);
        }
        let claim = claim_key(&config.claim_uid);
        let boards = config
            .devices
            .iter()
            .map(|d| {
                let opened = Board::open(board?, &d.uuid, claim);
                if opened.is_none() {
                    // Without its entry the claim is invisible to its neighbours and cannot see
                    // theirs: it loses its priority and the idle-GPU boost, which must not pass
                    // silently.
                    crate::report::line(format_args!(
                        "GPU {}: the claim's compute board entry cannot be opened; this process runs at its cores without priority or the idle-GPU boost",
                        d.uuid
                    ));
                }
                opened
            })
            .collect();
        Limiter {
            device_count: config.devices.len(),
            cores,
            rank: rank_of(config.priority),
            policy: config.core_policy,
            boards,
            share: std::array::from_fn(|d| AtomicU32::new(cores[d])),
            next_refresh: [const { AtomicU64::new(0) }; MAX_DEVICES],
            clock_checked: [const { AtomicBool::new(false) }; MAX_DEVICES],
            watched: [const { AtomicBool::new(false) }; MAX_DEVICES],
            filling: [const { AtomicBool::new(false) }; MAX_DEVICES],
            gap_busy_until: [const { AtomicU64::new(0) }; MAX_DEVICES],
            gap_ends: [const { AtomicU64::new(0) }; MAX_DEVICES],
            gap_turn: [const { AtomicBool::new(false) }; MAX_DEVICES],
            gap_pattern: [const { AtomicBool::new(false) }; MAX_DEVICES],
            gap_read_at: [const { AtomicU64::new(0) }; MAX_DEVICES],
            queued_until: [const { AtomicU64::new(0) }; MAX_DEVICES],
            load_mark_total: [const { AtomicU64::new(0) }; MAX_DEVICES],
            load_mark_at: [const { AtomicU64::new(0) }; MAX_DEVICES],
            load_permille: [const { AtomicU64::new(u64::MAX) }; MAX_DEVICES],
        }
    }

    /// Updates the higher claims' load from a fresh read of their `busy_total` at `now`, and
    /// says whether it is low enough for their gaps to be filled.
    fn light_load(&self, device: usize, busy_total: u64, now: u64) -> bool {
        let at = self.load_mark_at[device].load(Ordering::Relaxed);
        if at == 0 || now < at {
            self.load_mark_at[device].store(now, Ordering::Relaxed);
            self.load_mark_total[device].store(busy_total, Ordering::Relaxed);
        } else if now - at >= LOAD_WINDOW_NS {
            let done =
                busy_total.wrapping_sub(self.load_mark_total[device].load(Ordering::Relaxed));
            let load = done.saturating_mul(1000) / (now - at);
            self.load_permille[device].store(load, Ordering::Relaxed);
            self.load_mark_at[device].store(now, Ordering::Relaxed);
            self.load_mark_total[device].store(busy_total, Ordering::Relaxed);
        }
        self.load_permille[device].load(Ordering::Relaxed) <= MAX_FILLED_LOAD_PERMILLE
    }

    /// Re-reads the neighbours and stamps this claim active, at most once per `REFRESH_NS` per
    /// device (whichever thread wins the compare-and-swap does it).
    #[inline(always)]
    fn refresh_if_due(&self, ledger: &Ledger, device: usize, now: u64) {
        let due = &self.next_refresh[device];
        let at = due.load(Ordering::Relaxed);
        if now < at {
            return;
        }
        if due
            .compare_exchange(
                at,
                now.saturating_add(REFRESH_NS),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            self.refresh(ledger, device, now);
        }
    }

    #[cold]
    fn refresh(&self, ledger: &Ledger, device: usize, now: u64) {
        if !self.clock_checked[device].swap(true, Ordering::Relaxed) {
            let tat = ledger.compute_tat(device);
            let scheduled = tat.load(Ordering::Relaxed);
            if scheduled > now.saturating_add(IMPLAUSIBLE_NS) {
                let _ = tat.compare_exchange(scheduled, now, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
        let cores = self.cores[device];
        let share = match self.boards.get(device).and_then(Option::as_ref) {
            Some(board) => {
                board.publish(now, self.rank, cores);
                let around = board.neighbours(now, ACTIVE_NS, self.rank);
                self.watched[device].store(around.lower, Ordering::Relaxed);
                self.filling[device].store(
                    around.higher && self.policy == CorePolicy::Default && board.settled(now),
                    Ordering::Relaxed,
                );
                if around.higher {
                    cores.min(YIELD_SHARE)
                } else if !around.peer_or_higher && self.policy == CorePolicy::Default {
                    UNLIMITED
                } else {
                    cores
                }
            }
            // Without a board the neighbours are unknown: the share is a cap.
            None => cores,
        };
        let before = self.share[device].swap(share, Ordering::Relaxed);
        if share > before {
            // Debts run up at a smaller share are forgiven: the claim has the GPU back now.
            ledger
                .compute_tat(device)
                .fetch_min(now.saturating_add(BURST_NS), Ordering::Relaxed);
        }
    }

    /// Tells the lower claims watching this one when its work runs: a launch costing `cost` ns
    /// (see [`Board::note_launch`]).
    #[inline(never)]
    fn note_launch(&self, device: usize, cost: u64) {
        if let Some(board) = self.boards.get(device).and_then(Option::as_ref) {
            board.note_launch(clock::now(), cost);
        }
    }

    /// Whether a launch of `key` at `now` fits the gap the higher claims leave, as last read
    /// (at most `GAP_READ_NS` ago); if it does, it is counted as queued. `Err` holds when to
    /// look again.
    fn fill_gap(&self, device: usize, key: u64, now: u64) -> Result<(), u64> {
        let Some(board) = self.boards.get(device).and_then(Option::as_ref) else {
            return Err(now.saturating_add(REFRESH_NS));
        };
        let read_at = self.gap_read_at[device].load(Ordering::Relaxed);
        // A read that found no pattern holds until the next refresh: a higher claim that keeps
        // the GPU busy is not read again on every wake.
        let valid_for = if self.gap_pattern[device].load(Ordering::Relaxed) {
            GAP_READ_NS
        } else {
            REFRESH_NS
        };
        let (busy_until, ends, turn, pattern) =
            if read_at == 0 || now.wrapping_sub(read_at) >= valid_for || read_at > now {
                let gap = board.gap(now, ACTIVE_NS, self.rank);
                let pattern = gap.pattern && self.light_load(device, gap.busy_total, now);
                self.gap_busy_until[device].store(gap.busy_until, Ordering::Relaxed);
                self.gap_ends[device].store(gap.ends, Ordering::Relaxed);
                self.gap_turn[device].store(gap.turn, Ordering::Relaxed);
                self.gap_pattern[device].store(pattern, Ordering::Relaxed);
                self.gap_read_at[device].store(now, Ordering::Relaxed);
                (gap.busy_until, gap.ends, gap.turn, pattern)
            } else {
                (
                    self.gap_busy_until[device].load(Ordering::Relaxed),
                    self.gap_ends[device].load(Ordering::Relaxed),
                    self.gap_turn[device].load(Ordering::Relaxed),
                    self.gap_pattern[device].load(Ordering::Relaxed),
                )
            };
        // Only a kernel whose own cost has been measured fills a gap: a guess (another kernel's
        // cost, or none yet) could run into the next burst by a whole kernel.
        let Some(cost) = cost::measured(key) else {
            return Err(if pattern {
                now.saturating_add(GAP_POLL_NS)
            } else {
                u64::MAX
            });
        };
        let queued = &self.queued_until[device];
        let start = now.max(busy_until).max(queued.load(Ordering::Relaxed));
        let end = start.saturating_add(cost);
        if turn && ends != 0 && end.saturating_add(GAP_MARGIN_NS) <= ends {
            queued.fetch_max(end, Ordering::Relaxed);
            return Ok(());
        }
        // What was read serves the launches of one gap; a claim that has to wait for the next
        // reads again.
        if pattern {
            self.gap_read_at[device].store(0, Ordering::Relaxed);
        }
        let at = if !pattern {
            // No pattern to go by (a higher claim that keeps the GPU busy): nothing to wait for
            // beyond the schedule and the refresh.
            u64::MAX
        } else if ends == 0 || ends <= now {
            // The next burst is due: look again shortly.
            now.saturating_add(GAP_POLL_NS)
        } else if busy_until > now {
            // Busy, and the kernel does not fit after it: after this burst, the next gap.
            ends.max(busy_until)
        } else {
            // Too long for what is left of this gap: the next one begins after the next burst.
            ends.saturating_add(GAP_MARGIN_NS)
        };
        Err(at)
    }

    /// The claim device the calling thread launches on (`uuids`: the claim's GPUs).
    #[inline(always)]
    fn device(&self, uuids: &[String]) -> Option<usize> {
        if self.device_count == 1 {
            return Some(0);
        }
        match crate::real::current_device() {
            Ok(ordinal) => match crate::devices::grant(ordinal, uuids) {
                Grant::Claim(index) => Some(index),
                Grant::NotGranted => None,
            },
            Err(_) => None,
        }
    }
}

/// A priority's rank on the boards: higher ranks make lower ones yield.
pub(crate) fn rank_of(priority: Priority) -> u32 {
    match priority {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
    }
}

/// A claim UID's key on the boards; never 0.
pub(crate) fn claim_key(uid: &str) -> u64 {
    // FNV-1a: stable across processes and builds, which is all that is needed.
    let hash = uid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    hash | 1
}

/// What a claim's launches are limited by: its limiter, the schedule in its region, and its
/// GPUs (to tell which one the calling thread launches on).
pub struct Claim<'a> {
    pub limiter: &'a Limiter,
    pub ledger: &'a Ledger,
    pub uuids: &'a [String],
}

/// Runs one launch under the claim's share: waits while the claim is ahead of it, forwards,
/// and charges what the launch will cost.
#[inline(always)]
pub fn launch(
    claim: Claim<'_>,
    key: u64,
    stream: CUstream,
    per_thread: bool,
    forward: impl FnOnce() -> CUresult,
) -> CUresult {
    let Claim {
        limiter,
        ledger,
        uuids,
    } = claim;
    let Some(device) = limiter.device(uuids) else {
        return forward();
    };
    let now = clock::coarse();
    limiter.refresh_if_due(ledger, device, now);
    let cost = cost::estimate(key);
    usage::count(ledger, device, cost, now);
    let result = schedule(
        limiter, ledger, device, now, cost, key, stream, per_thread, forward,
    );
    if limiter.watched[device].load(Ordering::Relaxed) {
        // Only once the launch has reached the driver: a lower claim that reads when this
        // claim's work runs may queue a kernel behind it, and one queued before this launch
        // reached the GPU would run first, into this claim's burst.
        limiter.note_launch(device, cost);
    }
    result
}

/// [`launch`] after the cost is known: waits for the launch's place in the claim's schedule
/// (or a gap a higher claim leaves), then forwards it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn schedule(
    limiter: &Limiter,
    ledger: &Ledger,
    device: usize,
    mut now: u64,
    cost: u64,
    key: u64,
    stream: CUstream,
    per_thread: bool,
    forward: impl FnOnce() -> CUresult,
) -> CUresult {
    let mut share = limiter.share[device].load(Ordering::Relaxed);
    if share >= UNLIMITED {
        return timed(now, key, stream, per_thread, forward);
    }
    // Reserve this launch's place in the claim's schedule first, then wait for it: launches of
    // the claim's processes are served in the order they asked, never by who wakes first.
    let tat = ledger.compute_tat(device);
    let charge = cost.saturating_mul(u64::from(UNLIMITED)) / u64::from(share.max(1));
    let mut slot = now;
    if charge > 0
        && let Ok(before) = tat.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
            Some(t.max(now).saturating_add(charge))
        })
    {
        slot = before.max(now);
    }
    if slot > now.saturating_add(BURST_NS) {
        // Ahead of the coarse clock: look at the precise one before deciding to wait.
        now = clock::now();
    }
    let mut filled = false;
    while slot > now.saturating_add(BURST_NS) {
        let mut look_again = u64::MAX;
        if limiter.filling[device].load(Ordering::Relaxed) {
            // Yielding to a higher claim, but free to use its gaps.
            match limiter.fill_gap(device, key, now) {
                Ok(()) => {
                    filled = true;
                    // What fills a gap is charged to the yielding schedule (so that launches the
                    // schedule allows stay rare while gaps are being filled), but the debt it
                    // runs up is capped: a claim that filled many gaps must not owe seconds at
                    // its 1 % and make no progress at all once the gaps are gone.
                    tat.fetch_min(now.saturating_add(FILL_DEBT_NS), Ordering::Relaxed);
                    break;
                }
                Err(at) => look_again = at,
            }
        }
        // Wake at least every refresh to notice a neighbour leaving (a share going up).
        clock::sleep_until(
            (slot - BURST_NS)
                .min(now.saturating_add(REFRESH_NS))
                .min(look_again),
        );
        now = clock::now();
        limiter.refresh_if_due(ledger, device, now);
        share = limiter.share[device].load(Ordering::Relaxed);
        if share >= UNLIMITED || tat.load(Ordering::Relaxed) < slot {
            // Unlimited now, or the debt this place was behind has been forgiven.
            break;
        }
    }
    if !filled && share < UNLIMITED && limiter.filling[device].load(Ordering::Relaxed) {
        // A launch the yielding schedule allows while the higher claims' pattern is known goes
        // where a fill would, into the next gap it fits (for up to MAX_DEFER_NS), not wherever
        // the schedule came due: that lands in a higher claim's burst at random.
        let give_up = now.saturating_add(MAX_DEFER_NS);
        while let Err(at) = limiter.fill_gap(device, key, now) {
            if at >= give_up {
                break;
            }
            clock::sleep_until(at);
            now = clock::now();
            limiter.refresh_if_due(ledger, device, now);
            if !limiter.filling[device].load(Ordering::Relaxed) {
                break;
            }
        }
    }
    timed(now, key, stream, per_thread, forward)
}

/// Forwards a launch, timing it with events when this thread's sampling is due (which is how
/// its cost, for the schedule and for the claim's usage, is learned).
#[inline(always)]
fn timed(
    now: u64,
    key: u64,
    stream: CUstream,
    per_thread: bool,
    forward: impl FnOnce() -> CUresult,
) -> CUresult {
    let timed = cost::begin(now, key, stream, per_thread);
    let result = forward();
    if timed {
        if result == CUDA_SUCCESS {
            cost::end(stream, per_thread);
        } else {
            cost::abandon();
        }
    }
    result
}

/// In a fork child.
pub fn forget_after_fork() {
    cost::forget_after_fork();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;
    use std::time::Instant;

    /// A one-GPU claim of `cores`, with its region in `dir` and no board.
    fn claim(dir: &std::path::Path, cores: u32) -> (Limiter, Ledger, Vec<String>) {
        let region = dir.join(format!("claim-{cores}.region"));
        let text = format!(
            r#"{{"version":1,"claimUid":"hot-path-{cores}","region":"{}","devices":[{{"uuid":"GPU-11111111-2222-3333-4444-555555555555","memoryLimit":1073741824,"cores":{cores}}}],"corePolicy":"force"}}"#,
            region.display()
        );
        let config = ShimConfig::from_json(text.as_bytes()).expect("config");
        let devices = tessera_api::region::RegionDeviceSpec::from_config(&config);
        let ledger = Ledger::open(&config.region, &devices).expect("region");
        let uuids = config.devices.iter().map(|d| d.uuid.clone()).collect();
        (Limiter::new(&config, None), ledger, uuids)
    }

    /// A one-GPU `high` claim of cores 100 on a board in `dir`, as a lower claim watching it
    /// makes it: publishing when its work runs at every launch.
    fn watched_claim(dir: &std::path::Path) -> (Limiter, Ledger, Vec<String>) {
        let (plain, ledger, uuids) = claim(dir, 100);
        let text = format!(
            r#"{{"version":1,"claimUid":"hot-path-watched","region":"{}","devices":[{{"uuid":"{}","memoryLimit":1073741824,"cores":100}}],"priority":"high"}}"#,
            dir.join("claim-100.region").display(),
            uuids[0]
        );
        drop(plain);
        let config = ShimConfig::from_json(text.as_bytes()).expect("config");
        std::fs::create_dir_all(dir.join("board")).expect("board dir");
        let board = BoardPaths::resolve(
            Some(dir.join("board").display().to_string()),
            "hot-path-watched",
            Priority::High,
        )
        .expect("board paths");
        let limiter = Limiter::new(&config, Some(&board));
        assert!(limiter.boards[0].is_some(), "the board entry opens");
        // Past the first refresh (which would clear it: nobody is really watching).
        limiter.next_refresh[0].store(u64::MAX, Ordering::Relaxed);
        limiter.watched[0].store(true, Ordering::Relaxed);
        (limiter, ledger, uuids)
    }

    fn parts(claim: &(Limiter, Ledger, Vec<String>)) -> Claim<'_> {
        Claim {
            limiter: &claim.0,
            ledger: &claim.1,
            uuids: &claim.2,
        }
    }

    /// A lower claim that reads when a watched claim's work runs queues its own kernel behind
    /// it: so the note must come only once the launch has reached the driver. Noted before, a
    /// filler could queue a kernel in between that runs first, into the watched claim's burst
    /// (seen in the simulation: ~1 % of a server's requests one trainer kernel late).
    #[test]
    fn a_watched_claim_notes_its_launch_only_after_the_driver_has_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watched = watched_claim(dir.path());
        let gpu_dir = dir.path().join("board").join(&watched.2[0]);
        let entry = std::fs::read_dir(&gpu_dir)
            .expect("the GPU's board")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".compute"))
            .expect("the claim's compute entry");
        let busy_until = || {
            let bytes = std::fs::read(&entry).expect("entry");
            let field = &bytes[board::BUSY_OFFSET..board::BUSY_OFFSET + 8];
            u64::from_ne_bytes(field.try_into().expect("8 bytes"))
        };
        let key = key(0x2000, 1);
        cost::learn(key, 200_000);
        let before = busy_until();
        let result = launch(parts(&watched), key, std::ptr::null_mut(), false, || {
            assert_eq!(
                busy_until(),
                before,
                "the launch was noted before it reached the driver"
            );
            CUDA_SUCCESS
        });
        assert_eq!(result, CUDA_SUCCESS);
        assert!(busy_until() > before, "the launch was never noted");
    }

    /// The launch path's own cost on the host clock (what a real GPU node runs), with a
    /// forward that does nothing: no driver, so nothing but the limiter is timed. A benchmark,
    /// not a test: `cargo test -p tessera-shim --release --lib -- --ignored --nocapture hot_path`.
    #[test]
    #[ignore = "benchmark"]
    fn hot_path() {
        const LAUNCHES: u64 = 10_000_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let (whole, half) = (claim(dir.path(), 100), claim(dir.path(), 50));
        let watched = watched_claim(dir.path());
        let key = key(0x1000, 1);
        // 1 ns kernels: 10 M launches at half the GPU owe 20 ms, far less than the loop takes,
        // so the claim stays under its share throughout.
        cost::learn(key, 1);
        let time = |f: &dyn Fn()| {
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_nanos() as f64 / LAUNCHES as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        let bare = time(&|| {
            for _ in 0..LAUNCHES {
                black_box(CUDA_SUCCESS);
            }
        });
        let off = time(&|| {
            for _ in 0..LAUNCHES {
                black_box(launch(
                    parts(&whole),
                    black_box(key),
                    std::ptr::null_mut(),
                    false,
                    || CUDA_SUCCESS,
                ));
            }
        });
        let on = time(&|| {
            for _ in 0..LAUNCHES {
                black_box(launch(
                    parts(&half),
                    black_box(key),
                    std::ptr::null_mut(),
                    false,
                    || CUDA_SUCCESS,
                ));
            }
        });
        let publishing = time(&|| {
            for _ in 0..LAUNCHES {
                black_box(launch(
                    parts(&watched),
                    black_box(key),
                    std::ptr::null_mut(),
                    false,
                    || CUDA_SUCCESS,
                ));
            }
        });
        let coarse = time(&|| {
            for _ in 0..LAUNCHES {
                black_box(clock::coarse());
            }
        });
        let precise = time(&|| {
            for _ in 0..LAUNCHES {
                black_box(clock::now());
            }
        });
        println!("| path | ns per launch |\n|---|---|");
        println!("| no limiter (empty forward) | {bare:.1} |");
        println!("| claim of cores 100 (limiter off) | {off:.1} |");
        println!("| claim of cores 50, under its share | {on:.1} |");
        println!(
            "| `high` claim of cores 100 watched by a lower one (publishes its bursts) | {publishing:.1} |"
        );
        println!("| of which CLOCK_MONOTONIC_COARSE | {coarse:.1} |");
        println!("| (CLOCK_MONOTONIC, for comparison) | {precise:.1} |");
    }
}
