//! The bots service's metric families, described and shown from the first
//! scrape (at zero): dashboards and alerts must not see "no data" on a
//! fresh node. docs/observability.md lists them; a server test checks the
//! two agree.

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use crate::outbound::Outcome;

/// Statuses a webhook answers (docs/webhooks.md); others appear once answered.
const WEBHOOK_STATUSES: [&str; 7] = ["200", "400", "401", "404", "409", "413", "500"];

/// Describes every family of the bots service and registers it at zero.
pub fn register() {
    describe_counter!("beseda_relayed_events_total", "outbox events moved into bot and subscription queues");
    counter!("beseda_relayed_events_total").increment(0);
    describe_gauge!("beseda_bots_relay_batch", "outbox rows taken by the relay's last batch");
    gauge!("beseda_bots_relay_batch").set(0.0);
    describe_counter!("beseda_bot_events_total", "events a bot finished over bot processing, per outcome");
    describe_counter!("beseda_outbound_deliveries_total", "outbound event deliveries to subscriptions, per outcome");
    for outcome in [Outcome::Ok, Outcome::Retry, Outcome::Dead] {
        counter!("beseda_bot_events_total", "outcome" => outcome.as_str()).increment(0);
        counter!("beseda_outbound_deliveries_total", "outcome" => outcome.as_str()).increment(0);
    }
    describe_gauge!("beseda_bot_processing_connections", "open bot processing connections");
    gauge!("beseda_bot_processing_connections").increment(0.0);
    describe_histogram!("beseda_outbound_delivery_seconds", Unit::Seconds, "duration of one outbound delivery request");
    let _registered = histogram!("beseda_outbound_delivery_seconds");
    describe_counter!("beseda_webhook_requests_total", "webhook requests received, per HTTP status answered");
    for status in WEBHOOK_STATUSES {
        counter!("beseda_webhook_requests_total", "status" => status).increment(0);
    }
}
