//! Keeps panics on this side of the C ABI.
//!
//! Since Rust 1.81 a panic unwinding out of an `extern "C"` function aborts the process: the
//! user's program would die for a bug in the shim. Every exported function runs its body
//! through [`guard`], which turns a panic into an error code the caller already handles.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `body`, answering `on_panic` if it panics.
#[inline(always)]
pub fn guard<R>(on_panic: R, body: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(on_panic)
}
