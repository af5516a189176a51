//! Who may watch whose presence: an external user sees only the users they
//! share a conversation with (§29.3.5), exactly as GetUsers shows them; the
//! others are left out of the answer as if they did not exist. External
//! users cannot get tokens yet (e-mail invitations are not implemented), so
//! the test turns a token user into an external one in the store, as an
//! invitation would have created them.

use std::sync::Arc;
use std::time::Duration;

use beseda_bus::InProcessBus;
use beseda_core::model::{Application, ApplicationState, UserKind, now_micros};
use beseda_registry::LocalRegistry;
use beseda_routing::mail::OutboxMailer;
use beseda_routing::{Caller, RoutingConfig, RoutingService};
use beseda_sessions::{Gateway, GatewayConfig};
use beseda_store::Store;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Harness {
    url: String,
    store: Arc<dyn Store>,
    routing: RoutingService,
    application_id: String,
    _directory: tempfile::TempDir,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

const KEY: &str = "presence-test-key";

async fn start() -> Harness {
    let directory = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(beseda_store::sqlite::SqliteStore::open(&directory.path().join("p.db")).unwrap());
    let subscriber = store.upsert_subscriber("owner@example.com").await.unwrap();
    let application = Application {
        id: beseda_core::model::new_id(),
        subscriber_id: subscriber.id,
        name: "Presence".into(),
        key: Some(KEY.into()),
        state: ApplicationState::Registered,
        created_at: now_micros(),
    };
    store.insert_application(&application).await.unwrap();
    let bus = Arc::new(InProcessBus::new());
    let mailer = Arc::new(OutboxMailer::new(directory.path().join("outbox"), "beseda@localhost").unwrap());
    let routing =
        RoutingService::new(store.clone(), bus.clone(), mailer, RoutingConfig { public_url: "http://test".into() });
    let bots = beseda_bots::BotsService::new(
        store.clone(),
        Arc::new(routing.clone()),
        routing.outbox_signal(),
        beseda_bots::BotsConfig::default(),
    );
    let (shutdown_sender, shutdown) = tokio::sync::watch::channel(false);
    let gateway = Gateway {
        routing: Arc::new(routing.clone()),
        bots: Arc::new(bots.clone()),
        processing: Arc::new(bots),
        bus,
        registry: Arc::new(LocalRegistry::new()),
        config: Arc::new(GatewayConfig::default()),
        user_connections: Default::default(),
        shutdown,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, beseda_sessions::router(gateway)).await });
    Harness { url, store, routing, application_id: application.id, _directory: directory, _shutdown: shutdown_sender }
}

fn token(harness: &Harness, infobase_id: &str, name: &str) -> String {
    let now = now_micros() / 1_000_000;
    let claims = json!({"iss": harness.application_id, "aud": "beseda", "sub": infobase_id, "name": name, "iat": now, "exp": now + 600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(KEY.as_bytes()),
    )
    .unwrap()
}

async fn next_frame(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .unwrap();
        if let WsMessage::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// Connects as the infobase user; returns the socket and the user id.
async fn connect(harness: &Harness, infobase_id: &str, name: &str) -> (Socket, String) {
    let (mut socket, _) = tokio_tungstenite::connect_async(&harness.url).await.unwrap();
    let hello = json!({"hello": {"protocolVersion": 1, "token": token(harness, infobase_id, name)}});
    socket.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
    let welcome = next_frame(&mut socket).await;
    let user_id = welcome["welcome"]["user"]["id"].as_str().unwrap_or_else(|| panic!("{welcome}")).to_owned();
    (socket, user_id)
}

/// Sends one request and returns its answer, skipping pushes.
async fn request(socket: &mut Socket, body: Value) -> Value {
    let mut frame = body;
    frame["requestId"] = json!("7");
    socket.send(WsMessage::Text(frame.to_string().into())).await.unwrap();
    loop {
        let answer = next_frame(socket).await;
        if answer["requestId"] == "7" {
            return answer;
        }
    }
}

fn watched(answer: &Value) -> Vec<(String, bool)> {
    answer["presence"]["users"]
        .as_array()
        .unwrap_or_else(|| panic!("a presence list: {answer}"))
        .iter()
        .map(|user| (user["userId"].as_str().unwrap().to_owned(), user["online"].as_bool().unwrap_or(false)))
        .collect()
}

#[tokio::test]
async fn external_users_watch_only_the_presence_of_users_they_share_a_conversation_with() {
    let harness = start().await;
    let (_alice_socket, alice) = connect(&harness, "a1", "Alice").await;
    let (_bob_socket, bob) = connect(&harness, "b1", "Bob").await;
    // The partner first comes as a regular user, then becomes external.
    let (partner_socket, partner) = connect(&harness, "p1", "Partner").await;
    drop(partner_socket);
    let mut user = harness.store.get_user(&harness.application_id, &partner).await.unwrap().unwrap();
    user.kind = UserKind::External;
    user.infobase_user_id = Some("p1".into());
    user.authentication_email = "partner@example.com".into();
    harness.store.update_user(&harness.application_id, &user).await.unwrap();
    let application = Caller { application_id: harness.application_id.clone(), user_id: None, privileged: true };
    harness
        .routing
        .create_conversation(
            &application,
            beseda_routing::conversations::NewConversation {
                key: None,
                title: "With the partner".into(),
                displayed: true,
                read_only: false,
                group: true,
                context: None,
                member_ids: vec![alice.clone(), partner.clone()],
                all_application_users: false,
                integration_id: None,
            },
        )
        .await
        .unwrap();

    let (mut external, _) = connect(&harness, "p1", "Partner").await;
    let nobody = "0190aaaa-0000-7000-8000-000000000000".to_owned();
    let answer =
        request(&mut external, json!({"watchPresence": {"userIds": [alice.clone(), bob.clone(), nobody.clone()]}}))
            .await;
    // Alice is shared and online; Bob (online, but not shared) and an
    // unknown id are left out alike, so the two cannot be told apart.
    assert_eq!(watched(&answer), [(alice.clone(), true)], "{answer}");
    let users = request(&mut external, json!({"getUsers": {"ids": [alice.clone(), bob.clone()]}})).await;
    let listed: Vec<&str> =
        users["users"]["users"].as_array().unwrap().iter().map(|user| user["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [alice.as_str()], "GetUsers applies the same rule: {users}");

    // A regular user may watch anyone of the application.
    let (mut regular, _) = connect(&harness, "c1", "Carol").await;
    let answer = request(&mut regular, json!({"watchPresence": {"userIds": [bob.clone(), partner.clone()]}})).await;
    assert_eq!(watched(&answer), [(bob, true), (partner, true)], "{answer}");
}
