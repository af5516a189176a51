//! The gateway's metric families, described and shown from the first scrape
//! (at zero) instead of appearing only once recorded: dashboards and alerts
//! written against a family must not see "no data" on a fresh node.
//! docs/observability.md lists them; a server test checks the two agree.

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

/// Describes every family of the gateway and registers it at zero.
pub fn register() {
    describe_gauge!("beseda_ws_connections", "open WebSocket connections");
    gauge!("beseda_ws_connections").increment(0.0);
    describe_counter!("beseda_ws_frames_in_total", "request frames received from clients");
    counter!("beseda_ws_frames_in_total").increment(0);
    describe_counter!("beseda_ws_frames_out_total", "frames written to clients' sockets");
    counter!("beseda_ws_frames_out_total").increment(0);
    describe_counter!("beseda_ws_flushes_total", "socket writes (flushes) of frames queued for a connection");
    counter!("beseda_ws_flushes_total").increment(0);
    describe_counter!("beseda_messages_received_total", "client sendMessage frames accepted at the gateway");
    counter!("beseda_messages_received_total").increment(0);
    describe_histogram!(
        "beseda_fanout_latency_seconds",
        Unit::Seconds,
        "from an event's commit to its push into a receiving connection's send queue"
    );
    let _registered = histogram!("beseda_fanout_latency_seconds");
    describe_counter!("beseda_ws_slow_consumers_total", "connections closed as slow consumers");
    counter!("beseda_ws_slow_consumers_total").increment(0);
    describe_counter!("beseda_ws_gap_fills_total", "live gaps in a conversation's seq filled from storage");
    counter!("beseda_ws_gap_fills_total").increment(0);
    describe_counter!("beseda_api_requests_total", "REST API calls per operation");
    for route in crate::api::routes() {
        counter!("beseda_api_requests_total", "operation" => route.operation).increment(0);
    }
}
