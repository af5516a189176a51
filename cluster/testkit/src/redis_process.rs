use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

const REDIS_SERVER: &str = "redis-server";
/// How long a starting server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A `redis-server` child of the test on a port of its own (never the
/// shared 6379, so a test may kill and restart it), keeping nothing on disk;
/// killed when dropped.
pub struct RedisProcess {
    port: u16,
    child: Option<Child>,
    directory: tempfile::TempDir,
}

impl RedisProcess {
    /// Starts a server on a free port.
    pub fn start() -> RedisProcess {
        // Another process may still take the port between the probe and the
        // server's bind; a server that exits at once gets another port.
        for _ in 0..5 {
            let mut redis = RedisProcess::not_started();
            if redis.launch(&[]) {
                return redis;
            }
        }
        panic!("could not start {REDIS_SERVER} on a free port");
    }

    /// A port for a server that is not running yet: clients pointed at it
    /// find nothing until [`RedisProcess::restart`].
    pub fn not_started() -> RedisProcess {
        let directory = tempfile::tempdir().expect("a directory for redis-server");
        RedisProcess { port: free_port(), child: None, directory }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it accepts.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Like [`RedisProcess::restart`], with more `redis-server` arguments
    /// (for example an ACL that holds from the server's first instant).
    pub fn restart_with(&mut self, arguments: &[&str]) {
        assert!(self.launch(arguments), "{REDIS_SERVER} did not start again on port {}", self.port);
    }

    /// SIGKILL, like a crash: everything it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether a server came up on the port.
    fn launch(&mut self, arguments: &[&str]) -> bool {
        assert!(self.child.is_none(), "redis-server is already running on port {}", self.port);
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.directory.path())
            .args(arguments)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {REDIS_SERVER} (is redis-server installed?): {error}"));
        let child = self.child.insert(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
