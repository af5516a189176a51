//! `GET /rs/health` (the original server's path, so existing monitoring
//! keeps working) and `GET /metrics` (Prometheus).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use beseda_registry::Registry;
use beseda_store::Store;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

#[derive(Clone)]
pub struct HealthState {
    pub store: Arc<dyn Store>,
    pub registry: Arc<dyn Registry>,
    pub store_description: String,
}

/// The process-wide Prometheus recorder (one per process, however many
/// nodes a test starts).
fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only this recorder's data");
        }
        handle
    })
}

async fn health(State(state): State<HealthState>) -> impl IntoResponse {
    let started = Instant::now();
    // A real round trip through the store (an indexed lookup that finds
    // nothing), so "ok" means queries are being answered, not just that a
    // pool exists.
    let store_result = state.store.get_subscriber("00000000-0000-0000-0000-000000000000").await;
    let store_latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let store_ok = store_result.is_ok();
    let connections = state.registry.connection_count().await;
    let registry_ok = connections.is_ok();
    let status = if store_ok { "ok" } else { "degraded" };
    let body = json!({
        "status": status,
        "version": beseda_routing::SERVER_VERSION,
        "components": {
            "store": {
                "ok": store_ok,
                "backend": state.store_description,
                "latencyMs": store_latency_ms,
                "error": store_result.err().map(|error| error.message),
            },
            "bus": {"ok": true, "kind": "in-process"},
            "registry": {
                "ok": registry_ok,
                "kind": state.registry.kind(),
                "connections": connections.as_ref().ok(),
                "error": connections.as_ref().err().map(|error| error.to_string()),
            },
        },
        // Field names of the original server's health answer.
        "mainDbOk": store_ok,
        "allShardsOk": store_ok,
        "hazelcast": {"available": true, "members": 1},
    });
    let code = if store_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(body))
}

async fn metrics_text() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus().render())
}

pub fn router(state: HealthState) -> axum::Router {
    prometheus();
    axum::Router::new()
        .route("/rs/health", axum::routing::get(health))
        .route("/metrics", axum::routing::get(metrics_text))
        .with_state(state)
}
