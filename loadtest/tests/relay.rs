//! Runs the `beseda-relay` binary and checks that it relays: every frame from every sender reaches
//! every connection (the sender included) exactly once and in per-sender order; pings are answered,
//! closes are answered, and `--duration-seconds` ends the process with totals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const STEP: Duration = Duration::from_secs(10);

/// The relay process; killed (and its log printed if the test is failing) when dropped.
struct Relay {
    child: Child,
    log: PathBuf,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Relay {
    fn start(extra: &[&str]) -> Relay {
        let dir = tempfile::tempdir().expect("tempdir");
        let port_file = dir.path().join("addr");
        let log = dir.path().join("relay.log");
        let child = Command::new(env!("CARGO_BIN_EXE_beseda-relay"))
            .args(["--listen", "127.0.0.1:0", "--threads", "2", "--port-file"])
            .arg(&port_file)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start beseda-relay");
        let mut relay = Relay { child, log, addr: String::new(), _dir: dir };
        relay.addr = relay.wait_for_port_file(&port_file);
        relay
    }

    fn wait_for_port_file(&mut self, path: &Path) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            if let Ok(text) = std::fs::read_to_string(path)
                && let Some(line) = text.lines().next()
            {
                return line.trim().to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("beseda-relay exited early ({status}): {}", self.log_text());
            }
            assert!(Instant::now() < deadline, "no port file after {STEP:?}: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn connect(&self) -> Ws {
        let url = format!("ws://{}/", self.addr);
        let (ws, _) = timeout(STEP, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        ws
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- beseda-relay log ---\n{}", self.log_text());
        }
    }
}

/// Frame payload: "<sender>:<seq>", sent as Text for even and Binary for odd sequence numbers.
fn frame(sender: &str, seq: usize) -> Message {
    let text = format!("{sender}:{seq}");
    if seq.is_multiple_of(2) { Message::text(text) } else { Message::Binary(Bytes::from(text)) }
}

fn parse(m: &Message) -> Option<(String, usize)> {
    let text = match m {
        Message::Text(t) => t.as_str().to_owned(),
        Message::Binary(b) => String::from_utf8(b.to_vec()).expect("utf-8 payload"),
        _ => return None,
    };
    let (sender, seq) = text.split_once(':').expect("sender:seq");
    let seq: usize = seq.parse().expect("seq");
    // Text/Binary must be preserved.
    assert_eq!(matches!(m, Message::Text(_)), seq.is_multiple_of(2), "frame kind changed for {text}");
    Some((sender.to_owned(), seq))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_client_gets_every_frame_once_in_order() {
    const PER_SENDER: usize = 300;
    let senders = ["a", "b"];
    let total = PER_SENDER * senders.len();

    let relay = Relay::start(&["--queue", "4096"]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(relay.connect().await);
    }

    // Split everyone; start the receivers before anyone sends.
    let mut sinks = Vec::new();
    let mut receivers = Vec::new();
    for (i, ws) in clients.into_iter().enumerate() {
        let (sink, mut stream) = ws.split();
        sinks.push(sink);
        receivers.push(tokio::spawn(async move {
            let mut got: Vec<(String, usize)> = Vec::with_capacity(total);
            while got.len() < total {
                let m = match timeout(STEP, stream.next()).await {
                    Ok(Some(m)) => m.expect("read"),
                    Ok(None) => panic!("client {i}: stream ended with {} of {total} frames", got.len()),
                    Err(_) => panic!("client {i}: timed out with {} of {total} frames", got.len()),
                };
                if let Some(f) = parse(&m) {
                    got.push(f);
                }
            }
            // Nothing more may arrive (no duplicates).
            if let Ok(Some(Ok(m))) = timeout(Duration::from_millis(300), stream.next()).await {
                assert!(parse(&m).is_none(), "client {i}: extra frame {m:?}");
            }
            (got, stream)
        }));
    }

    // Clients 0 and 1 send, concurrently; client 2 only listens.
    let mut sending = Vec::new();
    for (name, mut sink) in senders.iter().zip(sinks.drain(..2)) {
        let name = name.to_string();
        sending.push(tokio::spawn(async move {
            for seq in 0..PER_SENDER {
                timeout(STEP, sink.send(frame(&name, seq))).await.expect("send timed out").expect("send");
                if seq.is_multiple_of(50) {
                    tokio::task::yield_now().await;
                }
            }
            sink
        }));
    }
    let mut sinks_back = Vec::new();
    for s in sending {
        sinks_back.push(timeout(STEP, s).await.expect("sender timed out").expect("sender task"));
    }

    for (i, r) in receivers.into_iter().enumerate() {
        let (got, _stream) = timeout(STEP * 2, r).await.expect("receiver timed out").expect("receiver task");
        assert_eq!(got.len(), total, "client {i}");
        for sender in senders {
            let seqs: Vec<usize> = got.iter().filter(|(s, _)| s == sender).map(|(_, n)| *n).collect();
            let expected: Vec<usize> = (0..PER_SENDER).collect();
            assert_eq!(seqs, expected, "client {i}: frames from {sender} missing, duplicated or out of order");
        }
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_ping_and_close() {
    let relay = Relay::start(&[]);
    let mut ws = relay.connect().await;

    timeout(STEP, ws.send(Message::Ping(Bytes::from_static(b"are you there")))).await.unwrap().unwrap();
    let pong = loop {
        let m = timeout(STEP, ws.next()).await.expect("pong timed out").expect("stream ended").expect("read");
        if let Message::Pong(p) = m {
            break p;
        }
    };
    assert_eq!(&pong[..], b"are you there");

    timeout(STEP, ws.close(None)).await.unwrap().unwrap();
    // The relay answers the close and closes; the stream then ends.
    let ended = timeout(STEP, async {
        while let Some(m) = ws.next().await {
            if m.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the relay did not finish the close handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_ends_the_run_with_totals() {
    let mut relay = Relay::start(&["--duration-seconds", "1"]);
    let mut ws = relay.connect().await;
    timeout(STEP, ws.send(Message::text("x:0"))).await.unwrap().unwrap();
    let echoed = timeout(STEP, ws.next()).await.expect("echo timed out").expect("stream ended").expect("read");
    assert_eq!(parse(&echoed), Some(("x".to_owned(), 0)));

    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = relay.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "beseda-relay did not stop after --duration-seconds 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let log = relay.log_text();
    assert!(log.contains("totals (duration reached)"), "no totals in log:\n{log}");
    assert!(log.contains("received=1 delivered=1 dropped=0 "), "unexpected totals:\n{log}");
    assert!(log.contains("open-file limit"), "fd limit not printed:\n{log}");
}

/// The fan-out scenario in relay mode, end to end against the real relay:
/// everything sent reaches every other member once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fanout_scenario_runs_against_the_relay() {
    let relay = Relay::start(&["--duration-seconds", "60"]);
    let reports = tempfile::tempdir().unwrap();
    let common = beseda_loadtest::run::Common {
        targets: vec![format!("http://{}", relay.addr)],
        duration_seconds: 2,
        sources: 2,
        report_dir: reports.path().to_owned(),
        application_id: None,
        application_key: None,
        register_email: "unused@example.com".into(),
        outbox_dir: reports.path().to_owned(),
        cleanup: false,
        server_pid: None,
        connect_timeout_seconds: 10,
        drain_seconds: 10,
        scrape_interval_seconds: 1,
        quiet: true,
        registered: Default::default(),
    };
    let scenario =
        beseda_loadtest::scenarios::fanout::Fanout { common, members: 20, senders: 4, rate: 200.0, relay: true };
    let result = timeout(Duration::from_secs(60), beseda_loadtest::scenarios::fanout::run(scenario))
        .await
        .expect("the run stops by itself")
        .expect("the run");
    assert!(result.passed, "{:?}", result.failures);
    assert!(result.totals.sent > 0);
    assert_eq!(result.totals.delivered, result.totals.sent * 19);
    assert!(reports.path().join("report.html").exists());
}
