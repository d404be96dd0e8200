//! A plugin restart between any two steps neither leaks nor double-prepares: each test crashes
//! an instance right after one step (the fault hook stops the call there, as a dying process
//! would), starts a fresh instance on the same directories, and checks that prepare completes
//! the claim and unprepare removes every trace of it.

mod support;

use support::*;
use tessera_driver::checkpoint::ClaimState;
use tessera_kubelet_plugin::Step;

const NS: &str = "default";
const UID: &str = "0b7c4a2e-8c1d-4f53-9f0e-3b1f6f1c2a77";

fn setup() -> (Env, Claim) {
    let env = Env::new(&["v1"]);
    let results = vec![share(
        "gpu",
        "gpu-0",
        "9f0c4c4e-1111-4000-8000-000000000001",
        "3Gi",
        "30",
    )];
    env.api.put(claim(NS, "c", UID, Some(results), vec![]));
    (env, Claim::new(NS, "c", UID))
}

const PREPARE_STEPS: [Step; 5] = [
    Step::Started,
    Step::ConfigWritten,
    Step::RegionWritten,
    Step::SpecWritten,
    Step::Completed,
];

#[tokio::test]
async fn a_crash_at_any_prepare_step_is_completed_by_the_next_prepare() {
    for step in PREPARE_STEPS {
        let (env, claim) = setup();
        let crashing = env.start(None, Some(crash_at(step))).await;
        let error = crashing
            .kubelet
            .prepare(Version::V1, std::slice::from_ref(&claim))
            .await
            .expect_err("crashed");
        assert!(
            error.message().contains("simulated crash"),
            "{step:?}: {error}"
        );
        crashing.stop().await;
        let record = env
            .checkpoint()
            .claims
            .get(UID)
            .cloned()
            .expect("recorded before any file");
        let expected = if step == Step::Completed {
            ClaimState::PrepareCompleted
        } else {
            ClaimState::PrepareStarted
        };
        assert_eq!(record.state, expected, "{step:?}");

        let restarted = env.start(None, None).await;
        let devices = restarted.kubelet.prepare_ok(Version::V1, &claim).await;
        assert_eq!(
            devices[0].cdi_device_ids[0],
            format!("gpu.tessera.dev/claim={UID}-gpu-0-9f0c4c4e-1111-4000-8000-000000000001")
        );
        let config = env.assert_prepared(UID);
        assert_eq!(config.devices[0].memory_limit, 3 * GIB, "{step:?}");
        restarted.kubelet.unprepare_ok(Version::V1, &claim).await;
        env.assert_clean(UID);
        restarted.stop().await;
    }
}

#[tokio::test]
async fn a_half_prepared_claim_is_cleaned_up_by_unprepare() {
    for step in PREPARE_STEPS {
        let (env, claim) = setup();
        let crashing = env.start(None, Some(crash_at(step))).await;
        crashing
            .kubelet
            .prepare(Version::V1, std::slice::from_ref(&claim))
            .await
            .expect_err("crashed");
        crashing.stop().await;
        if step == Step::ConfigWritten {
            // The case the issue names: config written, no CDI spec yet.
            assert!(env.claim_dir(UID).join("config.json").exists());
            assert!(!env.spec_path(UID).exists());
        }
        // The claim is gone by the time the kubelet gives up on it.
        env.api.delete(NS, "c");
        let restarted = env.start(None, None).await;
        restarted
            .kubelet
            .unprepare_ok(Version::V1beta1, &claim)
            .await;
        env.assert_clean(UID);
        restarted.stop().await;
    }
}

#[tokio::test]
async fn a_crash_during_unprepare_is_finished_by_the_next_unprepare() {
    for step in [Step::SpecRemoved, Step::ClaimDirRemoved] {
        let (env, claim) = setup();
        let first = env.start(None, None).await;
        first.kubelet.prepare_ok(Version::V1, &claim).await;
        first.stop().await;
        let crashing = env.start(None, Some(crash_at(step))).await;
        crashing
            .kubelet
            .unprepare(Version::V1, std::slice::from_ref(&claim))
            .await
            .expect_err("crashed");
        crashing.stop().await;
        assert!(
            env.checkpoint().claims.contains_key(UID),
            "{step:?}: the record outlives the files"
        );
        let restarted = env.start(None, None).await;
        restarted.kubelet.unprepare_ok(Version::V1, &claim).await;
        env.assert_clean(UID);
        restarted.stop().await;
    }
}

/// A claim below one CUDA context on its GPU is refused when it is first prepared, naming both
/// figures; one already prepared keeps what its containers run with when a restarted plugin
/// measures a larger context, instead of failing the kubelet's prepare of a running pod.
#[tokio::test]
async fn the_context_check_refuses_new_claims_and_keeps_prepared_ones() {
    let (env, prepared) = setup();
    let first = env.start(None, None).await;
    first.kubelet.prepare_ok(Version::V1, &prepared).await;
    first.stop().await;

    // The restarted plugin measures 4 GiB per context: above this claim's 3 GiB.
    let mut config = env.node_config();
    for gpu in &mut config.inventory.gpus {
        gpu.context_overhead = 4 << 30;
    }
    let second = env.start_with(config, None, None).await;
    second.kubelet.prepare_ok(Version::V1, &prepared).await;

    let new_uid = "7d1c9e2a-0000-4000-8000-00000000000a";
    let results = vec![share(
        "gpu",
        "gpu-0",
        "9f0c4c4e-1111-4000-8000-000000000002",
        "3Gi",
        "30",
    )];
    env.api.put(claim(NS, "d", new_uid, Some(results), vec![]));
    let answer = second
        .kubelet
        .prepare(Version::V1, &[Claim::new(NS, "d", new_uid)])
        .await
        .expect("prepare call");
    let error = &answer
        .get(new_uid)
        .expect("an answer for the new claim")
        .error;
    assert!(
        error.contains("less than one CUDA context") && error.contains("4294967296"),
        "{error}"
    );
    second.stop().await;
}
