//! A connection's outgoing queue, bounded in frames and in bytes.
//!
//! The frame bound alone let one connection hold a queue of 1,024 frames of
//! up to 137 KB each (140 MB) for a client that stopped reading. The queue
//! therefore also counts the bytes it holds: a push that would take it past
//! the byte bound finds it full (a slow consumer), a replay only tops it up
//! while it is less than half full, and the writer records when it last
//! took a frame, so a queue that has not moved for the idle timeout closes
//! the connection even when nothing new is pushed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::Message as WsMessage;
use tokio::sync::Notify;
use tokio::time::Instant;

pub(super) use tokio::sync::mpsc::error::TrySendError;

/// A writer's batch keeps its allocation for the next one up to this many
/// frames; a larger one (after a burst) is freed, so a connection that goes
/// idle does not keep a burst's worth of slots.
const KEPT_BATCH_CAPACITY: usize = 16;

struct Shared {
    state: Mutex<State>,
    /// Signalled when a frame is queued or the last sender is gone: wakes
    /// the writer.
    queued: Notify,
    /// Signalled whenever the writer takes frames: room may have appeared.
    room: Notify,
    /// When the writer last took frames, in milliseconds since `opened`.
    taken_at_ms: AtomicU64,
    opened: Instant,
}

/// A `VecDeque` under a lock rather than a tokio `mpsc` channel: the channel
/// allocates its first block of 32 slots (1.5 KiB of messages, plus the
/// channel) when it is made, for every connection, idle or not; a deque
/// allocates on the first frame and gives the writer everything queued in
/// one lock.
struct State {
    /// Frames the writer has not taken yet.
    waiting: VecDeque<WsMessage>,
    /// Frames and payload bytes counted against the bounds: those waiting
    /// and those the writer took but has not yet handed to the socket, so a
    /// writer stuck on a full socket with a batch in hand does not let the
    /// queue take a second queue's worth.
    frames: usize,
    bytes: usize,
    senders: usize,
    receiver_alive: bool,
}

/// The sending side; cheap to clone.
pub(super) struct Outbox {
    shared: Arc<Shared>,
    capacity: usize,
    max_bytes: usize,
}

/// The writer's side.
pub(super) struct OutboxReceiver {
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

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.state().senders += 1;
        Outbox { shared: Arc::clone(&self.shared), capacity: self.capacity, max_bytes: self.max_bytes }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let last = {
            let mut state = self.shared.state();
            state.senders -= 1;
            state.senders == 0
        };
        if last {
            self.shared.queued.notify_one();
        }
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        state.receiver_alive = false;
        state.waiting = VecDeque::new();
    }
}

impl Outbox {
    pub(super) fn channel(capacity: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                frames: 0,
                bytes: 0,
                senders: 1,
                receiver_alive: true,
            }),
            queued: Notify::new(),
            room: Notify::new(),
            taken_at_ms: AtomicU64::new(0),
            opened: Instant::now(),
        });
        (Outbox { shared: shared.clone(), capacity, max_bytes }, OutboxReceiver { shared })
    }

    /// Queues a frame if both bounds allow it. One frame always fits into an
    /// empty queue, however large.
    pub(super) fn try_send(&self, message: WsMessage) -> Result<(), TrySendError<WsMessage>> {
        let weight = weight(&message);
        {
            let mut state = self.shared.state();
            if !state.receiver_alive {
                return Err(TrySendError::Closed(message));
            }
            if state.frames >= self.capacity || (state.bytes > 0 && state.bytes.saturating_add(weight) > self.max_bytes)
            {
                return Err(TrySendError::Full(message));
            }
            state.frames += 1;
            state.bytes += weight;
            state.waiting.push_back(message);
        }
        self.shared.queued.notify_one();
        Ok(())
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
        let state = self.shared.state();
        state.bytes < self.max_bytes / 2 && state.frames < self.capacity / 2
    }

    /// Resolves when the writer has taken frames since the last call (or
    /// since frames were last taken, if nobody waited then).
    pub(super) async fn room(&self) {
        self.shared.room.notified().await;
    }

    /// How long frames have been waiting without the writer taking any;
    /// `None` when nothing is queued.
    pub(super) fn stalled_for(&self) -> Option<Duration> {
        if self.shared.state().frames == 0 {
            return None;
        }
        let taken_at = Duration::from_millis(self.shared.taken_at_ms.load(Ordering::Acquire));
        Some(self.shared.opened.elapsed().saturating_sub(taken_at))
    }
}

/// Frames the writer took in one go. They still count against the queue's
/// bounds until [`OutboxReceiver::written`] says they reached the socket.
pub(super) struct Batch {
    pub(super) frames: VecDeque<WsMessage>,
    counted_frames: usize,
    counted_bytes: usize,
}

impl OutboxReceiver {
    /// Waits for frames and takes every one queued, in order, into `batch`
    /// (which must be empty); `false` when every sender is gone and nothing
    /// is left.
    pub(super) async fn recv_all(&mut self, batch: &mut Batch) -> bool {
        debug_assert!(batch.frames.is_empty());
        loop {
            {
                let mut state = self.shared.state();
                if !state.waiting.is_empty() {
                    std::mem::swap(&mut state.waiting, &mut batch.frames);
                    batch.counted_frames = batch.frames.len();
                    batch.counted_bytes = batch.frames.iter().map(weight).sum();
                    return true;
                }
                if state.senders == 0 {
                    return false;
                }
            }
            // A frame queued since the check left a permit: not missed.
            self.shared.queued.notified().await;
        }
    }

    /// The batch's frames are in the socket's buffer: their room is free.
    pub(super) fn written(&mut self, batch: &mut Batch) {
        {
            let mut state = self.shared.state();
            state.frames -= batch.counted_frames;
            state.bytes -= batch.counted_bytes;
        }
        batch.counted_frames = 0;
        batch.counted_bytes = 0;
        if batch.frames.capacity() > KEPT_BATCH_CAPACITY {
            batch.frames = VecDeque::new();
        }
        let now = u64::try_from(self.shared.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.shared.taken_at_ms.store(now, Ordering::Release);
        self.shared.room.notify_one();
    }
}

impl Batch {
    pub(super) fn new() -> Batch {
        Batch { frames: VecDeque::new(), counted_frames: 0, counted_bytes: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: usize) -> WsMessage {
        WsMessage::Binary(vec![0; bytes].into())
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_frees_them_as_the_writer_writes_frames() {
        let (outbox, mut receiver) = Outbox::channel(16, 1000);
        let mut batch = Batch::new();
        outbox.try_send(frame(600)).unwrap();
        assert!(!outbox.has_room_for_replay(), "600 of 1000 bytes is past the replay's half");
        outbox.try_send(frame(400)).unwrap();
        assert!(matches!(outbox.try_send(frame(1)), Err(TrySendError::Full(_))), "1001 bytes is over the bound");
        assert!(outbox.stalled_for().is_some());
        assert!(matches!(outbox.send(frame(1), Duration::from_millis(20)).await, Err(SendError::TimedOut)));
        // Taken but not yet written: still counted.
        assert!(receiver.recv_all(&mut batch).await);
        assert_eq!(batch.frames.len(), 2, "everything queued, in one batch");
        assert!(matches!(outbox.try_send(frame(1)), Err(TrySendError::Full(_))));
        batch.frames.clear();
        receiver.written(&mut batch);
        outbox.send(frame(500), Duration::from_millis(20)).await.ok().unwrap();
        assert!(receiver.recv_all(&mut batch).await);
        batch.frames.clear();
        receiver.written(&mut batch);
        assert!(outbox.stalled_for().is_none(), "an empty queue is not stalled");
        assert!(outbox.has_room_for_replay());
        // One frame larger than the whole bound still fits into an empty queue.
        outbox.try_send(frame(5000)).unwrap();
        assert!(matches!(outbox.try_send(frame(1)), Err(TrySendError::Full(_))));
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_frames_and_ends_with_its_senders() {
        let (outbox, mut receiver) = Outbox::channel(2, 1000);
        let mut batch = Batch::new();
        outbox.try_send(frame(1)).unwrap();
        outbox.clone().try_send(frame(2)).unwrap();
        assert!(matches!(outbox.try_send(frame(3)), Err(TrySendError::Full(_))));
        drop(outbox);
        assert!(receiver.recv_all(&mut batch).await, "frames queued before the senders left still arrive");
        let sizes: Vec<usize> = batch.frames.drain(..).map(|message| weight(&message)).collect();
        assert_eq!(sizes, [1, 2], "in order");
        receiver.written(&mut batch);
        assert!(!receiver.recv_all(&mut batch).await, "no sender and nothing queued: the end");
    }

    #[tokio::test]
    async fn a_gone_writer_closes_the_queue() {
        let (outbox, receiver) = Outbox::channel(2, 1000);
        drop(receiver);
        assert!(matches!(outbox.try_send(frame(1)), Err(TrySendError::Closed(_))));
        assert!(matches!(outbox.send(frame(1), Duration::from_millis(20)).await, Err(SendError::Closed)));
    }
}
