//! Link the library the way NVIDIA links the real NVML.
fn main() {
    // nvml-wrapper, nvidia-smi and the shim open it as `libnvidia-ml.so.1`.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnvidia-ml.so.1");
    // Its own calls bind inside the library, never to a preloaded interposer.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
    // nvml-wrapper never unloads it; make that true for every caller.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    println!("cargo:rerun-if-changed=build.rs");
}
