//! Webhook ingest: an outside system (a CRM, a help desk) writing into Beseda
//! through the connection point of a webhook integration (docs/webhooks.md).
//!
//! The run creates a webhook integration (its default members are
//! `--members` users of the application), two integration users with
//! `createUser`, and `--conversations` external conversations with
//! `createConversation`. Then it POSTs `createMessage` commands, each with a
//! unique `extId`, at `--rate` commands per second in all, round robin over
//! the conversations (and over the targets), open loop: command `i` is due
//! at `i / rate` seconds, and at most `--concurrency` are outstanding.
//!
//! Measured: the latency of each command, from the time it was *scheduled*
//! to its HTTP answer (a command that had to wait for a free slot counts its
//! wait), and `commands_per_second`: commands answered 200 per second of the
//! measured phase, or of the time until the last answer when the server
//! could not keep up.
//!
//! Pass/fail: any answer but 200 (or no answer in `--request-timeout-seconds`)
//! is an error and the command counts as lost, which fails the run. At the
//! end every conversation is read back with GetMessages: every accepted
//! command must be stored exactly once, and each conversation must hold as
//! many messages as it had commands accepted; any mismatch fails the run.
//! Commands that could not even start before the drain deadline are counted
//! as errors and fail the run too.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::api::Api;
use crate::recorder::{Arrival, Recorder};
use crate::result::RunResult;
use crate::run::{Common, Run, due};
use crate::scenarios::fanout::FLUSH_WHEN_IDLE;

#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct Webhook {
    #[command(flatten)]
    pub common: Common,
    /// Users of the application made default members of the integration (they
    /// are members of every conversation it creates).
    #[arg(long, default_value_t = 3)]
    pub members: usize,
    /// External conversations the commands are spread over.
    #[arg(long, default_value_t = 10)]
    pub conversations: usize,
    /// createMessage commands per second, all conversations together.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Most commands outstanding at once; a command due while all are busy
    /// starts late and its latency counts from when it was due.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// A command not answered within this time is an error.
    #[arg(long, default_value_t = 10)]
    pub request_timeout_seconds: u64,
}

/// A request that starts this much after it was due is counted as started late.
pub const LATE_START: Duration = Duration::from_millis(10);

/// How a paced phase went, besides what the recorder counts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pacing {
    /// Requests that started more than [`LATE_START`] after they were due
    /// (all workers were busy): their latency includes the wait.
    pub started_late: u64,
    /// Requests that could not start before the deadline: never sent,
    /// counted as errors.
    pub skipped: u64,
    /// The largest delay between a request's due time and its start.
    pub max_start_lag_ms: f64,
    /// From the start of the phase to the last answer: the measured phase,
    /// or longer when the target could not keep up.
    pub elapsed: Duration,
}

impl Pacing {
    /// `count` per second of the phase as it really lasted.
    pub fn per_second(&self, count: u64, duration: Duration) -> f64 {
        count as f64 / self.elapsed.max(duration).as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// Open-loop pacing of request/answer traffic: request `i` is due at
/// `due(start, i, rate)` for `duration`. `concurrency` workers take the
/// requests in turn, each sleeping until its request is due, so at most
/// `concurrency` are outstanding. When every worker is busy the next
/// request starts late; its latency is still measured from when it was due
/// (no coordinated omission) and the late start is counted. A request still
/// not started `give_up` after the end of the phase is not sent and counts
/// as an error.
///
/// `request(i)` returns whether the request succeeded: each one is counted
/// as sent once (`recorder.sent(1, 1)`), a success as delivered with its
/// latency, a failure as an error (and so as lost).
pub async fn paced<F, Fut>(
    recorder: &Arc<Recorder>,
    rate: f64,
    duration: Duration,
    concurrency: usize,
    give_up: Duration,
    request: F,
) -> Pacing
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let (latencies, collector) = collector(recorder.clone());
    let start = tokio::time::Instant::now();
    let end = start + duration;
    let deadline = end + give_up;
    let next = Arc::new(AtomicU64::new(0));
    let request = Arc::new(request);
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (recorder, next, request, latencies) = (recorder.clone(), next.clone(), request.clone(), latencies.clone());
        workers.push(tokio::spawn(async move {
            let mut pacing = Pacing::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let at = due(start, index, rate);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    pacing.skipped += 1;
                    recorder.error();
                    continue;
                }
                let lag = now - at;
                if lag > LATE_START {
                    pacing.started_late += 1;
                }
                pacing.max_start_lag_ms = pacing.max_start_lag_ms.max(lag.as_secs_f64() * 1000.0);
                recorder.sent(1, 1);
                if request(index).await {
                    let _ = latencies.send((Arrival::InOrder, micros(at.elapsed())));
                } else {
                    recorder.error();
                }
            }
            pacing
        }));
    }
    drop(latencies);
    let mut total = Pacing::default();
    for worker in workers {
        if let Ok(pacing) = worker.await {
            total.started_late += pacing.started_late;
            total.skipped += pacing.skipped;
            total.max_start_lag_ms = total.max_start_lag_ms.max(pacing.max_start_lag_ms);
        }
    }
    total.elapsed = start.elapsed();
    let _ = collector.await;
    total
}

/// One task that records arrivals and their latencies (µs) for many
/// senders, so that they need no histogram each. It ends, with its counts
/// folded into the run's, once every sender is dropped.
pub fn collector(
    recorder: Arc<Recorder>,
) -> (tokio::sync::mpsc::UnboundedSender<(Arrival, i64)>, tokio::task::JoinHandle<()>) {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(Arrival, i64)>();
    let task = tokio::spawn(async move {
        let mut local = recorder.local();
        loop {
            match tokio::time::timeout(FLUSH_WHEN_IDLE, receiver.recv()).await {
                Err(_) => local.flush(),
                Ok(Some((arrival, latency))) => recorder.arrival(&mut local, arrival, latency),
                Ok(None) => break,
            }
        }
        local.flush();
    });
    (sender, task)
}

pub fn micros(elapsed: Duration) -> i64 {
    i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX)
}

/// What the request tasks share.
struct Ingest {
    http: reqwest::Client,
    /// The connection point on each target.
    urls: Vec<String>,
    /// extConversationId of each conversation.
    conversations: usize,
    timeout: Duration,
    /// The indexes of the commands answered 200, per conversation.
    accepted: Mutex<Vec<Vec<u64>>>,
    /// The first few failures, for the report.
    samples: Mutex<Vec<String>>,
}

const AUTHORS: [&str; 2] = ["lt-author-1", "lt-author-2"];

fn ext_conversation(index: usize) -> String {
    format!("lt-conversation-{index}")
}

fn message_text(index: u64) -> String {
    format!("lt-webhook m-{index}")
}

fn parse_message_text(text: &str) -> Option<u64> {
    text.strip_prefix("lt-webhook m-")?.parse().ok()
}

impl Ingest {
    async fn command(&self, index: u64) -> bool {
        let conversation = usize::try_from(index).unwrap_or(0) % self.conversations;
        let url = &self.urls[usize::try_from(index).unwrap_or(0) % self.urls.len()];
        let body = json!({"createMessage": {
            "extId": format!("m-{index}"),
            "extConversationId": ext_conversation(conversation),
            "extUserId": AUTHORS[usize::try_from(index % 2).unwrap_or(0)],
            "text": message_text(index),
        }});
        let answer = self.http.post(url).timeout(self.timeout).json(&body).send().await;
        let failure = match answer {
            Ok(answer) if answer.status() == reqwest::StatusCode::OK => {
                // The answer is read whole: the command is done when it is.
                match answer.bytes().await {
                    Ok(_) => {
                        self.accepted.lock().unwrap_or_else(|poisoned| poisoned.into_inner())[conversation].push(index);
                        return true;
                    }
                    Err(error) => format!("reading the answer: {error}"),
                }
            }
            Ok(answer) => {
                let status = answer.status();
                format!("{status}: {}", answer.text().await.unwrap_or_default())
            }
            Err(error) => format!("{error}"),
        };
        let mut samples = self.samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if samples.len() < 5 {
            samples.push(format!("createMessage m-{index}: {failure}"));
        }
        false
    }
}

/// One command to the connection point; its JSON answer.
async fn webhook_command(http: &reqwest::Client, url: &str, body: Value) -> anyhow::Result<Value> {
    let answer = http.post(url).json(&body).send().await?;
    let status = answer.status();
    let text = answer.text().await.unwrap_or_default();
    anyhow::ensure!(status == reqwest::StatusCode::OK, "webhook command {body} answered {status}: {text}");
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

/// Every message of a conversation, walking GetMessages pages of 250 with `after`.
pub async fn all_messages(api: &Api, conversation_id: &str, act_as: Option<&str>) -> anyhow::Result<Vec<Value>> {
    let mut messages: Vec<Value> = Vec::new();
    loop {
        let mut filter = json!({"count": 250});
        if let Some(last) = messages.last() {
            filter["after"] = last["id"].clone();
        }
        let page = api
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/conversations/{conversation_id}/messages/search"),
                act_as,
                Some(filter),
            )
            .await?;
        let page = page["messages"].as_array().cloned().unwrap_or_default();
        let short = page.len() < 250;
        messages.extend(page);
        if short {
            return Ok(messages);
        }
    }
}

pub async fn run(scenario: Webhook) -> anyhow::Result<RunResult> {
    let common = &scenario.common;
    anyhow::ensure!(scenario.conversations >= 1, "--conversations must be at least 1");
    anyhow::ensure!(scenario.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(scenario.concurrency >= 1, "--concurrency must be at least 1");
    let run = Run::start(common)?;
    let api = common.api().await?;
    let mut member_ids = Vec::new();
    for index in 0..scenario.members {
        member_ids.push(api.user(&format!("lt-webhook-member-{index}"), &format!("Webhook member {index}")).await?.0);
    }
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    let integration = api
        .call(
            reqwest::Method::POST,
            "/api/v1/integrations",
            None,
            Some(json!({"integration": {
                "externalSystemType": "webhook", "key": format!("loadtest-{millis}"), "use": true,
                "presentation": "Load test", "memberIds": member_ids,
            }})),
        )
        .await?;
    let connection_point = integration["connectionPointUrl"].as_str().context("no connectionPointUrl")?;
    // The server's public URL may name a proxy: the path is sent to each target.
    let path = &connection_point[connection_point.find("/webhooks/").context("unexpected connectionPointUrl")?..];
    let urls: Vec<String> = run.endpoints.targets().iter().map(|target| format!("{}{path}", target.base_url)).collect();
    let http = api.http().clone();
    for (index, author) in AUTHORS.iter().enumerate() {
        let body =
            json!({"createUser": {"extUserId": author, "name": format!("Author {}", index + 1), "fullName": ""}});
        webhook_command(&http, &urls[0], body).await?;
    }
    let conversation_ids: Vec<String> = futures_util::stream::iter(0..scenario.conversations)
        .map(|index| {
            let (http, url) = (http.clone(), urls[index % urls.len()].clone());
            async move {
                let body = json!({"createConversation": {
                    "extConversationId": ext_conversation(index), "title": format!("Load test {index}"),
                    "extUserId": AUTHORS[0], "members": [AUTHORS[1]],
                }});
                let created = webhook_command(&http, &url, body).await?;
                anyhow::Ok(created["conversationId"].as_str().context("no conversationId")?.to_owned())
            }
        })
        .buffered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;

    let ingest = Arc::new(Ingest {
        http,
        urls,
        conversations: scenario.conversations,
        timeout: Duration::from_secs(scenario.request_timeout_seconds.max(1)),
        accepted: Mutex::new(vec![Vec::new(); scenario.conversations]),
        samples: Mutex::new(Vec::new()),
    });
    let shared = ingest.clone();
    let pacing = paced(
        &run.recorder,
        scenario.rate,
        common.duration(),
        scenario.concurrency,
        Duration::from_secs(common.drain_seconds),
        move |index| {
            let ingest = shared.clone();
            async move { ingest.command(index).await }
        },
    )
    .await;

    // Read everything back: each accepted command stored exactly once.
    let mut failures: Vec<String> = ingest.samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    let accepted = std::mem::take(&mut *ingest.accepted.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    let (mut stored_total, mut missing, mut duplicated, mut unexpected) = (0u64, 0u64, 0u64, 0u64);
    for (conversation, conversation_id) in conversation_ids.iter().enumerate() {
        let messages = all_messages(&api, conversation_id, None).await?;
        let mut stored: HashMap<u64, u64> = HashMap::new();
        for message in &messages {
            if let Some(index) = message["text"].as_str().and_then(parse_message_text) {
                *stored.entry(index).or_default() += 1;
            }
        }
        let count: u64 = stored.values().sum();
        stored_total += count;
        let expected = &accepted[conversation];
        for index in expected {
            match stored.remove(index) {
                None => missing += 1,
                Some(1) => {}
                Some(copies) => duplicated += copies - 1,
            }
        }
        unexpected += stored.values().sum::<u64>();
        if count != expected.len() as u64 {
            failures.push(format!(
                "conversation {} holds {count} messages for {} accepted commands",
                ext_conversation(conversation),
                expected.len()
            ));
        }
    }
    if missing > 0 {
        failures.push(format!("{missing} accepted commands are not stored"));
    }
    if duplicated > 0 {
        failures.push(format!("{duplicated} accepted commands are stored more than once"));
    }
    if unexpected > 0 {
        failures.push(format!("{unexpected} messages are stored for commands that were not answered 200"));
    }
    if pacing.skipped > 0 {
        failures.push(format!("{} commands could not start before the deadline", pacing.skipped));
    }
    let parameters = json!({
        "members": scenario.members, "conversations": scenario.conversations, "rate": scenario.rate,
        "concurrency": scenario.concurrency, "requestTimeoutSeconds": scenario.request_timeout_seconds,
        "durationSeconds": common.duration_seconds,
    });
    let accepted_total: u64 = accepted.iter().map(|indexes| indexes.len() as u64).sum();
    let figures = vec![
        ("commands_per_second", pacing.per_second(accepted_total, common.duration())),
        ("commands_accepted", accepted_total as f64),
        ("messages_stored", stored_total as f64),
        ("commands_started_late", pacing.started_late as f64),
        ("max_start_lag_ms", pacing.max_start_lag_ms),
    ];
    run.finish(common, "webhook", parameters, figures, failures).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_texts_round_trip() {
        assert_eq!(super::parse_message_text(&super::message_text(42)), Some(42));
        assert_eq!(super::parse_message_text("hello"), None);
    }
}
