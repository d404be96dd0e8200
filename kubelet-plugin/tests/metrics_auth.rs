//! `--metrics-auth=kubernetes` against the real kube-apiserver (v1.37): the plugin's metrics
//! endpoint over TLS answers a scraper whose service account may `get /metrics`, and refuses
//! everyone else — no token, a forged token, a valid token of a user without the permission —
//! while `/healthz` stays open for the kubelet's probe. Without the option, anyone who reaches the
//! port reads every claim's namespace and name (the test shows that too).
//!
//! The client is a plain HTTP/1.1 request over rustls that trusts only the test's own CA, so the
//! certificate-file path is checked as a scraper verifying it would see it. Gated like every test
//! that needs built binaries (`tessera_built_libs::require`).

use std::sync::Arc;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;
use kube::api::PostParams;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tessera_e2e_harness::binaries::Binaries;
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions};
use tessera_kubelet_plugin::http;
use tessera_kubelet_plugin::metrics::Metrics;
use tessera_kubelet_plugin::metrics_auth::Authorizer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAMESPACE: &str = "default";

/// A service account and a token for it.
async fn service_account_token(client: &kube::Client, name: &str) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("service account");
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("creating the service account");
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": { "expirationSeconds": 600 }
    });
    let answer: Value = sas
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .expect("TokenRequest");
    answer["status"]["token"]
        .as_str()
        .expect("a token")
        .to_string()
}

/// Lets `sa` get `/metrics`, as a monitoring install binds its Prometheus.
async fn grant_metrics(client: &kube::Client, sa: &str) {
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": "metrics-reader"},
        "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    }))
    .expect("role");
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await
        .expect("creating the ClusterRole");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "metrics-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "metrics-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    }))
    .expect("binding");
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("creating the ClusterRoleBinding");
}

/// A CA and a serving certificate for `localhost` signed by it, written as PEM files.
fn certificates(
    dir: &std::path::Path,
) -> (
    CertificateDer<'static>,
    (std::path::PathBuf, std::path::PathBuf),
) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("certificate");
    let cert_file = dir.join("metrics.crt");
    let key_file = dir.join("metrics.key");
    std::fs::write(&cert_file, cert.pem()).expect("writing the certificate");
    std::fs::write(&key_file, key.serialize_pem()).expect("writing the key");
    (ca.der().clone(), (cert_file, key_file))
}

/// GET `path` over TLS, trusting only `ca`; the status code and the body.
async fn get(
    port: u16,
    ca: &CertificateDer<'static>,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("trusting the CA");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting");
    let mut tls = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("the TLS handshake, verified against the CA");
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{authorization}Connection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.expect("sending");
    let mut answer = Vec::new();
    // A server may end TLS without close_notify after `Connection: close`; what came is enough.
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_authorised_scrapers_read_the_metrics() {
    let version = tessera_e2e_harness::versions::PINNED
        .into_iter()
        .find(|v| v.minor() == 37)
        .expect("pinned version");
    let Some(binaries) = Binaries::for_test(version, "metrics_auth") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = ControlPlaneOptions::new(version, dir.path().join("cluster"));
    options.binaries = Some(binaries);
    let cp = ControlPlane::start(options)
        .await
        .expect("starting the control plane");
    let client = cp.client();
    let scraper = service_account_token(&client, "prometheus").await;
    let nosy = service_account_token(&client, "nosy").await;
    grant_metrics(&client, "prometheus").await;

    let (ca, (cert_file, key_file)) = certificates(dir.path());
    let tls = http::tls_config(Some((&cert_file, &key_file)), vec![]).expect("TLS config");
    let metrics = Arc::new(Metrics::new(dir.path().join("state")));
    let router = http::router_with_auth(metrics, Arc::new(Authorizer::new(client.clone())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding loopback");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(http::serve_tls(listener, router, tls));

    // RBAC bindings reach the authorizer's cache shortly after they are written.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let body = loop {
        let (status, body) = get(port, &ca, "/metrics", Some(&scraper)).await;
        if status == 200 {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the scraper was never let in: {status} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert!(body.contains("tessera_prepare"), "the metrics: {body}");

    let (status, body) = get(port, &ca, "/metrics", None).await;
    assert_eq!(status, 401, "no token: {body}");
    assert!(body.contains("bearer token is required"), "{body}");
    let (status, body) = get(port, &ca, "/metrics", Some("forged.token.value")).await;
    assert_eq!(status, 401, "a forged token: {body}");
    let (status, body) = get(port, &ca, "/metrics", Some(&nosy)).await;
    assert_eq!(status, 403, "a user without get /metrics: {body}");
    assert!(
        body.contains("system:serviceaccount:default:nosy may not get /metrics"),
        "{body}"
    );
    let (status, body) = get(port, &ca, "/healthz", None).await;
    assert_eq!(
        (status, body.trim()),
        (200, "ok"),
        "the probe needs no token"
    );

    // Without the option the same metrics are anyone's.
    let open = http::router(Arc::new(Metrics::new(dir.path().join("state"))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding loopback");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move { axum::serve(listener, open).await });
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting");
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("sending");
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.expect("reading");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_self_signed_certificate_is_made_when_no_files_are_given() {
    http::tls_config(None, vec!["node-a".into(), "127.0.0.1".into()])
        .expect("a self-signed configuration");
    let missing = std::path::Path::new("/nonexistent/metrics.crt");
    let error = http::tls_config(Some((missing, missing)), vec![])
        .expect_err("a missing certificate file")
        .to_string();
    assert!(
        error.contains("certificate") && error.contains("/nonexistent/metrics.crt"),
        "{error}"
    );
}
