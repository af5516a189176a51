//! Start-up as a straight line: validate the config, open the store, build
//! the bus, registry, mailer and services, serve until the shutdown future
//! resolves, then drain. `run` receives its listener and shutdown signal so
//! tests start whole servers on port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use beseda_bots::BotsService;
use beseda_bus::InProcessBus;
use beseda_registry::LocalRegistry;
use beseda_routing::mail::{Mailer, OutboxMailer, SmtpMailer};
use beseda_routing::{RoutingConfig, RoutingService};
use beseda_sessions::Gateway;
use beseda_store::Store;
use beseda_store::postgres::PostgresStore;
use beseda_store::sqlite::SqliteStore;
use tokio::net::TcpListener;

use crate::config::{NodeConfig, StoreBackend};
use crate::health::{self, HealthState};

/// Everything a running node is made of, for the banner and health checks.
pub struct Node {
    pub store: Arc<dyn Store>,
    pub store_description: String,
    pub mailer: Arc<dyn Mailer>,
    pub router: axum::Router,
    pub shutdown_sender: tokio::sync::watch::Sender<bool>,
    /// The bots relay and outbound dispatcher; they stop when the shutdown
    /// signal flips and hand back what they had in flight.
    pub background: tokio::task::JoinHandle<()>,
}

async fn open_store(config: &NodeConfig) -> anyhow::Result<(Arc<dyn Store>, String)> {
    match config.store.backend {
        StoreBackend::Embedded => {
            let path = config.server.data_dir.join("beseda.db");
            let store = SqliteStore::open(&path)
                .map_err(|error| anyhow::anyhow!("{error}"))
                .with_context(|| format!("cannot open the embedded database {}", path.display()))?;
            Ok((Arc::new(store), format!("embedded SQLite {}", path.display())))
        }
        StoreBackend::Postgres => {
            let url = config.store.postgres_url.as_deref().unwrap_or_default();
            let store = match &config.store.postgres_schema {
                Some(schema) => PostgresStore::connect_in_schema(url, schema, config.store.pool_size).await,
                None => PostgresStore::connect(url, config.store.pool_size).await,
            };
            let store = store.map_err(|error| anyhow::anyhow!("{error}")).context("cannot connect to PostgreSQL")?;
            let host = url.rsplit_once('@').map(|(_, host)| host).unwrap_or(url);
            Ok((Arc::new(store), format!("PostgreSQL {host}")))
        }
    }
}

/// Builds a node in one process: every service on the embedded defaults
/// (or PostgreSQL when configured).
pub async fn build(config: &NodeConfig) -> anyhow::Result<Node> {
    config.validate()?;
    std::fs::create_dir_all(&config.server.data_dir)
        .with_context(|| format!("cannot create the data directory {}", config.server.data_dir.display()))?;
    let (store, store_description) = open_store(config).await?;
    let mailer: Arc<dyn Mailer> = match &config.mail.smtp_url {
        Some(url) => Arc::new(SmtpMailer::new(url, &config.mail.from).map_err(|error| anyhow::anyhow!("{error}"))?),
        None => Arc::new(
            OutboxMailer::new(config.outbox_dir(), &config.mail.from).map_err(|error| anyhow::anyhow!("{error}"))?,
        ),
    };
    let bus = Arc::new(InProcessBus::new());
    let registry = Arc::new(LocalRegistry::new());
    let routing = RoutingService::new(
        store.clone(),
        bus.clone(),
        mailer.clone(),
        RoutingConfig { public_url: config.public_url() },
    );
    let (shutdown_sender, shutdown) = tokio::sync::watch::channel(false);
    let outbox_signal = routing.outbox_signal();
    let routing: Arc<dyn beseda_proto::v1::routing_server::Routing> = Arc::new(routing);
    let bots = BotsService::new(store.clone(), routing.clone(), outbox_signal, config.bots_config());
    let background_service = bots.clone();
    let background_shutdown = shutdown.clone();
    let background = tokio::spawn(async move { background_service.run_background(background_shutdown).await });
    let gateway = Gateway {
        routing,
        bots: Arc::new(bots.clone()),
        processing: Arc::new(bots),
        bus,
        registry: registry.clone(),
        config: Arc::new(config.gateway_config()),
        shutdown,
    };
    let health_state = HealthState { store: store.clone(), registry, store_description: store_description.clone() };
    let router = beseda_sessions::router(gateway).merge(health::router(health_state));
    Ok(Node { store, store_description, mailer, router, shutdown_sender, background })
}

/// Serves until `shutdown` resolves; then tells WebSocket clients to
/// reconnect elsewhere and waits for connections to drain (bounded by the
/// grace period).
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node = build(&config).await?;
    let address = listener.local_addr()?;
    tracing::info!(%address, store = %node.store_description, mail = %node.mailer.describe(), "beseda is serving");
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let shutdown_sender = node.shutdown_sender;
    let background = node.background;
    let (drained_sender, drained) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, node.router).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: asking clients to reconnect elsewhere");
        let _ = shutdown_sender.send(true);
        let _ = drained_sender.send(());
    });
    let mut serving = tokio::spawn(async move { server.await });
    tokio::select! {
        // The server stopped on its own (an accept error) before any shutdown.
        joined = &mut serving => return joined.context("server task failed")?.context("server failed"),
        _ = drained => {}
    }
    let deadline = tokio::time::Instant::now() + grace;
    let served = match tokio::time::timeout_at(deadline, serving).await {
        Ok(joined) => joined.context("server task failed")?.context("server failed"),
        Err(_) => {
            tracing::warn!(grace_seconds = grace.as_secs(), "connections did not drain in time; closing");
            Ok(())
        }
    };
    // The relay and the outbound dispatcher release what they hold, so the
    // next start (or another node) delivers it at once.
    if tokio::time::timeout_at(deadline, background).await.is_err() {
        tracing::warn!(
            "the bots background tasks did not stop in time; their deliveries return after the claim timeout"
        );
    }
    served
}
