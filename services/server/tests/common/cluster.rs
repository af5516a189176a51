//! A whole cluster of real OS processes on loopback: three registry voters,
//! two routing nodes, two bots nodes and two gateways, each a `beseda serve
//! --role …` child, on PostgreSQL (its own schema) and a Redis server of its
//! own (so a test may kill and restart it). Everything started is killed when
//! the cluster is dropped; when a test fails, the tail of every process's log
//! is printed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use beseda_testkit::{RedisProcess, free_port};

use super::TestServer;

/// How long any process gets to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub fn postgres_url() -> Option<String> {
    super::postgres_url("the cluster tests")
}

/// One `beseda serve` child.
pub struct Process {
    pub name: String,
    pub http_port: u16,
    pub grpc_port: u16,
    environment: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.http_port)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_beseda"));
        command.arg("serve");
        // Only what this process is given: no BESEDA_* of the test's own environment.
        for (name, _) in std::env::vars() {
            if name.starts_with("BESEDA_") {
                command.env_remove(name);
            }
        }
        command.envs(self.environment.iter().map(|(name, value)| (name, value)));
        command.stdout(Stdio::null()).stderr(Stdio::from(log));
        self.child = Some(command.spawn().expect("start beseda"));
    }

    pub async fn wait_healthy(&self) {
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(response) = http.get(format!("{}/rs/health", self.base_url())).send().await
                && response.status().is_success()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not become healthy; log:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a stopped process again with the same settings.
    pub async fn restart(&mut self) {
        self.spawn();
        self.wait_healthy().await;
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; returns the exit status and how long the process took to exit.
    pub async fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().expect("running");
        let started = Instant::now();
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill -TERM");
        assert!(status.success(), "could not signal {}", self.name);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(exit) = child.try_wait().unwrap() {
                return (exit, started.elapsed());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not exit within 30 s of SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The process's /rs/health answer.
    pub async fn health(&self) -> serde_json::Value {
        reqwest::get(format!("{}/rs/health", self.base_url())).await.unwrap().json().await.unwrap()
    }

    /// The process's /metrics, each metric summed over its label sets
    /// (summaries as `name_count` and `name_sum`).
    pub async fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        let text = reqwest::get(format!("{}/metrics", self.base_url())).await.unwrap().text().await.unwrap();
        let mut metrics = std::collections::BTreeMap::new();
        for line in text.lines().filter(|line| !line.starts_with('#') && !line.trim().is_empty()) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let value: f64 = line.rsplit(' ').next().and_then(|value| value.parse().ok()).unwrap_or_else(|| {
                panic!("{}: a /metrics line without a value: {line}", self.name);
            });
            // Quantile lines share the summary's name; only its totals add up.
            if !line.contains("quantile=") {
                *metrics.entry(name.to_owned()).or_insert(0.0) += value;
            }
        }
        metrics
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub postgres_url: String,
    pub schema: String,
    pub redis: RedisProcess,
    pub registry: Vec<Process>,
    pub routing: Vec<Process>,
    pub bots: Vec<Process>,
    pub gateways: Vec<Process>,
    pub outbox: PathBuf,
}

/// Gateway leases in these tests: a killed gateway's users go offline
/// after this long.
pub const GATEWAY_LEASE_SECONDS: u64 = 2;

impl Cluster {
    pub async fn start(postgres_url: &str) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let schema = format!("cluster_{:x}{:x}", nanos, std::process::id());
        let outbox = root.path().join("outbox");
        let redis = RedisProcess::start();
        let process = |name: &str, environment: Vec<(&str, String)>| {
            let http_port = free_port();
            let grpc_port = free_port();
            let mut all: Vec<(String, String)> = vec![
                ("BESEDA_LISTEN".into(), format!("127.0.0.1:{http_port}")),
                ("BESEDA_GRPC_LISTEN".into(), format!("127.0.0.1:{grpc_port}")),
                ("BESEDA_NODE_ID".into(), name.to_owned()),
                ("BESEDA_DATA_DIR".into(), root.path().join(name).display().to_string()),
                ("BESEDA_LOG".into(), "warn".into()),
                ("BESEDA_SHUTDOWN_GRACE_SECONDS".into(), "5".into()),
                ("BESEDA_REGISTRY_GATEWAY_LEASE_SECONDS".into(), GATEWAY_LEASE_SECONDS.to_string()),
                ("BESEDA_REGISTRY_HEARTBEAT_MILLISECONDS".into(), "100".into()),
                ("BESEDA_REGISTRY_ELECTION_TIMEOUT_MILLISECONDS".into(), "500".into()),
                ("BESEDA_CLUSTER_TOKEN".into(), "cluster-test-secret".into()),
            ];
            all.extend(environment.into_iter().map(|(name, value)| (name.to_owned(), value)));
            Process {
                name: name.to_owned(),
                http_port,
                grpc_port,
                environment: all,
                log: root.path().join(format!("{name}.log")),
                child: None,
            }
        };

        let mut registry: Vec<Process> =
            (1..=3).map(|id| process(&format!("registry-{id}"), vec![("BESEDA_ROLES", "registry".into())])).collect();
        let peers: Vec<String> =
            registry.iter().enumerate().map(|(index, voter)| format!("{}={}", index + 1, voter.grpc_url())).collect();
        for (index, voter) in registry.iter_mut().enumerate() {
            voter.environment.push(("BESEDA_REGISTRY_ID".into(), (index + 1).to_string()));
            voter.environment.push(("BESEDA_REGISTRY_PEERS".into(), peers.join(",")));
            voter.environment.push(("BESEDA_REDIS_URL".into(), redis.url()));
        }
        let store = |extra: Vec<(&'static str, String)>| {
            let mut environment = vec![
                ("BESEDA_POSTGRES_URL", postgres_url.to_owned()),
                ("BESEDA_POSTGRES_SCHEMA", schema.clone()),
                ("BESEDA_STORE_POOL_SIZE", "4".to_owned()),
                ("BESEDA_REDIS_URL", redis.url()),
                ("BESEDA_OUTBOX_DIR", outbox.display().to_string()),
            ];
            environment.extend(extra);
            environment
        };
        let routing: Vec<Process> = (1..=2)
            .map(|id| process(&format!("routing-{id}"), store(vec![("BESEDA_ROLES", "routing".into())])))
            .collect();
        let routing_endpoints = routing.iter().map(Process::grpc_url).collect::<Vec<_>>().join(",");
        let bots: Vec<Process> = (1..=2)
            .map(|id| {
                process(
                    &format!("bots-{id}"),
                    store(vec![
                        ("BESEDA_ROLES", "bots".into()),
                        ("BESEDA_ROUTING_ENDPOINTS", routing_endpoints.clone()),
                        ("BESEDA_BOTS_OUTBOUND_ALLOW_PRIVATE_ADDRESSES", "true".into()),
                    ]),
                )
            })
            .collect();
        let bots_endpoints = bots.iter().map(Process::grpc_url).collect::<Vec<_>>().join(",");
        let registry_endpoints = registry.iter().map(Process::grpc_url).collect::<Vec<_>>().join(",");
        let gateways: Vec<Process> = (1..=2)
            .map(|id| {
                process(
                    &format!("gateway-{id}"),
                    vec![
                        ("BESEDA_ROLES", "gateway".into()),
                        ("BESEDA_REDIS_URL", redis.url()),
                        ("BESEDA_ROUTING_ENDPOINTS", routing_endpoints.clone()),
                        ("BESEDA_BOTS_ENDPOINTS", bots_endpoints.clone()),
                        ("BESEDA_REGISTRY_ENDPOINTS", registry_endpoints.clone()),
                    ],
                )
            })
            .collect();
        let mut cluster = Cluster {
            root,
            postgres_url: postgres_url.to_owned(),
            schema,
            redis,
            registry,
            routing,
            bots,
            gateways,
            outbox,
        };
        for voter in &mut cluster.registry {
            voter.spawn();
        }
        // Routing nodes first, one after the other: the first one creates the schema.
        for node in &mut cluster.routing {
            node.spawn();
            node.wait_healthy().await;
        }
        for node in &mut cluster.bots {
            node.spawn();
        }
        for gateway in &mut cluster.gateways {
            gateway.spawn();
        }
        for process in cluster.all() {
            process.wait_healthy().await;
        }
        cluster
    }

    pub fn all(&self) -> impl Iterator<Item = &Process> {
        self.registry.iter().chain(&self.routing).chain(&self.bots).chain(&self.gateways)
    }

    /// The helpers' view of gateway `index`.
    pub fn gateway(&self, index: usize) -> TestServer {
        TestServer::remote(&self.gateways[index].base_url(), self.outbox.clone())
    }

    /// The registry voter that currently leads, by asking the voters.
    pub async fn registry_leader(&self) -> Option<usize> {
        for (index, voter) in self.registry.iter().enumerate() {
            if !voter.is_running() {
                continue;
            }
            let Ok(response) = reqwest::get(format!("{}/rs/health", voter.base_url())).await else { continue };
            let Ok(health) = response.json::<serde_json::Value>().await else { continue };
            let status = &health["components"]["registryVoter"]["status"];
            if status["role"].as_str() == Some("leader") {
                return Some(index);
            }
        }
        None
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for process in self.all() {
                eprintln!("===== {} (last lines of its log) =====\n{}", process.name, process.log_tail());
            }
        }
        for process in self.gateways.iter_mut().chain(&mut self.routing).chain(&mut self.bots).chain(&mut self.registry)
        {
            process.kill();
        }
        self.redis.kill();
        let _ = Command::new("psql")
            .arg(&self.postgres_url)
            .args(["-q", "-c", &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
