//! Gateway behaviour over real sockets: presence, graceful shutdown, and
//! the same session in protobuf binary frames.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn presence_follows_connections_of_watched_users() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (_, _) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, _) = user(&server, &application, "b1", "Bob").await;

    let mut alice = Client::connect(&server, &application.token("a1", "Alice")).await;
    let watched = alice.request(json!({"watchPresence": {"userIds": [bob_id]}})).await;
    assert_eq!(watched["presence"]["users"][0]["userId"], bob_id.as_str(), "{watched}");
    assert!(watched["presence"]["users"][0].get("online").is_none(), "Bob starts offline: {watched}");

    // Bob's first connection brings him online; a second one changes nothing; the last one leaving takes him offline.
    let bob = Client::connect(&server, &application.token("b1", "Bob")).await;
    let online = alice.next_user_event("presence").await;
    assert_eq!(online, json!({"userId": bob_id, "online": true}));
    let second_bob = Client::connect(&server, &application.token("b1", "Bob")).await;
    bob.close().await;
    second_bob.close().await;
    let offline = alice.next_user_event("presence").await;
    assert_eq!(offline, json!({"userId": bob_id}), "offline: the false flag is omitted in canonical JSON");

    // Health reports the registry's connection count.
    let health = server.ok("GET", "/rs/health", &Auth::None, None).await;
    assert_eq!(health["components"]["registry"]["connections"], 1, "{health}");
    assert_eq!(health["mainDbOk"], true);
}

#[tokio::test]
async fn shutdown_tells_connected_clients_to_reconnect_elsewhere() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    user(&server, &application, "a1", "Alice").await;
    let mut alice = Client::connect(&server, &application.token("a1", "Alice")).await;
    let stopping = tokio::spawn(server.stop());
    let reconnect = alice.next_matching(|push| push.get("reconnect").cloned()).await;
    assert!(reconnect["reason"].as_str().unwrap().contains("shutting down"), "{reconnect}");
    stopping.await.unwrap();
}

#[tokio::test]
async fn the_protocol_works_in_protobuf_binary_frames() {
    use beseda_proto::v1::{self as wire, client_frame, server_frame};
    use futures_util::{SinkExt, StreamExt};
    use prost::Message as _;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, _) = user(&server, &application, "a1", "Alice").await;
    let conversation_id = group(&server, &application, "Binary", &[&alice_id]).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(&server.ws_url).await.unwrap();
    let mut send =
        async |frame: wire::ClientFrame| socket.send(WsMessage::Binary(frame.encode_to_vec().into())).await.unwrap();
    send(wire::ClientFrame {
        request_id: 1,
        body: Some(client_frame::Body::Hello(wire::Hello {
            protocol_version: 1,
            token: application.token("a1", "Alice"),
            client_name: "binary test".into(),
        })),
    })
    .await;
    send(wire::ClientFrame {
        request_id: 2,
        body: Some(client_frame::Body::SendMessage(wire::SendMessageRequest {
            conversation: Some(wire::ConversationRef {
                by: Some(wire::conversation_ref::By::Id(conversation_id.clone())),
            }),
            text: "in protobuf".into(),
            ..Default::default()
        })),
    })
    .await;
    let mut frames = Vec::new();
    while frames.len() < 2 {
        match socket.next().await.unwrap().unwrap() {
            WsMessage::Binary(bytes) => frames.push(wire::ServerFrame::decode(bytes.as_ref()).unwrap()),
            WsMessage::Text(text) => panic!("a binary session got a text frame: {text}"),
            _ => {}
        }
    }
    assert!(
        matches!(&frames[0].body, Some(server_frame::Body::Welcome(welcome)) if welcome.user.as_ref().unwrap().id == alice_id)
    );
    assert_eq!(frames[1].request_id, 2);
    match &frames[1].body {
        Some(server_frame::Body::Message(message)) => assert_eq!(message.text, "in protobuf"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn unregistering_closes_the_applications_open_connections() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let other = server.register("other@example.com", "Other").await;
    user(&server, &application, "a1", "Alice").await;
    user(&server, &other, "o1", "Olga").await;
    let mut alice = Client::connect(&server, &application.token("a1", "Alice")).await;
    let mut olga = Client::connect(&server, &other.token("o1", "Olga")).await;
    assert_eq!(alice.welcome["protocolVersion"], 1, "the negotiated version");

    server.ok("DELETE", "/api/v1/registration", &application.privileged(), None).await;
    let closing = alice.next_matching(|push| push.get("error").cloned()).await;
    assert_eq!(closing["code"], "application_not_registered", "{closing}");
    // Another application's connection is untouched.
    let pong = olga.request(json!({"ping": {"nonce": "3"}})).await;
    assert_eq!(pong["pong"]["nonce"], "3", "{pong}");
}

#[tokio::test]
async fn a_token_issued_in_the_future_is_refused() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = json!({"iss": application.id, "aud": "beseda", "sub": "a1", "name": "Alice", "iat": now + 3600, "exp": now + 7200});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(application.key.as_bytes()),
    )
    .unwrap();
    let error = server.fails("GET", "/api/v1/application", &Auth::Bearer(token), None, "token_invalid").await;
    assert!(error["message"].as_str().unwrap().contains("clock"), "{error}");

    // Extreme claim values are refused, never overflowed.
    let claims =
        json!({"iss": application.id, "aud": "beseda", "sub": "a1", "name": "Alice", "iat": i64::MIN, "exp": i64::MAX});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(application.key.as_bytes()),
    )
    .unwrap();
    server.fails("GET", "/api/v1/application", &Auth::Bearer(token), None, "token_invalid").await;
}

/// The metric families of a docs/observability.md section, read from its table.
fn documented_families(section: &str) -> Vec<String> {
    let docs = include_str!("../../../docs/observability.md");
    let start = docs.find(&format!("### {section}\n")).unwrap_or_else(|| panic!("no section {section}"));
    let body = &docs[start + section.len() + 5..];
    let end = body.find("\n### ").or_else(|| body.find("\n## ")).unwrap_or(body.len());
    body[..end]
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .map(|rest| rest.split(['`', '{']).next().unwrap_or_default().to_owned())
        .filter(|name| !name.is_empty())
        .collect()
}

#[tokio::test]
async fn a_fresh_server_exports_every_metric_family_and_tells_no_paths() {
    let server = TestServer::start().await;

    // Phase 1: the first scrape already lists every family of the roles this node runs (gateway,
    // routing, store, bots), as documented, plus the process_* families and beseda_build_info.
    let response = reqwest::get(format!("{}/metrics", server.base_url)).await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await.unwrap();
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    let mut expected: Vec<String> =
        ["Gateway", "Routing", "Store", "Bots"].into_iter().flat_map(documented_families).collect();
    assert!(expected.len() > 20, "the documented tables were read: {expected:?}");
    expected.extend(
        ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_max_fds"]
            .map(str::to_owned),
    );
    expected.push("beseda_build_info".to_owned());
    let missing: Vec<&String> = expected.iter().filter(|name| !exported.contains(name.as_str())).collect();
    assert!(missing.is_empty(), "families missing from a fresh node's /metrics: {missing:?}\n{text}");
    let undocumented: Vec<&&str> = exported
        .iter()
        .filter(|name| name.starts_with("beseda_") && **name != "beseda_build_info")
        .filter(|name| !expected.iter().any(|documented| documented == *name))
        .filter(|name| !["Bus (Redis)", "Registry"].into_iter().flat_map(documented_families).any(|d| d == **name))
        .collect();
    assert!(undocumented.is_empty(), "exported but not in docs/observability.md: {undocumented:?}");
    assert!(
        text.contains(&format!("beseda_build_info{{version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "build info names the version: {text}"
    );
    assert!(text.contains("beseda_api_requests_total{operation=\"SendMessage\"} 0"), "labelled families at zero");

    // Phase 2: health says what backs the store, not where its file is, and reports the real
    // registry (one node here) in the original server's `hazelcast` field.
    let health = server.ok("GET", "/rs/health", &Auth::None, None).await;
    let data_dir = server.data_dir.path().to_string_lossy().into_owned();
    assert!(!health.to_string().contains(&data_dir), "no path in /rs/health: {health}");
    assert_eq!(health["components"]["store"]["backend"], "embedded SQLite", "{health}");
    assert_eq!(health["hazelcast"], json!({"available": true, "members": 1}), "{health}");
    assert_eq!(health["components"]["registry"]["voters"], 1, "{health}");
}
