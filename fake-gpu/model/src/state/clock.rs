//! The virtual clock: simulated kernel time, shared by every process on the node.
//!
//! A real GPU runs kernels while the host does other things, so whatever a compute limiter
//! achieves depends on time. Measured against the host's clock, that would make a test's result
//! depend on how busy the test machine is. Here time is virtual, and only the simulation moves it:
//!
//! - Host code takes no time. A process's clock moves only when it waits: for its stream
//!   (synchronise), or for a time (a limiter's sleep, [`Lease::advance_to`]).
//! - A kernel starts when both its process has reached the launch (the process's clock) and the
//!   device is free (the device's `busy_until`), and holds the device's SMs for its duration, so
//!   kernels of all processes queue for the SMs one after another, as time-sliced contexts do.
//! - Processes advance in lockstep: a process may move its clock to `t` only once every other
//!   process taking part has a *horizon* (the virtual time before which it will do nothing: its
//!   clock while it runs, the time it waits for while it waits) no earlier than `t - LOOKAHEAD`.
//!   The process waiting for the earliest time can always go, so there is no deadlock, and the
//!   interleaving of processes in virtual time does not depend on how the host schedules them
//!   beyond `LOOKAHEAD`.
//! - A process takes part from its first kernel or wait (starting at the node's present) until
//!   it leaves
//!   ([`Lease::leave_lockstep`]) or shows no clock activity for `STALE_MS` of wall time (it exited,
//!   or sits idle), so an idle process cannot stop the others for long.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::layout::{MAX_SLOTS, SLOT_ACTIVE, SlotRecord};
use super::{Lease, RecordView, Region};

/// How far (virtual ns) a process may run ahead of the slowest other one.
pub const LOOKAHEAD_NS: u64 = 100_000;
/// Wall-clock silence after which a process no longer holds the others back.
pub const STALE_MS: u64 = 2000;

/// Where virtual time starts on a fresh node: 1,000 s, as a host clock that has been up for a
/// while reads, so that code comparing times against fixed spans meets realistic values.
pub const EPOCH_NS: u64 = 1_000_000_000_000;

/// Where a kernel landed on the device's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub start: u64,
    pub end: u64,
}

fn wall_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000 + 1
}

impl RecordView<'_> {
    /// The latest virtual time any process reached on the node.
    fn frontier(self, device_count: usize) -> u64 {
        (0..device_count)
            .map(|d| self.device(d).frontier.load(Ordering::Acquire))
            .max()
            .unwrap_or(0)
    }

    /// Resets a freshly claimed slot's clock: a newcomer starts at the node's present.
    pub(super) fn start_clock(self, slot: &SlotRecord, device_count: usize) {
        // Virtual time starts at EPOCH_NS, so no caller ever sees the 0 that means "never".
        let now = self.frontier(device_count).max(EPOCH_NS);
        for device in 0..device_count {
            self.device(device)
                .frontier
                .fetch_max(now, Ordering::AcqRel);
        }
        slot.clock.store(now, Ordering::Relaxed);
        slot.horizon.store(now, Ordering::Relaxed);
        slot.heartbeat.store(0, Ordering::Relaxed);
        for busy in &slot.busy {
            busy.store(0, Ordering::Relaxed);
        }
    }
}

impl Region {
    /// The node's present: the latest virtual time any process reached.
    pub fn clock_now(&self) -> u64 {
        self.view().frontier(self.device_count)
    }

    /// Kernel time the device ran, every process.
    pub fn device_busy(&self, device: usize) -> u64 {
        self.view()
            .device(device)
            .busy_total
            .load(Ordering::Relaxed)
    }

    /// The earliest horizon among the other live lockstep participants, if any.
    fn slowest_other(&self, me: usize, wall: u64) -> Option<u64> {
        let view = self.view();
        (0..MAX_SLOTS)
            .filter(|&i| i != me)
            .filter_map(|i| {
                let slot = view.slot(i);
                if slot.state.load(Ordering::Acquire) != SLOT_ACTIVE {
                    return None;
                }
                let beat = slot.heartbeat.load(Ordering::Acquire);
                if beat == 0 || wall.saturating_sub(beat) > STALE_MS {
                    return None;
                }
                Some(slot.horizon.load(Ordering::Acquire))
            })
            .min()
    }
}

impl Lease {
    /// This process's virtual time.
    pub fn clock_now(&self) -> u64 {
        self.slot().clock.load(Ordering::Acquire)
    }

    /// Kernel time this process ran on `device`.
    pub fn busy(&self, device: usize) -> u64 {
        self.slot().busy[device].load(Ordering::Relaxed)
    }

    /// Marks the process as taking part in the lockstep. One that was not (new, idle, left, or
    /// unscheduled past `STALE_MS`) was not holding the others back, so it comes back at the
    /// node's present, as if it had sat idle meanwhile.
    fn beat(&self) -> u64 {
        let wall = wall_ms();
        let slot = self.slot();
        let before = slot.heartbeat.swap(wall, Ordering::AcqRel);
        if before == 0 || wall.saturating_sub(before) > STALE_MS {
            let present = self.region.view().frontier(self.region.device_count);
            slot.clock.fetch_max(present, Ordering::AcqRel);
            slot.horizon.fetch_max(present, Ordering::AcqRel);
        }
        wall
    }

    /// Queues a kernel of `duration` ns on `device` at this process's present.
    pub fn run_kernel(&self, device: usize, duration: u64) -> Placement {
        self.beat();
        let slot = self.slot();
        let record = self.region.view().device(device);
        let ready = slot.clock.load(Ordering::Acquire);
        let mut start = 0;
        let _ = record
            .busy_until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |until| {
                start = until.max(ready);
                Some(start + duration)
            });
        slot.busy[device].fetch_add(duration, Ordering::Relaxed);
        record.busy_total.fetch_add(duration, Ordering::Relaxed);
        Placement {
            start,
            end: start + duration,
        }
    }

    /// Moves this process's clock to `target` (never back), once the lockstep allows it.
    pub fn advance_to(&self, target: u64) {
        let slot = self.slot();
        let now = slot.clock.load(Ordering::Acquire);
        if target <= now {
            self.beat();
            return;
        }
        slot.horizon.store(target, Ordering::Release);
        let mut waited = 0u32;
        loop {
            let wall = self.beat();
            match self.region.slowest_other(self.index, wall) {
                Some(other) if other.saturating_add(LOOKAHEAD_NS) < target => {}
                _ => break,
            }
            waited += 1;
            if waited < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        slot.clock.store(target, Ordering::Release);
        let view = self.region.view();
        for device in 0..self.region.device_count {
            view.device(device)
                .frontier
                .fetch_max(target, Ordering::AcqRel);
        }
    }

    /// Stops holding the other processes back until this one next runs a kernel or waits.
    pub fn leave_lockstep(&self) {
        self.slot().heartbeat.store(0, Ordering::Release);
    }
}
