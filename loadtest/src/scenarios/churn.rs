//! Reconnect churn with resume: `--clients` members of one group
//! conversation are subscribed to it while `--senders` further members send
//! at `--rate` messages per second in all (open loop). Every client
//! disconnects and reconnects every `--reconnect-every-seconds` (each
//! interval jittered to 0.5–1.5 times that), and resumes with
//! `Subscribe{afterSeq = the last seq it processed}`: the server replays
//! what it missed, in order, before live events. Across all its
//! reconnects, each client must receive every message exactly once and in
//! each sender's order; one tracker per client, kept across its
//! connections, checks that. Before anyone subscribes the run posts one
//! message, so that no client ever resumes from seq 0 (`afterSeq = 0` means
//! "only new events" and would skip whatever it missed before its first
//! event). When deliveries are missing, the failures name the clients that
//! did not reach the conversation's last stored seq.
//!
//! The reconnect cost is the time from starting a reconnect (a new TCP
//! connection) to the `subscribed` answer, which comes after the replay;
//! failed attempts of one reconnect are retried and count in its time.
//! Delivery latency runs from the scheduled send to receipt, so a message
//! received through a replay includes the time its client was away.
//!
//! The run fails when anything was lost, duplicated or out of order, when a
//! client did not reach the last stored seq, when a reconnect attempt
//! failed, or when no client reconnected at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use beseda_proto::v1 as wire;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{self, Socket, now_micros, parse_payload, payload};
use crate::recorder::{Local, OrderTracker, Recorder, percentiles};
use crate::result::RunResult;
use crate::run::{Common, Run, due};
use crate::scenarios::fanout::{FLUSH_WHEN_IDLE, drain};
use crate::sources::Endpoints;

/// Settings of the churn scenario (see the module documentation; `--help` shows the `Scenario` variant's).
#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct Churn {
    #[command(flatten)]
    pub common: Common,
    /// Receiving members, each reconnecting over and over.
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// Further members that send (they stay connected).
    #[arg(long, default_value_t = 2)]
    pub senders: usize,
    /// Messages per second, all senders together.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Mean time between two reconnects of one client.
    #[arg(long, default_value_t = 2.0)]
    pub reconnect_every_seconds: f64,
}

/// What the client tasks share.
struct Shared {
    recorder: Arc<Recorder>,
    endpoints: Arc<Endpoints>,
    conversation_id: String,
    timeout: Duration,
    reconnect_every: Duration,
    /// True once the senders are done: no more planned reconnects.
    settle: watch::Receiver<bool>,
    /// Reconnect cost, µs.
    reconnect_cost: Mutex<Histogram<u64>>,
    reconnect_failures: AtomicU64,
    /// Connections the server closed by itself (resumed like planned reconnects).
    server_closes: AtomicU64,
    /// Messages received in replays (before `subscribed`).
    replayed: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Each client's last processed seq, and the highest seq the senders' answers gave: who fell behind.
    client_seqs: Vec<AtomicU64>,
    last_stored: AtomicU64,
}

/// One client's view, kept across its connections.
struct ClientState<'a> {
    tracker: OrderTracker,
    /// The last conversation seq processed: where a resume starts. Never 0
    /// (the run posts a first message before anyone subscribes), because
    /// `afterSeq = 0` would mean "only new events" and skip what was missed.
    last_seq: u64,
    local: Local<'a>,
    /// Where `last_seq` is published for the end-of-run diagnosis.
    published: &'a AtomicU64,
}

impl ClientState<'_> {
    /// Processes a pushed event; true when it was one of the run's messages.
    fn observe(&mut self, recorder: &Recorder, frame: &wire::ServerFrame) -> bool {
        let Some(wire::server_frame::Body::Event(event)) = &frame.body else { return false };
        let received = now_micros();
        self.last_seq = self.last_seq.max(event.seq);
        self.published.store(self.last_seq, Ordering::Relaxed);
        let Some((sender, seq, sent)) = client::created_text(frame).and_then(parse_payload) else { return false };
        recorder.arrival(&mut self.local, self.tracker.observe(sender, seq), received - sent);
        true
    }
}

/// A tiny deterministic generator (SplitMix64) for the jitter.
struct Jitter(u64);

impl Jitter {
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub async fn run(scenario: Churn) -> anyhow::Result<RunResult> {
    let common = &scenario.common;
    anyhow::ensure!(scenario.clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(scenario.senders >= 1, "--senders must be at least 1");
    anyhow::ensure!(scenario.clients + scenario.senders <= 3000, "--clients + --senders must be at most 3,000");
    anyhow::ensure!(scenario.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(scenario.reconnect_every_seconds > 0.0, "--reconnect-every-seconds must be positive");
    let run = Run::start(common)?;
    let api = common.api().await?;
    let mut client_tokens = Vec::with_capacity(scenario.clients);
    let mut ids = Vec::with_capacity(scenario.clients + scenario.senders);
    for index in 0..scenario.clients {
        let (id, token) = api.user(&format!("lt-churn-client-{index}"), &format!("Churn client {index}")).await?;
        ids.push(id);
        client_tokens.push(token);
    }
    let mut sender_tokens = Vec::with_capacity(scenario.senders);
    for index in 0..scenario.senders {
        let (id, token) = api.user(&format!("lt-churn-sender-{index}"), &format!("Churn sender {index}")).await?;
        ids.push(id);
        sender_tokens.push(token);
    }
    let conversation_id = api.group("loadtest churn", &ids).await?;
    let (settle, settling) = watch::channel(false);
    let shared = Arc::new(Shared {
        recorder: run.recorder.clone(),
        endpoints: run.endpoints.clone(),
        conversation_id: conversation_id.clone(),
        timeout: common.connect_timeout(),
        reconnect_every: Duration::from_secs_f64(scenario.reconnect_every_seconds),
        settle: settling,
        reconnect_cost: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
        reconnect_failures: AtomicU64::new(0),
        server_closes: AtomicU64::new(0),
        replayed: AtomicU64::new(0),
        first_error: Mutex::new(None),
        client_seqs: (0..scenario.clients).map(|_| AtomicU64::new(0)).collect(),
        last_stored: AtomicU64::new(0),
    });

    let mut writers = Vec::with_capacity(scenario.senders);
    let mut sender_readers: Vec<tokio::task::JoinHandle<()>> = Vec::with_capacity(scenario.senders);
    for (index, token) in sender_tokens.iter().enumerate() {
        let (source, target) = run.endpoints.pick();
        let connected = async {
            let mut socket = client::connect_user(source, target, token, common.connect_timeout()).await?;
            if index == 0 {
                // A first event in the conversation before anyone subscribes:
                // every client's resume point is then at least its seq.
                let text = "loadtest churn: start".to_owned();
                socket.send(client::send_message(1, &conversation_id, text)).await?;
                loop {
                    let frame = client::next_frame(&mut socket, common.connect_timeout()).await?;
                    match frame.body {
                        Some(wire::server_frame::Body::Message(message)) if frame.request_id == 1 => {
                            shared.last_stored.fetch_max(message.seq, Ordering::Relaxed);
                            break;
                        }
                        Some(wire::server_frame::Body::Error(error)) if frame.request_id == 1 => {
                            bail!("the start message was refused: {}: {}", error.code, error.message)
                        }
                        _ => {}
                    }
                }
            }
            anyhow::Ok(socket)
        };
        let socket = match connected.await {
            Ok(socket) => socket,
            Err(error) => {
                run.recorder.connection_failed();
                for reader in &sender_readers {
                    reader.abort();
                }
                bail!("cannot connect sender {index}: {error:#}");
            }
        };
        run.recorder.connected();
        let (writer, mut reader) = socket.split();
        writers.push(writer);
        let shared = shared.clone();
        // The senders' answers: the stored seq, or an error (a message not stored).
        sender_readers.push(tokio::spawn(async move {
            while let Some(Ok(message)) = reader.next().await {
                match client::decode(&message).and_then(|frame| frame.body) {
                    Some(wire::server_frame::Body::Message(message)) => {
                        shared.last_stored.fetch_max(message.seq, Ordering::Relaxed);
                    }
                    Some(wire::server_frame::Body::Error(error)) => {
                        tracing::warn!(code = error.code, message = error.message, "a send was refused");
                        shared.recorder.error();
                    }
                    _ => {}
                }
            }
        }));
    }

    // Every client subscribed before the first message, so that each one is
    // expected to receive all of them.
    let mut clients: Vec<tokio::task::JoinHandle<()>> = Vec::with_capacity(scenario.clients);
    for (index, token) in client_tokens.into_iter().enumerate() {
        let (source, target) = run.endpoints.pick();
        let connected = async {
            let mut socket = client::connect_user(source, target, &token, common.connect_timeout()).await?;
            let last_seq = subscribe(&mut socket, &conversation_id, 0, common.connect_timeout(), |_| {}).await?;
            anyhow::Ok((socket, last_seq))
        };
        let (socket, last_seq) = match connected.await {
            Ok(connected) => connected,
            Err(error) => {
                run.recorder.connection_failed();
                for reader in &sender_readers {
                    reader.abort();
                }
                for client in &clients {
                    client.abort();
                }
                bail!("cannot connect client {index}: {error:#}");
            }
        };
        run.recorder.connected();
        clients.push(tokio::spawn(client_loop(shared.clone(), index, token, socket, last_seq)));
    }

    // The senders, open loop; the clients churn meanwhile.
    let receivers_each = u64::try_from(scenario.clients).unwrap_or(0);
    let per_sender = scenario.rate / scenario.senders as f64;
    let start = Instant::now();
    let start_micros = now_micros();
    let end = start + common.duration();
    let mut sending = Vec::new();
    for (index, mut writer) in writers.into_iter().enumerate() {
        let recorder = run.recorder.clone();
        let conversation_id = conversation_id.clone();
        let offset = Duration::from_secs_f64(index as f64 / scenario.rate);
        sending.push(tokio::spawn(async move {
            let sender = u32::try_from(index).unwrap_or(u32::MAX);
            let mut seq = 0u64;
            loop {
                let at = due(start + offset, seq, per_sender);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                let scheduled = start_micros + i64::try_from((at - start).as_micros()).unwrap_or(i64::MAX);
                match writer
                    .send(client::send_message(seq + 10, &conversation_id, payload(sender, seq, scheduled)))
                    .await
                {
                    Ok(()) => recorder.sent(1, receivers_each),
                    Err(_) => {
                        recorder.error();
                        break;
                    }
                }
                seq += 1;
            }
            writer
        }));
    }
    let finished = crate::run::finished_writers(sending).await;
    // No more planned reconnects; every client must catch up.
    settle.send_replace(true);
    drain(&run, common).await;
    for client in clients {
        client.abort();
        let _ = client.await;
    }
    for mut writer in finished {
        let _ = writer.close().await;
    }
    for reader in sender_readers {
        reader.abort();
    }

    let cost = shared.reconnect_cost.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    let cost = percentiles(&cost);
    let reconnect_failures = shared.reconnect_failures.load(Ordering::Relaxed);
    let first_error = shared.first_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    let mut failures = Vec::new();
    if reconnect_failures > 0 {
        let first_error = first_error.map(|error| format!(" (first error: {error})")).unwrap_or_default();
        failures.push(format!("{reconnect_failures} reconnect attempts failed{first_error}"));
    }
    let last_stored = shared.last_stored.load(Ordering::Relaxed);
    let behind: Vec<String> = shared
        .client_seqs
        .iter()
        .enumerate()
        .filter_map(|(index, seq)| {
            let seq = seq.load(Ordering::Relaxed);
            (seq < last_stored).then(|| format!("client {index} at seq {seq}"))
        })
        .collect();
    if !behind.is_empty() {
        failures.push(format!(
            "{} clients did not reach the conversation's last seq {last_stored}: {}",
            behind.len(),
            behind.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if cost.count == 0 {
        failures.push("no client reconnected: make --duration-seconds longer than --reconnect-every-seconds".into());
    }
    let parameters = json!({
        "clients": scenario.clients, "senders": scenario.senders, "rate": scenario.rate,
        "reconnectEverySeconds": scenario.reconnect_every_seconds, "durationSeconds": common.duration_seconds,
    });
    let totals = run.recorder.totals();
    let seconds = common.duration_seconds.max(1) as f64;
    let figures = vec![
        ("reconnects", cost.count as f64),
        ("reconnects_per_second", cost.count as f64 / seconds),
        ("reconnect_p50_ms", cost.p50),
        ("reconnect_p99_ms", cost.p99),
        ("reconnect_max_ms", cost.max),
        ("replayed_deliveries", shared.replayed.load(Ordering::Relaxed) as f64),
        ("server_closes", shared.server_closes.load(Ordering::Relaxed) as f64),
        ("messages_per_second", totals.sent as f64 / seconds),
        ("deliveries_per_second", totals.delivered as f64 / seconds),
    ];
    run.finish(common, "churn", parameters, figures, failures).await
}

/// Subscribes with `after_seq` and reads until the `subscribed` answer,
/// handing every other frame (the replay) to `frames`; returns the answer's
/// last seq.
async fn subscribe(
    socket: &mut Socket,
    conversation_id: &str,
    after_seq: u64,
    timeout: Duration,
    mut frames: impl FnMut(&wire::ServerFrame),
) -> anyhow::Result<u64> {
    let subscribe = wire::Subscribe {
        conversation: Some(wire::ConversationRef {
            by: Some(wire::conversation_ref::By::Id(conversation_id.to_owned())),
        }),
        after_seq,
    };
    socket.send(client::frame(2, wire::client_frame::Body::Subscribe(subscribe))).await?;
    loop {
        let frame = client::next_frame(socket, timeout).await?;
        match &frame.body {
            Some(wire::server_frame::Body::Subscribed(subscribed)) => return Ok(subscribed.last_seq),
            Some(wire::server_frame::Body::Error(error)) if frame.request_id == 2 => {
                bail!("subscribe refused: {}: {}", error.code, error.message)
            }
            _ => frames(&frame),
        }
    }
}

/// One client: reads, and every jittered period closes its connection and
/// resumes on a new one; after the senders are done it only reads.
async fn client_loop(shared: Arc<Shared>, index: usize, token: String, mut socket: Socket, last_seq: u64) {
    let recorder = shared.recorder.clone();
    let mut state = ClientState {
        tracker: OrderTracker::default(),
        last_seq,
        local: recorder.local(),
        published: &shared.client_seqs[index],
    };
    state.published.store(last_seq, Ordering::Relaxed);
    let seed = u64::try_from(index).unwrap_or(0) ^ u64::try_from(now_micros()).unwrap_or(0).rotate_left(17);
    let mut jitter = Jitter(seed);
    // The first reconnects are spread over one period.
    let mut next = Instant::now() + shared.reconnect_every.mul_f64(jitter.unit());
    loop {
        let churning = !*shared.settle.borrow();
        let now = Instant::now();
        if churning && now >= next {
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
            drop(socket);
            recorder.disconnected();
            socket = resume(&shared, &token, &mut state).await;
            next = Instant::now() + shared.reconnect_every.mul_f64(0.5 + jitter.unit());
            continue;
        }
        let wake = if churning { next.min(now + FLUSH_WHEN_IDLE) } else { now + FLUSH_WHEN_IDLE };
        match tokio::time::timeout_at(wake, socket.next()).await {
            Err(_) => state.local.flush(),
            Ok(Some(Ok(message))) => {
                if let Some(frame) = client::decode(&message) {
                    state.observe(&recorder, &frame);
                }
            }
            Ok(_) => {
                // The server closed it: resume like a planned reconnect, but count it.
                shared.server_closes.fetch_add(1, Ordering::Relaxed);
                recorder.error();
                recorder.disconnected();
                socket = resume(&shared, &token, &mut state).await;
            }
        }
    }
}

/// Reconnects and resumes after the last processed seq, retrying until it
/// works (the run aborts the client at its end); records the cost.
async fn resume(shared: &Shared, token: &str, state: &mut ClientState<'_>) -> Socket {
    let started = Instant::now();
    loop {
        match resume_once(shared, token, state).await {
            Ok(socket) => {
                let cost = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
                let _ = shared.reconnect_cost.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).record(cost);
                shared.recorder.connected();
                return socket;
            }
            Err(error) => {
                shared.recorder.connection_failed();
                shared.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = format!("{error:#}"), "reconnect failed");
                shared
                    .first_error
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .get_or_insert(format!("{error:#}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One reconnect attempt: Hello, then Subscribe after the last processed
/// seq; the replayed events are processed as they come.
async fn resume_once(shared: &Shared, token: &str, state: &mut ClientState<'_>) -> anyhow::Result<Socket> {
    let (source, target) = shared.endpoints.pick();
    let mut socket = tokio::time::timeout(shared.timeout, client::connect_user(source, target, token, shared.timeout))
        .await
        .context("no Welcome in time")??;
    let after_seq = state.last_seq;
    let recorder = &shared.recorder;
    let mut replayed = 0u64;
    let last_seq = subscribe(&mut socket, &shared.conversation_id, after_seq, shared.timeout, |frame| {
        if state.observe(recorder, frame) {
            replayed += 1;
        }
    })
    .await?;
    shared.replayed.fetch_add(replayed, Ordering::Relaxed);
    state.last_seq = state.last_seq.max(last_seq);
    state.published.store(state.last_seq, Ordering::Relaxed);
    Ok(socket)
}
