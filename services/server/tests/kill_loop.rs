//! Issue 11, "Guarantees that must survive": the real `beseda` process
//! (embedded SQLite) is killed with SIGKILL 20 times in a row while a group
//! conversation is under fan-out load, and restarted each time on the same
//! data directory and port. Afterwards:
//!
//! - every acknowledged `clientMessageId` is stored exactly once, with the id
//!   and seq its acknowledgement named (retries after a kill never duplicate);
//!   sends whose answer was lost and that were not retried are stored at most
//!   once; seqs are gap-free;
//! - every subscriber, resuming by seq after each kill, saw every event exactly
//!   once and in seq order;
//! - every member's unread count is exactly the number of messages from other
//!   members after that member's read mark (docs/api.md, Notifications: every
//!   member of a displayed non-context conversation is notified of each new
//!   message except its author; MarkRead marks up to and including a message
//!   and never moves back), computed here from the test's own records.
//!
//! Sizes: 40 members (4 WebSocket senders pipelining 4 sends each, 2 REST
//! senders, 10 WebSocket subscribers, 8 members marking read at random
//! points, 16 who never read), 20 rounds of at least 40 new acknowledgements
//! each: about 1,600 messages with 39 notifications each. A run takes about
//! 16 s in a debug build on 2 cores (mostly the 20 restarts and the SQLite
//! writes), well inside a minute. Set `BESEDA_KILL_LOOP_SEED` to replay a
//! run's random choices (the seed is printed).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const ROUNDS: usize = 20;
const MEMBERS: usize = 40;
const WS_SENDERS: std::ops::Range<usize> = 0..4;
/// REST senders: the first retries a failed send with the same
/// clientMessageId, the second abandons it (stored at most once).
const REST_RETRYING_SENDER: usize = 4;
const REST_ABANDONING_SENDER: usize = 5;
const SUBSCRIBERS: std::ops::Range<usize> = 6..16;
const READERS: std::ops::Range<usize> = 16..24;
// Members 24..40 never read and never connect after joining.
/// Sends a WebSocket sender keeps in flight (answers come in request order).
const WINDOW: usize = 4;
/// New acknowledgements each round needs before its kill.
const MIN_PROGRESS_PER_ROUND: usize = 40;
/// How long the server may stay unreachable before the test gives up.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(30);

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A small deterministic generator (xorshift64*), so that a failing run can
/// be replayed from its seed without another dependency.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    fn fork(&mut self, salt: u64) -> Rng {
        Rng(self.next() ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
}

/// The real `beseda` binary as a child process.
struct ServerProcess {
    child: Child,
}

impl ServerProcess {
    async fn start(data_dir: &std::path::Path, port: u16) -> ServerProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_beseda"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir)
            .env("BESEDA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start beseda");
        let process = ServerProcess { child };
        wait_until_up(&reqwest::Client::new(), &format!("http://127.0.0.1:{port}")).await;
        process
    }

    /// SIGKILL: no shutdown, no flush, no goodbye to clients.
    fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls health until the server answers (bounded).
async fn wait_until_up(http: &reqwest::Client, base_url: &str) {
    let deadline = tokio::time::Instant::now() + UNREACHABLE_LIMIT;
    loop {
        if let Ok(response) = http.get(format!("{base_url}/rs/health")).send().await
            && response.status().is_success()
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "beseda was unreachable for {UNREACHABLE_LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[derive(Clone, Debug)]
struct Acked {
    id: String,
    seq: u64,
    author: usize,
}

/// What the clients know, written as answers arrive.
#[derive(Default)]
struct Ledger {
    /// clientMessageId -> the message its acknowledgement named.
    acked: HashMap<String, Acked>,
    /// (seq, message id) of acknowledged messages, for read marks.
    acked_list: Vec<(u64, String)>,
    /// Sent, the answer never came, and never retried.
    abandoned: HashSet<String>,
    /// Error answers from a live server (none are expected).
    errors: Vec<String>,
    /// Sends retried with the same clientMessageId after a lost answer.
    retries: usize,
    /// Retries answered with a message stored before the latest kill: the
    /// answer was lost after the commit, and the retry found the original.
    lost_after_commit: usize,
    /// When the latest kill was sent (seconds, nanoseconds since the epoch).
    last_kill: Option<(i64, i32)>,
}

impl Ledger {
    fn acknowledge(&mut self, client_message_id: &str, author: usize, message: &Value, retried: bool) {
        assert_eq!(
            message["clientMessageId"].as_str(),
            Some(client_message_id),
            "an answer carries the clientMessageId it answers: {message}"
        );
        let acked = Acked { id: message["id"].as_str().unwrap().to_owned(), seq: seq_of(&message["seq"]), author };
        if let Some(earlier) = self.acked.get(client_message_id) {
            panic!("{client_message_id} acknowledged twice: {earlier:?} and {acked:?}");
        }
        if retried {
            let date: pbjson_types::Timestamp =
                serde_json::from_value(message["date"].clone()).expect("a message has an RFC 3339 date");
            // The server shares this machine's clock, and a process started
            // after the kill cannot have stored anything dated before it.
            if self.last_kill.is_some_and(|kill| (date.seconds, date.nanos) < kill) {
                self.lost_after_commit += 1;
            }
        }
        self.acked_list.push((acked.seq, acked.id.clone()));
        self.acked.insert(client_message_id.to_owned(), acked);
    }
}

struct Context {
    base_url: String,
    ws_url: String,
    conversation_id: String,
    tokens: Vec<String>,
    ledger: Mutex<Ledger>,
    stop: AtomicBool,
}

fn seq_of(value: &Value) -> u64 {
    match value {
        Value::String(text) => text.parse().unwrap_or_else(|_| panic!("seq {text}")),
        Value::Number(number) => number.as_u64().unwrap(),
        Value::Null => 0,
        other => panic!("not a seq: {other}"),
    }
}

fn count_of(value: &Value) -> u64 {
    if value.is_null() { 0 } else { seq_of(value) }
}

/// Opens a WebSocket as `member` and waits for Welcome, retrying while the
/// server is down (bounded).
async fn connect(context: &Context, member: usize) -> Socket {
    let deadline = tokio::time::Instant::now() + UNREACHABLE_LIMIT;
    loop {
        if let Ok(Ok((mut socket, _))) =
            tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(context.ws_url.as_str())).await
        {
            let hello = json!({"hello": {"protocolVersion": 1, "token": context.tokens[member]}});
            if socket.send(WsMessage::Text(hello.to_string().into())).await.is_ok()
                && let Ok(Some(first)) = tokio::time::timeout(WAIT, next_json(&mut socket)).await
            {
                assert!(first.get("welcome").is_some(), "member {member} not welcomed: {first}");
                return socket;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "member {member} could not connect for {UNREACHABLE_LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The next JSON frame, or None when the connection is gone.
async fn next_json(socket: &mut Socket) -> Option<Value> {
    loop {
        match socket.next().await? {
            Ok(WsMessage::Text(text)) => return Some(serde_json::from_str(text.as_str()).expect("server sends JSON")),
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Sends over WebSocket with up to [`WINDOW`] requests in flight until told
/// to stop; every send whose answer was lost is retried after reconnecting
/// with the same clientMessageId, until acknowledged.
async fn ws_sender(context: Arc<Context>, member: usize) {
    let mut next_index = 0usize;
    // Sends not acknowledged yet, oldest first.
    let mut pending: VecDeque<String> = VecDeque::new();
    let mut retried: HashSet<String> = HashSet::new();
    loop {
        let stopping = context.stop.load(Ordering::SeqCst);
        if stopping && pending.is_empty() {
            return;
        }
        let mut socket = connect(&context, member).await;
        let mut in_flight: VecDeque<(String, String)> = VecDeque::new();
        let mut request_id = 0u64;
        'connection: loop {
            while in_flight.len() < WINDOW {
                let client_message_id = match pending.pop_front() {
                    Some(retry) => {
                        if retried.insert(retry.clone()) {
                            context.ledger.lock().unwrap().retries += 1;
                        }
                        retry
                    }
                    None if !context.stop.load(Ordering::SeqCst) => {
                        next_index += 1;
                        format!("m{member}-{next_index}")
                    }
                    None => break,
                };
                request_id += 1;
                let frame = json!({
                    "requestId": request_id.to_string(),
                    "sendMessage": {
                        "conversation": {"id": context.conversation_id},
                        "text": client_message_id,
                        "clientMessageId": client_message_id,
                    },
                });
                in_flight.push_back((request_id.to_string(), client_message_id));
                if socket.send(WsMessage::Text(frame.to_string().into())).await.is_err() {
                    break 'connection;
                }
            }
            if in_flight.is_empty() {
                return;
            }
            let Ok(Some(frame)) = tokio::time::timeout(WAIT, next_json(&mut socket)).await else {
                break 'connection;
            };
            let Some(answered) = frame.get("requestId").and_then(Value::as_str) else {
                continue; // a push (notification, unread count)
            };
            let (expected, client_message_id) = in_flight.pop_front().expect("an answer to a request in flight");
            assert_eq!(answered, expected, "answers come in request order");
            if let Some(message) = frame.get("message") {
                let retried = retried.contains(&client_message_id);
                context.ledger.lock().unwrap().acknowledge(&client_message_id, member, message, retried);
            } else {
                context.ledger.lock().unwrap().errors.push(format!("WS send {client_message_id}: {frame}"));
                pending.push_back(client_message_id);
            }
        }
        // The connection is gone: whatever was in flight is retried first, in order.
        while let Some((_, client_message_id)) = in_flight.pop_back() {
            pending.push_front(client_message_id);
        }
    }
}

/// Sends over REST one at a time until told to stop. A failed send is retried
/// with the same clientMessageId (`retry`), or abandoned.
async fn rest_sender(context: Arc<Context>, member: usize, retry: bool) {
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let url = format!("{}/api/v1/conversations/{}/messages", context.base_url, context.conversation_id);
    let mut next_index = 0usize;
    while !context.stop.load(Ordering::SeqCst) {
        next_index += 1;
        let client_message_id = format!("m{member}-{next_index}");
        let mut attempts = 0;
        loop {
            attempts += 1;
            if attempts == 2 {
                context.ledger.lock().unwrap().retries += 1;
            }
            let body = json!({"text": client_message_id, "clientMessageId": client_message_id});
            let answer = http.post(&url).bearer_auth(&context.tokens[member]).json(&body).send().await;
            let answer = match answer {
                Ok(response) => {
                    let status = response.status();
                    response.json::<Value>().await.map(|body| (status, body))
                }
                Err(error) => Err(error),
            };
            match answer {
                Ok((status, message)) if status.is_success() => {
                    context.ledger.lock().unwrap().acknowledge(&client_message_id, member, &message, attempts > 1);
                    break;
                }
                Ok((status, body)) => {
                    context
                        .ledger
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("REST send {client_message_id}: {status} {body}"));
                }
                Err(_) => {}
            }
            if !retry {
                context.ledger.lock().unwrap().abandoned.insert(client_message_id.clone());
                wait_until_up(&http, &context.base_url).await;
                break;
            }
            wait_until_up(&http, &context.base_url).await;
        }
    }
}

/// Marks read up to acknowledged messages at random moments (mostly recent
/// ones, sometimes older ones, which must not move the mark back), each
/// retried until acknowledged. Returns the highest seq acknowledged as read.
async fn reader(context: Arc<Context>, member: usize, mut rng: Rng) -> u64 {
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let url = format!("{}/api/v1/conversations/{}/read", context.base_url, context.conversation_id);
    let mut mark = 0;
    while !context.stop.load(Ordering::SeqCst) {
        // Pacing of a reader, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(20 + rng.below(150))).await;
        let target = {
            let ledger = context.ledger.lock().unwrap();
            let list = &ledger.acked_list;
            let recent = rng.below(5) != 0;
            let index = if recent {
                list.len() - 1 - rng.below(20.min(list.len() as u64)) as usize
            } else {
                rng.below(list.len() as u64) as usize
            };
            list[index].clone()
        };
        loop {
            let answer = http
                .post(&url)
                .bearer_auth(&context.tokens[member])
                .json(&json!({"upToMessageId": target.1}))
                .send()
                .await;
            match answer {
                Ok(response) if response.status().is_success() => {
                    mark = mark.max(target.0);
                    break;
                }
                Ok(response) => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    context.ledger.lock().unwrap().errors.push(format!("MarkRead by {member}: {status} {body}"));
                    break;
                }
                Err(_) => wait_until_up(&http, &context.base_url).await,
            }
        }
    }
    mark
}

/// What one subscriber received, across all its connections.
#[derive(Default)]
struct Stream {
    /// The `lastSeq` of the first `subscribed` answer: the stream starts after it.
    start: Option<u64>,
    /// (seq, clientMessageId or event kind) in the order received.
    events: Vec<(u64, String)>,
    /// The last seq processed: the resume point.
    last: u64,
    connections: usize,
    errors: Vec<String>,
}

/// Subscribes (afterSeq 0 the first time, then the last seq processed) and
/// records every event until aborted.
async fn subscriber(context: Arc<Context>, member: usize, stream: Arc<Mutex<Stream>>) {
    loop {
        let mut socket = connect(&context, member).await;
        let after = {
            let mut stream = stream.lock().unwrap();
            stream.connections += 1;
            stream.last
        };
        let subscribe = json!({
            "requestId": "1",
            "subscribe": {"conversation": {"id": context.conversation_id}, "afterSeq": after.to_string()},
        });
        if socket.send(WsMessage::Text(subscribe.to_string().into())).await.is_err() {
            continue;
        }
        // Pings come every 25 s and the load never pauses for long, so a
        // silence of this length means the connection is gone.
        while let Ok(Some(frame)) = tokio::time::timeout(WAIT, next_json(&mut socket)).await {
            let mut stream = stream.lock().unwrap();
            if let Some(event) = frame.get("event") {
                let seq = seq_of(&event["seq"]);
                let label = match event.get("messageCreated") {
                    Some(message) => message["clientMessageId"].as_str().unwrap_or("?").to_owned(),
                    None => event
                        .as_object()
                        .unwrap()
                        .keys()
                        .find(|key| !["conversationId", "seq", "at"].contains(&key.as_str()))
                        .cloned()
                        .unwrap_or_default(),
                };
                stream.events.push((seq, label));
                stream.last = stream.last.max(seq);
            } else if let Some(subscribed) = frame.get("subscribed") {
                let last_seq = seq_of(&subscribed["lastSeq"]);
                if stream.start.is_none() {
                    stream.start = Some(last_seq);
                    stream.last = last_seq;
                }
            } else if frame.get("error").is_some() {
                stream.errors.push(frame.to_string());
            }
        }
    }
}

async fn all_messages(server: &TestServer, auth: &Auth, conversation_id: &str) -> Vec<Value> {
    let mut messages = Vec::new();
    let mut filter = json!({"count": 250});
    loop {
        let page = server
            .ok("POST", &format!("/api/v1/conversations/{conversation_id}/messages/search"), auth, Some(filter.clone()))
            .await;
        let found = page["messages"].as_array().cloned().unwrap_or_default();
        let Some(last) = found.last() else { break };
        filter["after"] = last["id"].clone();
        messages.extend(found);
    }
    messages
}

async fn all_events(server: &TestServer, auth: &Auth, conversation_id: &str) -> Vec<Value> {
    let mut events: Vec<Value> = Vec::new();
    loop {
        let after = events.last().map(|event| seq_of(&event["seq"])).unwrap_or(0);
        let page = server
            .ok(
                "GET",
                &format!("/api/v1/conversations/{conversation_id}/events?afterSeq={after}&limit=1000"),
                auth,
                None,
            )
            .await;
        let found = page["events"].as_array().cloned().unwrap_or_default();
        if found.is_empty() {
            break;
        }
        events.extend(found);
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_9s_under_fan_out_lose_nothing_duplicate_nothing_and_miscount_nothing() {
    let seed = std::env::var("BESEDA_KILL_LOOP_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    println!("BESEDA_KILL_LOOP_SEED={seed}");
    let mut rng = Rng(seed);
    let started = std::time::Instant::now();

    // Phase 1: a real server process on a data directory that outlives it;
    // an application, 30 members and their group conversation.
    let data_dir = tempfile::tempdir().unwrap();
    let port = beseda_testkit::free_port();
    let base_url = format!("http://127.0.0.1:{port}");
    let mut process = ServerProcess::start(data_dir.path(), port).await;
    let server = TestServer::remote(&base_url, data_dir.path().join("outbox"));
    let application = server.register("owner@example.com", "KillLoop").await;
    let mut member_ids = Vec::new();
    let mut tokens = Vec::new();
    for member in 0..MEMBERS {
        let (id, _) = user(&server, &application, &format!("ib-{member}"), &format!("member{member:02}")).await;
        member_ids.push(id);
        tokens.push(application.token(&format!("ib-{member}"), &format!("member{member:02}")));
    }
    let members: Vec<&str> = member_ids.iter().map(String::as_str).collect();
    let conversation_id = group(&server, &application, "Kill loop", &members).await;
    let context = Arc::new(Context {
        base_url: base_url.clone(),
        ws_url: format!("ws://127.0.0.1:{port}/ws"),
        conversation_id: conversation_id.clone(),
        tokens,
        ledger: Mutex::new(Ledger::default()),
        stop: AtomicBool::new(false),
    });

    // Phase 2: a first message, so that every subscriber has a non-zero
    // resume point from its first `subscribed` answer; then the subscribers.
    let first = server
        .ok(
            "POST",
            &format!("/api/v1/conversations/{conversation_id}/messages"),
            &Auth::Bearer(context.tokens[0].clone()),
            Some(json!({"text": "m0-0", "clientMessageId": "m0-0"})),
        )
        .await;
    context.ledger.lock().unwrap().acknowledge("m0-0", 0, &first, false);
    let mut streams = BTreeMap::new();
    let mut subscriber_tasks = Vec::new();
    for member in SUBSCRIBERS {
        let stream = Arc::new(Mutex::new(Stream::default()));
        streams.insert(member, stream.clone());
        subscriber_tasks.push(tokio::spawn(subscriber(context.clone(), member, stream)));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while streams.values().any(|stream| stream.lock().unwrap().start.is_none()) {
        assert!(tokio::time::Instant::now() < deadline, "subscribers did not subscribe in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Phase 3: 20 rounds of load, each ended by kill -9 at a random moment
    // once it made progress, and a restart on the same data and port.
    let mut senders = Vec::new();
    for member in WS_SENDERS {
        senders.push(tokio::spawn(ws_sender(context.clone(), member)));
    }
    senders.push(tokio::spawn(rest_sender(context.clone(), REST_RETRYING_SENDER, true)));
    senders.push(tokio::spawn(rest_sender(context.clone(), REST_ABANDONING_SENDER, false)));
    let mut readers = Vec::new();
    for member in READERS {
        readers.push((member, tokio::spawn(reader(context.clone(), member, rng.fork(member as u64)))));
    }
    for round in 1..=ROUNDS {
        let before = context.ledger.lock().unwrap().acked.len();
        let deadline = tokio::time::Instant::now() + UNREACHABLE_LIMIT;
        while context.ledger.lock().unwrap().acked.len() < before + MIN_PROGRESS_PER_ROUND {
            assert!(tokio::time::Instant::now() < deadline, "round {round}: no progress after the restart");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The random moment of the kill, mid-burst (the load never pauses).
        tokio::time::sleep(Duration::from_millis(rng.below(500))).await;
        // One of the last sends the doomed process acknowledged.
        let (client_message_id, original) = {
            let ledger = context.ledger.lock().unwrap();
            let (seq, _) = ledger.acked_list[ledger.acked_list.len() - 1 - rng.below(10) as usize];
            ledger
                .acked
                .iter()
                .find(|(_, acked)| acked.seq == seq)
                .map(|(id, acked)| (id.clone(), acked.clone()))
                .unwrap()
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        context.ledger.lock().unwrap().last_kill = Some((now.as_secs() as i64, now.subsec_nanos() as i32));
        process.kill_9();
        process = ServerProcess::start(data_dir.path(), port).await;
        // A send acknowledged by the killed process, repeated to the new one
        // as a client whose answer was lost would: the stored message, not a
        // second one (the store finds the original across the restart).
        // A fresh handle: no pooled connection to the killed process.
        let server = TestServer::remote(&base_url, data_dir.path().join("outbox"));
        let repeated = server
            .ok(
                "POST",
                &format!("/api/v1/conversations/{conversation_id}/messages"),
                &Auth::Bearer(context.tokens[original.author].clone()),
                Some(json!({"text": client_message_id, "clientMessageId": client_message_id})),
            )
            .await;
        assert_eq!(
            (repeated["id"].as_str(), seq_of(&repeated["seq"])),
            (Some(original.id.as_str()), original.seq),
            "round {round}: repeating {client_message_id} after the restart answers the stored message"
        );
        let acked = context.ledger.lock().unwrap().acked.len();
        println!("round {round:2}: killed and restarted, {acked} acknowledged so far ({:?})", started.elapsed());
    }

    // Phase 4: the load stops; every retrying client finishes its retries
    // against the last server, which stays up.
    context.stop.store(true, Ordering::SeqCst);
    for sender in senders {
        tokio::time::timeout(Duration::from_secs(60), sender).await.expect("senders finish their retries").unwrap();
    }
    let mut read_marks = BTreeMap::new();
    for (member, task) in readers {
        let mark = tokio::time::timeout(Duration::from_secs(60), task).await.expect("readers finish").unwrap();
        read_marks.insert(member, mark);
    }
    let ledger = std::mem::take(&mut *context.ledger.lock().unwrap());
    let server = TestServer::remote(&base_url, data_dir.path().join("outbox"));
    assert!(ledger.errors.is_empty(), "error answers from a live server: {:#?}", ledger.errors);
    assert!(ledger.retries > 0, "some sends lost their answer to a kill and were retried");

    // Phase 5: the message list holds every acknowledged clientMessageId
    // exactly once, as acknowledged; abandoned ones at most once; nothing else.
    let reader_auth = Auth::Bearer(context.tokens[SUBSCRIBERS.start].clone());
    let messages = all_messages(&server, &reader_auth, &conversation_id).await;
    let mut stored: HashMap<String, (String, u64, String)> = HashMap::new();
    for message in &messages {
        let client_message_id = message["clientMessageId"].as_str().expect("every message has its clientMessageId");
        let entry = (
            message["id"].as_str().unwrap().to_owned(),
            seq_of(&message["seq"]),
            message["authorId"].as_str().unwrap().to_owned(),
        );
        assert_eq!(message["text"].as_str(), Some(client_message_id), "text and clientMessageId travel together");
        if let Some(earlier) = stored.insert(client_message_id.to_owned(), entry) {
            panic!("{client_message_id} is stored twice: {earlier:?} and {message}");
        }
    }
    for (client_message_id, acked) in &ledger.acked {
        let (id, seq, author) = stored
            .get(client_message_id)
            .unwrap_or_else(|| panic!("acknowledged {client_message_id} was lost: {acked:?}"));
        assert_eq!(
            (id, *seq, author),
            (&acked.id, acked.seq, &member_ids[acked.author]),
            "{client_message_id} as acknowledged"
        );
    }
    for client_message_id in stored.keys() {
        assert!(
            ledger.acked.contains_key(client_message_id) || ledger.abandoned.contains(client_message_id),
            "{client_message_id} is stored but was never sent"
        );
    }
    let stored_abandoned = ledger.abandoned.iter().filter(|id| stored.contains_key(*id)).count();

    // Phase 6: seqs are gap-free: the event log is 1..=last, and its
    // messageCreated events are exactly the stored messages.
    let events = all_events(&server, &reader_auth, &conversation_id).await;
    let seqs: Vec<u64> = events.iter().map(|event| seq_of(&event["seq"])).collect();
    let last_seq = *seqs.last().unwrap();
    assert_eq!(seqs, (1..=last_seq).collect::<Vec<_>>(), "the event log has no gaps and no repeats");
    let created: BTreeMap<u64, &str> = events
        .iter()
        .filter_map(|event| Some((seq_of(&event["seq"]), event.get("messageCreated")?["clientMessageId"].as_str()?)))
        .collect();
    let by_seq: BTreeMap<u64, &str> = stored.iter().map(|(id, (_, seq, _))| (*seq, id.as_str())).collect();
    assert_eq!(created, by_seq, "each stored message has its messageCreated event at its seq");

    // Phase 7: each subscriber, across all its resumes, received every event
    // after its first subscription exactly once, in seq order.
    let deadline = tokio::time::Instant::now() + UNREACHABLE_LIMIT;
    while streams.values().any(|stream| stream.lock().unwrap().last < last_seq) {
        assert!(tokio::time::Instant::now() < deadline, "subscribers did not catch up to seq {last_seq}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for task in &subscriber_tasks {
        task.abort();
    }
    let labels: BTreeMap<u64, String> = events
        .iter()
        .map(|event| {
            let seq = seq_of(&event["seq"]);
            (seq, created.get(&seq).map(|id| id.to_string()).unwrap_or_default())
        })
        .collect();
    for (member, stream) in &streams {
        let stream = stream.lock().unwrap();
        assert!(stream.errors.is_empty(), "subscriber {member} got errors: {:?}", stream.errors);
        let start = stream.start.unwrap();
        let received: Vec<u64> = stream.events.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(
            received,
            (start + 1..=last_seq).collect::<Vec<_>>(),
            "subscriber {member}: each event once, in order"
        );
        for (seq, label) in &stream.events {
            if !labels[seq].is_empty() {
                assert_eq!(label, &labels[seq], "subscriber {member}: the event at seq {seq} is the stored one");
            }
        }
        assert!(
            stream.connections > ROUNDS,
            "subscriber {member} resumed after every kill ({} connections)",
            stream.connections
        );
    }

    // Phase 8: every member's unread count is the number of stored messages
    // from other members after that member's read mark.
    let mut authors_by_seq: Vec<(u64, usize)> = Vec::new();
    for (client_message_id, (_, seq, author_id)) in &stored {
        let author = member_ids.iter().position(|id| id == author_id).expect("the author is a member");
        assert!(client_message_id.starts_with(&format!("m{author}-")), "{client_message_id} by member {author}");
        authors_by_seq.push((*seq, author));
    }
    let mut mismatches = Vec::new();
    for (member, token) in context.tokens.iter().enumerate() {
        let mark = read_marks.get(&member).copied().unwrap_or(0);
        let expected = authors_by_seq.iter().filter(|(seq, author)| *author != member && *seq > mark).count() as u64;
        let unread = server.ok("GET", "/api/v1/unread", &Auth::Bearer(token.clone()), None).await;
        let actual = unread["conversations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry["conversationId"] == conversation_id.as_str())
            .map(|entry| count_of(&entry["unreadCount"]))
            .unwrap_or(0);
        assert_eq!(
            count_of(&unread["totalUnread"]),
            actual,
            "member {member}: one conversation, so the total is its count"
        );
        if actual != expected {
            mismatches.push(format!("member {member} (read mark {mark}): expected {expected}, server says {actual}"));
        }
    }
    assert!(mismatches.is_empty(), "unread counts differ:\n{}", mismatches.join("\n"));
    assert!(read_marks.values().all(|mark| *mark > 0), "every reader marked something read: {read_marks:?}");

    println!(
        "{ROUNDS} kills; {} messages stored ({} acknowledged, {} abandoned of which {stored_abandoned} stored), \
         {} retried sends of which {} had been stored before the kill, last seq {last_seq}, read marks {read_marks:?}, {:?}",
        stored.len(),
        ledger.acked.len(),
        ledger.abandoned.len(),
        ledger.retries,
        ledger.lost_after_commit,
        started.elapsed()
    );
    drop(process);
}
