//! The WebSocket client protocol (docs/protocol.md).
//!
//! One task per connection reads frames and bus events; one writer task
//! drains a bounded queue into the socket, batching whatever is queued into
//! one flush. Slow consumers: when a connection's queue is full, the
//! connection is closed with `slow_consumer` instead of buffering without
//! bound or slowing others down; the client reconnects and resumes from its
//! last seq, losing nothing (every event is in storage).
//!
//! Conversation events reach a client exactly once and in seq order: live
//! events at or below the last seq sent are dropped, and a gap (or a bus
//! lag) is filled from the conversation's event log before going on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use beseda_bus::{Received, SharedEvent, Topic};
use beseda_core::limits::MAX_FRAME_BYTES;
use beseda_core::{Error, ErrorCode, Result};
use beseda_proto::v1::{self as wire, client_frame, server_frame};
use beseda_registry::{PresenceChange, UserKey};
use beseda_routing::{Caller, status};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio_stream::StreamMap;

use crate::Gateway;

mod outbox;
mod replay;

/// Frames are answered in the encoding they came in; pushes use the Hello's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Protobuf,
}

struct Outgoing {
    frame: wire::ServerFrame,
    encoding: Encoding,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum StreamKey {
    Application,
    User,
    Conversation(String),
    Presence(String),
}

type BusStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Received> + Send>>;

/// Longer than any live delivery: a larger gap between an event's `at` and
/// its push is a backdated message, not latency.
const MAX_FANOUT_LATENCY: std::time::Duration = std::time::Duration::from_secs(600);

pub async fn upgrade(State(gateway): State<Gateway>, upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .read_buffer_size(crate::READ_BUFFER_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| serve_connection(gateway, socket))
}

/// Decodes one client frame; `Ok(None)` for control frames.
pub fn decode_frame(message: &WsMessage) -> Result<Option<(wire::ClientFrame, Encoding)>> {
    match message {
        WsMessage::Text(text) => {
            serde_json::from_str(text.as_str()).map(|frame| Some((frame, Encoding::Json))).map_err(|error| {
                Error::new(ErrorCode::MalformedRequest, format!("the text frame is not a ClientFrame in JSON: {error}"))
            })
        }
        WsMessage::Binary(bytes) => {
            wire::ClientFrame::decode(bytes.as_ref()).map(|frame| Some((frame, Encoding::Protobuf))).map_err(|error| {
                Error::new(
                    ErrorCode::MalformedRequest,
                    format!("the binary frame is not a protobuf ClientFrame: {error}"),
                )
            })
        }
        _ => Ok(None),
    }
}

fn encode_frame(outgoing: &Outgoing) -> WsMessage {
    match outgoing.encoding {
        Encoding::Json => match serde_json::to_string(&outgoing.frame) {
            Ok(text) => WsMessage::Text(text.into()),
            Err(error) => {
                tracing::error!(%error, "server frame does not encode as json");
                WsMessage::Text(r#"{"error":{"code":"internal","message":"frame encoding failed"}}"#.into())
            }
        },
        Encoding::Protobuf => WsMessage::Binary(outgoing.frame.encode_to_vec().into()),
    }
}

/// The frame a bus event is pushed as, encoded at most once per encoding
/// on this gateway and kept with the event (`SharedEvent::derived`) for
/// every connection that pushes it. A pushed frame carries no per-connection
/// field (request id 0, no subscription id), so connections of one encoding
/// send the very same bytes; the message holds them reference counted, and
/// queuing a clone copies nothing.
#[derive(Default)]
struct SharedFrames {
    json: OnceLock<WsMessage>,
    protobuf: OnceLock<WsMessage>,
}

impl SharedFrames {
    fn get(&self, encoding: Encoding, body: impl FnOnce() -> server_frame::Body) -> WsMessage {
        let slot = match encoding {
            Encoding::Json => &self.json,
            Encoding::Protobuf => &self.protobuf,
        };
        slot.get_or_init(|| push_frame(body(), encoding)).clone()
    }
}

/// A push (request id 0) in `encoding`.
fn push_frame(body: server_frame::Body, encoding: Encoding) -> WsMessage {
    encode_frame(&Outgoing { frame: wire::ServerFrame { request_id: 0, body: Some(body) }, encoding })
}

/// Whether routing refused because the user may no longer read the
/// conversation (rather than because it could not answer).
fn lost_access(error: &Error) -> bool {
    matches!(error.code, ErrorCode::NotAMember | ErrorCode::ConversationNotFound | ErrorCode::UserKindRestricted)
}

fn error_frame(request_id: u64, error: &Error) -> wire::ServerFrame {
    wire::ServerFrame {
        request_id,
        body: Some(server_frame::Body::Error(wire::Error {
            code: error.code.as_str().to_owned(),
            message: error.message.clone(),
            field: error.field.clone().unwrap_or_default(),
        })),
    }
}

/// Drains the queue into the socket: takes every frame queued (one lock),
/// feeds them all into the socket's write buffer and flushes once, so a
/// burst of pushes costs one write, not one per frame.
async fn write_frames(
    mut sink: futures_util::stream::SplitSink<WebSocket, WsMessage>,
    mut queue: outbox::OutboxReceiver,
) {
    let is_data = |message: &WsMessage| u64::from(matches!(message, WsMessage::Text(_) | WsMessage::Binary(_)));
    let mut batch = outbox::Batch::new();
    while queue.recv_all(&mut batch).await {
        let mut closing = false;
        let mut data_frames = 0;
        while let Some(message) = batch.frames.pop_front() {
            closing = matches!(message, WsMessage::Close(_));
            data_frames += is_data(&message);
            if sink.feed(message).await.is_err() {
                return;
            }
            if closing {
                break;
            }
        }
        batch.frames.clear();
        queue.written(&mut batch);
        metrics::counter!("beseda_ws_frames_out_total").increment(data_frames);
        metrics::counter!("beseda_ws_flushes_total").increment(1);
        if sink.flush().await.is_err() || closing {
            let _ = sink.close().await;
            return;
        }
    }
}

/// Why a connection ended.
enum Ending {
    ClientClosed,
    Error(Error),
    Shutdown,
    /// The client sent a frame or message over the size limit.
    TooLarge,
}

/// How long the last frames (an error, a Close) get to reach a client that
/// may be reading nothing; then the socket is dropped.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether reading failed because a frame or message was over the limit.
fn too_large(error: &axum::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<tungstenite::Error>())
        .is_some_and(|error| matches!(error, tungstenite::Error::Capacity(_)))
}

fn too_large_error() -> Error {
    Error::new(
        ErrorCode::FrameTooLarge,
        format!(
            "a WebSocket frame or message may have at most {MAX_FRAME_BYTES} bytes (128 KB); send large data in binary frames or over REST"
        ),
    )
}

/// Close 1009 (message too big), with a reason that names the limit.
fn too_large_close() -> CloseFrame {
    CloseFrame {
        code: 1009,
        reason: format!("frame_too_large: at most {MAX_FRAME_BYTES} bytes per frame or message").into(),
    }
}

/// Waits a little for the writer to send the last frames, then drops it.
async fn finish_writer(mut writer: tokio::task::JoinHandle<()>) {
    if tokio::time::timeout(CLOSE_GRACE, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Ends a connection before Welcome: an error frame, then `close`.
async fn refuse(
    queue: outbox::Outbox,
    writer: tokio::task::JoinHandle<()>,
    error: &Error,
    encoding: Encoding,
    close: CloseFrame,
) {
    let _ = queue.send(encode_frame(&Outgoing { frame: error_frame(0, error), encoding }), CLOSE_GRACE).await;
    let _ = queue.send(WsMessage::Close(Some(close)), CLOSE_GRACE).await;
    drop(queue);
    finish_writer(writer).await;
    metrics::gauge!("beseda_ws_connections").decrement(1.0);
}

struct Connection {
    gateway: Gateway,
    caller: Caller,
    user_id: String,
    encoding: Encoding,
    queue: outbox::Outbox,
    /// Replays from the event log in progress, the first one advancing.
    replays: VecDeque<replay::Replay>,
    /// Request frames that arrived while a Subscribe's answer waits for its
    /// replay, answered in order after it.
    held: VecDeque<WsMessage>,
    streams: StreamMap<StreamKey, BusStream>,
    /// Last seq sent per subscribed conversation.
    conversations: HashMap<String, u64>,
    /// Message ids of the latest notifications pushed: a Redis bus resends
    /// what it is unsure of after a reconnect, and conversation events are
    /// deduplicated by seq, notifications by this.
    recent_notifications: VecDeque<String>,
    /// The connection's user kind: external users watch presence only of
    /// users they may see.
    user_kind: wire::UserKind,
    /// Subscribed conversations that list the user as a member (as of the
    /// last snapshot seen): tells removal from revoked context access.
    listed_member_of: HashSet<String>,
    /// When the token that authenticated the connection expires.
    token: Option<TokenClock>,
}

/// The expiry of the connection's token: a `tokenExpiring` push a little
/// before `exp`, then the end of the connection unless RefreshToken came.
struct TokenClock {
    /// The token's `exp`, seconds since the epoch.
    expires_at: i64,
    /// How long before `exp` the push goes out.
    notice: std::time::Duration,
    notice_sent: bool,
    /// Set when a refresh moved `exp`: the connection's timer must be reset.
    moved: bool,
}

/// The push goes out this long before `exp` at most...
const TOKEN_NOTICE_MAX: std::time::Duration = std::time::Duration::from_secs(60);
/// ...and at most this fraction of the token's remaining life before it, so
/// a short-lived token is not asked to refresh right after it was presented.
const TOKEN_NOTICE_FRACTION: u32 = 10;

impl TokenClock {
    fn new(expires_at: i64) -> TokenClock {
        let remaining = until_epoch_seconds(expires_at);
        TokenClock {
            expires_at,
            notice: TOKEN_NOTICE_MAX.min(remaining / TOKEN_NOTICE_FRACTION),
            notice_sent: false,
            moved: true,
        }
    }

    /// When the connection's token timer must fire next.
    fn next_wakeup(&self) -> tokio::time::Instant {
        let remaining = until_epoch_seconds(self.expires_at);
        let now = tokio::time::Instant::now();
        if self.notice_sent { now + remaining } else { now + remaining.saturating_sub(self.notice) }
    }
}

/// Time from now until `epoch_seconds` (zero when it has passed).
fn until_epoch_seconds(epoch_seconds: i64) -> std::time::Duration {
    let target = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(epoch_seconds).unwrap_or(0));
    target.duration_since(std::time::SystemTime::now()).unwrap_or_default()
}

fn epoch_timestamp(epoch_seconds: i64) -> beseda_proto::Timestamp {
    beseda_proto::Timestamp { seconds: epoch_seconds, nanos: 0 }
}

/// Notifications remembered per connection for deduplication.
const RECENT_NOTIFICATIONS: usize = 64;

impl Connection {
    /// Queues a push; a full queue means a slow consumer.
    fn push(&mut self, body: server_frame::Body) -> std::result::Result<(), Ending> {
        self.push_message(push_frame(body, self.encoding))
    }

    /// Queues the push of a bus event, encoded once for every connection
    /// of this gateway that pushes it in the same encoding.
    fn push_shared(
        &mut self,
        shared: &SharedEvent,
        body: impl FnOnce() -> server_frame::Body,
    ) -> std::result::Result<(), Ending> {
        let encoding = self.encoding;
        let message = match shared.derived(SharedFrames::default) {
            Some(frames) => frames.get(encoding, body),
            None => push_frame(body(), encoding),
        };
        self.push_message(message)
    }

    /// Queues an encoded push; a full queue means a slow consumer.
    fn push_message(&mut self, message: WsMessage) -> std::result::Result<(), Ending> {
        match self.queue.try_send(message) {
            Ok(()) => Ok(()),
            Err(outbox::TrySendError::Full(_)) => {
                metrics::counter!("beseda_ws_slow_consumers_total").increment(1);
                Err(Ending::Error(Error::new(
                    ErrorCode::SlowConsumer,
                    format!(
                        "more than {} frames were waiting for this connection",
                        self.gateway.config.send_queue_capacity
                    ),
                )))
            }
            Err(outbox::TrySendError::Closed(_)) => Err(Ending::ClientClosed),
        }
    }

    async fn reply(
        &mut self,
        request_id: u64,
        encoding: Encoding,
        body: server_frame::Body,
    ) -> std::result::Result<(), Ending> {
        let frame = Outgoing { frame: wire::ServerFrame { request_id, body: Some(body) }, encoding };
        self.send_waiting(encode_frame(&frame)).await
    }

    /// Called after delivering a `conversationChanged` event: whether the
    /// user may still follow the conversation. If not, the subscription ends
    /// here, before any later event. The event's snapshot decides when it
    /// lists the user (or everyone); otherwise routing is asked, because
    /// context access grants are not in the snapshot. Asking now rather than
    /// "as of this seq" only errs towards a user who regained access since,
    /// who may read those events anyway.
    async fn still_has_access(&mut self, event: &wire::ConversationEvent) -> std::result::Result<bool, Ending> {
        let Some(wire::conversation_event::Kind::ConversationChanged(conversation)) = &event.kind else {
            return Ok(true);
        };
        let listed = conversation.member_ids.contains(&self.user_id);
        let was_listed = if listed {
            !self.listed_member_of.insert(conversation.id.clone())
        } else {
            self.listed_member_of.remove(&conversation.id)
        };
        let everyone = conversation.all_application_users
            && self.user_kind != wire::UserKind::Guest
            && !(self.user_kind == wire::UserKind::External && conversation.context.is_some());
        if listed || everyone {
            return Ok(true);
        }
        let request = self.caller.request(wire::GetConversationRequest {
            conversation: Some(wire::ConversationRef {
                by: Some(wire::conversation_ref::By::Id(conversation.id.clone())),
            }),
        });
        match self.gateway.routing.get_conversation(request).await {
            Ok(_) => Ok(true),
            Err(status) => {
                let error = status::from_status(&status);
                if !lost_access(&error) {
                    // Unknown: fail closed. The client reconnects and
                    // subscribes again, which checks access afresh.
                    return Err(Ending::Error(error));
                }
                let (reason, message) = if was_listed || conversation.context.is_none() {
                    (wire::SubscriptionEndReason::Removed, "the user is no longer a member of the conversation")
                } else {
                    (
                        wire::SubscriptionEndReason::AccessRevoked,
                        "the user's access to the context conversation was revoked",
                    )
                };
                self.end_subscription(&conversation.id, reason, message).await?;
                Ok(false)
            }
        }
    }

    /// Drops a subscription the user lost access to and says why.
    async fn end_subscription(
        &mut self,
        conversation_id: &str,
        reason: wire::SubscriptionEndReason,
        message: &str,
    ) -> std::result::Result<(), Ending> {
        self.streams.remove(&StreamKey::Conversation(conversation_id.to_owned()));
        self.listed_member_of.remove(conversation_id);
        self.cancel_replays(conversation_id).await?;
        let Some(last_seq) = self.conversations.remove(conversation_id) else {
            return Ok(());
        };
        metrics::counter!("beseda_ws_subscriptions_ended_total").increment(1);
        let ended = wire::SubscriptionEnded {
            conversation_id: conversation_id.to_owned(),
            reason: reason as i32,
            last_seq,
            message: message.to_owned(),
        };
        self.reply(0, self.encoding, server_frame::Body::SubscriptionEnded(ended)).await
    }

    /// The token timer fired: first ask for a fresh token, then end the
    /// connection at `exp`.
    fn on_token_timer(&mut self) -> std::result::Result<(), Ending> {
        let Some(token) = self.token.as_mut() else {
            return Ok(());
        };
        if token.notice_sent {
            metrics::counter!("beseda_ws_tokens_expired_total").increment(1);
            return Err(Ending::Error(Error::new(
                ErrorCode::TokenExpired,
                "the connection's user token expired; connect again with a fresh token, or send refreshToken before exp",
            )));
        }
        token.notice_sent = true;
        token.moved = true;
        let expiring = wire::TokenExpiring { expires_at: Some(epoch_timestamp(token.expires_at)) };
        self.push(server_frame::Body::TokenExpiring(expiring))
    }

    /// RefreshToken: the same user of the same application, expiring later.
    async fn refresh_token(&mut self, refresh: wire::RefreshToken) -> Result<server_frame::Body> {
        if refresh.token.is_empty() {
            return Err(Error::field_required("token"));
        }
        let credentials = wire::AuthenticateRequest {
            credentials: Some(wire::authenticate_request::Credentials::UserToken(refresh.token)),
        };
        let (caller, _, expires_at) = crate::auth::authenticate_with_expiry(&self.gateway.routing, credentials).await?;
        if caller.application_id != self.caller.application_id || caller.user_id != self.caller.user_id {
            return Err(Error::new(
                ErrorCode::TokenInvalid,
                "the new token names another user or application; a connection stays the user it was opened for",
            )
            .with_field("token"));
        }
        let Some(expires_at) = expires_at else {
            return Err(Error::internal("authentication answered without the token's expiry"));
        };
        if let Some(current) = &self.token
            && expires_at <= current.expires_at
        {
            return Err(Error::new(
                ErrorCode::TokenInvalid,
                format!(
                    "the new token expires at {expires_at}, not later than the current one ({}); mint a fresh token",
                    current.expires_at
                ),
            )
            .with_field("token"));
        }
        self.token = Some(TokenClock::new(expires_at));
        Ok(server_frame::Body::TokenRefreshed(wire::TokenRefreshed { expires_at: Some(epoch_timestamp(expires_at)) }))
    }

    async fn on_conversation_event(
        &mut self,
        shared: &SharedEvent,
        event: &wire::ConversationEvent,
    ) -> std::result::Result<(), Ending> {
        let Some(last_sent) = self.conversations.get(&event.conversation_id).copied() else {
            return Ok(());
        };
        if event.seq <= last_sent {
            return Ok(());
        }
        if self.replaying(&event.conversation_id) {
            self.start_replay(&event.conversation_id.clone(), Some(event.seq));
            return Ok(());
        }
        if event.seq > last_sent + 1 {
            metrics::counter!("beseda_ws_gap_fills_total").increment(1);
            self.start_replay(&event.conversation_id.clone(), Some(event.seq));
            return Ok(());
        }
        self.push_shared(shared, || server_frame::Body::Event(event.clone()))?;
        if let Some(last_sent) = self.conversations.get_mut(&event.conversation_id) {
            *last_sent = event.seq;
        }
        if matches!(event.kind, Some(wire::conversation_event::Kind::ConversationChanged(_)))
            && !Box::pin(self.still_has_access(event)).await?
        {
            return Ok(());
        }
        // From the commit (`at`) to this connection's queue. Backdated
        // messages (privileged `date`) and clock skew would read as hours or
        // as negative, so only plausible latencies are recorded.
        if let Some(at) = &event.at {
            let committed = std::time::UNIX_EPOCH
                + std::time::Duration::new(
                    u64::try_from(at.seconds).unwrap_or(0),
                    u32::try_from(at.nanos).unwrap_or(0),
                );
            if let Ok(latency) = std::time::SystemTime::now().duration_since(committed)
                && latency <= MAX_FANOUT_LATENCY
            {
                metrics::histogram!("beseda_fanout_latency_seconds").record(latency.as_secs_f64());
            }
        }
        Ok(())
    }

    async fn on_bus(&mut self, key: StreamKey, received: Received) -> std::result::Result<(), Ending> {
        match received {
            Received::Lagged(missed) => {
                tracing::debug!(?key, missed, "bus subscriber lagged; resyncing from storage");
                if let StreamKey::Conversation(conversation_id) = key {
                    self.start_replay(&conversation_id, None);
                } else if key == StreamKey::User {
                    // Boxed, like every routing call on this path: see `run_connection`.
                    let counts =
                        Box::pin(self.gateway.routing.get_unread_counts(self.caller.request(wire::Empty {}))).await;
                    if let Ok(counts) = counts {
                        for count in counts.into_inner().conversations {
                            self.push(server_frame::Body::UserEvent(wire::UserEvent {
                                user_id: self.user_id.clone(),
                                kind: Some(wire::user_event::Kind::UnreadCount(count)),
                            }))?;
                        }
                    }
                }
                Ok(())
            }
            Received::Event(event) => match &event.kind {
                Some(wire::bus_event::Kind::ConversationEvent(conversation_event)) => {
                    // The publisher's trace continues here, through the context the event carries.
                    let span = tracing::info_span!("gateway.deliver", seq = conversation_event.seq);
                    // A disabled span (tracing off, or filtered) has no parent to set.
                    if !span.is_disabled() && !event.trace_context.is_empty() {
                        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
                            propagator.extract(&event.trace_context)
                        });
                        let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
                    }
                    tracing::Instrument::instrument(self.on_conversation_event(&event, conversation_event), span).await
                }
                Some(wire::bus_event::Kind::UserEvent(user_event)) => {
                    if matches!(user_event.kind, Some(wire::user_event::Kind::Blocked(_)))
                        && user_event.user_id == self.user_id
                    {
                        return Err(Ending::Error(Error::new(
                            ErrorCode::UserBlocked,
                            "the user was blocked by an administrator",
                        )));
                    }
                    if let Some(wire::user_event::Kind::Notification(notification)) = &user_event.kind {
                        if self.recent_notifications.contains(&notification.message_id) {
                            return Ok(());
                        }
                        if self.recent_notifications.len() == RECENT_NOTIFICATIONS {
                            self.recent_notifications.pop_front();
                        }
                        self.recent_notifications.push_back(notification.message_id.clone());
                    }
                    self.push_shared(&event, || server_frame::Body::UserEvent(user_event.clone()))
                }
                Some(wire::bus_event::Kind::ApplicationCredentialsChanged(changed)) => Err(Ending::Error(Error::new(
                    ErrorCode::ApplicationNotRegistered,
                    format!("{}; connect again with a token signed by the current key", changed.reason),
                ))),
                // Meant for bots processes; a connection never subscribes to them.
                Some(wire::bus_event::Kind::OutboxCommitted(_) | wire::bus_event::Kind::DeliveriesQueued(_)) | None => {
                    Ok(())
                }
            },
        }
    }

    async fn subscribe(&mut self, subscribe: wire::Subscribe) -> Result<server_frame::Body> {
        if self.conversations.len() >= self.gateway.config.max_subscriptions {
            return Err(Error::invalid(
                "conversation",
                format!(
                    "one connection follows at most {} conversations; unsubscribe from one first",
                    self.gateway.config.max_subscriptions
                ),
            ));
        }
        let request = self.caller.request(wire::GetConversationRequest { conversation: subscribe.conversation });
        let conversation = self
            .gateway
            .routing
            .get_conversation(request)
            .await
            .map_err(|status| status::from_status(&status))?
            .into_inner();
        if subscribe.after_seq > conversation.last_seq {
            return Err(Error::invalid(
                "afterSeq",
                format!(
                    "afterSeq {} is ahead of the conversation's last seq {}; resume from a seq this conversation has sent",
                    subscribe.after_seq, conversation.last_seq
                ),
            ));
        }
        let topic = Topic::Conversation {
            application_id: self.caller.application_id.clone(),
            conversation_id: conversation.id.clone(),
        };
        // Subscribe before reading the log, so nothing committed in between is missed.
        self.streams.insert(
            StreamKey::Conversation(conversation.id.clone()),
            Box::pin(self.gateway.bus.subscribe(&topic).await.into_stream()),
        );
        let start = if subscribe.after_seq == 0 { conversation.last_seq } else { subscribe.after_seq };
        self.conversations.insert(conversation.id.clone(), start);
        if conversation.member_ids.contains(&self.user_id) {
            self.listed_member_of.insert(conversation.id.clone());
        } else {
            self.listed_member_of.remove(&conversation.id);
        }
        // The replay runs from the connection's loop, paced by the socket;
        // this answer is held until it ends (with the last seq it sent).
        self.restart_replay(&conversation.id);
        let Some(last_seq) = self.conversations.get(&conversation.id).copied() else {
            return Err(Error::new(
                ErrorCode::NotAMember,
                format!("access to conversation `{}` ended while subscribing", conversation.id),
            ));
        };
        Ok(server_frame::Body::Subscribed(wire::Subscribed { conversation_id: conversation.id, last_seq }))
    }

    async fn watch_presence(&mut self, watch: wire::WatchPresence) -> Result<server_frame::Body> {
        let watched = self.streams.keys().filter(|key| matches!(key, StreamKey::Presence(_))).count();
        if watched + watch.user_ids.len() > self.gateway.config.max_presence_watches {
            return Err(Error::invalid(
                "userIds",
                format!(
                    "one connection may watch at most {} users' presence",
                    self.gateway.config.max_presence_watches
                ),
            ));
        }
        let user_ids = self.visible_users(watch.user_ids).await?;
        // Subscribe before reading presence, so no change in between is missed.
        let mut keys = Vec::with_capacity(user_ids.len());
        for user_id in &user_ids {
            let topic =
                Topic::Presence { application_id: self.caller.application_id.clone(), user_id: user_id.clone() };
            self.streams.insert(
                StreamKey::Presence(user_id.clone()),
                Box::pin(self.gateway.bus.subscribe(&topic).await.into_stream()),
            );
            keys.push(UserKey { application_id: self.caller.application_id.clone(), user_id: user_id.clone() });
        }
        // One registry read for all of them (in a cluster, one leader round trip).
        let online = self.gateway.registry.online_of(&keys).await.map_err(|unavailable| {
            Error::new(ErrorCode::Unavailable, format!("{unavailable}; watch presence again in a few seconds"))
        })?;
        let users =
            user_ids.into_iter().zip(online).map(|(user_id, online)| wire::Presence { online, user_id }).collect();
        Ok(server_frame::Body::Presence(wire::PresenceList { users }))
    }

    /// The ids among `user_ids` whose presence this user may watch: the
    /// users GetUsers shows them. Regular users see every user of the
    /// application; for external users (and guests) routing applies the
    /// §29.3.5 rule, and the others are left out as if they did not exist.
    async fn visible_users(&mut self, user_ids: Vec<String>) -> Result<Vec<String>> {
        if self.user_kind == wire::UserKind::Regular || user_ids.is_empty() {
            return Ok(user_ids);
        }
        let page = beseda_core::limits::MAX_PAGE_SIZE as usize;
        let mut visible = HashSet::new();
        for chunk in user_ids.chunks(page) {
            let request = self.caller.request(wire::UsersFilter {
                count: page as u32,
                ids: chunk.to_vec(),
                include_blocked: true,
                ..Default::default()
            });
            let users = self.gateway.routing.get_users(request).await.map_err(|status| status::from_status(&status))?;
            visible.extend(users.into_inner().users.into_iter().map(|user| user.id));
        }
        Ok(user_ids.into_iter().filter(|id| visible.contains(id)).collect())
    }

    /// Answers one request frame.
    async fn handle(&mut self, body: client_frame::Body) -> Result<server_frame::Body> {
        use client_frame::Body as In;
        use server_frame::Body as Out;
        let routing = self.gateway.routing.clone();
        let caller = self.caller.clone();
        let grpc = |status: tonic::Status| status::from_status(&status);
        Ok(match body {
            In::Hello(_) => {
                return Err(Error::new(ErrorCode::MalformedRequest, "Hello was already received on this connection"));
            }
            In::Subscribe(subscribe) => return self.subscribe(subscribe).await,
            In::Unsubscribe(unsubscribe) => {
                self.streams.remove(&StreamKey::Conversation(unsubscribe.conversation_id.clone()));
                self.conversations.remove(&unsubscribe.conversation_id);
                self.listed_member_of.remove(&unsubscribe.conversation_id);
                // Requests wait while a Subscribe's answer is held, so no
                // replay being dropped here has an answer to give.
                self.replays.retain(|replay| !replay.is_of(&unsubscribe.conversation_id));
                Out::Ok(wire::Empty {})
            }
            In::WatchPresence(watch) => return self.watch_presence(watch).await,
            In::Ping(ping) => Out::Pong(ping),
            In::RefreshToken(refresh) => return self.refresh_token(refresh).await,
            In::SendMessage(request) => {
                let span = tracing::info_span!("ws.send_message");
                let sent = tracing::Instrument::instrument(
                    async { routing.send_message(caller.request(request)).await.map_err(grpc) },
                    span,
                )
                .await?;
                metrics::counter!("beseda_messages_received_total").increment(1);
                Out::Message(sent.into_inner())
            }
            In::EditMessage(request) => {
                Out::Message(routing.edit_message(caller.request(request)).await.map_err(grpc)?.into_inner())
            }
            In::DeleteMessage(request) => {
                Out::Ok(routing.delete_message(caller.request(request)).await.map_err(grpc)?.into_inner())
            }
            In::GetMessages(request) => {
                Out::Messages(routing.get_messages(caller.request(request)).await.map_err(grpc)?.into_inner())
            }
            In::MarkRead(request) => {
                Out::UnreadCount(routing.mark_read(caller.request(request)).await.map_err(grpc)?.into_inner())
            }
            In::GetConversationList(request) => Out::Conversations(
                routing.get_conversation_list(caller.request(request)).await.map_err(grpc)?.into_inner(),
            ),
            In::GetConversation(request) => {
                Out::Conversation(routing.get_conversation(caller.request(request)).await.map_err(grpc)?.into_inner())
            }
            In::CreateConversation(request) => Out::Conversation(
                routing.create_conversation(caller.request(request)).await.map_err(grpc)?.into_inner(),
            ),
            In::UpdateConversation(request) => Out::Conversation(
                routing.update_conversation(caller.request(request)).await.map_err(grpc)?.into_inner(),
            ),
            In::LeaveConversation(request) => {
                Out::Ok(routing.leave_conversation(caller.request(request)).await.map_err(grpc)?.into_inner())
            }
            In::GetUsers(request) => {
                Out::Users(routing.get_users(caller.request(request)).await.map_err(grpc)?.into_inner())
            }
            In::SetWatchMode(request) => {
                Out::WatchMode(routing.set_watch_mode(caller.request(request)).await.map_err(grpc)?.into_inner())
            }
            In::SetDoNotDisturb(request) => {
                Out::DoNotDisturb(routing.set_do_not_disturb(caller.request(request)).await.map_err(grpc)?.into_inner())
            }
            In::GetUnreadCounts(request) => {
                Out::UnreadCounts(routing.get_unread_counts(caller.request(request)).await.map_err(grpc)?.into_inner())
            }
        })
    }
}

/// Reads the Hello and authenticates; answers Welcome or an error frame.
/// A welcomed connection: who, in which encoding, at which protocol version.
struct Greeted {
    caller: Caller,
    user: wire::User,
    encoding: Encoding,
    protocol_version: u32,
    /// The token's `exp`, seconds since the epoch.
    token_expires_at: Option<i64>,
}

async fn greet(gateway: &Gateway, message: Option<WsMessage>) -> std::result::Result<Greeted, (Error, Encoding)> {
    let Some(message) = message else {
        return Err((Error::new(ErrorCode::HelloRequired, "no Hello frame arrived in time"), Encoding::Json));
    };
    let (frame, encoding) = match decode_frame(&message) {
        Ok(Some(decoded)) => decoded,
        Ok(None) => {
            return Err((
                Error::new(ErrorCode::HelloRequired, "the first frame must be a Hello data frame"),
                Encoding::Json,
            ));
        }
        Err(error) => {
            return Err((
                error,
                if matches!(message, WsMessage::Binary(_)) { Encoding::Protobuf } else { Encoding::Json },
            ));
        }
    };
    let Some(client_frame::Body::Hello(hello)) = frame.body else {
        return Err((
            Error::new(ErrorCode::HelloRequired, "the first frame must be Hello {protocolVersion, token}"),
            encoding,
        ));
    };
    let supported = beseda_proto::MIN_PROTOCOL_VERSION..=beseda_proto::MAX_PROTOCOL_VERSION;
    if !supported.contains(&hello.protocol_version) {
        let advice = if hello.protocol_version > beseda_proto::MAX_PROTOCOL_VERSION {
            "upgrade this Beseda server, or use a client release that speaks one of the supported versions"
        } else {
            "upgrade the client to a release that speaks one of the supported versions"
        };
        return Err((
            Error::new(
                ErrorCode::ProtocolVersionUnsupported,
                format!(
                    "the client speaks protocol version {}; this server (Beseda {}) supports versions {} to {}: {advice}",
                    hello.protocol_version,
                    beseda_routing::SERVER_VERSION,
                    beseda_proto::MIN_PROTOCOL_VERSION,
                    beseda_proto::MAX_PROTOCOL_VERSION
                ),
            )
            .with_field("protocolVersion"),
            encoding,
        ));
    }
    let credentials = wire::AuthenticateRequest {
        credentials: Some(wire::authenticate_request::Credentials::UserToken(hello.token)),
    };
    let (caller, user, token_expires_at) = crate::auth::authenticate_with_expiry(&gateway.routing, credentials)
        .await
        .map_err(|error| (error, encoding))?;
    let user = user.ok_or_else(|| (Error::internal("authentication returned no user"), encoding))?;
    Ok(Greeted { caller, user, encoding, protocol_version: hello.protocol_version, token_expires_at })
}

/// Tells the watchers of `user` that they came online or went offline (also
/// used by the registry when a dead gateway's connections are purged).
pub async fn publish_presence_change(bus: &dyn beseda_bus::Bus, user: &UserKey, online: bool) {
    let topic = Topic::Presence { application_id: user.application_id.clone(), user_id: user.user_id.clone() };
    let event = wire::BusEvent {
        application_id: user.application_id.clone(),
        trace_context: Default::default(),
        kind: Some(wire::bus_event::Kind::UserEvent(wire::UserEvent {
            user_id: user.user_id.clone(),
            kind: Some(wire::user_event::Kind::Presence(wire::Presence { user_id: user.user_id.clone(), online })),
        })),
    };
    bus.publish(&topic, event).await;
}

async fn serve_connection(gateway: Gateway, socket: WebSocket) {
    let (sink, mut stream) = socket.split();
    let (queue, receiver) =
        outbox::Outbox::channel(gateway.config.send_queue_capacity, gateway.config.send_queue_bytes);
    let writer = tokio::spawn(write_frames(sink, receiver));
    metrics::gauge!("beseda_ws_connections").increment(1.0);

    // Every step before and after the connection's loop is boxed: a task is
    // allocated at the size of its largest state for as long as it lives,
    // and these one-time steps (the Hello read, authentication, Welcome, the
    // registry's disconnect) were larger than the idle loop. Measured with
    // heaptrack on 2,000 idle connections (docs/BENCHMARKS.md): the
    // connection's task went from ~7.3 KB to ~3.3 KB when the request,
    // replay and refusal paths were boxed.
    let first = Box::pin(tokio::time::timeout(gateway.config.hello_timeout, async {
        loop {
            match stream.next().await {
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(message)) => return Ok(Some(message)),
                Some(Err(error)) if too_large(&error) => return Err(too_large_error()),
                _ => return Ok(None),
            }
        }
    }))
    .await
    .unwrap_or(Ok(None));
    let first = match first {
        Ok(first) => first,
        Err(error) => return Box::pin(refuse(queue, writer, &error, Encoding::Json, too_large_close())).await,
    };
    let Greeted { caller, user, encoding, protocol_version, token_expires_at } =
        match Box::pin(greet(&gateway, first)).await {
            Ok(greeted) => greeted,
            Err((error, encoding)) => {
                let close = CloseFrame { code: 4000, reason: error.code.as_str().into() };
                return Box::pin(refuse(queue, writer, &error, encoding, close)).await;
            }
        };
    let max_connections = gateway.config.max_connections_per_user;
    let Some(_slot) = gateway.user_connections.acquire(&caller.application_id, &user.id, max_connections) else {
        metrics::counter!("beseda_ws_connections_refused_total", "reason" => "per_user_limit").increment(1);
        let error = Error::new(
            ErrorCode::TooManyConnections,
            format!(
                "this user already has {max_connections} WebSocket connections to this gateway, the most it allows; close one first"
            ),
        );
        let close = CloseFrame { code: 4000, reason: error.code.as_str().into() };
        return Box::pin(refuse(queue, writer, &error, encoding, close)).await;
    };
    let user_key = UserKey { application_id: caller.application_id.clone(), user_id: user.id.clone() };
    // Recorded in the background: a registry outage (a leader election)
    // delays presence, never the session. The disconnect waits for it, so the
    // registry sees the two in order.
    let recorded = tokio::spawn({
        let gateway = gateway.clone();
        let user_key = user_key.clone();
        async move {
            match gateway.registry.connected(&user_key, &gateway.config.node_id).await {
                Ok(PresenceChange::CameOnline) => publish_presence_change(gateway.bus.as_ref(), &user_key, true).await,
                Ok(_) => {}
                Err(unavailable) => tracing::warn!(%unavailable, "connection not recorded in the session registry"),
            }
        }
    });
    let mut connection = Connection {
        gateway: gateway.clone(),
        caller,
        user_id: user.id.clone(),
        encoding,
        queue: queue.clone(),
        replays: VecDeque::new(),
        held: VecDeque::new(),
        streams: StreamMap::new(),
        conversations: HashMap::new(),
        recent_notifications: VecDeque::new(),
        user_kind: wire::UserKind::try_from(user.kind).unwrap_or(wire::UserKind::Unspecified),
        listed_member_of: HashSet::new(),
        token: token_expires_at.map(TokenClock::new),
    };
    let user_topic = Topic::User { application_id: user_key.application_id.clone(), user_id: user_key.user_id.clone() };
    connection.streams.insert(StreamKey::User, Box::pin(gateway.bus.subscribe(&user_topic).await.into_stream()));
    let application_topic = Topic::Application { application_id: user_key.application_id.clone() };
    connection
        .streams
        .insert(StreamKey::Application, Box::pin(gateway.bus.subscribe(&application_topic).await.into_stream()));
    let welcome = server_frame::Body::Welcome(wire::Welcome {
        protocol_version,
        server_version: beseda_routing::SERVER_VERSION.to_owned(),
        session_id: uuid::Uuid::new_v4().to_string(),
        user: Some(user),
        ping_interval_seconds: gateway.config.ping_interval.as_secs() as u32,
    });
    let ending = match Box::pin(connection.reply(0, encoding, welcome)).await {
        Ok(()) => run_connection(&mut connection, &mut stream).await,
        Err(ending) => ending,
    };
    match &ending {
        Ending::Error(error) => {
            let _ = queue.try_send(encode_frame(&Outgoing { frame: error_frame(0, error), encoding }));
            let _ =
                queue.try_send(WsMessage::Close(Some(CloseFrame { code: 4001, reason: error.code.as_str().into() })));
        }
        Ending::Shutdown => {
            let reconnect =
                server_frame::Body::Reconnect(wire::Reconnect { reason: "the server is shutting down".into() });
            let _ = queue.try_send(encode_frame(&Outgoing {
                frame: wire::ServerFrame { request_id: 0, body: Some(reconnect) },
                encoding,
            }));
            let _ = queue.try_send(WsMessage::Close(Some(CloseFrame { code: 1012, reason: "service restart".into() })));
        }
        Ending::TooLarge => {
            let _ = queue.try_send(encode_frame(&Outgoing { frame: error_frame(0, &too_large_error()), encoding }));
            let _ = queue.try_send(WsMessage::Close(Some(too_large_close())));
        }
        Ending::ClientClosed => {}
    }
    drop(connection);
    drop(queue);
    Box::pin(async move {
        finish_writer(writer).await;
        drop(stream);
        let _ = recorded.await;
        match gateway.registry.disconnected(&user_key, &gateway.config.node_id).await {
            Ok(PresenceChange::WentOffline) => publish_presence_change(gateway.bus.as_ref(), &user_key, false).await,
            Ok(_) => {}
            Err(unavailable) => tracing::warn!(%unavailable, "disconnection not recorded in the session registry"),
        }
    })
    .await;
    metrics::gauge!("beseda_ws_connections").decrement(1.0);
}

/// Answers one request frame (or says why it does not decode).
async fn on_frame(connection: &mut Connection, message: WsMessage) -> std::result::Result<(), Ending> {
    let (frame, encoding) = match decode_frame(&message) {
        Ok(Some(decoded)) => decoded,
        Ok(None) => return Ok(()),
        Err(error) => {
            let encoding = if matches!(message, WsMessage::Binary(_)) { Encoding::Protobuf } else { Encoding::Json };
            let body = error_frame(0, &error).body.unwrap_or(server_frame::Body::Ok(wire::Empty {}));
            return connection.reply(0, encoding, body).await;
        }
    };
    metrics::counter!("beseda_ws_frames_in_total").increment(1);
    let request_id = frame.request_id;
    let answer = match frame.body {
        Some(body) => connection.handle(body).await,
        None => {
            Err(Error::new(ErrorCode::FieldRequired, "the frame has no body; set one request field").with_field("body"))
        }
    };
    let body = match answer {
        // Goes out when the subscription's replay has been sent.
        Ok(server_frame::Body::Subscribed(subscribed))
            if connection.defer_answer(request_id, encoding, &subscribed) =>
        {
            return Ok(());
        }
        Ok(body) => body,
        Err(error) => error_frame(request_id, &error).body.unwrap_or(server_frame::Body::Ok(wire::Empty {})),
    };
    connection.reply(request_id, encoding, body).await
}

async fn run_connection(
    connection: &mut Connection,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
) -> Ending {
    let config = connection.gateway.config.clone();
    let mut shutdown = connection.gateway.shutdown.clone();
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.reset();
    let mut last_heard = Instant::now();
    // One timer for the token, reset when a refresh moves its expiry; a
    // connection without one (an older routing node) never fires it.
    let mut token_timer = std::pin::pin!(tokio::time::sleep(std::time::Duration::ZERO));
    loop {
        if let Some(token) = connection.token.as_mut()
            && token.moved
        {
            token.moved = false;
            token_timer.as_mut().reset(token.next_wakeup());
        }
        tokio::select! {
            // Reading stops only when many requests already wait behind a
            // held Subscribe answer.
            incoming = stream.next(), if connection.held.len() < replay::MAX_HELD_FRAMES => {
                let message = match incoming {
                    Some(Ok(message)) => message,
                    Some(Err(error)) if too_large(&error) => return Ending::TooLarge,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "websocket read failed");
                        return Ending::ClientClosed;
                    }
                    None => return Ending::ClientClosed,
                };
                last_heard = Instant::now();
                if matches!(message, WsMessage::Close(_)) {
                    return Ending::ClientClosed;
                }
                // Requests are answered in order: those behind a Subscribe
                // whose answer waits for its replay wait too.
                let request = matches!(message, WsMessage::Text(_) | WsMessage::Binary(_));
                if request && (connection.answer_pending() || !connection.held.is_empty()) {
                    connection.held.push_back(message);
                    continue;
                }
                if let Err(ending) = Box::pin(on_frame(connection, message)).await {
                    return ending;
                }
            }
            () = std::future::ready(()), if !connection.held.is_empty() && !connection.answer_pending() => {
                if let Some(message) = connection.held.pop_front()
                    && let Err(ending) = Box::pin(on_frame(connection, message)).await
                {
                    return ending;
                }
            }
            () = std::future::ready(()), if connection.replay_ready() => {
                if let Err(ending) = Box::pin(connection.replay_step()).await {
                    return ending;
                }
            }
            () = connection.queue.room(), if connection.replay_waiting() => {}
            Some((key, received)) = connection.streams.next(), if !connection.streams.is_empty() => {
                if let Err(ending) = connection.on_bus(key, received).await {
                    return ending;
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > config.idle_timeout {
                    return Ending::Error(Error::new(ErrorCode::Unavailable, "no frame or pong arrived within the idle timeout"));
                }
                // A client that writes (pongs, pings) but reads nothing.
                if connection.queue.stalled_for().is_some_and(|stalled| stalled > config.idle_timeout) {
                    metrics::counter!("beseda_ws_slow_consumers_total").increment(1);
                    return Ending::Error(Error::new(
                        ErrorCode::SlowConsumer,
                        format!("the client read nothing for {} s while frames were waiting for it", config.idle_timeout.as_secs()),
                    ));
                }
                if connection.queue.try_send(WsMessage::Ping(Default::default())).is_err() {
                    return Ending::Error(Error::new(ErrorCode::SlowConsumer, "the connection's send queue is full"));
                }
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return Ending::Shutdown;
                }
            }
            () = &mut token_timer, if connection.token.is_some() => {
                if let Err(ending) = connection.on_token_timer() {
                    return ending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_frames_decode_to_typed_errors_not_panics() {
        let samples: Vec<WsMessage> = vec![
            WsMessage::Text("".into()),
            WsMessage::Text("{".into()),
            WsMessage::Text("[1,2,3]".into()),
            WsMessage::Text(r#"{"requestId": "x"}"#.into()),
            WsMessage::Text(r#"{"hello": {"protocolVersion": -1}}"#.into()),
            WsMessage::Binary(vec![0xff, 0xff, 0xff, 0xff, 0x0f].into()),
            WsMessage::Binary(vec![0x0a, 0x80].into()),
        ];
        for sample in samples {
            let error = decode_frame(&sample).unwrap_err();
            assert_eq!(error.code, ErrorCode::MalformedRequest, "{sample:?}");
        }
    }

    #[test]
    fn a_bus_event_is_encoded_once_per_encoding_into_the_frame_a_push_would_be() {
        let event = wire::ConversationEvent { conversation_id: "c1".into(), seq: 7, ..Default::default() };
        let shared = SharedEvent::new(wire::BusEvent {
            application_id: "app".into(),
            kind: Some(wire::bus_event::Kind::ConversationEvent(event.clone())),
            ..Default::default()
        });
        let mut encoded = 0;
        let mut first_json = None;
        for encoding in [Encoding::Json, Encoding::Protobuf, Encoding::Json, Encoding::Protobuf] {
            let frames = shared.derived(SharedFrames::default).unwrap();
            let message = frames.get(encoding, || {
                encoded += 1;
                server_frame::Body::Event(event.clone())
            });
            assert_eq!(message, push_frame(server_frame::Body::Event(event.clone()), encoding));
            if let WsMessage::Text(text) = &message {
                // The same bytes, not a copy of them.
                let pointer = text.as_str().as_ptr();
                assert_eq!(*first_json.get_or_insert(pointer), pointer);
            }
        }
        assert_eq!(encoded, 2, "one encoding each for JSON and protobuf");
    }

    #[test]
    fn json_and_protobuf_frames_carry_the_same_message() {
        let frame = wire::ClientFrame { request_id: 7, body: Some(client_frame::Body::Ping(wire::Ping { nonce: 42 })) };
        let json = serde_json::to_string(&frame).unwrap();
        let (from_json, _) = decode_frame(&WsMessage::Text(json.into())).unwrap().unwrap();
        let (from_binary, _) = decode_frame(&WsMessage::Binary(frame.encode_to_vec().into())).unwrap().unwrap();
        assert_eq!(from_json, frame);
        assert_eq!(from_binary, frame);
    }
}
