//! Smoke runs of the API scenarios (webhook ingest, bot echo, listing)
//! against a real node: short and small, checking correctness only.

mod common;

use beseda_loadtest::scenarios::{bot_echo, listing, webhook};

fn figure(result: &beseda_loadtest::result::RunResult, name: &str) -> f64 {
    *result.figures.get(name).unwrap_or_else(|| panic!("no figure {name} in {:?}", result.figures))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_commands_are_stored_exactly_once() {
    let server = common::Server::start().await;
    let result = webhook::run(webhook::Webhook {
        common: server.common(2),
        members: 2,
        conversations: 3,
        rate: 20.0,
        concurrency: 4,
        request_timeout_seconds: 10,
    })
    .await
    .unwrap();
    assert!(result.passed, "{:?}", result.failures);
    assert!(result.totals.sent > 0);
    assert_eq!(result.totals.delivered, result.totals.sent, "every command answered 200");
    assert_eq!(result.totals.errors, 0);
    assert_eq!(figure(&result, "commands_accepted"), result.totals.sent as f64);
    assert_eq!(figure(&result, "messages_stored"), result.totals.sent as f64);
    assert_eq!(result.latency_ms.count, result.totals.sent);
    server.assert_reports();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_to_the_bot_is_echoed_once_in_order() {
    let server = common::Server::start().await;
    let result = bot_echo::run(bot_echo::BotEcho {
        common: server.common(2),
        people: 3,
        rate: 6.0,
        concurrency: 100,
        bot_type: "Echo".into(),
    })
    .await
    .unwrap();
    assert!(result.passed, "{:?}", result.failures);
    assert!(result.totals.sent > 0);
    assert_eq!(result.totals.delivered, result.totals.sent, "every message echoed to its sender");
    assert_eq!((result.totals.duplicated, result.totals.out_of_order), (0, 0));
    assert!(figure(&result, "bot_message_events") >= result.totals.sent as f64);
    assert_eq!(result.totals.peak_connections, 3);
    server.assert_reports();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_are_consistent() {
    let server = common::Server::start().await;
    let result = listing::run(listing::Listing {
        common: server.common(2),
        messages: 120,
        conversations: 30,
        rate: 20.0,
        page_size: 25,
        concurrency: 4,
        seed_senders: 4,
        request_timeout_seconds: 10,
    })
    .await
    .unwrap();
    assert!(result.passed, "{:?}", result.failures);
    assert!(result.totals.sent > 0);
    assert_eq!(result.totals.delivered, result.totals.sent, "every page as expected");
    assert_eq!(result.totals.errors, 0);
    let messages = figure(&result, "get_messages_requests");
    let conversations = figure(&result, "get_conversations_requests");
    assert_eq!(messages + conversations, result.totals.sent as f64);
    assert!(messages >= 1.0 && conversations >= 1.0, "both kinds were asked");
    server.assert_reports();
    server.stop().await;
}
