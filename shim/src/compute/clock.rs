//! The limiter's time: the host's monotonic clock, or the driver's own clock when the driver
//! provides one.
//!
//! Tessera's fake driver simulates kernel time on a virtual clock and exports it
//! (`fakegpu_clock_ns`, `fakegpu_clock_sleep_until_ns`); a limiter keeping wall-clock time against
//! a simulated GPU would measure the test machine's load rather than itself. NVIDIA's driver
//! exports no such names, so on a real GPU this is `CLOCK_MONOTONIC` and `clock_nanosleep`.

use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::real::real_dlsym;

type NowFn = unsafe extern "C" fn() -> u64;
type SleepFn = unsafe extern "C" fn(u64) -> i32;

static DRIVER_NOW: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static DRIVER_SLEEP: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// Looks for a driver clock in the loaded driver (`handle` from `dlopen`, may be null).
pub fn detect(handle: *mut c_void) {
    if handle.is_null() {
        return;
    }
    // SAFETY: a live dlopen handle and NUL-terminated names.
    let (now, sleep) = unsafe {
        (
            real_dlsym(handle, c"fakegpu_clock_ns".as_ptr()),
            real_dlsym(handle, c"fakegpu_clock_sleep_until_ns".as_ptr()),
        )
    };
    if !now.is_null() && !sleep.is_null() {
        DRIVER_SLEEP.store(sleep, Ordering::Release);
        DRIVER_NOW.store(now, Ordering::Release);
    }
}

/// Nanoseconds on the limiter's clock.
#[inline(always)]
pub fn now() -> u64 {
    let driver = DRIVER_NOW.load(Ordering::Relaxed);
    if !driver.is_null() {
        // SAFETY: resolved from the driver under the name whose signature NowFn is.
        return unsafe { std::mem::transmute::<*mut c_void, NowFn>(driver)() };
    }
    monotonic()
}

/// The clock as of the kernel's last tick (up to a few milliseconds behind [`now`], never
/// ahead), for the launch path's "is the claim within its share" test: `CLOCK_MONOTONIC_COARSE`
/// is a plain read of the vDSO page (≈7 ns), where `CLOCK_MONOTONIC` must read and scale the
/// TSC (≈20 ns on bare metal, measured 67 ns on this project's VM). Whatever waits uses [`now`].
#[inline(always)]
pub fn coarse() -> u64 {
    let driver = DRIVER_NOW.load(Ordering::Relaxed);
    if !driver.is_null() {
        // SAFETY: as in `now`.
        return unsafe { std::mem::transmute::<*mut c_void, NowFn>(driver)() };
    }
    read(libc::CLOCK_MONOTONIC_COARSE)
}

#[inline(always)]
fn monotonic() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

#[inline(always)]
fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; both monotonic clocks always exist (vDSO calls, no syscall).
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// Blocks the calling thread until the clock reads `until`.
pub fn sleep_until(until: u64) {
    let driver = DRIVER_SLEEP.load(Ordering::Relaxed);
    if !driver.is_null() {
        // SAFETY: resolved from the driver under the name whose signature SleepFn is.
        unsafe { std::mem::transmute::<*mut c_void, SleepFn>(driver)(until) };
        return;
    }
    let ts = libc::timespec {
        tv_sec: (until / 1_000_000_000) as libc::time_t,
        tv_nsec: (until % 1_000_000_000) as libc::c_long,
    };
    // EINTR (a signal) just ends the sleep early; the caller looks at the clock again.
    // SAFETY: a valid timespec; absolute time on CLOCK_MONOTONIC.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}
