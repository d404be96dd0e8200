//! NVML events: event sets, registration and waiting, for critical XID errors only.
//!
//! XIDs come from the node's events file (the model crate's `events`: JSON lines
//! `{"uuid": "GPU-…", "xid": 79}` appended by a test, from any process). Each event set reads
//! the file on its own from where it stood when it was created, so every set delivers each event
//! once. A set delivers an XID of a device only if the event was appended after the device was
//! registered with `nvmlEventTypeXidCriticalError` in that set, as the real driver delivers
//! only what happens after registration. `nvmlEventSetWait_v2` polls the file every
//! [`POLL`] until its timeout: it sleeps between looks, never spins.
//!
//! A set handle is the address of the set's allocation, looked up in a table before use, so a
//! foreign or freed pointer is `NVML_ERROR_INVALID_ARGUMENT`, never dereferenced.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::c_uint;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tessera_fake_gpu_model::MAX_DEVICES;
use tessera_fake_gpu_model::events as log;
use tessera_gpu_abi::nvml::*;

use crate::device::{handle, resolve};
use crate::guard::{Result, check, guard, put};
use crate::library::{Node, node};

/// How often a waiting set looks at the events file.
pub const POLL: Duration = Duration::from_millis(20);

/// The event types a fake device supports (and so may be registered): XIDs only. Well-behaved
/// clients (NVIDIA's device plugin, DCGM) mask what they ask for with
/// `nvmlDeviceGetSupportedEventTypes`.
const SUPPORTED: u64 = nvmlEventTypeXidCriticalError;

struct SetState {
    node: Arc<Node>,
    /// Where this set has read the events file up to.
    cursor: u64,
    /// Per device: the offset from which its XIDs are delivered (`None`: not registered).
    registered: [Option<u64>; MAX_DEVICES],
    /// Read, not yet delivered: (device, XID).
    pending: VecDeque<(usize, u64)>,
}

struct EventSet {
    state: Mutex<SetState>,
    freed: AtomicBool,
}

impl EventSet {
    fn state(&self) -> MutexGuard<'_, SetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

static SETS: Mutex<BTreeMap<usize, Arc<EventSet>>> = Mutex::new(BTreeMap::new());

fn sets() -> MutexGuard<'static, BTreeMap<usize, Arc<EventSet>>> {
    SETS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The live set a handle names.
fn lookup(set: nvmlEventSet_t) -> Result<Arc<EventSet>> {
    check(!set.is_null())?;
    sets()
        .get(&(set as usize))
        .cloned()
        .ok_or(NVML_ERROR_INVALID_ARGUMENT)
}

/// Lines of the events file already complained about (path, offset): each once per process.
static WARNED: Mutex<BTreeSet<(PathBuf, u64)>> = Mutex::new(BTreeSet::new());

fn warn_once(path: &std::path::Path, offset: u64, problem: &str) {
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.insert((path.to_owned(), offset)) {
        eprintln!(
            "fakegpu: libnvidia-ml: events file {} (byte {offset}): {problem}; line ignored",
            path.display()
        );
    }
}

impl SetState {
    /// Reads what was appended since the last look into `pending`.
    fn read(&mut self) {
        let path = &self.node.events;
        let (lines, next) = match log::read_from(path, self.cursor) {
            Some(read) => read,
            None => {
                // Truncated or replaced: a new log, every line of it after registration.
                self.cursor = 0;
                for offset in self.registered.iter_mut().flatten() {
                    *offset = 0;
                }
                log::read_from(path, 0).unwrap_or_default()
            }
        };
        self.cursor = next;
        for line in lines {
            let event = match line.event {
                Ok(event) => event,
                Err(e) => {
                    warn_once(path, line.offset, &format!("not an event ({e})"));
                    continue;
                }
            };
            let Some(index) = self
                .node
                .config
                .devices
                .iter()
                .position(|d| d.uuid.as_str().eq_ignore_ascii_case(event.uuid.trim()))
            else {
                warn_once(
                    path,
                    line.offset,
                    &format!("no GPU {} on this node", event.uuid),
                );
                continue;
            };
            if self.registered[index].is_some_and(|from| line.offset >= from) {
                self.pending.push_back((index, event.xid));
            }
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    guard(|| {
        let node = node()?;
        check(!set.is_null())?;
        let cursor = log::end(&node.events);
        let created = Arc::new(EventSet {
            state: Mutex::new(SetState {
                node,
                cursor,
                registered: [None; MAX_DEVICES],
                pending: VecDeque::new(),
            }),
            freed: AtomicBool::new(false),
        });
        let address = Arc::as_ptr(&created) as usize;
        sets().insert(address, created);
        unsafe { put(set, address as nvmlEventSet_t) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    guard(|| {
        node()?;
        check(!set.is_null())?;
        let freed = sets()
            .remove(&(set as usize))
            .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        freed.freed.store(true, Ordering::Release);
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    event_types: *mut u64,
) -> nvmlReturn_t {
    guard(|| {
        resolve(device)?;
        unsafe { put(event_types, SUPPORTED) }
    })
}

/// Types outside `nvmlEventTypeAll` → `NVML_ERROR_INVALID_ARGUMENT`; known types the device does
/// not support → `NVML_ERROR_NOT_SUPPORTED`. Registering a device again changes nothing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    event_types: u64,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    guard(|| {
        let (_, index) = resolve(device)?;
        let target = lookup(set)?;
        check(event_types & !nvmlEventTypeAll == 0)?;
        if event_types & !SUPPORTED != 0 {
            return Err(NVML_ERROR_NOT_SUPPORTED);
        }
        if event_types & nvmlEventTypeXidCriticalError != 0 {
            let mut state = target.state();
            if state.registered[index].is_none() {
                let from = log::end(&state.node.events);
                state.registered[index] = Some(from);
            }
        }
        Ok(())
    })
}

/// Waits up to `timeout_ms` for the set's next event: `NVML_ERROR_TIMEOUT` when none came.
fn wait(set: nvmlEventSet_t, timeout_ms: c_uint) -> Result<nvmlEventData_t> {
    node()?;
    let target = lookup(set)?;
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        if target.freed.load(Ordering::Acquire) {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        {
            let mut state = target.state();
            if state.pending.is_empty() {
                state.read();
            }
            if let Some((index, xid)) = state.pending.pop_front() {
                return Ok(nvmlEventData_t {
                    device: handle(index),
                    event_type: nvmlEventTypeXidCriticalError,
                    event_data: xid,
                    gpu_instance_id: NVML_VALUE_NOT_AVAILABLE_UINT,
                    compute_instance_id: NVML_VALUE_NOT_AVAILABLE_UINT,
                });
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(NVML_ERROR_TIMEOUT);
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        node()?;
        check(!data.is_null())?;
        let event = wait(set, timeout_ms)?;
        unsafe { put(data, event) }
    })
}

/// The v1 call predates the MIG ids: its struct ends before `gpuInstanceId`, so only that
/// prefix is written.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        node()?;
        check(!data.is_null())?;
        let event = wait(set, timeout_ms)?;
        let prefix = std::mem::offset_of!(nvmlEventData_t, gpu_instance_id);
        // SAFETY: `data` points to at least the v1 struct, which is `prefix` bytes long.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&event as *const nvmlEventData_t).cast::<u8>(),
                data.cast::<u8>(),
                prefix,
            )
        };
        Ok(())
    })
}
