//! The bots service across a real gRPC connection, as a node of another
//! process (or an application server speaking gRPC) reaches it: the
//! processing connection as the `BotProcessing.Process` stream, and the
//! `Bots` operations with their typed errors.

use std::sync::Arc;
use std::time::Duration;

use beseda_bots::grpc::ProcessingGrpc;
use beseda_bots::{BotsConfig, BotsService};
use beseda_bus::InProcessBus;
use beseda_core::ErrorCode;
use beseda_core::model::{Application, ApplicationState, new_id, now_micros};
use beseda_proto::v1 as wire;
use beseda_proto::v1::bot_processing_client::BotProcessingClient;
use beseda_proto::v1::bot_processing_server::BotProcessingServer;
use beseda_proto::v1::bots_client::BotsClient;
use beseda_proto::v1::bots_server::BotsServer;
use beseda_proto::v1::routing_server::Routing;
use beseda_routing::mail::OutboxMailer;
use beseda_routing::{Caller, RoutingConfig, RoutingService, status};
use beseda_store::Store;
use futures_util::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

struct Node {
    /// Through the gRPC trait, as any caller of another process would.
    routing: Arc<dyn Routing>,
    endpoint: String,
    application: Caller,
    _directory: tempfile::TempDir,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

async fn start() -> Node {
    let directory = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(beseda_store::sqlite::SqliteStore::open(&directory.path().join("b.db")).unwrap());
    let subscriber = store.upsert_subscriber("owner@example.com").await.unwrap();
    let application = Application {
        id: new_id(),
        subscriber_id: subscriber.id,
        name: "Remote bots".into(),
        key: Some("remote-key".into()),
        state: ApplicationState::Registered,
        created_at: now_micros(),
    };
    store.insert_application(&application).await.unwrap();
    let mailer = Arc::new(OutboxMailer::new(directory.path().join("outbox"), "beseda@localhost").unwrap());
    let routing = RoutingService::new(
        store.clone(),
        Arc::new(InProcessBus::new()),
        mailer,
        RoutingConfig { public_url: "http://test".into() },
    );
    let config = BotsConfig { poll_interval: Duration::from_millis(50), ..BotsConfig::default() };
    let bots = BotsService::new(store, Arc::new(routing.clone()), routing.outbox_signal(), config);
    let (shutdown_sender, shutdown) = tokio::sync::watch::channel(false);
    let background = bots.clone();
    tokio::spawn(async move { background.run_background(shutdown).await });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BotsServer::new(bots.clone()))
            .add_service(BotProcessingServer::new(ProcessingGrpc(bots)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Node {
        routing: Arc::new(routing),
        endpoint: format!("http://{address}"),
        application: Caller { application_id: application.id, user_id: None, privileged: true },
        _directory: directory,
        _shutdown: shutdown_sender,
    }
}

fn execute(bot_type: &str) -> wire::ProcessingClientFrame {
    wire::ProcessingClientFrame {
        frame: Some(wire::processing_client_frame::Frame::Execute(wire::ExecuteBotProcessing {
            predefined_bots: vec![wire::PredefinedBot { bot_type: bot_type.into(), ..Default::default() }],
        })),
    }
}

#[tokio::test]
async fn the_processing_connection_works_as_a_grpc_stream() {
    let node = start().await;
    let mut client = BotProcessingClient::connect(node.endpoint.clone()).await.unwrap();
    let (frames, inbound) = tokio::sync::mpsc::channel(16);
    frames.send(execute("Echo")).await.unwrap();
    let mut outbound = client
        .process(node.application.request(tokio_stream::wrappers::ReceiverStream::new(inbound)))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || tokio::time::timeout(WAIT, outbound.next()).await.unwrap().unwrap().unwrap().frame.unwrap();
    let wire::processing_server_frame::Frame::Lease(lease) = next().await else { panic!("expected a lease") };
    assert_eq!(lease.lease_seconds, 120);
    let bot_user = lease.bots[0].user_id.clone();

    // A person writes to the bot through routing; the event arrives on the stream.
    let person =
        node.routing
            .create_user(node.application.request(wire::CreateUserRequest {
                user: Some(wire::User { name: "Alice".into(), ..Default::default() }),
            }))
            .await
            .unwrap()
            .into_inner();
    let conversation = node
        .routing
        .create_conversation(node.application.request(wire::CreateConversationRequest {
            conversation: Some(wire::Conversation {
                group: false,
                member_ids: vec![person.id.clone(), bot_user.clone()],
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    let as_person = Caller { user_id: Some(person.id.clone()), ..node.application.clone() };
    node.routing
        .send_message(as_person.request(wire::SendMessageRequest {
            conversation: Some(wire::ConversationRef {
                by: Some(wire::conversation_ref::By::Id(conversation.id.clone())),
            }),
            text: "over gRPC".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let mut message = None;
    while message.is_none() {
        let wire::processing_server_frame::Frame::Event(event) = next().await else { panic!("expected an event") };
        let ack = wire::processing_client_frame::Frame::Ack(wire::BotEventAck { delivery_id: event.delivery_id });
        frames.send(wire::ProcessingClientFrame { frame: Some(ack) }).await.unwrap();
        if event.kind == wire::BotEventKind::Message as i32 {
            message = event.message;
        }
    }
    assert_eq!(message.unwrap().text, "over gRPC");
}

#[tokio::test]
async fn bot_operations_and_their_typed_errors_cross_grpc() {
    let node = start().await;
    let mut bots = BotsClient::connect(node.endpoint.clone()).await.unwrap();
    let paired = node
        .routing
        .create_user(node.application.request(wire::CreateUserRequest {
            user: Some(wire::User { name: "Paired".into(), infobase_user_id: new_id(), ..Default::default() }),
        }))
        .await
        .unwrap()
        .into_inner();
    let refused = bots
        .create_bot(node.application.request(wire::CreateBotRequest {
            bot: Some(wire::Bot { user_id: paired.id, bot_type: "X".into(), ..Default::default() }),
        }))
        .await
        .unwrap_err();
    let error = status::from_status(&refused);
    assert_eq!((error.code, error.field.as_deref()), (ErrorCode::BotUserPaired, Some("bot.userId")));
    let types = bots.get_external_system_types(node.application.request(wire::Empty {})).await.unwrap().into_inner();
    assert_eq!(types.types, ["webhook"]);
    let listed = bots.get_bots(node.application.request(wire::Empty {})).await.unwrap().into_inner();
    assert!(listed.bots.is_empty());
}
