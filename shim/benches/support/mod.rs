//! What the shim's benches share: the fake driver under its real sonames, the shim, a bench
//! program compiled from `benches/programs/`, a simulated GPU whose kernels last 1 ns, and claim
//! configs on it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use tessera_built_libs::target_dir;

/// The simulated GPU's UUID.
pub const UUID: &str = "GPU-11111111-2222-3333-4444-555555555555";

pub struct Bench {
    pub work: tempfile::TempDir,
    pub lib_dir: PathBuf,
    pub shim: PathBuf,
    pub program: PathBuf,
    /// `FAKEGPU_CONFIG`: one RTX 4090 whose kernels last 1 ns of virtual time (`waveNs: 1`),
    /// so that a loop that never synchronises keeps a half-GPU claim under its share.
    pub fake: PathBuf,
}

impl Bench {
    /// Sets up the fake driver and the shim of this profile, and compiles `program` (a file of
    /// `benches/programs/`) with `cc_args`.
    pub fn new(program: &str, cc_args: &[&str]) -> Bench {
        let target = target_dir();
        let work = tempfile::tempdir().expect("tempdir");
        let lib_dir = work.path().join("lib");
        std::fs::create_dir_all(&lib_dir).expect("lib dir");
        for (link, file) in [
            ("libcuda.so.1", "libcuda.so"),
            ("libnvidia-ml.so.1", "libnvidia_ml.so"),
        ] {
            let source = target.join(file);
            assert!(
                source.exists(),
                "{} missing: build the workspace in this profile first",
                source.display()
            );
            std::os::unix::fs::symlink(&source, lib_dir.join(link)).expect("symlink");
        }
        let shim = target.join("libtessera.so");
        assert!(shim.exists(), "{} missing", shim.display());
        let binary = work.path().join(program.trim_end_matches(".c"));
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches/programs")
            .join(program);
        let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(cc_args)
            .arg("-o")
            .arg(&binary)
            .arg(&source)
            .arg("-ldl")
            .status()
            .expect("cc");
        assert!(status.success(), "compiling {} failed", source.display());
        let fake = work.path().join("fakegpu.json");
        std::fs::write(
            &fake,
            format!(
                r#"{{"devices":[{{"uuid":"{UUID}","name":"NVIDIA GeForce RTX 4090","memory":25769803776,"waveNs":1}}]}}"#
            ),
        )
        .expect("fake config");
        Bench {
            work,
            lib_dir,
            shim,
            program: binary,
            fake,
        }
    }

    /// A claim config of the whole 8 GiB at `cores` (`force`), its region beside it.
    pub fn claim(&self, cores: u32) -> PathBuf {
        let claim = self.work.path().join(format!("claim-{cores}.json"));
        let region = self.work.path().join(format!("claim-{cores}.region"));
        std::fs::write(
            &claim,
            format!(
                r#"{{"version":1,"claimUid":"bench-{cores}","region":"{}","devices":[{{"uuid":"{UUID}","memoryLimit":8589934592,"cores":{cores}}}],"corePolicy":"force"}}"#,
                region.display()
            ),
        )
        .expect("claim config");
        claim
    }

    /// Sets the environment every run needs: the fake driver, its config and state.
    pub fn env(&self, command: &mut Command) {
        command
            .env("LD_LIBRARY_PATH", &self.lib_dir)
            .env("FAKEGPU_CONFIG", &self.fake)
            .env("FAKEGPU_STATE", self.work.path().join("fakegpu.state"));
    }
}
