//! Runs the test CUDA application (`programs/cuda_app.c`) against the project's fake driver,
//! with or without `libtessera.so` preloaded, and drives it line by line.
#![allow(dead_code)]
// The shim's clippy.toml bans allocating environment reads for the preloaded library; a test
// harness may read its environment as it likes.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const CUDA_ERROR_OUT_OF_MEMORY: i64 = 2;
pub const CUDA_ERROR_NOT_PERMITTED: i64 = 800;

/// UUIDs of the simulated node's GPUs: a 24 GiB card and a 10 GiB card.
pub const GPU0: &str = "GPU-11111111-2222-3333-4444-555555555555";
pub const GPU1: &str = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

pub use tessera_built_libs::target_dir;

fn require(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`, which `make test` does)",
        path.display()
    );
    path
}

/// The shim under test: `TESSERA_SHIM` (the shipping build) or this profile's debug build.
pub fn shim_path() -> PathBuf {
    match std::env::var_os("TESSERA_SHIM") {
        Some(path) => require(PathBuf::from(path)),
        None => tessera_built_libs::built("libtessera.so", &["shim/src", "api/src"]),
    }
}

/// A directory with the fake driver and NVML under their real sonames, and the compiled app.
pub struct Fixture {
    pub lib_dir: PathBuf,
    pub app: PathBuf,
    pub app_direct: PathBuf,
}

/// The fixture lives as long as its test process, which has no hook to remove it at exit: each
/// new one removes those of processes that are gone, so runs do not pile up in the target dir.
fn remove_stale_fixtures() {
    let Ok(entries) = std::fs::read_dir(target_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("shim-tests-")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        remove_stale_fixtures();
        let dir = target_dir().join(format!("shim-tests-{}", std::process::id()));
        let lib_dir = dir.join("lib");
        std::fs::create_dir_all(&lib_dir).expect("fixture dir");
        let cuda =
            tessera_built_libs::built("libcuda.so", &["fake-gpu/cuda/src", "fake-gpu/model/src"]);
        let nvml = tessera_built_libs::built(
            "libnvidia_ml.so",
            &["fake-gpu/nvml/src", "fake-gpu/model/src"],
        );
        for (link, to) in [
            ("libcuda.so.1", &cuda),
            ("libcuda.so", &cuda),
            ("libnvidia-ml.so.1", &nvml),
        ] {
            let _ = std::fs::remove_file(lib_dir.join(link));
            std::os::unix::fs::symlink(to, lib_dir.join(link)).expect("symlink");
        }
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/cuda_app.c");
        let app = dir.join("cuda_app");
        let app_direct = dir.join("cuda_app_direct");
        compile(&source, &app, &[]);
        compile(
            &source,
            &app_direct,
            &[
                "-DDIRECT_LINK".as_ref(),
                "-L".as_ref(),
                lib_dir.as_os_str(),
                "-lcuda".as_ref(),
            ],
        );
        Fixture {
            lib_dir,
            app,
            app_direct,
        }
    })
}

fn compile(source: &Path, out: &Path, extra: &[&std::ffi::OsStr]) {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .arg("-O1")
        .arg("-o")
        .arg(out)
        .arg(source)
        .args(extra)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(status.success(), "compiling {} failed", source.display());
}

/// A fresh simulated node and claim for one test.
pub struct Scene {
    pub dir: tempfile::TempDir,
    pub fake_config: PathBuf,
}

impl Scene {
    pub fn new() -> Scene {
        Scene::with_gpu0_memory(24 * GIB)
    }

    /// A scene whose first GPU has `memory` bytes (the second stays a 10 GiB card).
    pub fn with_gpu0_memory(memory: u64) -> Scene {
        Scene::with_gpu0(serde_json::json!({"memory": memory}))
    }

    /// A scene whose first GPU has the fake-config fields of `gpu0` (`memory` at least) over
    /// the defaults; the second stays a 10 GiB card.
    pub fn with_gpu0(gpu0: serde_json::Value) -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake_config = dir.path().join("fakegpu.json");
        // Contexts cost the card nothing unless a test says so: the arithmetic stays the
        // allocations'.
        let mut first = serde_json::json!({"uuid": GPU0, "name": "NVIDIA GeForce RTX 4090", "contextMemory": 0});
        for (key, value) in gpu0.as_object().expect("gpu0 fields") {
            first[key] = value.clone();
        }
        let config = serde_json::json!({
            "devices": [first, {"uuid": GPU1, "name": "NVIDIA A10", "memory": 10 * GIB, "contextMemory": 0}]
        });
        std::fs::write(&fake_config, config.to_string()).expect("fake config");
        Scene { dir, fake_config }
    }

    /// `tessera-gpu-probe`'s report on this scene's node, as the kubelet plugin reads it at
    /// start-up; `None` when the probe is not built and the test skips.
    pub fn probe(&self, test: &str) -> Option<serde_json::Value> {
        let probe = tessera_built_libs::gpu_probe(test)?;
        let lib_dir = &fixture().lib_dir;
        let output = Command::new(probe)
            .arg("--nvml-library")
            .arg(lib_dir.join("libnvidia-ml.so.1"))
            .env("FAKEGPU_CONFIG", &self.fake_config)
            .env("FAKEGPU_STATE", self.dir.path().join("fakegpu.state"))
            .output()
            .expect("run tessera-gpu-probe");
        assert!(
            output.status.success(),
            "tessera-gpu-probe failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Some(serde_json::from_slice(&output.stdout).expect("the probe's JSON report"))
    }

    /// Writes a claim config granting `devices` (uuid, memory limit, context overhead) and
    /// returns its path.
    pub fn claim(&self, name: &str, devices: &[(&str, u64, u64)]) -> PathBuf {
        let region = self.dir.path().join(format!("{name}.region"));
        let config = serde_json::json!({
            "version": 1,
            "claimUid": format!("uid-{name}"),
            "region": region,
            "devices": devices.iter().map(|(uuid, limit, overhead)| serde_json::json!({
                "uuid": uuid, "memoryLimit": limit, "cores": 50, "contextOverhead": overhead,
            })).collect::<Vec<_>>(),
        });
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, config.to_string()).expect("claim config");
        path
    }

    pub fn region(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.region"))
    }

    /// Starts the app reaching the driver `way`, preloading the shim with `config` (or no
    /// shim config at all when `None`).
    pub fn start(&self, way: &str, config: Option<&Path>) -> App {
        self.start_with(way, config, true)
    }

    pub fn start_with(&self, way: &str, config: Option<&Path>, preload: bool) -> App {
        self.start_inner(way, config, preload, false)
    }

    /// As [`start`](Self::start), sharing the scene's GPU boards (`TESSERA_BOARD`).
    pub fn start_with_board(&self, way: &str, config: Option<&Path>) -> App {
        self.start_inner(way, config, true, true)
    }

    fn start_inner(&self, way: &str, config: Option<&Path>, preload: bool, board: bool) -> App {
        let fixture = fixture();
        let program = if way == "direct" {
            &fixture.app_direct
        } else {
            &fixture.app
        };
        let mut command = Command::new(program);
        command.arg(way);
        if way == "cudart" {
            command.arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/data/libcudart-12.9-driver-requests.txt"),
            );
        }
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LD_LIBRARY_PATH", &fixture.lib_dir)
            .env("FAKEGPU_CONFIG", &self.fake_config)
            .env("FAKEGPU_STATE", self.dir.path().join("fakegpu.state"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if preload {
            command.env("LD_PRELOAD", shim_path());
        }
        if let Some(config) = config {
            command.env("TESSERA_CONFIG", config);
        }
        if board {
            let board = self.dir.path().join("board");
            std::fs::create_dir_all(&board).expect("board dir");
            command.env("TESSERA_BOARD", &board);
            command.env("TESSERA_RESERVATIONS", self.dir.path().join("reservations"));
        }
        let mut child = command.spawn().expect("spawn cuda_app");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut app = App {
            child,
            stdin,
            stdout,
        };
        if way == "cudart" {
            let replayed = app.read_line();
            assert!(
                replayed.starts_with("replayed"),
                "replay did not run: {replayed}"
            );
            let shim = app.read_line();
            assert!(
                !preload || shim == "getproc-is-shim 1",
                "cudart must end up on the shim's cuGetProcAddress: {shim}"
            );
        }
        let first = app.read_line();
        assert_eq!(first, "ready", "app did not start");
        app
    }
}

pub struct App {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl App {
    pub fn read_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).expect("read app output");
        if n == 0 {
            let _ = self.child.kill();
            let output = self.child.wait_with_output_stderr();
            panic!("app exited early; stderr:\n{output}");
        }
        line.trim_end().to_string()
    }

    /// Sends one command and returns the numbers of its reply (the reply's first word must be
    /// the command's).
    pub fn run(&mut self, command: &str) -> Vec<i64> {
        writeln!(self.stdin, "{command}").expect("write command");
        self.stdin.flush().expect("flush");
        let reply = self.read_line();
        let mut words = reply.split_whitespace();
        let verb = command.split_whitespace().next().unwrap_or_default();
        assert_eq!(
            words.next(),
            Some(verb),
            "unexpected reply to {command:?}: {reply:?}"
        );
        words
            .map(|w| {
                w.parse::<i64>()
                    .unwrap_or_else(|_| panic!("bad number in {reply:?}"))
            })
            .collect()
    }

    /// The result code of a command.
    pub fn rc(&mut self, command: &str) -> i64 {
        self.run(command)[0]
    }

    /// Sends several commands at once without waiting for their replies.
    pub fn send_lines(&mut self, lines: &[String]) {
        for line in lines {
            writeln!(self.stdin, "{line}").expect("write command");
        }
        self.stdin.flush().expect("flush");
    }

    /// Ends the app and returns its stderr.
    pub fn finish(mut self) -> String {
        let _ = writeln!(self.stdin, "quit");
        drop(self.stdin);
        self.child.wait_with_output_stderr()
    }

    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        let _ = self.child.wait();
    }
}

trait StderrOf {
    fn wait_with_output_stderr(&mut self) -> String;
}

impl StderrOf for Child {
    fn wait_with_output_stderr(&mut self) -> String {
        let _ = self.wait();
        let mut err = String::new();
        if let Some(mut stderr) = self.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
        }
        err
    }
}

/// The compute workload (`programs/compute_app.c`), compiled once per test binary.
pub fn compute_app() -> &'static Path {
    static APP: OnceLock<PathBuf> = OnceLock::new();
    APP.get_or_init(|| {
        let fixture = fixture();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/compute_app.c");
        let app = fixture.app.with_file_name("compute_app");
        compile(&source, &app, &[]);
        app
    })
}

/// A claim's compute settings.
#[derive(Clone, Copy, Debug)]
pub struct Share {
    pub cores: u32,
    pub priority: &'static str,
    pub policy: &'static str,
}

impl Share {
    /// A hard cap of `cores` at normal priority.
    pub fn force(cores: u32) -> Share {
        Share {
            cores,
            priority: "normal",
            policy: "force",
        }
    }
}

impl Scene {
    /// Writes a claim config for GPU0 with `share` and returns its path.
    pub fn compute_claim(&self, name: &str, share: Share) -> PathBuf {
        let config = serde_json::json!({
            "version": 1,
            "claimUid": format!("uid-{name}"),
            "region": self.region(name),
            "devices": [{"uuid": GPU0, "memoryLimit": 4 * GIB, "cores": share.cores}],
            "priority": share.priority,
            "corePolicy": share.policy,
        });
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, config.to_string()).expect("claim config");
        path
    }

    /// Starts the compute workload reaching the driver `way` (`dlsym` or `procaddr`) under the
    /// shim with `config`, sharing the scene's GPU boards, and initialises device 0.
    pub fn start_compute(&self, way: &str, config: Option<&Path>) -> App {
        self.start_compute_with(way, config, true)
    }

    /// The compute workload on the bare fake driver: no shim at all.
    pub fn start_compute_unshimmed(&self, way: &str) -> App {
        self.start_compute_with(way, None, false)
    }

    fn start_compute_with(&self, way: &str, config: Option<&Path>, preload: bool) -> App {
        let fixture = fixture();
        let board = self.dir.path().join("board");
        std::fs::create_dir_all(&board).expect("board dir");
        let mut command = Command::new(compute_app());
        command
            .arg(way)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LD_LIBRARY_PATH", &fixture.lib_dir)
            .env("FAKEGPU_CONFIG", &self.fake_config)
            .env("FAKEGPU_STATE", self.dir.path().join("fakegpu.state"))
            .env("TESSERA_BOARD", &board)
            .env("TESSERA_RESERVATIONS", self.dir.path().join("reservations"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if preload {
            command.env("LD_PRELOAD", shim_path());
        }
        if let Some(config) = config {
            command.env("TESSERA_CONFIG", config);
        }
        let mut child = command.spawn().expect("spawn compute_app");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut app = App {
            child,
            stdin,
            stdout,
        };
        assert_eq!(app.read_line(), "ready", "compute_app did not start");
        assert_eq!(app.rc("init 0"), 0, "compute_app init");
        app
    }
}

/// A `run` reply: utilisation per window (per mille) and the launch count.
#[derive(Debug, Clone)]
pub struct Run {
    pub windows: Vec<i64>,
    pub launches: i64,
}

impl App {
    /// Starts a `run` without waiting for its reply (see [`App::run_reply`]).
    pub fn start_run(&mut self, kind: &str, grid: u32, span_ms: u64, window_ms: u64) {
        self.send_lines(&[format!("run {kind} {grid} 256 {span_ms} {window_ms}")]);
    }

    pub fn run_reply(&mut self) -> Run {
        let reply = self.read_line();
        let mut numbers: Vec<i64> = reply
            .split_whitespace()
            .skip(1)
            .map(|w| {
                w.parse()
                    .unwrap_or_else(|_| panic!("bad number in {reply:?}"))
            })
            .collect();
        assert!(
            reply.starts_with("run ") && numbers.len() >= 2,
            "bad run reply {reply:?}"
        );
        assert!(
            numbers.iter().all(|n| *n >= 0),
            "a launch failed: {reply:?}"
        );
        let launches = numbers.pop().unwrap_or_default();
        Run {
            windows: numbers,
            launches,
        }
    }
}

/// A `serve` reply: how many requests arrived, the latency (arrival to completion, virtual ns)
/// of each one served (the others were dropped), and the share of the GPU every other process
/// had meanwhile (per mille).
#[derive(Debug, Clone)]
pub struct Served {
    pub arrivals: usize,
    pub others_permille: i64,
    pub latencies: Vec<u64>,
}

impl Served {
    /// The latency below which `fraction` of the served requests completed (nearest rank).
    pub fn percentile(&self, fraction: f64) -> u64 {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return 0;
        }
        let rank = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }
}

/// A request-serving loop: one kernel of `grid` blocks per request, arriving every `period_us`
/// (±`jitter_us`) for `delay_ms` + `span_ms`, measured over the last `span_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Serve {
    pub grid: u32,
    pub period_us: u64,
    pub jitter_us: u64,
    pub delay_ms: u64,
    pub span_ms: u64,
    pub seed: u64,
}

impl App {
    /// Starts a `serve` without waiting for its reply (see [`App::serve_reply`]).
    pub fn start_serve(&mut self, serve: Serve) {
        let Serve {
            grid,
            period_us,
            jitter_us,
            delay_ms,
            span_ms,
            seed,
        } = serve;
        self.send_lines(&[format!(
            "serve {grid} {period_us} {jitter_us} {delay_ms} {span_ms} {seed}"
        )]);
    }

    pub fn serve_reply(&mut self) -> Served {
        let reply = self.read_line();
        let mut numbers = reply.split_whitespace();
        assert_eq!(numbers.next(), Some("serve"), "bad serve reply {reply:?}");
        let numbers: Vec<i64> = numbers
            .map(|w| {
                w.parse()
                    .unwrap_or_else(|_| panic!("bad number in serve reply {w:?}"))
            })
            .collect();
        assert!(
            numbers.len() >= 2 && numbers[0] >= 0,
            "a launch failed: {reply:?}"
        );
        Served {
            arrivals: numbers[0] as usize,
            others_permille: numbers[1],
            latencies: numbers[2..].iter().map(|n| *n as u64).collect(),
        }
    }
}
