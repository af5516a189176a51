//! Samples each target's `/metrics` (Prometheus text) during a run, and the
//! server's resident memory when its process id is known.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::result::ServerSample;

/// Parses Prometheus text: `name{labels} value` lines; comments skipped.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Resident memory of a process, from /proc (Linux).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Scrapes every `interval` until `stop` flips; the samples go into `into`.
pub async fn run(
    targets: Vec<String>,
    server_pid: Option<u32>,
    interval: Duration,
    started: std::time::Instant,
    into: Arc<Mutex<Vec<ServerSample>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let http = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
        Ok(http) => http,
        Err(_) => return,
    };
    loop {
        for target in &targets {
            let metrics = match http.get(format!("{target}/metrics")).send().await {
                Ok(answer) => parse_metrics(&answer.text().await.unwrap_or_default()),
                Err(_) => BTreeMap::new(),
            };
            let sample = ServerSample {
                t: started.elapsed().as_secs_f64(),
                target: target.clone(),
                metrics,
                rss_bytes: server_pid.and_then(rss_bytes),
            };
            into.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(sample);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prometheus_lines_become_a_map() {
        let parsed = super::parse_metrics(
            "# HELP x\n# TYPE x counter\nbeseda_messages_stored_total 12\nx{operation=\"SendMessage\"} 3.5\n",
        );
        assert_eq!(parsed["beseda_messages_stored_total"], 12.0);
        assert_eq!(parsed["x{operation=\"SendMessage\"}"], 3.5);
    }
}
