//! Time as the fake device sees it.
//!
//! Today this is the host's monotonic clock, so events measure real elapsed time. It is the one
//! place a virtual clock (simulated kernel durations, per-device busy time) will plug in.

/// Nanoseconds on the device clock; never 0 (0 means "not recorded" to callers).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
        .max(1)
}
