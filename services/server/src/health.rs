//! `GET /rs/health` (the original server's path, so existing monitoring
//! keeps working) and `GET /metrics` (Prometheus).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use beseda_proto::v1::routing_server::Routing;
use beseda_registry::{Registry, RegistryNode};
use beseda_store::Store;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use crate::roles::Roles;

/// The state of the event bus.
#[derive(Clone)]
pub enum BusHealth {
    /// No role of this process uses the bus.
    None,
    InProcess,
    Redis(Arc<beseda_bus::redis::RedisBus>),
}

/// What this process's health depends on: only what its roles use.
#[derive(Clone)]
pub struct HealthState {
    pub roles: Roles,
    pub store: Option<Arc<dyn Store>>,
    pub store_description: String,
    pub bus: BusHealth,
    /// The registry a gateway records its connections in.
    pub registry: Option<Arc<dyn Registry>>,
    /// This process's registry voter.
    pub registry_node: Option<Arc<RegistryNode>>,
    /// Routing in other processes (a gateway or bots process checks it answers).
    pub routing: Option<Arc<dyn Routing>>,
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

async fn store_component(store: &Arc<dyn Store>, description: &str) -> (bool, serde_json::Value) {
    let started = Instant::now();
    // A real round trip through the store (an indexed lookup that finds
    // nothing), so "ok" means queries are being answered, not just that a
    // pool exists.
    let result = store.get_subscriber("00000000-0000-0000-0000-000000000000").await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let ok = result.is_ok();
    let body = json!({
        "ok": ok,
        "backend": description,
        "latencyMs": latency_ms,
        "error": result.err().map(|error| error.message),
    });
    (ok, body)
}

fn bus_component(bus: &BusHealth) -> Option<(bool, serde_json::Value)> {
    match bus {
        BusHealth::None => None,
        BusHealth::InProcess => Some((true, json!({"ok": true, "kind": "in-process"}))),
        BusHealth::Redis(redis) => {
            let ok = redis.is_connected();
            Some((ok, json!({"ok": ok, "kind": "redis", "description": redis.describe()})))
        }
    }
}

async fn health(State(state): State<HealthState>) -> impl IntoResponse {
    let mut components = serde_json::Map::new();
    let mut all_ok = true;
    let mut store_ok = true;
    if let Some(store) = &state.store {
        let (ok, body) = store_component(store, &state.store_description).await;
        store_ok = ok;
        all_ok &= ok;
        components.insert("store".into(), body);
    }
    if let Some((ok, body)) = bus_component(&state.bus) {
        all_ok &= ok;
        components.insert("bus".into(), body);
    }
    if let Some(registry) = &state.registry {
        // A registry outage degrades presence only: sessions and messages go
        // on, so it does not make this gateway unready.
        let connections = registry.connection_count().await;
        components.insert(
            "registry".into(),
            json!({
                "ok": connections.is_ok(),
                "kind": registry.kind(),
                "connections": connections.as_ref().ok(),
                "error": connections.as_ref().err().map(|error| error.to_string()),
            }),
        );
    }
    if let Some(node) = &state.registry_node {
        let status = node.status().await;
        components.insert("registryVoter".into(), json!({"ok": status.role != "shutdown", "status": status}));
    }
    if let Some(routing) = &state.routing {
        let answer = routing.get_server_info(tonic::Request::new(beseda_proto::v1::Empty {})).await;
        let ok = answer.is_ok();
        all_ok &= ok;
        components.insert(
            "routing".into(),
            json!({"ok": ok, "kind": "remote", "error": answer.err().map(|status| status.message().to_owned())}),
        );
    }
    let status = if all_ok { "ok" } else { "degraded" };
    let body = json!({
        "status": status,
        "version": beseda_routing::SERVER_VERSION,
        "roles": state.roles.to_string(),
        "components": components,
        // Field names of the original server's health answer.
        "mainDbOk": store_ok,
        "allShardsOk": store_ok,
        "hazelcast": {"available": true, "members": 1},
    });
    let code = if all_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(body))
}

async fn metrics_text() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus().render())
}

pub fn router(state: HealthState) -> axum::Router {
    prometheus();
    axum::Router::new()
        .route("/rs/health", axum::routing::get(health))
        // Liveness: the process answers HTTP. Unlike /rs/health it does not
        // depend on PostgreSQL, Redis or routing, so an outage of those makes
        // pods unready (no traffic) without restarting them all.
        .route("/rs/live", axum::routing::get(|| async { "ok" }))
        .route("/metrics", axum::routing::get(metrics_text))
        .with_state(state)
}
