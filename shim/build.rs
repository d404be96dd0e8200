//! Gives libtessera.so a soname, so tools and `dlopen(…, RTLD_NOLOAD)` can name it.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libtessera.so");
}
