//! A connection's outgoing queue, bounded in frames and in bytes.
//!
//! The frame bound alone let one connection hold a queue of 1,024 frames of
//! up to 137 KB each (140 MB) for a client that stopped reading. The queue
//! therefore also counts the bytes it holds: a push that would take it past
//! the byte bound finds it full (a slow consumer), a replay only tops it up
//! while it is less than half full, and the writer records when it last
//! took a frame, so a queue that has not moved for the idle timeout closes
//! the connection even when nothing new is pushed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::Message as WsMessage;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

pub(super) use mpsc::error::TrySendError;

struct Shared {
    /// Payload bytes of the frames in the queue.
    bytes: AtomicUsize,
    /// Signalled whenever the writer takes a frame: room may have appeared.
    room: Notify,
    /// When the writer last took a frame, in milliseconds since `opened`.
    taken_at_ms: AtomicU64,
    opened: Instant,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub(super) struct Outbox {
    sender: mpsc::Sender<WsMessage>,
    shared: Arc<Shared>,
    capacity: usize,
    max_bytes: usize,
}

/// The writer's side.
pub(super) struct OutboxReceiver {
    receiver: mpsc::Receiver<WsMessage>,
    shared: Arc<Shared>,
}

/// Why a waiting send gave up.
pub(super) enum SendError {
    Closed,
    /// No room appeared within the time allowed.
    TimedOut,
}

fn weight(message: &WsMessage) -> usize {
    match message {
        WsMessage::Text(text) => text.len(),
        WsMessage::Binary(bytes) | WsMessage::Ping(bytes) | WsMessage::Pong(bytes) => bytes.len(),
        WsMessage::Close(frame) => frame.as_ref().map_or(0, |frame| frame.reason.len()),
    }
}

impl Outbox {
    pub(super) fn channel(capacity: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
        let (sender, receiver) = mpsc::channel(capacity);
        let opened = Instant::now();
        let shared = Arc::new(Shared {
            bytes: AtomicUsize::new(0),
            room: Notify::new(),
            taken_at_ms: AtomicU64::new(0),
            opened,
        });
        (Outbox { sender, shared: shared.clone(), capacity, max_bytes }, OutboxReceiver { receiver, shared })
    }

    /// Queues a frame if both bounds allow it. One frame always fits into an
    /// empty queue, however large.
    pub(super) fn try_send(&self, message: WsMessage) -> Result<(), TrySendError<WsMessage>> {
        let weight = weight(&message);
        let queued = self.shared.bytes.load(Ordering::Acquire);
        if queued > 0 && queued.saturating_add(weight) > self.max_bytes {
            return Err(TrySendError::Full(message));
        }
        self.shared.bytes.fetch_add(weight, Ordering::AcqRel);
        self.sender.try_send(message).inspect_err(|_| {
            self.shared.bytes.fetch_sub(weight, Ordering::AcqRel);
        })
    }

    /// Queues a frame, waiting at most `within` for room.
    pub(super) async fn send(&self, mut message: WsMessage, within: Duration) -> Result<(), SendError> {
        let deadline = Instant::now() + within;
        loop {
            // Created before the attempt: a frame taken in between leaves a
            // permit, so the wake-up is not lost.
            let room = self.shared.room.notified();
            match self.try_send(message) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(_)) => return Err(SendError::Closed),
                Err(TrySendError::Full(back)) => message = back,
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(SendError::TimedOut);
            }
        }
    }

    /// Whether a replay may queue more: it keeps at least half of both
    /// bounds free for live pushes, pings and answers.
    pub(super) fn has_room_for_replay(&self) -> bool {
        self.shared.bytes.load(Ordering::Acquire) < self.max_bytes / 2 && self.sender.capacity() > self.capacity / 2
    }

    /// Resolves when the writer has taken a frame since the last call (or
    /// since the last frame was taken, if nobody waited then).
    pub(super) async fn room(&self) {
        self.shared.room.notified().await;
    }

    /// How long frames have been waiting without the writer taking any;
    /// `None` when the queue is empty.
    pub(super) fn stalled_for(&self) -> Option<Duration> {
        if self.sender.capacity() == self.capacity {
            return None;
        }
        let taken_at = Duration::from_millis(self.shared.taken_at_ms.load(Ordering::Acquire));
        Some(self.shared.opened.elapsed().saturating_sub(taken_at))
    }
}

impl OutboxReceiver {
    fn taken(&self, message: &WsMessage) {
        self.shared.bytes.fetch_sub(weight(message), Ordering::AcqRel);
        let now = u64::try_from(self.shared.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.shared.taken_at_ms.store(now, Ordering::Release);
        self.shared.room.notify_one();
    }

    pub(super) async fn recv(&mut self) -> Option<WsMessage> {
        let message = self.receiver.recv().await?;
        self.taken(&message);
        Some(message)
    }

    pub(super) fn try_recv(&mut self) -> Option<WsMessage> {
        let message = self.receiver.try_recv().ok()?;
        self.taken(&message);
        Some(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: usize) -> WsMessage {
        WsMessage::Binary(vec![0; bytes].into())
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_frees_them_as_the_writer_takes_frames() {
        let (outbox, mut receiver) = Outbox::channel(16, 1000);
        outbox.try_send(frame(600)).unwrap();
        assert!(!outbox.has_room_for_replay(), "600 of 1000 bytes is past the replay's half");
        outbox.try_send(frame(400)).unwrap();
        assert!(matches!(outbox.try_send(frame(1)), Err(TrySendError::Full(_))), "1001 bytes is over the bound");
        assert!(outbox.stalled_for().is_some());
        assert!(matches!(outbox.send(frame(1), Duration::from_millis(20)).await, Err(SendError::TimedOut)));
        receiver.recv().await.unwrap();
        outbox.send(frame(500), Duration::from_millis(20)).await.ok().unwrap();
        receiver.try_recv().unwrap();
        receiver.try_recv().unwrap();
        assert!(outbox.stalled_for().is_none(), "an empty queue is not stalled");
        assert!(outbox.has_room_for_replay());
        // One frame larger than the whole bound still fits into an empty queue.
        outbox.try_send(frame(5000)).unwrap();
        assert!(matches!(outbox.try_send(frame(1)), Err(TrySendError::Full(_))));
    }
}
