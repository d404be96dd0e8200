//! `/metrics` and `/healthz` on `--metrics-address`: plain, or over TLS with `/metrics` for
//! authorised scrapers only (`--metrics-auth=kubernetes`, see [`crate::metrics_auth`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use tessera_api::exposition;

use crate::metrics::Metrics;
use crate::metrics_auth::{Authorizer, require_authorized};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The router, separate from binding so tests can serve it on any listener.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .with_state(metrics)
}

/// [`router`] with `/metrics` for the scrapers `authorizer` allows.
pub fn router_with_auth(metrics: Arc<Metrics>, authorizer: Arc<Authorizer>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(metrics_text).route_layer(axum::middleware::from_fn_with_state(
                authorizer,
                require_authorized,
            )),
        )
        .route("/healthz", get(healthz))
        .with_state(metrics)
}

async fn metrics_text(
    State(metrics): State<Arc<Metrics>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    match metrics.encode() {
        Ok(text) if exposition::wants_openmetrics(accept) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, exposition::OPENMETRICS)],
            text,
        ),
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, exposition::CLASSIC_TEXT)],
            exposition::to_classic_text(&text),
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "encoding failed\n".to_string(),
        ),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Serves until the process ends.
pub async fn serve(address: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "serving /metrics and /healthz");
    axum::serve(listener, router(metrics)).await
}

/// Serves `router` over TLS on `listener` until the process ends.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    tracing::info!(%address, "serving /metrics (authorised scrapers only) and /healthz over TLS");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors and the like: the listener itself is fine, so wait and go on.
            Err(error) => {
                tracing::warn!(%error, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router))
                .await;
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "metrics connection ended");
            }
        });
    }
}

/// Why the metrics endpoint's TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("making a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The server side of TLS: the certificate chain and key in `files` (PEM), or a self-signed
/// certificate for `names` (host names and IP addresses) made now.
pub fn tls_config(
    files: Option<(&Path, &Path)>,
    names: Vec<String>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (chain, key) = match files {
        Some((cert, key)) => {
            let read = |what: &'static str, path: &Path| {
                let path = path.to_path_buf();
                move |source| TlsError::Read { what, path, source }
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(read("certificate", cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read("certificate", cert))?;
            if chain.is_empty() {
                return Err(TlsError::NoCertificate(cert.to_path_buf()));
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(read("key", key))?;
            (chain, key)
        }
        None => {
            let made = rcgen::generate_simple_self_signed(names)?;
            let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
            (vec![made.cert.der().clone()], key)
        }
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}
