//! Beseda's system of record, behind one interface of domain operations
//! ([`Store`]). Two engines implement it: embedded SQLite (the default; one
//! file under the data directory) and PostgreSQL (tokio-postgres with a
//! deadpool connection pool) for clusters. Every operation that touches tenant
//! data takes the application id and every query filters by it: there is no
//! way to reach a row of another application through this interface.
//!
//! Each multi-row change (a message with its event, sequence number and
//! notifications) is one transaction, so what is acknowledged is stored whole.

#![forbid(unsafe_code)]

use async_trait::async_trait;
use beseda_core::Result;
use beseda_core::model::*;

/// Which users were notified of a new message and their unread count after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadAfterAppend {
    pub user_id: String,
    pub unread_in_conversation: u32,
}

/// The result of appending a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    pub message: Message,
    /// `None` when the append was a retry of an already stored message
    /// (same author and client message id): nothing new was written.
    pub event: Option<ConversationEvent>,
    pub unread: Vec<UnreadAfterAppend>,
}

/// A message to append. The store assigns `seq`; everything else is decided
/// by the caller (routing), which has already validated it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub message: Message,
    /// Users who get a notification (unread count + 1) for it. The store
    /// decides how to record them (see [`Store::append_message`]); the counts
    /// are exact either way.
    pub notify_user_ids: Vec<String>,
}

/// A change of a conversation's mutable properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConversationChange {
    pub title: Option<String>,
    pub displayed: Option<bool>,
    pub add_member_ids: Vec<String>,
    pub remove_member_ids: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserQuery {
    pub limit: u32,
    pub direction: SortDirection,
    /// Users after this one in (name, id) order.
    pub after: Option<String>,
    pub ids: Vec<String>,
    /// Case-insensitive substring of name or full name.
    pub name_contains: Option<String>,
    pub kind: Option<UserKind>,
    /// Only members of this conversation.
    pub conversation_id: Option<String>,
    pub infobase_user_id: Option<String>,
    pub matching_key: Option<String>,
    pub include_blocked: bool,
    /// Leave guest users out (they are not offered as participants).
    pub exclude_guests: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConversationQuery {
    pub limit: u32,
    pub direction: SortDirection,
    /// Paging: conversations whose (last activity, id) comes after this
    /// point in the sort direction. Last activity is the last message date,
    /// or the creation date for a conversation without messages.
    pub start_date: Option<Micros>,
    pub after_id: Option<String>,
    pub ids: Vec<String>,
    pub title_contains: Option<String>,
    /// Only conversations this user can access: a member, an
    /// all-application-users conversation, or a context conversation the
    /// user was granted access to.
    pub accessible_to: Option<String>,
    pub context: Option<(String, String)>,
    pub group: Option<bool>,
    pub displayed: Option<bool>,
    pub read_only: Option<bool>,
    pub has_context: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageQuery {
    pub limit: u32,
    pub direction: SortDirection,
    pub conversation_id: String,
    /// Messages after this one in seq order (in the sort direction).
    pub after: Option<String>,
    pub author_id: Option<String>,
    pub start_date: Option<Micros>,
    pub end_date: Option<Micros>,
    pub text_contains: Option<String>,
    pub include_deleted: bool,
}

/// Do-not-disturb settings in force for a user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DoNotDisturbState {
    /// For all the user's conversations, until this time.
    pub user_until: Option<Micros>,
    /// For one conversation, until this time.
    pub conversation_until: Option<Micros>,
}

/// Notification preferences of the users of one conversation, for deciding
/// who is notified of a new message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NotificationAudience {
    /// Users who set watch mode explicitly: (user id, watch).
    pub watch_modes: Vec<(String, bool)>,
}

/// The system of record. Implementations: [`sqlite::SqliteStore`] and
/// [`postgres::PostgresStore`]; both pass [`conformance`].
#[async_trait]
pub trait Store: BotStore + Send + Sync + 'static {
    // ---- subscribers and applications (not tenant-scoped: they define tenants)

    /// Finds the subscriber with this (lower-cased) e-mail or creates it.
    async fn upsert_subscriber(&self, email: &str) -> Result<Subscriber>;
    async fn get_subscriber(&self, subscriber_id: &str) -> Result<Option<Subscriber>>;
    async fn get_subscriber_by_email(&self, email: &str) -> Result<Option<Subscriber>>;
    async fn set_administration_key_hash(&self, subscriber_id: &str, key_hash: &str) -> Result<()>;
    /// Fails with `invalid_value` (field `newEmail`) if another subscriber has it.
    async fn change_subscriber_email(&self, subscriber_id: &str, new_email: &str) -> Result<()>;
    /// Stores a temporary administration code (hash); earlier codes stay valid until used or expired.
    async fn put_temporary_code(&self, subscriber_id: &str, code_hash: &str, expires_at: Micros) -> Result<()>;
    /// Atomically consumes an unexpired code: true at most once per code.
    async fn consume_temporary_code(&self, subscriber_id: &str, code_hash: &str, now: Micros) -> Result<bool>;

    /// Replaces any pending activation for the same e-mail and application name.
    async fn put_pending_activation(&self, activation: &PendingActivation) -> Result<()>;
    /// Atomically removes and returns the unexpired activation with this code for this e-mail.
    async fn take_pending_activation(
        &self,
        email: &str,
        code_hash: &str,
        now: Micros,
    ) -> Result<Option<PendingActivation>>;

    async fn insert_application(&self, application: &Application) -> Result<()>;
    async fn get_application(&self, application_id: &str) -> Result<Option<Application>>;
    /// Writes name, key, state and subscriber of an existing application.
    async fn update_application(&self, application: &Application) -> Result<()>;

    // ---- users

    /// Fails with `user_exists` when the infobase user id, or the pair
    /// (external system type, external user id), is already taken in the application.
    async fn insert_user(&self, application_id: &str, user: &User) -> Result<()>;
    async fn get_user(&self, application_id: &str, user_id: &str) -> Result<Option<User>>;
    async fn get_users(&self, application_id: &str, user_ids: &[String]) -> Result<Vec<User>>;
    async fn get_user_by_infobase_id(&self, application_id: &str, infobase_user_id: &str) -> Result<Option<User>>;
    /// Writes every property of an existing user; `user_not_found` otherwise.
    async fn update_user(&self, application_id: &str, user: &User) -> Result<()>;
    /// Users in (name, id) order in the query's direction.
    async fn list_users(&self, application_id: &str, query: &UserQuery) -> Result<Vec<User>>;
    async fn count_users(&self, application_id: &str) -> Result<u64>;
    /// Makes exactly these users subscriber administrators of the application.
    async fn set_subscriber_administrators(&self, application_id: &str, user_ids: &[String]) -> Result<()>;
    /// Adds one user to the subscriber administrators or removes them, leaving
    /// the others as they are, in one statement so that concurrent single
    /// changes cannot undo each other; `user_not_found` when there is no such user.
    async fn set_subscriber_administrator(
        &self,
        application_id: &str,
        user_id: &str,
        administrator: bool,
    ) -> Result<()>;

    // ---- conversations

    /// Inserts a conversation with its members. Fails with
    /// `conversation_key_taken` or `context_conversation_exists` on the
    /// uniqueness rules, checked atomically.
    async fn insert_conversation(&self, application_id: &str, conversation: &Conversation) -> Result<()>;
    async fn get_conversation(&self, application_id: &str, conversation_id: &str) -> Result<Option<Conversation>>;
    async fn get_conversation_by_key(&self, application_id: &str, key: &str) -> Result<Option<Conversation>>;
    async fn get_conversation_by_context(
        &self,
        application_id: &str,
        object_type: &str,
        object_id: &str,
    ) -> Result<Option<Conversation>>;
    /// Applies the change and appends a `ConversationChanged` event in one
    /// transaction; returns the new state and the event.
    async fn update_conversation(
        &self,
        application_id: &str,
        conversation_id: &str,
        change: &ConversationChange,
    ) -> Result<(Conversation, ConversationEvent)>;
    async fn list_conversations(&self, application_id: &str, query: &ConversationQuery) -> Result<Vec<Conversation>>;
    /// The conversation list rule (§29.4.4.1): every displayed non-context
    /// conversation the user can access that has unread notifications (newest
    /// first), then the user's other displayed non-context conversations by
    /// last activity, newest first, until `pad_to` entries.
    async fn conversation_list(&self, application_id: &str, user_id: &str, pad_to: usize) -> Result<Vec<Conversation>>;
    /// Grants or revokes the Read right on a context conversation. When
    /// someone loses access (a grant revoked, or access for everyone
    /// withdrawn), also appends a `ConversationChanged` event in the same
    /// transaction and returns it, for publishing.
    async fn set_context_access(
        &self,
        application_id: &str,
        conversation_id: &str,
        grant_user_ids: &[String],
        revoke_user_ids: &[String],
        all_application_users: Option<bool>,
    ) -> Result<Option<ConversationEvent>>;
    /// True when the user was granted access, or everyone was.
    async fn has_context_access(&self, application_id: &str, conversation_id: &str, user_id: &str) -> Result<bool>;

    // ---- messages and the event log

    /// In one transaction: returns the stored message if (author, client
    /// message id) was seen before; otherwise assigns the next seq, stores the
    /// message and its `MessageCreated` event, advances the conversation's
    /// last message date and seq, and adds a notification for each user to notify.
    /// When those users are the members' audience (the members but the author,
    /// muted members and integration users) the notification is one bump of the
    /// conversation's counter, whatever the number of members; otherwise, or for
    /// context conversations and conversations of all users, a row per user.
    async fn append_message(&self, application_id: &str, new_message: &NewMessage) -> Result<AppendOutcome>;
    /// Replaces text, format, data and buttons (and sets edited_at) and
    /// appends a `MessageEdited` event.
    async fn edit_message(&self, application_id: &str, message: &Message) -> Result<(Message, ConversationEvent)>;
    /// Marks the message deleted (content cleared, row kept for the log) and
    /// appends a `MessageDeleted` event.
    async fn delete_message(
        &self,
        application_id: &str,
        message_id: &str,
        at: Micros,
    ) -> Result<(Message, ConversationEvent)>;
    async fn get_message(&self, application_id: &str, message_id: &str) -> Result<Option<Message>>;
    async fn list_messages(&self, application_id: &str, query: &MessageQuery) -> Result<Vec<Message>>;
    /// Events with seq > `after_seq`, in seq order, at most `limit`.
    async fn events_after(
        &self,
        application_id: &str,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ConversationEvent>>;
    /// Like [`Store::events_after`], and also stopping before the stored
    /// events would exceed `max_bytes` (the first event is always returned):
    /// what a replay holds in memory at once stays bounded however large
    /// each event is.
    async fn events_after_within(
        &self,
        application_id: &str,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
        max_bytes: u64,
    ) -> Result<Vec<ConversationEvent>>;

    // ---- notifications

    async fn set_watch_mode(
        &self,
        application_id: &str,
        conversation_id: &str,
        user_id: &str,
        watch: bool,
    ) -> Result<()>;
    async fn get_watch_mode(&self, application_id: &str, conversation_id: &str, user_id: &str) -> Result<Option<bool>>;
    async fn notification_audience(&self, application_id: &str, conversation_id: &str) -> Result<NotificationAudience>;
    /// `conversation_id = None` sets the user-wide setting; `until = None` clears it.
    async fn set_do_not_disturb(
        &self,
        application_id: &str,
        user_id: &str,
        conversation_id: Option<&str>,
        until: Option<Micros>,
    ) -> Result<()>;
    async fn get_do_not_disturb(
        &self,
        application_id: &str,
        user_id: &str,
        conversation_id: Option<&str>,
    ) -> Result<DoNotDisturbState>;
    /// Of `user_ids`, those whose do-not-disturb (user-wide, or for this
    /// conversation) lasts past `now`: one query for a whole audience.
    async fn silenced_users(
        &self,
        application_id: &str,
        conversation_id: &str,
        user_ids: &[String],
        now: Micros,
    ) -> Result<Vec<String>>;
    /// Marks the user's notifications in the conversation read up to and
    /// including `up_to_seq`; returns how many stay unread there.
    async fn mark_read(
        &self,
        application_id: &str,
        conversation_id: &str,
        user_id: &str,
        up_to_seq: u64,
    ) -> Result<u32>;
    /// Unread notifications per conversation (only conversations with some).
    async fn unread_counts(&self, application_id: &str, user_id: &str) -> Result<Vec<(String, u32)>>;
}

pub use bots::BotStore;

pub mod bots;
mod bots_sql;
pub mod conformance;
mod domain;
pub use domain::SqlStore;
mod engine;
pub mod metric_families;
mod migrate;
pub mod postgres;
pub mod sqlite;
