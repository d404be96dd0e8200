//! `/metrics` (OpenMetrics to scrapers that ask for it, the classic text format to others) and
//! `/healthz` of `tessera-controller`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tessera_api::exposition;

/// Serves until the listener fails; binding errors are returned at once.
pub async fn serve(listen: SocketAddr, registry: Arc<Registry>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    serve_on(listener, registry).await
}

/// [`serve`] on a listener already bound.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
) -> std::io::Result<()> {
    if let Ok(listen) = listener.local_addr() {
        tracing::info!(%listen, "serving /metrics and /healthz");
    }
    axum::serve(listener, router(registry)).await
}

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let registry = registry.clone();
                async move {
                    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) if exposition::wants_openmetrics(accept) => {
                            ([(header::CONTENT_TYPE, exposition::OPENMETRICS)], text)
                                .into_response()
                        }
                        Ok(()) => (
                            [(header::CONTENT_TYPE, exposition::CLASSIC_TEXT)],
                            exposition::to_classic_text(&text),
                        )
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::metrics::ClusterMetrics;
    use crate::cluster::view::{ClusterView, GpuView};
    use tower::ServiceExt;

    #[tokio::test]
    async fn metrics_and_healthz() {
        let metrics = ClusterMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut view = ClusterView::default();
        let gpu = GpuView {
            node: "n".into(),
            uuid: "GPU-1".into(),
            product: "L40S".into(),
            memory_capacity_bytes: 48 << 30,
            shares: 2,
            memory_allocated_bytes: 1 << 30,
            cores_allocated: 20,
        };
        view.gpus.insert(("n".into(), "GPU-1".into()), gpu);
        metrics.update(&view);
        let app = router(Arc::new(registry));
        let get = |uri: &str| {
            axum::http::Request::get(uri)
                .body(axum::body::Body::empty())
                .expect("request")
        };
        let health = app.clone().oneshot(get("/healthz")).await.expect("healthz");
        assert_eq!(health.status(), StatusCode::OK);
        let response = app.clone().oneshot(get("/metrics")).await.expect("metrics");
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains(
                r#"tessera_gpu_shares_allocated{node="n",gpu_uuid="GPU-1",product="L40S"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains("tessera_gpu_memory_capacity_bytes{"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tessera_gpu_cores_allocated_ratio{node="n",gpu_uuid="GPU-1",product="L40S"} 0.2"#
            ),
            "{text}"
        );
        assert!(
            text.contains("tessera_controller_reconcile_errors_total 0"),
            "{text}"
        );
        // No Accept header: the classic format, which promtool accepts.
        assert!(
            text.contains("# TYPE tessera_controller_reconcile_errors_total counter"),
            "{text}"
        );
        if let Some(promtool) = tessera_e2e_harness::promtool::require("metrics_and_healthz") {
            tessera_e2e_harness::promtool::check_metrics(&promtool, &text)
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
        }
        let openmetrics = app
            .oneshot(
                axum::http::Request::get("/metrics")
                    .header(header::ACCEPT, "application/openmetrics-text;version=1.0.0")
                    .body(axum::body::Body::empty())
                    .expect("request"),
            )
            .await
            .expect("metrics");
        assert_eq!(
            openmetrics.headers()[header::CONTENT_TYPE],
            tessera_api::exposition::OPENMETRICS
        );
    }
}
