//! Idle hold: N authenticated connections opened at a fixed rate (open
//! loop) and held open, doing nothing but answering the server's pings, for
//! `--duration-seconds` once they are all open. With `--server-pid`, the
//! server's resident memory is read before the first connection and at the
//! end of the hold, giving its memory per connection.
//!
//! As in the connect storm, "sent" counts connection attempts, "delivered"
//! connections welcomed, and the latency histogram is the connect latency
//! (scheduled start to Welcome); a failed attempt is counted in
//! `connections_failed`, not as a lost delivery. The run fails when any
//! connection could not be opened or the server closed any held one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::recorder::Recorder;
use crate::result::RunResult;
use crate::run::{Common, Run, due};
use crate::scenarios::connect_storm::{attempt, hold, latency_collector};
use crate::scenarios::users_for;
use crate::sources::Endpoints;

/// Settings of the idle hold scenario (see the module documentation; `--help` shows the `Scenario` variant's).
#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct Idle {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,
    /// Connections opened per second until all are open.
    #[arg(long, default_value_t = 500.0)]
    pub connect_rate: f64,
    /// Users whose tokens the connections authenticate with (reused round robin). Default:
    /// one user per 8 connections, half the server's default per-user limit of 16
    /// (`gateway.max_connections_per_user`), so the server's limit is not what is measured.
    #[arg(long)]
    pub users: Option<usize>,
}

struct Shared {
    recorder: Arc<Recorder>,
    endpoints: Arc<Endpoints>,
    timeout: Duration,
    latencies: mpsc::UnboundedSender<i64>,
    stop: watch::Receiver<bool>,
    settled: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    first_error: Mutex<Option<String>>,
}

pub async fn run(scenario: Idle) -> anyhow::Result<RunResult> {
    let common = &scenario.common;
    anyhow::ensure!(scenario.connections >= 1, "--connections must be at least 1");
    anyhow::ensure!(scenario.connect_rate > 0.0, "--connect-rate must be positive");
    let users = scenario.users.unwrap_or_else(|| users_for(scenario.connections));
    anyhow::ensure!(users >= 1, "--users must be at least 1");
    let run = Run::start(common)?;
    let api = common.api().await?;
    let mut tokens = Vec::with_capacity(users);
    for index in 0..users {
        tokens.push(api.user(&format!("lt-idle-{index}"), &format!("Idle {index}")).await?.1);
    }
    let rss_before = common.server_pid.and_then(crate::scrape::rss_bytes);
    let (stop, stopped) = watch::channel(false);
    let (latencies, collector) = latency_collector(run.recorder.clone());
    let shared = Arc::new(Shared {
        recorder: run.recorder.clone(),
        endpoints: run.endpoints.clone(),
        timeout: common.connect_timeout(),
        latencies,
        stop: stopped,
        settled: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });

    // Opening, open loop.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..scenario.connections {
        let at = due(start, index, scenario.connect_rate);
        tokio::time::sleep_until(at).await;
        run.recorder.sent(1, 1);
        let token = tokens[usize::try_from(index).unwrap_or(0) % tokens.len()].clone();
        tasks.push(tokio::spawn(connection(shared.clone(), at, token)));
    }
    let settle_by = Instant::now() + common.connect_timeout() + Duration::from_secs(2);
    while Instant::now() < settle_by && shared.settled.load(Ordering::Relaxed) < scenario.connections {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened = run.recorder.open_connections();

    // The hold.
    tokio::time::sleep(common.duration()).await;
    let held = run.recorder.open_connections();
    let rss_after = common.server_pid.and_then(crate::scrape::rss_bytes);
    let dropped = shared.dropped.load(Ordering::Relaxed);
    stop.send_replace(true);
    for task in tasks {
        let _ = task.await;
    }
    let failed = shared.failed.load(Ordering::Relaxed);
    let first_error = shared.first_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    drop(shared);
    let _ = collector.await;

    let mut failures = Vec::new();
    if failed > 0 {
        let first_error = first_error.map(|error| format!(" (first error: {error})")).unwrap_or_default();
        failures.push(format!("{failed} of {} connections could not be opened{first_error}", scenario.connections));
    }
    if dropped > 0 {
        failures.push(format!("{dropped} of {opened} held connections were closed by the server"));
    }
    let parameters = json!({
        "connections": scenario.connections, "connectRate": scenario.connect_rate, "users": users,
        "durationSeconds": common.duration_seconds,
    });
    let mut figures = vec![("connections_held", held as f64), ("connections_dropped", dropped as f64)];
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        figures.push(("server_rss_bytes_before", before as f64));
        figures.push(("server_rss_bytes_after", after as f64));
        if held > 0 {
            figures.push(("server_bytes_per_connection", (after as f64 - before as f64) / held as f64));
        }
    }
    run.finish(common, "idle", parameters, figures, failures).await
}

/// One connection: opened at its scheduled time and held until the end.
async fn connection(shared: Arc<Shared>, scheduled: Instant, token: String) {
    let outcome = attempt(&shared.endpoints, &token, shared.timeout).await;
    let latency = i64::try_from(scheduled.elapsed().as_micros()).unwrap_or(i64::MAX);
    match outcome {
        Ok(socket) => {
            shared.recorder.connected();
            let _ = shared.latencies.send(latency);
            shared.settled.fetch_add(1, Ordering::Relaxed);
            if !hold(socket, shared.stop.clone()).await {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            shared.recorder.disconnected();
        }
        Err(error) => {
            // A failed attempt is a connection failure, not a lost delivery.
            shared.recorder.expected.fetch_sub(1, Ordering::Relaxed);
            shared.recorder.connection_failed();
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.settled.fetch_add(1, Ordering::Relaxed);
            shared
                .first_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get_or_insert(format!("{error:#}"));
        }
    }
}
