//! Node configuration: defaults, then an optional TOML file, then `BESEDA_*`
//! environment variables, then command-line flags. Unknown keys in the file
//! are rejected so a typo never silently falls back to a default. Every
//! setting is listed in docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::roles::{Role, Roles};

/// The pod's name in Kubernetes: the kubelet sets `HOSTNAME` to it (and the
/// kernel's host name too); the environment comes first so that a voter
/// started outside a pod (CI's pod-environment check, a script) can be given
/// one without a UTS namespace.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|name| name.trim().to_owned()))
        .unwrap_or_default()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// HTTP API, WebSocket, health and metrics.
    pub listen: SocketAddr,
    /// Where the embedded database and the mail outbox live.
    pub data_dir: PathBuf,
    /// The URL clients use to reach this server; defaults to http://<listen>.
    pub public_url: Option<String>,
    /// This node's name in the session registry.
    pub node_id: String,
    /// Seconds to drain connections on shutdown.
    pub shutdown_grace_seconds: u64,
    /// The services this process runs (docs/deploy.md); default: gateway,
    /// routing and bots together.
    pub roles: Roles,
    /// Internal gRPC (routing, bots, registry) for the roles that serve it.
    pub grpc_listen: SocketAddr,
    /// Seconds a client has to send a request's header (the first one from
    /// the accept, later ones from their first byte).
    pub header_read_timeout_seconds: u64,
    /// Seconds an HTTP connection may wait idle between requests.
    pub keep_alive_timeout_seconds: u64,
    /// HTTP connections open at once (WebSocket ones included); more are
    /// answered 503 and closed.
    pub max_connections: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8087)),
            data_dir: PathBuf::from("data"),
            public_url: None,
            node_id: "node-1".into(),
            shutdown_grace_seconds: 10,
            roles: Roles::default(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 9087)),
            header_read_timeout_seconds: 10,
            keep_alive_timeout_seconds: 60,
            max_connections: 10_000,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// SQLite in `<data_dir>/beseda.db`.
    Embedded,
    Postgres,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    pub backend: StoreBackend,
    /// PostgreSQL URL, e.g. postgres://beseda@db:5432/beseda (backend = "postgres").
    pub postgres_url: Option<String>,
    /// Schema to keep Beseda's tables in (created if missing); default: the
    /// connection's search_path (normally `public`).
    pub postgres_schema: Option<String>,
    pub pool_size: usize,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection { backend: StoreBackend::Embedded, postgres_url: None, postgres_schema: None, pool_size: 16 }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MailSection {
    /// SMTP relay URL (smtps://user:password@host, smtp://host:25?tls=required).
    /// Without it, mail is written to the outbox directory.
    pub smtp_url: Option<String>,
    pub from: String,
    /// Defaults to `<data_dir>/outbox`.
    pub outbox_dir: Option<PathBuf>,
}

impl Default for MailSection {
    fn default() -> Self {
        MailSection { smtp_url: None, from: "Beseda <beseda@localhost>".into(), outbox_dir: None }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    pub ping_interval_seconds: u64,
    pub idle_timeout_seconds: u64,
    pub hello_timeout_seconds: u64,
    pub send_queue_capacity: usize,
    pub send_queue_bytes: usize,
    /// WebSocket connections one user may have open on one gateway.
    pub max_connections_per_user: usize,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            ping_interval_seconds: 25,
            idle_timeout_seconds: 60,
            hello_timeout_seconds: 10,
            send_queue_capacity: 1024,
            send_queue_bytes: 8 * 1024 * 1024,
            max_connections_per_user: 16,
        }
    }
}

/// Bots, webhooks and outbound event delivery.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BotsSection {
    /// How long one ExecuteBotProcessing keeps the processing connection.
    pub lease_seconds: u64,
    /// An event handed out and not acknowledged within this time is delivered again.
    pub ack_timeout_seconds: u64,
    /// Attempts before an event becomes a dead letter.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `max_backoff_milliseconds`.
    pub initial_backoff_milliseconds: u64,
    pub max_backoff_milliseconds: u64,
    /// Events handed to one processing connection or subscription at once.
    pub max_in_flight: u32,
    /// Longest time before queues are looked at again without a wake-up.
    pub poll_interval_milliseconds: u64,
    /// Timeout of one outbound event POST.
    pub outbound_timeout_seconds: u64,
    /// Let event subscriptions POST to loopback, private and link-local
    /// addresses. Off by default: tenants must not reach the operator's network.
    pub outbound_allow_private_addresses: bool,
}

impl Default for BotsSection {
    fn default() -> Self {
        BotsSection {
            lease_seconds: 120,
            ack_timeout_seconds: 30,
            max_attempts: 10,
            initial_backoff_milliseconds: 1_000,
            max_backoff_milliseconds: 300_000,
            max_in_flight: 64,
            poll_interval_milliseconds: 1_000,
            outbound_timeout_seconds: 10,
            outbound_allow_private_addresses: false,
        }
    }
}

/// How the processes of a cluster find each other.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Redis for the event bus between routing and gateways; without it the
    /// bus is in-process, which only works when they share a process.
    pub redis_url: Option<String>,
    /// Prefix of every Redis channel, so several clusters can share one Redis.
    pub redis_channel_prefix: String,
    /// gRPC URLs of the routing instances (host names are resolved and every
    /// address is used), for gateways and bots without a local routing role.
    pub routing_endpoints: Vec<String>,
    /// gRPC URLs of the bots instances, for gateways without a local bots role.
    pub bots_endpoints: Vec<String>,
    /// gRPC URLs of the registry voters, for gateways; without them presence
    /// is known to this gateway only.
    pub registry_endpoints: Vec<String>,
    /// A shared secret the services present to each other on internal gRPC.
    pub token: Option<String>,
    /// Seconds between DNS resolutions of the endpoints' host names.
    pub endpoint_refresh_seconds: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            redis_url: None,
            redis_channel_prefix: "beseda".into(),
            routing_endpoints: Vec::new(),
            bots_endpoints: Vec::new(),
            registry_endpoints: Vec::new(),
            token: None,
            endpoint_refresh_seconds: 10,
        }
    }
}

/// A registry voter (role `registry`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// This voter's id; when unset, the host name's trailing `-N` gives N+1
    /// (what a Kubernetes StatefulSet's pod names provide).
    pub id: Option<u64>,
    /// The initial voters, "id=http://host:port" each, this one included.
    pub peers: Vec<String>,
    /// A gateway that has not renewed its lease for this long is dead: its
    /// connections are dropped and its users' presence turns offline.
    pub gateway_lease_seconds: u64,
    pub heartbeat_milliseconds: u64,
    /// Minimum election timeout; the maximum is twice this.
    pub election_timeout_milliseconds: u64,
    /// Raft log entries between snapshots.
    pub snapshot_every_entries: u64,
    /// How long a gateway gathers connects and disconnects into one Raft entry.
    pub batch_window_milliseconds: u64,
}

impl Default for RegistrySection {
    fn default() -> Self {
        RegistrySection {
            id: None,
            peers: Vec::new(),
            gateway_lease_seconds: 10,
            heartbeat_milliseconds: 250,
            election_timeout_milliseconds: 1000,
            snapshot_every_entries: 5000,
            batch_window_milliseconds: 5,
        }
    }
}

/// OpenTelemetry traces.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySection {
    /// OTLP/gRPC collector, e.g. http://otel-collector:4317; tracing export
    /// is off without it.
    pub otlp_endpoint: Option<String>,
    /// Fraction of traces sampled, 0.0 to 1.0.
    pub sample_ratio: f64,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        TelemetrySection { otlp_endpoint: None, sample_ratio: 1.0 }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info,beseda_routing=debug`.
    pub filter: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { format: "text".into(), filter: "info".into() }
    }
}

/// The whole node configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub server: ServerSection,
    pub store: StoreSection,
    pub mail: MailSection,
    pub gateway: GatewaySection,
    pub bots: BotsSection,
    pub cluster: ClusterSection,
    pub registry: RegistrySection,
    pub telemetry: TelemetrySection,
    pub log: LogSection,
}

fn parse_list(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_owned).collect()
}

fn parse_env<T: std::str::FromStr>(name: &str, value: &str) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|error| anyhow::anyhow!("environment variable {name}={value:?} is invalid: {error}"))
}

/// Whether `name` has a shape of the variables Kubernetes injects into every
/// pod for every Service of its namespace (service links, on unless a pod
/// sets `enableServiceLinks: false`): for a Service `beseda-gateway`,
/// `BESEDA_GATEWAY_SERVICE_HOST`, `BESEDA_GATEWAY_SERVICE_PORT`,
/// `BESEDA_GATEWAY_SERVICE_PORT_<PORT NAME>`, and the Docker-link style
/// `BESEDA_GATEWAY_PORT=tcp://10.0.0.1:8087`,
/// `BESEDA_GATEWAY_PORT_8087_TCP[_PROTO|_PORT|_ADDR]`. A release named
/// `beseda` gives such names the server's own prefix; no setting of ours has
/// these shapes (docs/configuration.md, "Reserved names"), so they are
/// skipped rather than refused as unknown.
pub fn is_kubernetes_service_link(name: &str, value: &str) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.ends_with("_SERVICE_PORT") || name.contains("_SERVICE_PORT_") {
        return true;
    }
    let link_url = ["tcp://", "udp://", "sctp://"].iter().any(|scheme| value.starts_with(scheme));
    if name.ends_with("_PORT") && link_url {
        return true;
    }
    // <SERVICE>_PORT_<number>_<PROTOCOL>, optionally _PROTO, _PORT or _ADDR.
    let parts: Vec<&str> = name.split('_').collect();
    parts.windows(3).enumerate().any(|(index, window)| {
        let [port, number, protocol] = window else { return false };
        let rest = &parts[index + 3..];
        *port == "PORT"
            && index > 0
            && !number.is_empty()
            && number.bytes().all(|byte| byte.is_ascii_digit())
            && matches!(*protocol, "TCP" | "UDP" | "SCTP")
            && matches!(rest, [] | ["PROTO"] | ["PORT"] | ["ADDR"])
    })
}

impl NodeConfig {
    /// Reads the file (if any), then applies environment overrides.
    pub fn load(file: Option<&Path>, environment: &[(String, String)]) -> anyhow::Result<NodeConfig> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("config file {} is invalid", path.display()))?
            }
            None => NodeConfig::default(),
        };
        for (name, value) in environment {
            let Some(key) = name.strip_prefix("BESEDA_") else { continue };
            if is_kubernetes_service_link(name, value) {
                continue;
            }
            match key {
                "LISTEN" => config.server.listen = parse_env(name, value)?,
                "DATA_DIR" => config.server.data_dir = PathBuf::from(value),
                "PUBLIC_URL" => config.server.public_url = Some(value.clone()),
                "NODE_ID" => config.server.node_id = value.clone(),
                "SHUTDOWN_GRACE_SECONDS" => config.server.shutdown_grace_seconds = parse_env(name, value)?,
                "STORE_BACKEND" => {
                    config.store.backend = match value.as_str() {
                        "embedded" => StoreBackend::Embedded,
                        "postgres" => StoreBackend::Postgres,
                        other => bail!("BESEDA_STORE_BACKEND={other:?} is invalid: use embedded or postgres"),
                    }
                }
                "POSTGRES_URL" => {
                    config.store.postgres_url = Some(value.clone());
                    config.store.backend = StoreBackend::Postgres;
                }
                "POSTGRES_SCHEMA" => config.store.postgres_schema = Some(value.clone()),
                "STORE_POOL_SIZE" => config.store.pool_size = parse_env(name, value)?,
                "SMTP_URL" => config.mail.smtp_url = Some(value.clone()),
                "MAIL_FROM" => config.mail.from = value.clone(),
                "OUTBOX_DIR" => config.mail.outbox_dir = Some(PathBuf::from(value)),
                "PING_INTERVAL_SECONDS" => config.gateway.ping_interval_seconds = parse_env(name, value)?,
                "IDLE_TIMEOUT_SECONDS" => config.gateway.idle_timeout_seconds = parse_env(name, value)?,
                "SEND_QUEUE_CAPACITY" => config.gateway.send_queue_capacity = parse_env(name, value)?,
                "SEND_QUEUE_BYTES" => config.gateway.send_queue_bytes = parse_env(name, value)?,
                "MAX_CONNECTIONS_PER_USER" => config.gateway.max_connections_per_user = parse_env(name, value)?,
                "HEADER_READ_TIMEOUT_SECONDS" => config.server.header_read_timeout_seconds = parse_env(name, value)?,
                "KEEP_ALIVE_TIMEOUT_SECONDS" => config.server.keep_alive_timeout_seconds = parse_env(name, value)?,
                "MAX_CONNECTIONS" => config.server.max_connections = parse_env(name, value)?,
                "BOTS_LEASE_SECONDS" => config.bots.lease_seconds = parse_env(name, value)?,
                "BOTS_ACK_TIMEOUT_SECONDS" => config.bots.ack_timeout_seconds = parse_env(name, value)?,
                "BOTS_MAX_ATTEMPTS" => config.bots.max_attempts = parse_env(name, value)?,
                "BOTS_INITIAL_BACKOFF_MILLISECONDS" => {
                    config.bots.initial_backoff_milliseconds = parse_env(name, value)?
                }
                "BOTS_MAX_BACKOFF_MILLISECONDS" => config.bots.max_backoff_milliseconds = parse_env(name, value)?,
                "BOTS_MAX_IN_FLIGHT" => config.bots.max_in_flight = parse_env(name, value)?,
                "BOTS_POLL_INTERVAL_MILLISECONDS" => config.bots.poll_interval_milliseconds = parse_env(name, value)?,
                "BOTS_OUTBOUND_TIMEOUT_SECONDS" => config.bots.outbound_timeout_seconds = parse_env(name, value)?,
                "BOTS_OUTBOUND_ALLOW_PRIVATE_ADDRESSES" => {
                    config.bots.outbound_allow_private_addresses = parse_env(name, value)?
                }
                "ROLES" => config.server.roles = Roles::parse(value).with_context(|| format!("{name} is invalid"))?,
                "GRPC_LISTEN" => config.server.grpc_listen = parse_env(name, value)?,
                "REDIS_URL" => config.cluster.redis_url = Some(value.clone()),
                "REDIS_CHANNEL_PREFIX" => config.cluster.redis_channel_prefix = value.clone(),
                "ROUTING_ENDPOINTS" => config.cluster.routing_endpoints = parse_list(value),
                "BOTS_ENDPOINTS" => config.cluster.bots_endpoints = parse_list(value),
                "REGISTRY_ENDPOINTS" => config.cluster.registry_endpoints = parse_list(value),
                "CLUSTER_TOKEN" => config.cluster.token = Some(value.clone()),
                "ENDPOINT_REFRESH_SECONDS" => config.cluster.endpoint_refresh_seconds = parse_env(name, value)?,
                "REGISTRY_ID" => config.registry.id = Some(parse_env(name, value)?),
                "REGISTRY_PEERS" => config.registry.peers = parse_list(value),
                "REGISTRY_GATEWAY_LEASE_SECONDS" => config.registry.gateway_lease_seconds = parse_env(name, value)?,
                "REGISTRY_HEARTBEAT_MILLISECONDS" => config.registry.heartbeat_milliseconds = parse_env(name, value)?,
                "REGISTRY_ELECTION_TIMEOUT_MILLISECONDS" => {
                    config.registry.election_timeout_milliseconds = parse_env(name, value)?
                }
                "REGISTRY_SNAPSHOT_EVERY_ENTRIES" => config.registry.snapshot_every_entries = parse_env(name, value)?,
                "REGISTRY_BATCH_WINDOW_MILLISECONDS" => {
                    config.registry.batch_window_milliseconds = parse_env(name, value)?
                }
                "OTLP_ENDPOINT" => config.telemetry.otlp_endpoint = Some(value.clone()),
                "TRACE_SAMPLE_RATIO" => config.telemetry.sample_ratio = parse_env(name, value)?,
                "LOG_FORMAT" => config.log.format = value.clone(),
                "LOG" => config.log.filter = value.clone(),
                // Variables of other tools (tests, CI, the load generator) share the prefix.
                _ if ["TEST_", "CTL_", "LOADTEST_", "BENCH_"].iter().any(|tool| key.starts_with(tool)) => {}
                _ => bail!("unknown environment variable {name}; see docs/configuration.md for the list"),
            }
        }
        Ok(config)
    }

    /// Checks everything that can be checked before starting.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.store.backend == StoreBackend::Postgres && self.store.postgres_url.is_none() {
            bail!("store.backend = \"postgres\" needs store.postgres_url (or BESEDA_POSTGRES_URL)");
        }
        if self.store.pool_size == 0 {
            bail!("store.pool_size must be at least 1");
        }
        if self.gateway.ping_interval_seconds == 0
            || self.gateway.idle_timeout_seconds <= self.gateway.ping_interval_seconds
        {
            bail!("gateway.idle_timeout_seconds must be greater than gateway.ping_interval_seconds (> 0)");
        }
        if self.gateway.send_queue_capacity < 16 {
            bail!("gateway.send_queue_capacity must be at least 16");
        }
        if self.gateway.send_queue_bytes < 1024 * 1024 {
            bail!("gateway.send_queue_bytes must be at least 1048576 (1 MiB)");
        }
        if self.gateway.max_connections_per_user == 0 {
            bail!("gateway.max_connections_per_user must be at least 1");
        }
        let server = &self.server;
        if server.header_read_timeout_seconds == 0 || server.keep_alive_timeout_seconds == 0 {
            bail!("server.header_read_timeout_seconds and server.keep_alive_timeout_seconds must be at least 1");
        }
        if server.max_connections == 0 {
            bail!("server.max_connections must be at least 1");
        }
        let bots = &self.bots;
        if bots.lease_seconds == 0 || bots.ack_timeout_seconds == 0 || bots.outbound_timeout_seconds == 0 {
            bail!("bots.lease_seconds, bots.ack_timeout_seconds and bots.outbound_timeout_seconds must be at least 1");
        }
        if bots.max_attempts == 0 || bots.max_in_flight == 0 {
            bail!("bots.max_attempts and bots.max_in_flight must be at least 1");
        }
        if bots.initial_backoff_milliseconds == 0 || bots.max_backoff_milliseconds < bots.initial_backoff_milliseconds {
            bail!("bots.initial_backoff_milliseconds must be at least 1 and at most bots.max_backoff_milliseconds");
        }
        if bots.poll_interval_milliseconds < 10 {
            bail!("bots.poll_interval_milliseconds must be at least 10");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!("log.format must be \"text\" or \"json\"");
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            bail!("telemetry.sample_ratio must be between 0.0 and 1.0");
        }
        self.validate_roles()
    }

    /// The combinations of roles and endpoints that can work.
    fn validate_roles(&self) -> anyhow::Result<()> {
        let roles = &self.server.roles;
        let cluster = &self.cluster;
        let split = !roles.is_all_in_one();
        if roles.has(Role::Gateway) && !roles.has(Role::Routing) && cluster.routing_endpoints.is_empty() {
            bail!(
                "a gateway without the routing role needs cluster.routing_endpoints (BESEDA_ROUTING_ENDPOINTS), the routing instances' gRPC URLs"
            );
        }
        if roles.has(Role::Bots) && !roles.has(Role::Routing) && cluster.routing_endpoints.is_empty() {
            bail!("the bots role without the routing role needs cluster.routing_endpoints (BESEDA_ROUTING_ENDPOINTS)");
        }
        if roles.has(Role::Gateway) && !roles.has(Role::Bots) && cluster.bots_endpoints.is_empty() {
            bail!(
                "a gateway without the bots role needs cluster.bots_endpoints (BESEDA_BOTS_ENDPOINTS), the bots instances' gRPC URLs"
            );
        }
        if split && (roles.has(Role::Gateway) || roles.has(Role::Routing)) && cluster.redis_url.is_none() {
            bail!(
                "gateways and routing in separate processes exchange events through Redis: set cluster.redis_url (BESEDA_REDIS_URL)"
            );
        }
        if split && roles.needs_store() && self.store.backend == StoreBackend::Embedded {
            bail!(
                "routing and bots in separate processes share one database: set store.backend = \"postgres\" (BESEDA_POSTGRES_URL); the embedded store belongs to one process"
            );
        }
        if roles.has(Role::Registry) {
            self.registry_peers()?;
            self.registry_id()?;
            if split && cluster.redis_url.is_none() {
                bail!(
                    "a registry voter announces the users of expired gateways offline through Redis: set cluster.redis_url (BESEDA_REDIS_URL)"
                );
            }
        }
        if self.cluster.endpoint_refresh_seconds == 0 {
            bail!("cluster.endpoint_refresh_seconds must be at least 1");
        }
        let registry = &self.registry;
        if registry.gateway_lease_seconds == 0 || registry.heartbeat_milliseconds == 0 {
            bail!("registry.gateway_lease_seconds and registry.heartbeat_milliseconds must be at least 1");
        }
        if registry.election_timeout_milliseconds < 3 * registry.heartbeat_milliseconds {
            bail!(
                "registry.election_timeout_milliseconds must be at least three heartbeats (3 × registry.heartbeat_milliseconds), or followers start elections against a live leader"
            );
        }
        Ok(())
    }

    /// The registry voters: id → gRPC URL.
    pub fn registry_peers(&self) -> anyhow::Result<std::collections::BTreeMap<u64, String>> {
        let mut peers = std::collections::BTreeMap::new();
        for peer in &self.registry.peers {
            let Some((id, url)) = peer.split_once('=') else {
                bail!("registry.peers entry {peer:?} must look like 1=http://registry-0:9087");
            };
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("registry.peers entry {peer:?}: the id must be a number"))?;
            if !url.starts_with("http://") && !url.starts_with("https://") {
                bail!("registry.peers entry {peer:?}: the address must be an http:// or https:// gRPC URL");
            }
            if peers.insert(id, url.trim().to_owned()).is_some() {
                bail!("registry.peers names voter {id} twice");
            }
        }
        if peers.is_empty() {
            bail!(
                "the registry role needs registry.peers (BESEDA_REGISTRY_PEERS), e.g. 1=http://r0:9087,2=http://r1:9087,3=http://r2:9087"
            );
        }
        Ok(peers)
    }

    /// This voter's id: configured, or the StatefulSet ordinal + 1.
    pub fn registry_id(&self) -> anyhow::Result<u64> {
        let id = match self.registry.id {
            Some(id) => id,
            None => {
                let host = hostname();
                let ordinal = host.rsplit_once('-').and_then(|(_, ordinal)| ordinal.parse::<u64>().ok());
                match ordinal {
                    Some(ordinal) => ordinal + 1,
                    None => bail!(
                        "registry.id (BESEDA_REGISTRY_ID) is not set and the host name {host:?} does not end in -N to derive it from"
                    ),
                }
            }
        };
        let peers = self.registry_peers()?;
        if !peers.contains_key(&id) {
            bail!("this registry voter's id {id} is not among registry.peers ({:?})", peers.keys().collect::<Vec<_>>());
        }
        Ok(id)
    }

    /// The HTTP listener's timeouts and cap, as configured.
    pub fn http_limits(&self) -> crate::http_server::HttpLimits {
        crate::http_server::HttpLimits {
            header_read_timeout: Duration::from_secs(self.server.header_read_timeout_seconds),
            keep_alive_timeout: Duration::from_secs(self.server.keep_alive_timeout_seconds),
            max_connections: self.server.max_connections,
        }
    }

    pub fn public_url(&self) -> String {
        self.server.public_url.clone().unwrap_or_else(|| format!("http://{}", self.server.listen))
    }

    pub fn outbox_dir(&self) -> PathBuf {
        self.mail.outbox_dir.clone().unwrap_or_else(|| self.server.data_dir.join("outbox"))
    }

    pub fn bots_config(&self) -> beseda_bots::BotsConfig {
        let bots = &self.bots;
        beseda_bots::BotsConfig {
            lease: Duration::from_secs(bots.lease_seconds),
            ack_timeout: Duration::from_secs(bots.ack_timeout_seconds),
            max_attempts: bots.max_attempts,
            initial_backoff: Duration::from_millis(bots.initial_backoff_milliseconds),
            max_backoff: Duration::from_millis(bots.max_backoff_milliseconds),
            max_in_flight: bots.max_in_flight,
            poll_interval: Duration::from_millis(bots.poll_interval_milliseconds),
            outbound_timeout: Duration::from_secs(bots.outbound_timeout_seconds),
            public_url: self.public_url(),
            allow_private_targets: bots.outbound_allow_private_addresses,
        }
    }

    /// How a gateway talks to the registry voters.
    pub fn registry_client_config(&self) -> beseda_registry::ClientConfig {
        let lease = Duration::from_secs(self.registry.gateway_lease_seconds);
        beseda_registry::ClientConfig {
            batch_window: Duration::from_millis(self.registry.batch_window_milliseconds),
            // Three renewals per lease: one lost heartbeat never expires a live gateway.
            heartbeat_interval: lease / 3,
            lease,
            token: self.cluster.token.clone(),
            ..Default::default()
        }
    }

    /// This process's registry voter.
    pub fn registry_node_config(&self) -> anyhow::Result<beseda_registry::RegistryNodeConfig> {
        let registry = &self.registry;
        let mut node = beseda_registry::RegistryNodeConfig::new(
            self.registry_id()?,
            self.server.data_dir.join("registry"),
            self.registry_peers()?,
        );
        node.heartbeat_interval = Duration::from_millis(registry.heartbeat_milliseconds);
        node.election_timeout = Duration::from_millis(registry.election_timeout_milliseconds);
        node.gateway_lease = Duration::from_secs(registry.gateway_lease_seconds);
        node.snapshot_every_entries = registry.snapshot_every_entries;
        node.token = self.cluster.token.clone();
        Ok(node)
    }

    pub fn gateway_config(&self) -> beseda_sessions::GatewayConfig {
        beseda_sessions::GatewayConfig {
            node_id: self.server.node_id.clone(),
            ping_interval: Duration::from_secs(self.gateway.ping_interval_seconds),
            idle_timeout: Duration::from_secs(self.gateway.idle_timeout_seconds),
            hello_timeout: Duration::from_secs(self.gateway.hello_timeout_seconds),
            send_queue_capacity: self.gateway.send_queue_capacity,
            send_queue_bytes: self.gateway.send_queue_bytes,
            max_connections_per_user: self.gateway.max_connections_per_user,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file_and_validate() {
        let config = NodeConfig::load(None, &[]).unwrap();
        config.validate().unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8087");
        assert_eq!(config.store.backend, StoreBackend::Embedded);
    }

    #[test]
    fn unknown_keys_in_the_file_are_rejected() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("beseda.toml");
        std::fs::write(&path, "[server]\nlisten = \"0.0.0.0:9000\"\nlistne = 1\n").unwrap();
        let error = format!("{:#}", NodeConfig::load(Some(&path), &[]).unwrap_err());
        assert!(error.contains("listne"), "{error}");
    }

    #[test]
    fn environment_overrides_the_file_and_typos_are_reported() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("beseda.toml");
        std::fs::write(&path, "[server]\nlisten = \"0.0.0.0:9000\"\n").unwrap();
        let environment = vec![("BESEDA_LISTEN".to_owned(), "127.0.0.1:9100".to_owned())];
        let config = NodeConfig::load(Some(&path), &environment).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:9100");
        let typo = vec![("BESEDA_LISTN".to_owned(), "x".to_owned())];
        assert!(NodeConfig::load(None, &typo).is_err());
        let tools = vec![("BESEDA_LOADTEST_APPLICATION_KEY".to_owned(), "k".to_owned())];
        assert!(NodeConfig::load(None, &tools).is_ok(), "the load generator's variables are not the server's");
    }

    /// The variables Kubernetes injects for the chart's Services (release
    /// `beseda`) share the server's prefix and are skipped; a misspelt
    /// setting next to them is still refused.
    #[test]
    fn kubernetes_service_links_are_not_settings() {
        let mut environment: Vec<(String, String)> = Vec::new();
        for (service, port) in
            [("BESEDA_GATEWAY", 8087), ("BESEDA_REGISTRY", 9087), ("BESEDA_ROUTING_GRPC", 9087), ("BESEDA", 8087)]
        {
            let address = "10.96.0.12";
            for (name, value) in [
                (format!("{service}_SERVICE_HOST"), address.to_owned()),
                (format!("{service}_SERVICE_PORT"), port.to_string()),
                (format!("{service}_SERVICE_PORT_HTTP"), port.to_string()),
                (format!("{service}_PORT"), format!("tcp://{address}:{port}")),
                (format!("{service}_PORT_{port}_TCP"), format!("tcp://{address}:{port}")),
                (format!("{service}_PORT_{port}_TCP_PROTO"), "tcp".to_owned()),
                (format!("{service}_PORT_{port}_TCP_PORT"), port.to_string()),
                (format!("{service}_PORT_{port}_TCP_ADDR"), address.to_owned()),
            ] {
                environment.push((name, value));
            }
        }
        environment.push(("BESEDA_LISTEN".to_owned(), "0.0.0.0:8087".to_owned()));
        let config = NodeConfig::load(None, &environment).unwrap();
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:8087");

        environment.push(("BESEDA_GRPC_PORT".to_owned(), "9087".to_owned()));
        let error = format!("{:#}", NodeConfig::load(None, &environment).unwrap_err());
        assert!(error.contains("BESEDA_GRPC_PORT"), "a port number is not a service link: {error}");
        for not_a_link in ["BESEDA_PORT_8087_TCP_HOST", "BESEDA_X_PORT_80_HTTP", "BESEDA_LISTEN_PORT"] {
            assert!(!is_kubernetes_service_link(not_a_link, "1"), "{not_a_link}");
        }
    }

    #[test]
    fn split_roles_say_what_they_need() {
        let gateway = vec![("BESEDA_ROLES".to_owned(), "gateway".to_owned())];
        let error = NodeConfig::load(None, &gateway).unwrap().validate().unwrap_err().to_string();
        assert!(error.contains("BESEDA_ROUTING_ENDPOINTS"), "{error}");
        let mut environment = gateway.clone();
        environment.push(("BESEDA_ROUTING_ENDPOINTS".into(), "http://r1:9087, http://r2:9087".into()));
        environment.push(("BESEDA_BOTS_ENDPOINTS".into(), "http://b:9087".into()));
        let error = NodeConfig::load(None, &environment).unwrap().validate().unwrap_err().to_string();
        assert!(error.contains("BESEDA_REDIS_URL"), "{error}");
        environment.push(("BESEDA_REDIS_URL".into(), "redis://127.0.0.1:6379".into()));
        let config = NodeConfig::load(None, &environment).unwrap();
        config.validate().unwrap();
        assert_eq!(config.cluster.routing_endpoints, vec!["http://r1:9087", "http://r2:9087"]);

        let routing = vec![
            ("BESEDA_ROLES".to_owned(), "routing".to_owned()),
            ("BESEDA_REDIS_URL".to_owned(), "redis://127.0.0.1:6379".to_owned()),
        ];
        let error = NodeConfig::load(None, &routing).unwrap().validate().unwrap_err().to_string();
        assert!(error.contains("postgres"), "{error}");
    }

    #[test]
    fn registry_voters_are_checked() {
        let mut environment = vec![
            ("BESEDA_ROLES".to_owned(), "registry".to_owned()),
            ("BESEDA_REGISTRY_PEERS".to_owned(), "1=http://a:9087,2=http://b:9087,3=http://c:9087".to_owned()),
            ("BESEDA_REGISTRY_ID".to_owned(), "2".to_owned()),
        ];
        let error = NodeConfig::load(None, &environment).unwrap().validate().unwrap_err().to_string();
        assert!(error.contains("BESEDA_REDIS_URL"), "{error}");
        environment.push(("BESEDA_REDIS_URL".to_owned(), "redis://127.0.0.1:6379".to_owned()));
        let config = NodeConfig::load(None, &environment).unwrap();
        config.validate().unwrap();
        assert_eq!(config.registry_id().unwrap(), 2);
        assert_eq!(config.registry_peers().unwrap().len(), 3);
        environment[2].1 = "7".into();
        let error = NodeConfig::load(None, &environment).unwrap().validate().unwrap_err().to_string();
        assert!(error.contains("not among registry.peers"), "{error}");
        environment[1].1 = "1=a:9087".into();
        let error = NodeConfig::load(None, &environment).unwrap().validate().unwrap_err().to_string();
        assert!(error.contains("gRPC URL"), "{error}");
    }

    #[test]
    fn postgres_without_url_does_not_validate() {
        let mut config = NodeConfig::default();
        config.store.backend = StoreBackend::Postgres;
        assert!(config.validate().is_err());
    }
}
