//! Smoke runs of the messaging scenarios against a real node: short and
//! small, checking correctness only.

mod common;

use beseda_loadtest::scenarios::{fanout, pairs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_everything_once_in_order() {
    let server = common::Server::start().await;
    let result =
        fanout::run(fanout::Fanout { common: server.common(2), members: 20, senders: 3, rate: 30.0, relay: false })
            .await
            .unwrap();
    assert!(result.passed, "{:?}", result.failures);
    assert!(result.totals.sent > 0);
    assert_eq!(result.totals.delivered, result.totals.sent * 19);
    assert_eq!(result.totals.peak_connections, 20);
    assert!(result.latency_ms.count > 0);
    assert!(!result.server_samples.is_empty(), "the server's /metrics was sampled");
    server.assert_reports();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_deliver_everything_once_in_order() {
    let server = common::Server::start().await;
    let result = pairs::run(pairs::Pairs { common: server.common(2), pairs: 5, rate: 5.0 }).await.unwrap();
    assert!(result.passed, "{:?}", result.failures);
    assert!(result.totals.sent > 0);
    assert_eq!(result.totals.delivered, result.totals.sent);
    server.assert_reports();
    server.stop().await;
}
