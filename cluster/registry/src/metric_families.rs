//! The registry voter's metric families that are not per-node gauges (those
//! are published by the node from its start), described and shown from the
//! first scrape.

use metrics::{describe_histogram, histogram};

/// Describes the voter's histogram families and registers them.
pub fn register_voter() {
    describe_histogram!("beseda_registry_batch_size", "connection changes written in one registry batch");
    let _registered = histogram!("beseda_registry_batch_size");
}
