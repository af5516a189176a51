//! A PostgreSQL server that vanishes without a reset (a failed-over host, a
//! partition): the store's queries must fail within the dead-peer timeouts
//! it sets by default, not hang for the kernel's quarter of an hour, and
//! the store must recover when the network does.
//!
//! The path to PostgreSQL crosses a network namespace this test creates:
//!
//! ```text
//! store ──▶ 10.231.N.2:5432 ─(veth)─ relay in the namespace ─(veth)─▶ 10.231.N.1:port, relay in this process ──▶ PostgreSQL
//! ```
//!
//! Taking the namespace's end of the veth down drops every packet between
//! the store and PostgreSQL, with no reset sent: the silence of a dead host.
//!
//! It needs root (for `ip netns`) and runs when `BESEDA_TEST_NETNS=1` and
//! `BESEDA_TEST_PG_URL` are set, as `.ci/run` sets them; otherwise it is
//! skipped with a note on stderr.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use beseda_core::ErrorCode;
use beseda_store::Store;
use beseda_store::postgres::PostgresStore;
use beseda_testkit::Relay;

/// Longer than the store's dead-peer timeouts (30 s for unacknowledged
/// data, then a 10 s connection timeout) with room to spare; a query that
/// takes longer has hung.
const HUNG: Duration = Duration::from_secs(120);

/// Relays one TCP port to another, a thread per direction; runs inside the
/// namespace, where only the machine's Python is at hand.
const NAMESPACE_RELAY: &str = r#"
import socket, sys, threading
listen_host, listen_port, to_host, to_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def pump(source, sink):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    for s in (source, sink):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((listen_host, listen_port))
server.listen(16)
print("ready", flush=True)
while True:
    client, _ = server.accept()
    upstream = socket.create_connection((to_host, to_port))
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=pump, args=(a, b), daemon=True).start()
"#;

fn run(command: &[&str]) {
    let output = Command::new(command[0]).args(&command[1..]).output().unwrap_or_else(|error| {
        panic!("cannot run {command:?}: {error}");
    });
    assert!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// A network namespace joined to this one by a veth pair; deleted (with
/// the pair and the relay in it) when dropped.
struct Namespace {
    name: String,
    host_link: String,
    inner_link: String,
    host_address: String,
    inner_address: String,
    relay: Option<Child>,
}

impl Namespace {
    fn create() -> Namespace {
        let id = std::process::id();
        // Distinct per process, so concurrent runs on one machine do not meet.
        let subnet = id % 250 + 1;
        let namespace = Namespace {
            name: format!("beseda-dead-peer-{id}"),
            host_link: format!("bdp{}h", id % 100_000),
            inner_link: format!("bdp{}n", id % 100_000),
            host_address: format!("10.231.{subnet}.1"),
            inner_address: format!("10.231.{subnet}.2"),
            relay: None,
        };
        let host_link = namespace.host_link.clone();
        run(&["ip", "netns", "add", &namespace.name]);
        let inside = |command: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", namespace.name.as_str()];
            full.extend_from_slice(command);
            run(&full);
        };
        inside(&["ip", "link", "set", "lo", "up"]);
        run(&["ip", "link", "add", &host_link, "type", "veth", "peer", "name", &namespace.inner_link]);
        run(&["ip", "link", "set", &namespace.inner_link, "netns", &namespace.name]);
        run(&["ip", "addr", "add", &format!("{}/30", namespace.host_address), "dev", &host_link]);
        run(&["ip", "link", "set", &host_link, "up"]);
        inside(&["ip", "addr", "add", &format!("{}/30", namespace.inner_address), "dev", &namespace.inner_link]);
        inside(&["ip", "link", "set", &namespace.inner_link, "up"]);
        namespace
    }

    /// Starts the relay inside: `inner_address:port` to `to`.
    fn start_relay(&mut self, port: u16, to: SocketAddr) {
        let mut relay = Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", NAMESPACE_RELAY])
            .args([self.inner_address.clone(), port.to_string(), to.ip().to_string(), to.port().to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the relay in the namespace");
        let mut ready = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(relay.stdout.take().unwrap()), &mut ready).unwrap();
        assert_eq!(ready.trim(), "ready", "the relay in the namespace did not start");
        self.relay = Some(relay);
    }

    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        run(&["ip", "netns", "exec", &self.name, "ip", "link", "set", &self.inner_link, state]);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Some(mut relay) = self.relay.take() {
            let _ = relay.kill();
            let _ = relay.wait();
        }
        // Deleting one end deletes the pair at once; the namespace itself may
        // outlive its name while sockets in it still wait on the cut link.
        let _ = Command::new("ip").args(["link", "del", &self.host_link]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn settings() -> Option<String> {
    let url = std::env::var("BESEDA_TEST_PG_URL").ok().filter(|url| !url.trim().is_empty());
    let enabled = std::env::var("BESEDA_TEST_NETNS").is_ok_and(|value| value == "1");
    match (url, enabled) {
        (Some(url), true) => Some(url),
        _ => {
            eprintln!("skipped: set BESEDA_TEST_PG_URL and BESEDA_TEST_NETNS=1 (needs root for ip netns)");
            None
        }
    }
}

/// Where the URL's server listens (host and port of a `postgres://` URL).
fn postgres_address(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).expect("BESEDA_TEST_PG_URL is a postgres:// URL");
    let host = parsed.host_str().expect("a host in BESEDA_TEST_PG_URL");
    let port = parsed.port().unwrap_or(5432);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).unwrap().next().expect("the PostgreSQL host resolves")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_to_a_silently_vanished_server_fail_in_bounded_time_and_recover() {
    let Some(url) = settings() else { return };
    let postgres = postgres_address(&url);
    let mut namespace = Namespace::create();
    // Forwards what comes out of the namespace to PostgreSQL.
    let host_address: std::net::IpAddr = namespace.host_address.parse().unwrap();
    let host_side = Relay::start(host_address, postgres).await;
    namespace.start_relay(5432, host_side.address());
    let mut through_namespace = url::Url::parse(&url).unwrap();
    through_namespace.set_host(Some(&namespace.inner_address)).unwrap();
    through_namespace.set_port(Some(5432)).unwrap();

    let schema = format!("beseda_dead_peer_{}", uuid::Uuid::new_v4().simple());
    // One pooled connection: the query after the cut must use the one that died.
    let store = PostgresStore::connect_in_schema(through_namespace.as_str(), &schema, 1)
        .await
        .expect("connect through the namespace");
    assert_eq!(store.get_subscriber("nobody").await.expect("a query through the namespace"), None);

    namespace.set_link(false);
    let cut = Instant::now();
    let failed = tokio::time::timeout(HUNG, store.get_subscriber("nobody"))
        .await
        .unwrap_or_else(|_| panic!("a query to a vanished server hung for {HUNG:?}"))
        .expect_err("no answer can come through a cut link");
    assert_eq!(failed.code, ErrorCode::Unavailable, "{failed:?}");
    eprintln!("a query to a silently vanished server failed after {:?}: {}", cut.elapsed(), failed.message);

    namespace.set_link(true);
    let healed = Instant::now();
    loop {
        match store.get_subscriber("nobody").await {
            Ok(answer) => {
                assert_eq!(answer, None);
                break;
            }
            Err(error) => {
                assert_eq!(error.code, ErrorCode::Unavailable, "{error:?}");
                assert!(healed.elapsed() < HUNG, "the store did not recover within {HUNG:?}: {error:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    eprintln!("the store answered again {:?} after the link came back", healed.elapsed());
    drop(store);
    PostgresStore::drop_schema(&url, &schema).await.expect("drop the test schema");
}
