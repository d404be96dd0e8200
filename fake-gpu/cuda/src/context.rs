//! Contexts: one primary context per device (reference-counted, the same handle for the life of
//! the process), created contexts, and each thread's stack of current contexts.
//!
//! A context owns what is allocated in it: when it is destroyed (or a primary context's last
//! reference is released, or it is reset) its memory, arrays, streams, events and modules go
//! with it and the device memory returns to the card, as with the real driver. A context may
//! cost device memory of its own (`contextMemory` in the config, 0 by default).

use std::cell::RefCell;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tessera_gpu_abi::cuda::*;

use crate::guard::{Result, check, guard, put};
use crate::handles::{Kind, Registry, from_ptr, lock, new_handle, to_ptr};
use crate::process::{Gpu, Process, process};

pub struct Context {
    pub handle: u64,
    /// CUDA ordinal.
    pub device: usize,
    /// Index in the node (state file).
    pub physical: usize,
    generation: u64,
    alive: AtomicBool,
    flags: AtomicU32,
}

impl Context {
    fn is_usable(&self, process: &Process) -> bool {
        self.generation == process.generation && self.alive.load(Ordering::Acquire)
    }

    fn current(&self) -> Current {
        Current {
            handle: self.handle,
            device: self.device,
            physical: self.physical,
        }
    }
}

/// The small, copyable facts a call needs about the current context.
#[derive(Clone, Copy, Debug)]
pub struct Current {
    pub handle: u64,
    pub device: usize,
    pub physical: usize,
}

struct Primary {
    context: Arc<Context>,
    refs: Mutex<u32>,
}

pub struct Contexts {
    primaries: Vec<Primary>,
    created: Registry<Context>,
    /// Active contexts per CUDA ordinal; NVML lists the process on a device while this is > 0.
    active: Vec<AtomicU32>,
}

thread_local! {
    /// This thread's context stack, top last. Entries may be stale (destroyed, or from a fork
    /// parent's driver state); they are checked at every use.
    static STACK: RefCell<Vec<Arc<Context>>> = const { RefCell::new(Vec::new()) };
}

impl Contexts {
    pub fn new(generation: u64, gpus: &[Gpu]) -> Self {
        let primaries = gpus
            .iter()
            .enumerate()
            .map(|(device, gpu)| Primary {
                context: Arc::new(Context {
                    handle: new_handle(Kind::Context),
                    device,
                    physical: gpu.physical,
                    generation,
                    alive: AtomicBool::new(false),
                    flags: AtomicU32::new(0),
                }),
                refs: Mutex::new(0),
            })
            .collect();
        Self {
            primaries,
            created: Registry::new(Kind::Context),
            active: (0..gpus.len()).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Live contexts (primary and created) on a device, in this process.
    pub fn active_on(&self, device: usize) -> u32 {
        self.active
            .get(device)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// The context behind a handle, primary or created.
    fn find(&self, handle: u64) -> Option<Arc<Context>> {
        if let Some(primary) = self.primaries.iter().find(|p| p.context.handle == handle) {
            return Some(Arc::clone(&primary.context));
        }
        self.created.get(handle)
    }
}

/// The calling thread's current context, or `CUDA_ERROR_INVALID_CONTEXT` when there is none or
/// it has been destroyed. Touches no shared memory but the context's liveness flag: this is on
/// every allocation and launch.
#[inline]
pub fn current(process: &Process) -> Result<Current> {
    STACK.with(|stack| match stack.borrow().last() {
        Some(ctx) if ctx.is_usable(process) => Ok(ctx.current()),
        _ => Err(CUDA_ERROR_INVALID_CONTEXT),
    })
}

/// Makes a context live: charges its own memory and lists the process on its device.
fn activate(process: &Process, ctx: &Context) -> Result {
    let overhead = process.gpus[ctx.device].spec.context_memory;
    if overhead > 0 {
        process
            .lease
            .reserve(ctx.physical, overhead)
            .map_err(|_| CUDA_ERROR_OUT_OF_MEMORY)?;
    }
    if process.contexts.active[ctx.device].fetch_add(1, Ordering::Relaxed) == 0 {
        process.lease.set_device_open(ctx.physical, true);
    }
    ctx.alive.store(true, Ordering::Release);
    Ok(())
}

/// Ends a context's life: everything allocated in it is freed and its memory given back.
fn deactivate(process: &Process, ctx: &Context) {
    ctx.alive.store(false, Ordering::Release);
    release_resources(process, ctx.handle);
    let overhead = process.gpus[ctx.device].spec.context_memory;
    if overhead > 0 {
        process.lease.release(ctx.physical, overhead);
    }
    if process.contexts.active[ctx.device].fetch_sub(1, Ordering::Relaxed) == 1 {
        process.lease.set_device_open(ctx.physical, false);
    }
}

fn release_resources(process: &Process, ctx: u64) {
    process.memory.free_context(process, ctx);
    process.arrays.destroy_context(process, ctx);
    process.streams.destroy_context(ctx);
    process.modules.unload_context(ctx);
}

fn push(ctx: Arc<Context>) {
    STACK.with(|stack| stack.borrow_mut().push(ctx));
}

// --- Primary contexts ---------------------------------------------------------------------------

fn primary_retain(device: CUdevice) -> Result<u64> {
    let process = process()?;
    process.gpu(device)?;
    let primary = &process.contexts.primaries[device as usize];
    let mut refs = lock(&primary.refs);
    if *refs == 0 {
        activate(process, &primary.context)?;
    }
    *refs += 1;
    Ok(primary.context.handle)
}

fn primary_release(device: CUdevice) -> Result {
    let process = process()?;
    process.gpu(device)?;
    let primary = &process.contexts.primaries[device as usize];
    let mut refs = lock(&primary.refs);
    if *refs == 0 {
        return Err(CUDA_ERROR_INVALID_CONTEXT);
    }
    *refs -= 1;
    if *refs == 0 {
        deactivate(process, &primary.context);
    }
    Ok(())
}

fn primary_reset(device: CUdevice) -> Result {
    let process = process()?;
    process.gpu(device)?;
    let primary = &process.contexts.primaries[device as usize];
    let mut refs = lock(&primary.refs);
    if *refs > 0 {
        *refs = 0;
        deactivate(process, &primary.context);
    }
    primary.context.flags.store(0, Ordering::Relaxed);
    Ok(())
}

fn valid_context_flags(flags: c_uint) -> bool {
    let known = CU_CTX_SCHED_MASK
        | CU_CTX_MAP_HOST
        | CU_CTX_LMEM_RESIZE_TO_MAX
        | CU_CTX_COREDUMP_ENABLE
        | CU_CTX_USER_COREDUMP_ENABLE
        | CU_CTX_SYNC_MEMOPS;
    flags & !known == 0 && matches!(flags & CU_CTX_SCHED_MASK, 0 | 1 | 2 | 4)
}

fn primary_set_flags(device: CUdevice, flags: c_uint, refuse_if_active: bool) -> Result {
    let process = process()?;
    process.gpu(device)?;
    check(valid_context_flags(flags))?;
    let primary = &process.contexts.primaries[device as usize];
    let refs = lock(&primary.refs);
    if refuse_if_active && *refs > 0 {
        return Err(CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE);
    }
    primary.context.flags.store(flags, Ordering::Relaxed);
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    guard(|| {
        process()?;
        check(!pctx.is_null())?;
        let handle = primary_retain(dev)?;
        unsafe { put(pctx, to_ptr(handle)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease(dev: CUdevice) -> CUresult {
    guard(|| primary_release(dev))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    guard(|| primary_release(dev))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset(dev: CUdevice) -> CUresult {
    guard(|| primary_reset(dev))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    guard(|| primary_reset(dev))
}

/// The v1 call refuses while the context is active; `_v2` (CUDA 11) allows it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxSetFlags(dev: CUdevice, flags: c_uint) -> CUresult {
    guard(|| primary_set_flags(dev, flags, true))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxSetFlags_v2(dev: CUdevice, flags: c_uint) -> CUresult {
    guard(|| primary_set_flags(dev, flags, false))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    dev: CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    guard(|| {
        let process = process()?;
        process.gpu(dev)?;
        check(!flags.is_null() && !active.is_null())?;
        let primary = &process.contexts.primaries[dev as usize];
        let refs = *lock(&primary.refs);
        unsafe {
            put(flags, primary.context.flags.load(Ordering::Relaxed))?;
            put(active, c_int::from(refs > 0))
        }
    })
}

// --- Created contexts ---------------------------------------------------------------------------

fn create(pctx: *mut CUcontext, flags: c_uint, dev: CUdevice) -> Result {
    let process = process()?;
    check(!pctx.is_null() && valid_context_flags(flags))?;
    let gpu = process.gpu(dev)?;
    let (handle, ctx) = process.contexts.created.insert_with(|handle| Context {
        handle,
        device: dev as usize,
        physical: gpu.physical,
        generation: process.generation,
        alive: AtomicBool::new(false),
        flags: AtomicU32::new(flags),
    });
    if let Err(code) = activate(process, &ctx) {
        process.contexts.created.remove(handle);
        return Err(code);
    }
    // Like the real driver, a new context becomes current on the calling thread.
    push(ctx);
    unsafe { put(pctx, to_ptr(handle)) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v2(
    pctx: *mut CUcontext,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    guard(|| create(pctx, flags, dev))
}

/// Execution-affinity parameters (SM count limits) are accepted and not simulated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v3(
    pctx: *mut CUcontext,
    params: *mut c_void,
    num_params: c_int,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        process()?;
        check(num_params >= 0 && (num_params == 0 || !params.is_null()))?;
        create(pctx, flags, dev)
    })
}

/// Creation parameters (affinity, CIG) are accepted and not simulated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v4(
    pctx: *mut CUcontext,
    _params: *mut c_void,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    guard(|| create(pctx, flags, dev))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!ctx.is_null())?;
        let handle = from_ptr(ctx);
        // Primary contexts are released, never destroyed.
        let ctx = process
            .contexts
            .created
            .remove(handle)
            .ok_or(CUDA_ERROR_INVALID_CONTEXT)?;
        deactivate(process, &ctx);
        STACK.with(|stack| stack.borrow_mut().retain(|c| c.handle != handle));
        Ok(())
    })
}

// --- The current-context stack ------------------------------------------------------------------

fn usable(process: &Process, ctx: CUcontext) -> Result<Arc<Context>> {
    process
        .contexts
        .find(from_ptr(ctx))
        .filter(|c| c.is_usable(process))
        .ok_or(CUDA_ERROR_INVALID_CONTEXT)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!ctx.is_null())?;
        push(usable(process, ctx)?);
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) -> CUresult {
    guard(|| {
        process()?;
        let popped = STACK
            .with(|stack| stack.borrow_mut().pop())
            .ok_or(CUDA_ERROR_INVALID_CONTEXT)?;
        if !pctx.is_null() {
            unsafe { put(pctx, to_ptr(popped.handle)) }?;
        }
        Ok(())
    })
}

/// Replaces the top of the stack; NULL unbinds (pops) it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    guard(|| {
        let process = process()?;
        if ctx.is_null() {
            STACK.with(|stack| stack.borrow_mut().pop());
            return Ok(());
        }
        let ctx = usable(process, ctx)?;
        STACK.with(|stack| {
            let mut stack = stack.borrow_mut();
            stack.pop();
            stack.push(ctx);
        });
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    guard(|| {
        process()?;
        let top = STACK
            .with(|stack| stack.borrow().last().map(|c| c.handle))
            .unwrap_or(0);
        unsafe { put(pctx, to_ptr(top)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!device.is_null())?;
        let current = current(process)?;
        unsafe { put(device, current.device as CUdevice) }
    })
}

/// Work completes when it is issued (no timing simulation yet), so there is nothing to wait for.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    guard(|| {
        let process = process()?;
        current(process)?;
        crate::clock::synchronise(process);
        Ok(())
    })
}
