//! Bot echo round trip: people talking to a bot (docs/bots.md).
//!
//! The run is both sides. As the application, it opens the bot processing
//! connection (`/bots/v1/processing`, JSON frames) with a predefined bot of
//! type `--bot-type`, and answers every message event by posting "echo " and
//! the message's text through the REST API as the bot's user
//! (`x-beseda-act-as-user`, the delivery id as `clientMessageId`), then
//! acknowledges the event; other events are acknowledged at once. As
//! `--people` people, each in a one-on-one with the bot and online over
//! WebSocket, it sends `--rate` messages per second in all (open loop, each
//! person at an equal share), with at most `--concurrency` messages awaiting
//! their echo.
//!
//! Measured: for each message, the time from when it was *scheduled* to when
//! its sender received the bot's echo (a pushed message containing its
//! text): the full round trip through the server, the bot queue, the
//! processing connection, the application and back. A message that had to
//! wait for the cap counts its wait. `echoes_per_second`: echoes received
//! per second of the measured phase, or of the time until the last echo
//! when the round trip could not keep up.
//!
//! Pass/fail: every message must be echoed to its sender exactly once and in
//! the sender's order before the drain deadline (lost, duplicated or
//! out-of-order echoes fail the run); an echo the bot could not post, an
//! error frame on the processing connection, the server closing it, or a
//! message that could not be sent before the deadline fails it too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use clap::Args;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::client::{self, now_micros, parse_payload, payload};
use crate::recorder::{Arrival, OrderTracker};
use crate::result::RunResult;
use crate::run::{Common, Run, due};
use crate::scenarios::fanout::drain;
use crate::scenarios::webhook::{LATE_START, collector};
use crate::sources::Target;

#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct BotEcho {
    #[command(flatten)]
    pub common: Common,
    /// People, each in a one-on-one with the bot and online.
    #[arg(long, default_value_t = 10)]
    pub people: usize,
    /// Messages per second, all people together.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Most messages awaiting their echo at once; a message due while the
    /// cap is reached is sent late and its latency counts from when it was due.
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// The predefined bot's type (ExecuteBotProcessing creates it on first use).
    #[arg(long, default_value = "Echo")]
    pub bot_type: String,
}

/// The prefix the bot puts before the text it echoes.
const ECHO: &str = "echo ";

type Processing = WebSocketStream<tokio::net::TcpStream>;

/// The application's side: what the bot's handlers share.
struct Bot {
    http: reqwest::Client,
    base_url: String,
    authorization: String,
    bot_type: String,
    /// Acknowledgements to the processing connection's writer.
    out: tokio::sync::mpsc::UnboundedSender<Value>,
    message_events: AtomicU64,
    answers_failed: AtomicU64,
    problems: Mutex<Vec<String>>,
    recorder: Arc<crate::recorder::Recorder>,
}

impl Bot {
    fn problem(&self, problem: String) {
        let mut problems = self.problems.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if problems.len() < 5 {
            problems.push(problem);
        }
    }

    /// ОбработкаСообщенияСистемыВзаимодействия of the echo bot; answers the frame to send back.
    async fn handle(&self, event: &Value) -> Value {
        let delivery_id = event["deliveryId"].clone();
        if event["bot"]["botType"].as_str() != Some(self.bot_type.as_str()) {
            return json!({"nack": {"deliveryId": delivery_id, "error": "not a bot of the load test"}});
        }
        if event["kind"] != "BOT_EVENT_KIND_MESSAGE" {
            return json!({"ack": {"deliveryId": delivery_id}});
        }
        self.message_events.fetch_add(1, Ordering::Relaxed);
        match self.answer(event).await {
            Ok(()) => json!({"ack": {"deliveryId": delivery_id}}),
            Err(error) => {
                self.answers_failed.fetch_add(1, Ordering::Relaxed);
                self.recorder.error();
                self.problem(format!("the bot could not post its echo: {error:#}"));
                json!({"nack": {"deliveryId": delivery_id, "error": format!("{error:#}")}})
            }
        }
    }

    async fn answer(&self, event: &Value) -> anyhow::Result<()> {
        let conversation_id = event["conversationId"].as_str().context("event without conversationId")?;
        let bot_user = event["bot"]["userId"].as_str().context("event without bot.userId")?;
        let text = event["message"]["text"].as_str().unwrap_or_default();
        let delivery_id = match &event["deliveryId"] {
            Value::String(id) => id.clone(),
            other => other.to_string(),
        };
        let answer = self
            .http
            .post(format!("{}/api/v1/conversations/{conversation_id}/messages", self.base_url))
            .header("authorization", &self.authorization)
            .header("x-beseda-act-as-user", bot_user)
            .json(&json!({"text": format!("{ECHO}{text}"), "clientMessageId": format!("echo-{delivery_id}")}))
            .send()
            .await?;
        let status = answer.status();
        anyhow::ensure!(
            status.is_success(),
            "SendMessage answered {status}: {}",
            answer.text().await.unwrap_or_default()
        );
        Ok(())
    }
}

/// Opens the processing connection with the application's credentials.
async fn open_processing(target: &Target, authorization: &str, timeout: Duration) -> anyhow::Result<Processing> {
    let url = format!("{}/bots/v1/processing", target.base_url.replacen("http", "ws", 1));
    let mut request = url.as_str().into_client_request()?;
    request.headers_mut().insert("authorization", authorization.parse()?);
    let connect = async {
        let stream = tokio::net::TcpStream::connect(target.address).await?;
        stream.set_nodelay(true)?;
        let (socket, _) = tokio_tungstenite::client_async(request, stream).await.context("WebSocket handshake")?;
        anyhow::Ok(socket)
    };
    tokio::time::timeout(timeout, connect).await.context("the processing connection timed out")?
}

/// The next JSON frame of the processing connection; None when it closed.
async fn next_json(socket: &mut SplitStream<Processing>) -> anyhow::Result<Option<Value>> {
    loop {
        match socket.next().await {
            Some(Ok(WsMessage::Text(text))) => return Ok(Some(serde_json::from_str(text.as_str())?)),
            Some(Ok(WsMessage::Close(_))) | None => return Ok(None),
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(error.into()),
        }
    }
}

/// Sends what the handlers queue, and ExecuteBotProcessing again every
/// minute (the lease is two minutes), until `stop`.
async fn write_processing(
    mut sink: SplitSink<Processing, WsMessage>,
    mut frames: tokio::sync::mpsc::UnboundedReceiver<Value>,
    execute: Value,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut renew = tokio::time::interval(Duration::from_secs(60));
    renew.tick().await;
    loop {
        let frame = tokio::select! {
            _ = &mut stop => break,
            _ = renew.tick() => execute.clone(),
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
        };
        if sink.send(WsMessage::Text(frame.to_string().into())).await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

/// Reads events and hands each to a handler of its own (events of different
/// conversations are processed in parallel, as the server allows).
async fn read_processing(mut stream: SplitStream<Processing>, bot: Arc<Bot>, early: Vec<Value>) {
    let spawn = |event: Value| {
        let bot = bot.clone();
        tokio::spawn(async move {
            let reply = bot.handle(&event).await;
            let _ = bot.out.send(reply);
        });
    };
    for event in early {
        spawn(event);
    }
    loop {
        let frame = match next_json(&mut stream).await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                bot.problem("the server closed the processing connection".into());
                return;
            }
            Err(error) => {
                bot.problem(format!("the processing connection failed: {error:#}"));
                return;
            }
        };
        if let Some(event) = frame.get("event") {
            spawn(event.clone());
        } else if let Some(closed) = frame.get("closed") {
            bot.problem(format!("the server closed the processing connection: {closed}"));
            return;
        } else if let Some(error) = frame.get("error") {
            bot.recorder.error();
            bot.problem(format!("the processing connection answered an error: {error}"));
        }
    }
}

pub async fn run(scenario: BotEcho) -> anyhow::Result<RunResult> {
    let common = &scenario.common;
    anyhow::ensure!(scenario.people >= 1, "--people must be at least 1");
    anyhow::ensure!(scenario.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(scenario.concurrency >= 1, "--concurrency must be at least 1");
    let run = Run::start(common)?;
    let api = common.api().await?;
    let target = run.endpoints.targets()[0].clone();
    let credentials = format!("{}:{}", api.application_id, api.application_key);
    let authorization = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials));

    // The application: the processing connection, and the bot's user from the lease.
    let mut processing = open_processing(&target, &authorization, common.connect_timeout()).await?;
    let execute = json!({"execute": {"predefinedBots": [{"botType": scenario.bot_type}]}});
    processing.send(WsMessage::Text(execute.to_string().into())).await?;
    let (sink, mut stream) = processing.split();
    let mut early = Vec::new();
    let lease = loop {
        let frame = tokio::time::timeout(common.connect_timeout(), next_json(&mut stream))
            .await
            .context("no lease in time")??
            .context("the processing connection closed before the lease")?;
        if let Some(lease) = frame.get("lease") {
            break lease.clone();
        }
        if let Some(event) = frame.get("event") {
            early.push(event.clone());
        } else {
            anyhow::bail!("expected a lease, got {frame}");
        }
    };
    let bot_user_id = lease["bots"]
        .as_array()
        .and_then(|bots| bots.iter().find(|bot| bot["botType"].as_str() == Some(scenario.bot_type.as_str())))
        .and_then(|bot| bot["userId"].as_str())
        .with_context(|| format!("no bot of type {} in the lease {lease}", scenario.bot_type))?
        .to_owned();
    let (out, frames) = tokio::sync::mpsc::unbounded_channel();
    let (stop_processing, stopped) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn(write_processing(sink, frames, execute, stopped));
    let bot = Arc::new(Bot {
        http: api.http().clone(),
        base_url: target.base_url.clone(),
        authorization,
        bot_type: scenario.bot_type.clone(),
        out,
        message_events: AtomicU64::new(0),
        answers_failed: AtomicU64::new(0),
        problems: Mutex::new(Vec::new()),
        recorder: run.recorder.clone(),
    });
    let processing_reader = tokio::spawn(read_processing(stream, bot.clone(), early));

    // The people, each in a one-on-one with the bot.
    let (arrivals, collector) = collector(run.recorder.clone());
    let outstanding = Arc::new(tokio::sync::Semaphore::new(scenario.concurrency));
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for index in 0..scenario.people {
        let (person_id, token) = api.user(&format!("lt-echo-person-{index}"), &format!("Echo person {index}")).await?;
        let conversation = api.one_on_one(&person_id, &bot_user_id).await?;
        let (source, target) = run.endpoints.pick();
        let connected = async {
            let mut socket = client::connect_user(source, target, &token, common.connect_timeout()).await?;
            client::subscribe(&mut socket, &conversation, common.connect_timeout()).await?;
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
        writers.push((writer, conversation));
        let (recorder, arrivals, outstanding) = (run.recorder.clone(), arrivals.clone(), outstanding.clone());
        let own = u32::try_from(index).unwrap_or(u32::MAX);
        readers.push(tokio::spawn(async move {
            let mut tracker = OrderTracker::default();
            while let Some(Ok(message)) = reader.next().await {
                let received = now_micros();
                let Some(frame) = client::decode(&message) else { continue };
                if let Some(beseda_proto::v1::server_frame::Body::Error(_)) = &frame.body {
                    recorder.error();
                    continue;
                }
                // The person's own messages come back too: only echoes count.
                let Some(echoed) = client::created_text(&frame).and_then(|text| text.strip_prefix(ECHO)) else {
                    continue;
                };
                let Some((sender, seq, sent)) = parse_payload(echoed) else { continue };
                if sender != own {
                    continue;
                }
                let arrival = tracker.observe(sender, seq);
                if arrival != Arrival::Duplicate {
                    outstanding.add_permits(1);
                }
                let _ = arrivals.send((arrival, received - sent));
            }
            recorder.disconnected();
        }));
    }

    // The people send, open loop, each at its share of the rate.
    let per_person = scenario.rate / scenario.people as f64;
    let start = tokio::time::Instant::now();
    let start_micros = now_micros();
    let end = start + common.duration();
    let deadline = end + Duration::from_secs(common.drain_seconds);
    let started_late = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let mut sending = Vec::new();
    for (index, (mut writer, conversation)) in writers.into_iter().enumerate() {
        let (recorder, outstanding) = (run.recorder.clone(), outstanding.clone());
        let (started_late, skipped) = (started_late.clone(), skipped.clone());
        let offset = Duration::from_secs_f64(index as f64 / scenario.rate);
        sending.push(tokio::spawn(async move {
            let sender = u32::try_from(index).unwrap_or(u32::MAX);
            let mut seq = 0u64;
            let mut slot = 0u64;
            loop {
                let at = due(start + offset, slot, per_person);
                if at >= end {
                    break;
                }
                slot += 1;
                tokio::time::sleep_until(at).await;
                // The cap on messages awaiting their echo.
                match tokio::time::timeout_at(deadline, outstanding.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => {
                        skipped.fetch_add(1, Ordering::Relaxed);
                        recorder.error();
                        continue;
                    }
                }
                if tokio::time::Instant::now() - at > LATE_START {
                    started_late.fetch_add(1, Ordering::Relaxed);
                }
                let scheduled = start_micros + i64::try_from((at - start).as_micros()).unwrap_or(i64::MAX);
                match writer.send(client::send_message(seq + 10, &conversation, payload(sender, seq, scheduled))).await
                {
                    Ok(()) => recorder.sent(1, 1),
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
    drain(&run, common).await;
    // Until the last echo (or the drain deadline): the phase as it really lasted.
    let elapsed = start.elapsed().max(common.duration()).as_secs_f64();
    for mut writer in finished {
        let _ = writer.close().await;
    }
    for reader in readers {
        reader.abort();
        let _ = reader.await;
    }
    drop(arrivals);
    let _ = collector.await;
    processing_reader.abort();
    let _ = processing_reader.await;
    let _ = stop_processing.send(());
    let _ = writer.await;

    let mut failures: Vec<String> = bot.problems.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    let answers_failed = bot.answers_failed.load(Ordering::Relaxed);
    if answers_failed > 0 {
        failures.push(format!("the bot could not post {answers_failed} echoes (the events were retried)"));
    }
    let skipped = skipped.load(Ordering::Relaxed);
    if skipped > 0 {
        failures.push(format!("{skipped} messages could not be sent before the deadline"));
    }
    let parameters = json!({
        "people": scenario.people, "rate": scenario.rate, "concurrency": scenario.concurrency,
        "botType": scenario.bot_type, "durationSeconds": common.duration_seconds,
    });
    let totals = run.recorder.totals();
    let figures = vec![
        ("echoes_per_second", totals.delivered as f64 / elapsed),
        ("messages_per_second", totals.sent as f64 / common.duration_seconds.max(1) as f64),
        ("bot_message_events", bot.message_events.load(Ordering::Relaxed) as f64),
        ("messages_started_late", started_late.load(Ordering::Relaxed) as f64),
    ];
    run.finish(common, "bot-echo", parameters, figures, failures).await
}
