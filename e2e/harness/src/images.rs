//! Tessera's own container images for a real node, as `scripts/make-images.sh` writes them
//! (docker-archive tarballs, no registry or container engine involved).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::binaries::cache_root;
use crate::cluster::workspace::bin_dir;
use crate::error::{Error, Result};

/// Where the chart finds them: its `image.registry` value for these images.
pub const REGISTRY: &str = "localhost/tessera";

/// One image: the tarball `ctr images import` takes, and the reference it is tagged with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub tarball: PathBuf,
    pub reference: String,
}

impl Image {
    /// The image's name without registry and tag: `tessera-kubelet-plugin`.
    pub fn name(&self) -> &str {
        let without_tag = self
            .reference
            .rsplit_once(':')
            .map_or(self.reference.as_str(), |(n, _)| n);
        without_tag.rsplit('/').next().unwrap_or(without_tag)
    }

    /// The tag: `0.1.0`.
    pub fn tag(&self) -> &str {
        self.reference.rsplit_once(':').map_or("", |(_, t)| t)
    }
}

/// The images of the debug build the tests run (`tessera-kubelet-plugin`,
/// `tessera-controller`, `tessera-gpu-worker`), made once per process into
/// `<cache>/images/debug` from the binaries beside this program, by one process at a time.
pub fn debug_images() -> Result<Vec<Image>> {
    static MADE: Mutex<Option<Vec<Image>>> = Mutex::new(None);
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(images) = made.as_ref() {
        return Ok(images.clone());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-images.sh");
    let out = cache_root().join("images/debug");
    let target = bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    // Test binaries and `tessera-cluster` make them at once into the same directory: one at a
    // time, across processes.
    std::fs::create_dir_all(&out).map_err(Error::io(&out, "creating"))?;
    let lock_path = out.join(".lock");
    let lock_file = std::fs::File::create(&lock_path).map_err(Error::io(&lock_path, "creating"))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io(&lock_path, "locking")(e.into()))?;
    let output = Command::new(&script)
        .args(["--profile", "debug", "--registry", REGISTRY, "--out"])
        .arg(&out)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .map_err(Error::io(&script, "starting"))?;
    if !output.status.success() {
        return Err(Error::State {
            dir: out,
            reason: format!(
                "scripts/make-images.sh --profile debug failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    let images = parse_listing(&String::from_utf8_lossy(&output.stdout));
    if images.is_empty() {
        return Err(Error::State {
            dir: out,
            reason: format!(
                "scripts/make-images.sh listed no image; its output:\n{}",
                String::from_utf8_lossy(&output.stdout)
            ),
        });
    }
    *made = Some(images.clone());
    Ok(images)
}

/// The script's `<tarball> <reference>` lines; anything else it prints is progress.
fn parse_listing(stdout: &str) -> Vec<Image> {
    stdout
        .lines()
        .filter_map(|l| {
            let (tarball, reference) = l.trim().split_once(' ')?;
            (tarball.ends_with(".tar") && !reference.contains(' ')).then(|| Image {
                tarball: PathBuf::from(tarball),
                reference: reference.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_listing_and_skips_progress() {
        let images = parse_listing(
            "==> building\n/c/images/tessera-controller.tar localhost/tessera/tessera-controller:0.1.0\nnot a listing line\n",
        );
        assert_eq!(
            images,
            vec![Image {
                tarball: "/c/images/tessera-controller.tar".into(),
                reference: "localhost/tessera/tessera-controller:0.1.0".into(),
            }]
        );
        assert_eq!(images[0].name(), "tessera-controller");
        assert_eq!(images[0].tag(), "0.1.0");
    }
}
