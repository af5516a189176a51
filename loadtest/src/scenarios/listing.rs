//! Listing and paging: the read side of the REST API under load.
//!
//! The run seeds one conversation with `--messages` messages (posted through
//! the API by `--seed-senders` concurrent senders, as one user) and creates
//! `--conversations` further group conversations that user is a member of.
//! Then, at `--rate` requests per second in all (open loop, at most
//! `--concurrency` outstanding, round robin over the targets), it asks
//! alternately for a GetMessages page (`count` = `--page-size`, starting
//! `after` a random message, or at the beginning) and a GetConversations page
//! of the user's conversations (likewise from a random one), both as that
//! user.
//!
//! Measured: the latency of each request, from the time it was *scheduled*
//! to its whole answer (a request that waited for a free slot counts its
//! wait), and `requests_per_second`: requests answered correctly per second
//! of the measured phase, or of the time until the last answer when the
//! server could not keep up.
//!
//! Pass/fail: nothing is written during the measured phase, so every page
//! is known in advance: a request that fails, or whose page is not exactly
//! the expected run of ids, is an error and counts as lost, which fails the
//! run. Before and after the measured phase a full walk of the messages
//! (and of the conversations) must return every one once, in order (seq
//! strictly increasing for messages); any difference fails the run.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use clap::Args;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::api::Api;
use crate::result::RunResult;
use crate::run::{Common, Run};
use crate::scenarios::webhook::paced;

#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct Listing {
    #[command(flatten)]
    pub common: Common,
    /// Messages seeded into the conversation that GetMessages pages through.
    #[arg(long, default_value_t = 2_000)]
    pub messages: usize,
    /// Further conversations of the user that GetConversations pages through.
    #[arg(long, default_value_t = 200)]
    pub conversations: usize,
    /// Requests per second, both kinds together (they alternate).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Page size (`count`) of both requests, 1 to 250.
    #[arg(long, default_value_t = 250)]
    pub page_size: usize,
    /// Most requests outstanding at once; a request due while all are busy
    /// starts late and its latency counts from when it was due.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Concurrent senders while seeding.
    #[arg(long, default_value_t = 8)]
    pub seed_senders: usize,
    /// A request not answered within this time is an error.
    #[arg(long, default_value_t = 10)]
    pub request_timeout_seconds: u64,
}

/// A tiny pseudo-random generator (SplitMix64): random starts need no crate.
fn splitmix(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Page `index` of the load: a random start from -1 (the beginning) to the last id.
fn random_start(seed: u64, index: u64, len: usize) -> Option<usize> {
    let pick = splitmix(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03)) % (len as u64 + 1);
    usize::try_from(pick).ok().and_then(|pick| pick.checked_sub(1))
}

/// What the request tasks share.
struct Reader {
    http: reqwest::Client,
    authorization: String,
    user_id: String,
    base_urls: Vec<String>,
    conversation_id: String,
    /// The messages' ids in order, and the conversations' ids in order.
    message_ids: Vec<String>,
    conversation_ids: Vec<String>,
    page_size: usize,
    timeout: Duration,
    seed: u64,
    messages_requests: AtomicU64,
    conversations_requests: AtomicU64,
    inconsistent: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Reader {
    async fn request(&self, index: u64) -> bool {
        let base_url = &self.base_urls[usize::try_from(index).unwrap_or(0) % self.base_urls.len()];
        let messages = index.is_multiple_of(2);
        let (path, ids, field) = if messages {
            self.messages_requests.fetch_add(1, Ordering::Relaxed);
            (format!("/api/v1/conversations/{}/messages/search", self.conversation_id), &self.message_ids, "messages")
        } else {
            self.conversations_requests.fetch_add(1, Ordering::Relaxed);
            ("/api/v1/conversations/search".to_owned(), &self.conversation_ids, "conversations")
        };
        let start = random_start(self.seed, index, ids.len());
        let mut filter = json!({"count": self.page_size});
        if let Some(start) = start {
            filter["after"] = json!(ids[start]);
        }
        let first = start.map_or(0, |start| start + 1);
        let expected = &ids[first..(first + self.page_size).min(ids.len())];
        let answer = self
            .http
            .post(format!("{base_url}{path}"))
            .timeout(self.timeout)
            .header("authorization", &self.authorization)
            .header("x-beseda-act-as-user", &self.user_id)
            .json(&filter)
            .send()
            .await;
        let failure = match answer {
            Ok(answer) if answer.status().is_success() => match answer.json::<Value>().await {
                Ok(page) => {
                    let got: Vec<&str> = page[field]
                        .as_array()
                        .map(|items| items.iter().filter_map(|item| item["id"].as_str()).collect())
                        .unwrap_or_default();
                    if got.len() == expected.len() && got.iter().zip(expected).all(|(got, expected)| got == expected) {
                        return true;
                    }
                    self.inconsistent.fetch_add(1, Ordering::Relaxed);
                    format!("{} ids where {} were expected, or not the expected ones", got.len(), expected.len())
                }
                Err(error) => format!("reading the answer: {error}"),
            },
            Ok(answer) => {
                let status = answer.status();
                format!("{status}: {}", answer.text().await.unwrap_or_default())
            }
            Err(error) => format!("{error}"),
        };
        let mut samples = self.samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if samples.len() < 5 {
            samples.push(format!("{field} page after {start:?}: {failure}"));
        }
        false
    }
}

/// A full walk of the conversation's messages with pages of `page_size`:
/// their ids in order, or why the walk is inconsistent.
async fn walk_messages(
    api: &Api,
    conversation_id: &str,
    user_id: &str,
    page_size: usize,
) -> anyhow::Result<Result<Vec<String>, String>> {
    let mut ids: Vec<String> = Vec::new();
    let mut last_seq = 0u64;
    loop {
        let mut filter = json!({"count": page_size});
        if let Some(last) = ids.last() {
            filter["after"] = json!(last);
        }
        let page = api
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/conversations/{conversation_id}/messages/search"),
                Some(user_id),
                Some(filter),
            )
            .await?;
        let page = page["messages"].as_array().cloned().unwrap_or_default();
        for message in &page {
            let seq = message["seq"]
                .as_str()
                .and_then(|seq| seq.parse::<u64>().ok())
                .or_else(|| message["seq"].as_u64())
                .unwrap_or_default();
            if seq <= last_seq {
                return Ok(Err(format!("message seq {seq} after seq {last_seq}: not in order")));
            }
            last_seq = seq;
            ids.push(message["id"].as_str().context("a message without id")?.to_owned());
        }
        if page.len() < page_size {
            return Ok(Ok(ids));
        }
    }
}

/// A full walk of the user's conversations with pages of `page_size`: their ids in order.
async fn walk_conversations(api: &Api, user_id: &str, page_size: usize) -> anyhow::Result<Vec<String>> {
    let mut ids: Vec<String> = Vec::new();
    loop {
        let mut filter = json!({"count": page_size});
        if let Some(last) = ids.last() {
            filter["after"] = json!(last);
        }
        let page = api.call(reqwest::Method::POST, "/api/v1/conversations/search", Some(user_id), Some(filter)).await?;
        let page = page["conversations"].as_array().cloned().unwrap_or_default();
        for conversation in &page {
            ids.push(conversation["id"].as_str().context("a conversation without id")?.to_owned());
        }
        if page.len() < page_size {
            return Ok(ids);
        }
    }
}

/// Checks a walk against what was created: every id once; returns the failures.
fn check_walk(what: &str, walked: &[String], created: &HashSet<String>) -> Vec<String> {
    let mut failures = Vec::new();
    let mut seen = HashSet::new();
    let duplicates = walked.iter().filter(|id| !seen.insert(id.as_str())).count();
    if duplicates > 0 {
        failures.push(format!("a full walk of the {what} returned {duplicates} of them twice"));
    }
    let missing = created.iter().filter(|id| !seen.contains(id.as_str())).count();
    if missing > 0 {
        failures.push(format!("a full walk of the {what} missed {missing} of {}", created.len()));
    }
    let unexpected = seen.iter().filter(|id| !created.contains(**id)).count();
    if unexpected > 0 {
        failures.push(format!("a full walk of the {what} returned {unexpected} that were not created"));
    }
    failures
}

pub async fn run(scenario: Listing) -> anyhow::Result<RunResult> {
    let common = &scenario.common;
    anyhow::ensure!((1..=250).contains(&scenario.page_size), "--page-size must be 1..=250");
    anyhow::ensure!(scenario.messages >= 1, "--messages must be at least 1");
    anyhow::ensure!(scenario.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(scenario.concurrency >= 1, "--concurrency must be at least 1");
    let run = Run::start(common)?;
    let api = common.api().await?;
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    // A reader of its own per run: its conversations are exactly the run's.
    let (user_id, _) = api.user(&format!("lt-listing-reader-{millis}"), "Listing reader").await?;
    let (other_id, _) = api.user("lt-listing-other", "Listing other").await?;
    let members = [user_id.clone(), other_id.clone()];
    let conversation_id = api.group(&format!("loadtest listing {millis}"), &members).await?;

    // Seeding, several senders at once; each message idempotent by its clientMessageId.
    let senders = scenario.seed_senders.max(1);
    let sent: Vec<String> = futures_util::stream::iter(0..scenario.messages)
        .map(|index| {
            let (api, user_id, conversation_id) = (&api, &user_id, &conversation_id);
            async move {
                let body =
                    json!({"text": format!("lt-listing {index}"), "clientMessageId": format!("lt-{millis}-{index}")});
                let path = format!("/api/v1/conversations/{conversation_id}/messages");
                let message = api.call(reqwest::Method::POST, &path, Some(user_id), Some(body)).await?;
                anyhow::Ok(message["id"].as_str().context("no message id")?.to_owned())
            }
        })
        .buffer_unordered(senders)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let created_messages: HashSet<String> = sent.into_iter().collect();
    let mut created_conversations: HashSet<String> = futures_util::stream::iter(0..scenario.conversations)
        .map(|index| {
            let (api, members) = (&api, &members);
            async move { api.group(&format!("loadtest listing {millis} #{index}"), members).await }
        })
        .buffer_unordered(senders)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    created_conversations.insert(conversation_id.clone());

    // The pages the load expects, from a first full walk (itself checked).
    let mut failures = Vec::new();
    let message_ids = match walk_messages(&api, &conversation_id, &user_id, scenario.page_size).await? {
        Ok(ids) => ids,
        Err(why) => anyhow::bail!("the seeded messages page inconsistently before the load: {why}"),
    };
    let conversation_ids = walk_conversations(&api, &user_id, scenario.page_size).await?;
    let before: Vec<String> = check_walk("messages", &message_ids, &created_messages)
        .into_iter()
        .chain(check_walk("conversations", &conversation_ids, &created_conversations))
        .collect();
    anyhow::ensure!(before.is_empty(), "paging is inconsistent before the load: {}", before.join("; "));

    let credentials = format!("{}:{}", api.application_id, api.application_key);
    let reader = Arc::new(Reader {
        http: api.http().clone(),
        authorization: format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials)),
        user_id: user_id.clone(),
        base_urls: run.endpoints.targets().iter().map(|target| target.base_url.clone()).collect(),
        conversation_id: conversation_id.clone(),
        message_ids,
        conversation_ids,
        page_size: scenario.page_size,
        timeout: Duration::from_secs(scenario.request_timeout_seconds.max(1)),
        seed: u64::try_from(millis).unwrap_or_default(),
        messages_requests: AtomicU64::new(0),
        conversations_requests: AtomicU64::new(0),
        inconsistent: AtomicU64::new(0),
        samples: Mutex::new(Vec::new()),
    });
    let shared = reader.clone();
    let pacing = paced(
        &run.recorder,
        scenario.rate,
        common.duration(),
        scenario.concurrency,
        Duration::from_secs(common.drain_seconds),
        move |index| {
            let reader = shared.clone();
            async move { reader.request(index).await }
        },
    )
    .await;

    failures.extend(reader.samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter().cloned());
    let inconsistent = reader.inconsistent.load(Ordering::Relaxed);
    if inconsistent > 0 {
        failures.push(format!("{inconsistent} pages were not the expected ones"));
    }
    if pacing.skipped > 0 {
        failures.push(format!("{} requests could not start before the deadline", pacing.skipped));
    }
    // After the load: a full walk still returns everything once, in order.
    match walk_messages(&api, &conversation_id, &user_id, scenario.page_size).await? {
        Ok(ids) => {
            failures.extend(check_walk("messages", &ids, &created_messages));
            if ids != reader.message_ids {
                failures.push("a full walk of the messages after the load differs from the one before".into());
            }
        }
        Err(why) => failures.push(format!("the messages page inconsistently after the load: {why}")),
    }
    let conversations_after = walk_conversations(&api, &user_id, scenario.page_size).await?;
    failures.extend(check_walk("conversations", &conversations_after, &created_conversations));
    if conversations_after != reader.conversation_ids {
        failures.push("a full walk of the conversations after the load differs from the one before".into());
    }

    let parameters = json!({
        "messages": scenario.messages, "conversations": scenario.conversations, "rate": scenario.rate,
        "pageSize": scenario.page_size, "concurrency": scenario.concurrency, "seedSenders": scenario.seed_senders,
        "requestTimeoutSeconds": scenario.request_timeout_seconds, "durationSeconds": common.duration_seconds,
    });
    let totals = run.recorder.totals();
    let figures = vec![
        ("requests_per_second", pacing.per_second(totals.delivered, common.duration())),
        ("get_messages_requests", reader.messages_requests.load(Ordering::Relaxed) as f64),
        ("get_conversations_requests", reader.conversations_requests.load(Ordering::Relaxed) as f64),
        ("requests_started_late", pacing.started_late as f64),
        ("max_start_lag_ms", pacing.max_start_lag_ms),
    ];
    run.finish(common, "listing", parameters, figures, failures).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_starts_cover_the_beginning_and_every_id() {
        let mut seen = std::collections::HashSet::new();
        for index in 0..1000 {
            let start = super::random_start(7, index, 4);
            assert!(start.is_none_or(|start| start < 4));
            seen.insert(start);
        }
        assert_eq!(seen.len(), 5, "{seen:?}");
    }
}
