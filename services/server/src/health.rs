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

use crate::roles::{Role, Roles};

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
    /// "embedded SQLite" or "PostgreSQL": never the file path or host,
    /// which anyone who can reach /rs/health would read.
    pub store_kind: &'static str,
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

async fn store_component(store: &Arc<dyn Store>, kind: &str) -> (bool, serde_json::Value) {
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
        "backend": kind,
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
async fn registry_component(registry: &Arc<dyn Registry>) -> (Option<usize>, serde_json::Value) {
    let (connections, voters) = tokio::join!(
        within_timeout(async { registry.connection_count().await.map_err(|error| error.to_string()) }),
        within_timeout(async { registry.voter_count().await.map_err(|error| error.to_string()) }),
    );
    let body = json!({
        "ok": connections.is_ok(),
        "kind": registry.kind(),
        "connections": connections.as_ref().ok(),
        "voters": voters.as_ref().ok(),
        "error": connections.err(),
    });
    (voters.ok(), body)
}

/// The original server's `hazelcast` field, from the session registry this
/// process uses or is a voter of: `available` is whether it answered just
/// now, `members` how many voters it has. Processes with neither (routing
/// or bots alone) leave the field out rather than invent a value.
fn hazelcast_field(
    registry_voters: Option<Option<usize>>,
    voter: Option<&beseda_registry::ClusterStatus>,
) -> Option<serde_json::Value> {
    // A voter that knows no leader cannot answer registry reads.
    let voter_members = voter
        .filter(|status| status.role != "shutdown" && status.leader_id.is_some())
        .map(|status| status.members.iter().filter(|member| member.voter).count());
    let members = match registry_voters {
        Some(voters) => voters,
        None => voter.map(|_| voter_members)?,
    };
    Some(json!({"available": members.is_some(), "members": members.unwrap_or(0)}))
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
        OptionFuture::from(state.store.as_ref().map(|store| store_component(store, state.store_kind))),
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
    let mut registry_voters = None;
    if let Some((voters, body)) = registry {
        registry_voters = Some(voters);
        components.insert("registry".into(), body);
    }
    let hazelcast = hazelcast_field(registry_voters, voter.as_ref());
    if let Some(status) = voter {
        components.insert("registryVoter".into(), json!({"ok": status.role != "shutdown", "status": status}));
    }
    if let Some((ok, body)) = routing {
        all_ok &= ok;
        components.insert("routing".into(), body);
    }
    let status = if all_ok { "ok" } else { "degraded" };
    let mut body = json!({
        "status": status,
        "version": beseda_routing::SERVER_VERSION,
        "roles": state.roles.to_string(),
        "components": components,
        // Field names of the original server's health answer. There is one
        // database (shards arrive with the SaaS issue), so every shard is
        // the main one.
        "mainDbOk": store_ok,
        "allShardsOk": store_ok,
    });
    if let Some(hazelcast) = hazelcast {
        body["hazelcast"] = hazelcast;
    }
    let code = if all_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(body))
}

/// The standard `process_*` families (resident memory, CPU seconds, open
/// and maximum file descriptors, threads, start time) as every Prometheus
/// client library exports them; metrics-process reads them from the
/// operating system at each scrape.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(|| {
        let collector = metrics_process::Collector::default();
        collector.describe();
        collector
    })
}

/// Describes and shows at zero every metric family of this process's roles,
/// the `process_*` families and `beseda_build_info`, so the first scrape of
/// a fresh node lists them all (docs/observability.md).
pub fn register_metrics(roles: &Roles, uses_redis_bus: bool) {
    prometheus();
    process_collector().collect();
    metrics::describe_gauge!(
        "beseda_build_info",
        "always 1; the labels say which build runs: version, git commit and the process's roles"
    );
    metrics::gauge!(
        "beseda_build_info",
        "version" => beseda_routing::SERVER_VERSION,
        "commit" => env!("BUILD_GIT_COMMIT"),
        "roles" => roles.to_string(),
    )
    .set(1.0);
    if roles.has(Role::Gateway) {
        beseda_sessions::metric_families::register();
    }
    if roles.has(Role::Gateway) || (roles.has(Role::Bots) && !roles.has(Role::Routing)) {
        beseda_routing::metric_families::register_cluster_clients();
    }
    if roles.has(Role::Routing) {
        beseda_routing::metric_families::register();
    }
    if roles.needs_store() {
        beseda_store::metric_families::register();
    }
    if roles.has(Role::Bots) {
        beseda_bots::metric_families::register();
    }
    if uses_redis_bus {
        beseda_bus::metric_families::register_redis();
    }
    if roles.has(Role::Registry) {
        beseda_registry::metric_families::register_voter();
    }
}

async fn metrics_text() -> impl IntoResponse {
    process_collector().collect();
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
