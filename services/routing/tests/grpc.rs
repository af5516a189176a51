//! The routing service across a real gRPC connection: the same operations
//! reached through `RemoteRouting` (what a gateway in another process holds)
//! behave exactly as in process, typed errors included.

use std::sync::Arc;

use beseda_bus::InProcessBus;
use beseda_core::ErrorCode;
use beseda_core::model::{Application, ApplicationState, new_id, now_micros};
use beseda_proto::v1 as wire;
use beseda_proto::v1::routing_server::{Routing, RoutingServer};
use beseda_routing::mail::OutboxMailer;
use beseda_routing::remote::RemoteRouting;
use beseda_routing::{Caller, RoutingConfig, RoutingService, status};
use beseda_store::Store;

async fn remote_routing(directory: &tempfile::TempDir) -> (RemoteRouting, Application) {
    let store: Arc<dyn Store> =
        Arc::new(beseda_store::sqlite::SqliteStore::open(&directory.path().join("b.db")).unwrap());
    let subscriber = store.upsert_subscriber("owner@example.com").await.unwrap();
    let application = Application {
        id: new_id(),
        subscriber_id: subscriber.id,
        name: "Remote".into(),
        key: Some("remote-key".into()),
        state: ApplicationState::Registered,
        created_at: now_micros(),
    };
    store.insert_application(&application).await.unwrap();
    let mailer = Arc::new(OutboxMailer::new(directory.path().join("outbox"), "beseda@localhost").unwrap());
    let service = RoutingService::new(
        store,
        Arc::new(InProcessBus::new()),
        mailer,
        RoutingConfig { public_url: "http://test".into() },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RoutingServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (RemoteRouting::connect_one(&format!("http://{address}")).await.unwrap(), application)
}

fn user_token(application: &Application, infobase_id: &str, name: &str) -> String {
    let now = now_micros() / 1_000_000;
    let claims = serde_json::json!({
        "iss": application.id, "aud": "beseda", "sub": infobase_id, "name": name, "iat": now, "exp": now + 600
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(application.key.as_deref().unwrap().as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn operations_and_typed_errors_cross_a_real_grpc_connection() {
    let directory = tempfile::tempdir().unwrap();
    let (routing, application) = remote_routing(&directory).await;

    // Authenticate over gRPC: the caller comes back and is then sent as metadata.
    let credentials = wire::AuthenticateRequest {
        credentials: Some(wire::authenticate_request::Credentials::UserToken(user_token(&application, "a1", "Alice"))),
    };
    let authenticated = routing.authenticate(tonic::Request::new(credentials)).await.unwrap().into_inner();
    let caller = Caller::from_wire(authenticated.caller.unwrap()).unwrap();
    assert_eq!(caller.application_id, application.id);
    assert_eq!(authenticated.user.unwrap().name, "Alice");

    let conversation = routing
        .create_conversation(caller.request(wire::CreateConversationRequest {
            conversation: Some(wire::Conversation { title: "Over gRPC".into(), group: true, ..Default::default() }),
        }))
        .await
        .unwrap()
        .into_inner();
    let sent = routing
        .send_message(caller.request(wire::SendMessageRequest {
            conversation: Some(wire::ConversationRef {
                by: Some(wire::conversation_ref::By::Id(conversation.id.clone())),
            }),
            text: "hello across processes".into(),
            client_message_id: "once".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.seq, 1);

    // A limit violation arrives as the same typed error, field included.
    let too_long = routing
        .send_message(caller.request(wire::SendMessageRequest {
            conversation: Some(wire::ConversationRef {
                by: Some(wire::conversation_ref::By::Id(conversation.id.clone())),
            }),
            text: "x".repeat(4001),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    let error = status::from_status(&too_long);
    assert_eq!(error.code, ErrorCode::TextTooLong);
    assert_eq!(error.field.as_deref(), Some("text"));
    assert_eq!(too_long.code(), tonic::Code::InvalidArgument);

    // No caller metadata: refused, never defaulted to some tenant.
    let anonymous = routing.get_unread_counts(tonic::Request::new(wire::Empty {})).await.unwrap_err();
    assert_eq!(status::from_status(&anonymous).code, ErrorCode::Unauthenticated);
}

#[tokio::test]
async fn an_unreachable_routing_node_is_a_typed_unavailable_error() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let routing = RemoteRouting::connect_one(&format!("http://127.0.0.1:{port}")).await.unwrap();
    let failure = routing.get_server_info(tonic::Request::new(wire::Empty {})).await.unwrap_err();
    assert_eq!(status::from_status(&failure).code, ErrorCode::Unavailable);
    let misconfigured = RemoteRouting::connect_one("not a url").await.err().unwrap();
    assert_eq!(misconfigured.code, ErrorCode::InvalidValue);
    assert!(misconfigured.message.contains("http://host:port"), "{}", misconfigured.message);
}

#[tokio::test]
async fn calls_move_on_from_an_instance_that_is_down() {
    let directory = tempfile::tempdir().unwrap();
    // The pool knows one dead and one live instance; round robin sends every
    // other call to the dead one first, and each must still succeed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let live_address = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(beseda_store::sqlite::SqliteStore::open(&directory.path().join("c.db")).unwrap());
        let mailer = Arc::new(OutboxMailer::new(directory.path().join("outbox2"), "beseda@localhost").unwrap());
        let service = RoutingService::new(
            store,
            Arc::new(InProcessBus::new()),
            mailer,
            RoutingConfig { public_url: "http://test".into() },
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RoutingServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        address
    };
    let routing = RemoteRouting::connect(
        &[format!("http://{dead}"), format!("http://{live_address}")],
        beseda_routing::endpoints::ClusterClientConfig::default(),
    )
    .await
    .unwrap();
    for _ in 0..6 {
        let info = routing.get_server_info(tonic::Request::new(wire::Empty {})).await.unwrap().into_inner();
        assert_eq!(info.server_version, beseda_routing::SERVER_VERSION);
    }
}

#[tokio::test]
async fn a_page_larger_than_tonics_default_limit_crosses_grpc() {
    // 50 messages with the largest data allowed make a page of about 5 MB,
    // over tonic's default 4 MB decoding limit; internal clients allow
    // beseda_proto::INTERNAL_MAX_MESSAGE_BYTES.
    const MESSAGES: usize = 50;
    let directory = tempfile::tempdir().unwrap();
    let (routing, application) = remote_routing(&directory).await;
    let credentials = wire::AuthenticateRequest {
        credentials: Some(wire::authenticate_request::Credentials::UserToken(user_token(&application, "a1", "Alice"))),
    };
    let authenticated = routing.authenticate(tonic::Request::new(credentials)).await.unwrap().into_inner();
    let caller = Caller::from_wire(authenticated.caller.unwrap()).unwrap();
    let conversation = routing
        .create_conversation(caller.request(wire::CreateConversationRequest {
            conversation: Some(wire::Conversation { title: "Large".into(), group: true, ..Default::default() }),
        }))
        .await
        .unwrap()
        .into_inner();
    let by_id = || Some(wire::ConversationRef { by: Some(wire::conversation_ref::By::Id(conversation.id.clone())) });
    for index in 0..MESSAGES {
        routing
            .send_message(caller.request(wire::SendMessageRequest {
                conversation: by_id(),
                text: format!("attachment {index}"),
                data: Some(wire::MessageData {
                    mime_type: "application/octet-stream".into(),
                    content: vec![index as u8; beseda_core::limits::MAX_DATA_BYTES],
                }),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    let page = routing
        .get_messages(caller.request(wire::MessagesFilter {
            count: MESSAGES as u32,
            conversation: by_id(),
            ..Default::default()
        }))
        .await
        .expect("a 5 MB page is answered")
        .into_inner();
    assert_eq!(page.messages.len(), MESSAGES);
    assert!(page.messages.iter().all(|message| message.data.as_ref().unwrap().content.len() == 100 * 1024));
}
