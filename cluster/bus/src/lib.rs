//! The bus carries committed events from the routing service to the gateways
//! that have interested connections. It is a transport, not a store: every
//! event it carries is already in the system of record with its sequence
//! number, so a subscriber that lags or misses something recovers from
//! storage (see docs/ARCHITECTURE.md, "Delivery").
//!
//! Subscriptions are per topic and bounded: a receiver that falls more than
//! [`TOPIC_CAPACITY`] events behind is told how many it lost
//! ([`Received::Lagged`]) instead of slowing the publisher down.

#![forbid(unsafe_code)]

pub mod metric_families;
pub mod redis;

use std::any::Any;
use std::sync::{Arc, LazyLock, OnceLock};

use async_trait::async_trait;
use beseda_proto::v1::BusEvent;
use dashmap::DashMap;
use tokio::sync::broadcast;

pub use crate::redis::{RedisBus, RedisBusConfig};

/// Events a slow subscriber may fall behind before it must resync.
pub const TOPIC_CAPACITY: usize = 1024;

/// What a subscriber listens to. Clients never subscribe to "everything".
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// The ordered events of one conversation.
    Conversation { application_id: String, conversation_id: String },
    /// Notifications, unread counts and list changes of one user.
    User { application_id: String, user_id: String },
    /// Online/offline changes of one user.
    Presence { application_id: String, user_id: String },
    /// Events about the whole application (its credentials changed).
    Application { application_id: String },
    /// Commits that wrote outbox rows, of every application: wakes the bots
    /// relay when it runs in another process. Carries no tenant data.
    Outbox,
}

impl Topic {
    /// The topic's kind, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Topic::Conversation { .. } => "conversation",
            Topic::User { .. } => "user",
            Topic::Presence { .. } => "presence",
            Topic::Application { .. } => "application",
            Topic::Outbox => "outbox",
        }
    }

    /// Events a subscriber of this topic may fall behind before it must
    /// resync from storage. tokio allocates every slot of a broadcast
    /// channel up front (about 32 bytes each), and a gateway holds one
    /// channel per user topic of its connections, so only conversations,
    /// whose channels connections share and whose bursts are largest, get
    /// the full [`TOPIC_CAPACITY`]; a user's own events need a quarter, and
    /// presence and application events come one at a time.
    pub fn capacity(&self) -> usize {
        match self {
            Topic::Conversation { .. } => TOPIC_CAPACITY,
            Topic::User { .. } => TOPIC_CAPACITY / 4,
            Topic::Presence { .. } | Topic::Application { .. } | Topic::Outbox => 16,
        }
    }
}

/// A published event as every local subscriber of its topic receives it:
/// one allocation shared by all of them, with one slot for what they all
/// derive from it alike, made by the first subscriber that asks and reused
/// by the others. A gateway keeps an event's encoded client frames there, so
/// an event of a conversation that 500 connections follow is encoded once
/// per encoding instead of 500 times (docs/BENCHMARKS.md: encoding per
/// connection was most of `ws::write_frames`' 13.7 % of the fan-out profile).
pub struct SharedEvent {
    event: BusEvent,
    derived: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl SharedEvent {
    pub fn new(event: BusEvent) -> Self {
        SharedEvent { event, derived: OnceLock::new() }
    }

    pub fn event(&self) -> &BusEvent {
        &self.event
    }

    /// What `derive` makes of this event: made by the first caller, shared
    /// with every later one. `None` when the slot already holds another
    /// type (a process has one kind of subscriber per topic, so in practice
    /// that does not happen; the caller then derives its own).
    pub fn derived<T: Any + Send + Sync>(&self, derive: impl FnOnce() -> T) -> Option<&T> {
        self.derived.get_or_init(|| Box::new(derive())).downcast_ref()
    }
}

impl std::ops::Deref for SharedEvent {
    type Target = BusEvent;

    fn deref(&self) -> &BusEvent {
        &self.event
    }
}

impl std::fmt::Debug for SharedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.event.fmt(f)
    }
}

impl From<BusEvent> for SharedEvent {
    fn from(event: BusEvent) -> Self {
        SharedEvent::new(event)
    }
}

/// One received item.
#[derive(Debug)]
pub enum Received {
    Event(Arc<SharedEvent>),
    /// This many events were dropped for this subscriber; resync from storage.
    Lagged(u64),
}

/// The one event a broker-backed bus sends on a topic's broadcast channel to
/// tell every current subscriber that it may have missed events (the broker
/// connection was lost, or a subscription was confirmed only after
/// `subscribe` had returned). A `broadcast` channel can only report a lag by
/// overflowing, so the bus sends this instead and [`Subscription::recv`]
/// turns it into [`Received::Lagged`]. It is recognised by identity: no
/// published event can be this allocation.
static RESYNC_MARKER: LazyLock<Arc<SharedEvent>> = LazyLock::new(|| Arc::new(SharedEvent::new(BusEvent::default())));

/// A handle on [`RESYNC_MARKER`] to send on a topic's channel.
pub(crate) fn resync_marker() -> Arc<SharedEvent> {
    Arc::clone(&RESYNC_MARKER)
}

/// A subscription to one topic. Dropping it unsubscribes.
pub struct Subscription {
    receiver: broadcast::Receiver<Arc<SharedEvent>>,
    /// Dropped with the subscription, after `receiver` (fields drop in
    /// order): lets a bus notice its last local subscriber leaving (the
    /// Redis bus then unsubscribes the channel).
    _release: Option<Box<dyn Send + Sync>>,
}

impl Subscription {
    /// A subscription fed by `receiver`; `release` is dropped when it is.
    pub fn new(receiver: broadcast::Receiver<Arc<SharedEvent>>, release: Option<Box<dyn Send + Sync>>) -> Self {
        Subscription { receiver, _release: release }
    }

    /// The next event, or `None` when the bus is gone.
    pub async fn recv(&mut self) -> Option<Received> {
        match self.receiver.recv().await {
            Ok(event) if Arc::ptr_eq(&event, &RESYNC_MARKER) => Some(Received::Lagged(1)),
            Ok(event) => Some(Received::Event(event)),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(Received::Lagged(missed)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// Converts into a stream, for use with `tokio_stream::StreamMap`.
    pub fn into_stream(self) -> impl futures_util::Stream<Item = Received> + Send + Unpin + 'static {
        Box::pin(futures_util::stream::unfold(self, |mut subscription| async move {
            subscription.recv().await.map(|item| (item, subscription))
        }))
    }
}

/// Fan-out of committed events.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    async fn publish(&self, topic: &Topic, event: BusEvent);
    /// Returns once events published from now on will be received (for a
    /// remote bus: once the broker confirmed the subscription, or once it is
    /// known to be unreachable, in which case the subscription reports
    /// [`Received::Lagged`] when it starts receiving, so the subscriber
    /// resyncs from storage). Callers subscribe before reading the log.
    async fn subscribe(&self, topic: &Topic) -> Subscription;
}

/// The embedded bus: one broadcast channel per topic with live subscribers.
#[derive(Default)]
pub struct InProcessBus {
    topics: DashMap<Topic, broadcast::Sender<Arc<SharedEvent>>>,
}

impl InProcessBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Topics that currently have a channel (for metrics and tests).
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }
}

#[async_trait]
impl Bus for InProcessBus {
    async fn publish(&self, topic: &Topic, event: BusEvent) {
        // Nobody listening: nothing to do, and the topic's channel is dropped
        // so idle topics do not accumulate.
        let Some(sender) = self.topics.get(topic).map(|entry| entry.value().clone()) else {
            return;
        };
        if sender.send(Arc::new(SharedEvent::new(event))).is_err() {
            self.topics.remove_if(topic, |_, sender| sender.receiver_count() == 0);
        }
    }

    async fn subscribe(&self, topic: &Topic) -> Subscription {
        let receiver =
            self.topics.entry(topic.clone()).or_insert_with(|| broadcast::channel(topic.capacity()).0).subscribe();
        Subscription::new(receiver, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beseda_proto::v1::{ConversationEvent, bus_event};

    fn topic() -> Topic {
        Topic::Conversation { application_id: "app".into(), conversation_id: "c1".into() }
    }

    fn event(seq: u64) -> BusEvent {
        BusEvent {
            application_id: "app".into(),
            kind: Some(bus_event::Kind::ConversationEvent(ConversationEvent {
                conversation_id: "c1".into(),
                seq,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn seq_of(received: Received) -> u64 {
        match received {
            Received::Event(event) => match &event.kind {
                Some(bus_event::Kind::ConversationEvent(event)) => event.seq,
                other => panic!("unexpected event {other:?}"),
            },
            Received::Lagged(missed) => panic!("lagged by {missed}"),
        }
    }

    #[tokio::test]
    async fn subscribers_receive_events_in_publish_order() {
        let bus = InProcessBus::new();
        let mut first = bus.subscribe(&topic()).await;
        let mut second = bus.subscribe(&topic()).await;
        for seq in 1..=3 {
            bus.publish(&topic(), event(seq)).await;
        }
        for seq in 1..=3 {
            assert_eq!(seq_of(first.recv().await.unwrap()), seq);
            assert_eq!(seq_of(second.recv().await.unwrap()), seq);
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_told_how_many_it_lost() {
        let bus = InProcessBus::new();
        let mut slow = bus.subscribe(&topic()).await;
        for seq in 1..=(TOPIC_CAPACITY as u64 + 5) {
            bus.publish(&topic(), event(seq)).await;
        }
        match slow.recv().await.unwrap() {
            Received::Lagged(missed) => assert_eq!(missed, 5),
            Received::Event(_) => panic!("expected a lag report"),
        }
        assert_eq!(seq_of(slow.recv().await.unwrap()), 6);
    }

    #[tokio::test]
    async fn topics_without_subscribers_are_dropped() {
        let bus = InProcessBus::new();
        let subscription = bus.subscribe(&topic()).await;
        assert_eq!(bus.topic_count(), 1);
        drop(subscription);
        bus.publish(&topic(), event(1)).await;
        assert_eq!(bus.topic_count(), 0);
    }
}
