//! Per-call overhead of `libtessera.so` against the bare fake driver: alloc/free pairs and
//! kernel launches, 1 and 8 threads, without the shim, with the shim and no config
//! (pass-through), with the shim enforcing a claim of the whole GPU (`cores: 100`, the compute
//! limiter off) and of half of it (`cores: 50`, the limiter on, the claim under its share).
//! Prints a Markdown table; asserts nothing.
//!
//! The fake GPU's kernels here last 1 ns of virtual time (`waveNs: 1`): the loop never
//! synchronises, so its virtual clock stands still, and only kernels this short keep the
//! half-GPU claim under its share for the whole run — the case whose cost is being measured.
//!
//! Run with `make bench` (after `cargo build --workspace --release`-level builds of the fakes
//! are present in the same target profile as this bench).

// The shim's clippy.toml bans allocating environment reads for the preloaded library; a bench
// harness may read its environment as it likes.
#![allow(clippy::disallowed_methods)]

mod support;

use std::process::Command;

use support::{Bench, UUID};

const RUNS: usize = 9;

fn main() {
    let bench = Bench::new("call_bench.c", &["-O2", "-pthread"]);
    let work = &bench.work;
    let uuid = UUID;
    let whole = bench.claim(100);
    let half = bench.claim(50);
    // Memory oversubscription: claims on a GPU the node overcommits (`physicalMemory`), sharing
    // a board directory. `physical` 24 GiB keeps an opted-in claim's allocations on the card;
    // 1 byte sends every one of them to host (managed) memory.
    let board = work.path().join("board");
    std::fs::create_dir_all(&board).expect("board dir");
    let overcommitted = |name: &str, oversubscribe: bool, physical: u64| {
        let claim = work.path().join(format!("claim-{name}.json"));
        let region = work.path().join(format!("claim-{name}.region"));
        std::fs::write(
            &claim,
            format!(
                r#"{{"version":1,"claimUid":"bench-{name}","region":"{}","devices":[{{"uuid":"{uuid}","memoryLimit":8589934592,"cores":100,"physicalMemory":{physical}}}],"oversubscribe":{oversubscribe}}}"#,
                region.display()
            ),
        )
        .expect("claim config");
        claim
    };
    let not_opted = overcommitted("not-opted", false, 24 << 30);
    let on_card = overcommitted("on-card", true, 24 << 30);
    let spilled = overcommitted("spilled", true, 1);

    let iterations = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000u64);
    let variants = [
        ("fake driver, no shim", false, None),
        ("shim, no config (pass-through)", true, None),
        (
            "shim enforcing a claim, cores 100 (limiter off)",
            true,
            Some(&whole),
        ),
        (
            "shim enforcing a claim, cores 50 (limiter on, under share)",
            true,
            Some(&half),
        ),
        (
            "overcommitted GPU, claim not opted in",
            true,
            Some(&not_opted),
        ),
        (
            "overcommitted GPU, opted in, on the card",
            true,
            Some(&on_card),
        ),
        (
            "overcommitted GPU, opted in, every allocation spilled",
            true,
            Some(&spilled),
        ),
    ];
    println!("| threads | variant | alloc+free pair (ns/thread) | launch (ns/thread) |");
    println!("|---|---|---|---|");
    for threads in [1, 8] {
        // Runs are interleaved across variants, so that a burst of load on the (shared) machine
        // hits every variant alike; a cell is the fastest of its runs, as load only ever adds.
        let mut alloc = vec![Vec::new(); variants.len()];
        let mut launch = vec![Vec::new(); variants.len()];
        for _ in 0..RUNS {
            for (index, (_, preload, config)) in variants.iter().enumerate() {
                let mut command = Command::new(&bench.program);
                command.arg(threads.to_string()).arg(iterations.to_string());
                bench.env(&mut command);
                // Only the overcommitted variants see a board: the others run as they did.
                if config.is_some_and(|c| [&not_opted, &on_card, &spilled].contains(&c)) {
                    command.env("TESSERA_BOARD", &board);
                }
                if *preload {
                    command.env("LD_PRELOAD", &bench.shim);
                }
                if let Some(claim) = config {
                    // A fresh region per run: the fake GPU's virtual clock starts again at 0 in
                    // every run, and the claim's schedule must too.
                    let _ = std::fs::remove_file(claim.with_extension("region"));
                    command.env("TESSERA_CONFIG", claim);
                }
                let output = command.output().expect("run bench");
                assert!(
                    output.status.success(),
                    "bench failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                let stdout = String::from_utf8_lossy(&output.stdout);
                for line in stdout.lines() {
                    let mut words = line.split_whitespace();
                    let (Some(name), Some(value)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let value: f64 = value.parse().unwrap_or(f64::NAN);
                    match name {
                        "alloc_free" => alloc[index].push(value),
                        "launch" => launch[index].push(value),
                        _ => {}
                    }
                }
            }
        }
        let bare = (fastest(&alloc[0]), fastest(&launch[0]));
        for (index, (variant, _, _)) in variants.iter().enumerate() {
            let (a, l) = (fastest(&alloc[index]), fastest(&launch[index]));
            if index == 0 {
                println!("| {threads} | {variant} | {a:.0} | {l:.0} |");
            } else {
                println!(
                    "| {threads} | {variant} | {a:.0} ({:+.0}) | {l:.0} ({:+.0}) |",
                    a - bare.0,
                    l - bare.1
                );
            }
        }
    }
    println!(
        "\n{RUNS} runs of {iterations} iterations per cell, interleaved; fastest run; (+N) = added over the bare fake driver."
    );
}

fn fastest(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}
