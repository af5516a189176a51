//! Start-up as a straight line: validate the config, open what this
//! process's roles need (store, bus, registry, mailer), build the services
//! (local, or gRPC clients of the other processes), serve until the shutdown
//! future resolves, then drain. `run` receives its listener and shutdown
//! signal so tests start whole servers on port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use beseda_bots::BotsService;
use beseda_bots::remote::RemoteBots;
use beseda_bus::redis::{RedisBus, RedisBusConfig};
use beseda_bus::{Bus, InProcessBus};
use beseda_proto::v1::bots_server::Bots;
use beseda_proto::v1::routing_server::Routing;
use beseda_registry::{LocalRegistry, RaftRegistryClient, Registry, RegistryNode};
use beseda_routing::endpoints::ClusterClientConfig;
use beseda_routing::mail::{Mailer, OutboxMailer, SmtpMailer};
use beseda_routing::remote::RemoteRouting;
use beseda_routing::{RoutingConfig, RoutingService};
use beseda_sessions::Gateway;
use beseda_store::Store;
use beseda_store::postgres::PostgresStore;
use beseda_store::sqlite::SqliteStore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{NodeConfig, StoreBackend};
use crate::health::{self, BusHealth, HealthState};
use crate::internal_grpc;
use crate::roles::Role;

/// Everything a running process is made of.
pub struct Node {
    pub store_description: String,
    /// Where activation codes and keys go, for the log.
    pub mail_description: String,
    /// HTTP: the public API and WebSocket for a gateway; health and metrics always.
    pub router: axum::Router,
    /// Internal gRPC for the routing, bots and registry roles, when served.
    pub grpc: Option<tonic::service::Routes>,
    pub shutdown_sender: tokio::sync::watch::Sender<bool>,
    /// The bots relay and outbound dispatcher; they stop when the shutdown
    /// signal flips and hand back what they had in flight.
    pub background: Vec<JoinHandle<()>>,
    /// The registry this gateway records its connections in.
    pub registry: Option<Arc<dyn Registry>>,
    /// This process's registry voter.
    pub registry_node: Option<Arc<RegistryNode>>,
}

async fn open_store(config: &NodeConfig) -> anyhow::Result<(Arc<dyn Store>, String)> {
    match config.store.backend {
        StoreBackend::Embedded => {
            let path = config.server.data_dir.join("beseda.db");
            let store = SqliteStore::open(&path)
                .map_err(core_error)
                .with_context(|| format!("cannot open the embedded database {}", path.display()))?;
            Ok((Arc::new(store), format!("embedded SQLite {}", path.display())))
        }
        StoreBackend::Postgres => {
            let url = config.store.postgres_url.as_deref().unwrap_or_default();
            let store = match &config.store.postgres_schema {
                Some(schema) => PostgresStore::connect_in_schema(url, schema, config.store.pool_size).await,
                None => PostgresStore::connect(url, config.store.pool_size).await,
            };
            let store = store.map_err(core_error).context("cannot connect to PostgreSQL")?;
            let host = url.rsplit_once('@').map(|(_, host)| host).unwrap_or(url);
            Ok((Arc::new(store), format!("PostgreSQL {host}")))
        }
    }
}

fn open_mailer(config: &NodeConfig) -> anyhow::Result<Arc<dyn Mailer>> {
    Ok(match &config.mail.smtp_url {
        Some(url) => Arc::new(SmtpMailer::new(url, &config.mail.from).map_err(core_error)?),
        None => Arc::new(OutboxMailer::new(config.outbox_dir(), &config.mail.from).map_err(core_error)?),
    })
}

async fn open_bus(config: &NodeConfig) -> anyhow::Result<(Arc<dyn Bus>, BusHealth)> {
    match &config.cluster.redis_url {
        Some(url) => {
            let bus_config =
                RedisBusConfig { channel_prefix: config.cluster.redis_channel_prefix.clone(), ..Default::default() };
            let bus = RedisBus::connect(url, bus_config).await.context("cannot set up the Redis bus")?;
            Ok((bus.clone(), BusHealth::Redis(bus)))
        }
        None => Ok((Arc::new(InProcessBus::new()), BusHealth::InProcess)),
    }
}

fn client_config(config: &NodeConfig) -> ClusterClientConfig {
    ClusterClientConfig {
        token: config.cluster.token.clone(),
        refresh: Duration::from_secs(config.cluster.endpoint_refresh_seconds),
        ..Default::default()
    }
}

fn core_error(error: beseda_core::Error) -> anyhow::Error {
    anyhow::anyhow!("{}{}", error.field.map(|field| format!("{field}: ")).unwrap_or_default(), error.message)
}

/// Builds this process's services for its roles.
pub async fn build(config: &NodeConfig) -> anyhow::Result<Node> {
    config.validate()?;
    let roles = &config.server.roles;
    if roles.uses_data_dir() {
        std::fs::create_dir_all(&config.server.data_dir)
            .with_context(|| format!("cannot create the data directory {}", config.server.data_dir.display()))?;
    }
    let (shutdown_sender, shutdown) = tokio::sync::watch::channel(false);
    let (store, store_description) = match roles.needs_store() {
        true => {
            let (store, description) = open_store(config).await?;
            (Some(store), description)
        }
        false => (None, "none (no role of this process uses the database)".to_owned()),
    };
    let (bus, bus_health) = match roles.needs_bus(config.cluster.redis_url.is_some()) {
        true => {
            let (bus, health) = open_bus(config).await?;
            (Some(bus), health)
        }
        false => (None, BusHealth::None),
    };
    let mailer = match roles.has(Role::Routing) {
        true => Some(open_mailer(config)?),
        false => None,
    };

    let mut local_routing: Option<RoutingService> = None;
    let routing: Option<Arc<dyn Routing>> =
        if let (true, Some(store), Some(bus), Some(mailer)) = (roles.has(Role::Routing), &store, &bus, &mailer) {
            let service = RoutingService::new(
                store.clone(),
                bus.clone(),
                mailer.clone(),
                RoutingConfig { public_url: config.public_url() },
            );
            local_routing = Some(service.clone());
            Some(Arc::new(service))
        } else if roles.has(Role::Gateway) || roles.has(Role::Bots) {
            let remote = RemoteRouting::connect(&config.cluster.routing_endpoints, client_config(config))
                .await
                .map_err(core_error)
                .context("cannot set up the routing client")?;
            Some(Arc::new(remote))
        } else {
            None
        };

    let mut background = Vec::new();
    let local_bots = match (roles.has(Role::Bots), &store, &routing) {
        (true, Some(store), Some(routing)) => {
            // In one process, routing wakes the relay after each commit; a
            // bots process of its own finds commits by polling.
            let wakeup = local_routing.as_ref().map(RoutingService::outbox_signal).unwrap_or_default();
            let bots = BotsService::new(store.clone(), routing.clone(), wakeup, config.bots_config());
            let background_service = bots.clone();
            let background_shutdown = shutdown.clone();
            background.push(tokio::spawn(async move { background_service.run_background(background_shutdown).await }));
            Some(bots)
        }
        _ => None,
    };

    // Across processes, routing's outbox commits reach the bots relay over the bus.
    match (&local_routing, &local_bots, &bus) {
        (Some(routing), None, Some(bus)) => forward_outbox_commits(routing.outbox_signal(), bus.clone()),
        (_, Some(bots), Some(bus)) if config.cluster.redis_url.is_some() => {
            connect_bots_to_the_bus(bots.clone(), bus.clone()).await
        }
        _ => {}
    }

    let registry_node = match roles.has(Role::Registry) {
        true => Some(Arc::new(start_registry_node(config, bus.clone()).await?)),
        false => None,
    };

    let mut router = axum::Router::new();
    let mut registry: Option<Arc<dyn Registry>> = None;
    if roles.has(Role::Gateway) {
        let routing = routing.clone().context("a gateway needs routing")?;
        let bus = bus.clone().context("a gateway needs the bus")?;
        let (bots, processing): (Arc<dyn Bots>, Arc<dyn beseda_bots::ProcessingConnector>) = match &local_bots {
            Some(bots) => (Arc::new(bots.clone()), Arc::new(bots.clone())),
            None => {
                let remote = RemoteBots::connect(&config.cluster.bots_endpoints, client_config(config))
                    .await
                    .map_err(core_error)
                    .context("cannot set up the bots client")?;
                (Arc::new(remote.clone()), Arc::new(remote.processing()))
            }
        };
        let gateway_registry: Arc<dyn Registry> = match config.cluster.registry_endpoints.is_empty() {
            true => Arc::new(LocalRegistry::new()),
            false => {
                let client = RaftRegistryClient::start(
                    config.cluster.registry_endpoints.clone(),
                    config.server.node_id.clone(),
                    config.registry_client_config(),
                )
                .context("cannot set up the session registry client")?;
                publish_resync_changes(&client, bus.clone());
                client
            }
        };
        registry = Some(gateway_registry.clone());
        let gateway = Gateway {
            routing,
            bots,
            processing,
            bus,
            registry: gateway_registry,
            config: Arc::new(config.gateway_config()),
            user_connections: Default::default(),
            shutdown: shutdown.clone(),
        };
        router = beseda_sessions::router(gateway);
    }

    let grpc = match roles.serves_grpc() {
        true => Some(internal_grpc::routes(local_routing, local_bots, registry_node.as_deref())),
        false => None,
    };
    let health_state = HealthState {
        roles: roles.clone(),
        store: store.clone(),
        store_kind: match config.store.backend {
            StoreBackend::Embedded => "embedded SQLite",
            StoreBackend::Postgres => "PostgreSQL",
        },
        bus: bus_health,
        registry: registry.clone(),
        registry_node: registry_node.clone(),
        routing: if roles.has(Role::Routing) { None } else { routing.clone() },
    };
    health::register_metrics(roles, matches!(health_state.bus, BusHealth::Redis(_)));
    let router = router.merge(health::router(health_state));
    let mail_description = mailer.as_ref().map(|mailer| mailer.describe()).unwrap_or_else(|| "none".into());
    Ok(Node { store_description, mail_description, router, grpc, shutdown_sender, background, registry, registry_node })
}

/// Publishes "outbox rows were committed" for bots processes elsewhere; a
/// burst of commits becomes one event per few milliseconds.
fn forward_outbox_commits(signal: Arc<tokio::sync::Notify>, bus: Arc<dyn Bus>) {
    tokio::spawn(async move {
        loop {
            signal.notified().await;
            let event = beseda_proto::v1::BusEvent {
                kind: Some(beseda_proto::v1::bus_event::Kind::OutboxCommitted(beseda_proto::v1::OutboxCommitted {})),
                ..Default::default()
            };
            bus.publish(&beseda_bus::Topic::Outbox, event).await;
            tokio::time::sleep(OUTBOX_WAKEUP_COALESCING).await;
        }
    });
}

/// Commits closer together than this wake a remote relay once.
const OUTBOX_WAKEUP_COALESCING: Duration = Duration::from_millis(5);

/// Connects a bots process to the others through the bus: its relay wakes
/// when a routing node commits outbox rows, its processing connections and
/// dispatcher when another bots process's relay queued deliveries, and it
/// announces what its own relay queued. A lost wake-up costs at most the
/// poll interval.
async fn connect_bots_to_the_bus(bots: BotsService, bus: Arc<dyn Bus>) {
    use beseda_proto::v1::bus_event::Kind;
    let mut events = bus.subscribe(&beseda_bus::Topic::Outbox).await;
    let listener = bots.clone();
    tokio::spawn(async move {
        while let Some(received) = events.recv().await {
            match received {
                beseda_bus::Received::Event(event) => match &event.kind {
                    Some(Kind::OutboxCommitted(_)) => listener.wake(),
                    Some(Kind::DeliveriesQueued(queued)) => listener.deliveries_queued(&queued.application_ids),
                    _ => {}
                },
                // Missed some: look at everything.
                beseda_bus::Received::Lagged(_) => listener.wake(),
            }
        }
    });
    let mut relayed = bots.relayed_applications();
    tokio::spawn(async move {
        loop {
            let application_ids = match relayed.recv().await {
                Ok(application_ids) => application_ids,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let event = beseda_proto::v1::BusEvent {
                kind: Some(Kind::DeliveriesQueued(beseda_proto::v1::DeliveriesQueued { application_ids })),
                ..Default::default()
            };
            bus.publish(&beseda_bus::Topic::Outbox, event).await;
        }
    });
}

/// A gateway the registry had given up on (a partition longer than its
/// lease) re-sends its connections; users that come back online through
/// that are announced like any other.
fn publish_resync_changes(client: &RaftRegistryClient, bus: Arc<dyn Bus>) {
    let mut changes = client.resync_changes();
    tokio::spawn(async move {
        loop {
            match changes.recv().await {
                Ok(changes) => {
                    for (user, change) in changes {
                        let online = match change {
                            beseda_registry::PresenceChange::CameOnline => true,
                            beseda_registry::PresenceChange::WentOffline => false,
                            beseda_registry::PresenceChange::Unchanged => continue,
                        };
                        beseda_sessions::ws::publish_presence_change(bus.as_ref(), &user, online).await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// Starts this process's registry voter; users whose gateway's lease
/// lapsed are announced offline on the bus.
async fn start_registry_node(config: &NodeConfig, bus: Option<Arc<dyn Bus>>) -> anyhow::Result<RegistryNode> {
    let runtime = tokio::runtime::Handle::current();
    let on_expired: Arc<dyn Fn(Vec<beseda_registry::UserKey>) + Send + Sync> = Arc::new(move |users| {
        let Some(bus) = bus.clone() else { return };
        runtime.spawn(async move {
            for user in users {
                beseda_sessions::ws::publish_presence_change(bus.as_ref(), &user, false).await;
            }
        });
    });
    let node_config = config.registry_node_config()?;
    if node_config.peers.len() % 2 == 0 {
        tracing::warn!(
            voters = node_config.peers.len(),
            "an even number of registry voters tolerates no more failures than one fewer; use 3 or 5"
        );
    }
    RegistryNode::start(node_config, on_expired).await.context("cannot start the registry voter")
}

/// Serves until `shutdown` resolves; then tells WebSocket clients to
/// reconnect elsewhere, waits for connections to drain (bounded by the grace
/// period) and deregisters from the session registry.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grpc_listener = match config.server.roles.serves_grpc() {
        true => Some(
            TcpListener::bind(config.server.grpc_listen)
                .await
                .with_context(|| format!("cannot listen for gRPC on {}", config.server.grpc_listen))?,
        ),
        false => None,
    };
    run_with_listeners(config, listener, grpc_listener, shutdown).await
}

/// [`run`], once the gRPC listener (if any) is bound.
async fn run_with_listeners(
    config: NodeConfig,
    listener: TcpListener,
    grpc_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node = build(&config).await?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        roles = %config.server.roles,
        store = %node.store_description,
        mail = %node.mail_description,
        "beseda is serving"
    );
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let Node { router, grpc, shutdown_sender, background, registry, registry_node, .. } = node;
    let (grpc_stop_sender, grpc_stop) = tokio::sync::watch::channel(false);
    let grpc_task = match (grpc, grpc_listener) {
        (Some(routes), Some(grpc_listener)) => {
            tracing::info!(address = %grpc_listener.local_addr()?, "internal gRPC is serving");
            Some(tokio::spawn(internal_grpc::serve(routes, grpc_listener, config.cluster.token.clone(), grpc_stop)))
        }
        _ => None,
    };
    let (drained_sender, drained) = tokio::sync::oneshot::channel::<()>();
    let open_files = crate::http_server::raise_open_files_limit();
    let mut limits = config.http_limits();
    limits.max_connections = crate::http_server::effective_max_connections(limits.max_connections, open_files);
    let server = crate::http_server::serve(listener, router, limits, async move {
        shutdown.await;
        tracing::info!("shutting down: asking clients to reconnect elsewhere");
        let _ = shutdown_sender.send(true);
        let _ = drained_sender.send(());
    });
    let mut serving = tokio::spawn(server);
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
    // The connections are gone: say so at once rather than letting the
    // registry wait for this gateway's lease to run out.
    if let Some(registry) = registry
        && let Err(unavailable) = registry.node_stopping(&config.server.node_id).await
    {
        tracing::warn!(%unavailable, "could not deregister; the registry drops this gateway when its lease lapses");
    }
    // The relay and the outbound dispatcher release what they hold, so the
    // next start (or another node) delivers it at once.
    for task in background {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            tracing::warn!(
                "the bots background tasks did not stop in time; their deliveries return after the claim timeout"
            );
        }
    }
    let _ = grpc_stop_sender.send(true);
    if let Some(task) = grpc_task
        && tokio::time::timeout_at(deadline + Duration::from_secs(1), task).await.is_err()
    {
        tracing::warn!("internal gRPC calls did not finish in time");
    }
    if let Some(node) = registry_node
        && let Err(error) = node.shutdown().await
    {
        tracing::warn!(%error, "the registry voter did not shut down cleanly");
    }
    served
}
