//! Puts the shim where claims' CDI specs mount it from, and the driver-wall hook where their
//! specs run it from.

use std::io;
use std::path::{Path, PathBuf};

/// Copies the shim to `<state-dir>/lib/libtessera.so` (the host path every claim's CDI spec
/// mounts; the plugin's image is not visible to the runtime) and writes the `ld.so.preload`
/// that names it inside containers: `tessera_driver::claim_files::install_shim`, logged.
pub fn install_shim(shim: &Path, state_dir: &Path) -> io::Result<()> {
    if tessera_driver::claim_files::install_shim(shim, state_dir, "--shim-path")? {
        tracing::info!(path = %state_dir.join("lib/libtessera.so").display(), "installed the shim");
    }
    Ok(())
}

/// Copies `tessera-cdi-hook` to `<state-dir>/bin/tessera-cdi-hook`, the host path claims' CDI
/// specs run (as root, in the runtime's namespaces): the directory and the file are the
/// plugin's alone (0755), and no container mounts them.
pub fn install_hook(hook: &Path, state_dir: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let context =
        |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let bytes = std::fs::read(hook).map_err(context(format!(
        "reading the hook --cdi-hook-path {}",
        hook.display()
    )))?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("--cdi-hook-path {} is not a program", hook.display()),
        ));
    }
    let dir = state_dir.join("bin");
    std::fs::create_dir_all(&dir).map_err(context(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(context(
        format!("making {} the plugin's alone", dir.display()),
    ))?;
    let target = dir.join("tessera-cdi-hook");
    if std::fs::read(&target).ok().as_deref() != Some(bytes.as_slice()) {
        tessera_driver::fsutil::write_durable(&target, &bytes, 0o755)
            .map_err(context(format!("installing {}", target.display())))?;
        tracing::info!(path = %target.display(), "installed the driver-wall hook");
    }
    Ok(target)
}
