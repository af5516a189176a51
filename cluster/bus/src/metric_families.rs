//! The Redis bus's metric families, described and shown from the first
//! scrape (at zero) by processes that use Redis: dashboards must not see
//! "no data" on a fresh node.

use metrics::{counter, describe_counter, describe_gauge, gauge};

/// Describes every family of the Redis bus and registers it at zero.
pub fn register_redis() {
    describe_counter!("beseda_bus_published_total", "events written to Redis");
    counter!("beseda_bus_published_total").increment(0);
    describe_counter!("beseda_bus_publish_errors_total", "failed writes to Redis");
    counter!("beseda_bus_publish_errors_total").increment(0);
    describe_gauge!("beseda_bus_publish_queue_depth", "events waiting to be written to Redis");
    gauge!("beseda_bus_publish_queue_depth").increment(0.0);
    describe_counter!("beseda_bus_received_total", "events received from Redis");
    counter!("beseda_bus_received_total").increment(0);
    describe_counter!("beseda_bus_decode_errors_total", "messages on a bus channel that are not a BusEvent");
    counter!("beseda_bus_decode_errors_total").increment(0);
    describe_gauge!("beseda_bus_channels", "Redis channels this process is subscribed to");
    gauge!("beseda_bus_channels").increment(0.0);
    describe_counter!("beseda_bus_reconnects_total", "reconnections to Redis, per connection");
    for connection in ["publisher", "subscriber"] {
        counter!("beseda_bus_reconnects_total", "connection" => connection).increment(0);
    }
}
