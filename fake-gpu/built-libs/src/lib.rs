//! Test support shared by the workspace's tests that need more than the test process.
//!
//! Finds the workspace's cdylibs (`libcuda.so`, `libnvidia_ml.so`, `libtessera.so`) and
//! programs: `cargo test` builds no cdylib of another package and does not rebuild one it would
//! need, so a test could silently load yesterday's library. [`built`] fails instead, saying what
//! to run, when the file is missing or older than any of its sources.
//!
//! [`require`] is the one gate for tests that need the machine (podman, root, built files):
//! skipped with the reason printed, or failed under `TESSERA_E2E=1`, as `make test` runs them.
//!
//! [`cgroup::TestCgroup`] makes a cgroup of a test's own to put child processes in.
// `cgroup::join_cgroup` alone needs `unsafe` (a `pre_exec` hook), and says why there.
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub mod cgroup;

/// `<target>/<profile>`: test executables live in its `deps/`, the cdylibs in it.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .to_path_buf()
}

/// What `TESSERA_E2E` asks of the tests that need more than the test process (built files,
/// podman, root, upstream binaries). One meaning everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E2e {
    /// `TESSERA_E2E=1`, what `make test` and CI set: a missing prerequisite fails the test.
    Required,
    /// `TESSERA_E2E=0`: such tests skip, saying so.
    Off,
    /// Unset (or empty): run when the prerequisites are there, else skip with the reason.
    WhenAvailable,
}

/// Reads `TESSERA_E2E`; any value but `1`, `0` or none fails the test, so a typo (`true`,
/// `yes`) can never quietly turn failures into skips.
pub fn e2e() -> E2e {
    match std::env::var("TESSERA_E2E").as_deref() {
        Ok("1") => E2e::Required,
        Ok("0") => E2e::Off,
        Ok("") | Err(std::env::VarError::NotPresent) => E2e::WhenAvailable,
        Ok(other) => {
            panic!("TESSERA_E2E must be 1 (prerequisites required) or 0 (skip), not {other:?}")
        }
        Err(std::env::VarError::NotUnicode(v)) => panic!("TESSERA_E2E must be 1 or 0, not {v:?}"),
    }
}

/// `Some(())` when `test` is to run: its prerequisites are there (`ok`) and `TESSERA_E2E` is not
/// `0`. Otherwise under `TESSERA_E2E=1` the test fails, naming the reason; else the reason is
/// printed (to the real stderr, so a skip shows in CI logs) and `None` returned, so the test
/// returns early.
pub fn require(test: &str, ok: bool, reason: impl FnOnce() -> String) -> Option<()> {
    let skip = |why: String| {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED {test} test: {why}");
        None
    };
    match (e2e(), ok) {
        (E2e::Off, _) => skip("TESSERA_E2E=0".into()),
        (_, true) => Some(()),
        (E2e::Required, false) => {
            panic!("TESSERA_E2E=1 and the {test} test cannot run: {}", reason())
        }
        (E2e::WhenAvailable, false) => skip(format!(
            "{} (set TESSERA_E2E=1 to make this a failure)",
            reason()
        )),
    }
}

/// The fake NVML (`libnvidia_ml.so`) built by `cargo build --workspace`, checked like every built
/// library (missing or older than its sources: rebuild), or `None` when `test` skips.
pub fn fake_nvml(test: &str) -> Option<PathBuf> {
    let path = target_dir().join("libnvidia_ml.so");
    require(test, path.exists(), || {
        format!(
            "the fake NVML is not built at {} (cargo build --workspace)",
            path.display()
        )
    })?;
    Some(built(
        "libnvidia_ml.so",
        &["fake-gpu/nvml/src", "fake-gpu/model/src", "gpu-abi/src"],
    ))
}

/// The fake `libcuda.so`, checked like [`fake_nvml`].
pub fn fake_cuda(test: &str) -> Option<PathBuf> {
    let path = target_dir().join("libcuda.so");
    require(test, path.exists(), || {
        format!(
            "the fake libcuda is not built at {} (cargo build --workspace)",
            path.display()
        )
    })?;
    Some(built(
        "libcuda.so",
        &["fake-gpu/cuda/src", "fake-gpu/model/src", "gpu-abi/src"],
    ))
}

/// `tessera-gpu-probe` (node-tools), checked like [`fake_nvml`].
pub fn gpu_probe(test: &str) -> Option<PathBuf> {
    let path = target_dir().join("tessera-gpu-probe");
    require(test, path.exists(), || {
        format!(
            "tessera-gpu-probe is not built at {} (cargo build --workspace)",
            path.display()
        )
    })?;
    Some(built(
        "tessera-gpu-probe",
        &["node-tools/src", "gpu-abi/src"],
    ))
}

/// `tessera-cdi-hook` (node-tools), checked like [`fake_nvml`].
pub fn cdi_hook(test: &str) -> Option<PathBuf> {
    let path = target_dir().join("tessera-cdi-hook");
    require(test, path.exists(), || {
        format!(
            "tessera-cdi-hook is not built at {} (cargo build --workspace)",
            path.display()
        )
    })?;
    Some(built(
        "tessera-cdi-hook",
        &["node-tools/src", "gpu-abi/src"],
    ))
}

/// Whether `tool --version` runs successfully.
pub fn on_path(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running test CUDA program (`shim/tests/programs/cuda_app.c`, however it was started: directly
/// or in a container) spoken to as it expects: one command per line on its stdin, one answer
/// line on its stdout.
pub struct LineSession {
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl LineSession {
    /// Takes the child's piped stdin and stdout.
    pub fn attach(child: &mut std::process::Child) -> LineSession {
        LineSession {
            stdin: child.stdin.take().expect("the program's stdin is piped"),
            stdout: std::io::BufReader::new(
                child.stdout.take().expect("the program's stdout is piped"),
            ),
        }
    }

    /// Sends `command` (nothing when empty: the greeting) and returns the answer's words.
    pub fn ask(&mut self, command: &str) -> Vec<String> {
        use std::io::{BufRead, Write};
        if !command.is_empty() {
            writeln!(self.stdin, "{command}").expect("write to the program");
            self.stdin.flush().expect("flush to the program");
        }
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read from the program");
        line.split_whitespace().map(str::to_string).collect()
    }

    /// Tells the program to exit and closes its stdin.
    pub fn quit(mut self) {
        use std::io::Write;
        writeln!(self.stdin, "quit").expect("quit");
    }
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
    let newer = sources
        .iter()
        .filter_map(|s| newest_file(&root.join(s)))
        .find(|(t, _)| *t > built);
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
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| newest_file(&e.ok()?.path()))
        .max_by_key(|(t, _)| *t)
}

/// Compiles the test CUDA program (`shim/tests/programs/cuda_app.c`) to `out`, for tests that
/// run it somewhere the shim's own fixture does not reach (a container).
pub fn compile_cuda_app(out: &Path) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shim/tests/programs/cuda_app.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = std::process::Command::new(&cc)
        .args(["-O1", "-o"])
        .arg(out)
        .arg(&source)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(status.success(), "compiling {}", source.display());
}

/// Podman as the container tests run it: runc, cgroupfs, the host's root as an overlay (no
/// image), and the CDI specs from a directory of the test's where this podman can be told one.
pub struct Podman {
    /// Where the test writes CDI specs for it.
    pub cdi_dir: PathBuf,
    takes_spec_dir: bool,
}

impl Podman {
    /// Podman 4.3 reads CDI specs only from `/etc/cdi` and `/var/run/cdi` (`system_dir`, the
    /// one the test's writer uses by default); newer ones take `--cdi-spec-dir`, and then
    /// `private_dir` is used.
    pub fn detect(private_dir: PathBuf, system_dir: &Path) -> Podman {
        let help = std::process::Command::new("podman")
            .arg("--help")
            .output()
            .expect("podman --help");
        let takes_spec_dir = String::from_utf8_lossy(&help.stdout).contains("--cdi-spec-dir");
        Podman {
            cdi_dir: if takes_spec_dir {
                private_dir
            } else {
                system_dir.to_path_buf()
            },
            takes_spec_dir,
        }
    }

    /// `podman run --rm -i` of `args` with CDI device `device` and the environment `env`.
    pub fn run(
        &self,
        device: &str,
        env: &[(&str, String)],
        args: &[&str],
    ) -> std::process::Command {
        self.run_with_devices(&[device], env, args)
    }

    /// [`Podman::run`] with every CDI device of `devices`, as a kubelet passes all of a
    /// claim's IDs to the runtime.
    pub fn run_with_devices(
        &self,
        devices: &[&str],
        env: &[(&str, String)],
        args: &[&str],
    ) -> std::process::Command {
        let mut command = std::process::Command::new("podman");
        command.args(["--runtime", "runc", "--cgroup-manager=cgroupfs"]);
        if self.takes_spec_dir {
            command.arg("--cdi-spec-dir").arg(&self.cdi_dir);
        }
        // Every flag before --rootfs: podman takes the first positional argument as the rootfs.
        command.args([
            "run",
            "--rm",
            "-i",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1000:1000",
            "--network=none",
        ]);
        for device in devices {
            command.args(["--device", device]);
        }
        for (key, value) in env {
            command.arg("-e").arg(format!("{key}={value}"));
        }
        command.args(["--rootfs", "/:O"]).args(args);
        command
    }
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

    /// Each value of `TESSERA_E2E`, read in a child process (the variable is process-wide).
    #[test]
    fn tessera_e2e_means_one_thing_and_refuses_anything_else() {
        if std::env::var_os("BUILT_LIBS_E2E_CHILD").is_some() {
            println!("E2E={:?}", super::e2e());
            return;
        }
        for (value, expected) in [
            (Some("1"), "E2E=Required"),
            (Some("0"), "E2E=Off"),
            (Some(""), "E2E=WhenAvailable"),
            (None, "E2E=WhenAvailable"),
            (
                Some("yes"),
                "TESSERA_E2E must be 1 (prerequisites required) or 0 (skip), not \"yes\"",
            ),
        ] {
            let mut child = std::process::Command::new(std::env::current_exe().expect("test exe"));
            child
                .args([
                    "--exact",
                    "tests::tessera_e2e_means_one_thing_and_refuses_anything_else",
                ])
                .args(["--nocapture", "--test-threads=1"])
                .env("BUILT_LIBS_E2E_CHILD", "1");
            match value {
                Some(v) => child.env("TESSERA_E2E", v),
                None => child.env_remove("TESSERA_E2E"),
            };
            let out = child.output().expect("run the child");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains(expected), "TESSERA_E2E={value:?}: {text}");
        }
    }
}
