//! `tessera-gpu-worker`: what a GPU job does to its slice, without a real job.
//!
//! It reaches the driver the way frameworks do (dlopen `libcuda.so.1`, then `dlsym`), so the
//! shim sees it exactly as it sees PyTorch. It prints what the process sees of its GPU, then
//! allocates device memory in steps up to a target and holds it:
//!
//! ```text
//! tessera-gpu-worker --allocate 3Gi [--step 512Mi] [--hold 10s]
//!                    [--wait-for FILE] [--touch FILE] [--hold-until FILE]
//! ```
//!
//! `--wait-for` waits for a file before allocating and `--touch` creates one after (allocation
//! done or refused), and `--hold-until` keeps the memory until a file appears: containers and
//! pods order their steps through a shared directory this way, instead of through sleeps a
//! loaded machine would reorder.
//!
//! `--bypass-shim` loads the driver into a link-map namespace of its own (`dlmopen`) and looks
//! its functions up with that namespace's `dlsym`, as a program that wants to escape a preloaded
//! library can: the shim is not loaded there, so only a limit the driver keeps holds it.
//!
//! Exit codes: 0 allocated and held; 1 the driver refused memory (CUDA_ERROR_OUT_OF_MEMORY, as
//! a framework's OOM would end the job); 2 bad arguments; 3 the GPU could not be used; 4 timed
//! out waiting for `--wait-for`.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

type CuResult = c_int;
const CUDA_SUCCESS: CuResult = 0;
const CUDA_ERROR_OUT_OF_MEMORY: CuResult = 2;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const WAIT_LIMIT: Duration = Duration::from_secs(300);

struct Args {
    allocate: u64,
    step: u64,
    hold: Duration,
    wait_for: Option<PathBuf>,
    touch: Option<PathBuf>,
    hold_until: Option<PathBuf>,
    bypass_shim: bool,
}

const USAGE: &str = "usage: tessera-gpu-worker --allocate <bytes, e.g. 3Gi> [--step 512Mi] [--hold 10s] [--wait-for FILE] [--touch FILE] [--hold-until FILE] [--bypass-shim]";

fn parse_bytes(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a quantity like 512Mi"))?;
    let factor = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => MIB,
        "Gi" => GIB,
        other => return Err(format!("unit {other:?} in {text:?}: use Ki, Mi or Gi")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let seconds = text.strip_suffix('s').unwrap_or(text);
    seconds
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{text:?} is not a duration like 10s"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        allocate: 0,
        step: 512 * MIB,
        hold: Duration::ZERO,
        wait_for: None,
        touch: None,
        hold_until: None,
        bypass_shim: false,
    };
    let mut allocate = None;
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--allocate" => allocate = Some(parse_bytes(&value()?)?),
            "--step" => args.step = parse_bytes(&value()?)?,
            "--hold" => args.hold = parse_duration(&value()?)?,
            "--wait-for" => args.wait_for = Some(PathBuf::from(value()?)),
            "--touch" => args.touch = Some(PathBuf::from(value()?)),
            "--hold-until" => args.hold_until = Some(PathBuf::from(value()?)),
            "--bypass-shim" => args.bypass_shim = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    args.allocate = allocate.ok_or("--allocate is required")?;
    if args.step == 0 {
        return Err("--step must be more than 0".into());
    }
    Ok(args)
}

type InitFn = unsafe extern "C" fn(c_uint) -> CuResult;
type DeviceGetFn = unsafe extern "C" fn(*mut c_int, c_int) -> CuResult;
type DeviceGetNameFn = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult;
type DeviceGetUuidFn = unsafe extern "C" fn(*mut [u8; 16], c_int) -> CuResult;
type PrimaryCtxRetainFn = unsafe extern "C" fn(*mut *mut c_void, c_int) -> CuResult;
type CtxSetCurrentFn = unsafe extern "C" fn(*mut c_void) -> CuResult;
type MemGetInfoFn = unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult;
type MemAllocFn = unsafe extern "C" fn(*mut u64, usize) -> CuResult;
type GetErrorNameFn = unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult;

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

/// The driver loaded into a new link-map namespace, where no preloaded library is, and that
/// namespace's own `dlsym` (found with `dlvsym`, which a preloaded shim does not interpose).
fn bypassing_namespace(driver: &CStr) -> Result<(*mut c_void, DlsymFn), String> {
    // SAFETY: dlmopen/dlinfo/dlvsym with NUL-terminated names and valid out-pointers.
    unsafe {
        let libc_handle = libc::dlmopen(libc::LM_ID_NEWLM, c"libc.so.6".as_ptr(), libc::RTLD_NOW);
        if libc_handle.is_null() {
            return Err(format!("dlmopen(LM_ID_NEWLM, libc.so.6): {}", dlerror()));
        }
        let mut namespace: libc::Lmid_t = 0;
        if libc::dlinfo(
            libc_handle,
            libc::RTLD_DI_LMID,
            (&mut namespace as *mut libc::Lmid_t).cast(),
        ) != 0
        {
            return Err(format!("dlinfo(RTLD_DI_LMID): {}", dlerror()));
        }
        let dlsym = [c"GLIBC_2.34", c"GLIBC_2.2.5"]
            .iter()
            .map(|version| libc::dlvsym(libc_handle, c"dlsym".as_ptr(), version.as_ptr()))
            .find(|f| !f.is_null())
            .ok_or_else(|| format!("no dlsym in the new namespace's libc: {}", dlerror()))?;
        let handle = libc::dlmopen(namespace, driver.as_ptr(), libc::RTLD_NOW);
        Ok((handle, std::mem::transmute::<*mut c_void, DlsymFn>(dlsym)))
    }
}

/// The few driver entry points the worker uses, looked up with dlsym like a framework does.
struct Driver {
    init: InitFn,
    device_get: DeviceGetFn,
    device_get_name: DeviceGetNameFn,
    device_get_uuid: DeviceGetUuidFn,
    primary_ctx_retain: PrimaryCtxRetainFn,
    ctx_set_current: CtxSetCurrentFn,
    mem_get_info: MemGetInfoFn,
    mem_alloc: MemAllocFn,
    get_error_name: GetErrorNameFn,
}

fn dlerror() -> String {
    // SAFETY: dlerror returns a thread-local string or null.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null dlerror strings are NUL-terminated.
        unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Driver {
    fn load(bypass_shim: bool) -> Result<Driver, String> {
        let name = c"libcuda.so.1";
        let (handle, lookup) = if bypass_shim {
            bypassing_namespace(name)?
        } else {
            // SAFETY: a plain dlopen of the driver library by soname.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW) };
            (handle, libc::dlsym as DlsymFn)
        };
        if handle.is_null() {
            return Err(format!("cannot load libcuda.so.1: {}", dlerror()));
        }
        let symbol = |name: &str| -> Result<*mut c_void, String> {
            let c_name = CString::new(name).map_err(|e| e.to_string())?;
            // SAFETY: handle is a live dlopen handle, the name is NUL-terminated.
            let address = unsafe { lookup(handle, c_name.as_ptr()) };
            if address.is_null() {
                Err(format!("libcuda.so.1 has no {name}: {}", dlerror()))
            } else {
                Ok(address)
            }
        };
        // SAFETY: each symbol is the CUDA driver API function of that name, with the signature
        // the CUDA headers give it.
        unsafe {
            Ok(Driver {
                init: std::mem::transmute::<*mut c_void, InitFn>(symbol("cuInit")?),
                device_get: std::mem::transmute::<*mut c_void, DeviceGetFn>(symbol("cuDeviceGet")?),
                device_get_name: std::mem::transmute::<*mut c_void, DeviceGetNameFn>(symbol(
                    "cuDeviceGetName",
                )?),
                device_get_uuid: std::mem::transmute::<*mut c_void, DeviceGetUuidFn>(symbol(
                    "cuDeviceGetUuid",
                )?),
                primary_ctx_retain: std::mem::transmute::<*mut c_void, PrimaryCtxRetainFn>(symbol(
                    "cuDevicePrimaryCtxRetain",
                )?),
                ctx_set_current: std::mem::transmute::<*mut c_void, CtxSetCurrentFn>(symbol(
                    "cuCtxSetCurrent",
                )?),
                mem_get_info: std::mem::transmute::<*mut c_void, MemGetInfoFn>(symbol(
                    "cuMemGetInfo_v2",
                )?),
                mem_alloc: std::mem::transmute::<*mut c_void, MemAllocFn>(symbol("cuMemAlloc_v2")?),
                get_error_name: std::mem::transmute::<*mut c_void, GetErrorNameFn>(symbol(
                    "cuGetErrorName",
                )?),
            })
        }
    }

    fn error_name(&self, code: CuResult) -> String {
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorName writes a pointer to a static string.
        if unsafe { (self.get_error_name)(code, &mut name) } == CUDA_SUCCESS && !name.is_null() {
            // SAFETY: the driver's error names are static NUL-terminated strings.
            return unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned();
        }
        format!("CUresult {code}")
    }

    fn check(&self, what: &str, code: CuResult) -> Result<(), String> {
        if code == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(format!("{what} failed: {} ({code})", self.error_name(code)))
        }
    }
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML and nvidia-smi print it.
fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB as f64)
}

fn touch(path: &Option<PathBuf>) {
    if let Some(path) = path
        && let Err(e) = std::fs::write(path, b"done\n")
    {
        eprintln!("cannot create {}: {e}", path.display());
    }
}

/// Waits for `path` to exist; false after [`WAIT_LIMIT`].
fn wait_for(path: &std::path::Path) -> bool {
    let started = Instant::now();
    while !path.exists() {
        if started.elapsed() > WAIT_LIMIT {
            eprintln!(
                "gave up waiting for {} after {:?}",
                path.display(),
                WAIT_LIMIT
            );
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn run(args: &Args) -> Result<ExitCode, String> {
    let driver = Driver::load(args.bypass_shim)?;
    // SAFETY: plain driver calls with valid out-pointers; see Driver::load.
    unsafe {
        driver.check("cuInit", (driver.init)(0))?;
        let mut device = 0;
        driver.check("cuDeviceGet(0)", (driver.device_get)(&mut device, 0))?;
        let mut name = [0 as c_char; 128];
        driver.check(
            "cuDeviceGetName",
            (driver.device_get_name)(name.as_mut_ptr(), 128, device),
        )?;
        let mut uuid = [0u8; 16];
        driver.check(
            "cuDeviceGetUuid",
            (driver.device_get_uuid)(&mut uuid, device),
        )?;
        let mut context = std::ptr::null_mut();
        driver.check(
            "cuDevicePrimaryCtxRetain",
            (driver.primary_ctx_retain)(&mut context, device),
        )?;
        driver.check("cuCtxSetCurrent", (driver.ctx_set_current)(context))?;
        let (mut free, mut total) = (0usize, 0usize);
        driver.check("cuMemGetInfo", (driver.mem_get_info)(&mut free, &mut total))?;
        println!(
            "GPU 0: {} ({}); cuMemGetInfo: {} free of {}",
            CStr::from_ptr(name.as_ptr()).to_string_lossy(),
            format_uuid(&uuid),
            gib(free as u64),
            gib(total as u64)
        );
    }
    if let Some(path) = &args.wait_for
        && !wait_for(path)
    {
        return Ok(ExitCode::from(4));
    }
    let mut allocated = 0u64;
    while allocated < args.allocate {
        let size = args.step.min(args.allocate - allocated);
        let mut pointer = 0u64;
        // SAFETY: a valid out-pointer; the size is what the user asked for.
        let code = unsafe { (driver.mem_alloc)(&mut pointer, size as usize) };
        if code == CUDA_ERROR_OUT_OF_MEMORY {
            println!(
                "cuMemAlloc({} MiB) -> CUDA_ERROR_OUT_OF_MEMORY with {} allocated: out of GPU memory",
                size / MIB,
                gib(allocated)
            );
            touch(&args.touch);
            return Ok(ExitCode::from(1));
        }
        driver.check(&format!("cuMemAlloc({} MiB)", size / MIB), code)?;
        allocated += size;
        println!("allocated {}", gib(allocated));
    }
    touch(&args.touch);
    if !args.hold.is_zero() {
        println!("holding {} for {:?}", gib(allocated), args.hold);
        std::thread::sleep(args.hold);
    }
    if let Some(path) = &args.hold_until {
        println!("holding {} until {} exists", gib(allocated), path.display());
        if !wait_for(path) {
            return Ok(ExitCode::from(4));
        }
    }
    println!("done");
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("tessera-gpu-worker: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tessera-gpu-worker: {e}");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_and_durations_parse() {
        assert_eq!(parse_bytes("512Mi"), Ok(512 * MIB));
        assert_eq!(parse_bytes("3Gi"), Ok(3 * GIB));
        assert_eq!(parse_bytes("17"), Ok(17));
        assert!(parse_bytes("3GB").is_err());
        assert!(parse_bytes("Gi").is_err());
        assert!(parse_bytes("99999999999Gi").is_err());
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1s").is_err());
    }
}
