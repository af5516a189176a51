//! What every scenario shares: the common settings, the set-up of the
//! run's own application, the progress line, metric sampling, pacing, and
//! turning counters into a [`RunResult`] with its reports.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;

use crate::api::{Api, Credentials};
use crate::recorder::Recorder;
use crate::result::{RunResult, ServerSample};
use crate::sources::{Endpoints, Target};

/// Settings every scenario takes.
#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct Common {
    /// Gateways to load, http://host:port; repeat or separate with commas to
    /// spread connections over several (cluster) gateways.
    #[arg(long = "target", value_delimiter = ',', default_value = "http://127.0.0.1:8087")]
    pub targets: Vec<String>,
    /// Length of the measured phase (the run stops by itself).
    #[arg(long, default_value_t = 10)]
    pub duration_seconds: u64,
    /// Source addresses 127.0.0.1.. to spread connections over (loopback
    /// targets only): each address has about 28,000 ports per target.
    #[arg(long, default_value_t = 8)]
    pub sources: usize,
    /// Where result.json, report.html and the PNG plots go.
    #[arg(long, default_value = "loadtest-report")]
    pub report_dir: PathBuf,
    /// An existing application to use (with --application-key) instead of registering one.
    #[arg(long, env = "BESEDA_LOADTEST_APPLICATION_ID")]
    pub application_id: Option<String>,
    #[arg(long, env = "BESEDA_LOADTEST_APPLICATION_KEY", hide_env_values = true)]
    pub application_key: Option<String>,
    /// Register a new application with this e-mail; the activation code is
    /// read from the server's mail outbox (--outbox-dir, same machine).
    #[arg(long, default_value = "loadtest@example.com")]
    pub register_email: String,
    /// The server's mail outbox directory (its data_dir/outbox).
    #[arg(long, default_value = "data/outbox")]
    pub outbox_dir: PathBuf,
    /// Unregister the run's application at the end (it was created for the run).
    #[arg(long)]
    pub cleanup: bool,
    /// Process id of the server, to sample its resident memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Timeout of one connection attempt (TCP, WebSocket, Hello).
    #[arg(long, default_value_t = 10)]
    pub connect_timeout_seconds: u64,
    /// After the measured phase, how long to wait for deliveries still on their way.
    #[arg(long, default_value_t = 5)]
    pub drain_seconds: u64,
    /// Seconds between samples of the targets' /metrics.
    #[arg(long, default_value_t = 1)]
    pub scrape_interval_seconds: u64,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Applications this run registered, for `--cleanup`.
    #[arg(skip)]
    #[serde(skip)]
    pub registered: Arc<Mutex<Vec<Api>>>,
}

impl Common {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_seconds)
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_seconds)
    }

    pub fn endpoints(&self) -> anyhow::Result<Endpoints> {
        let targets = self.targets.iter().map(|target| Target::parse(target)).collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!targets.is_empty(), "give at least one --target");
        Ok(Endpoints::new(targets, self.sources))
    }

    /// The run's application on the first target.
    pub async fn api(&self) -> anyhow::Result<Api> {
        let credentials = match (&self.application_id, &self.application_key) {
            (Some(application_id), Some(application_key)) => {
                Credentials::Given { application_id: application_id.clone(), application_key: application_key.clone() }
            }
            (None, None) => {
                Credentials::Register { email: self.register_email.clone(), outbox: self.outbox_dir.clone() }
            }
            _ => anyhow::bail!("give both --application-id and --application-key, or neither"),
        };
        let registers = matches!(credentials, Credentials::Register { .. });
        let api = Api::connect(&self.targets[0], &credentials).await?;
        if registers {
            self.registered.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(api.clone());
        }
        Ok(api)
    }

    /// Unregisters the applications this run registered (their keys are
    /// deleted; the server keeps their history, as for any unregistered
    /// application). Given applications are never touched.
    async fn clean_up(&self) {
        let registered = std::mem::take(&mut *self.registered.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for api in registered {
            if let Err(error) = api.call(reqwest::Method::DELETE, "/api/v1/registration", None, None).await {
                tracing::warn!("cannot unregister the run's application {}: {error:#}", api.application_id);
            }
        }
    }
}

/// A run in progress: its recorder, the progress line and metric sampling.
pub struct Run {
    pub recorder: Arc<Recorder>,
    pub endpoints: Arc<Endpoints>,
    started: Instant,
    samples: Arc<Mutex<Vec<ServerSample>>>,
    stop: tokio::sync::watch::Sender<bool>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Run {
    pub fn start(common: &Common) -> anyhow::Result<Run> {
        let limit = crate::sources::raise_fd_limit();
        tracing::info!(limit, "file-descriptor limit");
        let recorder = Arc::new(Recorder::new());
        let endpoints = Arc::new(common.endpoints()?);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let samples = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let mut background = vec![tokio::spawn(crate::scrape::run(
            endpoints.targets().iter().map(|target| target.base_url.clone()).collect(),
            common.server_pid,
            Duration::from_secs(common.scrape_interval_seconds.max(1)),
            started,
            samples.clone(),
            stopped.clone(),
        ))];
        background.push(tokio::spawn(progress(recorder.clone(), common.quiet, stopped)));
        Ok(Run { recorder, endpoints, started, samples, stop, background })
    }

    /// Stops sampling, builds the result, checks it, writes the reports.
    pub async fn finish(
        self,
        common: &Common,
        scenario: &str,
        parameters: serde_json::Value,
        figures: Vec<(&str, f64)>,
        mut failures: Vec<String>,
    ) -> anyhow::Result<RunResult> {
        self.stop.send_replace(true);
        for task in self.background {
            let _ = task.await;
        }
        let totals = self.recorder.totals();
        if totals.lost > 0 {
            failures.push(format!("{} of {} expected deliveries were lost", totals.lost, totals.expected_deliveries));
        }
        if totals.duplicated > 0 {
            failures.push(format!("{} deliveries were duplicated", totals.duplicated));
        }
        if totals.out_of_order > 0 {
            failures.push(format!("{} deliveries arrived out of order", totals.out_of_order));
        }
        let result = RunResult {
            scenario: scenario.to_owned(),
            started_at: rfc3339_now_minus(self.started.elapsed()),
            duration_seconds: self.started.elapsed().as_secs_f64(),
            parameters,
            targets: common.targets.clone(),
            totals,
            latency_ms: self.recorder.percentiles(),
            timeline: self.recorder.timeline(),
            server_samples: self.samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone(),
            figures: figures.into_iter().map(|(name, value)| (name.to_owned(), value)).collect(),
            passed: failures.is_empty(),
            failures,
        };
        if common.cleanup {
            common.clean_up().await;
        }
        let files = crate::report::write_reports(&result, &common.report_dir)?;
        for file in files {
            eprintln!("wrote {}", file.display());
        }
        Ok(result)
    }
}

fn rfc3339_now_minus(ago: Duration) -> String {
    let at = std::time::SystemTime::now() - ago;
    let seconds = at.duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or_default();
    // Civil date from days since the epoch (Howard Hinnant's algorithm), to avoid a date crate.
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let rest = seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// The live line: on a terminal, rewritten in place every second; else a
/// line every 5 seconds.
async fn progress(recorder: Arc<Recorder>, quiet: bool, mut stop: tokio::sync::watch::Receiver<bool>) {
    let terminal = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut count = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        recorder.tick();
        count += 1;
        if quiet || (!terminal && !count.is_multiple_of(5)) {
            continue;
        }
        let second = recorder.last_second().unwrap_or_default();
        let totals = recorder.totals();
        let line = format!(
            "[{:>4.0}s] sent {:>8}/s  delivered {:>9}/s  connections {:>7}  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}  lost so far {}",
            recorder.elapsed_seconds(),
            second.sent,
            second.delivered,
            recorder.open_connections(),
            second.p50_ms,
            second.p99_ms,
            totals.errors,
            totals.expected_deliveries.saturating_sub(totals.delivered),
        );
        if terminal {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
    if terminal && !quiet {
        eprintln!();
    }
}

/// Open-loop pacing: the instant the `index`-th event of a stream of
/// `rate` per second is due, from `start`. Late events are sent at once
/// and keep their scheduled time, so latency is never hidden by the sender
/// slowing down (no coordinated omission).
pub fn due(start: tokio::time::Instant, index: u64, rate: f64) -> tokio::time::Instant {
    start + Duration::from_secs_f64(index as f64 / rate.max(f64::MIN_POSITIVE))
}

/// Waits for the sending tasks and keeps the writers of those that ended
/// normally: their connections stay open while deliveries drain.
pub async fn finished_writers<W>(sending: Vec<tokio::task::JoinHandle<W>>) -> Vec<W> {
    let mut finished = Vec::with_capacity(sending.len());
    for task in sending {
        if let Ok(writer) = task.await {
            finished.push(writer);
        }
    }
    finished
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_date_is_rfc3339() {
        let text = super::rfc3339_now_minus(std::time::Duration::ZERO);
        assert_eq!(text.len(), 20, "{text}");
        assert!(text.starts_with("20") && text.ends_with('Z'), "{text}");
    }
}
