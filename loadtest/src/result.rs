//! What a run produces: the one structure behind the JSON result, the HTML
//! report and the PNG plots. Serialized as is into `result.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Latency percentiles in milliseconds, from an HDR histogram.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Counts over the whole run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Messages (or requests) sent.
    pub sent: u64,
    /// Deliveries expected: each sent message times its receivers.
    pub expected_deliveries: u64,
    /// Deliveries received (first copies only).
    pub delivered: u64,
    /// Expected deliveries that never arrived before the run's drain deadline.
    pub lost: u64,
    /// Second and later copies of one delivery.
    pub duplicated: u64,
    /// Deliveries that arrived after a later message of the same sender.
    pub out_of_order: u64,
    /// Failed requests, refused connections, error frames.
    pub errors: u64,
    pub connections_opened: u64,
    pub connections_failed: u64,
    pub peak_connections: u64,
}

/// One second of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since the start of the measured phase.
    pub t: f64,
    pub sent: u64,
    pub delivered: u64,
    pub errors: u64,
    /// Open connections at the end of the second.
    pub connections: u64,
    /// Latency of the deliveries received in this second.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One scrape of a target's `/metrics` (and, when known, its memory).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerSample {
    pub t: f64,
    pub target: String,
    /// Metric name with labels, as exposed, to its value.
    pub metrics: BTreeMap<String, f64>,
    /// Resident memory of the server process, when `--server-pid` was given.
    pub rss_bytes: Option<u64>,
}

/// The whole result of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub scenario: String,
    /// RFC 3339.
    pub started_at: String,
    pub duration_seconds: f64,
    /// The scenario's settings, as given.
    pub parameters: serde_json::Value,
    pub targets: Vec<String>,
    pub totals: Totals,
    pub latency_ms: Percentiles,
    pub timeline: Vec<Second>,
    pub server_samples: Vec<ServerSample>,
    /// Scenario-specific figures (e.g. "connections_per_second").
    pub figures: BTreeMap<String, f64>,
    /// False when anything was lost, duplicated or out of order, or a
    /// scenario check failed; `failures` says what.
    pub passed: bool,
    pub failures: Vec<String>,
}
