//! The gateway's delivery guarantee, proved against its own bus: a client
//! gets every conversation event exactly once and in seq order even when the
//! bus delivers out of order, skips events, or drops a lagging subscriber's
//! backlog. Storage is the truth; the bus is only a hint.

use std::sync::Arc;
use std::time::Duration;

use beseda_bus::{Bus, InProcessBus, Topic};
use beseda_core::model::{Application, ApplicationState, now_micros};
use beseda_proto::v1 as wire;
use beseda_registry::LocalRegistry;
use beseda_routing::mail::OutboxMailer;
use beseda_routing::{Caller, RoutingConfig, RoutingService};
use beseda_sessions::{Gateway, GatewayConfig};
use beseda_store::Store;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

struct Harness {
    url: String,
    bus: Arc<InProcessBus>,
    routing: RoutingService,
    application_id: String,
    key: String,
    _directory: tempfile::TempDir,
    /// Dropping the sender would tell every connection to shut down.
    _shutdown: tokio::sync::watch::Sender<bool>,
}

async fn start() -> Harness {
    let directory = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(beseda_store::sqlite::SqliteStore::open(&directory.path().join("b.db")).unwrap());
    let subscriber = store.upsert_subscriber("owner@example.com").await.unwrap();
    let application = Application {
        id: beseda_core::model::new_id(),
        subscriber_id: subscriber.id,
        name: "Resume".into(),
        key: Some("resume-test-key".into()),
        state: ApplicationState::Registered,
        created_at: now_micros(),
    };
    store.insert_application(&application).await.unwrap();
    let bus = Arc::new(InProcessBus::new());
    let mailer = Arc::new(OutboxMailer::new(directory.path().join("outbox"), "beseda@localhost").unwrap());
    let routing =
        RoutingService::new(store.clone(), bus.clone(), mailer, RoutingConfig { public_url: "http://test".into() });
    let bots = beseda_bots::BotsService::new(
        store,
        Arc::new(routing.clone()),
        routing.outbox_signal(),
        beseda_bots::BotsConfig::default(),
    );
    let (shutdown_sender, shutdown) = tokio::sync::watch::channel(false);
    let gateway = Gateway {
        routing: Arc::new(routing.clone()),
        bots: Arc::new(bots.clone()),
        processing: Arc::new(bots),
        bus: bus.clone(),
        registry: Arc::new(LocalRegistry::new()),
        config: Arc::new(GatewayConfig::default()),
        user_connections: Default::default(),
        shutdown,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, beseda_sessions::router(gateway)).await });
    Harness {
        url,
        bus,
        routing,
        application_id: application.id,
        key: "resume-test-key".into(),
        _directory: directory,
        _shutdown: shutdown_sender,
    }
}

fn token(harness: &Harness, infobase_id: &str, name: &str) -> String {
    let now = now_micros() / 1_000_000;
    let claims = json!({"iss": harness.application_id, "aud": "beseda", "sub": infobase_id, "name": name, "iat": now, "exp": now + 600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(harness.key.as_bytes()),
    )
    .unwrap()
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_frame(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame in time")
            .unwrap()
            .unwrap();
        if let WsMessage::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// Connects Alice, creates a conversation and subscribes; returns the socket,
/// the conversation id and Alice's caller.
async fn subscribed(harness: &Harness) -> (Socket, String, Caller) {
    let (mut socket, _) = tokio_tungstenite::connect_async(&harness.url).await.unwrap();
    let hello = json!({"hello": {"protocolVersion": 1, "token": token(harness, "a1", "Alice")}});
    socket.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
    let welcome = next_frame(&mut socket).await;
    let user_id = welcome["welcome"]["user"]["id"].as_str().unwrap().to_owned();
    let caller = Caller { application_id: harness.application_id.clone(), user_id: Some(user_id), privileged: false };
    let conversation = harness
        .routing
        .create_conversation(
            &caller,
            beseda_routing::conversations::NewConversation {
                key: None,
                title: "Resume".into(),
                displayed: true,
                read_only: false,
                group: true,
                context: None,
                member_ids: vec![],
                all_application_users: false,
                integration_id: None,
            },
        )
        .await
        .unwrap();
    let subscribe = json!({"requestId": "1", "subscribe": {"conversation": {"id": conversation.id}}});
    socket.send(WsMessage::Text(subscribe.to_string().into())).await.unwrap();
    loop {
        let frame = next_frame(&mut socket).await;
        if frame.get("subscribed").is_some() {
            break;
        }
    }
    (socket, conversation.id, caller)
}

/// Stores a message without publishing it, as if the bus lost the event.
async fn store_silently(
    harness: &Harness,
    caller: &Caller,
    conversation_id: &str,
    text: &str,
) -> beseda_core::model::ConversationEvent {
    use beseda_core::model::{Message, TextFormat, new_id};
    let message = Message {
        id: new_id(),
        conversation_id: conversation_id.to_owned(),
        seq: 0,
        author_id: caller.user_id.clone().unwrap(),
        date: now_micros(),
        text: text.to_owned(),
        text_format: TextFormat::Plain,
        data: None,
        recipient_ids: vec![],
        buttons: None,
        client_message_id: None,
        edited_at: None,
        deleted: false,
    };
    let outcome = harness
        .routing
        .store()
        .append_message(&harness.application_id, &beseda_store::NewMessage { message, notify_user_ids: vec![] })
        .await
        .unwrap();
    outcome.event.unwrap()
}

async fn publish(harness: &Harness, event: &beseda_core::model::ConversationEvent) {
    let topic = Topic::Conversation {
        application_id: harness.application_id.clone(),
        conversation_id: event.conversation_id.clone(),
    };
    let wire_event = beseda_routing::convert::event_to_wire(event);
    harness
        .bus
        .publish(
            &topic,
            wire::BusEvent {
                application_id: harness.application_id.clone(),
                trace_context: Default::default(),
                kind: Some(wire::bus_event::Kind::ConversationEvent(wire_event)),
            },
        )
        .await;
}

async fn texts_of_next_events(socket: &mut Socket, count: usize) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let frame = next_frame(socket).await;
        if let Some(event) = frame.get("event") {
            let seq = event["seq"].as_str().unwrap().parse().unwrap();
            seen.push((seq, event["messageCreated"]["text"].as_str().unwrap_or_default().to_owned()));
        }
    }
    seen
}

#[tokio::test]
async fn a_gap_on_the_bus_is_filled_from_storage_in_order() {
    let harness = start().await;
    let (mut socket, conversation_id, caller) = subscribed(&harness).await;
    // Three events are stored but only the third reaches the bus.
    store_silently(&harness, &caller, &conversation_id, "one").await;
    store_silently(&harness, &caller, &conversation_id, "two").await;
    let third = store_silently(&harness, &caller, &conversation_id, "three").await;
    publish(&harness, &third).await;
    let seen = texts_of_next_events(&mut socket, 3).await;
    assert_eq!(seen, vec![(1, "one".into()), (2, "two".into()), (3, "three".into())]);
    // A late duplicate of an event already sent is not shown again.
    publish(&harness, &third).await;
    let fourth = store_silently(&harness, &caller, &conversation_id, "four").await;
    publish(&harness, &fourth).await;
    assert_eq!(texts_of_next_events(&mut socket, 1).await, vec![(4, "four".into())]);
}

#[tokio::test]
async fn a_burst_larger_than_the_bus_buffer_arrives_complete_once_and_in_order() {
    let harness = start().await;
    let (mut socket, conversation_id, caller) = subscribed(&harness).await;
    // Far more events than the bus buffers for one subscriber, published
    // while the connection is not reading.
    let total = beseda_bus::TOPIC_CAPACITY + 200;
    for index in 1..=total {
        let event = store_silently(&harness, &caller, &conversation_id, &format!("m{index}")).await;
        publish(&harness, &event).await;
    }
    let seen = texts_of_next_events(&mut socket, total).await;
    for (index, (seq, text)) in seen.iter().enumerate() {
        let expected_seq = index as u64 + 1;
        assert_eq!((*seq, text.as_str()), (expected_seq, format!("m{expected_seq}").as_str()), "event {index}");
    }
}

#[tokio::test]
async fn a_resume_far_larger_than_the_send_queue_is_delivered_whole() {
    let harness = start().await;
    let (mut socket, conversation_id, caller) = subscribed(&harness).await;
    let unsubscribe = json!({"requestId": "2", "unsubscribe": {"conversationId": conversation_id}});
    socket.send(WsMessage::Text(unsubscribe.to_string().into())).await.unwrap();
    // While unsubscribed, far more events than one connection may queue,
    // each big enough that together they overflow the sockets' buffers too.
    let total = GatewayConfig::default().send_queue_capacity * 3;
    let padding = "x".repeat(3_900);
    for index in 1..=total {
        store_silently(&harness, &caller, &conversation_id, &format!("m{index} {padding}")).await;
    }
    let resume = json!({"requestId": "3", "subscribe": {"conversation": {"id": conversation_id}, "afterSeq": "1"}});
    socket.send(WsMessage::Text(resume.to_string().into())).await.unwrap();
    // A client that is slow to start reading: the replay must wait for it,
    // not drop it as a slow consumer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = texts_of_next_events(&mut socket, total - 1).await;
    for (index, (seq, text)) in seen.iter().enumerate() {
        let expected_seq = index as u64 + 2;
        let expected_text = format!("m{expected_seq} {padding}");
        assert_eq!(*seq, expected_seq, "event {index}");
        assert!(*text == expected_text, "event {index} has the wrong text");
    }
}

#[tokio::test]
async fn resuming_from_a_seq_the_conversation_never_reached_is_refused() {
    let harness = start().await;
    let (mut socket, conversation_id, _) = subscribed(&harness).await;
    let resume = json!({"requestId": "9", "subscribe": {"conversation": {"id": conversation_id}, "afterSeq": "50"}});
    socket.send(WsMessage::Text(resume.to_string().into())).await.unwrap();
    let answer = loop {
        let frame = next_frame(&mut socket).await;
        if frame["requestId"] == "9" {
            break frame;
        }
    };
    assert_eq!(answer["error"]["code"], "invalid_value", "{answer}");
    assert_eq!(answer["error"]["field"], "afterSeq");
}

#[tokio::test]
async fn a_notification_the_bus_delivers_twice_is_shown_once() {
    // The Redis bus resends what it could not confirm after a reconnect;
    // conversation events are deduplicated by seq, notifications by message id.
    let harness = start().await;
    let (mut socket, _, caller) = subscribed(&harness).await;
    let user_id = caller.user_id.clone().unwrap();
    let notification = |message_id: &str| wire::BusEvent {
        application_id: harness.application_id.clone(),
        trace_context: Default::default(),
        kind: Some(wire::bus_event::Kind::UserEvent(wire::UserEvent {
            user_id: user_id.clone(),
            kind: Some(wire::user_event::Kind::Notification(wire::Notification {
                conversation_id: "c".into(),
                message_id: message_id.into(),
                text: format!("about {message_id}"),
                ..Default::default()
            })),
        })),
    };
    let topic = Topic::User { application_id: harness.application_id.clone(), user_id: user_id.clone() };
    for message_id in ["m1", "m1", "m2", "m1", "m2", "m3"] {
        harness.bus.publish(&topic, notification(message_id)).await;
    }
    let mut shown = Vec::new();
    while shown.len() < 3 {
        let frame = next_frame(&mut socket).await;
        if let Some(notification) = frame.get("userEvent").and_then(|event| event.get("notification")) {
            shown.push(notification["messageId"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(shown, vec!["m1", "m2", "m3"]);
}
