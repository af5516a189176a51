//! Bots, integrations, event subscriptions, the transactional outbox and the
//! durable delivery queue: the [`BotStore`] half of the system of record.
//!
//! The outbox is how nothing committed is missed: every conversation change
//! writes an [`ApplicationEvent`] row in the same transaction as the change
//! (see `domain.rs`), and the bots service's relay moves each outbox row into
//! the queues of the consumers that should receive it, deleting the outbox
//! row in the same transaction. Queues keep a delivery until it is
//! acknowledged; a claim hides it for a visibility timeout, so a consumer
//! that dies mid-processing gets it again.

use async_trait::async_trait;
use beseda_core::Result;
use beseda_core::bots::*;
use beseda_core::model::Micros;

/// An outbox row waiting for the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: i64,
    pub application_id: String,
    pub event: ApplicationEvent,
}

/// How a claim hands out deliveries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub consumer_kind: ConsumerKind,
    /// Only these consumers; empty = every consumer of that kind in the application.
    pub consumer_ids: Vec<String>,
    pub now: Micros,
    /// Claimed deliveries are invisible to other claims until then; if not
    /// acknowledged or failed by that time they are handed out again.
    pub visible_again_at: Micros,
    /// A delivery already claimed this many times is moved to the dead
    /// letters instead of being handed out again.
    pub max_attempts: u32,
    pub limit: u32,
}

#[async_trait]
pub trait BotStore: Send + Sync + 'static {
    // ---- bots

    /// Fails with `bot_user_taken` when another bot already speaks as that
    /// user, and with `already_exists` for a second predefined bot of one type.
    async fn insert_bot(&self, application_id: &str, bot: &Bot) -> Result<()>;
    async fn get_bot(&self, application_id: &str, bot_id: &str) -> Result<Option<Bot>>;
    async fn get_bot_by_user(&self, application_id: &str, user_id: &str) -> Result<Option<Bot>>;
    /// Ordered by creation.
    async fn list_bots(&self, application_id: &str) -> Result<Vec<Bot>>;
    async fn update_bot(&self, application_id: &str, bot: &Bot) -> Result<()>;
    /// Deletes the bot and its queue (pending and dead deliveries).
    async fn delete_bot(&self, application_id: &str, bot_id: &str) -> Result<()>;

    // ---- integrations

    /// Fails with `integration_key_taken` when the key is in use.
    async fn insert_integration(&self, application_id: &str, integration: &Integration) -> Result<()>;
    async fn get_integration(&self, application_id: &str, integration_id: &str) -> Result<Option<Integration>>;
    /// The one lookup not scoped by application: the connection point token
    /// is what identifies the tenant of a webhook request.
    async fn find_integration_by_token(&self, token: &str) -> Result<Option<(String, Integration)>>;
    async fn list_integrations(&self, application_id: &str) -> Result<Vec<Integration>>;
    async fn update_integration(&self, application_id: &str, integration: &Integration) -> Result<()>;
    async fn delete_integration(&self, application_id: &str, integration_id: &str) -> Result<()>;

    /// The collaboration user behind an external user id of an integration.
    async fn get_integration_user(
        &self,
        application_id: &str,
        integration_id: &str,
        ext_user_id: &str,
    ) -> Result<Option<String>>;
    /// Fails with `already_exists` when the external id is mapped.
    async fn put_integration_user(
        &self,
        application_id: &str,
        integration_id: &str,
        ext_user_id: &str,
        user_id: &str,
    ) -> Result<()>;
    async fn get_integration_conversation(
        &self,
        application_id: &str,
        integration_id: &str,
        ext_conversation_id: &str,
    ) -> Result<Option<IntegrationConversation>>;
    /// Fails with `already_exists` when the external id is mapped.
    async fn put_integration_conversation(
        &self,
        application_id: &str,
        integration_id: &str,
        mapping: &IntegrationConversation,
    ) -> Result<()>;
    async fn get_integration_message(
        &self,
        application_id: &str,
        integration_id: &str,
        ext_conversation_id: &str,
        ext_message_id: &str,
    ) -> Result<Option<String>>;
    /// Fails with `already_exists` when the external id is mapped: this is
    /// what makes a replayed createMessage a 409, never a duplicate.
    async fn put_integration_message(
        &self,
        application_id: &str,
        integration_id: &str,
        ext_conversation_id: &str,
        ext_message_id: &str,
        message_id: &str,
    ) -> Result<()>;

    // ---- outbound event subscriptions

    async fn insert_subscription(&self, application_id: &str, subscription: &EventSubscription) -> Result<()>;
    async fn get_subscription(&self, application_id: &str, subscription_id: &str) -> Result<Option<EventSubscription>>;
    async fn list_subscriptions(&self, application_id: &str) -> Result<Vec<EventSubscription>>;
    async fn update_subscription(&self, application_id: &str, subscription: &EventSubscription) -> Result<()>;
    /// Deletes the subscription and its queue.
    async fn delete_subscription(&self, application_id: &str, subscription_id: &str) -> Result<()>;
    /// Applications with at least one enabled subscription (the outbound
    /// dispatcher's work list; across tenants by design).
    async fn applications_with_subscriptions(&self) -> Result<Vec<String>>;

    // ---- outbox and queues

    /// The oldest outbox rows of every application, in commit order per conversation.
    async fn outbox_batch(&self, limit: u32) -> Result<Vec<OutboxEntry>>;
    /// In one transaction: enqueues the deliveries (in the order given) and
    /// deletes the outbox rows they were derived from. Fails with
    /// `already_exists`, changing nothing, when some of those rows are gone
    /// (another relay moved them), so that no event is enqueued twice.
    async fn relay_outbox(&self, outbox_ids: &[i64], deliveries: &[(String, NewDelivery)]) -> Result<()>;
    /// Writes an event to the outbox by itself (a button press, which
    /// changes nothing else); the relay delivers it like any other.
    async fn publish_event(&self, application_id: &str, event: &ApplicationEvent) -> Result<()>;
    /// Enqueues deliveries directly (replays); they are due at once.
    async fn enqueue(&self, application_id: &str, deliveries: &[NewDelivery]) -> Result<()>;
    /// Claims up to `limit` deliveries that are due, at most one per
    /// (consumer, conversation) at a time and never one while an earlier
    /// live delivery of the same (consumer, conversation) is pending: the
    /// order of a conversation holds, and a dead letter stops blocking.
    /// Each claimed delivery's attempt count goes up by one and it is hidden
    /// until `visible_again_at`; deliveries that have used `max_attempts`
    /// become dead letters instead of being claimed.
    async fn claim(&self, application_id: &str, claim: &Claim) -> Result<Vec<Delivery>>;
    /// Removes an acknowledged delivery; false when it was not there (acknowledged before).
    async fn acknowledge(&self, application_id: &str, delivery_id: i64) -> Result<bool>;
    /// Removes acknowledged deliveries in one transaction; returns the ids
    /// that were there (the others were acknowledged before).
    async fn acknowledge_many(&self, application_id: &str, delivery_ids: &[i64]) -> Result<Vec<i64>>;
    /// Records a failed attempt: due again at `retry_at`, or a dead letter
    /// when `dead` is set.
    async fn fail(
        &self,
        application_id: &str,
        delivery_id: i64,
        error: &str,
        retry_at: Micros,
        dead: bool,
    ) -> Result<()>;
    /// Makes claimed deliveries due now again (their consumer went away),
    /// keeping their attempt counts.
    async fn release(&self, application_id: &str, delivery_ids: &[i64], now: Micros) -> Result<()>;
    /// Dead letters of one consumer kind (optionally one consumer), oldest
    /// first, after the given delivery id.
    async fn list_dead(
        &self,
        application_id: &str,
        consumer_kind: ConsumerKind,
        consumer_id: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>>;
    /// Puts dead letters back in their queues with a fresh attempt count;
    /// returns how many there were.
    async fn retry_dead(&self, application_id: &str, delivery_ids: &[i64], now: Micros) -> Result<u64>;
    /// Deletes dead letters; returns how many there were.
    async fn discard_dead(&self, application_id: &str, delivery_ids: &[i64]) -> Result<u64>;
    /// Live (not dead) deliveries queued for one consumer.
    async fn queue_depth(&self, application_id: &str, consumer_id: &str) -> Result<u64>;
    /// The earliest time a live delivery of the consumer kind becomes due,
    /// if any (so dispatchers sleep exactly as long as they may).
    async fn next_due(&self, application_id: &str, consumer_kind: ConsumerKind) -> Result<Option<Micros>>;
    /// The stored conversation events of the application (or of one
    /// conversation after `after_seq`), at or after `since`, oldest first:
    /// the source of a replay.
    async fn events_for_replay(
        &self,
        application_id: &str,
        conversation_id: Option<&str>,
        after_seq: u64,
        since: Micros,
        limit: u32,
    ) -> Result<Vec<ApplicationEvent>>;
}
