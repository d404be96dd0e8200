//! NodePrepareResources latency through the real gRPC protocol over the plugin's unix socket,
//! with an in-process API server and real (fsync'd) writes to a temporary directory.
//!
//! `cargo bench -p tessera-kubelet-plugin --bench prepare_latency`
//!
//! Scenarios: one claim per call (new claims), 50 claims in one call (per-claim time is the
//! call's time divided by 50), and a repeated prepare of an already prepared claim (the
//! idempotent path). Prints p50/p99 per claim.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use support::*;

fn uid(scenario: u32, n: u32) -> String {
    format!("{scenario:08x}-{:04x}-4000-8000-{n:012x}", n >> 16)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(name: &str, per_claim: &mut [Duration], calls: usize) {
    per_claim.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<38} calls {calls:>4}  per claim: p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
        ms(percentile(per_claim, 0.50)),
        ms(percentile(per_claim, 0.99)),
        ms(per_claim[per_claim.len() - 1]),
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let env = Env::new(&["v1"]);
        let instance = env.start(None, None).await;
        let share = |n: u32| {
            support::share(
                "gpu",
                &format!("gpu-{}", n % 2),
                &format!("9f0c4c4e-1111-4000-8000-{n:012x}"),
                "1Gi",
                "10",
            )
        };

        // Warm-up: discovery, connections, directories.
        for n in 0..20 {
            let id = uid(9, n);
            env.api.put(claim(
                "bench",
                &format!("w{n}"),
                &id,
                Some(vec![share(n)]),
                vec![],
            ));
            instance
                .kubelet
                .prepare_ok(Version::V1, &Claim::new("bench", &format!("w{n}"), &id))
                .await;
        }

        let single = 300;
        let mut times = Vec::with_capacity(single);
        for n in 0..single as u32 {
            let id = uid(1, n);
            env.api.put(claim(
                "bench",
                &format!("s{n}"),
                &id,
                Some(vec![share(n)]),
                vec![],
            ));
            let claim = Claim::new("bench", &format!("s{n}"), &id);
            let start = Instant::now();
            instance.kubelet.prepare_ok(Version::V1, &claim).await;
            times.push(start.elapsed());
            instance.kubelet.unprepare_ok(Version::V1, &claim).await;
        }
        report("1 claim per call (new claim)", &mut times, single);

        let batches = 20;
        let mut per_claim = Vec::with_capacity(batches);
        for batch in 0..batches as u32 {
            let claims: Vec<Claim> = (0..50)
                .map(|i| {
                    let n = batch * 50 + i;
                    let id = uid(2, n);
                    env.api.put(claim(
                        "bench",
                        &format!("b{n}"),
                        &id,
                        Some(vec![share(n)]),
                        vec![],
                    ));
                    Claim::new("bench", &format!("b{n}"), &id)
                })
                .collect();
            let start = Instant::now();
            let answer = instance
                .kubelet
                .prepare(Version::V1, &claims)
                .await
                .expect("prepare");
            let elapsed = start.elapsed();
            assert!(answer.values().all(|a| a.error.is_empty()), "{answer:?}");
            per_claim.push(elapsed / 50);
            instance
                .kubelet
                .unprepare(Version::V1, &claims)
                .await
                .expect("unprepare");
        }
        report("50 claims in one call (call / 50)", &mut per_claim, batches);

        let again = 300;
        let id = uid(3, 0);
        env.api
            .put(claim("bench", "again", &id, Some(vec![share(0)]), vec![]));
        let claim = Claim::new("bench", "again", &id);
        instance.kubelet.prepare_ok(Version::V1, &claim).await;
        let mut times = Vec::with_capacity(again);
        for _ in 0..again {
            let start = Instant::now();
            instance.kubelet.prepare_ok(Version::V1, &claim).await;
            times.push(start.elapsed());
        }
        report("1 claim, already prepared (idempotent)", &mut times, again);
        instance.stop().await;
    });
}
