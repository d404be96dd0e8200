//! Modules and functions. There is no device code to load: any image is accepted and any kernel
//! name yields a function (the same handle for the same name in the same module), so programs
//! and the shim can be exercised without compiled kernels.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_void};
use std::sync::Mutex;

use tessera_gpu_abi::cuda::*;

use crate::context::current;
use crate::guard::{check, guard, put};
use crate::handles::{Kind, Registry, Slab, from_ptr, lock, to_ptr};
use crate::process::process;

pub struct Module {
    ctx: u64,
    /// Kernel name → function handle.
    functions: Mutex<HashMap<Vec<u8>, u64>>,
}

/// A kernel of a loaded module. Launches need only know that it exists (a virtual clock would
/// keep its simulated duration here).
pub struct Function;

pub struct Modules {
    modules: Registry<Module>,
    /// Lock-free lookups: every launch validates its function here.
    pub functions: Slab<Function>,
}

impl Modules {
    pub fn new() -> Self {
        Self {
            modules: Registry::new(Kind::Module),
            functions: Slab::new(Kind::Function),
        }
    }

    /// Unloads a context's modules with it.
    pub fn unload_context(&self, ctx: u64) {
        for module in self.modules.remove_where(|m| m.ctx == ctx) {
            self.kill_functions(&module);
        }
    }

    fn kill_functions(&self, module: &Module) {
        for handle in lock(&module.functions).values() {
            self.functions.kill(*handle);
        }
    }

    /// Whether `function` names a loaded function (for graph nodes).
    pub fn is_function(&self, function: CUfunction) -> bool {
        self.functions.get(from_ptr(function)).is_some()
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!module.is_null() && !image.is_null())?;
        let ctx = current(process)?;
        let (handle, _) = process.modules.modules.insert_with(|_| Module {
            ctx: ctx.handle,
            functions: Mutex::new(HashMap::new()),
        });
        unsafe { put(module, to_ptr(handle)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut CUfunction,
    module: CUmodule,
    name: *const c_char,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!function.is_null() && !name.is_null())?;
        let module = process
            .modules
            .modules
            .get(from_ptr(module))
            .ok_or(CUDA_ERROR_INVALID_HANDLE)?;
        // SAFETY: a NUL-terminated kernel name, per the API.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
        let mut functions = lock(&module.functions);
        let handle = match functions.get(&name) {
            Some(handle) => *handle,
            None => {
                let handle = process
                    .modules
                    .functions
                    .insert(Function)
                    .ok_or(CUDA_ERROR_OUT_OF_MEMORY)?;
                functions.insert(name, handle);
                handle
            }
        };
        unsafe { put(function, to_ptr(handle)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleUnload(module: CUmodule) -> CUresult {
    guard(|| {
        let process = process()?;
        let module = process
            .modules
            .modules
            .remove(from_ptr(module))
            .ok_or(CUDA_ERROR_INVALID_HANDLE)?;
        process.modules.kill_functions(&module);
        Ok(())
    })
}
