//! Puts the shim where claims' CDI specs mount it from.

use std::io;
use std::path::Path;

use tessera_driver::{cdi, fsutil};

/// Copies the shim to `<state-dir>/lib/libtessera.so` (the host path every claim's CDI spec
/// mounts; the plugin's image is not visible to the runtime) and writes the `ld.so.preload`
/// that names it inside containers. The copy is replaced atomically and only when it changed:
/// running containers keep the inode they mounted.
pub fn install_shim(shim: &Path, state_dir: &Path) -> io::Result<()> {
    let context =
        |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let host = cdi::HostPaths::new(state_dir, "_");
    let bytes = std::fs::read(shim).map_err(context(format!(
        "reading the shim --shim-path {}",
        shim.display()
    )))?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("--shim-path {} is not a shared library", shim.display()),
        ));
    }
    if let Some(lib) = host.shim.parent() {
        std::fs::create_dir_all(lib).map_err(context(format!("creating {}", lib.display())))?;
    }
    if std::fs::read(&host.shim).ok().as_deref() != Some(bytes.as_slice()) {
        fsutil::write_durable(&host.shim, &bytes, 0o755)
            .map_err(context(format!("installing {}", host.shim.display())))?;
        tracing::info!(path = %host.shim.display(), "installed the shim");
    }
    fsutil::write_atomic(&host.preload, cdi::preload_file().as_bytes(), 0o644)
        .map_err(context(format!("writing {}", host.preload.display())))
}
