//! Routing's metric families and those of the cluster clients it owns
//! (endpoints.rs), described and shown from the first scrape (at zero):
//! dashboards and alerts must not see "no data" on a fresh node.
//! docs/observability.md lists them; a server test checks the two agree.

use metrics::{counter, describe_counter};

/// The services a cluster client calls, the `service` label's values.
const CLUSTER_SERVICES: [&str; 2] = ["routing", "bots"];

/// The bus topic kinds routing publishes to (beseda_bus::Topic::kind).
const PUBLISHED_TOPIC_KINDS: [&str; 4] = ["conversation", "user", "application", "outbox"];

/// Routing's own families.
pub fn register() {
    describe_counter!("beseda_messages_stored_total", "messages committed");
    counter!("beseda_messages_stored_total").increment(0);
    describe_counter!("beseda_messages_deduplicated_total", "sends answered from an earlier clientMessageId");
    counter!("beseda_messages_deduplicated_total").increment(0);
    describe_counter!("beseda_conversations_created_total", "conversations created");
    counter!("beseda_conversations_created_total").increment(0);
    describe_counter!("beseda_bus_published_events_total", "committed events handed to the bus, per topic kind");
    for topic_kind in PUBLISHED_TOPIC_KINDS {
        counter!("beseda_bus_published_events_total", "topic_kind" => topic_kind).increment(0);
    }
}

/// The families of the clients of other processes (a gateway's or a bots
/// process's calls to routing and bots).
pub fn register_cluster_clients() {
    describe_counter!(
        "beseda_cluster_failovers_total",
        "calls to another process retried on the next instance because one was unreachable"
    );
    describe_counter!("beseda_cluster_calls_lost_total", "calls to another process lost in flight");
    for service in CLUSTER_SERVICES {
        counter!("beseda_cluster_failovers_total", "service" => service).increment(0);
        counter!("beseda_cluster_calls_lost_total", "service" => service).increment(0);
    }
}
