//! The bus across a cluster, over Redis pub/sub.
//!
//! Routing nodes publish every committed event; WebSocket gateways subscribe
//! to the topics their connections follow. Redis is only the transport: the
//! event is already stored with its sequence number, so whenever Redis may
//! have dropped something (its connection was lost, a subscription was
//! confirmed late) the affected subscriptions report [`Received::Lagged`] and
//! the gateway resyncs from storage.
//!
//! # One Redis channel per topic
//!
//! A topic maps to the channel `{prefix}:{application_id}:c:{conversation_id}`
//! (a conversation), `…:u:{user_id}` (a user's notifications),
//! `…:p:{user_id}` (a user's presence) or `{prefix}:{application_id}:a` (the
//! application); `:` and `%` inside identifiers are percent-escaped so two
//! topics can never share a channel. The payload is the `BusEvent` protobuf.
//!
//! The alternative, one channel per gateway, would make the publisher find
//! out which gateways follow a topic before every publish: a registry lookup
//! on the hot path, a registry that must be updated on every subscribe (the
//! same churn, moved elsewhere), and a race between a new subscription
//! becoming visible there and an event being published, in which the event
//! is silently lost. With per-topic channels the publisher needs no lookup
//! (`PUBLISH` to a channel nobody follows is one hash lookup in Redis), and
//! each gateway receives exactly the topics its connections follow, never the
//! whole cluster's traffic.
//!
//! What it costs: a gateway subscribes once per distinct topic, however many
//! of its connections follow it. At 100,000 connections with 2–3 topics each
//! (their user, their presence, the open conversations) that is at worst
//! 200,000–300,000 channels per gateway when nothing is shared. Redis keeps,
//! per channel, the name (an object header and an sds string of about 60
//! bytes: ~80 bytes), an entry in the server's channel dict and in the
//! client's own subscription dict (~32 bytes each plus bucket slots) and a
//! subscriber list (~48 bytes, plus ~32 per subscribing gateway): about
//! 250–300 bytes, so 60–90 MB of Redis memory per fully loaded gateway in the
//! worst case, and much less when connections share conversations. Every
//! further gateway following a channel adds only its list node and dict
//! entry. The other cost is `SUBSCRIBE` churn as connections come and go: the
//! bus batches it, putting every channel that became wanted (or unwanted)
//! while the previous command was in flight into one `SUBSCRIBE`
//! (`UNSUBSCRIBE`) of up to [`CHANNELS_PER_COMMAND`] channels, so a
//! reconnect storm of thousands of connections a second costs a few commands
//! a second, not thousands.
//!
//! # Connections
//!
//! Publishing and subscribing use separate connections (a Redis connection in
//! subscribed mode can do nothing else), each driven by one task:
//!
//! - the publisher drains one ordered, bounded queue and pipelines `PUBLISH`es,
//!   so events leave in the order routing published them; after an error it
//!   reconnects with backoff and resends what it had not confirmed
//!   (at-least-once: receivers already drop events by sequence number);
//! - the subscriber owns the pub/sub connection and the set of channels
//!   subscribed on it, reconciles that set with the local topics, decodes
//!   incoming messages into the topics' broadcast channels and, after a lost
//!   connection, subscribes everything again and only then tells every topic
//!   to resync.

mod publisher;
mod subscriber;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use async_trait::async_trait;
use beseda_proto::v1::BusEvent;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use prost::Message as _;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::task::AbortHandle;

#[cfg(doc)]
use crate::Received;
use crate::{Bus, SharedEvent, Subscription, Topic, resync_marker};
use publisher::Outgoing;

/// How long [`Bus::subscribe`] waits for Redis to confirm a new channel. Past
/// it, the subscription is returned anyway and reports a lag once the channel
/// is subscribed, so a caller is never held up by a Redis outage.
pub const SUBSCRIBE_CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// Channels named in one `SUBSCRIBE` or `UNSUBSCRIBE` command: large enough
/// that resubscribing a whole gateway takes a few hundred commands, small
/// enough that one command stays a few tens of kilobytes.
pub const CHANNELS_PER_COMMAND: usize = 1_000;

/// A connection attempt that takes longer than this is treated as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first reconnection delay; it doubles up to the configured maximum.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// A smaller maximum would make a down Redis a busy loop of connection attempts.
const MIN_BACKOFF_MAX: Duration = Duration::from_millis(10);

/// How a [`RedisBus`] names its channels and bounds its work.
#[derive(Clone, Debug)]
pub struct RedisBusConfig {
    /// The first part of every channel name, so several clusters (or test
    /// runs) can share one Redis without hearing each other.
    pub channel_prefix: String,
    /// Events waiting to be sent to Redis before [`Bus::publish`] waits for
    /// room: the buffer that absorbs a Redis restart without blocking routing.
    pub publish_queue: usize,
    /// The longest pause between two reconnection attempts.
    pub reconnect_backoff_max: Duration,
    /// How often the pub/sub connection is checked with a `PING` while it
    /// is quiet. A connection that died without closing (a partition, a
    /// peer host lost) would otherwise look like a quiet bus forever.
    pub ping_interval: Duration,
    /// A command (a pipeline of `PUBLISH`es, a `SUBSCRIBE`, a `PING`) that
    /// gets no reply within this is treated as a lost connection. With
    /// `ping_interval`, it bounds how long a silently dead subscription goes
    /// unnoticed.
    pub command_timeout: Duration,
}

impl Default for RedisBusConfig {
    fn default() -> Self {
        RedisBusConfig {
            channel_prefix: "beseda".into(),
            publish_queue: 65_536,
            reconnect_backoff_max: Duration::from_secs(5),
            ping_interval: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
        }
    }
}

/// The [`Bus`] of a cluster: events published on any node reach the
/// subscribers of every node through Redis pub/sub.
pub struct RedisBus {
    shared: Arc<Shared>,
    publish_queue: mpsc::Sender<Outgoing>,
    channel_prefix: String,
    /// Host and port (or socket path) only: the URL may hold a password.
    address: String,
    subscriber_task: AbortHandle,
}

/// What the subscriber task and the subscriptions' release guards share.
struct Shared {
    /// The topics with local subscribers, by channel name. Entries are added
    /// by `subscribe` and removed only by the subscriber task, once nobody
    /// receives from them, so add and remove never race on Redis state.
    topics: DashMap<String, Arc<LocalTopic>>,
    /// Channels whose local use changed (first subscriber, last one gone):
    /// the subscriber task reconciles them with Redis.
    reconcile: mpsc::UnboundedSender<String>,
    health: Arc<Health>,
}

/// Whether each connection is currently usable.
#[derive(Default)]
struct Health {
    publisher_connected: AtomicBool,
    subscriber_connected: AtomicBool,
    /// Woken on every change, for [`RedisBus::connect`]'s initial wait.
    changed: Notify,
}

/// One topic that has local subscribers.
struct LocalTopic {
    sender: broadcast::Sender<Arc<SharedEvent>>,
    /// Read-modify-written under the watch channel's lock, so a subscriber
    /// giving up waiting and the subscriber task confirming cannot lose the
    /// resync that one of them owes.
    state: watch::Sender<TopicState>,
}

#[derive(Clone, Copy, Debug, Default)]
struct TopicState {
    /// Redis confirmed the channel on the current pub/sub connection.
    confirmed: bool,
    /// Some current subscriber may have missed events (a `subscribe` returned
    /// before confirmation, or the connection was lost): send the resync
    /// marker once the channel is confirmed.
    owes_resync: bool,
}

/// Kept in a [`Subscription`]; dropping it asks the subscriber task to check
/// whether its topic still has local subscribers.
struct ReleaseOnDrop {
    channel: String,
    /// Weak, so subscriptions outliving the bus see their channel closed
    /// instead of keeping the bus's state alive.
    shared: Weak<Shared>,
}

impl RedisBus {
    /// Connects to the Redis at `url` (`redis://[:password@]host:port[/db]`).
    ///
    /// Fails at once on an invalid URL or configuration. If Redis is only
    /// unreachable, waits up to [`SUBSCRIBE_CONFIRM_WAIT`] for it, then returns
    /// a bus that keeps reconnecting in the background (see
    /// [`RedisBus::is_connected`]).
    pub async fn connect(url: &str, config: RedisBusConfig) -> anyhow::Result<Arc<RedisBus>> {
        let client = ::redis::Client::open(url).with_context(|| format!("invalid Redis URL {:?}", redact(url)))?;
        ensure!(config.publish_queue > 0, "the Redis bus publish queue must hold at least one event");
        ensure!(!config.channel_prefix.is_empty(), "the Redis bus channel prefix must not be empty");
        ensure!(
            config.reconnect_backoff_max >= MIN_BACKOFF_MAX,
            "the Redis bus reconnect backoff maximum must be at least {MIN_BACKOFF_MAX:?}"
        );
        ensure!(
            !config.ping_interval.is_zero() && !config.command_timeout.is_zero(),
            "the Redis bus ping interval and command timeout must be longer than zero"
        );
        let timings = Timings {
            backoff_max: config.reconnect_backoff_max,
            ping_interval: config.ping_interval,
            command_timeout: config.command_timeout,
        };

        let health = Arc::new(Health::default());
        let (reconcile, reconcile_requests) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared { topics: DashMap::new(), reconcile, health: Arc::clone(&health) });
        let subscriber_task =
            tokio::spawn(subscriber::run(Arc::clone(&shared), client.clone(), reconcile_requests, timings))
                .abort_handle();
        let (publish_queue, queue) = mpsc::channel(config.publish_queue);
        // Not aborted on drop: it sends what was queued, then ends (see
        // `publisher::run`).
        tokio::spawn(publisher::run(client.clone(), queue, Arc::clone(&health), timings));

        let bus = Arc::new(RedisBus {
            shared,
            publish_queue,
            channel_prefix: config.channel_prefix,
            address: client.get_connection_info().addr().to_string(),
            subscriber_task,
        });
        if !health.wait_until_connected(SUBSCRIBE_CONFIRM_WAIT).await {
            tracing::warn!(bus = %bus.describe(), "Redis is not reachable yet; the bus keeps reconnecting");
        }
        Ok(bus)
    }

    /// Whether both the publishing and the pub/sub connection are up (for the
    /// health endpoint).
    pub fn is_connected(&self) -> bool {
        self.shared.health.publisher_connected() && self.shared.health.subscriber_connected()
    }

    /// A one-line description for logs and the health endpoint.
    pub fn describe(&self) -> String {
        let health = &self.shared.health;
        let state = match (health.publisher_connected(), health.subscriber_connected()) {
            (true, true) => "connected",
            (true, false) => "publishing, pub/sub connection reconnecting",
            (false, true) => "subscribed, publishing connection reconnecting",
            (false, false) => "disconnected, reconnecting",
        };
        format!(
            "redis pub/sub at {}, channels {}:*, {state}, {} local topics",
            self.address,
            self.channel_prefix,
            self.shared.topics.len()
        )
    }

    /// The Redis channel that carries `topic` (for operators and tests).
    pub fn channel(&self, topic: &Topic) -> String {
        channel_name(&self.channel_prefix, topic)
    }
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        // The subscriber task would otherwise keep the pub/sub connection and
        // the local topics alive forever; ending it closes every remaining
        // subscription's channel.
        self.subscriber_task.abort();
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn publish(&self, topic: &Topic, event: BusEvent) {
        let outgoing = Outgoing { channel: self.channel(topic), payload: event.encode_to_vec() };
        if self.publish_queue.send(outgoing).await.is_err() {
            // The publisher task ends only after the bus is dropped, so this
            // is a bug rather than a Redis problem; storage still has the event.
            tracing::error!(channel = %self.channel(topic), "the Redis bus publisher has stopped; event not sent");
        }
        let depth = self.publish_queue.max_capacity() - self.publish_queue.capacity();
        metrics::gauge!("beseda_bus_publish_queue_depth").set(depth as f64);
    }

    async fn subscribe(&self, topic: &Topic) -> Subscription {
        let channel = self.channel(topic);
        let (local, receiver, is_new) = match self.shared.topics.entry(channel.clone()) {
            Entry::Occupied(entry) => {
                let local = Arc::clone(entry.get());
                let receiver = local.sender.subscribe();
                (local, receiver, false)
            }
            Entry::Vacant(entry) => {
                let local = Arc::new(LocalTopic::new(topic.capacity()));
                let receiver = local.sender.subscribe();
                entry.insert(Arc::clone(&local));
                (local, receiver, true)
            }
        };
        // Built before waiting, so a caller that gives up on this future
        // still releases the topic.
        let release = ReleaseOnDrop { channel: channel.clone(), shared: Arc::downgrade(&self.shared) };
        let subscription = Subscription::new(receiver, Some(Box::new(release)));
        if is_new {
            // Cannot fail while the bus exists: the receiver is in the task
            // that `self` keeps running.
            let _ = self.shared.reconcile.send(channel);
        }
        let mut state = local.state.subscribe();
        let confirmed = tokio::time::timeout(SUBSCRIBE_CONFIRM_WAIT, state.wait_for(|state| state.confirmed)).await;
        if !matches!(confirmed, Ok(Ok(_))) {
            local.owe_resync_unless_confirmed();
        }
        subscription
    }
}

impl Shared {
    /// Drops `channel`'s topic if nobody receives from it any more; whether
    /// it is (still) wanted.
    fn keep_if_used(&self, channel: &str) -> bool {
        self.topics.remove_if(channel, |_, local| local.sender.receiver_count() == 0);
        self.topics.contains_key(channel)
    }

    /// Redis confirmed `channel` on the current pub/sub connection.
    fn confirm(&self, channel: &str) {
        if let Some(local) = self.topics.get(channel) {
            local.confirm();
        }
    }

    /// The pub/sub connection was lost: nothing is confirmed any more, and
    /// every topic's subscribers may miss events until it is back.
    fn unconfirm_all(&self) {
        for local in self.topics.iter() {
            local.unconfirm();
        }
    }
}

impl Health {
    fn publisher_connected(&self) -> bool {
        self.publisher_connected.load(Ordering::Acquire)
    }

    fn subscriber_connected(&self) -> bool {
        self.subscriber_connected.load(Ordering::Acquire)
    }

    fn set_publisher_connected(&self, connected: bool) {
        self.publisher_connected.store(connected, Ordering::Release);
        self.changed.notify_waiters();
    }

    fn set_subscriber_connected(&self, connected: bool) {
        self.subscriber_connected.store(connected, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether both connections came up within `limit`.
    async fn wait_until_connected(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before checking, so a change in between still wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.publisher_connected() && self.subscriber_connected() {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }
}

impl LocalTopic {
    fn new(capacity: usize) -> Self {
        LocalTopic { sender: broadcast::channel(capacity).0, state: watch::Sender::new(TopicState::default()) }
    }

    /// Redis confirmed the channel: wake the waiting `subscribe` calls and, if
    /// a subscriber may have missed events, tell them all to resync.
    fn confirm(&self) {
        let mut owed = false;
        self.state.send_if_modified(|state| {
            owed = state.owes_resync;
            let changed = !state.confirmed || state.owes_resync;
            *state = TopicState { confirmed: true, owes_resync: false };
            changed
        });
        if owed {
            // Fails only when nobody receives, and then nobody needs it.
            let _ = self.sender.send(resync_marker());
        }
    }

    fn unconfirm(&self) {
        self.state.send_replace(TopicState { confirmed: false, owes_resync: true });
    }

    /// A `subscribe` stopped waiting: unless the channel got confirmed in the
    /// meantime, its subscription is owed a resync on confirmation.
    fn owe_resync_unless_confirmed(&self) {
        self.state.send_if_modified(|state| {
            let owes = !state.confirmed && !state.owes_resync;
            if owes {
                state.owes_resync = true;
            }
            owes
        });
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        // A `Subscription` drops its receiver before this, so the last local
        // subscriber of a topic always sees none left; the others need not
        // wake the subscriber task (a topic shared by every connection of an
        // application would otherwise cost a wake-up per disconnect). The
        // task re-checks the count, so a racing new subscriber is kept.
        let Some(shared) = self.shared.upgrade() else { return };
        let unused = shared.topics.get(&self.channel).is_none_or(|local| local.sender.receiver_count() == 0);
        if unused {
            let _ = shared.reconcile.send(std::mem::take(&mut self.channel));
        }
    }
}

/// The timings of [`RedisBusConfig`] the connection tasks work by.
#[derive(Clone, Copy, Debug)]
struct Timings {
    backoff_max: Duration,
    ping_interval: Duration,
    command_timeout: Duration,
}

/// Pauses between reconnection attempts: doubling from [`INITIAL_BACKOFF`] to
/// a maximum, each randomised down to half so that the gateways of a cluster
/// do not all reconnect in the same instant after a Redis restart.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Backoff { next: INITIAL_BACKOFF.min(max), max }
    }

    fn next_pause(&mut self) -> Duration {
        let pause = self.next.mul_f64(rand::random_range(0.5..=1.0));
        self.next = (self.next * 2).min(self.max);
        pause
    }

    fn reset(&mut self) {
        self.next = INITIAL_BACKOFF.min(self.max);
    }
}

fn channel_name(prefix: &str, topic: &Topic) -> String {
    let (application_id, kind, id) = match topic {
        // One colon only: no application channel (which has two or more) can be it.
        Topic::Outbox => return format!("{prefix}:outbox"),
        Topic::Conversation { application_id, conversation_id } => (application_id, "c", Some(conversation_id)),
        Topic::User { application_id, user_id } => (application_id, "u", Some(user_id)),
        Topic::Presence { application_id, user_id } => (application_id, "p", Some(user_id)),
        Topic::Application { application_id } => (application_id, "a", None),
    };
    let mut name = String::with_capacity(prefix.len() + application_id.len() + id.map_or(0, String::len) + 8);
    name.push_str(prefix);
    name.push(':');
    push_escaped(&mut name, application_id);
    name.push(':');
    name.push_str(kind);
    if let Some(id) = id {
        name.push(':');
        push_escaped(&mut name, id);
    }
    name
}

/// Percent-escapes the separator (and the escape character), so that
/// identifiers containing `:` cannot make two topics share a channel.
fn push_escaped(name: &mut String, part: &str) {
    for character in part.chars() {
        match character {
            '%' => name.push_str("%25"),
            ':' => name.push_str("%3A"),
            other => name.push(other),
        }
    }
}

/// `url` without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => format!("{}://***{}", &url[..scheme_end], &url[at..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(application_id: &str, conversation_id: &str) -> Topic {
        Topic::Conversation { application_id: application_id.into(), conversation_id: conversation_id.into() }
    }

    #[test]
    fn every_kind_of_topic_has_its_own_channel() {
        let user = Topic::User { application_id: "app".into(), user_id: "u1".into() };
        let presence = Topic::Presence { application_id: "app".into(), user_id: "u1".into() };
        let application = Topic::Application { application_id: "app".into() };
        assert_eq!(channel_name("beseda", &conversation("app", "c1")), "beseda:app:c:c1");
        assert_eq!(channel_name("beseda", &user), "beseda:app:u:u1");
        assert_eq!(channel_name("beseda", &presence), "beseda:app:p:u1");
        assert_eq!(channel_name("beseda", &application), "beseda:app:a");
        assert_eq!(channel_name("staging", &application), "staging:app:a");
    }

    #[test]
    fn separators_inside_identifiers_cannot_merge_topics() {
        let first = channel_name("beseda", &conversation("a:c", "x"));
        let second = channel_name("beseda", &conversation("a", "c:x"));
        assert_ne!(first, second);
        assert_eq!(first, "beseda:a%3Ac:c:x");
        assert_eq!(channel_name("beseda", &conversation("100%", "x")), "beseda:100%25:c:x");
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(350));
        let pauses: Vec<Duration> = (0..5).map(|_| backoff.next_pause()).collect();
        let ceilings = [100, 200, 350, 350, 350].map(Duration::from_millis);
        for (pause, ceiling) in pauses.iter().zip(ceilings) {
            assert!(*pause <= ceiling && *pause >= ceiling / 2, "{pause:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
        }
        backoff.reset();
        assert!(backoff.next_pause() <= INITIAL_BACKOFF);
    }

    #[test]
    fn passwords_stay_out_of_error_messages() {
        assert_eq!(redact("redis://:secret@127.0.0.1:6379/0"), "redis://***@127.0.0.1:6379/0");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn a_late_confirmation_owes_exactly_one_resync() {
        let local = LocalTopic::new(crate::TOPIC_CAPACITY);
        let mut receiver = local.sender.subscribe();
        local.owe_resync_unless_confirmed();
        local.confirm();
        local.confirm();
        let marker = receiver.try_recv().expect("a resync marker");
        assert!(Arc::ptr_eq(&marker, &resync_marker()));
        assert!(receiver.try_recv().is_err(), "only one marker");
        // Once confirmed, giving up waiting owes nothing.
        local.owe_resync_unless_confirmed();
        local.confirm();
        assert!(receiver.try_recv().is_err());
    }
}
