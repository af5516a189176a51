//! The bots service: bots (БотСистемыВзаимодействия) and the processing
//! connection that feeds them (ВыполнитьОбработкуБотов), inbound webhooks of
//! integrations (§29.5.4), and outbound event subscriptions.
//!
//! Everything a bot or a subscription receives comes from the store's
//! transactional outbox: the [`relay`] moves each committed event into the
//! durable queue of every consumer that should get it ([`policy`]), in the
//! same transaction that deletes the outbox row. [`processing`] hands a
//! bot's queue to the application's processing connection, [`outbound`]
//! POSTs a subscription's queue to its URL. Both remove a delivery only when
//! it is acknowledged, so nothing committed is lost to a crash on either
//! side; see docs/bots.md for the exact guarantees.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use beseda_proto::v1::routing_server::Routing;
use beseda_store::Store;

pub mod backoff;
pub mod convert;
pub mod grpc;
pub mod metric_families;
pub mod outbound;
pub mod policy;
pub mod processing;
pub mod relay;
pub mod remote;
pub mod signature;
pub mod targets;
pub mod webhook;

pub use processing::ProcessingConnector;

/// The bots service's settings.
#[derive(Clone, Debug)]
pub struct BotsConfig {
    /// How long one ExecuteBotProcessing call keeps the processing
    /// connection alive (2 minutes in the original).
    pub lease: Duration,
    /// A delivered event not acknowledged (nor failed) within this time is
    /// delivered again.
    pub ack_timeout: Duration,
    /// Attempts before an event becomes a dead letter.
    pub max_attempts: u32,
    /// Retry delay after the first failure; doubles per attempt up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Events handed to one processing connection or subscription and not
    /// yet acknowledged.
    pub max_in_flight: u32,
    /// Longest wait before the relay and dispatchers look at the store
    /// again even without a wake-up (a safety net for missed wake-ups and
    /// for events committed by other nodes).
    pub poll_interval: Duration,
    /// Timeout of one outbound HTTP POST.
    pub outbound_timeout: Duration,
    /// Public base URL of the server, for connection point URLs.
    pub public_url: String,
    /// Whether event subscriptions may POST to loopback, private and
    /// link-local addresses (see [`targets`]).
    pub allow_private_targets: bool,
}

impl Default for BotsConfig {
    fn default() -> Self {
        BotsConfig {
            lease: Duration::from_secs(120),
            ack_timeout: Duration::from_secs(30),
            max_attempts: 10,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            max_in_flight: 64,
            poll_interval: Duration::from_secs(1),
            outbound_timeout: Duration::from_secs(10),
            public_url: "http://127.0.0.1:8080".into(),
            allow_private_targets: false,
        }
    }
}

/// The bots service. Cheap to clone.
#[derive(Clone)]
pub struct BotsService {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) routing: Arc<dyn Routing>,
    pub(crate) config: Arc<BotsConfig>,
    pub(crate) processing: Arc<processing::ProcessingHub>,
    /// Wakes the relay when something was committed.
    pub(crate) relay_wakeup: Arc<tokio::sync::Notify>,
    /// Wakes the outbound dispatcher when the relay queued something.
    pub(crate) outbound_wakeup: Arc<tokio::sync::Notify>,
    /// Applications the relay just queued deliveries for, for other bots
    /// processes whose connections or dispatchers serve them.
    pub(crate) relayed: tokio::sync::broadcast::Sender<Vec<String>>,
}

impl BotsService {
    /// `relay_wakeup` is notified by routing after commits in this process.
    pub fn new(
        store: Arc<dyn Store>,
        routing: Arc<dyn Routing>,
        relay_wakeup: Arc<tokio::sync::Notify>,
        config: BotsConfig,
    ) -> Self {
        let config = Arc::new(config);
        BotsService {
            processing: Arc::new(processing::ProcessingHub::new()),
            store,
            routing,
            config,
            relay_wakeup,
            outbound_wakeup: Arc::new(tokio::sync::Notify::new()),
            relayed: tokio::sync::broadcast::channel(64).0,
        }
    }

    /// The applications each relay batch queued deliveries for (the embedding
    /// process tells other bots processes through the bus).
    pub fn relayed_applications(&self) -> tokio::sync::broadcast::Receiver<Vec<String>> {
        self.relayed.subscribe()
    }

    /// Another process's relay queued deliveries for these applications:
    /// their processing connections here, and the outbound dispatcher, look
    /// at their queues now rather than at their next poll.
    pub fn deliveries_queued(&self, application_ids: &[String]) {
        for application_id in application_ids {
            self.processing.wake(application_id);
        }
        self.outbound_wakeup.notify_one();
    }

    pub fn config(&self) -> &BotsConfig {
        &self.config
    }

    /// Tells the relay that events were committed (called after commits
    /// in this process; other processes' commits are found by polling).
    pub fn wake(&self) {
        self.relay_wakeup.notify_one();
    }

    /// Runs the relay and the outbound dispatcher until `shutdown` flips,
    /// then closes processing connections (their events stay queued).
    pub async fn run_background(&self, shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut closing_signal = shutdown.clone();
        let processing = self.processing.clone();
        let closing = async move {
            let _ = closing_signal.wait_for(|closing| *closing).await;
            processing.close_all();
        };
        tokio::join!(relay::run(self.clone(), shutdown.clone()), outbound::run(self.clone(), shutdown), closing);
    }
}
