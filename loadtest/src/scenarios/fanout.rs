//! Group fan-out: M members online in one group conversation, K of them
//! sending at a total rate R (open loop); every member but the sender must
//! receive every message, once, in each sender's order. With `--relay` the
//! same traffic goes through `beseda-relay` (raw frames, no API), the
//! machine's ceiling.

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::client::{self, now_micros, parse_payload, payload};
use crate::recorder::OrderTracker;
use crate::result::RunResult;
use crate::run::{Common, Run, due};

/// A reader that got nothing for this long folds its counts into the run's.
pub const FLUSH_WHEN_IDLE: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct Fanout {
    #[command(flatten)]
    pub common: Common,
    /// Members online in the conversation (at most 3,000, the conversation limit).
    #[arg(long, default_value_t = 500)]
    pub members: usize,
    /// How many of them send.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Messages per second, all senders together.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// The targets are `beseda-relay` instances: raw frames, no set-up.
    #[arg(long)]
    pub relay: bool,
}

pub async fn run(scenario: Fanout) -> anyhow::Result<RunResult> {
    let common = &scenario.common;
    anyhow::ensure!(scenario.members >= 2, "--members must be at least 2");
    anyhow::ensure!((1..=scenario.members).contains(&scenario.senders), "--senders must be 1..=--members");
    anyhow::ensure!(scenario.rate > 0.0, "--rate must be positive");
    let run = Run::start(common)?;
    let mut sockets = Vec::with_capacity(scenario.members);
    let mut conversation_id = String::new();
    if scenario.relay {
        for _ in 0..scenario.members {
            let (source, target) = run.endpoints.pick();
            match client::open(source, target, &target.ws_url, common.connect_timeout()).await {
                Ok(socket) => {
                    run.recorder.connected();
                    sockets.push(socket);
                }
                Err(error) => {
                    run.recorder.connection_failed();
                    anyhow::bail!("cannot connect member {}: {error:#}", sockets.len());
                }
            }
        }
    } else {
        let api = common.api().await?;
        let mut members = Vec::with_capacity(scenario.members);
        for index in 0..scenario.members {
            members.push(api.user(&format!("lt-member-{index}"), &format!("Member {index}")).await?);
        }
        let ids: Vec<String> = members.iter().map(|(id, _)| id.clone()).collect();
        conversation_id = api.group("loadtest fan-out", &ids).await?;
        for (index, (_, token)) in members.iter().enumerate() {
            let (source, target) = run.endpoints.pick();
            let connected = async {
                let mut socket = client::connect_user(source, target, token, common.connect_timeout()).await?;
                client::subscribe(&mut socket, &conversation_id, common.connect_timeout()).await?;
                anyhow::Ok(socket)
            };
            match connected.await {
                Ok(socket) => {
                    run.recorder.connected();
                    sockets.push(socket);
                }
                Err(error) => {
                    run.recorder.connection_failed();
                    anyhow::bail!("cannot connect member {index}: {error:#}");
                }
            }
        }
    }
    let receivers_each = u64::try_from(scenario.members - 1).unwrap_or(0);
    // Scheduled send times of each sender's unacknowledged messages, by request id.
    let pending: Vec<Pending> = (0..scenario.senders).map(|_| Pending::default()).collect();
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for (index, socket) in sockets.into_iter().enumerate() {
        let (writer, reader) = socket.split();
        writers.push(writer);
        let recorder = run.recorder.clone();
        let relay = scenario.relay;
        let own = u32::try_from(index).unwrap_or(u32::MAX);
        let own_pending = pending.get(index).cloned();
        readers.push(tokio::spawn(async move {
            let mut reader = reader;
            let mut tracker = OrderTracker::default();
            let mut local = recorder.local();
            loop {
                // An idle moment is when this task's counts reach the run's.
                let message = match tokio::time::timeout(FLUSH_WHEN_IDLE, reader.next()).await {
                    Err(_) => {
                        local.flush();
                        continue;
                    }
                    Ok(Some(Ok(message))) => message,
                    Ok(_) => break,
                };
                let received = now_micros();
                let text = if relay {
                    match &message {
                        WsMessage::Text(text) => Some(text.as_str().to_owned()),
                        _ => None,
                    }
                } else {
                    let Some(frame) = client::decode(&message) else { continue };
                    if let Some(pending) = &own_pending
                        && frame.request_id >= FIRST_REQUEST_ID
                    {
                        acknowledged(&recorder, pending, &frame, receivers_each, received);
                        continue;
                    }
                    client::created_text(&frame).map(str::to_owned)
                };
                let Some((sender, seq, sent)) = text.as_deref().and_then(parse_payload) else { continue };
                if sender == own {
                    continue;
                }
                recorder.arrival(&mut local, tracker.observe(sender, seq), received - sent);
            }
            recorder.disconnected();
        }));
    }
    // The senders, open loop, each at its share of the rate.
    let per_sender = scenario.rate / scenario.senders as f64;
    let start = tokio::time::Instant::now();
    let start_micros = now_micros();
    let end = start + common.duration();
    let mut sending = Vec::new();
    for (index, mut writer) in writers.drain(..scenario.senders).enumerate() {
        let recorder = run.recorder.clone();
        let conversation_id = conversation_id.clone();
        let relay = scenario.relay;
        let pending = pending[index].clone();
        // Spread the senders' schedules over one interval.
        let offset = std::time::Duration::from_secs_f64(index as f64 / scenario.rate);
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
                let text = payload(sender, seq, scheduled);
                let frame = if relay {
                    WsMessage::Text(text.into())
                } else {
                    pending
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert(seq + FIRST_REQUEST_ID, scheduled);
                    client::send_message(seq + FIRST_REQUEST_ID, &conversation_id, text)
                };
                match writer.send(frame).await {
                    // The relay has no acknowledgements: written is sent.
                    Ok(()) if relay => recorder.sent(1, receivers_each),
                    Ok(()) => recorder.attempted(1),
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
    let mut idle_writers = writers;
    idle_writers.extend(crate::run::finished_writers(sending).await);
    if scenario.relay {
        drain(&run, common).await;
    } else {
        drain_acknowledged(&run, common).await;
    }
    for mut writer in idle_writers {
        let _ = writer.close().await;
    }
    for reader in readers {
        reader.abort();
    }
    let parameters = json!({
        "members": scenario.members, "senders": scenario.senders, "rate": scenario.rate,
        "relay": scenario.relay, "durationSeconds": common.duration_seconds,
    });
    let totals = run.recorder.totals();
    let seconds = common.duration_seconds.max(1) as f64;
    let mut figures = vec![
        ("deliveries_per_second", totals.delivered as f64 / seconds),
        ("messages_per_second", totals.sent as f64 / seconds),
    ];
    if !scenario.relay {
        figures.extend(acknowledgement_figures(&run));
    }
    run.finish(common, if scenario.relay { "fanout-relay" } else { "fanout" }, parameters, figures, Vec::new()).await
}

/// Request ids of sends start here (lower ones are set-up requests).
pub const FIRST_REQUEST_ID: u64 = 10;

/// Scheduled send times (µs) of unacknowledged sends, by request id.
pub type Pending = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, i64>>>;

/// The answer to a send: acknowledged (stored) or refused.
pub fn acknowledged(
    recorder: &crate::recorder::Recorder,
    pending: &Pending,
    frame: &beseda_proto::v1::ServerFrame,
    receivers_each: u64,
    received: i64,
) {
    let scheduled = pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&frame.request_id);
    let Some(scheduled) = scheduled else { return };
    match &frame.body {
        Some(beseda_proto::v1::server_frame::Body::Message(_)) => {
            recorder.accepted(receivers_each, received - scheduled)
        }
        _ => recorder.error(),
    }
}

/// Acknowledgement latency and sends never acknowledged (the server fell
/// behind: not lost, since never accepted, but not served either).
pub fn acknowledgement_figures(run: &Run) -> Vec<(&'static str, f64)> {
    let acknowledgement = run.recorder.acknowledgement_percentiles();
    let totals = run.recorder.totals();
    let accepted = run.recorder.accepted.load(std::sync::atomic::Ordering::Relaxed);
    vec![
        ("acknowledgement_p50_ms", acknowledgement.p50),
        ("acknowledgement_p99_ms", acknowledgement.p99),
        ("acknowledgement_p999_ms", acknowledgement.p999),
        ("unacknowledged_sends", totals.sent.saturating_sub(accepted) as f64),
    ]
}

/// Waits until every send was answered and every expected delivery
/// arrived, or the drain time is over.
pub async fn drain_acknowledged(run: &Run, common: &Common) {
    drain_until(run, common, |totals, accepted| {
        accepted + totals.errors >= totals.sent && totals.delivered >= totals.expected_deliveries
    })
    .await;
}

/// Waits until every expected delivery arrived, or the drain time is over.
pub async fn drain(run: &Run, common: &Common) {
    drain_until(run, common, |totals, _| totals.delivered >= totals.expected_deliveries).await;
}

/// Polls the totals (and the count of acknowledged sends) until `done`, at most the drain time.
async fn drain_until(run: &Run, common: &Common, done: impl Fn(&crate::result::Totals, u64) -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(common.drain_seconds);
    while tokio::time::Instant::now() < deadline {
        let accepted = run.recorder.accepted.load(std::sync::atomic::Ordering::Relaxed);
        if done(&run.recorder.totals(), accepted) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
