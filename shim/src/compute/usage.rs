//! How much GPU time a claim's kernels take: every launch adds its measured cost to a per-thread
//! tally, which goes into the claim's region (`compute_busy_ns`, one counter per device shared
//! by all of the claim's processes) at most every `FLUSH_NS` of the limiter's clock or once it
//! holds `FLUSH_BUSY_NS` of GPU time. The plugin exports the counter, so a claim's achieved
//! share of the GPU shows beside its `cores`. One shared atomic update per flush, not per
//! launch: the launch path pays a thread-local add.

use std::cell::Cell;
use std::sync::atomic::Ordering;

use crate::ledger::Ledger;

/// A thread's tally goes to the region at least this often (limiter clock) while it launches.
const FLUSH_NS: u64 = 10_000_000;
/// ... and as soon as it holds this much GPU time, so that a thread that stops after a few long
/// kernels leaves little uncounted.
const FLUSH_BUSY_NS: u64 = 1_000_000;

#[derive(Clone, Copy)]
struct Tally {
    device: usize,
    pending: u64,
    flush_at: u64,
}

thread_local! {
    static TALLY: Cell<Tally> = const {
        Cell::new(Tally {
            device: 0,
            pending: 0,
            flush_at: 0,
        })
    };
}

/// Counts a launch of `cost` ns on the claim's `device` at `now`.
#[inline(always)]
pub fn count(ledger: &Ledger, device: usize, cost: u64, now: u64) {
    TALLY.with(|cell| {
        let mut tally = cell.get();
        if tally.device == device {
            tally.pending = tally.pending.saturating_add(cost);
            if now < tally.flush_at && tally.pending < FLUSH_BUSY_NS {
                cell.set(tally);
                return;
            }
        } else {
            flush(ledger, &tally);
            tally = Tally {
                device,
                pending: cost,
                flush_at: 0,
            };
        }
        flush(ledger, &tally);
        cell.set(Tally {
            device,
            pending: 0,
            flush_at: now.saturating_add(FLUSH_NS),
        });
    });
}

#[cold]
fn flush(ledger: &Ledger, tally: &Tally) {
    if tally.pending > 0 {
        ledger
            .compute_busy(tally.device)
            .fetch_add(tally.pending, Ordering::Relaxed);
    }
}
