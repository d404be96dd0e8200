//! Prepare and unprepare through the real gRPC protocol of every kubelet version, against every
//! `resource.k8s.io` version an API server may serve; error cases; idempotency; unprepare of a
//! claim that is gone from the API server.

mod support;

use std::os::unix::fs::PermissionsExt;

use serde_json::json;
use support::kubelet::{ALL_VERSIONS, get_info};
use support::*;
use tessera_api::Priority;
use tessera_api::names::HIGH_PRIORITY_NAMESPACE_LABEL;

const NS: &str = "team-a";

fn uid(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000")
}

#[tokio::test]
async fn every_kubelet_version_against_every_api_version() {
    for api in ["v1", "v1beta2", "v1beta1", "v1alpha3"] {
        for (i, version) in ALL_VERSIONS.into_iter().enumerate() {
            let env = Env::new(&[api]);
            let instance = env.start(None, None).await;
            let id = uid(i as u32 + 1);
            // 1.31 (v1alpha3) has no consumable capacity: a fixed slice there, a share elsewhere.
            let results = if api == "v1alpha3" {
                vec![result("gpu", "gpu-0-slice-1of4")]
            } else {
                vec![share(
                    "gpu",
                    "gpu-1",
                    "9f0c4c4e-1111-4000-8000-000000000001",
                    "2Gi",
                    "25",
                )]
            };
            env.api
                .put(claim(NS, "inference", &id, Some(results), vec![]));
            let claim = Claim::new(NS, "inference", &id);
            let devices = instance.kubelet.prepare_ok(version, &claim).await;
            assert_eq!(devices.len(), 1, "{api} {version:?}");
            let device = &devices[0];
            assert_eq!(
                (device.pool_name.as_str(), device.request_names.clone()),
                (NODE, vec!["gpu".to_string()])
            );
            let config = env.assert_prepared(&id);
            assert_eq!(config.region, "/etc/tessera/region");
            if api == "v1alpha3" {
                assert_eq!(device.device_name, "gpu-0-slice-1of4");
                assert_eq!(
                    (
                        config.devices[0].uuid.as_str(),
                        config.devices[0].memory_limit,
                        config.devices[0].cores
                    ),
                    (GPU0, 6 * GIB, 25)
                );
                assert_eq!(
                    device.cdi_device_ids,
                    vec![
                        format!("gpu.tessera.dev/claim={id}-gpu-0-slice-1of4"),
                        format!("nvidia.com/gpu={GPU0}"),
                        format!("gpu.tessera.dev/claim={id}-metadata-gpu"),
                    ]
                );
            } else {
                assert_eq!(
                    (
                        config.devices[0].uuid.as_str(),
                        config.devices[0].memory_limit,
                        config.devices[0].cores
                    ),
                    (GPU1, 2 * GIB, 25)
                );
                let expected_share = (version == Version::V1)
                    .then(|| "9f0c4c4e-1111-4000-8000-000000000001".to_string());
                assert_eq!(device.share_id, expected_share, "share_id is a v1 field");
                assert_eq!(
                    device.cdi_device_ids[0],
                    format!(
                        "gpu.tessera.dev/claim={id}-gpu-1-9f0c4c4e-1111-4000-8000-000000000001"
                    )
                );
            }
            let region = env.claim_dir(&id).join("region");
            assert_eq!(
                std::fs::metadata(&region)
                    .expect("region")
                    .permissions()
                    .mode()
                    & 0o777,
                0o666
            );
            assert!(
                env.api
                    .requests()
                    .iter()
                    .any(|p| p.starts_with(&format!("/apis/resource.k8s.io/{api}/"))),
                "read in {api}"
            );

            instance.kubelet.unprepare_ok(version, &claim).await;
            env.assert_clean(&id);
            instance.stop().await;
        }
    }
}

#[tokio::test]
async fn registration_advertises_every_version_newest_first() {
    let env = Env::new(&["v1"]);
    let instance = env.start(Some("pod-uid-1"), None).await;
    assert!(
        instance
            .sockets
            .registration
            .ends_with("gpu.tessera.dev-pod-uid-1-reg.sock")
    );
    assert!(instance.sockets.dra.ends_with("dra-pod-uid-1.sock"));
    let info = get_info(&instance.sockets.registration).await;
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, "gpu.tessera.dev");
    assert_eq!(info.endpoint, instance.sockets.dra.display().to_string());
    assert_eq!(
        info.supported_versions,
        vec![
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1alpha3.Node",
            "1.0.0"
        ]
    );
    instance.stop().await;
    assert!(
        !env.path("registry/gpu.tessera.dev-pod-uid-1-reg.sock")
            .exists(),
        "sockets removed on stop"
    );
}

#[tokio::test]
async fn every_error_is_reported_per_claim_and_names_its_cause() {
    let env = Env::new(&["v1"]);
    let instance = env.start(None, None).await;
    let theirs =
        json!({"request": "gpu", "driver": "gpu.nvidia.com", "pool": NODE, "device": "gpu-0"});
    env.api.put(claim(
        NS,
        "good",
        &uid(1),
        Some(vec![theirs.clone(), result("gpu", "gpu-0")]),
        vec![],
    ));
    env.api.put(claim(
        NS,
        "replaced",
        "ffffffff-0000-4000-8000-000000000000",
        Some(vec![result("gpu", "gpu-0")]),
        vec![],
    ));
    env.api.put(claim(NS, "pending", &uid(3), None, vec![]));
    env.api.put(claim(
        NS,
        "bad-config",
        &uid(4),
        Some(vec![result("gpu", "gpu-1")]),
        vec![config_entry(
            "FromClaim",
            &["gpu"],
            json!({"priority": "urgent"}),
        )],
    ));
    env.api.put(claim(
        NS,
        "only-theirs",
        &uid(6),
        Some(vec![theirs]),
        vec![],
    ));
    env.api.put(claim(
        NS,
        "unknown-gpu",
        &uid(7),
        Some(vec![result("gpu", "gpu-9")]),
        vec![],
    ));
    let claims = [
        Claim::new(NS, "good", &uid(1)),
        Claim::new(NS, "replaced", &uid(2)),
        Claim::new(NS, "pending", &uid(3)),
        Claim::new(NS, "bad-config", &uid(4)),
        Claim::new(NS, "missing", &uid(5)),
        Claim::new(NS, "only-theirs", &uid(6)),
        Claim::new(NS, "unknown-gpu", &uid(7)),
        Claim::new(NS, "evil", "../../etc"),
    ];
    for version in ALL_VERSIONS {
        let answer = instance
            .kubelet
            .prepare(version, &claims)
            .await
            .expect("call succeeds");
        assert_eq!(answer.len(), claims.len(), "an entry for every claim");
        let error = |n: u32| answer[&uid(n)].error.clone();
        assert_eq!(error(1), "");
        assert_eq!(
            answer[&uid(1)].devices.len(),
            1,
            "the other driver's result is not ours"
        );
        assert!(
            error(2).contains("replaced") && error(2).contains(&uid(2)),
            "{}",
            error(2)
        );
        assert!(error(3).contains("not allocated"), "{}", error(3));
        assert!(
            error(4).contains("priority") && error(4).contains("urgent"),
            "{}",
            error(4)
        );
        assert!(
            error(5).contains("team-a/missing not found"),
            "{}",
            error(5)
        );
        assert!(
            error(6).contains("no devices of driver gpu.tessera.dev"),
            "{}",
            error(6)
        );
        assert!(error(7).contains("GPU index 9"), "{}", error(7));
        assert!(answer["../../etc"].error.contains("not a Kubernetes UID"));
    }
    for n in [2, 3, 4, 5, 6, 7] {
        env.assert_clean(&uid(n));
    }
    let unprepared = instance
        .kubelet
        .unprepare(Version::V1, &claims)
        .await
        .expect("call succeeds");
    assert!(unprepared["../../etc"].contains("not a Kubernetes UID"));
    instance.stop().await;
}

#[tokio::test]
async fn claim_and_class_config_reach_the_shim_config() {
    let env = Env::new(&["v1"]);
    let instance = env.start(None, None).await;
    let config = vec![
        config_entry(
            "FromClass",
            &[],
            json!({"priority": "low", "corePolicy": "force"}),
        ),
        config_entry(
            "FromClaim",
            &["gpu"],
            json!({"priority": "high", "oversubscribe": true}),
        ),
    ];
    env.api
        .label_namespace(NS, HIGH_PRIORITY_NAMESPACE_LABEL, "true");
    env.api.put(claim(
        NS,
        "tuned",
        &uid(1),
        Some(vec![
            result("gpu", "gpu-0"),
            result("gpu", "gpu-1-mem-4096mi-0"),
        ]),
        config,
    ));
    instance
        .kubelet
        .prepare_ok(Version::V1, &Claim::new(NS, "tuned", &uid(1)))
        .await;
    let shim = env.assert_prepared(&uid(1));
    assert_eq!(shim.priority, Priority::High, "the claim's entry wins");
    assert!(shim.oversubscribe);
    assert_eq!(
        shim.core_policy,
        tessera_api::CorePolicy::Default,
        "whole entries win, not fields"
    );
    let limits: Vec<_> = shim
        .devices
        .iter()
        .map(|d| (d.uuid.as_str(), d.memory_limit, d.cores))
        .collect();
    assert_eq!(limits, vec![(GPU0, 24 * GIB, 100), (GPU1, 4 * GIB, 9)]);
    instance.stop().await;
}

/// A tenant cannot promote its own claim: `priority: high` in the claim's config needs the
/// namespace label only the cluster admin can set; from a DeviceClass's config it is the admin's
/// own word. Before the rule, "self-promoted" was prepared with high priority like the others.
#[tokio::test]
async fn high_priority_is_the_admins_to_grant() {
    let env = Env::new(&["v1"]);
    let instance = env.start(None, None).await;
    let high = json!({"priority": "high"});
    let put = |name: &str, n: u32, source: &str| {
        env.api.put(claim(
            NS,
            name,
            &uid(n),
            Some(vec![result("gpu", "gpu-0")]),
            vec![config_entry(source, &["gpu"], high.clone())],
        ));
    };
    put("self-promoted", 1, "FromClaim");
    put("from-the-class", 2, "FromClass");
    let promoted = Claim::new(NS, "self-promoted", &uid(1));
    let answer = instance
        .kubelet
        .prepare(Version::V1, std::slice::from_ref(&promoted))
        .await
        .expect("call succeeds");
    let error = &answer[&uid(1)].error;
    assert!(
        error.contains("only the cluster admin may grant high priority")
            && error.contains(&format!("{HIGH_PRIORITY_NAMESPACE_LABEL}=true"))
            && error.contains(&format!("{NS}/self-promoted")),
        "{error}"
    );
    env.assert_clean(&uid(1));

    instance
        .kubelet
        .prepare_ok(Version::V1, &Claim::new(NS, "from-the-class", &uid(2)))
        .await;
    assert_eq!(env.assert_prepared(&uid(2)).priority, Priority::High);

    // The admin grants it: the kubelet's retry prepares the claim.
    env.api
        .label_namespace(NS, HIGH_PRIORITY_NAMESPACE_LABEL, "true");
    instance.kubelet.prepare_ok(Version::V1, &promoted).await;
    assert_eq!(env.assert_prepared(&uid(1)).priority, Priority::High);
    // Taking the grant back leaves a prepared claim as its containers were started.
    env.api
        .label_namespace(NS, HIGH_PRIORITY_NAMESPACE_LABEL, "false");
    instance.kubelet.prepare_ok(Version::V1, &promoted).await;
    instance.kubelet.unprepare_ok(Version::V1, &promoted).await;
    let answer = instance
        .kubelet
        .prepare(Version::V1, std::slice::from_ref(&promoted))
        .await
        .expect("call succeeds");
    assert!(
        answer[&uid(1)].error.contains("only the cluster admin"),
        "prepared afresh, the grant is checked again: {:?}",
        answer[&uid(1)]
    );
    instance.stop().await;
}

#[tokio::test]
async fn prepare_and_unprepare_are_idempotent() {
    let env = Env::new(&["v1"]);
    let instance = env.start(None, None).await;
    let id = uid(1);
    env.api.put(claim(
        NS,
        "c",
        &id,
        Some(vec![share(
            "gpu",
            "gpu-0",
            "9f0c4c4e-1111-4000-8000-000000000001",
            "1Gi",
            "10",
        )]),
        vec![],
    ));
    let claim = Claim::new(NS, "c", &id);
    let first = instance.kubelet.prepare_ok(Version::V1, &claim).await;
    // A process of the claim has charged the region; preparing again must not reset it.
    let region = env.claim_dir(&id).join("region");
    let mut bytes = std::fs::read(&region).expect("region");
    bytes[tessera_api::region::slot_offset(0) + 64] = 0x2a;
    std::fs::write(&region, &bytes).expect("charge");
    let checkpoint = std::fs::read(env.path("state/checkpoint.json")).expect("checkpoint");
    for version in ALL_VERSIONS {
        let again = instance.kubelet.prepare_ok(version, &claim).await;
        assert_eq!(
            again.iter().map(|d| &d.cdi_device_ids).collect::<Vec<_>>(),
            first.iter().map(|d| &d.cdi_device_ids).collect::<Vec<_>>()
        );
    }
    assert_eq!(
        std::fs::read(&region).expect("region"),
        bytes,
        "the region was not rewritten"
    );
    assert_eq!(
        std::fs::read(env.path("state/checkpoint.json")).expect("checkpoint"),
        checkpoint,
        "nothing rewritten"
    );

    // A lost CDI spec (say /var/run/cdi emptied) is restored, the region still kept.
    std::fs::remove_file(env.spec_path(&id)).expect("remove spec");
    instance.kubelet.prepare_ok(Version::V1, &claim).await;
    env.assert_prepared(&id);
    assert_eq!(std::fs::read(&region).expect("region"), bytes);

    instance.kubelet.unprepare_ok(Version::V1, &claim).await;
    instance
        .kubelet
        .unprepare_ok(Version::V1beta1, &claim)
        .await;
    instance
        .kubelet
        .unprepare_ok(Version::V1alpha3, &Claim::new(NS, "never", &uid(9)))
        .await;
    env.assert_clean(&id);
    instance.stop().await;
}

#[tokio::test]
async fn unprepare_works_after_the_claim_is_deleted() {
    let env = Env::new(&["v1"]);
    let instance = env.start(None, None).await;
    let id = uid(1);
    env.api.put(claim(
        NS,
        "gone",
        &id,
        Some(vec![result("gpu", "gpu-1")]),
        vec![],
    ));
    let claim = Claim::new(NS, "gone", &id);
    instance.kubelet.prepare_ok(Version::V1, &claim).await;
    env.api.delete(NS, "gone");
    let requests = env.api.requests().len();
    instance.kubelet.unprepare_ok(Version::V1, &claim).await;
    // Nothing is read: the only requests after it are the status writer's, off the kubelet's
    // path, which finds the claim gone.
    let after = env.api.requests().split_off(requests);
    assert!(
        after
            .iter()
            .all(|p| p.ends_with("/resourceclaims/gone/status")),
        "unprepare does not read from the API server: {after:?}"
    );
    env.assert_clean(&id);
    instance.stop().await;
}

#[tokio::test]
async fn a_reboot_prepares_claims_afresh() {
    let env = Env::new(&["v1"]);
    let id = uid(1);
    env.api.put(claim(
        NS,
        "c",
        &id,
        Some(vec![result("gpu", "gpu-0")]),
        vec![],
    ));
    let claim = Claim::new(NS, "c", &id);
    let instance = env.start(None, None).await;
    instance.kubelet.prepare_ok(Version::V1, &claim).await;
    instance.stop().await;
    // After a reboot /var/run/cdi is empty and no process holds the region.
    std::fs::remove_file(env.spec_path(&id)).expect("tmpfs emptied");
    let region = env.claim_dir(&id).join("region");
    std::fs::write(&region, b"stale").expect("stale region");
    let mut config = env.node_config();
    config.boot_id = "boot-2".into();
    let instance = env.start_with(config, None, None).await;
    instance.kubelet.prepare_ok(Version::V1, &claim).await;
    env.assert_prepared(&id);
    assert_eq!(env.checkpoint().claims[&id].boot_id, "boot-2");
    instance.stop().await;
}

#[tokio::test]
async fn a_prepared_claim_is_kept_when_the_plugin_would_now_prepare_it_differently() {
    let env = Env::new(&["v1"]);
    let id = uid(1);
    env.api.put(claim(
        NS,
        "c",
        &id,
        Some(vec![result("gpu", "gpu-0-slice-0of2")]),
        vec![],
    ));
    let claim = Claim::new(NS, "c", &id);
    let instance = env.start(None, None).await;
    let first = instance.kubelet.prepare_ok(Version::V1, &claim).await;
    instance.stop().await;
    let config_before = std::fs::read(env.claim_dir(&id).join("config.json")).expect("config");
    let region_before = std::fs::read(env.claim_dir(&id).join("region")).expect("region");
    // An upgraded plugin sees a different card size: running containers keep what they got.
    let mut config = env.node_config();
    config.inventory.gpus[0].memory = 16 * GIB;
    let instance = env.start_with(config, None, None).await;
    let again = instance.kubelet.prepare_ok(Version::V1, &claim).await;
    assert_eq!(again, first);
    assert_eq!(
        std::fs::read(env.claim_dir(&id).join("config.json")).expect("config"),
        config_before
    );
    assert_eq!(
        std::fs::read(env.claim_dir(&id).join("region")).expect("region"),
        region_before
    );
    instance.kubelet.unprepare_ok(Version::V1, &claim).await;
    env.assert_clean(&id);
    instance.stop().await;
}

/// Admin access (KEP-5018): a claim whose results carry `adminAccess` gets its GPU as it is —
/// no shim, config, region or board entries (so no wall, and nothing any neighbour yields to or
/// counts) — and the metrics say so instead of showing a limit. A claim that mixes admin and
/// ordinary requests is refused, naming the rule.
#[tokio::test]
async fn admin_access_gets_the_gpu_without_a_wall_or_a_charge() {
    let env = Env::new(&["v1"]);
    let instance = env.start(None, None).await;
    let id = uid(1);
    let mut admin = share(
        "gpu",
        "gpu-1",
        "9f0c4c4e-1111-4000-8000-0000000000a1",
        "2Gi",
        "25",
    );
    admin["adminAccess"] = json!(true);
    env.api
        .put(claim(NS, "monitor", &id, Some(vec![admin.clone()]), vec![]));
    let monitor = Claim::new(NS, "monitor", &id);
    let devices = instance.kubelet.prepare_ok(Version::V1, &monitor).await;
    assert_eq!(devices.len(), 1);
    let spec_path = env.spec_path(&id);
    validate_spec(&spec_path);
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_path).expect("spec")).expect("spec json");
    let edits = &spec["containerEdits"];
    assert_eq!(
        edits["env"],
        json!(["TESSERA_ADMIN_ACCESS=true"]),
        "no shim config: {spec}"
    );
    assert!(
        !spec.to_string().contains("libtessera") && !spec.to_string().contains("ld.so.preload"),
        "no shim in an admin claim's containers: {spec}"
    );
    assert!(
        !env.claim_dir(&id).join("config.json").exists()
            && !env.claim_dir(&id).join("region").exists(),
        "no config or region"
    );
    assert_eq!(
        env.board_entries(&id),
        Vec::<String>::new(),
        "not on the board"
    );
    let metrics = instance.metrics.encode().expect("metrics");
    assert!(
        metrics.contains(&format!(
            r#"tessera_claim_admin_access{{namespace="{NS}",claim="monitor",claim_uid="{id}",gpu_uuid="{GPU1}"}} 1"#
        )),
        "{metrics}"
    );
    assert!(
        !metrics.contains("tessera_claim_memory_limit_bytes{"),
        "no wall to report: {metrics}"
    );
    // Repeated: the same answer; unprepared: nothing left.
    assert_eq!(
        instance.kubelet.prepare_ok(Version::V1, &monitor).await,
        devices
    );
    instance.kubelet.unprepare_ok(Version::V1, &monitor).await;
    env.assert_clean(&id);

    // Admin and ordinary requests in one claim: refused, with the rule.
    let mixed_id = uid(2);
    let ordinary = share(
        "other",
        "gpu-1",
        "9f0c4c4e-1111-4000-8000-0000000000a2",
        "2Gi",
        "25",
    );
    env.api.put(claim(
        NS,
        "mixed",
        &mixed_id,
        Some(vec![admin, ordinary]),
        vec![],
    ));
    let mixed = Claim::new(NS, "mixed", &mixed_id);
    let answer = instance
        .kubelet
        .prepare(Version::V1, std::slice::from_ref(&mixed))
        .await
        .expect("prepare call");
    assert!(
        answer[&mixed_id]
            .error
            .contains("mixes adminAccess requests"),
        "{:?}",
        answer[&mixed_id].error
    );
    env.assert_clean(&mixed_id);
    instance.stop().await;
}
