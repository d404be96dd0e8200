//! Puts the shim where claims' CDI specs mount it from.

use std::io;
use std::path::Path;

/// Copies the shim to `<state-dir>/lib/libtessera.so` (the host path every claim's CDI spec
/// mounts; the plugin's image is not visible to the runtime) and writes the `ld.so.preload`
/// that names it inside containers: `tessera_driver::claim_files::install_shim`, logged.
pub fn install_shim(shim: &Path, state_dir: &Path) -> io::Result<()> {
    if tessera_driver::claim_files::install_shim(shim, state_dir, "--shim-path")? {
        tracing::info!(path = %state_dir.join("lib/libtessera.so").display(), "installed the shim");
    }
    Ok(())
}
