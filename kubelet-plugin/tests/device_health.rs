//! The `DRAResourceHealth` stream (both versions) as the kubelet reads it: advertised in
//! GetInfo only where health is watched; a report at once, after each prepare and unprepare,
//! and on each change of a GPU's health, each listing every prepared device with its GPU's
//! health and the timeout the kubelet is to apply. Wire compatibility with the real kubelet is
//! tested on the real node (`e2e/harness/tests/real_node`).

mod support;

use std::time::{Duration, SystemTime};

use support::kubelet::get_info;
use support::*;
use tessera_driver::health::{NodeGpus, TAINT_XID, Taint, TaintEffect, Unhealthy};
use tessera_kubelet_plugin::device_health::TIMEOUT;
use tessera_kubelet_plugin::proto::{health_v1, health_v1alpha1};
use tokio::sync::watch;
use tonic::Streaming;

const NS: &str = "team-a";
const UID: &str = "0000beef-0000-4000-8000-000000000000";
const SHARE_ID: &str = "9f0c4c4e-1111-4000-8000-000000000001";

/// The next report, within 5 s.
async fn next<T>(stream: &mut Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a report within 5 s")
        .expect("the stream answers")
        .expect("the stream stays open")
}

fn devices(report: &health_v1::NodeWatchResourcesResponse) -> Vec<(String, String, i32, String)> {
    report
        .devices
        .iter()
        .map(|d| {
            let id = d.device.clone().unwrap_or_default();
            (id.pool_name, id.device_name, d.health, d.message.clone())
        })
        .collect()
}

fn xid_79_on(gpus: &NodeGpus, uuid: &str) -> NodeGpus {
    let mut gpus = gpus.clone();
    gpus.unhealthy.insert(
        uuid.into(),
        Unhealthy {
            reason: "critical XID 79 (withdrawn until the plugin restarts, after a GPU reset)"
                .into(),
            taint: Taint {
                key: TAINT_XID,
                value: "79".into(),
                effect: TaintEffect::NoExecute,
            },
        },
    );
    gpus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubelet_hears_each_prepared_devices_health_and_every_change() {
    let env = Env::new(&["v1"]);
    let healthy = NodeGpus::from(env.inventory.clone());
    let (gpus, watched) = watch::channel(healthy.clone());
    let instance = env
        .start_watching_health(env.node_config(), None, None, Some(watched))
        .await;
    let info = get_info(&instance.sockets.registration).await;
    for service in ["v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth"] {
        assert!(
            info.supported_versions.iter().any(|v| v == service),
            "{service} advertised: {:?}",
            info.supported_versions
        );
    }

    let channel = kubelet::channel(&instance.sockets.dra).await;
    let mut v1 =
        health_v1::dra_resource_health_client::DraResourceHealthClient::new(channel.clone())
            .node_watch_resources(health_v1::NodeWatchResourcesRequest {})
            .await
            .expect("v1 stream")
            .into_inner();
    // Nothing prepared yet: an empty, complete list.
    assert_eq!(devices(&next(&mut v1).await), []);

    env.api.put(claim(
        NS,
        "inference",
        UID,
        Some(vec![share("gpu", "gpu-1", SHARE_ID, "2Gi", "25")]),
        vec![],
    ));
    let claim_ref = Claim::new(NS, "inference", UID);
    instance.kubelet.prepare_ok(Version::V1, &claim_ref).await;
    let report = next(&mut v1).await;
    let healthy_1 = (NODE.to_string(), "gpu-1".to_string(), 1, String::new());
    assert_eq!(devices(&report), [healthy_1]);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let device = &report.devices[0];
    assert!(
        (now - 5..=now).contains(&device.last_updated_time),
        "reported at {}, now {now}",
        device.last_updated_time
    );
    assert_eq!(
        device.health_check_timeout_seconds,
        TIMEOUT.as_secs() as i64
    );

    // A kubelet of 1.34–1.36 on v1alpha1 hears the same.
    let mut v1alpha1 =
        health_v1alpha1::dra_resource_health_client::DraResourceHealthClient::new(channel)
            .node_watch_resources(health_v1alpha1::NodeWatchResourcesRequest {})
            .await
            .expect("v1alpha1 stream")
            .into_inner();
    let old = next(&mut v1alpha1).await;
    assert_eq!(
        old.devices
            .iter()
            .map(|d| (d.device.clone().unwrap_or_default().device_name, d.health))
            .collect::<Vec<_>>(),
        [("gpu-1".to_string(), 1)]
    );

    // The L40S (gpu-1) has an XID 79: both streams hear it at once, with the reason.
    gpus.send_replace(xid_79_on(&healthy, GPU1));
    let report = next(&mut v1).await;
    let [(pool, device, health, message)] = &devices(&report)[..] else {
        panic!("one device: {report:?}")
    };
    assert_eq!(
        (pool.as_str(), device.as_str(), *health),
        (NODE, "gpu-1", 2)
    );
    assert_eq!(
        message,
        &format!(
            "GPU 1 ({GPU1}): critical XID 79 (withdrawn until the plugin restarts, after a GPU reset)"
        )
    );
    assert_eq!(next(&mut v1alpha1).await.devices[0].health, 2);
    let streams = instance.metrics.encode().expect("metrics");
    assert!(
        streams.contains("tessera_kubelet_health_streams 2"),
        "{streams}"
    );

    // Unprepared: the device leaves the list.
    instance.kubelet.unprepare_ok(Version::V1, &claim_ref).await;
    assert_eq!(devices(&next(&mut v1).await), []);

    // The kubelet hangs up: the stream's task ends.
    drop(v1);
    drop(v1alpha1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = instance.metrics.encode().expect("metrics");
        if metrics.contains("tessera_kubelet_health_streams 0") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the streams' tasks did not end: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    instance.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_health_checks_the_kubelet_is_not_offered_health() {
    let env = Env::new(&["v1"]);
    let instance = env.start(None, None).await;
    let info = get_info(&instance.sockets.registration).await;
    assert!(
        !info
            .supported_versions
            .iter()
            .any(|v| v.ends_with(".DRAResourceHealth")),
        "{:?}",
        info.supported_versions
    );
    let channel = kubelet::channel(&instance.sockets.dra).await;
    let refused = health_v1::dra_resource_health_client::DraResourceHealthClient::new(channel)
        .node_watch_resources(health_v1::NodeWatchResourcesRequest {})
        .await
        .expect_err("no health service");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused}");
    instance.stop().await;
}
