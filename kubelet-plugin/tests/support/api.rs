//! An in-process API server responder: discovery of `resource.k8s.io`, GETs of canned
//! ResourceClaims in the versions it is told to serve and of namespaces (with the labels a test
//! set), behind a real `kube::Client`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use tessera_api::names::{CONFIG_API_VERSION, CONFIG_KIND, DRIVER_NAME};

#[derive(Default)]
struct State {
    served: Vec<String>,
    /// (namespace, name) → claim JSON in the served versions' shape.
    claims: HashMap<(String, String), Value>,
    /// Namespace → its labels; every namespace exists, with none unless set here.
    namespace_labels: HashMap<String, Value>,
    /// Paths requested, in order.
    requests: Vec<String>,
}

/// The mocked API server; cheap to clone, all clones share the claims.
#[derive(Clone)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
}

impl ApiServer {
    pub fn new(served: &[&str]) -> ApiServer {
        let state = State {
            served: served.iter().map(|s| s.to_string()).collect(),
            ..State::default()
        };
        ApiServer {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// A client whose requests this server answers.
    pub fn client(&self) -> kube::Client {
        let state = self.state.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(respond(&state, request.uri().path())) }
        });
        kube::Client::new(service, "default")
    }

    /// Adds or replaces a claim.
    pub fn put(&self, claim: Value) {
        let namespace = claim["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = claim["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.lock().claims.insert((namespace, name), claim);
    }

    /// Serves the same responses over HTTP on a loopback port (for the plugin binary, through a
    /// kubeconfig), until the runtime ends.
    pub async fn serve_tcp(&self) -> std::net::SocketAddr {
        let state = self.state.clone();
        let app = axum::Router::new().fallback(move |uri: http::Uri| {
            let state = state.clone();
            async move { respond(&state, uri.path()) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        address
    }

    /// Sets a label on a namespace, as the cluster admin would.
    pub fn label_namespace(&self, namespace: &str, key: &str, value: &str) {
        let mut state = self.lock();
        let labels = state
            .namespace_labels
            .entry(namespace.to_string())
            .or_insert_with(|| json!({}));
        labels[key] = json!(value);
    }

    pub fn delete(&self, namespace: &str, name: &str) {
        self.lock()
            .claims
            .remove(&(namespace.to_string(), name.to_string()));
    }

    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn respond(state: &Mutex<State>, path: &str) -> http::Response<Full<Bytes>> {
    let mut state = state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    state.requests.push(path.to_string());
    if path == "/apis/resource.k8s.io" {
        let versions: Vec<Value> = state
            .served
            .iter()
            .map(|v| json!({"groupVersion": format!("resource.k8s.io/{v}"), "version": v}))
            .collect();
        let preferred = versions.first().cloned().unwrap_or(Value::Null);
        return reply(
            200,
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": "resource.k8s.io", "versions": versions, "preferredVersion": preferred}),
        );
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let ["api", "v1", "namespaces", namespace] = parts[..] {
        let labels = state
            .namespace_labels
            .get(namespace)
            .cloned()
            .unwrap_or_else(|| json!({}));
        return reply(
            200,
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": namespace, "labels": labels}}),
        );
    }
    if let [
        "apis",
        "resource.k8s.io",
        version,
        "namespaces",
        namespace,
        "resourceclaims",
        name,
    ] = parts[..]
        && state.served.iter().any(|v| v == version)
        && let Some(claim) = state.claims.get(&(namespace.to_string(), name.to_string()))
    {
        let mut claim = claim.clone();
        claim["apiVersion"] = json!(format!("resource.k8s.io/{version}"));
        return reply(200, claim);
    }
    reply(
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
        "message": format!("{path} not found")}),
    )
}

fn reply(code: u16, body: Value) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

/// A claim; `allocation` `None` leaves it unallocated. Every served version reads this shape
/// (v1alpha3 results simply lack `shareID`/`consumedCapacity`).
pub fn claim(
    namespace: &str,
    name: &str,
    uid: &str,
    results: Option<Vec<Value>>,
    config: Vec<Value>,
) -> Value {
    let mut claim = json!({
        "kind": "ResourceClaim",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
        "spec": {"devices": {"requests": []}},
        "status": {},
    });
    if let Some(results) = results {
        claim["status"]["allocation"] = json!({"devices": {"results": results, "config": config}});
    }
    claim
}

/// An allocation result of `gpu.tessera.dev` for a whole or sliced device.
pub fn result(request: &str, device: &str) -> Value {
    json!({"request": request, "driver": DRIVER_NAME, "pool": super::NODE, "device": device})
}

/// A consumable-capacity share.
pub fn share(request: &str, device: &str, share_id: &str, memory: &str, cores: &str) -> Value {
    let mut r = result(request, device);
    r["shareID"] = json!(share_id);
    r["consumedCapacity"] = json!({"memory": memory, "cores": cores});
    r
}

/// An opaque config entry for our driver.
pub fn config_entry(source: &str, requests: &[&str], fields: Value) -> Value {
    let mut parameters = json!({"apiVersion": CONFIG_API_VERSION, "kind": CONFIG_KIND});
    if let (Some(p), Some(extra)) = (parameters.as_object_mut(), fields.as_object()) {
        p.extend(extra.clone());
    }
    json!({"source": source, "requests": requests, "opaque": {"driver": DRIVER_NAME, "parameters": parameters}})
}
