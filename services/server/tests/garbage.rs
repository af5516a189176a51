//! Bad input never panics the server or corrupts anything: malformed HTTP
//! bodies, headers, methods and routes get typed 4xx JSON errors, and
//! garbage WebSocket frames get error frames while the connection (and
//! every other connection) keeps working.

mod common;

use base64::Engine;
use beseda_proto::v1::{self as wire, client_frame, server_frame};
use common::*;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// An HTTP answer as it came off the wire.
struct Answer {
    status: u16,
    error_code_header: Option<String>,
    text: String,
}

/// Sends exactly these bytes and headers, bypassing every JSON helper.
async fn send_raw(
    server: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, Vec<u8>)],
    body: Option<Vec<u8>>,
) -> Answer {
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client.request(method, format!("{}{path}", server.base_url));
    for (name, value) in headers {
        request = request.header(*name, reqwest::header::HeaderValue::from_bytes(value).expect("a header value"));
    }
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body);
    }
    let response = request.send().await.expect("http request");
    let status = response.status().as_u16();
    let error_code_header =
        response.headers().get("x-beseda-error-code").and_then(|value| value.to_str().ok()).map(str::to_owned);
    let text = response.text().await.unwrap_or_default();
    Answer { status, error_code_header, text }
}

/// Asserts a 4xx answer with a JSON error body that has a code and a
/// message (and the code repeated in the header); returns the code.
fn typed_error(answer: &Answer, what: &str) -> String {
    assert!((400..500).contains(&answer.status), "{what}: status {} ({})", answer.status, answer.text);
    let body: Value = serde_json::from_str(&answer.text)
        .unwrap_or_else(|_| panic!("{what}: the {} answer is not JSON: {:?}", answer.status, answer.text));
    let code = body["error"]["code"].as_str().unwrap_or_else(|| panic!("{what}: no error code in {body}")).to_owned();
    assert!(!code.is_empty(), "{what}: {body}");
    assert!(!body["error"]["message"].as_str().unwrap_or_default().is_empty(), "{what}: no message in {body}");
    assert_eq!(answer.error_code_header.as_deref(), Some(code.as_str()), "{what}: X-Beseda-Error-Code");
    code
}

fn basic_header(application: &Application) -> (&'static str, Vec<u8>) {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", application.id, application.key));
    ("authorization", format!("Basic {encoded}").into_bytes())
}

async fn assert_healthy(server: &TestServer) {
    let (status, health) = server.call("GET", "/rs/health", &Auth::None, None).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
}

/// An application with one user in one conversation, for routes that need ids.
struct Fixture {
    application: Application,
    alice_id: String,
    conversation_id: String,
    message_id: String,
}

async fn fixture(server: &TestServer) -> Fixture {
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(server, &application, "alice-1", "Alice").await;
    let conversation_id = group(server, &application, "Team", &[&alice_id]).await;
    let sent = server
        .ok(
            "POST",
            &format!("/api/v1/conversations/{conversation_id}/messages"),
            &alice,
            Some(json!({"text": "the only message"})),
        )
        .await;
    Fixture { application, alice_id, conversation_id, message_id: sent["id"].as_str().unwrap().to_owned() }
}

impl Fixture {
    /// What the application sees of its data; must not change under garbage.
    async fn state(&self, server: &TestServer) -> Value {
        let app = self.application.privileged();
        json!({
            "conversations": server.ok("POST", "/api/v1/conversations/search", &app, Some(json!({}))).await,
            "messages": server
                .ok("POST", &format!("/api/v1/conversations/{}/messages/search", self.conversation_id), &app, Some(json!({"includeDeleted": true})))
                .await,
            "users": server.ok("POST", "/api/v1/users/search", &app, Some(json!({"includeBlocked": true}))).await,
        })
    }
}

#[tokio::test]
async fn malformed_json_bodies_get_malformed_request_and_change_nothing() {
    let server = TestServer::start().await;
    let fixture = fixture(&server).await;
    let before = fixture.state(&server).await;
    let auth = [basic_header(&fixture.application)];
    let messages = format!("/api/v1/conversations/{}/messages", fixture.conversation_id);
    let routes: [(&str, &str); 7] = [
        ("POST", "/api/v1/conversations"),
        ("POST", "/api/v1/conversations/search"),
        ("POST", "/api/v1/users/search"),
        ("POST", &messages),
        ("PATCH", &format!("/api/v1/conversations/{}", fixture.conversation_id)),
        ("POST", "/api/v1/registration/request"),
        ("PUT", "/api/v1/registration/data"),
    ];

    // Bodies that are not JSON, or not a JSON object.
    let deep_array = "[".repeat(100_000).into_bytes();
    let deep_object = "{\"a\":".repeat(50_000).into_bytes();
    let not_json: Vec<(&str, Vec<u8>)> = vec![
        ("a lone brace", b"{".to_vec()),
        ("a truncated object", b"{\"conversation\": ".to_vec()),
        ("an array", b"[]".to_vec()),
        ("null", b"null".to_vec()),
        ("a string", b"\"text\"".to_vec()),
        ("a number", b"123".to_vec()),
        ("true", b"true".to_vec()),
        ("binary", vec![0xff, 0xfe, 0x00, 0x01, 0x80]),
        ("invalid UTF-8 in a string", b"{\"text\": \"\xff\xfe\xfd\"}".to_vec()),
        ("a lone surrogate escape", b"{\"text\": \"\\ud800\"}".to_vec()),
        ("a byte-order mark", b"\xef\xbb\xbf{}".to_vec()),
        ("two objects", b"{} {}".to_vec()),
        ("a trailing comma", b"{\"count\": 1,}".to_vec()),
        ("single quotes", b"{'count': 1}".to_vec()),
        ("a comment", b"{/* hi */}".to_vec()),
        ("NaN", b"{\"count\": NaN}".to_vec()),
        ("nesting 100,000 arrays deep", deep_array),
        ("nesting 50,000 objects deep", deep_object),
        ("form encoding", b"count=1&after=x".to_vec()),
        ("XML", b"<request><count>1</count></request>".to_vec()),
    ];
    for (method, path) in routes {
        for (what, body) in &not_json {
            let answer = send_raw(&server, method, path, &auth, Some(body.clone())).await;
            let code = typed_error(&answer, &format!("{method} {path} with {what}"));
            assert_eq!(code, "malformed_request", "{method} {path} with {what}: {}", answer.text);
            assert_eq!(answer.status, 400);
        }
    }

    // Well-formed JSON with the wrong types, or with fields the message does not have.
    let user_path = format!("/api/v1/users/{}", fixture.alice_id);
    let message_path = format!("/api/v1/messages/{}", fixture.message_id);
    let wrong: Vec<(&str, &str, Value)> = vec![
        ("POST", "/api/v1/conversations", json!({"conversation": "Team"})),
        ("POST", "/api/v1/conversations", json!({"conversation": {"title": 5}})),
        ("POST", "/api/v1/conversations", json!({"conversation": {"title": "x", "group": "yes"}})),
        ("POST", "/api/v1/conversations", json!({"conversation": {"title": "x", "memberIds": "everyone"}})),
        ("POST", "/api/v1/conversations", json!({"conversation": {"title": "x", "memberIds": [1, 2]}})),
        ("POST", "/api/v1/conversations", json!({"conversation": {"title": "x", "context": []}})),
        ("POST", "/api/v1/conversations", json!({"conversation": {"title": "x", "bogus": 1}})),
        ("POST", "/api/v1/conversations", json!({"bogus": true})),
        ("POST", "/api/v1/conversations/search", json!({"count": -1})),
        ("POST", "/api/v1/conversations/search", json!({"count": "many"})),
        ("POST", "/api/v1/conversations/search", json!({"count": 4_294_967_296u64})),
        ("POST", "/api/v1/conversations/search", json!({"count": 1.5})),
        ("POST", "/api/v1/conversations/search", json!({"count": 1e300})),
        ("POST", "/api/v1/conversations/search", json!({"sortDirection": "SIDEWAYS"})),
        ("POST", "/api/v1/conversations/search", json!({"startDate": "yesterday"})),
        ("POST", "/api/v1/conversations/search", json!({"startDate": 12})),
        ("POST", "/api/v1/conversations/search", json!({"ids": "x"})),
        ("POST", "/api/v1/conversations/search", json!({"group": "true-ish"})),
        ("POST", "/api/v1/users/search", json!({"kind": "USER_KIND_DRAGON"})),
        ("POST", "/api/v1/users/search", json!({"includeBlocked": "yes"})),
        ("POST", "/api/v1/users/search", json!({"nameContains": {"$ne": null}})),
        ("POST", &messages, json!({"text": ["a", "b"]})),
        ("POST", &messages, json!({"text": {"$gt": ""}})),
        ("POST", &messages, json!({"text": "x", "Text": "y"})),
        ("POST", &messages, json!({"text": "x", "date": "not a date"})),
        ("POST", &messages, json!({"text": "x", "textFormat": "TEXT_FORMAT_SHOUTING"})),
        ("POST", &messages, json!({"data": {"mimeType": "text/plain", "content": "not base64 at all!"}})),
        ("POST", &messages, json!({"text": "x", "buttons": "none"})),
        (
            "POST",
            "/api/v1/registration/request",
            json!({"email": ["a@example.com"], "applicationName": "x", "applicationUserCount": 1}),
        ),
        (
            "POST",
            "/api/v1/registration/request",
            json!({"email": "a@example.com", "applicationName": "x", "applicationUserCount": -5}),
        ),
        ("PUT", "/api/v1/registration/data", json!({"data": "everything"})),
        ("PUT", "/api/v1/subscriber/administrators", json!({"userIds": "all"})),
        ("PATCH", &user_path, json!({"updateMask": "name", "user": {"name": "x"}})),
        ("PATCH", &user_path, json!({"updateMask": ["name"], "user": {"name": "x", "admin": true}})),
        ("PATCH", &message_path, json!({"text": 42})),
    ];
    for (method, path, body) in &wrong {
        let answer = send_raw(&server, method, path, &auth, Some(body.to_string().into_bytes())).await;
        let code = typed_error(&answer, &format!("{method} {path} with {body}"));
        assert_eq!(code, "malformed_request", "{method} {path} with {body}: {}", answer.text);
    }

    // A duplicate field, an out-of-range enum number: refused one way or another, never a 500.
    for (path, body) in [
        (messages.as_str(), r#"{"text": "a", "text": "b"}"#),
        (messages.as_str(), r#"{"text": "x", "textFormat": 99}"#),
        ("/api/v1/conversations/search", r#"{"sortDirection": 77}"#),
        ("/api/v1/users/search", r#"{"kind": -3}"#),
    ] {
        let answer = send_raw(&server, "POST", path, &auth, Some(body.as_bytes().to_vec())).await;
        typed_error(&answer, &format!("POST {path} with {body}"));
    }

    assert_healthy(&server).await;
    assert_eq!(fixture.state(&server).await, before, "garbage changed the application's data");
}

#[tokio::test]
async fn empty_and_huge_bodies_get_typed_errors() {
    let server = TestServer::start().await;
    let fixture = fixture(&server).await;
    let auth = [basic_header(&fixture.application)];
    let conversation = &fixture.conversation_id;
    let message = &fixture.message_id;
    let alice = &fixture.alice_id;

    // Every route that takes a body, called with none at all and with an empty one:
    // each answers (an empty body is the empty message) or refuses with a typed error.
    let with_bodies = [
        ("POST", "/api/v1/registration/request".to_owned()),
        ("POST", "/api/v1/registration/complete".to_owned()),
        ("PUT", "/api/v1/registration/data".to_owned()),
        ("POST", "/api/v1/subscriber/temporary-code".to_owned()),
        ("POST", "/api/v1/subscriber/administration-key".to_owned()),
        ("PUT", "/api/v1/subscriber/administrators".to_owned()),
        ("POST", "/api/v1/subscriber/email".to_owned()),
        ("POST", "/api/v1/users".to_owned()),
        ("PATCH", format!("/api/v1/users/{alice}")),
        ("POST", "/api/v1/users/search".to_owned()),
        ("POST", "/api/v1/conversations".to_owned()),
        ("POST", "/api/v1/conversations/by-context".to_owned()),
        ("PATCH", format!("/api/v1/conversations/{conversation}")),
        ("POST", "/api/v1/conversations/search".to_owned()),
        ("PUT", format!("/api/v1/conversations/{conversation}/access")),
        ("POST", format!("/api/v1/conversations/{conversation}/messages")),
        ("POST", format!("/api/v1/conversations/{conversation}/messages/search")),
        ("PATCH", format!("/api/v1/messages/{message}")),
        ("PUT", format!("/api/v1/conversations/{conversation}/watch")),
        ("PUT", "/api/v1/do-not-disturb".to_owned()),
    ];
    // PUT /registration/data with an empty body disconnects the caller: exercised without credentials here.
    for (method, path) in &with_bodies {
        for body in [None, Some(Vec::new()), Some(b"  \r\n ".to_vec())] {
            let credentials: &[(&str, Vec<u8>)] = if path == "/api/v1/registration/data" { &[] } else { &auth };
            let answer = send_raw(&server, method, path, credentials, body.clone()).await;
            let what = format!("{method} {path} with body {body:?}");
            assert!(answer.status < 500, "{what}: {} {}", answer.status, answer.text);
            if answer.status != 200 {
                typed_error(&answer, &what);
            }
        }
    }
    // The ones where "nothing" cannot mean anything say what is missing.
    let as_alice = [auth[0].clone(), ("x-beseda-act-as-user", fixture.alice_id.clone().into_bytes())];
    for (path, credentials, code) in [
        ("/api/v1/conversations".to_owned(), &auth[..], "field_required"),
        (format!("/api/v1/conversations/{conversation}/messages"), &as_alice[..], "message_empty"),
        // Privileged mode without a user must say who writes.
        (format!("/api/v1/conversations/{conversation}/messages"), &auth[..], "field_required"),
        ("/api/v1/registration/request".to_owned(), &auth[..], "application_has_no_users"),
        ("/api/v1/conversations/by-context".to_owned(), &auth[..], "field_required"),
        ("/api/v1/users".to_owned(), &auth[..], "field_required"),
        ("/api/v1/subscriber/temporary-code".to_owned(), &auth[..], "field_required"),
    ] {
        let answer = send_raw(&server, "POST", &path, credentials, Some(Vec::new())).await;
        assert_eq!(typed_error(&answer, &format!("POST {path} with an empty body")), code, "{}", answer.text);
    }
    server.ok("GET", "/api/v1/application", &fixture.application.privileged(), None).await;

    // From here on nothing may change.
    let before = fixture.state(&server).await;

    // Big bodies the API still reads (under its 1 MiB limit) are refused by the product's limits.
    let messages = format!("/api/v1/conversations/{conversation}/messages");
    let big_text = json!({"text": "x".repeat(900_000)}).to_string().into_bytes();
    let answer = send_raw(&server, "POST", &messages, &as_alice, Some(big_text)).await;
    assert_eq!(typed_error(&answer, "900 KB of text"), "text_too_long", "{}", answer.text);
    let many_members: Vec<String> = (0..100_000).map(|index| format!("u{index}")).collect();
    let big_list =
        json!({"conversation": {"title": "All", "group": true, "memberIds": many_members}}).to_string().into_bytes();
    assert!(big_list.len() > 800_000 && big_list.len() < 1_000_000, "{}", big_list.len());
    let answer = send_raw(&server, "POST", "/api/v1/conversations", &auth, Some(big_list)).await;
    assert_eq!(typed_error(&answer, "100,000 members"), "too_many_members", "{}", answer.text);
    let big_data = json!({"data": {"mimeType": "application/octet-stream", "content": base64::engine::general_purpose::STANDARD.encode(vec![7u8; 700_000])}});
    let answer = send_raw(&server, "POST", &messages, &as_alice, Some(big_data.to_string().into_bytes())).await;
    assert_eq!(typed_error(&answer, "700 KB of data"), "data_too_large", "{}", answer.text);
    let noise: Vec<u8> = (0..1_000_000u32).map(|index| (index.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let answer = send_raw(&server, "POST", &messages, &as_alice, Some(noise)).await;
    assert_eq!(typed_error(&answer, "1 MB of noise"), "malformed_request", "{}", answer.text);

    // Huge bodies (2 MB and more), JSON or noise: still a typed JSON error, not a bare status.
    for size in [2_000_000, 2 * 1024 * 1024 + 1, 3_000_000, 8_000_000] {
        let body = json!({"text": "y".repeat(size)}).to_string().into_bytes();
        let answer = send_raw(&server, "POST", &messages, &as_alice, Some(body)).await;
        typed_error(&answer, &format!("a JSON body of {size} bytes"));
    }
    let noise: Vec<u8> = (0..2_000_000u32).map(|index| (index.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let answer = send_raw(&server, "POST", &messages, &as_alice, Some(noise)).await;
    typed_error(&answer, "2 MB of noise");
    let members: Vec<String> = (0..200_000).map(|index| format!("member-{index}")).collect();
    let body = json!({"conversation": {"title": "All", "group": true, "memberIds": members}}).to_string().into_bytes();
    let answer = send_raw(&server, "POST", "/api/v1/conversations", &auth, Some(body)).await;
    typed_error(&answer, "200,000 members in 2.8 MB");

    assert_healthy(&server).await;
    assert_eq!(fixture.state(&server).await, before, "huge bodies changed the application's data");
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_typed_json_errors() {
    let server = TestServer::start().await;
    let fixture = fixture(&server).await;
    let auth = [basic_header(&fixture.application)];

    for (method, path) in [
        ("GET", "/api/v1/nope"),
        ("POST", "/api/v2/conversations"),
        ("GET", "/api/v1/conversations/a/b/c"),
        ("GET", "/api/v1/"),
        ("GET", "/api"),
        ("GET", "/nope"),
        ("DELETE", "/api/v1/unknown/thing"),
        ("GET", "/api/v1/users/x/y"),
        ("GET", "/api/v1//conversations"),
        ("GET", "/api/v1/conversations/%2e%2e/%2e%2e/%2e%2e/etc/passwd"),
        ("POST", "/api/v1/registration/request/extra"),
    ] {
        for credentials in [&auth[..], &[]] {
            let answer = send_raw(&server, method, path, credentials, None).await;
            assert_eq!(typed_error(&answer, &format!("{method} {path}")), "route_not_found", "{}", answer.text);
            assert_eq!(answer.status, 404);
        }
    }

    let conversation = &fixture.conversation_id;
    for (method, path) in [
        ("DELETE", "/api/v1/conversations".to_owned()),
        ("GET", "/api/v1/conversations".to_owned()),
        ("PUT", "/api/v1/server".to_owned()),
        ("POST", "/api/v1/server".to_owned()),
        ("PATCH", "/api/v1/registration/request".to_owned()),
        ("GET", "/api/v1/registration/complete".to_owned()),
        ("POST", format!("/api/v1/users/{}", fixture.alice_id)),
        ("GET", "/api/v1/conversations/search".to_owned()),
        ("PUT", format!("/api/v1/messages/{}", fixture.message_id)),
        ("DELETE", format!("/api/v1/conversations/{conversation}")),
        ("GET", format!("/api/v1/conversations/{conversation}/leave")),
        ("OPTIONS", "/api/v1/conversations".to_owned()),
        ("TRACE", "/api/v1/application".to_owned()),
        ("BREW", "/api/v1/application".to_owned()),
    ] {
        let answer = send_raw(&server, method, &path, &auth, Some(b"{}".to_vec())).await;
        typed_error(&answer, &format!("{method} {path}"));
    }
    // The routes themselves still work.
    server.ok("GET", &format!("/api/v1/conversations/{conversation}"), &fixture.application.privileged(), None).await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn bad_authorization_headers_get_typed_401s() {
    let server = TestServer::start().await;
    let fixture = fixture(&server).await;
    let application = &fixture.application;
    let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("Digest", br#"Digest username="admin", realm="beseda", nonce="x""#.to_vec(), "unauthenticated"),
        ("Basic, not base64", b"Basic !!!not-base64!!!".to_vec(), "unauthenticated"),
        ("Basic without a colon", format!("Basic {}", encode(b"no-colon")).into_bytes(), "unauthenticated"),
        (
            "Basic of invalid UTF-8",
            format!("Basic {}", encode(&[0xff, 0xfe, b':', 0x80])).into_bytes(),
            "unauthenticated",
        ),
        ("Basic with nothing", b"Basic".to_vec(), "unauthenticated"),
        (
            "Basic of an unknown application",
            format!("Basic {}", encode(b"who:knows")).into_bytes(),
            "application_not_registered",
        ),
        (
            "Basic with the wrong key",
            format!("Basic {}", encode(format!("{}:{}", application.id, "0".repeat(64)).as_bytes())).into_bytes(),
            "unauthenticated",
        ),
        (
            "Basic with an empty key",
            format!("Basic {}", encode(format!("{}:", application.id).as_bytes())).into_bytes(),
            "unauthenticated",
        ),
        ("Application without a colon", b"Application no-colon".to_vec(), "unauthenticated"),
        ("Bearer garbage", b"Bearer garbage".to_vec(), "token_invalid"),
        ("Bearer with nothing", b"Bearer".to_vec(), "token_invalid"),
        ("Bearer a.b.c", b"Bearer a.b.c".to_vec(), "token_invalid"),
        ("Bearer of JSON", br#"Bearer {"iss": "x"}"#.to_vec(), "token_invalid"),
        ("a 20 KB bearer", format!("Bearer {}", "x".repeat(20_000)).into_bytes(), "token_invalid"),
        (
            "a bearer with a garbage payload",
            format!("Bearer e30.{}.sig", encode(b"\xff\xfe")).into_bytes(),
            "token_invalid",
        ),
        ("an empty header", Vec::new(), "unauthenticated"),
        ("only a scheme-less token", b"eyJhbGciOiJIUzI1NiJ9.e30.x".to_vec(), "unauthenticated"),
        ("an unknown scheme", b"Negotiate YIIB".to_vec(), "unauthenticated"),
        ("bytes that are not ASCII", b"Bearer \xff\xfe\xfd".to_vec(), "unauthenticated"),
    ];
    for (what, header, code) in &cases {
        for path in ["/api/v1/application", "/api/v1/conversation-list", "/api/v1/registration/data"] {
            let answer = send_raw(&server, "GET", path, &[("authorization", header.clone())], None).await;
            assert_eq!(typed_error(&answer, &format!("{what} on {path}")), *code, "{what} on {path}: {}", answer.text);
            assert_eq!(answer.status, 401, "{what} on {path}: {}", answer.text);
        }
    }
    // No credentials at all on a route that needs them.
    let answer = send_raw(&server, "GET", "/api/v1/application", &[], None).await;
    assert_eq!(typed_error(&answer, "no credentials"), "unauthenticated");
    // A garbage user to act as, with good credentials.
    let basic = basic_header(application);
    for act_as in [b"nobody".to_vec(), b"' OR 1=1 --".to_vec(), "x".repeat(5_000).into_bytes()] {
        let answer =
            send_raw(&server, "GET", "/api/v1/application", &[basic.clone(), ("x-beseda-act-as-user", act_as)], None)
                .await;
        assert_eq!(typed_error(&answer, "a garbage act-as user"), "user_not_found", "{}", answer.text);
    }
    // The scheme is case-insensitive, and public routes ignore credentials.
    let token = application.token("alice-1", "Alice");
    let answer = send_raw(
        &server,
        "GET",
        "/api/v1/application",
        &[("authorization", format!("bEaReR {token}").into_bytes())],
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let answer =
        send_raw(&server, "GET", "/api/v1/server", &[("authorization", b"Digest nonsense".to_vec())], None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    assert_healthy(&server).await;
}

// ---- WebSocket -----------------------------------------------------------

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the server did next on a raw socket.
// One value per frame read in a test; matching on the frame directly matters more than its size.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Next {
    Json(Value),
    Binary(wire::ServerFrame),
    Closed,
    Silent,
}

async fn open(server: &TestServer) -> Socket {
    tokio_tungstenite::connect_async(&server.ws_url).await.expect("websocket connect").0
}

async fn next(socket: &mut Socket) -> Next {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return Next::Silent,
            Ok(None | Some(Err(_)) | Some(Ok(WsMessage::Close(_)))) => return Next::Closed,
            Ok(Some(Ok(WsMessage::Text(text)))) => {
                return Next::Json(serde_json::from_str(text.as_str()).expect("the server's text frames are JSON"));
            }
            Ok(Some(Ok(WsMessage::Binary(bytes)))) => {
                return Next::Binary(
                    wire::ServerFrame::decode(bytes.as_ref()).expect("the server's binary frames are ServerFrames"),
                );
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

async fn send(socket: &mut Socket, message: WsMessage) {
    socket.send(message).await.expect("websocket send");
}

async fn send_json(socket: &mut Socket, frame: Value) {
    send(socket, WsMessage::Text(frame.to_string().into())).await;
}

/// The code of a JSON or protobuf error frame.
fn error_code(next: &Next) -> Option<String> {
    match next {
        Next::Json(frame) => frame["error"]["code"].as_str().map(str::to_owned),
        Next::Binary(wire::ServerFrame { body: Some(server_frame::Body::Error(error)), .. }) => {
            Some(error.code.clone())
        }
        _ => None,
    }
}

fn expect_json_error(next: &Next, code: &str, what: &str) -> Value {
    match next {
        Next::Json(frame) => {
            assert_eq!(frame["error"]["code"], code, "{what}: {frame}");
            assert!(!frame["error"]["message"].as_str().unwrap_or_default().is_empty(), "{what}: {frame}");
            frame["error"].clone()
        }
        other => panic!("{what}: expected a JSON {code} error frame, got {other:?}"),
    }
}

/// Connects and says Hello in JSON; panics unless welcomed.
async fn hello(server: &TestServer, token: &str) -> Socket {
    let mut socket = open(server).await;
    send_json(&mut socket, json!({"hello": {"protocolVersion": 1, "token": token}})).await;
    match next(&mut socket).await {
        Next::Json(frame) if frame.get("welcome").is_some() => socket,
        other => panic!("not welcomed: {other:?}"),
    }
}

/// A JSON ping on the socket must get its pong.
async fn assert_pings(socket: &mut Socket, nonce: u64) {
    send_json(socket, json!({"requestId": nonce.to_string(), "ping": {"nonce": nonce.to_string()}})).await;
    match next(socket).await {
        Next::Json(frame) => {
            assert_eq!(frame["pong"]["nonce"], nonce.to_string(), "{frame}");
            assert_eq!(frame["requestId"], nonce.to_string(), "{frame}");
        }
        other => panic!("expected a pong, got {other:?}"),
    }
}

async fn user_token(server: &TestServer) -> (Application, String) {
    let application = server.register("owner@example.com", "Sales").await;
    let token = application.token("alice-1", "Alice");
    (application, token)
}

#[tokio::test]
async fn a_connection_must_start_with_hello() {
    let server = TestServer::start().await;
    let (_, token) = user_token(&server).await;

    for first in [
        json!({"ping": {"nonce": "5"}}),
        json!({"requestId": "1", "subscribe": {"conversation": {"id": "x"}}}),
        json!({"sendMessage": {"conversation": {"id": "x"}, "text": "hi"}}),
        json!({}),
        json!({"requestId": "9"}),
    ] {
        let mut socket = open(&server).await;
        send_json(&mut socket, first.clone()).await;
        expect_json_error(&next(&mut socket).await, "hello_required", &first.to_string());
        assert!(matches!(next(&mut socket).await, Next::Closed), "the connection closes after {first}");
    }
    // A protobuf frame that is not a Hello is refused in protobuf.
    let mut socket = open(&server).await;
    let ping = wire::ClientFrame { request_id: 3, body: Some(client_frame::Body::Ping(wire::Ping { nonce: 3 })) };
    send(&mut socket, WsMessage::Binary(ping.encode_to_vec().into())).await;
    let refused = next(&mut socket).await;
    assert!(matches!(refused, Next::Binary(_)), "{refused:?}");
    assert_eq!(error_code(&refused).as_deref(), Some("hello_required"), "{refused:?}");
    // Garbage first is malformed, and also ends the connection.
    let mut socket = open(&server).await;
    send(&mut socket, WsMessage::Text("hello?".into())).await;
    expect_json_error(&next(&mut socket).await, "malformed_request", "garbage first");
    assert!(matches!(next(&mut socket).await, Next::Closed));
    // A Hello without a token is not authenticated.
    let mut socket = open(&server).await;
    send_json(&mut socket, json!({"hello": {"protocolVersion": 1}})).await;
    let refused = next(&mut socket).await;
    let code = error_code(&refused).unwrap_or_default();
    assert!(["token_invalid", "unauthenticated"].contains(&code.as_str()), "{refused:?}");

    // After all that, a proper Hello is welcomed.
    let mut socket = hello(&server, &token).await;
    assert_pings(&mut socket, 5).await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn unsupported_protocol_versions_are_refused_naming_the_supported_range() {
    let server = TestServer::start().await;
    let (_, token) = user_token(&server).await;

    for version in [0u64, 2, 99, 4_294_967_295] {
        let mut socket = open(&server).await;
        send_json(&mut socket, json!({"hello": {"protocolVersion": version, "token": token}})).await;
        let error =
            expect_json_error(&next(&mut socket).await, "protocol_version_unsupported", &format!("version {version}"));
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(&format!("version {version}")), "names the client's version: {message}");
        assert!(message.contains("1 to 1"), "names the supported range: {message}");
        assert_eq!(error["field"], "protocolVersion");
        assert!(matches!(next(&mut socket).await, Next::Closed), "version {version}: the connection closes");
    }
    // A version that is not a uint32 at all does not parse.
    for version in [json!(-1), json!("one"), json!(1.5), json!(4_294_967_296u64)] {
        let mut socket = open(&server).await;
        send_json(&mut socket, json!({"hello": {"protocolVersion": version, "token": token}})).await;
        expect_json_error(&next(&mut socket).await, "malformed_request", &format!("version {version}"));
    }
    // In protobuf the refusal is protobuf.
    let mut socket = open(&server).await;
    let hello_zero = wire::ClientFrame {
        request_id: 1,
        body: Some(client_frame::Body::Hello(wire::Hello {
            protocol_version: 0,
            token: token.clone(),
            client_name: String::new(),
        })),
    };
    send(&mut socket, WsMessage::Binary(hello_zero.encode_to_vec().into())).await;
    match next(&mut socket).await {
        Next::Binary(wire::ServerFrame { body: Some(server_frame::Body::Error(error)), .. }) => {
            assert_eq!(error.code, "protocol_version_unsupported");
            assert!(error.message.contains("version 0") && error.message.contains("1 to 1"), "{}", error.message);
        }
        other => panic!("expected a protobuf error frame, got {other:?}"),
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn garbage_frames_after_hello_get_malformed_request_and_the_connection_stays_usable() {
    let server = TestServer::start().await;
    let (_, token) = user_token(&server).await;
    let mut socket = hello(&server, &token).await;

    let texts = [
        "",
        " ",
        "{",
        "}",
        "not json at all",
        "[1,2,3]",
        "null",
        "\"ping\"",
        "42",
        r#"{"ping": 5}"#,
        r#"{"ping": {"nonce": "abc"}}"#,
        r#"{"ping": {"nonce": -1}}"#,
        r#"{"requestId": "x", "ping": {}}"#,
        r#"{"requestId": -1, "ping": {}}"#,
        r#"{"unknownRequest": {}}"#,
        r#"{"ping": {}, "subscribe": {}}"#,
        r#"{"ping": {"nonce": "1", "extra": true}}"#,
        r#"{"hello": {"protocolVersion": 1, "token": "again"}}"#,
        r#"{"sendMessage": {"conversation": {"id": 7}, "text": "hi"}}"#,
        "{\"ping\": {\"nonce\": \"1\"}}\u{0}",
        "\u{feff}{}",
    ];
    for text in texts {
        send(&mut socket, WsMessage::Text(text.into())).await;
        expect_json_error(&next(&mut socket).await, "malformed_request", &format!("text frame {text:?}"));
    }
    assert_pings(&mut socket, 5).await;

    let binaries: [&[u8]; 8] = [
        &[0xff, 0xff, 0xff, 0xff, 0x0f],
        &[0x0a, 0x80],
        &[0x07],
        &[0x08],
        &[0x52, 0x05, 0x01, 0x02],
        &[0x72, 0x02, 0x08],
        &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        b"{\"ping\": {\"nonce\": \"5\"}}",
    ];
    for bytes in binaries {
        send(&mut socket, WsMessage::Binary(bytes.to_vec().into())).await;
        let answer = next(&mut socket).await;
        assert!(matches!(answer, Next::Binary(_)), "binary frames are answered in protobuf: {answer:?}");
        assert_eq!(error_code(&answer).as_deref(), Some("malformed_request"), "binary frame {bytes:?}: {answer:?}");
    }
    // A frame that parses but asks for nothing names the missing field, with its request id.
    send_json(&mut socket, json!({"requestId": "7"})).await;
    let error = expect_json_error(&next(&mut socket).await, "field_required", "a frame without a body");
    assert_eq!(error["field"], "body");
    // Control frames are not requests.
    send(&mut socket, WsMessage::Ping(b"are you there".to_vec().into())).await;
    assert_pings(&mut socket, 6).await;
    // Requests with garbage in the right shape get the request's own error.
    send_json(&mut socket, json!({"requestId": "8", "subscribe": {"conversation": {"id": "' OR 1=1 --"}}})).await;
    match next(&mut socket).await {
        Next::Json(frame) => {
            assert_eq!(frame["requestId"], "8", "{frame}");
            assert_eq!(frame["error"]["code"], "conversation_not_found", "{frame}");
        }
        other => panic!("{other:?}"),
    }
    assert_pings(&mut socket, 9).await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn a_frame_over_128_kb_closes_only_its_own_connection() {
    let server = TestServer::start().await;
    let (_, token) = user_token(&server).await;
    let mut big_sender = hello(&server, &token).await;
    let mut bystander = hello(&server, &token).await;

    // Just under the limit: an ordinary malformed frame.
    send(&mut big_sender, WsMessage::Text("x".repeat(120 * 1024).into())).await;
    expect_json_error(&next(&mut big_sender).await, "malformed_request", "a 120 KB garbage frame");
    let ping = json!({"requestId": "1", "ping": {"nonce": "1"}, "padding": "y".repeat(120 * 1024)});
    send_json(&mut big_sender, ping).await;
    expect_json_error(&next(&mut big_sender).await, "malformed_request", "a 120 KB frame with an unknown field");
    assert_pings(&mut big_sender, 2).await;

    // Over the limit: the connection is closed, without the server waiting for more.
    let _ = big_sender.send(WsMessage::Text("z".repeat(200 * 1024).into())).await;
    loop {
        match next(&mut big_sender).await {
            Next::Closed => break,
            Next::Silent => panic!("a 200 KB frame left the connection open"),
            frame => assert!(error_code(&frame).is_some(), "only an error may precede the close: {frame:?}"),
        }
    }
    // The same in binary, on another connection.
    let mut binary_sender = hello(&server, &token).await;
    let _ = binary_sender.send(WsMessage::Binary(vec![0u8; 129 * 1024].into())).await;
    loop {
        match next(&mut binary_sender).await {
            Next::Closed => break,
            Next::Silent => panic!("a 129 KB binary frame left the connection open"),
            frame => assert!(error_code(&frame).is_some(), "only an error may precede the close: {frame:?}"),
        }
    }

    // Everyone else is served as before.
    assert_pings(&mut bystander, 3).await;
    let mut newcomer = hello(&server, &token).await;
    assert_pings(&mut newcomer, 4).await;
    assert_healthy(&server).await;
}

/// xorshift64*: a small deterministic generator, so a failure replays exactly.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn bytes(&mut self, length: usize) -> Vec<u8> {
        (0..length).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test]
async fn hundreds_of_random_frames_get_only_error_frames() {
    let server = TestServer::start().await;
    let (_, token) = user_token(&server).await;
    let mut socket = hello(&server, &token).await;
    let mut random = Random(0x0bad_5eed_dead_beef);
    let alphabet: Vec<char> =
        "{}[]\":,.-0123456789 abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\\/\tюё€😀".chars().collect();
    let words =
        ["\"ping\"", "\"nonce\"", "\"requestId\"", "\"hello\"", "{", "}", ":", "\"1\"", "\"subscribe\"", "null", ","];

    let mut errors = 0;
    let mut answered_requests = 0;
    for round in 0..300 {
        let (message, parses) = match round % 3 {
            // Random bytes as a binary frame.
            0 => {
                let length = 1 + random.below(600) as usize;
                let bytes = random.bytes(length);
                let parses = wire::ClientFrame::decode(bytes.as_slice()).ok();
                (WsMessage::Binary(bytes.into()), parses)
            }
            // Random characters as a text frame.
            1 => {
                let length = 1 + random.below(300) as usize;
                let text: String =
                    (0..length).map(|_| alphabet[random.below(alphabet.len() as u64) as usize]).collect();
                let parses = serde_json::from_str::<wire::ClientFrame>(&text).ok();
                (WsMessage::Text(text.into()), parses)
            }
            // Random JSON-ish fragments, which come closer to parsing.
            _ => {
                let count = 1 + random.below(12) as usize;
                let text: String = (0..count).map(|_| words[random.below(words.len() as u64) as usize]).collect();
                let parses = serde_json::from_str::<wire::ClientFrame>(&text).ok();
                (WsMessage::Text(text.into()), parses)
            }
        };
        let description = format!("round {round}: {message:?}");
        send(&mut socket, message).await;
        let answer = next(&mut socket).await;
        match parses {
            // What does not parse as a ClientFrame gets a malformed_request error frame.
            None => {
                assert_eq!(error_code(&answer).as_deref(), Some("malformed_request"), "{description}: {answer:?}");
                errors += 1;
            }
            // What happens to parse is a request like any other: it gets an answer.
            Some(frame) => {
                assert!(matches!(answer, Next::Json(_) | Next::Binary(_)), "{description}: {answer:?}");
                if frame.body.is_none() {
                    assert_eq!(error_code(&answer).as_deref(), Some("field_required"), "{description}: {answer:?}");
                }
                answered_requests += 1;
            }
        }
    }
    assert!(errors >= 250, "almost all random frames are garbage ({errors} errors, {answered_requests} parsed)");

    // The connection is still fine, and so is the server.
    assert_pings(&mut socket, 300).await;
    let mut other = hello(&server, &token).await;
    assert_pings(&mut other, 301).await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn a_protobuf_hello_is_welcomed_and_answered_in_protobuf() {
    let server = TestServer::start().await;
    let (application, token) = user_token(&server).await;
    let mut socket = open(&server).await;
    let hello = wire::ClientFrame {
        request_id: 1,
        body: Some(client_frame::Body::Hello(wire::Hello {
            protocol_version: 1,
            token: token.clone(),
            client_name: "garbage suite".into(),
        })),
    };
    send(&mut socket, WsMessage::Binary(hello.encode_to_vec().into())).await;
    let welcome = match next(&mut socket).await {
        Next::Binary(wire::ServerFrame { body: Some(server_frame::Body::Welcome(welcome)), .. }) => welcome,
        other => panic!("expected a protobuf Welcome, got {other:?}"),
    };
    assert_eq!(welcome.protocol_version, 1);
    assert!(!welcome.server_version.is_empty() && !welcome.session_id.is_empty(), "{welcome:?}");
    let user = welcome.user.expect("the Welcome names the user");
    assert_eq!(user.name, "Alice");
    let found = server
        .ok("POST", "/api/v1/users/search", &application.privileged(), Some(json!({"infobaseUserId": "alice-1"})))
        .await;
    assert_eq!(found["users"][0]["id"], user.id.as_str());

    // A protobuf ping gets a protobuf pong with its request id and nonce.
    let ping = wire::ClientFrame { request_id: 7, body: Some(client_frame::Body::Ping(wire::Ping { nonce: 42 })) };
    send(&mut socket, WsMessage::Binary(ping.encode_to_vec().into())).await;
    match next(&mut socket).await {
        Next::Binary(wire::ServerFrame { request_id: 7, body: Some(server_frame::Body::Pong(pong)) }) => {
            assert_eq!(pong.nonce, 42)
        }
        other => panic!("expected a protobuf pong, got {other:?}"),
    }
    // Garbage in protobuf is answered in protobuf, and the session goes on.
    send(&mut socket, WsMessage::Binary(vec![0x0a, 0xff, 0xff].into())).await;
    let answer = next(&mut socket).await;
    assert!(matches!(answer, Next::Binary(_)), "{answer:?}");
    assert_eq!(error_code(&answer).as_deref(), Some("malformed_request"));
    // A JSON frame on the same connection is answered in JSON.
    assert_pings(&mut socket, 8).await;
    // A request that fails is a protobuf error frame with the request's id.
    let missing = wire::ClientFrame {
        request_id: 9,
        body: Some(client_frame::Body::GetConversation(wire::GetConversationRequest {
            conversation: Some(wire::ConversationRef {
                by: Some(wire::conversation_ref::By::Id("no-such-conversation".into())),
            }),
        })),
    };
    send(&mut socket, WsMessage::Binary(missing.encode_to_vec().into())).await;
    match next(&mut socket).await {
        Next::Binary(wire::ServerFrame { request_id: 9, body: Some(server_frame::Body::Error(error)) }) => {
            assert_eq!(error.code, "conversation_not_found");
        }
        other => panic!("expected a protobuf error for request 9, got {other:?}"),
    }

    // A protobuf Hello with a bad token is refused in protobuf.
    let mut refused = open(&server).await;
    let bad = wire::ClientFrame {
        request_id: 1,
        body: Some(client_frame::Body::Hello(wire::Hello {
            protocol_version: 1,
            token: "garbage".into(),
            client_name: String::new(),
        })),
    };
    send(&mut refused, WsMessage::Binary(bad.encode_to_vec().into())).await;
    let answer = next(&mut refused).await;
    assert!(matches!(answer, Next::Binary(_)), "{answer:?}");
    assert_eq!(error_code(&answer).as_deref(), Some("token_invalid"));
    assert!(matches!(next(&mut refused).await, Next::Closed));
    assert_healthy(&server).await;
}

#[tokio::test]
async fn bad_path_parameters_and_query_strings_get_typed_errors() {
    let server = TestServer::start().await;
    let fixture = fixture(&server).await;
    let auth = [basic_header(&fixture.application)];
    let conversation = &fixture.conversation_id;

    // Path parameters that do not decode to UTF-8 (invalid bytes, overlong forms, surrogates).
    for path in [
        "/api/v1/conversations/%FF%FE".to_owned(),
        "/api/v1/users/%C0%80".to_owned(),
        "/api/v1/messages/%ED%A0%80".to_owned(),
        "/api/v1/conversations/by-key/%80".to_owned(),
        "/api/v1/conversations/%F0%28%8C%BC/messages".to_owned(),
    ] {
        let answer = send_raw(&server, "GET", &path, &auth, None).await;
        let code = typed_error(&answer, &format!("GET {path}"));
        assert!(["malformed_request", "route_not_found"].contains(&code.as_str()), "GET {path}: {}", answer.text);
    }
    // Query parameters of the wrong type or range.
    let events = format!("/api/v1/conversations/{conversation}/events");
    for (query, code) in [
        ("afterSeq=abc", "invalid_value"),
        ("afterSeq=-1", "invalid_value"),
        ("afterSeq=1.5", "invalid_value"),
        ("afterSeq=99999999999999999999999", "invalid_value"),
        ("limit=lots", "invalid_value"),
        ("limit=4294967296", "invalid_value"),
        ("limit=1000001", "count_out_of_range"),
        ("afterSeq=%FF", "invalid_value"),
    ] {
        let answer = send_raw(&server, "GET", &format!("{events}?{query}"), &auth, None).await;
        assert_eq!(typed_error(&answer, query), code, "{query}: {}", answer.text);
    }
    // Garbage in the query string that no parameter reads is ignored; repeated parameters too.
    for query in ["afterSeq=0&afterSeq=0", "x=%ZZ&&&==", "afterSeq", "%00=%00", "limit=&afterSeq="] {
        let answer = send_raw(&server, "GET", &format!("{events}?{query}"), &auth, None).await;
        assert!(answer.status == 200 || answer.status / 100 == 4, "{query}: {} {}", answer.status, answer.text);
        if answer.status != 200 {
            typed_error(&answer, query);
        }
    }
    // A long path parameter (60 KB) is just an id that does not exist.
    let long = "x".repeat(60_000);
    let answer = send_raw(&server, "GET", &format!("/api/v1/conversations/{long}"), &auth, None).await;
    assert_eq!(typed_error(&answer, "a 60 KB id"), "conversation_not_found");
    assert_healthy(&server).await;
}
