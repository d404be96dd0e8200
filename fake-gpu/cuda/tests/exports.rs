//! The library's face to the dynamic linker and to cuGetProcAddress: what it exports, how it is
//! linked, and what a caller gets before `cuInit`. Runs in the test process: nothing here
//! initialises the driver.

#[macro_use]
mod support;

use std::ffi::{CString, c_void};
use std::process::Command;

use support::*;
use tessera_gpu_abi::proc_table::{PROC_TABLE, ProcLookup, lookup};

#[test]
fn every_proc_table_symbol_is_exported() {
    let lib = Library::cuda();
    let missing: Vec<&str> = PROC_TABLE
        .iter()
        .map(|e| e.symbol)
        .filter(|s| lib.try_sym(s).is_none())
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");
}

#[test]
fn nm_sees_the_table_and_the_introspection_functions() {
    let path = built_library("libcuda.so");
    let output = match Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&path)
        .output()
    {
        Ok(output) if output.status.success() => output,
        // dlsym above is the binding check; nm is a second opinion where binutils exist.
        _ => return,
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let defined: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    for entry in PROC_TABLE {
        assert!(
            defined.contains(&entry.symbol),
            "nm -D does not list {}",
            entry.symbol
        );
    }
    for name in [
        "fakegpu_device_memory_used",
        "fakegpu_managed_memory_used",
        "fakegpu_launch_count",
        "fakegpu_process_memory_used",
    ] {
        assert!(defined.contains(&name), "nm -D does not list {name}");
    }
    // Nothing else leaks out: driver entry points and introspection only.
    let stray: Vec<&&str> = defined
        .iter()
        .filter(|s| !s.starts_with("cu") && !s.starts_with("fakegpu_"))
        .collect();
    assert!(stray.is_empty(), "unexpected exports: {stray:?}");
}

#[test]
fn linked_like_the_real_driver() {
    let path = built_library("libcuda.so");
    let Ok(output) = Command::new("readelf").arg("-d").arg(&path).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("Library soname: [libcuda.so.1]"), "{text}");
    assert!(
        text.contains("SYMBOLIC"),
        "built without -Bsymbolic:\n{text}"
    );
}

/// Replays libcudart 12.9's initialisation requests: each one must answer exactly what the
/// proc table implies, with the same function `dlsym` gives for the symbol it names.
#[test]
fn cudart_requests_resolve_as_the_proc_table_says() {
    let cuda = Cuda::load();
    let requests = include_str!("data/libcudart-12.9-driver-requests.txt");
    let mut found = 0;
    for (number, line) in requests.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, version, flags, _outcome] = fields[..] else {
            panic!("line {}: {line:?}", number + 1)
        };
        let name = if name == "\"\"" { "" } else { name };
        let (version, flags): (i32, u64) = (version.parse().unwrap(), flags.parse().unwrap());
        let c_name = CString::new(name).unwrap();
        let mut pfn: *mut c_void = std::ptr::dangling_mut();
        let mut status = -1;
        let rc = rc!((cuda.cuGetProcAddress_v2)(
            c_name.as_ptr(),
            &mut pfn,
            version,
            flags,
            &mut status
        ));
        let at = format!("line {}: {name} {version} {flags}", number + 1);
        let expected = lookup(name.as_bytes(), version, flags);
        assert_eq!(status, expected.status(), "{at}");
        match expected {
            ProcLookup::Found(entry) => {
                assert_eq!(rc, CUDA_SUCCESS, "{at}");
                assert_eq!(
                    pfn,
                    cuda.lib.sym(entry.symbol),
                    "{at}: not {}",
                    entry.symbol
                );
                found += 1;
            }
            ProcLookup::NotFound | ProcLookup::VersionNotSufficient => {
                assert_eq!(rc, CUDA_ERROR_NOT_FOUND, "{at}");
                assert!(pfn.is_null(), "{at}: pfn must be cleared");
            }
        }
        // v1 answers the same, without the status.
        let mut pfn_v1: *mut c_void = std::ptr::dangling_mut();
        let rc_v1 = rc!((cuda.cuGetProcAddress)(
            c_name.as_ptr(),
            &mut pfn_v1,
            version,
            flags
        ));
        assert_eq!((rc_v1, pfn_v1), (rc, pfn), "{at}: v1 differs");
    }
    assert_eq!(requests.lines().count(), 419);
    assert!(found >= 90, "only {found} requests resolved");
}

#[test]
fn get_proc_address_hands_out_itself() {
    // cudart switches to the cuGetProcAddress it is handed; it must be this library's own.
    let cuda = Cuda::load();
    for (version, symbol) in [(11030, "cuGetProcAddress"), (12000, "cuGetProcAddress_v2")] {
        let mut pfn = std::ptr::null_mut();
        let mut status = -1;
        assert_eq!(
            rc!((cuda.cuGetProcAddress_v2)(
                c"cuGetProcAddress".as_ptr(),
                &mut pfn,
                version,
                0,
                &mut status
            )),
            CUDA_SUCCESS
        );
        assert_eq!(pfn, cuda.lib.sym(symbol));
    }
}

#[test]
fn per_thread_stream_variants_are_picked_by_flag() {
    let cuda = Cuda::load();
    for (name, flags, symbol) in [
        ("cuLaunchKernel", 0, "cuLaunchKernel"),
        ("cuLaunchKernel", 2, "cuLaunchKernel_ptsz"),
        ("cuMemcpyHtoD", 2, "cuMemcpyHtoD_v2_ptds"),
        ("cuMemAllocAsync", 2, "cuMemAllocAsync_ptsz"),
        ("cuMemAlloc", 2, "cuMemAlloc_v2"),
        ("cuStreamSynchronize", 1, "cuStreamSynchronize"),
    ] {
        let c_name = CString::new(name).unwrap();
        let mut pfn = std::ptr::null_mut();
        assert_eq!(
            rc!((cuda.cuGetProcAddress)(
                c_name.as_ptr(),
                &mut pfn,
                12090,
                flags
            )),
            CUDA_SUCCESS,
            "{name}"
        );
        assert_eq!(pfn, cuda.lib.sym(symbol), "{name} with flags {flags}");
    }
}

/// Functions that work before `cuInit`, as with the real driver.
const BEFORE_INIT: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorString",
    "cuGetErrorName",
    "cuGetExportTable",
    "cuGetProcAddress",
    "cuGetProcAddress_v2",
];

#[test]
fn everything_else_needs_cu_init_first() {
    let cuda = Cuda::load();
    // Every exported function takes only integer and pointer arguments, so each can be called
    // through one signature with eleven zero arguments (the System V ABI ignores the extras).
    type AnyCall =
        unsafe extern "C" fn(u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64) -> CUresult;
    for entry in PROC_TABLE
        .iter()
        .filter(|e| !BEFORE_INIT.contains(&e.symbol))
    {
        // SAFETY: see above; every argument is zero, i.e. NULL pointers and zero values.
        let call: AnyCall =
            unsafe { std::mem::transmute::<*mut c_void, AnyCall>(cuda.lib.sym(entry.symbol)) };
        let rc = unsafe { call(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0) };
        assert_eq!(
            rc, CUDA_ERROR_NOT_INITIALIZED,
            "{} before cuInit",
            entry.symbol
        );
    }
}

#[test]
fn error_strings_and_names() {
    let cuda = Cuda::load();
    let text = |f: unsafe extern "C" fn(CUresult, *mut *const std::ffi::c_char) -> CUresult, rc| {
        let mut s = std::ptr::null();
        let result = unsafe { f(rc, &mut s) };
        (
            result,
            (!s.is_null()).then(|| {
                unsafe { std::ffi::CStr::from_ptr(s) }
                    .to_string_lossy()
                    .into_owned()
            }),
        )
    };
    assert_eq!(
        text(cuda.cuGetErrorName, 2),
        (CUDA_SUCCESS, Some("CUDA_ERROR_OUT_OF_MEMORY".into()))
    );
    assert_eq!(
        text(cuda.cuGetErrorString, 2),
        (CUDA_SUCCESS, Some("out of memory".into()))
    );
    assert_eq!(
        text(cuda.cuGetErrorName, 0),
        (CUDA_SUCCESS, Some("CUDA_SUCCESS".into()))
    );
    assert_eq!(
        text(cuda.cuGetErrorName, 720),
        (
            CUDA_SUCCESS,
            Some("CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE".into())
        )
    );
    assert_eq!(
        text(cuda.cuGetErrorString, 12345),
        (CUDA_ERROR_INVALID_VALUE, None)
    );
    assert_eq!(
        rc!((cuda.cuGetErrorName)(1, std::ptr::null_mut())),
        CUDA_ERROR_INVALID_VALUE
    );
}

#[test]
fn export_tables_are_not_supported() {
    let cuda = Cuda::load();
    let mut table: *const c_void = std::ptr::dangling();
    let id = CUuuid::default();
    assert_eq!(
        rc!((cuda.cuGetExportTable)(&mut table, &id)),
        CUDA_ERROR_NOT_SUPPORTED
    );
    assert!(table.is_null());
}

#[test]
fn get_proc_address_rejects_bad_arguments() {
    let cuda = Cuda::load();
    let mut pfn = std::ptr::null_mut();
    let mut status = -1;
    assert_eq!(
        rc!((cuda.cuGetProcAddress_v2)(
            std::ptr::null(),
            &mut pfn,
            12000,
            0,
            &mut status
        )),
        CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(
        rc!((cuda.cuGetProcAddress_v2)(
            c"cuInit".as_ptr(),
            std::ptr::null_mut(),
            12000,
            0,
            &mut status
        )),
        CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(
        rc!((cuda.cuGetProcAddress_v2)(
            c"cuInit".as_ptr(),
            &mut pfn,
            12000,
            4,
            &mut status
        )),
        CUDA_ERROR_INVALID_VALUE
    );
    // A NULL status is allowed.
    assert_eq!(
        rc!((cuda.cuGetProcAddress_v2)(
            c"cuInit".as_ptr(),
            &mut pfn,
            12000,
            0,
            std::ptr::null_mut()
        )),
        CUDA_SUCCESS
    );
}
