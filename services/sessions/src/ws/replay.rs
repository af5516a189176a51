//! Replays from the conversation event log, paced by the socket.
//!
//! A replay (a Subscribe with `afterSeq`, a seq gap, a bus lag) used to run
//! to its end inside the connection's event loop, waiting for the client:
//! a client that stopped reading kept the loop there, so neither the idle
//! timeout nor the slow-consumer rule ran, and every page of up to 1,000
//! events sat in memory meanwhile. Now a replay is a job the loop advances
//! one step at a time while the outgoing queue has room: a step either
//! fetches one page of bounded bytes or queues events from it. Everything
//! else (requests, pushes, pings, timeouts) goes on between steps.
//!
//! A Subscribe's answer waits for its replay (`subscribed` comes after the
//! replayed events, as before), and so do the requests that arrive after
//! it, so answers still come in request order.

use std::collections::VecDeque;

use axum::extract::ws::Message as WsMessage;
use beseda_core::{Error, ErrorCode};
use beseda_proto::v1::{self as wire, server_frame};
use beseda_routing::status;

use super::{Connection, Encoding, Ending, Outgoing, encode_frame, lost_access};

/// Bytes of stored events one step fetches at most (at least one event,
/// however large): with the queue's byte bound, what one connection's
/// replay holds in memory.
const PAGE_BYTES: u32 = 512 * 1024;

/// Request frames read and kept while a Subscribe's answer waits for its
/// replay; beyond this the connection stops reading until the replay ends.
pub(super) const MAX_HELD_FRAMES: usize = 16;

pub(super) struct Replay {
    conversation_id: String,
    /// Not done before this seq was sent: the end of a gap, or a live event
    /// that arrived while the replay ran (it is taken from the log instead).
    at_least: u64,
    /// Go on to the end of the log (a Subscribe or a bus lag).
    to_end: bool,
    /// The end of the log was reached since `to_end` was last set.
    exhausted: bool,
    page: VecDeque<wire::ConversationEvent>,
    /// The Subscribe answer that goes out when the replay ends.
    answer: Option<(u64, Encoding, wire::Subscribed)>,
}

impl Replay {
    pub(super) fn is_of(&self, conversation_id: &str) -> bool {
        self.conversation_id == conversation_id
    }

    fn new(conversation_id: &str, until: Option<u64>) -> Replay {
        Replay {
            conversation_id: conversation_id.to_owned(),
            at_least: until.unwrap_or(0),
            to_end: until.is_none(),
            exhausted: false,
            page: VecDeque::new(),
            answer: None,
        }
    }
}

impl Connection {
    /// Makes sure the conversation is replayed from its last sent seq: up to
    /// `until` (inclusive) when given, else to the end of the log. Joins a
    /// replay of the conversation that is already running.
    pub(super) fn start_replay(&mut self, conversation_id: &str, until: Option<u64>) {
        match self.replays.iter_mut().find(|replay| replay.conversation_id == conversation_id) {
            Some(replay) => match until {
                Some(seq) => replay.at_least = replay.at_least.max(seq),
                None => {
                    replay.to_end = true;
                    replay.exhausted = false;
                }
            },
            None => self.replays.push_back(Replay::new(conversation_id, until)),
        }
    }

    /// A Subscribe moved the conversation's position: any running replay of
    /// it is replaced by one from the new position, which goes first so
    /// the held requests behind its answer wait as little as possible.
    pub(super) fn restart_replay(&mut self, conversation_id: &str) {
        self.replays.retain(|replay| replay.conversation_id != conversation_id);
        self.replays.push_front(Replay::new(conversation_id, None));
    }

    /// Whether a replay of the conversation is running: live events of it
    /// are then left to the replay, which reads them from the log in order.
    pub(super) fn replaying(&self, conversation_id: &str) -> bool {
        self.replays.iter().any(|replay| replay.conversation_id == conversation_id)
    }

    /// Keeps a Subscribe's answer until its replay ends; false when no
    /// replay of the conversation runs (the answer goes out now).
    pub(super) fn defer_answer(&mut self, request_id: u64, encoding: Encoding, subscribed: &wire::Subscribed) -> bool {
        match self.replays.iter_mut().find(|replay| replay.conversation_id == subscribed.conversation_id) {
            Some(replay) => {
                replay.answer = Some((request_id, encoding, subscribed.clone()));
                true
            }
            None => false,
        }
    }

    /// Whether a Subscribe's answer waits for a replay.
    pub(super) fn answer_pending(&self) -> bool {
        self.replays.iter().any(|replay| replay.answer.is_some())
    }

    /// A replay waits for the writer to make room.
    pub(super) fn replay_waiting(&self) -> bool {
        !self.replays.is_empty() && !self.queue.has_room_for_replay()
    }

    /// A replay can take a step now.
    pub(super) fn replay_ready(&self) -> bool {
        !self.replays.is_empty() && self.queue.has_room_for_replay()
    }

    /// The conversation's subscription ended (Unsubscribe, lost access):
    /// its replay stops; a Subscribe waiting for it is answered that access
    /// ended.
    pub(super) async fn cancel_replays(&mut self, conversation_id: &str) -> std::result::Result<(), Ending> {
        let (cancelled, kept): (VecDeque<Replay>, VecDeque<Replay>) =
            std::mem::take(&mut self.replays).into_iter().partition(|replay| replay.conversation_id == conversation_id);
        self.replays = kept;
        for replay in cancelled {
            self.finish_replay(replay, None).await?;
        }
        Ok(())
    }

    /// One step of the first replay: fetch a page, or queue events from the
    /// current one while the queue has room.
    pub(super) async fn replay_step(&mut self) -> std::result::Result<(), Ending> {
        let Some(mut replay) = self.replays.pop_front() else {
            return Ok(());
        };
        let Some(mut last_sent) = self.conversations.get(&replay.conversation_id).copied() else {
            return self.finish_replay(replay, None).await;
        };
        if replay.page.is_empty() {
            if last_sent >= replay.at_least && (!replay.to_end || replay.exhausted) {
                return self.finish_replay(replay, Some(last_sent)).await;
            }
            let request = self.caller.request(wire::GetEventsRequest {
                conversation: Some(wire::ConversationRef {
                    by: Some(wire::conversation_ref::By::Id(replay.conversation_id.clone())),
                }),
                after_seq: last_sent,
                limit: 0,
                max_bytes: PAGE_BYTES,
            });
            let page = match self.gateway.routing.get_events(request).await {
                Ok(page) => page.into_inner(),
                Err(status) => {
                    let error = status::from_status(&status);
                    if !lost_access(&error) {
                        return Err(Ending::Error(error));
                    }
                    let reason = if self.listed_member_of.contains(&replay.conversation_id) {
                        wire::SubscriptionEndReason::Removed
                    } else {
                        wire::SubscriptionEndReason::AccessRevoked
                    };
                    self.end_subscription(&replay.conversation_id.clone(), reason, &error.message).await?;
                    return self.finish_replay(replay, None).await;
                }
            };
            if page.events.is_empty() {
                // Nothing beyond what was sent: a seq waited for is not in
                // the log (yet), and waiting for it would spin.
                replay.at_least = last_sent;
                replay.exhausted = true;
            } else {
                replay.exhausted = !page.more;
                replay.page = page.events.into();
            }
            self.replays.push_front(replay);
            return Ok(());
        }
        while self.queue.has_room_for_replay()
            && let Some(event) = replay.page.pop_front()
        {
            if event.seq <= last_sent {
                continue;
            }
            let seq = event.seq;
            let changed = matches!(event.kind, Some(wire::conversation_event::Kind::ConversationChanged(_)));
            let check = changed.then(|| event.clone());
            let frame = Outgoing {
                frame: wire::ServerFrame { request_id: 0, body: Some(server_frame::Body::Event(event)) },
                encoding: self.encoding,
            };
            self.send_waiting(encode_frame(&frame)).await?;
            self.conversations.insert(replay.conversation_id.clone(), seq);
            last_sent = seq;
            if let Some(event) = check
                && !Box::pin(self.still_has_access(&event)).await?
            {
                return self.finish_replay(replay, None).await;
            }
        }
        self.replays.push_front(replay);
        Ok(())
    }

    /// Queues a frame that may wait for room (answers, replayed events),
    /// but not for longer than the idle timeout: a client that reads
    /// nothing for that long is a slow consumer.
    pub(super) async fn send_waiting(&mut self, message: WsMessage) -> std::result::Result<(), Ending> {
        match self.queue.send(message, self.gateway.config.idle_timeout).await {
            Ok(()) => Ok(()),
            Err(super::outbox::SendError::Closed) => Err(Ending::ClientClosed),
            Err(super::outbox::SendError::TimedOut) => {
                metrics::counter!("beseda_ws_slow_consumers_total").increment(1);
                Err(Ending::Error(Error::new(
                    ErrorCode::SlowConsumer,
                    format!(
                        "the client read nothing for {} s while frames were waiting for it",
                        self.gateway.config.idle_timeout.as_secs()
                    ),
                )))
            }
        }
    }

    /// Sends the Subscribe answer a replay held: `subscribed` with the last
    /// seq sent, or `not_a_member` when access ended during the replay.
    async fn finish_replay(&mut self, replay: Replay, last_sent: Option<u64>) -> std::result::Result<(), Ending> {
        let Some((request_id, encoding, mut subscribed)) = replay.answer else {
            return Ok(());
        };
        let body = match last_sent {
            Some(last_seq) => {
                subscribed.last_seq = last_seq;
                server_frame::Body::Subscribed(subscribed)
            }
            None => server_frame::Body::Error(wire::Error {
                code: ErrorCode::NotAMember.as_str().to_owned(),
                message: format!("access to conversation `{}` ended while subscribing", replay.conversation_id),
                field: String::new(),
            }),
        };
        self.reply(request_id, encoding, body).await
    }
}
