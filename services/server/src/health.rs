//! `GET /rs/health` (the original server's path, so existing monitoring
//! keeps working) and `GET /metrics` (Prometheus).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use beseda_proto::v1::routing_server::Routing;
use beseda_registry::{Registry, RegistryNode};
use beseda_store::Store;
use futures_util::future::OptionFuture;
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

/// How long one component's check may take. Kubernetes gives the whole
/// probe 2 s (the chart's `timeoutSeconds`); the checks run at once, so a
/// slow dependency makes the answer say so instead of timing the probe out.
const COMPONENT_TIMEOUT: Duration = Duration::from_secs(1);

async fn within_timeout<T>(check: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(COMPONENT_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {COMPONENT_TIMEOUT:?}")))
}

async fn store_component(store: &Arc<dyn Store>, description: &str) -> (bool, serde_json::Value) {
    let started = Instant::now();
    // A real round trip through the store (an indexed lookup that finds
    // nothing), so "ok" means queries are being answered, not just that a
    // pool exists.
    let result = within_timeout(async {
        store.get_subscriber("00000000-0000-0000-0000-000000000000").await.map_err(|error| error.message)
    })
    .await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let ok = result.is_ok();
    let body = json!({
        "ok": ok,
        "backend": description,
        "latencyMs": latency_ms,
        "error": result.err(),
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

/// Reported, never counted against readiness: a registry outage degrades
/// presence only, while sessions and messages go on.
async fn registry_component(registry: &Arc<dyn Registry>) -> serde_json::Value {
    let connections =
        within_timeout(async { registry.connection_count().await.map_err(|error| error.to_string()) }).await;
    json!({
        "ok": connections.is_ok(),
        "kind": registry.kind(),
        "connections": connections.as_ref().ok(),
        "error": connections.err(),
    })
}

async fn routing_component(routing: &Arc<dyn Routing>) -> (bool, serde_json::Value) {
    let answer = within_timeout(async {
        routing
            .get_server_info(tonic::Request::new(beseda_proto::v1::Empty {}))
            .await
            .map_err(|status| status.message().to_owned())
    })
    .await;
    let ok = answer.is_ok();
    (ok, json!({"ok": ok, "kind": "remote", "error": answer.err()}))
}

async fn health(State(state): State<HealthState>) -> impl IntoResponse {
    let (store, registry, voter, routing) = tokio::join!(
        OptionFuture::from(state.store.as_ref().map(|store| store_component(store, &state.store_description))),
        OptionFuture::from(state.registry.as_ref().map(registry_component)),
        OptionFuture::from(state.registry_node.as_ref().map(|node| node.status())),
        OptionFuture::from(state.routing.as_ref().map(routing_component)),
    );
    let mut components = serde_json::Map::new();
    let mut all_ok = true;
    let mut store_ok = true;
    if let Some((ok, body)) = store {
        store_ok = ok;
        all_ok &= ok;
        components.insert("store".into(), body);
    }
    if let Some((ok, body)) = bus_component(&state.bus) {
        all_ok &= ok;
        components.insert("bus".into(), body);
    }
    if let Some(body) = registry {
        components.insert("registry".into(), body);
    }
    if let Some(status) = voter {
        components.insert("registryVoter".into(), json!({"ok": status.role != "shutdown", "status": status}));
    }
    if let Some((ok, body)) = routing {
        all_ok &= ok;
        components.insert("routing".into(), body);
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
