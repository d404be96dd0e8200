//! Instructions per driver call under `libtessera.so`, counted by callgrind (valgrind): exact and
//! repeatable whatever the machine's load, unlike timings. Each call is reached through
//! `cuGetProcAddress_v2`, as libcudart reaches the driver, on the bare fake driver, with the shim
//! and no config (pass-through), enforcing a claim of the whole GPU (`cores: 100`, the compute
//! limiter off) and of half of it (`cores: 50`, the limiter on, the claim under its share).
//! Prints a Markdown table; asserts nothing.
//!
//! Per call = (instructions of 2N calls − instructions of N calls) ÷ N, collection on only
//! around the measured loop (`shim/benches/programs/call_instructions.c`), so set-up and the
//! first calls' slow paths are not counted. Run with `make bench-instructions`.

// The shim's clippy.toml bans allocating environment reads for the preloaded library; a bench
// harness may read its environment as it likes.
#![allow(clippy::disallowed_methods)]

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::Bench;

const N: u64 = 2000;

fn main() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind is not installed: nothing to measure (apt-get install valgrind)");
        return;
    }
    let bench = Bench::new("call_instructions.c", &["-O2"]);
    let (whole, half) = (bench.claim(100), bench.claim(50));
    let variants: [(&str, bool, Option<&PathBuf>); 4] = [
        ("fake driver, no shim", false, None),
        ("shim, no config (pass-through)", true, None),
        ("shim, claim of cores 100 (limiter off)", true, Some(&whole)),
        (
            "shim, claim of cores 50 (limiter on, under its share)",
            true,
            Some(&half),
        ),
    ];
    let ops = [
        ("alloc_free", "cuMemAlloc_v2 + cuMemFree_v2"),
        ("launch", "cuLaunchKernel"),
        ("mem_get_info", "cuMemGetInfo_v2"),
    ];
    let count = |op: &str, iterations: u64, preload: bool, config: Option<&PathBuf>| -> u64 {
        let out = bench
            .work
            .path()
            .join(format!("callgrind.{op}.{iterations}.out"));
        let mut command = Command::new("valgrind");
        command
            .args(["--tool=callgrind", "--collect-atstart=no"])
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(&bench.program)
            .arg(op)
            .arg(iterations.to_string());
        bench.env(&mut command);
        if preload {
            command.env("LD_PRELOAD", &bench.shim);
        }
        if let Some(claim) = config {
            let _ = std::fs::remove_file(claim.with_extension("region"));
            command.env("TESSERA_CONFIG", claim);
        }
        let output = command.output().expect("valgrind");
        assert!(
            output.status.success(),
            "{op} under callgrind failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = std::fs::read_to_string(&out).expect("callgrind output");
        text.lines()
            .find_map(|l| {
                l.strip_prefix("totals: ")
                    .or_else(|| l.strip_prefix("summary: "))
            })
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("a totals line in the callgrind output")
    };
    let mut table = vec![vec![0u64; ops.len()]; variants.len()];
    for (v, (_, preload, config)) in variants.iter().enumerate() {
        for (o, (op, _)) in ops.iter().enumerate() {
            let once = count(op, N, *preload, *config);
            let twice = count(op, 2 * N, *preload, *config);
            table[v][o] = twice.saturating_sub(once) / N;
        }
    }
    print!("| variant |");
    for (_, name) in &ops {
        print!(" {name} |");
    }
    println!();
    println!("|---|{}", "---|".repeat(ops.len()));
    for (row, (variant, _, _)) in table.iter().zip(&variants) {
        print!("| {variant} |");
        for (count, bare) in row.iter().zip(&table[0]) {
            if std::ptr::eq(row, &table[0]) {
                print!(" {count} |");
            } else {
                print!(" {count} ({:+}) |", *count as i64 - *bare as i64);
            }
        }
        println!();
    }
    println!(
        "\nInstructions per call (callgrind; 2×{N} minus {N} calls, ÷ {N}); (+N) = added over the bare fake driver."
    );
}
