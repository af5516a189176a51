//! Smoke runs of the connection scenarios (connect storm, idle hold,
//! reconnect churn) against a real node: short and small, checking
//! correctness and consistent counts only, no timing.

mod common;

use beseda_loadtest::scenarios::{churn, connect_storm, idle};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_ramps_holds_and_reports_a_sustained_rate() {
    let server = common::Server::start().await;
    let result = connect_storm::run(connect_storm::ConnectStorm {
        common: server.common(3),
        users: Some(5),
        start_rate: 20.0,
        step: 20.0,
        step_seconds: 1.0,
        max_rate: 100.0,
        max_connections: 60,
        max_failure_percent: 1.0,
        // Generous: a smoke run checks counts, not speed.
        max_connect_p99_ms: 10_000.0,
    })
    .await
    .unwrap();
    assert!(result.passed, "{:?}", result.failures);
    let totals = &result.totals;
    assert_eq!(totals.sent, 60, "20 in the first step, 40 in the second, then --max-connections");
    assert_eq!(totals.connections_failed, 0);
    assert_eq!(totals.connections_opened, totals.sent);
    assert_eq!(totals.delivered, totals.connections_opened, "every welcome is a delivery");
    assert_eq!(totals.expected_deliveries, totals.delivered);
    assert_eq!(totals.peak_connections, 60, "all were held until the ramp ended");
    assert_eq!(result.latency_ms.count, 60, "one connect latency per connection");
    assert_eq!(result.figures["connections_per_second_sustained"], 40.0);
    assert_eq!(result.figures["peak_connections"], 60.0);
    assert_eq!(result.figures["connections_dropped"], 0.0);
    assert!(result.figures["connect_p99_ms"] > 0.0);
    assert_eq!(result.parameters["steps"].as_array().map(Vec::len), Some(2));
    assert_eq!(result.parameters["stoppedBy"], "MaxConnections");
    server.assert_reports();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_holds_every_connection_and_measures_memory() {
    let server = common::Server::start().await;
    let result =
        idle::run(idle::Idle { common: server.common(2), connections: 30, connect_rate: 60.0, users: Some(5) })
            .await
            .unwrap();
    assert!(result.passed, "{:?}", result.failures);
    let totals = &result.totals;
    assert_eq!(totals.connections_opened, 30);
    assert_eq!(totals.connections_failed, 0);
    assert_eq!(totals.peak_connections, 30);
    assert_eq!((totals.sent, totals.delivered, totals.lost), (30, 30, 0));
    assert_eq!(result.figures["connections_held"], 30.0);
    assert_eq!(result.figures["connections_dropped"], 0.0);
    // The server runs in the test's own process, whose id the smoke settings give.
    assert!(result.figures["server_rss_bytes_before"] > 0.0);
    assert!(result.figures["server_rss_bytes_after"] > 0.0);
    assert!(result.figures.contains_key("server_bytes_per_connection"));
    server.assert_reports();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_resumes_every_client_without_loss_or_duplicates() {
    let server = common::Server::start().await;
    let clients = 8;
    let result = churn::run(churn::Churn {
        common: server.common(3),
        clients,
        senders: 2,
        rate: 20.0,
        reconnect_every_seconds: 0.5,
    })
    .await
    .unwrap();
    assert!(result.passed, "{:?}", result.failures);
    let totals = &result.totals;
    assert!(totals.sent > 0);
    assert_eq!(totals.delivered, totals.sent * clients as u64, "every client got every message");
    assert_eq!((totals.lost, totals.duplicated, totals.out_of_order), (0, 0, 0));
    let reconnects = result.figures["reconnects"];
    assert!(reconnects >= clients as f64, "each client reconnected at least once: {reconnects}");
    assert_eq!(totals.connections_opened as f64, (clients + 2) as f64 + reconnects);
    assert!(result.figures["reconnect_p99_ms"] >= result.figures["reconnect_p50_ms"]);
    assert!(result.figures["reconnect_p50_ms"] > 0.0);
    server.assert_reports();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_stops_at_a_failing_step_and_fails_when_none_passed() {
    let server = common::Server::start().await;
    let result = connect_storm::run(connect_storm::ConnectStorm {
        common: server.common(3),
        users: Some(2),
        start_rate: 20.0,
        step: 20.0,
        step_seconds: 1.0,
        max_rate: 100.0,
        max_connections: 100,
        max_failure_percent: 1.0,
        // No connection is welcomed within a microsecond: the first step fails.
        max_connect_p99_ms: 0.001,
    })
    .await
    .unwrap();
    assert!(!result.passed);
    assert!(result.failures.iter().any(|failure| failure.contains("no step passed")), "{:?}", result.failures);
    assert_eq!(result.figures["connections_per_second_sustained"], 0.0);
    assert_eq!(result.figures["failed_step_rate"], 20.0);
    assert_eq!(result.parameters["stoppedBy"], "FailedStep");
    assert!(result.totals.sent < 20, "the ramp stopped within its first step");
    assert_eq!(result.totals.lost, 0, "slow is not lost");
    server.assert_reports();
    server.stop().await;
}
