//! Per-call overhead of `libtessera.so` against the bare fake driver: alloc/free pairs and
//! kernel launches, 1 and 8 threads, without the shim, with the shim and no config
//! (pass-through) and with the shim enforcing a claim. Prints a Markdown table; asserts nothing.
//!
//! Run with `make bench` (after `cargo build --workspace --release`-level builds of the fakes
//! are present in the same target profile as this bench).

use std::path::Path;
use std::process::Command;

use tessera_built_libs::target_dir;

const RUNS: usize = 7;

fn main() {
    let target = target_dir();
    let work = tempfile::tempdir().expect("tempdir");
    let lib_dir = work.path().join("lib");
    std::fs::create_dir_all(&lib_dir).expect("lib dir");
    for (link, file) in [("libcuda.so.1", "libcuda.so"), ("libnvidia-ml.so.1", "libnvidia_ml.so")] {
        let source = target.join(file);
        assert!(source.exists(), "{} missing: build the workspace in this profile first", source.display());
        std::os::unix::fs::symlink(&source, lib_dir.join(link)).expect("symlink");
    }
    let shim = target.join("libtessera.so");
    assert!(shim.exists(), "{} missing", shim.display());
    let program = work.path().join("call_bench");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/programs/call_bench.c");
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-O2", "-pthread", "-o"])
        .arg(&program)
        .arg(&source)
        .arg("-ldl")
        .status()
        .expect("cc");
    assert!(status.success(), "compiling the bench program failed");

    let uuid = "GPU-11111111-2222-3333-4444-555555555555";
    let fake = work.path().join("fakegpu.json");
    std::fs::write(&fake, format!(r#"{{"devices":[{{"uuid":"{uuid}","name":"NVIDIA GeForce RTX 4090","memory":25769803776}}]}}"#))
        .expect("fake config");
    let claim = work.path().join("claim.json");
    let region = work.path().join("claim.region");
    std::fs::write(
        &claim,
        format!(
            r#"{{"version":1,"claimUid":"bench","region":"{}","devices":[{{"uuid":"{uuid}","memoryLimit":8589934592,"cores":100}}]}}"#,
            region.display()
        ),
    )
    .expect("claim config");

    let iterations = std::env::var("BENCH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000u64);
    println!("| threads | variant | alloc+free pair (ns/thread) | launch (ns/thread) |");
    println!("|---|---|---|---|");
    for threads in [1, 8] {
        let mut bare = (0.0, 0.0);
        for (variant, preload, config) in [
            ("fake driver, no shim", false, false),
            ("shim, no config (pass-through)", true, false),
            ("shim enforcing a claim", true, true),
        ] {
            let mut alloc = Vec::new();
            let mut launch = Vec::new();
            for _ in 0..RUNS {
                let mut command = Command::new(&program);
                command
                    .arg(threads.to_string())
                    .arg(iterations.to_string())
                    .env("LD_LIBRARY_PATH", &lib_dir)
                    .env("FAKEGPU_CONFIG", &fake)
                    .env("FAKEGPU_STATE", work.path().join("fakegpu.state"));
                if preload {
                    command.env("LD_PRELOAD", &shim);
                }
                if config {
                    command.env("TESSERA_CONFIG", &claim);
                }
                let output = command.output().expect("run bench");
                assert!(output.status.success(), "bench failed: {}", String::from_utf8_lossy(&output.stderr));
                let stdout = String::from_utf8_lossy(&output.stdout);
                for line in stdout.lines() {
                    let mut words = line.split_whitespace();
                    let (Some(name), Some(value)) = (words.next(), words.next()) else { continue };
                    let value: f64 = value.parse().unwrap_or(f64::NAN);
                    match name {
                        "alloc_free" => alloc.push(value),
                        "launch" => launch.push(value),
                        _ => {}
                    }
                }
            }
            let (a, l) = (median(&mut alloc), median(&mut launch));
            if !preload {
                bare = (a, l);
                println!("| {threads} | {variant} | {a:.0} | {l:.0} |");
            } else {
                println!("| {threads} | {variant} | {a:.0} (+{:.0}) | {l:.0} (+{:.0}) |", a - bare.0, l - bare.1);
            }
        }
    }
    println!("\n{RUNS} runs of {iterations} iterations per cell; medians; (+N) = added over the bare fake driver.");
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
