//! The store's metric families, described and shown from the first scrape:
//! dashboards must not see "no data" on a fresh node.

use metrics::{describe_histogram, histogram};

/// Describes every family of the store and registers it.
pub fn register() {
    describe_histogram!(
        "beseda_store_group_commit_size",
        "writes committed together in one embedded-store (SQLite) transaction"
    );
    let _registered = histogram!("beseda_store_group_commit_size");
}
