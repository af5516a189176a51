//! A whole Beseda node on port 0 for smoke runs of the scenarios, and the
//! common settings pointing at it. Smoke runs check correctness only (no
//! timing asserts): everything sent arrives once, in order, and the
//! reports are written.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use beseda_loadtest::run::Common;

pub struct Server {
    pub base_url: String,
    pub outbox: PathBuf,
    pub data_dir: tempfile::TempDir,
    pub reports: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub async fn start() -> Server {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = beseda::config::NodeConfig::default();
        config.server.data_dir = data_dir.path().to_owned();
        config.server.shutdown_grace_seconds = 2;
        config.bots.poll_interval_milliseconds = 50;
        config.bots.outbound_allow_private_addresses = true;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        config.server.public_url = Some(format!("http://{address}"));
        let outbox = config.outbox_dir();
        let (shutdown, signal) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(beseda::app::run(config, listener, async move {
            let _ = signal.await;
        }));
        let base_url = format!("http://{address}");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while http.get(format!("{base_url}/rs/health")).send().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Server {
            base_url,
            outbox,
            data_dir,
            reports: tempfile::tempdir().unwrap(),
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Settings for a short run against this server, reports in a temporary directory.
    pub fn common(&self, duration_seconds: u64) -> Common {
        Common {
            targets: vec![self.base_url.clone()],
            duration_seconds,
            sources: 2,
            report_dir: self.reports.path().to_owned(),
            application_id: None,
            application_key: None,
            register_email: "smoke@example.com".into(),
            outbox_dir: self.outbox.clone(),
            cleanup: true,
            server_pid: Some(std::process::id()),
            connect_timeout_seconds: 10,
            drain_seconds: 10,
            scrape_interval_seconds: 1,
            quiet: true,
            registered: Default::default(),
        }
    }

    /// The report files a run must leave behind.
    pub fn assert_reports(&self) {
        for file in ["result.json", "report.html", "latency.png", "throughput.png", "percentiles.png"] {
            let path = self.reports.path().join(file);
            assert!(path.exists(), "{} was not written", path.display());
        }
    }

    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}
