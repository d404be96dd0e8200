//! Node memory overcommit (`--memory-overcommit`, `docs/oversubscription.md`): what a claim is
//! prepared with on an overcommitted GPU, the spill metric read from the region, and the
//! binary's refusals (a factor out of range, a GPU without on-demand paging); the node's spill
//! policy (`--oversubscribe-by-default`) and a claim's `spillLimit` in the shim config.

mod support;

use std::process::Command;

use http_body_util::BodyExt;
use serde_json::{Value, json};
use support::*;
use tower::ServiceExt;

fn uid(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-0000000000aa")
}

async fn metrics(router: axum::Router) -> String {
    let response = router
        .oneshot(
            http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// The L40S (48 GiB) is overcommitted 2×, the RTX 4090 (24 GiB) is not.
fn l40s_doubled(env: &Env) -> tessera_kubelet_plugin::NodeConfig {
    let mut config = env.node_config();
    config.memory_overcommit = "NVIDIA L40S=2".parse().expect("valid");
    config
}

#[tokio::test]
async fn claims_get_their_own_share_of_the_offered_memory() {
    let env = Env::new(&["v1"]);
    let instance = env.start_with(l40s_doubled(&env), None, None).await;
    let cases = [
        // A share bigger than the card: the consumed capacity, within the offered 96 GiB.
        (
            share(
                "gpu",
                "gpu-1",
                "9f0c4c4e-1111-4000-8000-0000000000a1",
                "60Gi",
                "25",
            ),
            GPU1,
            60 * GIB,
            Some(48 * GIB),
        ),
        // Half of the offered memory: the whole card.
        (
            result("gpu", "gpu-1-slice-1of2"),
            GPU1,
            48 * GIB,
            Some(48 * GIB),
        ),
        // The whole L40S for one claim stays the card.
        (result("gpu", "gpu-1"), GPU1, 48 * GIB, Some(48 * GIB)),
        // The 4090 is not overcommitted: as before, and no physicalMemory in its config.
        (result("gpu", "gpu-0-slice-1of4"), GPU0, 6 * GIB, None),
    ];
    // None of these claims opted in to spilling: on the overcommitted L40S each is owed its limit
    // (at most the card) on the card, published for the shims of claims that may spill. Each is
    // unprepared before the next, which would otherwise wait for the card (the next test).
    let reserved = |gpu: &str| {
        let path = env
            .path("state/reservations")
            .join(format!("{gpu}.reserved"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    for (i, (device, gpu, limit, physical)) in cases.into_iter().enumerate() {
        let id = uid(i as u32 + 1);
        env.api.put(claim(
            "team-a",
            &format!("c{i}"),
            &id,
            Some(vec![device]),
            vec![],
        ));
        instance
            .kubelet
            .prepare_ok(Version::V1, &Claim::new("team-a", &format!("c{i}"), &id))
            .await;
        let config = env.assert_prepared(&id);
        let d = &config.devices[0];
        assert_eq!(
            (d.uuid.as_str(), d.memory_limit, d.physical_memory),
            (gpu, limit, physical),
            "case {i}"
        );
        let raw = std::fs::read_to_string(env.claim_dir(&id).join("config.json")).expect("config");
        assert_eq!(raw.contains("physicalMemory"), physical.is_some(), "{raw}");
        if gpu == GPU1 {
            assert_eq!(reserved(GPU1), format!("{}\n", 48 * GIB), "case {i}");
            instance
                .kubelet
                .unprepare_ok(Version::V1, &Claim::new("team-a", &format!("c{i}"), &id))
                .await;
            assert_eq!(reserved(GPU1), "0\n", "unprepared claims are owed nothing");
        }
    }
    assert!(
        !env.path("state/reservations")
            .join(format!("{GPU0}.reserved"))
            .exists(),
        "the 4090 is not overcommitted"
    );
    instance.stop().await;
}

#[tokio::test]
async fn spilled_bytes_are_exported_per_claim_from_live_slots() {
    let env = Env::new(&["v1"]);
    let instance = env.start_with(l40s_doubled(&env), None, None).await;
    let id = uid(9);
    env.api.put(claim(
        "team-a",
        "batch",
        &id,
        Some(vec![share(
            "gpu",
            "gpu-1",
            "9f0c4c4e-1111-4000-8000-0000000000b1",
            "64Gi",
            "50",
        )]),
        vec![],
    ));
    instance
        .kubelet
        .prepare_ok(Version::V1, &Claim::new("team-a", "batch", &id))
        .await;
    let router = tessera_kubelet_plugin::http::router(instance.metrics.clone());
    let labels =
        format!("namespace=\"team-a\",claim=\"batch\",claim_uid=\"{id}\",gpu_uuid=\"{GPU1}\"");
    let spilled = |text: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("tessera_claim_memory_spilled_bytes{{{labels}}} "))
            })
            .map(str::to_string)
    };
    let text = metrics(router.clone()).await;
    assert_eq!(
        spilled(&text).as_deref(),
        Some("0"),
        "before any spill:\n{text}"
    );
    // A gauge in bytes (the classic text format carries the unit in the name only).
    assert!(
        text.contains("# TYPE tessera_claim_memory_spilled_bytes gauge"),
        "{text}"
    );

    // Two processes spilled: slot 0's owner is alive (holds its lock), slot 1's died.
    let path = env.claim_dir(&id).join("region");
    let owner = charge_region(&path, &[(0, 40 * GIB, 10 * GIB), (1, 5 * GIB, 3 * GIB)]);
    let text = metrics(router.clone()).await;
    let expected = (10 * GIB).to_string();
    assert_eq!(spilled(&text).as_deref(), Some(expected.as_str()), "{text}");
    drop(owner);
    let text = metrics(router).await;
    assert_eq!(
        spilled(&text).as_deref(),
        Some("0"),
        "the owner died:\n{text}"
    );
    instance.stop().await;
}

/// `--oversubscribe-by-default` and `spillLimit`: the node's policy decides for claims that do
/// not set `oversubscribe` (an explicit false still opts out), and the claim's spill limit
/// reaches the shim config on overcommitted GPUs only, at most the claim's limit there.
#[tokio::test]
async fn the_node_policy_and_the_spill_limit_reach_the_shim_config() {
    let env = Env::new(&["v1"]);
    let mut node = l40s_doubled(&env);
    node.oversubscribe_by_default = true;
    let instance = env.start_with(node, None, None).await;
    let big = |n: u32| {
        share(
            "gpu",
            "gpu-1",
            &format!("9f0c4c4e-1111-4000-8000-0000000001{n:02}"),
            "8Gi",
            "10",
        )
    };
    let cases: Vec<(Value, Vec<Value>, bool, Option<u64>)> = vec![
        // No config: the node's policy, no spill limit (the shim uses the memory limit).
        (big(1), vec![], true, None),
        // An explicit false opts out on a node that spills by default.
        (
            big(2),
            vec![config_entry(
                "FromClaim",
                &[],
                json!({"oversubscribe": false}),
            )],
            false,
            None,
        ),
        // A spill limit under the claim's limit, as bytes.
        (
            big(3),
            vec![config_entry("FromClaim", &[], json!({"spillLimit": "3Gi"}))],
            true,
            Some(3 * GIB),
        ),
        // One above it is cut to the limit; an unquoted number is bytes.
        (
            big(4),
            vec![config_entry(
                "FromClass",
                &[],
                json!({"spillLimit": 64 * GIB}),
            )],
            true,
            Some(8 * GIB),
        ),
        // The 4090 is not overcommitted: no physicalMemory, so no spill limit either.
        (
            result("gpu", "gpu-0-slice-1of4"),
            vec![config_entry(
                "FromClaim",
                &[],
                json!({"spillLimit": "1Gi", "oversubscribe": true}),
            )],
            true,
            None,
        ),
    ];
    for (i, (device, config, oversubscribe, spill_limit)) in cases.into_iter().enumerate() {
        let id = uid(0x100 + i as u32);
        let name = format!("p{i}");
        env.api
            .put(claim("team-a", &name, &id, Some(vec![device]), config));
        instance
            .kubelet
            .prepare_ok(Version::V1, &Claim::new("team-a", &name, &id))
            .await;
        let shim = env.assert_prepared(&id);
        assert_eq!(
            (shim.oversubscribe, shim.devices[0].spill_limit),
            (oversubscribe, spill_limit),
            "case {i}"
        );
        let raw = std::fs::read_to_string(env.claim_dir(&id).join("config.json")).expect("config");
        assert_eq!(raw.contains("spillLimit"), spill_limit.is_some(), "{raw}");
    }
    // Only the claim that opted out is owed its share on the card.
    let reserved = std::fs::read_to_string(
        env.path("state/reservations")
            .join(format!("{GPU1}.reserved")),
    )
    .expect("reservation");
    assert_eq!(reserved, format!("{}\n", 8 * GIB));

    // A bad spill limit fails the prepare, naming the field and the value.
    for (i, bad) in ["0", "-2Gi", "lots"].into_iter().enumerate() {
        let id = uid(0x200 + i as u32);
        let name = format!("bad{i}");
        env.api.put(claim(
            "team-a",
            &name,
            &id,
            Some(vec![big(10 + i as u32)]),
            vec![config_entry("FromClaim", &[], json!({"spillLimit": bad}))],
        ));
        let answer = instance
            .kubelet
            .prepare(Version::V1, &[Claim::new("team-a", &name, &id)])
            .await
            .expect("prepare call");
        let error = &answer[&id].error;
        assert!(
            error.contains("spillLimit") && error.contains(&format!("{bad:?}")),
            "{bad}: {error}"
        );
        env.assert_clean(&id);
    }
    instance.stop().await;
}

#[tokio::test]
async fn without_the_node_policy_claims_that_say_nothing_do_not_spill() {
    let env = Env::new(&["v1"]);
    let instance = env.start_with(l40s_doubled(&env), None, None).await;
    for (i, config, oversubscribe) in [
        (0u32, vec![], false),
        (
            1,
            vec![config_entry(
                "FromClaim",
                &[],
                json!({"oversubscribe": true}),
            )],
            true,
        ),
    ] {
        let id = uid(0x300 + i);
        let name = format!("d{i}");
        env.api.put(claim(
            "team-a",
            &name,
            &id,
            Some(vec![result("gpu", "gpu-1-slice-1of2")]),
            config,
        ));
        instance
            .kubelet
            .prepare_ok(Version::V1, &Claim::new("team-a", &name, &id))
            .await;
        assert_eq!(
            env.assert_prepared(&id).oversubscribe,
            oversubscribe,
            "case {i}"
        );
    }
    instance.stop().await;
}

/// Runs the binary with `args` on the fake node `inventory`; it must stop before it needs an
/// API server. Returns its stderr.
fn refused(inventory: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("inventory.json");
    std::fs::write(&path, inventory).expect("inventory");
    let output = Command::new(env!("CARGO_BIN_EXE_tessera-kubelet-plugin"))
        .args([
            "--node-name",
            "node-a",
            "--health-interval",
            "0",
            "--inventory",
        ])
        .arg(&path)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("TESSERA_MEMORY_OVERCOMMIT")
        .output()
        .expect("run the binary");
    assert!(!output.status.success(), "must refuse {args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_binary_refuses_bad_factors_naming_the_flag() {
    for (factor, why) in [
        ("5", "outside 1.0–4.0"),
        ("0.5", "outside 1.0–4.0"),
        ("NaN", "not a number"),
        ("NVIDIA L40S=2,NVIDIA L40S=3", "given twice"),
    ] {
        let err = refused(&inventory_json(), &["--memory-overcommit", factor]);
        assert!(
            err.contains("--memory-overcommit") && err.contains(why),
            "{factor}: {err}"
        );
    }
}

#[test]
fn the_binary_refuses_overcommit_on_gpus_without_on_demand_paging() {
    let kepler = serde_json::json!({
        "driverVersion": "470.256.02",
        "devices": [{"uuid": GPU0, "name": "Tesla K80", "memory": 12 * GIB, "computeCapability": "3.7"}]
    })
    .to_string();
    let err = refused(
        &kepler,
        &["--memory-overcommit", "1.5", "--log-format", "text"],
    );
    for part in [
        "--memory-overcommit",
        "GPU 0",
        "Tesla K80",
        "compute capability 3.7",
        "on-demand paging",
    ] {
        assert!(err.contains(part), "missing {part:?} in: {err}");
    }
    // The same factor for another model is no refusal: the binary gets past the check and
    // stops only later, for want of an API server.
    let err = refused(&kepler, &["--memory-overcommit", "NVIDIA L40S=1.5"]);
    assert!(!err.contains("on-demand paging"), "{err}");
}

/// Writes an opted-in claim's memory entry on GPU1's board as its shim does, holding
/// `resident` bytes on the card, and keeps its process's lock while the returned file is open.
fn opted_in_claim_on_the_card(env: &Env, resident: u64) -> std::fs::File {
    use std::os::unix::fs::FileExt;
    use tessera_api::memory_board::*;
    let dir = env.path("state/boards").join(GPU1);
    std::fs::create_dir_all(&dir).expect("board dir");
    let path = dir.join("opted-in-claim.memory");
    std::fs::write(&path, vec![0u8; ENTRY_SIZE]).expect("board");
    let file = hold_lock(&path, 0, ENTRY_SIZE, false);
    for (offset, value) in [
        (CLAIM_OFFSET, 0x5eed),
        (LIMIT_OFFSET, 48 * GIB),
        (FLAGS_OFFSET, FLAG_SPILLS),
        (RESIDENT_OFFSET, resident),
    ] {
        file.write_all_at(&value.to_ne_bytes(), offset as u64)
            .expect("entry");
    }
    file
}

fn reserved(env: &Env) -> String {
    std::fs::read_to_string(
        env.path("state/reservations")
            .join(format!("{GPU1}.reserved")),
    )
    .expect("reservation")
}

#[tokio::test]
async fn a_claim_that_may_not_spill_waits_until_the_card_has_its_share() {
    let env = Env::new(&["v1"]);
    let instance = env.start_with(l40s_doubled(&env), None, None).await;
    // An opted-in claim holds 40 of the L40S's 48 GiB on the card.
    let board = opted_in_claim_on_the_card(&env, 40 * GIB);
    let id = uid(0x300);
    env.api.put(claim(
        "team-a",
        "fixed",
        &id,
        Some(vec![share(
            "gpu",
            "gpu-1",
            "9f0c4c4e-1111-4000-8000-000000000300",
            "16Gi",
            "10",
        )]),
        vec![],
    ));
    let fixed = Claim::new("team-a", "fixed", &id);
    let answer = instance
        .kubelet
        .prepare(Version::V1, std::slice::from_ref(&fixed))
        .await
        .expect("prepare call");
    let error = &answer[&id].error;
    for part in [
        GPU1,
        "8.00 GiB free for claims that may not spill",
        "40.00 GiB of 48.00 GiB held by claims that opted in",
        "needs 16.00 GiB",
    ] {
        assert!(error.contains(part), "{part:?} in {error}");
    }
    env.assert_clean(&id);
    assert_eq!(
        reserved(&env),
        format!("{}\n", 16 * GIB),
        "while it waits, the opted-in claims leave its share alone"
    );
    let metrics = instance.metrics.encode().expect("metrics");
    assert!(
        metrics.contains("tessera_prepare_refusals_total{reason=\"card_room\"} 1"),
        "the wait is counted as a refusal: {metrics}"
    );

    // The opted-in claim frees 8 GiB: 16 are free, the retry prepares it.
    use std::os::unix::fs::FileExt;
    board
        .write_all_at(
            &(32 * GIB).to_ne_bytes(),
            tessera_api::memory_board::RESIDENT_OFFSET as u64,
        )
        .expect("free 8 GiB");
    instance.kubelet.prepare_ok(Version::V1, &fixed).await;
    env.assert_prepared(&id);
    assert_eq!(reserved(&env), format!("{}\n", 16 * GIB));
    instance.kubelet.unprepare_ok(Version::V1, &fixed).await;
    assert_eq!(reserved(&env), "0\n");

    // A claim held back that the kubelet then unprepares stops holding the card; one whose
    // opted-in neighbour is gone (its process died) is prepared at once.
    board
        .write_all_at(
            &(40 * GIB).to_ne_bytes(),
            tessera_api::memory_board::RESIDENT_OFFSET as u64,
        )
        .expect("take 8 GiB again");
    let answer = instance
        .kubelet
        .prepare(Version::V1, std::slice::from_ref(&fixed))
        .await
        .expect("prepare call");
    assert!(
        !answer[&id].error.is_empty(),
        "32 + 16 > 48 - 0: still held back"
    );
    assert_eq!(reserved(&env), format!("{}\n", 16 * GIB));
    instance.kubelet.unprepare_ok(Version::V1, &fixed).await;
    assert_eq!(reserved(&env), "0\n");
    drop(board);
    instance.kubelet.prepare_ok(Version::V1, &fixed).await;
    env.assert_prepared(&id);
    instance.stop().await;
}

#[tokio::test]
async fn a_claim_prepared_again_after_a_crash_does_not_wait_for_itself() {
    // The first preparation dies right after writing the claim's config: the config says the
    // claim is owed 40 of the L40S's 48 GiB. Prepared again, that must not count as another
    // claim's reservation, or the claim would wait for itself forever.
    let env = Env::new(&["v1"]);
    let id = uid(0x400);
    env.api.put(claim(
        "team-a",
        "big",
        &id,
        Some(vec![share(
            "gpu",
            "gpu-1",
            "9f0c4c4e-1111-4000-8000-000000000400",
            "40Gi",
            "10",
        )]),
        vec![],
    ));
    let big = Claim::new("team-a", "big", &id);
    let crash: tessera_kubelet_plugin::node::FaultHook =
        std::sync::Arc::new(|step, _| step == tessera_kubelet_plugin::Step::ConfigWritten);
    let crashing = env.start_with(l40s_doubled(&env), None, Some(crash)).await;
    crashing
        .kubelet
        .prepare(Version::V1, std::slice::from_ref(&big))
        .await
        .expect_err("crashed after the config");
    crashing.stop().await;
    assert!(env.claim_dir(&id).join("config.json").exists());

    let restarted = env.start_with(l40s_doubled(&env), None, None).await;
    restarted.kubelet.prepare_ok(Version::V1, &big).await;
    env.assert_prepared(&id);
    assert_eq!(reserved(&env), format!("{}\n", 40 * GIB));
    restarted.stop().await;
}
