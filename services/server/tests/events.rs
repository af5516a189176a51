//! The outbound event stream end to end (docs/events.md): a real server
//! POSTs to a real HTTP receiver inside the test, over real sockets. The
//! receiver records every request and answers what the test tells it to
//! (or is not listening at all).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use beseda::config::NodeConfig;
use common::*;
use serde_json::{Value, json};

/// Outer bound of every wait; the waits end as soon as their condition holds.
const DEADLINE: Duration = Duration::from_secs(30);

// ---- the server ------------------------------------------------------------

/// Retries in tens of milliseconds instead of seconds.
fn fast(max_attempts: u32) -> impl FnOnce(&mut NodeConfig) {
    move |config| {
        config.bots.max_attempts = max_attempts;
        config.bots.initial_backoff_milliseconds = 50;
        config.bots.max_backoff_milliseconds = 200;
        config.bots.poll_interval_milliseconds = 50;
        config.bots.outbound_timeout_seconds = 2;
    }
}

async fn start(max_attempts: u32) -> TestServer {
    TestServer::start_configured(tempfile::tempdir().unwrap(), None, fast(max_attempts)).await
}

/// Creates a subscription; returns its id and its generated secret.
async fn subscribe(
    server: &TestServer,
    application: &Application,
    url: &str,
    event_kinds: &[&str],
    conversation_ids: &[&str],
) -> (String, String) {
    let created = server
        .ok(
            "POST",
            "/api/v1/event-subscriptions",
            &application.privileged(),
            Some(json!({"subscription": {"url": url, "eventKinds": event_kinds, "conversationIds": conversation_ids}})),
        )
        .await;
    let id = created["id"].as_str().unwrap_or_else(|| panic!("no id: {created}")).to_owned();
    let secret = created["secret"].as_str().unwrap_or_default().to_owned();
    assert_eq!(secret.len(), 64, "a generated secret is 32 random bytes in hex: {created}");
    assert!(secret.chars().all(|c| c.is_ascii_hexdigit()), "{created}");
    assert_eq!(created["url"], url);
    (id, secret)
}

async fn send(server: &TestServer, auth: &Auth, conversation_id: &str, text: &str) -> Value {
    server
        .ok("POST", &format!("/api/v1/conversations/{conversation_id}/messages"), auth, Some(json!({"text": text})))
        .await
}

/// Dead letters of subscriptions, as the API lists them.
async fn dead_letters(server: &TestServer, application: &Application, subscription_id: &str) -> Vec<Value> {
    let listed = server
        .ok(
            "POST",
            "/api/v1/dead-letters/search",
            &application.privileged(),
            Some(json!({"consumerKind": "subscription", "consumerId": subscription_id})),
        )
        .await;
    listed["deadLetters"].as_array().cloned().unwrap_or_default()
}

/// A proto3 JSON 64-bit integer: a string in answers, a number in requests.
fn int(value: &Value) -> u64 {
    match value {
        Value::String(text) => text.parse().unwrap_or_else(|_| panic!("not an integer: {value}")),
        Value::Number(number) => number.as_u64().unwrap(),
        Value::Null => 0,
        other => panic!("not an integer: {other}"),
    }
}

/// Polls `check` until it returns something; fails after [`DEADLINE`].
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- the receiver ----------------------------------------------------------

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
    json: Value,
    /// The status the receiver answered.
    answered: u16,
}

impl Hit {
    fn delivery_id(&self) -> String {
        self.json["deliveryId"].as_str().unwrap_or_default().to_owned()
    }
    fn event(&self) -> &Value {
        &self.json["event"]
    }
    fn kind(&self) -> &str {
        self.event()["type"].as_str().unwrap_or_default()
    }
    fn conversation_id(&self) -> &str {
        self.event()["conversationId"].as_str().unwrap_or_default()
    }
    fn seq(&self) -> u64 {
        int(&self.event()["seq"])
    }
    fn text(&self) -> &str {
        self.event()["message"]["text"].as_str().unwrap_or_default()
    }
    fn accepted(&self) -> bool {
        (200..300).contains(&self.answered)
    }
}

#[derive(Default)]
struct ReceiverState {
    hits: Mutex<Vec<Hit>>,
    status: AtomicU16,
}

/// A small HTTP server on 127.0.0.1 that records what it is sent.
struct Receiver {
    address: SocketAddr,
    state: Arc<ReceiverState>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Receiver {
    /// Listening, answering `status`.
    async fn start(status: u16) -> Receiver {
        let receiver = Self::reserve(status).await;
        receiver.listen().await;
        receiver
    }

    /// Not listening yet: connections to its address are refused until [`Receiver::listen`].
    async fn reserve(status: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let state = Arc::new(ReceiverState::default());
        state.status.store(status, Ordering::SeqCst);
        Receiver { address, state, task: Mutex::new(None) }
    }

    async fn listen(&self) {
        let listener = tokio::net::TcpListener::bind(self.address).await.expect("the reserved port is free again");
        let state = self.state.clone();
        let handler = move |uri: axum::http::Uri, headers: HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let answered = state.status.load(Ordering::SeqCst);
                let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let hit = Hit { path: uri.path().to_owned(), headers, body: body.to_vec(), json, answered };
                state.hits.lock().unwrap().push(hit);
                let status = StatusCode::from_u16(answered).unwrap();
                (status, if status.is_success() { "" } else { "receiver says no" })
            }
        };
        let app = axum::Router::new().fallback(handler);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.task.lock().unwrap() = Some(task);
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn answer(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// Requests answered 2xx, the first of each delivery id only (a
    /// receiver deduplicates by it), in arrival order.
    fn accepted(&self) -> Vec<Hit> {
        let mut seen = std::collections::HashSet::new();
        self.hits().into_iter().filter(|hit| hit.accepted() && seen.insert(hit.delivery_id())).collect()
    }

    fn accepted_on(&self, path: &str) -> Vec<Hit> {
        self.accepted().into_iter().filter(|hit| hit.path == path).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

/// `sha256=<hex HMAC-SHA256>` computed independently of the server's code
/// (with the JWT library's HS256, which is HMAC-SHA256).
fn expected_signature(secret: &str, body: &[u8]) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    let mac = jsonwebtoken::crypto::sign(body, &key, jsonwebtoken::Algorithm::HS256).unwrap();
    let mac = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(mac).unwrap();
    format!("sha256={}", mac.iter().map(|byte| format!("{byte:02x}")).collect::<String>())
}

/// Per conversation, in arrival order: every request is for the same or a
/// later `seq` than the one before, leaving out re-sends of deliveries
/// that were already acknowledged (duplicates a receiver drops by id).
fn assert_conversation_order(hits: &[Hit]) {
    let mut acknowledged = std::collections::HashSet::new();
    let mut last_seq: std::collections::HashMap<String, u64> = Default::default();
    for hit in hits {
        if acknowledged.contains(&hit.delivery_id()) {
            continue;
        }
        let last = last_seq.entry(hit.conversation_id().to_owned()).or_default();
        assert!(
            hit.seq() >= *last,
            "seq {} of conversation {} was sent after seq {}: the previous event was not acknowledged first",
            hit.seq(),
            hit.conversation_id(),
            last
        );
        *last = hit.seq();
        if hit.accepted() {
            acknowledged.insert(hit.delivery_id());
        }
    }
}

// ---- the tests ---------------------------------------------------------------

#[test]
fn the_tests_signature_check_is_hmac_sha256() {
    // RFC 4231, test case 2.
    assert_eq!(
        expected_signature("Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[tokio::test]
async fn events_arrive_signed_with_the_documented_body() {
    let receiver = Receiver::start(200).await;
    let server = start(10).await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, _) = user(&server, &application, "b1", "Bob").await;
    let (subscription_id, secret) = subscribe(&server, &application, &receiver.url("/hook"), &[], &[]).await;

    let conversation_id = group(&server, &application, "Team", &[&alice_id]).await;
    let sent = send(&server, &alice, &conversation_id, "invoice 42 is paid").await;
    let message_id = sent["id"].as_str().unwrap().to_owned();
    server
        .ok(
            "PATCH",
            &format!("/api/v1/conversations/{conversation_id}"),
            &application.privileged(),
            Some(json!({"addMemberIds": [bob_id]})),
        )
        .await;
    server.ok("PATCH", &format!("/api/v1/messages/{message_id}"), &alice, Some(json!({"text": "paid in full"}))).await;
    server.ok("DELETE", &format!("/api/v1/messages/{message_id}"), &alice, None).await;

    let kinds =
        ["conversation.created", "message.created", "conversation.changed", "message.edited", "message.deleted"];
    let hits = eventually("five events of the conversation", async || {
        let hits: Vec<Hit> =
            receiver.accepted().into_iter().filter(|hit| hit.conversation_id() == conversation_id).collect();
        (hits.len() >= kinds.len()).then_some(hits)
    })
    .await;
    // One conversation: in commit order.
    assert_eq!(hits.iter().map(|hit| hit.kind()).collect::<Vec<_>>(), kinds);
    assert_eq!(hits.iter().map(Hit::seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    for hit in &hits {
        // Headers.
        assert_eq!(hit.headers["content-type"], "application/json");
        assert_eq!(hit.headers["x-beseda-event"], hit.kind());
        assert_eq!(hit.headers["x-beseda-delivery"].to_str().unwrap(), hit.delivery_id());
        assert_eq!(hit.headers["x-beseda-signature"].to_str().unwrap(), expected_signature(&secret, &hit.body));
        let sent_at: u64 = hit.headers["x-beseda-timestamp"].to_str().unwrap().parse().unwrap();
        assert!(sent_at <= now && now - sent_at < 120, "timestamp {sent_at}, now {now}");
        // The envelope.
        let body = hit.json.as_object().unwrap();
        let mut fields: Vec<&str> = body.keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["applicationId", "attempt", "deliveryId", "event", "subscriptionId"], "{}", hit.json);
        assert!(hit.delivery_id().parse::<i64>().is_ok(), "{}", hit.json);
        assert_eq!(hit.json["subscriptionId"], subscription_id.as_str());
        assert_eq!(hit.json["applicationId"], application.id.as_str());
        assert_eq!(hit.json["attempt"], 1);
        let at = hit.event()["at"].as_str().unwrap_or_default();
        assert!(at.starts_with("20") && at.ends_with('Z'), "canonical RFC 3339 in UTC: {}", hit.json);
    }
    // The events themselves, in their REST form.
    assert_eq!(hits[0].event()["conversation"]["id"], conversation_id.as_str());
    assert_eq!(hits[0].event()["conversation"]["title"], "Team");
    let created = &hits[1].event()["message"];
    assert_eq!(created["id"], message_id.as_str());
    assert_eq!(created["text"], "invoice 42 is paid");
    assert_eq!(created["authorId"], alice_id.as_str());
    assert_eq!(created["conversationId"], conversation_id.as_str());
    assert_eq!(created["seq"], "1");
    assert_eq!(hits[2].event()["addedMemberIds"], json!([bob_id]));
    assert!(hits[2].event()["conversation"]["memberIds"].as_array().unwrap().contains(&json!(bob_id)));
    assert_eq!(hits[3].event()["message"]["text"], "paid in full");
    assert_eq!(hits[4].event()["message"]["deleted"], true);

    // A wrong secret does not verify (the check above is not vacuous).
    assert_ne!(hits[1].headers["x-beseda-signature"].to_str().unwrap(), expected_signature("another", &hits[1].body));
}

#[tokio::test]
async fn a_receiver_that_is_down_for_a_while_gets_everything_in_order_once_back() {
    // Attempts never run out here: the receiver is down for an unknown while.
    let server = start(1_000).await;
    let receiver = Receiver::reserve(503).await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let first = group(&server, &application, "First", &[&alice_id]).await;
    let second = group(&server, &application, "Second", &[&alice_id]).await;
    subscribe(&server, &application, &receiver.url("/hook"), &["message.created"], &[]).await;

    // 20 messages in 2 conversations while nobody listens.
    for index in 0..10 {
        send(&server, &alice, &first, &format!("first {index}")).await;
        send(&server, &alice, &second, &format!("second {index}")).await;
    }
    // Then the receiver is up but answers 503: the first event of each
    // conversation is retried, and nothing behind it is sent meanwhile.
    receiver.listen().await;
    eventually("retries of both conversations' first events", async || {
        let hits = receiver.hits();
        let retried = |conversation: &str| {
            hits.iter().any(|hit| hit.conversation_id() == conversation && int(&hit.json["attempt"]) >= 3)
        };
        (retried(&first) && retried(&second)).then_some(())
    })
    .await;
    let while_down = receiver.hits();
    assert!(while_down.iter().all(|hit| hit.answered == 503));
    for conversation in [&first, &second] {
        let texts: std::collections::HashSet<&str> =
            while_down.iter().filter(|hit| hit.conversation_id() == conversation.as_str()).map(Hit::text).collect();
        assert_eq!(texts.len(), 1, "only the first event is tried while it fails: {texts:?}");
    }

    // Back: everything arrives, each conversation in order.
    receiver.answer(200);
    let accepted = eventually("all 20 events", async || {
        let accepted = receiver.accepted();
        (accepted.len() >= 20).then_some(accepted)
    })
    .await;
    assert_eq!(accepted.len(), 20, "no event beyond the 20: {:?}", accepted.iter().map(Hit::text).collect::<Vec<_>>());
    for (conversation, name) in [(&first, "first"), (&second, "second")] {
        let delivered: Vec<&Hit> =
            accepted.iter().filter(|hit| hit.conversation_id() == conversation.as_str()).collect();
        let texts: Vec<&str> = delivered.iter().map(|hit| hit.text()).collect();
        let expected: Vec<String> = (0..10).map(|index| format!("{name} {index}")).collect();
        assert_eq!(texts, expected, "conversation {name} out of order or incomplete");
        let seqs: Vec<u64> = delivered.iter().map(|hit| hit.seq()).collect();
        assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
    }
    assert_conversation_order(&receiver.hits());
}

// Two worker threads: app::run does not wait for the stopped node's background tasks (the
// relay, the dispatcher), and on one thread the new node's blocking SQLite open could wait on a
// transaction of theirs that cannot finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_state_survives_a_restart() {
    let receiver = Receiver::start(503).await;
    let server = start(1_000).await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let conversation_id = group(&server, &application, "Team", &[&alice_id]).await;
    subscribe(&server, &application, &receiver.url("/hook"), &["message.created"], &[]).await;
    for index in 0..5 {
        send(&server, &alice, &conversation_id, &format!("before restart {index}")).await;
    }
    eventually("a failed attempt", async || (!receiver.hits().is_empty()).then_some(())).await;

    let data_dir = server.stop().await;
    receiver.answer(200);
    let _server = TestServer::start_configured(data_dir, None, fast(1_000)).await;
    let accepted = eventually("the queued events after the restart", async || {
        let accepted = receiver.accepted();
        (accepted.len() >= 5).then_some(accepted)
    })
    .await;
    let texts: Vec<&str> = accepted.iter().map(Hit::text).collect();
    assert_eq!(texts, (0..5).map(|index| format!("before restart {index}")).collect::<Vec<_>>());
    assert_conversation_order(&receiver.hits());
}

#[tokio::test]
async fn a_receiver_that_always_fails_produces_dead_letters_to_list_retry_and_discard() {
    let receiver = Receiver::start(500).await;
    let server = start(3).await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let first = group(&server, &application, "First", &[&alice_id]).await;
    let second = group(&server, &application, "Second", &[&alice_id]).await;
    let (subscription_id, _) =
        subscribe(&server, &application, &receiver.url("/hook"), &["message.created"], &[]).await;
    send(&server, &alice, &first, "one").await;
    send(&server, &alice, &first, "two").await;
    send(&server, &alice, &second, "three").await;

    // Each event is tried 3 times, then becomes a dead letter; a dead letter
    // stops blocking, so "two" gets its 3 attempts after "one" died.
    let dead = eventually("three dead letters", async || {
        let dead = dead_letters(&server, &application, &subscription_id).await;
        (dead.len() >= 3).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    for letter in &dead {
        assert_eq!(letter["consumerKind"], "subscription");
        assert_eq!(letter["consumerId"], subscription_id.as_str());
        assert_eq!(letter["kind"], "message.created");
        assert_eq!(letter["attempts"], 3, "{letter}");
        let error = letter["lastError"].as_str().unwrap_or_default();
        assert!(error.starts_with("HTTP 500") && error.contains("receiver says no"), "{letter}");
        assert_eq!(letter["event"]["type"], "message.created");
        assert_eq!(letter["event"]["conversationId"], letter["conversationId"]);
    }
    let mut texts: Vec<&str> = dead.iter().map(|letter| letter["event"]["message"]["text"].as_str().unwrap()).collect();
    texts.sort_unstable();
    assert_eq!(texts, ["one", "three", "two"]);
    let hits = receiver.hits();
    for text in ["one", "two", "three"] {
        let attempts: Vec<u64> =
            hits.iter().filter(|hit| hit.text() == text).map(|hit| int(&hit.json["attempt"])).collect();
        assert_eq!(attempts, [1, 2, 3], "attempts of {text}");
    }
    assert_conversation_order(&hits);
    // They are the subscription's, not the bots'.
    let bots = server.ok("POST", "/api/v1/dead-letters/search", &application.privileged(), Some(json!({}))).await;
    assert!(bots["deadLetters"].as_array().is_none_or(Vec::is_empty), "{bots}");

    // Retry two of them once the receiver is fixed: delivered afresh.
    receiver.answer(200);
    let id_of = |text: &str| {
        let letter = dead.iter().find(|letter| letter["event"]["message"]["text"] == text).unwrap();
        letter["deliveryId"].clone()
    };
    let retried = server
        .ok(
            "POST",
            "/api/v1/dead-letters/retry",
            &application.privileged(),
            Some(json!({"deliveryIds": [id_of("one"), id_of("three")]})),
        )
        .await;
    assert_eq!(int(&retried["affected"]), 2, "{retried}");
    let accepted = eventually("the retried events", async || {
        let accepted = receiver.accepted();
        (accepted.len() >= 2).then_some(accepted)
    })
    .await;
    let mut texts: Vec<&str> = accepted.iter().map(Hit::text).collect();
    texts.sort_unstable();
    assert_eq!(texts, ["one", "three"]);
    for hit in &accepted {
        assert_eq!(hit.json["attempt"], 1, "a retried dead letter starts a fresh count");
        assert_eq!(hit.json["deliveryId"].as_str().unwrap(), int(&id_of(hit.text())).to_string());
    }
    let remaining = eventually("the retried ones to leave the dead letters", async || {
        let remaining = dead_letters(&server, &application, &subscription_id).await;
        (remaining.len() == 1).then_some(remaining)
    })
    .await;
    assert_eq!(remaining[0]["event"]["message"]["text"], "two");

    // Discard the last one.
    let discarded = server
        .ok(
            "POST",
            "/api/v1/dead-letters/discard",
            &application.privileged(),
            Some(json!({"deliveryIds": [id_of("two")]})),
        )
        .await;
    assert_eq!(int(&discarded["affected"]), 1, "{discarded}");
    assert!(dead_letters(&server, &application, &subscription_id).await.is_empty());
    let again = server
        .ok(
            "POST",
            "/api/v1/dead-letters/discard",
            &application.privileged(),
            Some(json!({"deliveryIds": [id_of("two")]})),
        )
        .await;
    assert_eq!(int(&again["affected"]), 0, "{again}");
    assert!(receiver.accepted().iter().all(|hit| hit.text() != "two"), "a discarded dead letter is never sent");
}

#[tokio::test]
async fn replay_re_delivers_stored_events() {
    let receiver = Receiver::start(200).await;
    let server = start(10).await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let conversation_id = group(&server, &application, "Team", &[&alice_id]).await;
    let (subscription_id, _) =
        subscribe(&server, &application, &receiver.url("/hook"), &["message.created"], &[]).await;
    let mut seqs = Vec::new();
    for index in 0..5 {
        seqs.push(int(&send(&server, &alice, &conversation_id, &format!("message {index}")).await["seq"]));
    }
    let live = eventually("the live events", async || {
        let accepted = receiver.accepted();
        (accepted.len() >= 5).then_some(accepted)
    })
    .await;
    let replay_path = format!("/api/v1/event-subscriptions/{subscription_id}/replay");

    // From a seq: the events after it, again, in order, as new deliveries.
    let replayed = server
        .ok(
            "POST",
            &replay_path,
            &application.privileged(),
            Some(json!({"conversationId": conversation_id, "afterSeq": seqs[1].to_string()})),
        )
        .await;
    assert_eq!(int(&replayed["enqueued"]), 3, "{replayed}");
    let accepted = eventually("the replayed events", async || {
        let accepted = receiver.accepted();
        (accepted.len() >= 8).then_some(accepted)
    })
    .await;
    let again = &accepted[5..];
    assert_eq!(again.iter().map(Hit::text).collect::<Vec<_>>(), ["message 2", "message 3", "message 4"]);
    assert_eq!(again.iter().map(Hit::seq).collect::<Vec<_>>(), &seqs[2..]);
    for (hit, original) in again.iter().zip(&live[2..]) {
        assert_ne!(hit.delivery_id(), original.delivery_id(), "a replay makes new deliveries");
        assert_eq!(hit.event(), original.event(), "the same event");
    }

    // Since a time: every conversation's events, through the subscription's filter.
    let replayed = server
        .ok("POST", &replay_path, &application.privileged(), Some(json!({"since": "2000-01-01T00:00:00Z"})))
        .await;
    assert_eq!(int(&replayed["enqueued"]), 5, "message.created only: {replayed}");
    eventually("the second replay", async || (receiver.accepted().len() >= 13).then_some(())).await;

    // Neither a conversation nor a time: refused.
    server.fails("POST", &replay_path, &application.privileged(), Some(json!({})), "invalid_value").await;
    assert_eq!(live.iter().map(Hit::seq).collect::<Vec<_>>(), seqs);
}

#[tokio::test]
async fn the_filter_on_event_kinds_and_conversations_is_honoured() {
    let receiver = Receiver::start(200).await;
    let server = start(10).await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let first = group(&server, &application, "First", &[&alice_id]).await;
    let second = group(&server, &application, "Second", &[&alice_id]).await;
    subscribe(&server, &application, &receiver.url("/edits"), &["message.edited"], &[]).await;
    subscribe(&server, &application, &receiver.url("/second"), &[], &[&second]).await;
    subscribe(&server, &application, &receiver.url("/both"), &["message.created", "message.edited"], &[&second]).await;

    let in_first = send(&server, &alice, &first, "first 1").await;
    send(&server, &alice, &second, "second 1").await;
    server
        .ok(
            "PATCH",
            &format!("/api/v1/messages/{}", in_first["id"].as_str().unwrap()),
            &alice,
            Some(json!({"text": "first 1 edited"})),
        )
        .await;
    send(&server, &alice, &first, "first 2").await;
    // The fence: the last event, wanted by all three subscriptions.
    let fence = send(&server, &alice, &second, "second 2").await;
    server
        .ok(
            "PATCH",
            &format!("/api/v1/messages/{}", fence["id"].as_str().unwrap()),
            &alice,
            Some(json!({"text": "fence"})),
        )
        .await;

    eventually("the fence on every subscription", async || {
        let fenced = |path: &str| receiver.accepted_on(path).iter().any(|hit| hit.text() == "fence");
        (fenced("/edits") && fenced("/second") && fenced("/both")).then_some(())
    })
    .await;
    // Anything wrongly queued would have been queued before the fence; give its POST a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Message events only: whether `conversation.created` of a conversation created just before a
    // subscription reaches it depends on when the relay picked the event up.
    let summary = |path: &str| {
        receiver
            .accepted_on(path)
            .iter()
            .filter(|hit| hit.kind().starts_with("message."))
            .map(|hit| format!("{} {}", hit.kind(), hit.text()))
            .collect::<Vec<_>>()
    };
    let mut edits = summary("/edits");
    edits.sort_unstable();
    assert_eq!(edits, ["message.edited fence", "message.edited first 1 edited"]);
    assert_eq!(
        summary("/second"),
        ["message.created second 1", "message.created second 2", "message.edited fence"],
        "every kind, of the second conversation only"
    );
    assert_eq!(summary("/both"), ["message.created second 1", "message.created second 2", "message.edited fence"]);
    assert!(receiver.accepted_on("/second").iter().all(|hit| hit.conversation_id() == second));
}

#[tokio::test]
async fn an_application_never_receives_another_applications_events() {
    let receiver = Receiver::start(200).await;
    let server = start(10).await;
    let a = server.register("a@example.com", "Application A").await;
    let b = server.register("b@example.com", "Application B").await;
    let (a_user, a_auth) = user(&server, &a, "a1", "Alice").await;
    let (b_user, b_auth) = user(&server, &b, "b1", "Boris").await;
    let a_conversation = group(&server, &a, "A team", &[&a_user]).await;
    let b_conversation = group(&server, &b, "B team", &[&b_user]).await;
    let (a_subscription, _) = subscribe(&server, &a, &receiver.url("/a"), &[], &[]).await;
    subscribe(&server, &b, &receiver.url("/b"), &[], &[]).await;
    // Even naming A's conversation does not let B's subscription see it.
    subscribe(&server, &b, &receiver.url("/b-spy"), &[], &[&a_conversation]).await;

    for index in 0..3 {
        send(&server, &a_auth, &a_conversation, &format!("secret of A {index}")).await;
    }
    send(&server, &b_auth, &b_conversation, "B's own").await;
    send(&server, &a_auth, &a_conversation, "A's fence").await;

    eventually("both applications' events", async || {
        let a_done = receiver.accepted_on("/a").iter().any(|hit| hit.text() == "A's fence");
        let b_done = receiver.accepted_on("/b").iter().any(|hit| hit.text() == "B's own");
        (a_done && b_done).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let a_hits = receiver.accepted_on("/a");
    assert_eq!(a_hits.iter().filter(|hit| hit.kind() == "message.created").count(), 4);
    assert!(
        a_hits.iter().all(|hit| hit.json["applicationId"] == a.id.as_str() && hit.conversation_id() == a_conversation)
    );
    let b_hits = receiver.accepted_on("/b");
    assert!(!b_hits.is_empty());
    for hit in &b_hits {
        assert_eq!(hit.json["applicationId"], b.id.as_str(), "{}", hit.json);
        assert_eq!(hit.conversation_id(), b_conversation, "{}", hit.json);
        assert!(!hit.text().contains("A"), "{}", hit.json);
    }
    assert!(receiver.accepted_on("/b-spy").is_empty(), "{:?}", receiver.accepted_on("/b-spy"));
    assert!(receiver.hits().iter().all(|hit| hit.path != "/b-spy"));

    // B cannot read, replay or delete A's subscription.
    let a_path = format!("/api/v1/event-subscriptions/{a_subscription}");
    server.fails("GET", &a_path, &b.privileged(), None, "subscription_not_found").await;
    server
        .fails(
            "POST",
            &format!("{a_path}/replay"),
            &b.privileged(),
            Some(json!({"since": "2000-01-01T00:00:00Z"})),
            "subscription_not_found",
        )
        .await;
    server.fails("DELETE", &a_path, &b.privileged(), None, "subscription_not_found").await;
    let listed = server.ok("GET", "/api/v1/event-subscriptions", &b.privileged(), None).await;
    assert_eq!(listed["subscriptions"].as_array().unwrap().len(), 2, "{listed}");
    // Nor retry or discard A's deliveries by id.
    let a_delivery = a_hits[0].delivery_id();
    let retried = server
        .ok("POST", "/api/v1/dead-letters/retry", &b.privileged(), Some(json!({"deliveryIds": [a_delivery]})))
        .await;
    assert_eq!(int(&retried["affected"]), 0);
    // Subscriptions need privileged mode.
    let (status, _) = server.call("GET", "/api/v1/event-subscriptions", &a_auth, None).await;
    assert_ne!(status, 200);
}

#[tokio::test]
async fn by_default_the_server_refuses_to_post_into_private_networks() {
    let server = TestServer::start_configured(tempfile::tempdir().unwrap(), None, |config| {
        config.bots.outbound_allow_private_addresses = false;
    })
    .await;
    let application = server.register("owner@example.com", "Shop").await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/hook",
        "http://[::1]/hook",
        "http://localhost:8080/hook",
    ] {
        let error = server
            .fails(
                "POST",
                "/api/v1/event-subscriptions",
                &application.privileged(),
                Some(json!({"subscription": {"url": url}})),
                "invalid_value",
            )
            .await;
        assert_eq!(error["field"], "subscription.url", "{url}: {error}");
        assert!(error["message"].as_str().unwrap().contains("bots.outbound_allow_private_addresses"), "{error}");
    }
    let subscriptions = server.ok("GET", "/api/v1/event-subscriptions", &application.privileged(), None).await;
    assert!(subscriptions["subscriptions"].as_array().is_none_or(|list| list.is_empty()), "{subscriptions}");
}
