//! Node configuration: defaults, then an optional TOML file, then `BESEDA_*`
//! environment variables, then command-line flags. Unknown keys in the file
//! are rejected so a typo never silently falls back to a default. Every
//! setting is listed in docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

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
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8087)),
            data_dir: PathBuf::from("data"),
            public_url: None,
            node_id: "node-1".into(),
            shutdown_grace_seconds: 10,
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
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            ping_interval_seconds: 25,
            idle_timeout_seconds: 60,
            hello_timeout_seconds: 10,
            send_queue_capacity: 1024,
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
    pub log: LogSection,
}

fn parse_env<T: std::str::FromStr>(name: &str, value: &str) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|error| anyhow::anyhow!("environment variable {name}={value:?} is invalid: {error}"))
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
                "LOG_FORMAT" => config.log.format = value.clone(),
                "LOG" => config.log.filter = value.clone(),
                // Variables of other tools (tests, CI, the load generator) share the prefix.
                _ if key.starts_with("TEST_") || key.starts_with("LOADTEST_") || key.starts_with("BENCH_") => {}
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
        Ok(())
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

    pub fn gateway_config(&self) -> beseda_sessions::GatewayConfig {
        beseda_sessions::GatewayConfig {
            node_id: self.server.node_id.clone(),
            ping_interval: Duration::from_secs(self.gateway.ping_interval_seconds),
            idle_timeout: Duration::from_secs(self.gateway.idle_timeout_seconds),
            hello_timeout: Duration::from_secs(self.gateway.hello_timeout_seconds),
            send_queue_capacity: self.gateway.send_queue_capacity,
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

    #[test]
    fn postgres_without_url_does_not_validate() {
        let mut config = NodeConfig::default();
        config.store.backend = StoreBackend::Postgres;
        assert!(config.validate().is_err());
    }
}
