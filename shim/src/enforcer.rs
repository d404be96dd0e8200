//! Start-up: find the claim's config, map its region, load the real libraries — once, on the
//! first intercepted call, never in a constructor or inside `dlsym`.
//!
//! Three outcomes: no config → every call passes through untouched; a valid config → limits are
//! enforced; a config that exists but cannot be used → the GPU is refused (fail closed) with one
//! line on stderr naming the file and the problem, never silently unlimited.

use std::ffi::{CStr, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

use tessera_api::names::{SHIM_CONFIG_DEFAULT_PATH, SHIM_CONFIG_ENV};
use tessera_api::region::{MAX_DEVICES, RegionDeviceSpec};
use tessera_api::shim_config::ShimConfig;

use crate::board_files::BoardPaths;
use crate::compute::Limiter;
use crate::devices::{self, Grant};
use crate::ledger::Ledger;
use crate::ptr_table::PtrTable;
use crate::spill::{MemoryBoard, Spill};
use crate::{real, report};

/// Live device allocations a process can hold before new ones are refused.
const POINTER_CAPACITY: usize = 1 << 20;
/// Live VMM handles, arrays and contexts.
const HANDLE_CAPACITY: usize = 1 << 16;

pub enum Mode {
    /// No config: the shim is invisible.
    Passthrough,
    /// Limits enforced.
    Enforcing(Box<Enforcer>),
    /// A config exists but cannot be used; the GPU is refused.
    Refused,
}

pub struct Enforcer {
    pub uuids: Vec<String>,
    pub context_overhead: [u64; MAX_DEVICES],
    pub ledger: Ledger,
    /// Device pointers → charge.
    pub pointers: PtrTable,
    /// VMM allocation handles → charge.
    pub handles: PtrTable,
    /// Arrays and mipmapped arrays → charge.
    pub arrays: PtrTable,
    /// Contexts made with `cuCtxCreate` → charge.
    pub contexts: PtrTable,
    /// The compute share.
    pub compute: Limiter,
    /// Per claim device: the spill policy, where the claim opted in to oversubscription on an
    /// overcommitted GPU (`None` elsewhere).
    pub spill: Vec<Option<Spill>>,
    /// Spilled (managed) pointers → charge; `None` when no device may spill.
    pub spilled: Option<PtrTable>,
    /// Memory-board entries of devices that may not spill: held (never read) so that the
    /// claims that may spill keep this claim's limit free on the card.
    _reservations: Vec<MemoryBoard>,
    /// The claim's UID, for messages.
    pub claim_uid: String,
}

static MODE: OnceLock<Mode> = OnceLock::new();

/// The thread running [`initialise`], 0 when none: lookups it makes (from inside `dlopen` of
/// the driver) must not be answered with hooks that would wait for the initialisation they are
/// part of.
static INITIALISING_THREAD: AtomicI64 = AtomicI64::new(0);

/// Load addresses of the real libcuda and libnvidia-ml, to recognise their own `dlsym` calls.
static DRIVER_BASES: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// The shim's mode, initialising on first use.
#[inline(always)]
pub fn mode() -> &'static Mode {
    MODE.get_or_init(initialise)
}

fn initialise() -> Mode {
    INITIALISING_THREAD.store(current_thread(), Ordering::Release);
    let mode = initialise_once();
    INITIALISING_THREAD.store(0, Ordering::Release);
    mode
}

/// Whether the calling thread is the one initialising the shim.
pub fn is_initialising_thread() -> bool {
    let initialising = INITIALISING_THREAD.load(Ordering::Acquire);
    initialising != 0 && initialising == current_thread()
}

fn current_thread() -> i64 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

fn initialise_once() -> Mode {
    let cuda = real::load(c"libcuda.so.1", real::cuda::ALL);
    let nvml = real::load(c"libnvidia-ml.so.1", real::nvml::ALL);
    remember_base(0, cuda, real::cuda::cuInit.address());
    remember_base(1, nvml, real::nvml::nvmlInit_v2.address());
    crate::compute::clock::detect(cuda);
    register_fork_handler();

    let Some(path) = config_path() else {
        return Mode::Passthrough;
    };
    match Enforcer::from_file(&path) {
        Ok(enforcer) => Mode::Enforcing(Box::new(enforcer)),
        Err(problem) => {
            report::line(format_args!("refusing the GPU: config {path}: {problem}"));
            Mode::Refused
        }
    }
}

/// The claim's config: the one the CDI spec mounts read-only, when it exists; `TESSERA_CONFIG`
/// names one only where none is mounted (standalone use, development, tests). A process cannot
/// raise its own wall by naming another config in its environment.
fn config_path() -> Option<String> {
    debug_assert_eq!(SHIM_CONFIG_ENV, "TESSERA_CONFIG");
    mounted_or_named(SHIM_CONFIG_DEFAULT_PATH, c"TESSERA_CONFIG")
}

/// Where the claim's board entries and its neighbours' are (`tessera_api::board`): the mounted
/// ones, else the development layout in `TESSERA_BOARD`; none means neighbours cannot be seen.
/// A process cannot hide from its neighbours' priorities by pointing the shim at another board.
fn board_paths(config: &ShimConfig) -> Option<BoardPaths> {
    BoardPaths::resolve(named(c"TESSERA_BOARD"), &config.claim_uid, config.priority)
}

/// Where the plugin's reservation files are (read-only in a container): the mounted directory,
/// else `TESSERA_RESERVATIONS`; none means no claim is owed card memory beyond the board's.
fn reservations_dir() -> Option<String> {
    mounted_or_named(
        tessera_api::memory_board::RESERVATIONS_DIR,
        c"TESSERA_RESERVATIONS",
    )
}

/// `mounted` when it exists (what the plugin's CDI spec put in the container), else the
/// non-empty value of the variable `name`.
fn mounted_or_named(mounted: &str, name: &CStr) -> Option<String> {
    if std::path::Path::new(mounted).exists() {
        return Some(mounted.to_string());
    }
    named(name)
}

/// The non-empty value of the variable `name`.
fn named(name: &CStr) -> Option<String> {
    // SAFETY: getenv with a NUL-terminated name; the value is copied at once.
    let value = unsafe { libc::getenv(name.as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: getenv returned a NUL-terminated string.
    let named = unsafe { CStr::from_ptr(value) }
        .to_string_lossy()
        .into_owned();
    (!named.is_empty()).then_some(named)
}

impl Enforcer {
    pub(crate) fn from_file(path: &str) -> Result<Enforcer, String> {
        let raw = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
        let config = ShimConfig::from_json(&raw).map_err(|e| e.to_string())?;
        let devices = RegionDeviceSpec::from_config(&config);
        let ledger = Ledger::open(&config.region, &devices).map_err(|e| e.to_string())?;
        let table = |capacity| {
            PtrTable::new(capacity).ok_or_else(|| "cannot reserve tracking tables".to_string())
        };
        let mut context_overhead = [0u64; MAX_DEVICES];
        for (slot, device) in context_overhead.iter_mut().zip(&config.devices) {
            *slot = device.context_overhead;
        }
        let board = board_paths(&config);
        let reservation_dir = reservations_dir();
        let key = crate::compute::claim_key(&config.claim_uid);
        let mut spill = Vec::with_capacity(config.devices.len());
        let mut reservations = Vec::new();
        for device in &config.devices {
            let Some(physical) = device.physical_memory else {
                spill.push(None);
                continue;
            };
            let entry = board.as_ref().and_then(|paths| {
                MemoryBoard::open(
                    paths,
                    reservation_dir.as_deref(),
                    &device.uuid,
                    key,
                    device.memory_limit.min(physical),
                    config.oversubscribe,
                )
            });
            if !config.oversubscribe {
                reservations.extend(entry);
                spill.push(None);
                continue;
            }
            if entry.is_none() {
                report::line(format_args!(
                    "claim {}: no memory board for GPU {}; spilling only when the driver reports the card full, the other claims' share is not protected",
                    config.claim_uid, device.uuid
                ));
            }
            spill.push(Some(Spill {
                physical,
                limit: device.spill_limit.unwrap_or(device.memory_limit),
                board: entry,
            }));
        }
        let spilled = if spill.iter().any(Option::is_some) {
            Some(table(POINTER_CAPACITY)?)
        } else {
            None
        };
        Ok(Enforcer {
            uuids: config.devices.iter().map(|d| d.uuid.clone()).collect(),
            context_overhead,
            ledger,
            pointers: table(POINTER_CAPACITY)?,
            handles: table(HANDLE_CAPACITY)?,
            arrays: table(HANDLE_CAPACITY)?,
            contexts: table(HANDLE_CAPACITY)?,
            compute: Limiter::new(&config, board.as_ref()),
            spill,
            spilled,
            _reservations: reservations,
            claim_uid: config.claim_uid.clone(),
        })
    }

    /// What the compute limiter needs of this claim.
    #[inline(always)]
    pub fn compute_claim(&self) -> crate::compute::Claim<'_> {
        crate::compute::Claim {
            limiter: &self.compute,
            ledger: &self.ledger,
            uuids: &self.uuids,
        }
    }

    /// The claim device for a CUDA ordinal.
    #[inline(always)]
    pub fn grant(&self, ordinal: i32) -> Grant {
        devices::grant(ordinal, &self.uuids)
    }

    /// The spill policy of claim device `device`, if it may spill.
    #[inline(always)]
    pub fn spill(&self, device: usize) -> Option<&Spill> {
        self.spill.get(device).and_then(Option::as_ref)
    }

    /// The claim's device-resident bytes on `device` (charged, less spilled).
    pub fn resident(&self, device: usize) -> u64 {
        self.ledger
            .used(device)
            .saturating_sub(self.ledger.spilled(device))
    }

    /// Publishes the claim's device-resident bytes on `device`, where it may spill.
    #[inline]
    pub fn publish_resident(&self, device: usize) {
        if let Some(board) = self.spill(device).and_then(|s| s.board.as_ref()) {
            board.publish_resident(self.resident(device));
        }
    }

    /// The claim device a UUID names, if any.
    pub fn device_by_uuid(&self, uuid: &str) -> Option<usize> {
        self.uuids.iter().position(|u| u.eq_ignore_ascii_case(uuid))
    }
}

fn remember_base(which: usize, handle: *mut c_void, symbol: *mut c_void) {
    if handle.is_null() || symbol.is_null() {
        return;
    }
    // SAFETY: dladdr on an address inside a loaded library, into a zeroed Dl_info.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    if unsafe { libc::dladdr(symbol, &mut info) } != 0 {
        DRIVER_BASES[which].store(info.dli_fbase as usize, Ordering::Release);
    }
}

/// Whether `address` lies in the real driver or NVML (their own `dlsym` calls are not ours).
pub fn is_driver_address(address: *const c_void) -> bool {
    let bases = [
        DRIVER_BASES[0].load(Ordering::Acquire),
        DRIVER_BASES[1].load(Ordering::Acquire),
    ];
    if address.is_null() || bases == [0, 0] {
        return false;
    }
    // SAFETY: dladdr only reads loader state.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    if unsafe { libc::dladdr(address, &mut info) } == 0 {
        return false;
    }
    let base = info.dli_fbase as usize;
    base != 0 && bases.contains(&base)
}

/// Per ordinal: whether this process has charged its primary context (a fork child has not).
pub(crate) static PRIMARY_CHARGED: [AtomicBool; 64] = [const { AtomicBool::new(false) }; 64];

fn register_fork_handler() {
    extern "C" fn in_child() {
        crate::ledger::forget_slot_after_fork();
        devices::reset();
        for flag in &PRIMARY_CHARGED {
            flag.store(false, Ordering::Relaxed);
        }
        crate::compute::forget_after_fork();
        if let Some(Mode::Enforcing(enforcer)) = MODE.get() {
            enforcer.pointers.clear();
            enforcer.handles.clear();
            enforcer.arrays.clear();
            enforcer.contexts.clear();
            if let Some(spilled) = &enforcer.spilled {
                spilled.clear();
            }
        }
    }
    // SAFETY: registering a handler that only does async-signal-safe work.
    unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
}
