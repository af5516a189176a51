//! The routing service: registration and tenants, users, conversations,
//! messages and notifications. It owns every rule of the domain that needs
//! storage, writes through [`beseda_store::Store`] and, after each commit,
//! publishes what changed on the [`beseda_bus::Bus`].
//!
//! Callers reach it only through the gRPC interface `beseda.v1.Routing`
//! ([`grpc`]): in one process the sessions gateway holds the service itself
//! behind that trait, in a cluster it holds a [`remote::RemoteRouting`]
//! client. Neither side can tell which.

#![forbid(unsafe_code)]

use std::sync::Arc;

use beseda_bus::{Bus, Topic};
use beseda_core::{Error, ErrorCode};
use beseda_proto::v1 as wire;
use beseda_store::Store;
use opentelemetry::trace::TraceContextExt;
use sha2::{Digest, Sha256};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub mod attempts;
pub mod auth;
pub mod buttons;
pub mod caller;
pub mod conversations;
pub mod convert;
pub mod endpoints;
pub mod grpc;
pub mod mail;
pub mod messages;
pub mod metric_families;
pub mod notifications;
pub mod registration;
pub mod remote;
pub mod status;
pub mod users;

pub use caller::Caller;

/// The server version reported by info calls and the health endpoint.
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The routing service's settings.
#[derive(Clone, Debug)]
pub struct RoutingConfig {
    /// Public base URL of this server, included in e-mails.
    pub public_url: String,
}

/// The routing service. Cheap to share: every field is an `Arc`.
#[derive(Clone)]
pub struct RoutingService {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    mailer: Arc<dyn mail::Mailer>,
    config: Arc<RoutingConfig>,
    code_attempts: Arc<attempts::AttemptLimiter>,
    code_mails: Arc<attempts::AttemptLimiter>,
    /// Temporary-code requests, apart from activation mails: a registration
    /// mail counted here would make a subscriber's address reach the limit
    /// sooner than an unknown one, which would tell who is a subscriber.
    temporary_code_mails: Arc<attempts::AttemptLimiter>,
    /// Notified after every commit that writes to the outbox, so that the
    /// bots relay moves it on at once instead of at its next poll.
    outbox_signal: Arc<tokio::sync::Notify>,
}

impl RoutingService {
    pub fn new(store: Arc<dyn Store>, bus: Arc<dyn Bus>, mailer: Arc<dyn mail::Mailer>, config: RoutingConfig) -> Self {
        RoutingService {
            store,
            bus,
            mailer,
            config: Arc::new(config),
            code_attempts: Arc::new(attempts::AttemptLimiter::new(
                attempts::MAX_WRONG_CODES,
                std::time::Duration::from_secs(3600),
                "wrong codes were given",
            )),
            code_mails: Arc::new(attempts::AttemptLimiter::new(
                attempts::MAX_CODE_MAILS,
                std::time::Duration::from_secs(3600),
                "code e-mails were requested within an hour",
            )),
            temporary_code_mails: Arc::new(attempts::AttemptLimiter::new(
                attempts::MAX_CODE_MAILS,
                std::time::Duration::from_secs(3600),
                "temporary codes were requested within an hour",
            )),
            outbox_signal: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// What the bots relay waits on.
    pub fn outbox_signal(&self) -> Arc<tokio::sync::Notify> {
        self.outbox_signal.clone()
    }

    async fn publish_conversation_event(&self, application_id: &str, event: &beseda_core::model::ConversationEvent) {
        // Every change with a conversation event wrote an outbox row with it.
        self.outbox_signal.notify_one();
        let topic = Topic::Conversation {
            application_id: application_id.to_owned(),
            conversation_id: event.conversation_id.clone(),
        };
        let bus_event = wire::BusEvent {
            application_id: application_id.to_owned(),
            trace_context: Default::default(),
            kind: Some(wire::bus_event::Kind::ConversationEvent(convert::event_to_wire(event))),
        };
        self.publish(&topic, bus_event).await;
    }

    /// Tells every connection of the application to authenticate again.
    async fn publish_credentials_changed(&self, application_id: &str, reason: &str) {
        let topic = Topic::Application { application_id: application_id.to_owned() };
        let bus_event = wire::BusEvent {
            application_id: application_id.to_owned(),
            trace_context: Default::default(),
            kind: Some(wire::bus_event::Kind::ApplicationCredentialsChanged(wire::ApplicationCredentialsChanged {
                reason: reason.to_owned(),
            })),
        };
        self.publish(&topic, bus_event).await;
    }

    async fn publish_user_event(&self, application_id: &str, user_id: &str, kind: wire::user_event::Kind) {
        let topic = Topic::User { application_id: application_id.to_owned(), user_id: user_id.to_owned() };
        let bus_event = wire::BusEvent {
            application_id: application_id.to_owned(),
            trace_context: Default::default(),
            kind: Some(wire::bus_event::Kind::UserEvent(wire::UserEvent {
                user_id: user_id.to_owned(),
                kind: Some(kind),
            })),
        };
        self.publish(&topic, bus_event).await;
    }

    /// Publishes a committed event in a `bus.publish` span. The event carries
    /// that span's trace context, so the gateway that delivers it continues
    /// the trace (left empty when tracing is off).
    async fn publish(&self, topic: &Topic, mut bus_event: wire::BusEvent) {
        let topic_kind = topic.kind();
        let span = tracing::info_span!("bus.publish", topic_kind);
        let context = span.context();
        if context.span().span_context().is_valid() {
            opentelemetry::global::get_text_map_propagator(|propagator| {
                propagator.inject_context(&context, &mut bus_event.trace_context)
            });
        }
        self.bus.publish(topic, bus_event).instrument(span).await;
        metrics::counter!("beseda_bus_published_events_total", "topic_kind" => topic_kind).increment(1);
    }
}

/// SHA-256 of a secret, hex-encoded. Secrets that the server only needs to
/// check (administration keys, codes) are stored this way.
pub(crate) fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.trim().as_bytes()))
}

/// A random secret of 32 bytes, hex-encoded (256 bits).
pub(crate) fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// An eight-digit code for e-mails (activation, temporary administration).
pub(crate) fn new_code() -> String {
    format!("{:08}", rand::random_range(0..100_000_000u32))
}

pub(crate) fn not_found(code: ErrorCode, what: &str, id: &str) -> Error {
    Error::new(code, format!("{what} `{id}` does not exist in this application"))
}
