//! The exported `dlsym`, so programs that `dlopen` the driver and look its functions up by name
//! get the shim's wrappers.
//!
//! The hard part is everything the shim must *not* change. `dlsym(RTLD_NEXT, …)` resolves
//! relative to its caller; if the shim called the real `dlsym` itself, "next" would be relative
//! to the shim, and an interposer that looks up its own successor (profilers, allocators — the
//! cause of HAMi's "recursive dlsym" hangs) could be handed itself. On x86-64 the exported
//! `dlsym` is therefore a small naked trampoline: it asks [`lookup`] whether the name is one of
//! the shim's, and if not *tail-jumps* to the real `dlsym` with the caller's return address still
//! on the stack, so glibc sees the original caller. Lookups made by the driver itself are never
//! redirected, so a driver that resolves its own entry points cannot recurse into the shim.

use std::ffi::{CStr, c_char, c_void};

use crate::hooks;
use crate::real::real_dlsym_address;

/// The shim's answer for `name`, or NULL to let the real `dlsym` answer. Called by the
/// trampoline with the caller's return address.
extern "C" fn lookup(
    _handle: *mut c_void,
    name: *const c_char,
    caller: *const c_void,
) -> *mut c_void {
    crate::guard::guard(std::ptr::null_mut(), || {
        // Resolve the real dlsym before answering, so the trampoline's jump has a target.
        if real_dlsym_address() == 0 || name.is_null() {
            return std::ptr::null_mut();
        }
        // SAFETY: dlsym's contract: `name` is a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes();
        if !(name.starts_with(b"cu") || name.starts_with(b"nvml")) {
            return std::ptr::null_mut();
        }
        let hook = hooks::by_symbol(name);
        if hook.is_null()
            || crate::enforcer::is_initialising_thread()
            || crate::enforcer::is_driver_address(caller)
        {
            return std::ptr::null_mut();
        }
        hook
    })
}

#[cfg(target_arch = "x86_64")]
mod trampoline {
    use super::*;
    use crate::real::REAL_DLSYM;

    /// `void *dlsym(void *handle, const char *name)`.
    ///
    /// # Safety
    /// Called by C with `dlsym`'s contract.
    #[unsafe(naked)]
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn dlsym(_handle: *mut c_void, _name: *const c_char) -> *mut c_void {
        core::arch::naked_asm!(
            // The caller's return address, for lookup's third argument.
            "mov rdx, [rsp]",
            "push rdi",
            "push rsi",
            // Keep the stack 16-byte aligned for the call.
            "sub rsp, 8",
            "call {lookup}",
            "add rsp, 8",
            "pop rsi",
            "pop rdi",
            "test rax, rax",
            "jz 2f",
            "ret",
            "2:",
            "jmp qword ptr [rip + {real}]",
            lookup = sym lookup,
            real = sym REAL_DLSYM,
        )
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod trampoline {
    use super::*;
    use crate::real::real_dlsym;

    /// Portable fallback: correct for every name the shim answers; `RTLD_NEXT` lookups of other
    /// names resolve relative to the shim rather than the caller.
    ///
    /// # Safety
    /// Called by C with `dlsym`'s contract.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
        let hook = lookup(handle, name, std::ptr::null());
        if !hook.is_null() {
            return hook;
        }
        // SAFETY: forwarded arguments.
        unsafe { real_dlsym(handle, name) }
    }
}
