//! The sessions service: Beseda's edge. It terminates the public REST API
//! (`/api/v1`), the OpenAPI document and the WebSocket client protocol
//! (`/ws`), authenticates callers through routing, keeps per-connection
//! subscriptions fed from the bus, and records presence in the registry.
//!
//! It holds routing as `Arc<dyn Routing>` and bots as `Arc<dyn Bots>`: the
//! in-process services or gRPC clients, and cannot tell which.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use beseda_bots::ProcessingConnector;
use beseda_bus::Bus;
use beseda_proto::v1::bots_server::Bots;
use beseda_proto::v1::routing_server::Routing;
use beseda_registry::Registry;

pub mod api;
pub mod auth;
pub mod bots;
pub mod connections;
pub mod http_error;
pub mod metric_families;
pub mod openapi;
pub mod ws;

/// Bytes a WebSocket connection reads at a time. tungstenite zero-fills
/// this much of its buffer on every read attempt, including the ones that
/// find nothing, and keeps it allocated per connection: its default of
/// 128 KiB cost a 128 KiB memset per connection per pushed event (a third
/// of the server's CPU in a 500-member fan-out) and 128 KiB of memory per
/// idle connection. At 4 KiB it was still the largest allocation of an idle
/// connection (4,096 of ~12,500 heap bytes, heaptrack, docs/BENCHMARKS.md);
/// client requests (a Hello with its token, a sendMessage) fit in 1 KiB.
/// Frames larger than this are still read whole, in more reads.
pub const READ_BUFFER_BYTES: usize = 1024;

/// The gateway's settings.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// This node's name in the registry.
    pub node_id: String,
    /// Interval of server pings on idle WebSocket connections.
    pub ping_interval: Duration,
    /// A connection that sends nothing (not even a pong) this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed between connecting and the Hello frame.
    pub hello_timeout: Duration,
    /// Frames queued for one connection before it counts as a slow consumer.
    pub send_queue_capacity: usize,
    /// Bytes queued for one connection before it counts as a slow consumer
    /// (one frame always fits into an empty queue).
    pub send_queue_bytes: usize,
    /// WebSocket connections one user may have open on this gateway.
    pub max_connections_per_user: usize,
    /// Users one connection may watch the presence of.
    pub max_presence_watches: usize,
    /// Conversations one connection may follow at once.
    pub max_subscriptions: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            node_id: "node-1".into(),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(10),
            send_queue_capacity: 1024,
            send_queue_bytes: 8 * 1024 * 1024,
            max_connections_per_user: 16,
            max_presence_watches: 1000,
            max_subscriptions: 1000,
        }
    }
}

/// What the gateway needs; cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    pub routing: Arc<dyn Routing>,
    pub bots: Arc<dyn Bots>,
    /// Where bot processing connections (`/bots/v1/processing`) are served.
    pub processing: Arc<dyn ProcessingConnector>,
    pub bus: Arc<dyn Bus>,
    pub registry: Arc<dyn Registry>,
    pub config: Arc<GatewayConfig>,
    /// Open WebSocket connections per user, for `max_connections_per_user`.
    pub user_connections: connections::UserConnections,
    /// Flips to true when the server is shutting down: connections tell
    /// their clients to reconnect elsewhere and close.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// `/api/v1`, `/api/openapi.json`, `/ws`, `/bots/v1/processing` and `/webhooks/{token}`.
pub fn router(gateway: Gateway) -> axum::Router {
    let openapi = axum::Router::new()
        .route("/api/openapi.json", axum::routing::get(|| async { axum::Json(openapi::document()) }));
    let websocket = axum::Router::new().route("/ws", axum::routing::get(ws::upgrade)).with_state(gateway.clone());
    let bots = bots::router(gateway.clone());
    api::router(gateway).merge(openapi).merge(websocket).merge(bots)
}
