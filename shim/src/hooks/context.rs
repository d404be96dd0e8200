//! `cuInit` and contexts. A CUDA context holds device memory no allocation call reports; the
//! claim's `contextOverhead` is charged for each context a process creates, so the wall covers
//! what the card really loses.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::Ordering;

use tessera_gpu_abi::cuda::*;

use super::dispatch;
use crate::devices::Grant;
use crate::enforcer::Enforcer;
use crate::guard::guard;
use crate::ptr_table::Charge;
use crate::real::cuda as real;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuInit,
            |f| unsafe { f(flags) },
            |_, f| unsafe { f(flags) },
        )
    })
}

fn overhead(enforcer: &Enforcer, device: CUdevice) -> Option<(usize, u64)> {
    match enforcer.grant(device) {
        Grant::Claim(index) => Some((index, enforcer.context_overhead[index])),
        Grant::NotGranted => None,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(
    pctx: *mut CUcontext,
    device: CUdevice,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuDevicePrimaryCtxRetain,
            |f| unsafe { f(pctx, device) },
            |e, f| {
                let flag = usize::try_from(device)
                    .ok()
                    .and_then(|d| crate::enforcer::PRIMARY_CHARGED.get(d));
                let charge = match (overhead(e, device), flag) {
                    (Some(charge), Some(flag)) if !flag.load(Ordering::Acquire) => Some(charge),
                    _ => None,
                };
                if let Some((index, bytes)) = charge
                    && !e.ledger.reserve(index, bytes)
                {
                    return CUDA_ERROR_OUT_OF_MEMORY;
                }
                let result = unsafe { f(pctx, device) };
                if let (Some((index, bytes)), Some(flag)) = (charge, flag) {
                    // Another thread may have charged the same primary context meanwhile.
                    if result != CUDA_SUCCESS || flag.swap(true, Ordering::AcqRel) {
                        e.ledger.release(index, bytes);
                    } else {
                        e.ledger.count_context(index, 1);
                    }
                }
                result
            },
        )
    })
}

/// After a primary context may have gone away, give its charge back if it did.
fn settle_primary(enforcer: &Enforcer, device: CUdevice) {
    let Some(flag) = usize::try_from(device)
        .ok()
        .and_then(|d| crate::enforcer::PRIMARY_CHARGED.get(d))
    else {
        return;
    };
    let Some(get_state) = real::cuDevicePrimaryCtxGetState.get() else {
        return;
    };
    let (mut flags, mut active): (c_uint, c_int) = (0, 0);
    // SAFETY: real driver call with valid out-pointers.
    if unsafe { get_state(device, &mut flags, &mut active) } != CUDA_SUCCESS || active != 0 {
        return;
    }
    if flag.swap(false, Ordering::AcqRel)
        && let Some((index, bytes)) = overhead(enforcer, device)
    {
        enforcer.ledger.release(index, bytes);
        enforcer.ledger.count_context(index, -1);
    }
}

macro_rules! primary_release {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(device: CUdevice) -> CUresult {
            guard(CUDA_ERROR_UNKNOWN, || {
                dispatch(
                    &real::$name,
                    |f| unsafe { f(device) },
                    |e, f| {
                        let result = unsafe { f(device) };
                        if result == CUDA_SUCCESS {
                            settle_primary(e, device);
                        }
                        result
                    },
                )
            })
        }
    };
}
primary_release!(cuDevicePrimaryCtxRelease);
primary_release!(cuDevicePrimaryCtxRelease_v2);
primary_release!(cuDevicePrimaryCtxReset);
primary_release!(cuDevicePrimaryCtxReset_v2);

/// Charges a new context's overhead around `create`, recording the context for its destroy.
fn created(
    enforcer: &Enforcer,
    pctx: *mut CUcontext,
    device: CUdevice,
    create: impl FnOnce() -> CUresult,
) -> CUresult {
    let Some((index, bytes)) = overhead(enforcer, device) else {
        return create();
    };
    if !enforcer.ledger.reserve(index, bytes) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let result = create();
    if result != CUDA_SUCCESS || pctx.is_null() {
        enforcer.ledger.release(index, bytes);
        return result;
    }
    // SAFETY: the driver wrote the new context on success.
    let ctx = unsafe { *pctx };
    if !enforcer.contexts.insert(
        ctx as u64,
        Charge {
            bytes,
            device: index,
        },
    ) {
        if let Some(destroy) = real::cuCtxDestroy_v2.get() {
            unsafe { destroy(ctx) };
        }
        enforcer.ledger.release(index, bytes);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    enforcer.ledger.count_context(index, 1);
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v2(
    pctx: *mut CUcontext,
    flags: c_uint,
    device: CUdevice,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuCtxCreate_v2,
            |f| unsafe { f(pctx, flags, device) },
            |e, f| created(e, pctx, device, || unsafe { f(pctx, flags, device) }),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v3(
    pctx: *mut CUcontext,
    params: *mut c_void,
    num_params: c_int,
    flags: c_uint,
    device: CUdevice,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuCtxCreate_v3,
            |f| unsafe { f(pctx, params, num_params, flags, device) },
            |e, f| {
                created(e, pctx, device, || unsafe {
                    f(pctx, params, num_params, flags, device)
                })
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v4(
    pctx: *mut CUcontext,
    params: *mut c_void,
    flags: c_uint,
    device: CUdevice,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuCtxCreate_v4,
            |f| unsafe { f(pctx, params, flags, device) },
            |e, f| {
                created(e, pctx, device, || unsafe {
                    f(pctx, params, flags, device)
                })
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuCtxDestroy_v2,
            |f| unsafe { f(ctx) },
            |e, f| {
                let charge = e.contexts.remove(ctx as u64);
                let result = unsafe { f(ctx) };
                match charge {
                    Some(c) if result == CUDA_SUCCESS => {
                        e.ledger.release(c.device, c.bytes);
                        e.ledger.count_context(c.device, -1);
                    }
                    Some(c) => {
                        e.contexts.insert(ctx as u64, c);
                    }
                    None => {}
                }
                result
            },
        )
    })
}
