//! Two plugin instances at once (a rolling update): unique sockets, and calls serialised by the
//! lock in the plugin directory, so neither loses the other's checkpoint updates.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use tessera_kubelet_plugin::Step;
use tessera_kubelet_plugin::node::FaultHook;

const NS: &str = "default";

fn uid(instance: u32, n: u32) -> String {
    format!("{instance:08x}-{n:04x}-4000-8000-000000000000")
}

/// Records (instance, step, time) and slows each step a little, so overlapping calls would
/// interleave if the lock did not hold them apart.
fn recorder(instance: u32, log: Arc<Mutex<Vec<(u32, Step, Instant)>>>) -> FaultHook {
    Arc::new(move |step, _uid| {
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((instance, step, Instant::now()));
        std::thread::sleep(Duration::from_millis(2));
        false
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_serialise_their_calls() {
    let env = Env::new(&["v1"]);
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = env
        .start(Some("pod-a"), Some(recorder(1, log.clone())))
        .await;
    let b = env
        .start(Some("pod-b"), Some(recorder(2, log.clone())))
        .await;
    assert_ne!(a.sockets.dra, b.sockets.dra);
    assert_ne!(a.sockets.registration, b.sockets.registration);

    // Ten claims each, one call per claim, all at once through both instances.
    let mut claims = Vec::new();
    for instance in [1, 2] {
        for n in 0..10 {
            let id = uid(instance, n);
            env.api.put(claim(
                NS,
                &format!("c-{instance}-{n}"),
                &id,
                Some(vec![result("gpu", &format!("gpu-{}-slice-{n}of10", n % 2))]),
                vec![],
            ));
            claims.push((instance, Claim::new(NS, &format!("c-{instance}-{n}"), &id)));
        }
    }
    let calls = claims.iter().map(|(instance, claim)| {
        let kubelet = if *instance == 1 {
            a.kubelet.clone()
        } else {
            b.kubelet.clone()
        };
        let claim = claim.clone();
        async move { kubelet.prepare_ok(Version::V1, &claim).await }
    });
    futures::future::join_all(calls).await;
    let checkpoint = env.checkpoint();
    assert_eq!(checkpoint.claims.len(), 20, "no lost checkpoint update");
    for (_, claim) in &claims {
        env.assert_prepared(&claim.uid);
    }

    // Each call's steps (Started … Completed) form one uninterrupted run in the log.
    let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut current: Option<u32> = None;
    for (instance, step, _) in &log {
        match (step, current) {
            (Step::Started, None) => current = Some(*instance),
            (Step::Started, Some(other)) => {
                panic!("instance {instance} started while {other} was mid-call")
            }
            (Step::Completed, Some(owner)) if owner == *instance => current = None,
            (_, Some(owner)) => assert_eq!(
                owner, *instance,
                "instance {instance} ran {step:?} inside another call"
            ),
            (_, None) => panic!("{step:?} outside a call"),
        }
    }

    // The same claim through both at once: one preparation, the same answer twice.
    let id = uid(3, 0);
    env.api.put(claim(
        NS,
        "shared",
        &id,
        Some(vec![result("gpu", "gpu-1")]),
        vec![],
    ));
    let shared = Claim::new(NS, "shared", &id);
    let (x, y) = tokio::join!(
        a.kubelet.prepare_ok(Version::V1, &shared),
        b.kubelet.prepare_ok(Version::V1beta1, &shared)
    );
    assert_eq!(x[0].cdi_device_ids, y[0].cdi_device_ids);
    a.stop().await;
    // The old instance is gone; the new one serves everything, unprepare included.
    for (_, claim) in &claims {
        b.kubelet.unprepare_ok(Version::V1, claim).await;
    }
    b.kubelet.unprepare_ok(Version::V1, &shared).await;
    assert!(env.checkpoint().claims.is_empty());
    b.stop().await;
}
