//! Link the library the way NVIDIA links the real driver.
fn main() {
    // Programs and the shim open it as `libcuda.so.1`.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
    // The driver's calls to its own functions (cuGetProcAddress handing out pointers, one entry
    // point calling another) bind inside the library, never to a preloaded interposer.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
    // Never unmapped by dlclose: threads' context stacks have destructors in this library.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    println!("cargo:rerun-if-changed=build.rs");
}
