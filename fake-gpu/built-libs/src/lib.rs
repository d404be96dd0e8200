//! Finds the workspace's cdylibs (`libcuda.so`, `libnvidia_ml.so`, `libtessera.so`) for tests.
//!
//! `cargo test` builds no cdylib of another package and does not rebuild one it would need, so
//! a test could silently load yesterday's library. [`built`] fails instead, saying what to run,
//! when the library is missing or older than any of its sources.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// `<target>/<profile>`: test executables live in its `deps/`, the cdylibs in it.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target profile directory").to_path_buf()
}

/// The workspace root, where `sources` paths are relative to.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `file` in [`target_dir`], failing the test if it is missing or older than anything under
/// `sources` (files or directories, relative to the workspace root).
pub fn built(file: &str, sources: &[&str]) -> PathBuf {
    let path = target_dir().join(file);
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!("{} is missing: build the workspace first (`cargo build --workspace`, which `make test` does)", path.display())
    });
    let root = workspace_root();
    let newer = sources.iter().filter_map(|s| newest_file(&root.join(s))).find(|(t, _)| *t > built);
    if let Some((_, source)) = newer {
        panic!(
            "{} is older than {}: rebuild it first (`cargo build --workspace`, which `make test` does)",
            path.display(),
            source.display()
        );
    }
    path
}

/// The most recently modified file under `path` (itself, if it is a file).
fn newest_file(path: &Path) -> Option<(SystemTime, PathBuf)> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some((meta.modified().ok()?, path.to_owned()));
    }
    std::fs::read_dir(path).ok()?.filter_map(|e| newest_file(&e.ok()?.path())).max_by_key(|(t, _)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_file_descends_into_directories() {
        let dir = std::env::temp_dir().join(format!("built-libs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).expect("dirs");
        std::fs::write(dir.join("a/old"), b"x").expect("write");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("a/b/new"), b"x").expect("write");
        let (_, newest) = newest_file(&dir).expect("a file");
        assert_eq!(newest, dir.join("a/b/new"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
