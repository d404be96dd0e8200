//! Utilisation from the virtual clock: the share of virtual time a process (or anyone) kept the
//! device's SMs busy, over the window since this NVML client last asked about it — which is how
//! a monitor polling NVML sees it (the real NVML averages over its own sampling period).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// (device, slot, pid); slot [`DEVICE`] stands for the whole device.
type Key = (usize, usize, u32);
/// (cumulative busy ns, virtual ns) when last asked.
type Seen = (u64, u64);

/// What was seen at the previous query of each key.
static SEEN: Mutex<BTreeMap<Key, Seen>> = Mutex::new(BTreeMap::new());

pub const DEVICE: usize = usize::MAX;

/// Percent of `now - previous query` that `busy` (cumulative kernel ns) grew by; 0 at the
/// first query of a key.
pub fn percent(device: usize, slot: usize, pid: u32, busy: u64, now: u64) -> u32 {
    let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let previous = seen.insert((device, slot, pid), (busy, now));
    let Some((busy_before, then)) = previous else {
        return 0;
    };
    let elapsed = now.saturating_sub(then);
    if elapsed == 0 {
        return 0;
    }
    let share = busy.saturating_sub(busy_before).saturating_mul(100) / elapsed;
    share.min(100) as u32
}
