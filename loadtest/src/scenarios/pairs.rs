//! One-on-one chat pairs: P pairs of people, each in a one-on-one, both
//! online; each side sends at `--rate` messages per second (open loop) and
//! the other must receive every message once, in order.

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;

use crate::client::{self, now_micros, parse_payload, payload};
use crate::recorder::OrderTracker;
use crate::result::RunResult;
use crate::run::{Common, Run, due};
use crate::scenarios::fanout::{
    FIRST_REQUEST_ID, FLUSH_WHEN_IDLE, Pending, acknowledged, acknowledgement_figures, drain_acknowledged,
};

#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct Pairs {
    #[command(flatten)]
    pub common: Common,
    /// Conversations of two, both people online.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Messages per second sent by each person.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
}

pub async fn run(scenario: Pairs) -> anyhow::Result<RunResult> {
    let common = &scenario.common;
    anyhow::ensure!(scenario.pairs >= 1, "--pairs must be at least 1");
    anyhow::ensure!(scenario.rate > 0.0, "--rate must be positive");
    let run = Run::start(common)?;
    let api = common.api().await?;
    let mut people = Vec::new();
    for pair in 0..scenario.pairs {
        let a = api.user(&format!("lt-pair-{pair}-a"), &format!("Pair {pair} A")).await?;
        let b = api.user(&format!("lt-pair-{pair}-b"), &format!("Pair {pair} B")).await?;
        let conversation = api.one_on_one(&a.0, &b.0).await?;
        people.push((a.1, conversation.clone()));
        people.push((b.1, conversation));
    }
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for (index, (token, conversation)) in people.iter().enumerate() {
        let (source, target) = run.endpoints.pick();
        let connected = async {
            let mut socket = client::connect_user(source, target, token, common.connect_timeout()).await?;
            client::subscribe(&mut socket, conversation, common.connect_timeout()).await?;
            anyhow::Ok(socket)
        };
        let socket = match connected.await {
            Ok(socket) => socket,
            Err(error) => {
                run.recorder.connection_failed();
                anyhow::bail!("cannot connect person {index}: {error:#}");
            }
        };
        run.recorder.connected();
        let (writer, mut reader) = socket.split();
        let pending = Pending::default();
        writers.push((writer, conversation.clone(), pending.clone()));
        let recorder = run.recorder.clone();
        let own = u32::try_from(index).unwrap_or(u32::MAX);
        readers.push(tokio::spawn(async move {
            let mut tracker = OrderTracker::default();
            let mut local = recorder.local();
            loop {
                let message = match tokio::time::timeout(FLUSH_WHEN_IDLE, reader.next()).await {
                    Err(_) => {
                        local.flush();
                        continue;
                    }
                    Ok(Some(Ok(message))) => message,
                    Ok(_) => break,
                };
                let received = now_micros();
                let Some(frame) = client::decode(&message) else { continue };
                if frame.request_id >= FIRST_REQUEST_ID {
                    acknowledged(&recorder, &pending, &frame, 1, received);
                    continue;
                }
                let Some((sender, seq, sent)) = client::created_text(&frame).and_then(parse_payload) else {
                    continue;
                };
                if sender != own {
                    recorder.arrival(&mut local, tracker.observe(sender, seq), received - sent);
                }
            }
            recorder.disconnected();
        }));
    }
    let start = tokio::time::Instant::now();
    let start_micros = now_micros();
    let end = start + common.duration();
    let mut sending = Vec::new();
    for (index, (mut writer, conversation, pending)) in writers.into_iter().enumerate() {
        let recorder = run.recorder.clone();
        let rate = scenario.rate;
        let offset = std::time::Duration::from_secs_f64((index as f64 / people.len() as f64) / rate);
        sending.push(tokio::spawn(async move {
            let sender = u32::try_from(index).unwrap_or(u32::MAX);
            let mut seq = 0u64;
            loop {
                let at = due(start + offset, seq, rate);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                let scheduled = start_micros + i64::try_from((at - start).as_micros()).unwrap_or(i64::MAX);
                pending
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(seq + FIRST_REQUEST_ID, scheduled);
                let text = payload(sender, seq, scheduled);
                match writer.send(client::send_message(seq + FIRST_REQUEST_ID, &conversation, text)).await {
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
    let finished = crate::run::finished_writers(sending).await;
    // Connections stay open until what is on its way has arrived.
    drain_acknowledged(&run, common).await;
    for mut writer in finished {
        let _ = writer.close().await;
    }
    for reader in readers {
        reader.abort();
    }
    let parameters =
        json!({"pairs": scenario.pairs, "rate": scenario.rate, "durationSeconds": common.duration_seconds});
    let totals = run.recorder.totals();
    let mut figures = vec![("messages_per_second", totals.sent as f64 / common.duration_seconds.max(1) as f64)];
    figures.extend(acknowledgement_figures(&run));
    run.finish(common, "pairs", parameters, figures, Vec::new()).await
}
