//! Bot event delivery latency and webhook throughput of one node, measured
//! end to end over real sockets:
//!
//! ```sh
//! cargo bench -p beseda --bench bots                    # embedded SQLite
//! BESEDA_BENCH_PG_URL=postgres://postgres@127.0.0.1:5432/test cargo bench -p beseda --bench bots
//! ```
//!
//! - Bot event latency: 50 people send messages to a bot, each in a
//!   one-on-one, through the REST API, open-loop at fixed rates; the application's
//!   processing connection acknowledges each event. Latency is the
//!   message's server timestamp (taken just before its transaction) to the
//!   moment the application read the event from its socket.
//! - Webhook throughput: createMessage commands POSTed by concurrent
//!   senders into a handful of conversations.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::processing::Processing;
use common::{TestServer, user};
use serde_json::json;

/// Offered loads of the latency run, messages per second.
const RATES_PER_SECOND: [u64; 4] = [100, 200, 400, 800];
const SECONDS: u64 = 10;
const PEOPLE: usize = 50;
const WEBHOOK_COMMANDS: usize = 5_000;
const WEBHOOK_SENDERS: usize = 32;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

#[tokio::main]
async fn main() {
    let postgres = std::env::var("BESEDA_BENCH_PG_URL").ok();
    let schema = format!("bench_bots_{}", std::process::id());
    let server = TestServer::start_configured(
        tempfile::tempdir().unwrap(),
        postgres.clone().map(|url| (url, schema.clone())),
        // The default pool, not the tests' small one.
        |config| config.store.pool_size = 16,
    )
    .await;
    let store = if postgres.is_some() { "PostgreSQL" } else { "embedded SQLite" };
    println!("store: {store}");
    bot_latency(&server).await;
    webhook_throughput(&server).await;
}

async fn bot_latency(server: &TestServer) {
    let application = server.register("bench@example.com", "Bench").await;
    let mut processing = Processing::connect(server, &application, json!([{"botType": "Bench"}])).await;
    let bot_user = processing.bot_user("Bench");
    // People each in a one-on-one with the bot, as a support bot sees them.
    let mut chats = Vec::new();
    for person in 0..PEOPLE {
        let (person_id, auth) = user(server, &application, &format!("p{person}"), &format!("Person {person}")).await;
        let token = match auth {
            common::Auth::Bearer(token) => token,
            _ => unreachable!("users authenticate with tokens"),
        };
        let conversation = server
            .ok(
                "POST",
                "/api/v1/conversations",
                &application.privileged(),
                Some(json!({"conversation": {"group": false, "memberIds": [person_id, bot_user]}})),
            )
            .await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        chats.push((token, conversation));
    }
    // The conversation-created events.
    for _ in 0..PEOPLE {
        let event = processing.next_event().await;
        processing.ack(&event).await;
    }
    for rate in RATES_PER_SECOND {
        let messages = rate * SECONDS;
        let server_url = server.base_url.clone();
        let chats = chats.clone();
        let sender = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let start = tokio::time::Instant::now();
            let mut sends = Vec::new();
            for index in 0..messages {
                // Open loop: each send starts at its scheduled time, however
                // long the previous ones take.
                tokio::time::sleep_until(start + Duration::from_micros(index * 1_000_000 / rate)).await;
                let (token, conversation) = &chats[(index as usize) % chats.len()];
                let request = http
                    .post(format!("{server_url}/api/v1/conversations/{conversation}/messages"))
                    .bearer_auth(token)
                    .json(&json!({"text": format!("m{index}")}));
                sends.push(tokio::spawn(async move { request.send().await.map(|answer| answer.status().as_u16()) }));
            }
            for send in sends {
                assert_eq!(send.await.unwrap().unwrap(), 200);
            }
        });
        let mut latencies = Vec::with_capacity(messages as usize);
        let started = Instant::now();
        while latencies.len() < messages as usize {
            let event = processing.next_event().await;
            let received = now_micros();
            if event["kind"] == "BOT_EVENT_KIND_MESSAGE" {
                let date: pbjson_types::Timestamp = serde_json::from_value(event["message"]["date"].clone()).unwrap();
                let sent = date.seconds * 1_000_000 + i64::from(date.nanos) / 1_000;
                latencies.push((received - sent) as f64 / 1_000.0);
            }
            processing.ack(&event).await;
        }
        let elapsed = started.elapsed();
        sender.await.unwrap();
        latencies.sort_by(f64::total_cmp);
        println!(
            "bot event delivery, {messages} messages in {PEOPLE} one-on-ones at {rate}/s open loop \
             ({:.0} events/s received): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            messages as f64 / elapsed.as_secs_f64(),
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0),
        );
    }
}

async fn webhook_throughput(server: &TestServer) {
    let application = server.register("hooks@example.com", "Hooks").await;
    let integration = server
        .ok(
            "POST",
            "/api/v1/integrations",
            &application.privileged(),
            Some(json!({"integration": {"externalSystemType": "webhook", "key": "bench", "use": true, "presentation": "Bench"}})),
        )
        .await;
    let url = Arc::new(integration["connectionPointUrl"].as_str().unwrap().to_owned());
    let http = reqwest::Client::new();
    for conversation in 0..8 {
        let answer = http
            .post(url.as_str())
            .json(&json!({"createConversation": {"extConversationId": format!("c{conversation}"), "title": format!("Chat {conversation}")}}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{}", answer.text().await.unwrap());
    }
    let started = Instant::now();
    let mut senders = Vec::new();
    for sender in 0..WEBHOOK_SENDERS {
        let (http, url) = (http.clone(), url.clone());
        senders.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for index in (sender..WEBHOOK_COMMANDS).step_by(WEBHOOK_SENDERS) {
                let body = json!({"createMessage": {
                    "extId": format!("m{index}"), "text": format!("message {index}"),
                    "extConversationId": format!("c{}", index % 8),
                }});
                let sent = Instant::now();
                let answer = http.post(url.as_str()).json(&body).send().await.unwrap();
                assert_eq!(answer.status().as_u16(), 200, "{}", answer.text().await.unwrap());
                latencies.push(sent.elapsed().as_secs_f64() * 1_000.0);
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for sender in senders {
        latencies.extend(sender.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort_by(f64::total_cmp);
    println!(
        "webhook createMessage, {WEBHOOK_COMMANDS} commands from {WEBHOOK_SENDERS} senders: {:.0} commands/s, \
         p50 {:.2} ms, p99 {:.2} ms",
        WEBHOOK_COMMANDS as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
    );
}
