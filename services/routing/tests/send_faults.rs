//! SendMessage when storage fails part-way: an error answer must mean that
//! nothing was stored. (A message stored and published but answered with an
//! error is retried by the client; the retry, deduplicated by its
//! clientMessageId, then finds the message and skips its notifications.)

use std::sync::Arc;

use beseda_bus::InProcessBus;
use beseda_core::model::{Application, ApplicationState, TextFormat, User, UserKind, new_id, now_micros};
use beseda_routing::conversations::{ConversationSelector, NewConversation};
use beseda_routing::mail::OutboxMailer;
use beseda_routing::messages::OutgoingMessage;
use beseda_routing::{Caller, RoutingConfig, RoutingService};
use beseda_store::{MessageQuery, Store};

#[tokio::test]
async fn a_send_that_cannot_read_do_not_disturb_fails_before_anything_is_stored() {
    let directory = tempfile::tempdir().unwrap();
    let database = directory.path().join("b.db");
    let store: Arc<dyn Store> = Arc::new(beseda_store::sqlite::SqliteStore::open(&database).unwrap());
    let subscriber = store.upsert_subscriber("owner@example.com").await.unwrap();
    let application = Application {
        id: new_id(),
        subscriber_id: subscriber.id,
        name: "Faults".into(),
        key: Some("faults-key".into()),
        state: ApplicationState::Registered,
        created_at: now_micros(),
    };
    store.insert_application(&application).await.unwrap();
    let alice = User::new(UserKind::Regular, "Alice");
    let bob = User::new(UserKind::Regular, "Bob");
    for user in [&alice, &bob] {
        store.insert_user(&application.id, user).await.unwrap();
    }
    let mailer = Arc::new(OutboxMailer::new(directory.path().join("outbox"), "beseda@localhost").unwrap());
    let service = RoutingService::new(
        store.clone(),
        Arc::new(InProcessBus::new()),
        mailer,
        RoutingConfig { public_url: "http://test".into() },
    );
    let privileged = Caller { application_id: application.id.clone(), user_id: None, privileged: true };
    let conversation = service
        .create_conversation(
            &privileged,
            NewConversation {
                key: None,
                title: "Team".into(),
                displayed: true,
                read_only: false,
                group: true,
                context: None,
                member_ids: vec![alice.id.clone(), bob.id.clone()],
                all_application_users: false,
                integration_id: None,
            },
        )
        .await
        .unwrap();
    let as_alice =
        Caller { application_id: application.id.clone(), user_id: Some(alice.id.clone()), privileged: false };
    let selector = ConversationSelector::Id(conversation.id.clone());
    let message = |text: &str| OutgoingMessage {
        text: text.into(),
        text_format: TextFormat::Plain,
        data: None,
        recipient_ids: Vec::new(),
        buttons: None,
        client_message_id: Some(format!("{text}-1")),
        author_id: None,
        date: None,
    };
    service.send_message(&as_alice, &selector, message("before")).await.unwrap();

    // The fault: the do-not-disturb table, read to mark notifications
    // silent, is gone, so that read fails.
    rusqlite::Connection::open(&database).unwrap().execute("DROP TABLE do_not_disturb", []).unwrap();
    service.send_message(&as_alice, &selector, message("during")).await.unwrap_err();

    let query = MessageQuery { limit: 10, conversation_id: conversation.id.clone(), ..Default::default() };
    let stored: Vec<String> =
        store.list_messages(&application.id, &query).await.unwrap().into_iter().map(|message| message.text).collect();
    assert_eq!(stored, ["before"], "the failed send stored nothing");
    let unread = store.unread_counts(&application.id, &bob.id).await.unwrap();
    assert_eq!(unread.iter().map(|(_, count)| *count).sum::<u32>(), 1, "and notified nobody: {unread:?}");
}
