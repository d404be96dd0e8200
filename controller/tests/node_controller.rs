//! The per-node slice controller against the real kube-apiserver: `auto` picks the best mode the
//! server keeps, falls back (with an Event) when a gated field is dropped, repairs slices that
//! someone else edits or deletes, and taints an unhealthy GPU's devices where the server keeps
//! device taints (withdrawing them elsewhere).

mod common;

use std::time::Duration;

use common::*;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::json;
use tessera_controller::node::{ModeSetting, NodeController, NodeControllerConfig, NodeStatus};
use tessera_controller::publish::{Publisher, slice_resource};
use tessera_controller::{ApiVersion, SharingMode};
use tessera_driver::health::{NodeGpus, TAINT_XID, Taint, TaintEffect, Unhealthy};
use tokio::sync::watch;

const NODE: &str = "gpu-node-auto";

async fn run_auto(
    c: &Cluster,
) -> (
    watch::Receiver<NodeStatus>,
    watch::Sender<NodeGpus>,
    tokio::task::JoinHandle<()>,
) {
    create_ready_node(&c.cp.client(), NODE).await;
    let (inv_tx, inv_rx) = watch::channel(NodeGpus::from(inventory()));
    let mut config = NodeControllerConfig::new(NODE, ModeSetting::Auto);
    config.resync = Duration::from_secs(3600);
    let (controller, status) = NodeController::new(c.cp.client(), config, inv_rx);
    (status, inv_tx, tokio::spawn(controller.run()))
}

async fn wait_mode(status: &watch::Receiver<NodeStatus>, mode: SharingMode) -> NodeStatus {
    eventually(&format!("mode {mode:?}"), Duration::from_secs(60), || {
        let s = status.borrow().clone();
        async move { (s.mode == Some(mode) && s.last_error.is_none()).then_some(s) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_auto_publishes_consumable_and_repairs() {
    let Some(c) = start(37, "v1_37_auto", &[]).await else {
        return;
    };
    let (status, inv_tx, task) = run_auto(&c).await;
    let first = wait_mode(&status, SharingMode::Consumable).await;
    assert_eq!(first.version, Some(ApiVersion::V1));
    let publisher = Publisher::new(c.cp.client(), NODE, ApiVersion::V1);
    let api: Api<DynamicObject> = Api::all_with(c.cp.client(), &slice_resource(ApiVersion::V1));
    let name = publisher
        .existing()
        .await
        .expect("list")
        .into_keys()
        .next()
        .expect("a slice");

    // Someone deletes our slice: it comes back.
    api.delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
    eventually("slice re-created", Duration::from_secs(30), || {
        let api = api.clone();
        let name = name.clone();
        async move { api.get_opt(&name).await.ok().flatten().map(|_| ()) }
    })
    .await;

    // Someone edits a device's capacity: it is repaired, with a new generation.
    let before = status.borrow().generation;
    let patch = json!({ "spec": { "devices": [{ "name": "gpu-0", "capacity": { "memory": { "value": "1Gi" } } }] } });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    eventually("slice repaired", Duration::from_secs(30), || {
        let status = status.clone();
        let api = api.clone();
        let name = name.clone();
        async move {
            let got = serde_json::to_value(api.get(&name).await.ok()?).ok()?;
            let memory = got["spec"]["devices"][0]["capacity"]["memory"]["value"].as_str()?;
            let memory = tessera_driver::quantity::parse(memory).ok()?;
            (memory == 24 << 30 && status.borrow().generation > before).then_some(())
        }
    })
    .await;

    // A GPU goes away (unhealthy, removed): the pool shrinks to one device.
    let mut smaller = inventory();
    smaller.gpus.truncate(1);
    inv_tx.send(smaller.into()).expect("send");
    eventually("pool shrinks", Duration::from_secs(30), || {
        let publisher = publisher.clone();
        async move {
            let slices = publisher.existing().await.ok()?;
            let devices: usize = slices
                .values()
                .map(|s| s["spec"]["devices"].as_array().map_or(0, Vec::len))
                .sum();
            (devices == 1).then_some(())
        }
    })
    .await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_auto_falls_back_when_consumable_capacity_is_off() {
    let Some(c) = start(37, "v1_37_fallback", &[("DRAConsumableCapacity", false)]).await else {
        return;
    };
    let (status, _inv, task) = run_auto(&c).await;
    wait_mode(&status, SharingMode::Partitioned).await;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(c.cp.client(), "default");
    let fallback = eventually("fallback Event", Duration::from_secs(30), || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("SharingModeFallback"))
        }
    })
    .await;
    let note = fallback.note.unwrap_or_default();
    eprintln!("fallback Event: {note}");
    assert!(
        note.contains("allowMultipleAllocations") && note.contains("partitioned"),
        "{note}"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_31_auto_publishes_fixed() {
    let Some(c) = start(31, "v1_31_auto", &[]).await else {
        return;
    };
    let (status, inv_tx, task) = run_auto(&c).await;
    let s = wait_mode(&status, SharingMode::Fixed { slices: 4 }).await;
    assert_eq!(s.version, Some(ApiVersion::V1alpha3));
    assert!(!s.taints_kept, "v1alpha3 has no device taints");
    // An unhealthy GPU's devices are withdrawn: only GPU 0's four slices stay.
    let publisher = Publisher::new(c.cp.client(), NODE, ApiVersion::V1alpha3);
    inv_tx.send(gpu_1_after_xid_79()).expect("send");
    eventually("GPU 1 withdrawn", Duration::from_secs(30), || {
        let publisher = publisher.clone();
        async move {
            let devices = published_taints(&publisher).await?;
            (devices.len() == 4 && devices.iter().all(|(n, _)| n.starts_with("gpu-0")))
                .then_some(())
        }
    })
    .await;
    task.abort();
}

/// GPU 1 of [`inventory`] after critical XID 79.
fn gpu_1_after_xid_79() -> NodeGpus {
    let mut gpus = NodeGpus::from(inventory());
    let uuid = gpus.known.gpus[1].uuid.clone();
    gpus.unhealthy.insert(
        uuid,
        Unhealthy {
            reason: "critical XID 79".into(),
            taint: Taint {
                key: TAINT_XID,
                value: "79".into(),
                effect: TaintEffect::NoExecute,
            },
        },
    );
    gpus
}

/// Device name → its taints, over the node's published slices.
async fn published_taints(publisher: &Publisher) -> Option<Vec<(String, serde_json::Value)>> {
    let slices = publisher.existing().await.ok()?;
    Some(
        slices
            .values()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .map(|d| {
                (
                    d["name"].as_str().unwrap_or("?").to_string(),
                    d["taints"].clone(),
                )
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_taints_an_unhealthy_gpu() {
    let Some(c) = start(37, "v1_37_taints", &[]).await else {
        return;
    };
    let (status, inv_tx, task) = run_auto(&c).await;
    wait_mode(&status, SharingMode::Consumable).await;
    let publisher = Publisher::new(c.cp.client(), NODE, ApiVersion::V1);
    inv_tx.send(gpu_1_after_xid_79()).expect("send");
    let devices = eventually("GPU 1 tainted", Duration::from_secs(30), || {
        let publisher = publisher.clone();
        async move {
            let devices = published_taints(&publisher).await?;
            devices.iter().any(|(_, t)| !t.is_null()).then_some(devices)
        }
    })
    .await;
    assert_eq!(devices.len(), 2, "the GPU stays published: {devices:?}");
    let (name, taints) = &devices[1];
    assert_eq!(name, "gpu-1");
    assert_eq!(taints[0]["key"], "gpu.tessera.dev/xid", "{taints}");
    assert_eq!(taints[0]["value"], "79", "{taints}");
    assert_eq!(taints[0]["effect"], "NoExecute", "{taints}");
    assert!(
        taints[0]["timeAdded"].is_string(),
        "the server stamps it: {taints}"
    );
    assert!(devices[0].1.is_null(), "GPU 0 stays untainted: {devices:?}");
    let published = status.borrow().clone();
    assert!(
        published.taints_kept && published.tainted == 1,
        "{published:?}"
    );
    // The server's timeAdded is no difference: nothing is rewritten.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status.borrow().generation, published.generation);
    assert_eq!(status.borrow().writes, published.writes);

    // Healthy again: the taint goes.
    inv_tx.send(NodeGpus::from(inventory())).expect("send");
    eventually("taint lifted", Duration::from_secs(30), || {
        let publisher = publisher.clone();
        async move {
            let devices = published_taints(&publisher).await?;
            (devices.len() == 2 && devices.iter().all(|(_, t)| t.is_null())).then_some(())
        }
    })
    .await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_withdraws_an_unhealthy_gpu_when_taints_are_off() {
    let gates = [("DRADeviceTaints", false), ("DRADeviceTaintRules", false)];
    let Some(c) = start(37, "v1_37_no_taints", &gates).await else {
        return;
    };
    let (status, inv_tx, task) = run_auto(&c).await;
    wait_mode(&status, SharingMode::Consumable).await;
    let publisher = Publisher::new(c.cp.client(), NODE, ApiVersion::V1);
    inv_tx.send(gpu_1_after_xid_79()).expect("send");
    eventually("GPU 1 withdrawn", Duration::from_secs(30), || {
        let publisher = publisher.clone();
        let status = status.clone();
        async move {
            let devices = published_taints(&publisher).await?;
            let names: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
            (names == ["gpu-0"] && !status.borrow().taints_kept).then_some(())
        }
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(c.cp.client(), "default");
    let dropped = eventually("DeviceTaintsDropped Event", Duration::from_secs(30), || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("DeviceTaintsDropped"))
        }
    })
    .await;
    assert!(
        dropped.note.unwrap_or_default().contains("withdrawing"),
        "the Event says what happens instead"
    );
    task.abort();
}
