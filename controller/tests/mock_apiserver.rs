//! The slice controller against an in-process API server responder, as scenarios: an API server
//! that is down at first (retried with backoff, no exit), one that drops gated fields (auto falls
//! back), and the publisher's writes (create, no-op re-sync, delete of obsolete slices).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tessera_controller::node::{ModeSetting, NodeController, NodeControllerConfig};
use tessera_controller::publish::Publisher;
use tessera_controller::slices::{CounterLayout, build_pool};
use tessera_controller::{ApiVersion, SharingMode};
use tessera_driver::health::NodeGpus;
use tessera_driver::{Gpu, Inventory};

#[derive(Default)]
struct State {
    /// Requests to fail with 503 before answering.
    down_for: usize,
    /// When each of those 503s was answered.
    refused_at: Vec<std::time::Instant>,
    /// Strip these device fields on write, as a server with the gate off does.
    drop_fields: Vec<&'static str>,
    slices: BTreeMap<String, Value>,
    requests: Vec<String>,
    events: Vec<Value>,
    rv: u64,
}

type Shared = Arc<Mutex<State>>;

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
        .expect("response")
}

fn status(code: u16, reason: &str) -> Response<Body> {
    respond(
        StatusCode::from_u16(code).expect("code"),
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason}),
    )
}

async fn handle(state: Shared, req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let bytes = http_body_util::BodyExt::collect(body)
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or_default().to_string();
    if query.contains("watch=true") {
        // No events: the watch ends, and the watcher re-lists after its backoff.
        tokio::time::sleep(Duration::from_millis(200)).await;
        return Ok(Response::builder()
            .status(200)
            .body(Body::from(Vec::new()))
            .expect("response"));
    }
    let mut s = state.lock().expect("lock");
    s.requests.push(format!("{} {path}?{query}", parts.method));
    if s.down_for > 0 {
        s.down_for -= 1;
        s.refused_at.push(std::time::Instant::now());
        return Ok(status(503, "ServiceUnavailable"));
    }
    const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";
    let r = match (&parts.method, path.as_str()) {
        (&Method::GET, "/apis") => respond(
            StatusCode::OK,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": "resource.k8s.io", "versions": [{"groupVersion": "resource.k8s.io/v1", "version": "v1"}], "preferredVersion": {"groupVersion": "resource.k8s.io/v1", "version": "v1"}}]}),
        ),
        (&Method::GET, "/apis/resource.k8s.io/v1") => respond(
            StatusCode::OK,
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "resource.k8s.io/v1", "resources": [
            {"name": "resourceslices", "singularName": "resourceslice", "namespaced": false, "kind": "ResourceSlice", "verbs": ["create", "delete", "get", "list", "update", "watch"]}]}),
        ),
        (&Method::GET, "/version") => respond(
            StatusCode::OK,
            json!({"major": "1", "minor": "37", "gitVersion": "v1.37.1", "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "", "platform": ""}),
        ),
        (&Method::GET, p) if p.starts_with("/api/v1/nodes/") => status(404, "NotFound"),
        (&Method::GET, SLICES) => {
            let items: Vec<Value> = s.slices.values().cloned().collect();
            respond(
                StatusCode::OK,
                json!({"kind": "ResourceSliceList", "apiVersion": "resource.k8s.io/v1", "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        (&Method::POST, SLICES) | (&Method::PUT, _) if path.starts_with(SLICES) => {
            let mut obj: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let drop_fields = s.drop_fields.clone();
            for d in obj["spec"]["devices"].as_array_mut().into_iter().flatten() {
                for f in &drop_fields {
                    if let Some(o) = d.as_object_mut() {
                        o.remove(*f);
                    }
                }
            }
            s.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            s.slices.insert(name, obj.clone());
            respond(
                if parts.method == Method::POST {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                obj,
            )
        }
        (&Method::DELETE, p) if p.starts_with(SLICES) => {
            let name = p.rsplit('/').next().unwrap_or_default().to_string();
            match s.slices.remove(&name) {
                Some(_) => respond(
                    StatusCode::OK,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                ),
                None => status(404, "NotFound"),
            }
        }
        (&Method::POST, p) if p.ends_with("/events") => {
            let ev: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            s.events.push(ev.clone());
            respond(StatusCode::CREATED, ev)
        }
        _ => status(404, "NotFound"),
    };
    Ok(r)
}

fn client(state: &Shared) -> kube::Client {
    let state = state.clone();
    let service = tower::service_fn(move |req| handle(state.clone(), req));
    kube::Client::new(service, "default")
}

fn inventory(n: u32) -> Inventory {
    Inventory {
        driver_version: Some("570.86.15".into()),
        gpus: (0..n)
            .map(|i| Gpu {
                uuid: format!("GPU-{i}"),
                index: i,
                minor: i,
                product_name: "NVIDIA L40S".into(),
                memory: 48 << 30,
                brand: None,
                architecture: None,
                cuda_compute_capability: Some("8.9".into()),
                pci_bus_id: None,
                pcie_root: None,
                numa_node: None,
                context_overhead: 0,
                driver_memory_wall: false,
            })
            .collect(),
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 15 s");
}

#[tokio::test]
async fn publisher_creates_then_resync_is_a_noop_then_shrinks() {
    let state = Shared::default();
    let publisher = Publisher::new(client(&state), "node-a", ApiVersion::V1);
    let plan = build_pool(
        &inventory(8),
        "node-a",
        SharingMode::Partitioned,
        CounterLayout::Separate,
    )
    .expect("plan");
    let first = publisher.sync(&plan).await.expect("sync");
    assert_eq!((first.created, first.generation), (3, 1), "{first:?}");
    let again = publisher.sync(&plan).await.expect("sync");
    assert!(!again.changed(), "{again:?}");
    let smaller = build_pool(
        &inventory(2),
        "node-a",
        SharingMode::Partitioned,
        CounterLayout::Separate,
    )
    .expect("plan");
    let shrink = publisher.sync(&smaller).await.expect("sync");
    assert_eq!(
        (shrink.deleted, shrink.updated, shrink.generation),
        (1, 2, 2),
        "{shrink:?}"
    );
    let s = state.lock().expect("lock");
    assert!(
        s.slices
            .values()
            .all(|o| o["spec"]["pool"]["generation"] == 2
                && o["spec"]["pool"]["resourceSliceCount"] == 2)
    );
}

#[tokio::test]
async fn api_server_down_is_retried_with_backoff_then_published() {
    let state = Shared::default();
    state.lock().expect("lock").down_for = 4;
    let (_tx, rx) = tokio::sync::watch::channel(NodeGpus::from(inventory(2)));
    let (controller, status) = NodeController::new(
        client(&state),
        NodeControllerConfig::new("node-a", ModeSetting::Auto),
        rx,
    );
    let task = tokio::spawn(controller.run());
    eventually("an error is reported while down", || {
        status.borrow().last_error.is_some()
    })
    .await;
    assert_eq!(
        status.borrow().mode,
        None,
        "nothing is published while the server is down"
    );
    eventually("published once the server is back", || {
        status.borrow().mode == Some(SharingMode::Consumable)
    })
    .await;
    assert!(!task.is_finished(), "the controller never exits");
    let s = state.lock().expect("lock");
    assert_eq!(s.slices.len(), 1);
    // One refused discovery per attempt, each retry after at least the backoff's base delay
    // (0.5 s, doubling; jitter only adds).
    let gaps: Vec<Duration> = s.refused_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps.len(), 3, "four refused attempts");
    for (gap, base) in gaps.iter().zip([500, 1000, 2000]) {
        assert!(
            *gap >= Duration::from_millis(base),
            "retried too soon: {gaps:?}"
        );
    }
    assert!(
        s.requests
            .iter()
            .filter(|r| r.starts_with("GET /apis?"))
            .count()
            >= 2,
        "discovery was retried"
    );
    task.abort();
}

#[tokio::test]
async fn dropped_gated_fields_make_auto_fall_back_with_an_event() {
    let state = Shared::default();
    // No DRAConsumableCapacity and no DRAPartitionableDevices: only fixed survives.
    state.lock().expect("lock").drop_fields = vec!["allowMultipleAllocations", "consumesCounters"];
    let (_tx, rx) = tokio::sync::watch::channel(NodeGpus::from(inventory(1)));
    let (controller, status) = NodeController::new(
        client(&state),
        NodeControllerConfig::new("node-a", ModeSetting::Auto),
        rx,
    );
    let task = tokio::spawn(controller.run());
    eventually("fell back to fixed", || {
        status.borrow().mode == Some(SharingMode::Fixed { slices: 4 })
    })
    .await;
    let s = state.lock().expect("lock");
    let reasons: Vec<_> = s
        .events
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(reasons, ["SharingModeFallback"], "{:?}", s.events);
    // The second fallback (partitioned → fixed) is the same Event reason on the same Node: kube's
    // recorder sends it as a series update (PATCH) of the first.
    let writes = s.requests.iter().filter(|r| r.contains("/events")).count();
    assert_eq!(writes, 2, "{:?}", s.requests);
    let note = s.events[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("allowMultipleAllocations") && note.contains("falling back to partitioned"),
        "{note}"
    );
    assert!(s.slices.values().all(|o| {
        o["spec"]["devices"]
            .as_array()
            .is_some_and(|d| d.len() == 4)
    }));
    task.abort();
}

#[tokio::test]
async fn an_empty_inventory_deletes_the_slices_and_a_gpu_back_republishes() {
    let state = Shared::default();
    let (tx, rx) = tokio::sync::watch::channel(NodeGpus::from(inventory(2)));
    let (controller, status) = NodeController::new(
        client(&state),
        NodeControllerConfig::new("node-a", ModeSetting::Mode(SharingMode::Exclusive)),
        rx,
    );
    let task = tokio::spawn(controller.run());
    eventually("published", || status.borrow().devices == 2).await;
    let first = status.borrow().generation;
    assert_eq!(state.lock().expect("lock").slices.len(), 1);

    // Every GPU gone or unhealthy: the slices go, the controller keeps running.
    tx.send(NodeGpus::from(Inventory {
        driver_version: None,
        gpus: Vec::new(),
    }))
    .expect("send");
    eventually("slices deleted", || {
        state.lock().expect("lock").slices.is_empty() && status.borrow().devices == 0
    })
    .await;
    assert!(
        status.borrow().last_error.is_none(),
        "{:?}",
        status.borrow()
    );
    assert!(
        state
            .lock()
            .expect("lock")
            .requests
            .iter()
            .any(|r| r.starts_with("DELETE /apis/resource.k8s.io/v1/resourceslices/")),
    );

    // A GPU comes back: published again, with a newer generation than anything before.
    let mut one = inventory(2);
    one.gpus.remove(0);
    tx.send(one.into()).expect("send");
    eventually("re-published", || status.borrow().devices == 1).await;
    let s = state.lock().expect("lock");
    let slice = s.slices.values().next().expect("a slice");
    assert_eq!(slice["spec"]["devices"][0]["name"], "gpu-1", "index kept");
    assert!(slice["spec"]["pool"]["generation"].as_i64() > Some(first));
    assert!(!task.is_finished());
    task.abort();
}
