//! Connect storm: how many new connections per second the server takes.
//!
//! Connections (TCP, WebSocket upgrade, Hello, Welcome) are opened open loop
//! at a rate that ramps up in steps: `--start-rate` for `--step-seconds`,
//! then `--step` more per step, up to `--max-rate`. Each one authenticates
//! with one of a pool of `--users` user tokens and is then held open (read,
//! so that pings are answered) until the ramp is over. The ramp stops at the
//! first step that fails, at `--max-connections` attempts, or after
//! `--duration-seconds`.
//!
//! A step fails when more than `--max-failure-percent` of its attempts
//! failed, or its connect p99 is above `--max-connect-p99-ms`. The connect
//! latency of an attempt runs from its scheduled start (open loop: a late
//! generator does not hide the server's slowness) to its Welcome, or to its
//! failure; p99 above the limit means more than 1% of the step's attempts
//! took longer than the limit. A step is judged as soon as that is certain
//! (an attempt still pending after the limit counts as slow), so the ramp
//! stops without waiting for every attempt to time out.
//!
//! In this scenario the run's counters mean: `sent` = connection attempts,
//! `delivered` = connections welcomed (the latency histogram is the connect
//! latency), `connections_failed` = attempts that failed. A failed attempt
//! is not counted as an expected delivery, so it does not appear as "lost":
//! failures are the measurement here, not a correctness fault.
//!
//! Pass or fail: the ramp's failing step is what the storm looks for, so its
//! failures (and those of steps launched before it was judged) do not fail
//! the run. The run fails when no step passed (even `--start-rate` was not
//! sustained), when any attempt failed in a step below the sustained rate
//! (the server refused connections at a rate it otherwise handles; a few
//! failures within `--max-failure-percent` at the sustained step itself are
//! the edge of the capacity and tolerated), or when the server closed a
//! held connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::client::{self, Socket};
use crate::recorder::Recorder;
use crate::result::RunResult;
use crate::run::{Common, Run, due};
use crate::scenarios::fanout::FLUSH_WHEN_IDLE;
use crate::scenarios::users_for;
use crate::sources::Endpoints;

/// Settings of the connect storm scenario (see the module documentation; `--help` shows the `Scenario` variant's).
#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct ConnectStorm {
    #[command(flatten)]
    pub common: Common,
    /// Users whose tokens the connections authenticate with (reused round robin). Default:
    /// one user per 8 connections, half the server's default per-user limit of 16
    /// (`gateway.max_connections_per_user`), so the server's limit is not what is measured.
    #[arg(long)]
    pub users: Option<usize>,
    /// Connections per second of the first step.
    #[arg(long, default_value_t = 100.0)]
    pub start_rate: f64,
    /// Connections per second added at each step.
    #[arg(long, default_value_t = 100.0)]
    pub step: f64,
    /// Length of one step of the ramp.
    #[arg(long, default_value_t = 2.0)]
    pub step_seconds: f64,
    /// The ramp goes no higher (it keeps stepping at this rate).
    #[arg(long, default_value_t = 10_000.0)]
    pub max_rate: f64,
    /// Connection attempts in all; the ramp stops there.
    #[arg(long, default_value_t = 20_000)]
    pub max_connections: u64,
    /// A step fails when more than this percentage of its attempts failed.
    #[arg(long, default_value_t = 1.0)]
    pub max_failure_percent: f64,
    /// A step fails when its connect p99 is above this.
    #[arg(long, default_value_t = 1000.0)]
    pub max_connect_p99_ms: f64,
}

/// One step of the ramp.
struct Step {
    rate: f64,
    /// Attempts the step's window holds; the base of its percentages while it runs.
    planned: u64,
    launched: u64,
    /// No more attempts will be launched in this step.
    closed: bool,
    /// How long the step launched attempts.
    ran: Duration,
    welcomed: u64,
    failed: u64,
    /// Attempts not settled within the p99 limit (welcomed or failed later, or still pending).
    slow: u64,
    /// Connect latency of the welcomed ones, µs.
    latency: Histogram<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Pending,
    Passed,
    Failed,
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    max_failure_percent: f64,
    max_p99: Duration,
}

impl Step {
    fn new(rate: f64, planned: u64) -> Step {
        Step {
            rate,
            planned,
            launched: 0,
            closed: false,
            ran: Duration::ZERO,
            welcomed: 0,
            failed: 0,
            slow: 0,
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
        }
    }

    /// Counts only grow, so a step that fails while running stays failed.
    fn verdict(&self, limits: Limits) -> Verdict {
        let base = if self.closed { self.launched } else { self.planned.max(self.launched) };
        let percent = |count: u64| count as f64 * 100.0 / base.max(1) as f64;
        if percent(self.failed) > limits.max_failure_percent || percent(self.slow) > 1.0 {
            Verdict::Failed
        } else if self.closed && self.welcomed + self.failed == self.launched {
            Verdict::Passed
        } else {
            Verdict::Pending
        }
    }

    fn p99_ms(&self) -> f64 {
        if self.latency.is_empty() { 0.0 } else { self.latency.value_at_quantile(0.99) as f64 / 1000.0 }
    }
}

/// What the connection tasks share.
struct Shared {
    recorder: Arc<Recorder>,
    endpoints: Arc<Endpoints>,
    timeout: Duration,
    limits: Limits,
    steps: Mutex<Vec<Step>>,
    latencies: mpsc::UnboundedSender<i64>,
    stop: watch::Receiver<bool>,
    dropped: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn steps(&self) -> MutexGuard<'_, Vec<Step>> {
        self.steps.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Why the ramp ended.
#[derive(Clone, Copy, Debug)]
enum Stopped {
    Duration,
    MaxConnections,
    FailedStep,
}

pub async fn run(scenario: ConnectStorm) -> anyhow::Result<RunResult> {
    let common = &scenario.common;
    let users = scenario.users.unwrap_or_else(|| users_for(scenario.max_connections));
    anyhow::ensure!(users >= 1, "--users must be at least 1");
    anyhow::ensure!(scenario.start_rate > 0.0, "--start-rate must be positive");
    anyhow::ensure!(scenario.step >= 0.0, "--step must not be negative");
    anyhow::ensure!(scenario.step_seconds > 0.0, "--step-seconds must be positive");
    anyhow::ensure!(scenario.max_rate >= scenario.start_rate, "--max-rate must be at least --start-rate");
    anyhow::ensure!(scenario.max_connections >= 1, "--max-connections must be at least 1");
    anyhow::ensure!(scenario.max_connect_p99_ms > 0.0, "--max-connect-p99-ms must be positive");
    let run = Run::start(common)?;
    let api = common.api().await?;
    let mut tokens = Vec::with_capacity(users);
    for index in 0..users {
        tokens.push(api.user(&format!("lt-storm-{index}"), &format!("Storm {index}")).await?.1);
    }
    let limits = Limits {
        max_failure_percent: scenario.max_failure_percent,
        max_p99: Duration::from_secs_f64(scenario.max_connect_p99_ms / 1000.0),
    };
    let (stop, stopped) = watch::channel(false);
    let (latencies, collector) = latency_collector(run.recorder.clone());
    let shared = Arc::new(Shared {
        recorder: run.recorder.clone(),
        endpoints: run.endpoints.clone(),
        timeout: common.connect_timeout(),
        limits,
        steps: Mutex::new(Vec::new()),
        latencies,
        stop: stopped,
        dropped: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });

    // The ramp.
    let step_length = Duration::from_secs_f64(scenario.step_seconds);
    let ramp_start = Instant::now();
    let end = ramp_start + common.duration();
    let mut tasks = Vec::new();
    let mut total = 0u64;
    let mut index = 0u32;
    let reason = 'ramp: loop {
        let rate = (scenario.start_rate + scenario.step * f64::from(index)).min(scenario.max_rate);
        let step_start = ramp_start + step_length.mul_f64(f64::from(index));
        if step_start >= end {
            break Stopped::Duration;
        }
        if total >= scenario.max_connections {
            break Stopped::MaxConnections;
        }
        let step_end = (step_start + step_length).min(end);
        let window = step_end - step_start;
        let planned = ((rate * window.as_secs_f64()).ceil() as u64).clamp(1, scenario.max_connections - total);
        let step = {
            let mut steps = shared.steps();
            steps.push(Step::new(rate, planned));
            steps.len() - 1
        };
        let mut launched = 0u64;
        let (ran, stopped) = loop {
            let at = due(step_start, launched, rate);
            if at >= step_end {
                break (window, None);
            }
            if total >= scenario.max_connections {
                break (at - step_start, Some(Stopped::MaxConnections));
            }
            tokio::time::sleep_until(at).await;
            {
                let mut steps = shared.steps();
                if steps.iter().any(|step| step.verdict(limits) == Verdict::Failed) {
                    break (at - step_start, Some(Stopped::FailedStep));
                }
                steps[step].launched += 1;
            }
            // Counted before the task runs, so that a quick failure never
            // takes back an expectation that is not there yet.
            run.recorder.sent(1, 1);
            let token = tokens[usize::try_from(total).unwrap_or(0) % tokens.len()].clone();
            tasks.push(tokio::spawn(connection(shared.clone(), step, at, token)));
            launched += 1;
            total += 1;
        };
        {
            let mut steps = shared.steps();
            steps[step].closed = true;
            steps[step].ran = ran;
        }
        if let Some(stopped) = stopped {
            break 'ramp stopped;
        }
        index += 1;
    };

    // Every attempt ends within the connect timeout of its start.
    let settle_by = Instant::now() + common.connect_timeout() + Duration::from_secs(2);
    while Instant::now() < settle_by && shared.steps().iter().any(|step| step.welcomed + step.failed < step.launched) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The verdict, before the held connections are let go.
    let (figures_of_steps, sustained, failures, step_table) = judge(&shared, &scenario, step_length);
    let dropped = shared.dropped.load(Ordering::Relaxed);
    stop.send_replace(true);
    for task in tasks {
        let _ = task.await;
    }
    drop(shared);
    let _ = collector.await;

    let mut failures = failures;
    if dropped > 0 {
        failures.push(format!("{dropped} held connections were closed by the server"));
    }
    let totals = run.recorder.totals();
    let parameters = json!({
        "users": users, "startRate": scenario.start_rate, "step": scenario.step,
        "stepSeconds": scenario.step_seconds, "maxRate": scenario.max_rate,
        "maxConnections": scenario.max_connections, "maxFailurePercent": scenario.max_failure_percent,
        "maxConnectP99Ms": scenario.max_connect_p99_ms, "durationSeconds": common.duration_seconds,
        "stoppedBy": format!("{reason:?}"), "steps": step_table,
    });
    let mut figures = vec![
        ("connections_per_second_sustained", sustained),
        ("peak_connections", totals.peak_connections as f64),
        ("connections_dropped", dropped as f64),
    ];
    figures.extend(figures_of_steps);
    run.finish(common, "connect-storm", parameters, figures, failures).await
}

/// The ramp's outcome: figures, the sustained rate, failures, and a table of the steps.
fn judge(
    shared: &Shared,
    scenario: &ConnectStorm,
    step_length: Duration,
) -> (Vec<(&'static str, f64)>, f64, Vec<String>, serde_json::Value) {
    let steps = shared.steps();
    let verdicts: Vec<Verdict> = steps.iter().map(|step| step.verdict(shared.limits)).collect();
    let first_failed = verdicts.iter().position(|verdict| *verdict == Verdict::Failed);
    // Steps after the first failed one were launched before it was judged:
    // beyond the capacity, whatever their own verdict. A step counts when
    // it passed and ran at least half its window (or is the first: the
    // start rate is the floor the ramp was asked to check).
    let sustained_step = steps[..first_failed.unwrap_or(steps.len())]
        .iter()
        .enumerate()
        .filter(|(index, step)| verdicts[*index] == Verdict::Passed && (*index == 0 || step.ran >= step_length / 2))
        .max_by(|(_, a), (_, b)| a.rate.total_cmp(&b.rate))
        .map(|(index, _)| index);
    let sustained = sustained_step.map(|index| steps[index].rate).unwrap_or(0.0);
    let first_error = shared.first_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    let first_error = first_error.map(|error| format!(" (first error: {error})")).unwrap_or_default();
    let mut failures = Vec::new();
    match sustained_step {
        None => failures.push(match steps.first() {
            Some(step) => format!(
                "no step passed: at --start-rate {}/s, {} of {} attempts failed, {} slow, p99 {:.1} ms{first_error}",
                step.rate,
                step.failed,
                step.launched,
                step.slow,
                step.p99_ms()
            ),
            None => "no connection was attempted".to_owned(),
        }),
        Some(_) => {
            let below: u64 = steps.iter().filter(|step| step.rate < sustained).map(|step| step.failed).sum();
            if below > 0 {
                failures.push(format!(
                    "{below} connection attempts failed at rates below the sustained {sustained}/s{first_error}"
                ));
            }
        }
    }
    let table: Vec<serde_json::Value> = steps
        .iter()
        .zip(&verdicts)
        .map(|(step, verdict)| {
            json!({
                "rate": step.rate, "attempted": step.launched, "welcomed": step.welcomed,
                "failed": step.failed, "slow": step.slow, "p99Ms": step.p99_ms(),
                "ranSeconds": step.ran.as_secs_f64(), "verdict": format!("{verdict:?}"),
            })
        })
        .collect();
    if !scenario.common.quiet {
        for step in &table {
            eprintln!("step {step}");
        }
    }
    let figures = vec![
        ("connect_p99_ms", sustained_step.map(|index| steps[index].p99_ms()).unwrap_or(0.0)),
        ("steps_passed", verdicts.iter().filter(|verdict| **verdict == Verdict::Passed).count() as f64),
        ("failed_step_rate", first_failed.map(|index| steps[index].rate).unwrap_or(0.0)),
    ];
    (figures, sustained, failures, serde_json::Value::Array(table))
}

/// One connection: opened at its scheduled time, judged, held until the ramp ends.
async fn connection(shared: Arc<Shared>, step: usize, scheduled: Instant, token: String) {
    let attempt = attempt(&shared.endpoints, &token, shared.timeout);
    tokio::pin!(attempt);
    let outcome = match tokio::time::timeout_at(scheduled + shared.limits.max_p99, &mut attempt).await {
        Ok(outcome) => outcome,
        Err(_) => {
            shared.steps()[step].slow += 1;
            attempt.await
        }
    };
    let latency = i64::try_from(scheduled.elapsed().as_micros()).unwrap_or(i64::MAX);
    match outcome {
        Ok(socket) => {
            shared.recorder.connected();
            {
                let mut steps = shared.steps();
                let _ = steps[step].latency.record(u64::try_from(latency).unwrap_or(0).max(1));
                steps[step].welcomed += 1;
            }
            let _ = shared.latencies.send(latency);
            if !hold(socket, shared.stop.clone()).await {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            shared.recorder.disconnected();
        }
        Err(error) => {
            // Not an expected delivery after all (see the module doc): a failure, counted as one.
            shared.recorder.expected.fetch_sub(1, Ordering::Relaxed);
            shared.recorder.connection_failed();
            shared.steps()[step].failed += 1;
            tracing::debug!(error = format!("{error:#}"), "connection attempt failed");
            shared
                .first_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get_or_insert(format!("{error:#}"));
        }
    }
}

/// Opens one connection from the next source address to the next target and
/// says Hello; the whole attempt is bounded by `timeout`.
pub async fn attempt(endpoints: &Endpoints, token: &str, timeout: Duration) -> anyhow::Result<Socket> {
    let (source, target) = endpoints.pick();
    tokio::time::timeout(timeout, client::connect_user(source, target, token, timeout))
        .await
        .context("no Welcome in time")?
}

/// Holds a welcomed connection open, reading (so that the WebSocket stack
/// answers the server's pings), until `stop` turns true; then closes it.
/// False when the server closed it first.
pub async fn hold(mut socket: Socket, mut stop: watch::Receiver<bool>) -> bool {
    let mut stopping = *stop.borrow_and_update();
    while !stopping {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(WsMessage::Close(_)) | Err(_)) | None => return false,
                Some(Ok(_)) => {}
            },
            changed = stop.changed() => stopping = changed.is_err() || *stop.borrow_and_update(),
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
    true
}

/// A task that records connect latencies (µs) into the run's histogram as
/// "deliveries" through one [`crate::recorder::Local`]; it ends when every
/// sender is dropped.
pub fn latency_collector(recorder: Arc<Recorder>) -> (mpsc::UnboundedSender<i64>, tokio::task::JoinHandle<()>) {
    let (sender, mut receiver) = mpsc::unbounded_channel::<i64>();
    let task = tokio::spawn(async move {
        let mut local = recorder.local();
        loop {
            match tokio::time::timeout(FLUSH_WHEN_IDLE, receiver.recv()).await {
                Err(_) => local.flush(),
                Ok(Some(latency)) => local.delivered(latency),
                Ok(None) => break,
            }
        }
    });
    (sender, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_failure_percent: 1.0, max_p99: Duration::from_millis(100) }
    }

    #[test]
    fn a_step_fails_as_soon_as_its_failures_or_slow_attempts_pass_the_limits() {
        let mut step = Step::new(100.0, 200);
        step.launched = 50;
        step.welcomed = 48;
        step.failed = 2;
        assert_eq!(step.verdict(limits()), Verdict::Pending, "2 of 200 planned is 1%, not more");
        step.failed = 3;
        assert_eq!(step.verdict(limits()), Verdict::Failed);
        let mut slow = Step::new(100.0, 100);
        slow.launched = 10;
        slow.slow = 2;
        assert_eq!(slow.verdict(limits()), Verdict::Failed, "2% slower than the p99 limit");
    }

    #[test]
    fn a_closed_step_passes_when_every_attempt_settled_within_the_limits() {
        let mut step = Step::new(100.0, 200);
        step.launched = 120;
        step.welcomed = 119;
        step.failed = 1;
        assert_eq!(step.verdict(limits()), Verdict::Pending, "still launching");
        step.closed = true;
        assert_eq!(step.verdict(limits()), Verdict::Passed);
        step.failed = 2;
        step.welcomed = 118;
        assert_eq!(step.verdict(limits()), Verdict::Failed, "2 of 120 is above 1% once closed");
    }
}
