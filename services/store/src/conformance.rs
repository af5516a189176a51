//! The conformance suite every [`Store`] implementation must pass. Each test
//! is a public async function over `&dyn Store`; [`conformance_suite!`]
//! instantiates all of them as `#[tokio::test]`s for one [`Fixture`], so the
//! SQLite and PostgreSQL engines are held to exactly the same behaviour.
//!
//! Tests create their own tenants with fresh ids and assert concrete values.
//!
//! [`conformance_suite!`]: crate::conformance_suite

use std::collections::HashSet;
use std::future::Future;

use beseda_core::model::*;
use beseda_core::{ErrorCode, Result};
use futures_util::future::join_all;

use crate::{
    AppendOutcome, ConversationChange, ConversationQuery, DoNotDisturbState, MessageQuery, NewMessage,
    NotificationAudience, Store, UnreadAfterAppend, UserQuery,
};

#[doc(hidden)]
pub use futures_util as __futures_util;

mod bots;
pub use bots::*;

/// A store under test and what keeps it alive (a temporary directory, a
/// database schema) until [`teardown`](Fixture::teardown).
pub trait Fixture: Send + Sized {
    /// The store the tests run against.
    fn store(&self) -> &dyn Store;
    /// Releases what the fixture holds; runs even when the test failed.
    fn teardown(self) -> impl Future<Output = ()> + Send;
}

/// Instantiates every conformance test as a `#[tokio::test]`.
/// `$fixture` is an async fn returning `Option<impl Fixture>`; `None` skips
/// the test (the fixture says why).
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:path) => {
        $crate::conformance_suite!(@tests $fixture;
            subscriber_upsert_is_idempotent_and_email_change_rejects_a_taken_email,
            temporary_codes_are_single_use_and_expire,
            pending_activations_are_taken_once_and_not_after_expiry,
            applications_are_inserted_read_and_updated,
            users_are_inserted_read_and_updated_with_unique_infobase_and_external_ids,
            subscriber_administrators_become_exactly_the_given_users,
            list_users_filters_and_pages_in_both_directions,
            list_users_can_leave_guests_out_without_short_pages,
            conversations_enforce_key_and_context_uniqueness_and_are_found_by_both,
            concurrent_inserts_of_one_key_or_context_let_exactly_one_win,
            update_conversation_changes_members_and_logs_an_event_with_the_next_seq,
            list_conversations_filters_and_pages_by_last_activity_in_both_directions,
            conversation_list_puts_unread_first_and_pads_to_the_requested_size,
            context_access_is_granted_revoked_and_opened_to_all_users,
            concurrent_appends_get_monotonic_gap_free_seqs,
            append_with_a_client_message_id_is_idempotent,
            concurrent_retries_of_one_client_message_id_store_exactly_one_message,
            notifications_count_unread_and_mark_read_can_be_partial,
            unread_of_members_comes_from_read_marks_not_from_rows_per_message,
            own_messages_never_count_and_do_not_mark_earlier_ones_read,
            edits_add_no_unread_and_deleted_messages_stay_unread_until_read,
            new_members_start_with_nothing_unread_and_removed_members_lose_their_counts,
            watch_off_freezes_a_members_unread_and_watch_on_resumes_it,
            members_left_out_of_a_notification_are_not_counted_even_after_a_partial_mark,
            integration_members_never_have_unread_messages,
            unread_counts_read_again_after_reconnecting_match_the_pushed_counts,
            edits_and_deletes_are_logged_and_deleted_messages_keep_their_row,
            events_after_returns_events_in_seq_order_up_to_the_limit,
            list_messages_filters_and_pages_by_seq,
            watch_mode_is_stored_per_user_and_forms_the_notification_audience,
            do_not_disturb_is_user_wide_or_per_conversation,
            no_method_reads_or_changes_another_applications_rows,
            bots_are_stored_with_one_bot_per_user_and_one_predefined_bot_per_type,
            integrations_are_found_by_token_and_map_external_ids_once,
            subscriptions_are_stored_and_deleted_with_their_queue,
            conversation_changes_write_their_events_to_the_outbox,
            relay_outbox_moves_rows_into_queues_atomically,
            events_for_replay_read_the_log_by_seq_or_by_time,
            claims_keep_conversation_order_with_one_delivery_in_flight,
            concurrent_claims_hand_out_each_delivery_once,
            failed_and_exhausted_deliveries_become_dead_letters,
            bot_rows_and_queues_are_isolated_between_applications,
        );
    };
    (@tests $fixture:path; $($test:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let Some(fixture) = $fixture().await else {
                    return;
                };
                let outcome = $crate::conformance::__futures_util::FutureExt::catch_unwind(
                    ::std::panic::AssertUnwindSafe($crate::conformance::$test(
                        $crate::conformance::Fixture::store(&fixture),
                    )),
                )
                .await;
                $crate::conformance::Fixture::teardown(fixture).await;
                if let Err(panic) = outcome {
                    ::std::panic::resume_unwind(panic);
                }
            }
        )*
    };
}

// ---- helpers

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

fn error_code<T: std::fmt::Debug>(result: Result<T>) -> ErrorCode {
    result.expect_err("expected an error").code
}

/// A fresh subscriber and application; returns the application id.
async fn tenant(store: &dyn Store) -> String {
    let subscriber = store.upsert_subscriber(&format!("{}@example.com", new_id())).await.unwrap();
    let application = Application {
        id: new_id(),
        subscriber_id: subscriber.id,
        name: "Conformance".into(),
        key: Some("secret".into()),
        state: ApplicationState::Registered,
        created_at: now_micros(),
    };
    store.insert_application(&application).await.unwrap();
    application.id
}

fn user_named(id: &str, name: &str) -> User {
    User { id: id.to_owned(), ..User::new(UserKind::Regular, name) }
}

fn conversation_with(id: &str, members: &[&str], created_at: Micros) -> Conversation {
    let mut member_ids = strings(members);
    member_ids.sort();
    Conversation {
        id: id.to_owned(),
        key: None,
        title: String::new(),
        displayed: true,
        read_only: false,
        group: true,
        context: None,
        member_ids,
        all_application_users: false,
        integration_id: String::new(),
        created_at,
        last_message_at: None,
        last_seq: 0,
    }
}

fn context(object_type: &str, object_id: &str) -> Option<ContextRef> {
    Some(ContextRef {
        object_type: object_type.to_owned(),
        object_id: object_id.to_owned(),
        presentation: format!("{object_type} {object_id}"),
    })
}

fn message_in(conversation_id: &str, author_id: &str, text: &str, date: Micros) -> Message {
    Message {
        id: new_id(),
        conversation_id: conversation_id.to_owned(),
        seq: 0,
        author_id: author_id.to_owned(),
        date,
        text: text.to_owned(),
        text_format: TextFormat::Plain,
        data: None,
        recipient_ids: Vec::new(),
        buttons: None,
        client_message_id: None,
        edited_at: None,
        deleted: false,
    }
}

async fn append(store: &dyn Store, application_id: &str, message: Message, notify: &[&str]) -> AppendOutcome {
    store.append_message(application_id, &NewMessage { message, notify_user_ids: strings(notify) }).await.unwrap()
}

fn names(users: &[User]) -> Vec<&str> {
    users.iter().map(|user| user.name.as_str()).collect()
}

fn conversation_ids(conversations: &[Conversation]) -> Vec<&str> {
    conversations.iter().map(|conversation| conversation.id.as_str()).collect()
}

fn seqs(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|message| message.seq).collect()
}

fn button(text: &str) -> Button {
    Button {
        kind: ButtonKind::Button,
        text: text.to_owned(),
        message_text: text.to_owned(),
        data: "payload".into(),
        action: ButtonAction::SendMessage,
        enabled: true,
        action_name: String::new(),
        picture: vec![1, 2, 3],
        navigation_link: String::new(),
    }
}

// ---- subscribers, codes, activations, applications

/// Upsert finds or creates by lower-cased e-mail; a taken e-mail cannot be
/// moved to.
pub async fn subscriber_upsert_is_idempotent_and_email_change_rejects_a_taken_email(store: &dyn Store) {
    let created = store.upsert_subscriber("Admin@Example.COM").await.unwrap();
    assert_eq!(created.email, "admin@example.com");
    assert_eq!(created.administration_key_hash, None);
    let again = store.upsert_subscriber("admin@example.com").await.unwrap();
    assert_eq!(again, created);
    assert_eq!(store.get_subscriber(&created.id).await.unwrap(), Some(created.clone()));
    assert_eq!(store.get_subscriber_by_email("ADMIN@example.com").await.unwrap(), Some(created.clone()));
    assert_eq!(store.get_subscriber("no-such-subscriber").await.unwrap(), None);

    store.set_administration_key_hash(&created.id, "hash-1").await.unwrap();
    let with_key = store.get_subscriber(&created.id).await.unwrap().unwrap();
    assert_eq!(with_key.administration_key_hash.as_deref(), Some("hash-1"));

    let other = store.upsert_subscriber("other@example.com").await.unwrap();
    assert_ne!(other.id, created.id);
    let taken = store.change_subscriber_email(&created.id, "Other@Example.com").await.unwrap_err();
    assert_eq!(taken.code, ErrorCode::InvalidValue);
    assert_eq!(taken.field.as_deref(), Some("newEmail"));
    assert_eq!(store.get_subscriber(&created.id).await.unwrap().unwrap().email, "admin@example.com");

    store.change_subscriber_email(&created.id, "new@example.com").await.unwrap();
    assert_eq!(store.get_subscriber_by_email("admin@example.com").await.unwrap(), None);
    let moved = store.get_subscriber_by_email("new@example.com").await.unwrap().unwrap();
    assert_eq!(moved.id, created.id);
    assert_eq!(moved.administration_key_hash.as_deref(), Some("hash-1"));
    // Changing to one's own e-mail is not a conflict.
    store.change_subscriber_email(&created.id, "new@example.com").await.unwrap();
}

/// Codes are consumed at most once, only before they expire, only by their
/// subscriber; earlier codes stay valid when new ones are issued.
pub async fn temporary_codes_are_single_use_and_expire(store: &dyn Store) {
    let subscriber = store.upsert_subscriber("codes@example.com").await.unwrap();
    let stranger = store.upsert_subscriber("stranger@example.com").await.unwrap();
    let base = now_micros() + 3_600_000_000;
    store.put_temporary_code(&subscriber.id, "code-1", base + 1_000).await.unwrap();
    store.put_temporary_code(&subscriber.id, "code-2", base + 2_000).await.unwrap();

    assert!(!store.consume_temporary_code(&stranger.id, "code-1", base).await.unwrap());
    assert!(store.consume_temporary_code(&subscriber.id, "code-1", base).await.unwrap());
    assert!(!store.consume_temporary_code(&subscriber.id, "code-1", base).await.unwrap());
    assert!(!store.consume_temporary_code(&subscriber.id, "unknown", base).await.unwrap());

    // Expired exactly at expires_at; a rejected expired attempt does not
    // touch the code.
    assert!(!store.consume_temporary_code(&subscriber.id, "code-2", base + 2_000).await.unwrap());
    assert!(store.consume_temporary_code(&subscriber.id, "code-2", base + 1_999).await.unwrap());
    assert!(!store.consume_temporary_code(&subscriber.id, "code-2", base + 1_999).await.unwrap());

    // Concurrent consumers: exactly one wins.
    store.put_temporary_code(&subscriber.id, "code-3", base + 5_000).await.unwrap();
    let attempts = join_all((0..8).map(|_| store.consume_temporary_code(&subscriber.id, "code-3", base))).await;
    let wins = attempts.into_iter().map(Result::unwrap).filter(|won| *won).count();
    assert_eq!(wins, 1);
}

/// A pending activation is replaced per (e-mail, application name), taken at
/// most once with its current code, and never after it expires.
pub async fn pending_activations_are_taken_once_and_not_after_expiry(store: &dyn Store) {
    let base = now_micros() + 3_600_000_000;
    let first = PendingActivation {
        email: "owner@example.com".into(),
        application_name: "Accounting".into(),
        application_id: None,
        code_hash: "code-1".into(),
        expires_at: base + 1_000,
    };
    store.put_pending_activation(&first).await.unwrap();
    let replacement =
        PendingActivation { code_hash: "code-2".into(), application_id: Some("app-9".into()), ..first.clone() };
    store.put_pending_activation(&replacement).await.unwrap();

    assert_eq!(store.take_pending_activation("owner@example.com", "code-1", base).await.unwrap(), None);
    assert_eq!(store.take_pending_activation("someone@example.com", "code-2", base).await.unwrap(), None);
    assert_eq!(store.take_pending_activation("owner@example.com", "code-2", base).await.unwrap(), Some(replacement));
    assert_eq!(store.take_pending_activation("owner@example.com", "code-2", base).await.unwrap(), None);

    let expiring = PendingActivation { application_name: "Sales".into(), code_hash: "code-3".into(), ..first.clone() };
    store.put_pending_activation(&expiring).await.unwrap();
    assert_eq!(store.take_pending_activation("owner@example.com", "code-3", base + 1_000).await.unwrap(), None);
    assert_eq!(
        store.take_pending_activation("owner@example.com", "code-3", base + 999).await.unwrap(),
        Some(expiring.clone())
    );

    // Concurrent takes: exactly one gets it.
    store.put_pending_activation(&expiring).await.unwrap();
    let takes = join_all((0..8).map(|_| store.take_pending_activation("owner@example.com", "code-3", base))).await;
    let taken: Vec<_> = takes.into_iter().flat_map(Result::unwrap).collect();
    assert_eq!(taken, vec![expiring]);
}

/// Applications round-trip and update in place.
pub async fn applications_are_inserted_read_and_updated(store: &dyn Store) {
    let subscriber = store.upsert_subscriber("apps@example.com").await.unwrap();
    let other = store.upsert_subscriber("apps-2@example.com").await.unwrap();
    let application = Application {
        id: new_id(),
        subscriber_id: subscriber.id.clone(),
        name: "Склад".into(),
        key: Some("key-1".into()),
        state: ApplicationState::Registered,
        created_at: 1_700_000_000_000_000,
    };
    store.insert_application(&application).await.unwrap();
    assert_eq!(store.get_application(&application.id).await.unwrap(), Some(application.clone()));
    assert_eq!(store.get_application("no-such-application").await.unwrap(), None);

    let updated = Application {
        name: "Warehouse".into(),
        key: None,
        state: ApplicationState::Unregistered,
        subscriber_id: other.id.clone(),
        ..application.clone()
    };
    store.update_application(&updated).await.unwrap();
    assert_eq!(store.get_application(&application.id).await.unwrap(), Some(updated.clone()));

    let disconnected = Application { state: ApplicationState::Disconnected, ..updated };
    store.update_application(&disconnected).await.unwrap();
    assert_eq!(store.get_application(&application.id).await.unwrap().unwrap().state, ApplicationState::Disconnected);

    let missing = Application { id: "no-such-application".into(), ..application };
    assert_eq!(error_code(store.update_application(&missing).await), ErrorCode::ApplicationNotFound);
}

// ---- users

/// Users round-trip every property; infobase user ids and non-empty external
/// ids are unique per application, on insert and on update.
pub async fn users_are_inserted_read_and_updated_with_unique_infobase_and_external_ids(store: &dyn Store) {
    let app = tenant(store).await;
    let mut anna = User {
        full_name: "Anna Karenina".into(),
        picture: vec![0, 159, 146, 150],
        phone: "+7 900 000-00-00".into(),
        email: "anna@example.com".into(),
        matching_key: "mk-anna".into(),
        infobase_user_id: Some("ib-anna".into()),
        external_system_type: "telegram".into(),
        external_system_user_id: "tg-1".into(),
        authentication_email: "anna.auth@example.com".into(),
        created_at: 1_700_000_000_000_001,
        ..User::new(UserKind::Regular, "Anna")
    };
    store.insert_user(&app, &anna).await.unwrap();
    assert_eq!(store.get_user(&app, &anna.id).await.unwrap(), Some(anna.clone()));
    assert_eq!(store.get_user_by_infobase_id(&app, "ib-anna").await.unwrap(), Some(anna.clone()));
    assert_eq!(store.get_user_by_infobase_id(&app, "ib-nobody").await.unwrap(), None);
    assert_eq!(store.get_user(&app, "no-such-user").await.unwrap(), None);

    let same_infobase = User { infobase_user_id: Some("ib-anna".into()), ..User::new(UserKind::Regular, "Twin") };
    assert_eq!(error_code(store.insert_user(&app, &same_infobase).await), ErrorCode::UserExists);
    let same_external = User {
        external_system_type: "telegram".into(),
        external_system_user_id: "tg-1".into(),
        ..User::new(UserKind::External, "Twin")
    };
    assert_eq!(error_code(store.insert_user(&app, &same_external).await), ErrorCode::UserExists);
    assert_eq!(error_code(store.insert_user(&app, &anna).await), ErrorCode::UserExists);

    // Same external id in another external system, and any number of users
    // without infobase or external ids, are fine.
    let other_system = User {
        external_system_type: "whatsapp".into(),
        external_system_user_id: "tg-1".into(),
        ..User::new(UserKind::External, "Other system")
    };
    store.insert_user(&app, &other_system).await.unwrap();
    let bot = User::new(UserKind::Bot, "Bot");
    let guest = User::new(UserKind::Guest, "Guest");
    store.insert_user(&app, &bot).await.unwrap();
    store.insert_user(&app, &guest).await.unwrap();
    assert_eq!(store.count_users(&app).await.unwrap(), 4);

    let fetched = store
        .get_users(&app, &[guest.id.clone(), "no-such-user".into(), anna.id.clone(), guest.id.clone()])
        .await
        .unwrap();
    assert_eq!(fetched, vec![guest.clone(), anna.clone()]);

    anna.name = "Анна".into();
    anna.full_name = "Анна Каренина".into();
    anna.blocked = true;
    anna.kind = UserKind::External;
    anna.picture = Vec::new();
    anna.infobase_user_id = None;
    anna.external_system_user_id = "tg-2".into();
    store.update_user(&app, &anna).await.unwrap();
    assert_eq!(store.get_user(&app, &anna.id).await.unwrap(), Some(anna.clone()));
    assert_eq!(store.get_user_by_infobase_id(&app, "ib-anna").await.unwrap(), None);

    // The freed infobase id can be taken; a taken one cannot be moved to.
    let successor = User { infobase_user_id: Some("ib-anna".into()), ..User::new(UserKind::Regular, "Successor") };
    store.insert_user(&app, &successor).await.unwrap();
    let clash = User { infobase_user_id: Some("ib-anna".into()), ..bot.clone() };
    assert_eq!(error_code(store.update_user(&app, &clash).await), ErrorCode::UserExists);
    let external_clash =
        User { external_system_type: "whatsapp".into(), external_system_user_id: "tg-1".into(), ..guest.clone() };
    assert_eq!(error_code(store.update_user(&app, &external_clash).await), ErrorCode::UserExists);
    assert_eq!(store.get_user(&app, &bot.id).await.unwrap(), Some(bot));

    let ghost = User::new(UserKind::Regular, "Ghost");
    assert_eq!(error_code(store.update_user(&app, &ghost).await), ErrorCode::UserNotFound);
    assert_eq!(store.count_users(&app).await.unwrap(), 5);
}

/// `set_subscriber_administrators` sets the flag on exactly the listed users.
pub async fn subscriber_administrators_become_exactly_the_given_users(store: &dyn Store) {
    let app = tenant(store).await;
    let users: Vec<User> = (0..4).map(|index| User::new(UserKind::Regular, format!("User {index}"))).collect();
    for user in &users {
        store.insert_user(&app, user).await.unwrap();
    }
    let flags = |users: Vec<User>| users.iter().map(|user| user.subscriber_administrator).collect::<Vec<_>>();
    let all_ids: Vec<String> = users.iter().map(|user| user.id.clone()).collect();

    store.set_subscriber_administrators(&app, &[all_ids[0].clone(), all_ids[1].clone()]).await.unwrap();
    assert_eq!(flags(store.get_users(&app, &all_ids).await.unwrap()), vec![true, true, false, false]);
    store.set_subscriber_administrators(&app, &[all_ids[1].clone(), all_ids[3].clone()]).await.unwrap();
    assert_eq!(flags(store.get_users(&app, &all_ids).await.unwrap()), vec![false, true, false, true]);
    store.set_subscriber_administrators(&app, &[]).await.unwrap();
    assert_eq!(flags(store.get_users(&app, &all_ids).await.unwrap()), vec![false, false, false, false]);
}

/// Users come in (name, id) code-point order; filters combine; `after` pages
/// exclusively in either direction.
pub async fn list_users_filters_and_pages_in_both_directions(store: &dyn Store) {
    let app = tenant(store).await;
    let app = app.as_str();
    let mut anna = user_named("u-1", "Anna");
    anna.infobase_user_id = Some("ib-anna".into());
    let anna_lower = user_named("u-2", "anna");
    let mut boris = user_named("u-3", "Boris");
    boris.full_name = "Boris Annenkov".into();
    boris.matching_key = "mk-boris".into();
    let boris_cyrillic = user_named("u-4", "Борис");
    let mut clara = user_named("u-5", "Clara");
    clara.blocked = true;
    let dmitry = User { kind: UserKind::Bot, ..user_named("u-6", "Dmitry") };
    let same_b = user_named("u-8", "Same");
    let same_a = user_named("u-7", "Same");
    let wildcard = user_named("u-9", "100% real_");
    for user in [&anna, &anna_lower, &boris, &boris_cyrillic, &clara, &dmitry, &same_b, &same_a, &wildcard] {
        store.insert_user(app, user).await.unwrap();
    }
    let members = conversation_with("conv-users", &["u-1", "u-4", "u-5"], 1);
    store.insert_conversation(app, &members).await.unwrap();

    let query = |limit| UserQuery { limit, ..UserQuery::default() };
    let list = |query: UserQuery| async move { store.list_users(app, &query).await.unwrap() };

    let everyone = list(query(100)).await;
    assert_eq!(names(&everyone), ["100% real_", "Anna", "Boris", "Dmitry", "Same", "Same", "anna", "Борис"]);
    assert_eq!(everyone[4].id, "u-7");
    assert_eq!(everyone[1], anna);
    assert_eq!(
        names(&list(UserQuery { include_blocked: true, ..query(100) }).await),
        ["100% real_", "Anna", "Boris", "Clara", "Dmitry", "Same", "Same", "anna", "Борис"]
    );

    let page1 = list(query(3)).await;
    assert_eq!(names(&page1), ["100% real_", "Anna", "Boris"]);
    let page2 = list(UserQuery { after: Some("u-3".into()), ..query(3) }).await;
    assert_eq!(page2.iter().map(|user| user.id.as_str()).collect::<Vec<_>>(), ["u-6", "u-7", "u-8"]);
    let page3 = list(UserQuery { after: Some("u-8".into()), ..query(3) }).await;
    assert_eq!(names(&page3), ["anna", "Борис"]);
    assert!(list(UserQuery { after: Some("u-4".into()), ..query(3) }).await.is_empty());

    let descending = |after: Option<&str>| UserQuery {
        direction: SortDirection::Descending,
        after: after.map(str::to_owned),
        ..query(3)
    };
    assert_eq!(names(&list(descending(None)).await), ["Борис", "anna", "Same"]);
    let down2 = list(descending(Some("u-8"))).await;
    assert_eq!(down2.iter().map(|user| user.id.as_str()).collect::<Vec<_>>(), ["u-7", "u-6", "u-3"]);
    assert_eq!(names(&list(descending(Some("u-3"))).await), ["Anna", "100% real_"]);
    assert!(list(descending(Some("u-9"))).await.is_empty());
    assert!(list(UserQuery { after: Some("no-such-user".into()), ..query(3) }).await.is_empty());

    let contains = |needle: &str| UserQuery { name_contains: Some(needle.into()), ..query(100) };
    assert_eq!(names(&list(contains("ANN")).await), ["Anna", "Boris", "anna"]);
    assert_eq!(names(&list(contains("бОр")).await), ["Борис"]);
    assert_eq!(names(&list(contains("%")).await), ["100% real_"]);
    assert_eq!(names(&list(contains("_")).await), ["100% real_"]);
    assert!(list(contains("x%y")).await.is_empty());

    let ids = UserQuery { ids: strings(&["u-5", "u-3", "u-1", "missing"]), ..query(100) };
    assert_eq!(names(&list(ids.clone()).await), ["Anna", "Boris"]);
    assert_eq!(names(&list(UserQuery { include_blocked: true, ..ids }).await), ["Anna", "Boris", "Clara"]);
    assert_eq!(names(&list(UserQuery { kind: Some(UserKind::Bot), ..query(100) }).await), ["Dmitry"]);
    let in_conversation = UserQuery { conversation_id: Some("conv-users".into()), ..query(100) };
    assert_eq!(names(&list(in_conversation.clone()).await), ["Anna", "Борис"]);
    assert_eq!(names(&list(UserQuery { include_blocked: true, ..in_conversation }).await), ["Anna", "Clara", "Борис"]);
    assert_eq!(names(&list(UserQuery { infobase_user_id: Some("ib-anna".into()), ..query(100) }).await), ["Anna"]);
    assert_eq!(names(&list(UserQuery { matching_key: Some("mk-boris".into()), ..query(100) }).await), ["Boris"]);
    assert_eq!(
        names(&list(UserQuery { name_contains: Some("a".into()), kind: Some(UserKind::Regular), ..query(2) }).await),
        ["100% real_", "Anna"]
    );
}

// ---- conversations

/// Keys and context objects are unique per application, with typed errors;
/// a failed insert writes nothing; members come back sorted and deduplicated.
pub async fn conversations_enforce_key_and_context_uniqueness_and_are_found_by_both(store: &dyn Store) {
    let app = tenant(store).await;
    let mut keyed = conversation_with("conv-keyed", &["c", "a", "b", "a"], 1_000);
    keyed.key = Some("support-42".into());
    keyed.title = "Support".into();
    keyed.integration_id = "integration-1".into();
    keyed.read_only = true;
    store.insert_conversation(&app, &keyed).await.unwrap();
    let stored = store.get_conversation(&app, "conv-keyed").await.unwrap().unwrap();
    assert_eq!(stored.member_ids, strings(&["a", "b", "c"]));
    assert_eq!(stored, Conversation { member_ids: strings(&["a", "b", "c"]), ..keyed.clone() });
    assert_eq!(store.get_conversation_by_key(&app, "support-42").await.unwrap(), Some(stored.clone()));
    assert_eq!(store.get_conversation_by_key(&app, "support-43").await.unwrap(), None);

    let mut duplicate_key = conversation_with("conv-duplicate", &["x"], 2_000);
    duplicate_key.key = Some("support-42".into());
    assert_eq!(error_code(store.insert_conversation(&app, &duplicate_key).await), ErrorCode::ConversationKeyTaken);
    assert_eq!(store.get_conversation(&app, "conv-duplicate").await.unwrap(), None);
    let members_of_failed =
        UserQuery { limit: 10, conversation_id: Some("conv-duplicate".into()), ..Default::default() };
    store.insert_user(&app, &user_named("x", "X")).await.unwrap();
    assert!(store.list_users(&app, &members_of_failed).await.unwrap().is_empty());

    let mut contextual = conversation_with("conv-context", &["a"], 3_000);
    contextual.context = context("Document.Invoice", "0001");
    contextual.group = false;
    store.insert_conversation(&app, &contextual).await.unwrap();
    assert_eq!(
        store.get_conversation_by_context(&app, "Document.Invoice", "0001").await.unwrap(),
        Some(contextual.clone())
    );
    assert_eq!(store.get_conversation_by_context(&app, "Document.Invoice", "0002").await.unwrap(), None);
    assert_eq!(store.get_conversation_by_context(&app, "Document.Order", "0001").await.unwrap(), None);

    let mut duplicate_context = conversation_with("conv-context-2", &["a"], 4_000);
    duplicate_context.context = context("Document.Invoice", "0001");
    assert_eq!(
        error_code(store.insert_conversation(&app, &duplicate_context).await),
        ErrorCode::ContextConversationExists
    );
    duplicate_context.context = context("Document.Invoice", "0002");
    store.insert_conversation(&app, &duplicate_context).await.unwrap();

    // Any number of conversations without key or context.
    store.insert_conversation(&app, &conversation_with("conv-plain-1", &[], 5_000)).await.unwrap();
    store.insert_conversation(&app, &conversation_with("conv-plain-2", &[], 5_000)).await.unwrap();
    assert_eq!(store.get_conversation(&app, "conv-plain-2").await.unwrap().unwrap().member_ids, Vec::<String>::new());
}

/// Uniqueness holds under concurrency: of simultaneous inserts with one key
/// (or one context object), exactly one succeeds.
pub async fn concurrent_inserts_of_one_key_or_context_let_exactly_one_win(store: &dyn Store) {
    let app = tenant(store).await;
    let keyed: Vec<Conversation> = (0..10)
        .map(|index| Conversation {
            key: Some("race".into()),
            ..conversation_with(&format!("conv-key-{index}"), &["a", "b"], 1_000)
        })
        .collect();
    let results = join_all(keyed.iter().map(|conversation| store.insert_conversation(&app, conversation))).await;
    let codes: Vec<Option<ErrorCode>> =
        results.into_iter().map(|result| result.err().map(|error| error.code)).collect();
    assert_eq!(codes.iter().filter(|code| code.is_none()).count(), 1, "{codes:?}");
    assert!(codes.iter().flatten().all(|code| *code == ErrorCode::ConversationKeyTaken), "{codes:?}");
    let winner = store.get_conversation_by_key(&app, "race").await.unwrap().unwrap();
    assert_eq!(winner.member_ids, strings(&["a", "b"]));

    let contextual: Vec<Conversation> = (0..10)
        .map(|index| Conversation {
            context: context("Catalog.Items", "7"),
            ..conversation_with(&format!("conv-context-{index}"), &["a"], 1_000)
        })
        .collect();
    let results = join_all(contextual.iter().map(|conversation| store.insert_conversation(&app, conversation))).await;
    let codes: Vec<Option<ErrorCode>> =
        results.into_iter().map(|result| result.err().map(|error| error.code)).collect();
    assert_eq!(codes.iter().filter(|code| code.is_none()).count(), 1, "{codes:?}");
    assert!(codes.iter().flatten().all(|code| *code == ErrorCode::ContextConversationExists), "{codes:?}");
    let query = ConversationQuery { limit: 100, has_context: Some(true), ..Default::default() };
    assert_eq!(store.list_conversations(&app, &query).await.unwrap().len(), 1);
}

/// A change applies title, display flag and membership and logs a
/// `ConversationChanged` event that takes the conversation's next seq.
pub async fn update_conversation_changes_members_and_logs_an_event_with_the_next_seq(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("conv-1", &["a", "b"], 1_000)).await.unwrap();
    append(store, &app, message_in("conv-1", "a", "hello", 2_000), &["b"]).await;

    let change = ConversationChange {
        title: Some("Renamed".into()),
        displayed: Some(false),
        add_member_ids: strings(&["d", "c", "b"]),
        remove_member_ids: strings(&["a", "nobody"]),
    };
    let (conversation, event) = store.update_conversation(&app, "conv-1", &change).await.unwrap();
    assert_eq!(conversation.title, "Renamed");
    assert!(!conversation.displayed);
    assert_eq!(conversation.member_ids, strings(&["b", "c", "d"]));
    assert_eq!(conversation.last_seq, 2);
    assert_eq!(conversation.last_message_at, Some(2_000));
    assert_eq!(event.seq, 2);
    assert_eq!(event.conversation_id, "conv-1");
    assert_eq!(event.kind, EventKind::ConversationChanged(conversation.clone()));
    assert_eq!(store.get_conversation(&app, "conv-1").await.unwrap(), Some(conversation.clone()));

    // An empty change still logs an event (seq 3) and changes nothing else.
    let (unchanged, event) = store.update_conversation(&app, "conv-1", &ConversationChange::default()).await.unwrap();
    assert_eq!(event.seq, 3);
    assert_eq!(unchanged, Conversation { last_seq: 3, ..conversation });

    let events = store.events_after(&app, "conv-1", 0, 10).await.unwrap();
    assert_eq!(events.iter().map(|event| event.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(matches!(events[0].kind, EventKind::MessageCreated(_)));
    assert_eq!(events[2], event);

    let missing = store.update_conversation(&app, "no-such-conversation", &change).await;
    assert_eq!(error_code(missing), ErrorCode::ConversationNotFound);
}

/// Conversations come in (last activity, id) order; `start_date`/`after_id`
/// page exclusively either way; every filter narrows.
pub async fn list_conversations_filters_and_pages_by_last_activity_in_both_directions(store: &dyn Store) {
    let app = tenant(store).await;
    let app = app.as_str();
    let mut a = conversation_with("conv-a", &["me"], 1_000);
    a.title = "Alpha Team".into();
    let b = Conversation { title: "Бета".into(), ..conversation_with("conv-b", &["me", "you"], 2_000) };
    let c = Conversation { group: false, title: String::new(), ..conversation_with("conv-c", &["me", "you"], 3_000) };
    let d = Conversation { displayed: false, read_only: true, ..conversation_with("conv-d", &["you"], 3_000) };
    let e = Conversation { all_application_users: true, ..conversation_with("conv-e", &[], 5_000) };
    let f = Conversation { context: context("Document.Order", "1"), ..conversation_with("conv-f", &[], 500) };
    let g = Conversation { context: context("Document.Order", "2"), ..conversation_with("conv-g", &[], 400) };
    for conversation in [&a, &b, &c, &d, &e, &f, &g] {
        store.insert_conversation(app, conversation).await.unwrap();
    }
    store.set_context_access(app, "conv-f", &strings(&["me"]), &[], None).await.unwrap();
    // A message moves conv-a's last activity to 6000.
    append(store, app, message_in("conv-a", "me", "hi", 6_000), &[]).await;

    let base = ConversationQuery { limit: 100, has_context: Some(false), ..Default::default() };
    let list = |query: ConversationQuery| async move { store.list_conversations(app, &query).await.unwrap() };

    let ascending = list(base.clone()).await;
    assert_eq!(conversation_ids(&ascending), ["conv-b", "conv-c", "conv-d", "conv-e", "conv-a"]);
    assert_eq!(ascending[4].last_message_at, Some(6_000));
    assert_eq!(ascending[4].last_seq, 1);

    let page = |direction, start_date: Option<Micros>, after_id: Option<&str>| ConversationQuery {
        limit: 2,
        direction,
        start_date,
        after_id: after_id.map(str::to_owned),
        ..base.clone()
    };
    use SortDirection::{Ascending, Descending};
    assert_eq!(conversation_ids(&list(page(Ascending, None, None)).await), ["conv-b", "conv-c"]);
    assert_eq!(conversation_ids(&list(page(Ascending, Some(3_000), Some("conv-c"))).await), ["conv-d", "conv-e"]);
    assert_eq!(conversation_ids(&list(page(Ascending, Some(5_000), Some("conv-e"))).await), ["conv-a"]);
    assert!(list(page(Ascending, Some(6_000), Some("conv-a"))).await.is_empty());
    assert_eq!(conversation_ids(&list(page(Descending, None, None)).await), ["conv-a", "conv-e"]);
    assert_eq!(conversation_ids(&list(page(Descending, Some(5_000), Some("conv-e"))).await), ["conv-d", "conv-c"]);
    assert_eq!(conversation_ids(&list(page(Descending, Some(3_000), Some("conv-c"))).await), ["conv-b"]);
    // A date alone is exclusive; an id alone pages after that conversation.
    assert_eq!(conversation_ids(&list(page(Ascending, Some(3_000), None)).await), ["conv-e", "conv-a"]);
    assert_eq!(conversation_ids(&list(page(Descending, Some(3_000), None)).await), ["conv-b"]);
    assert_eq!(conversation_ids(&list(page(Ascending, None, Some("conv-c"))).await), ["conv-d", "conv-e"]);
    assert!(list(page(Ascending, None, Some("no-such-conversation"))).await.is_empty());

    let everything = ConversationQuery { limit: 100, ..Default::default() };
    let all = list(everything.clone()).await;
    assert_eq!(conversation_ids(&all), ["conv-g", "conv-f", "conv-b", "conv-c", "conv-d", "conv-e", "conv-a"]);
    let filtered = |query: ConversationQuery| async move { conversation_ids(&list(query).await).join(",") };
    assert_eq!(filtered(ConversationQuery { has_context: Some(true), ..everything.clone() }).await, "conv-g,conv-f");
    assert_eq!(
        filtered(ConversationQuery { ids: strings(&["conv-e", "conv-b", "x"]), ..everything.clone() }).await,
        "conv-b,conv-e"
    );
    assert_eq!(
        filtered(ConversationQuery { title_contains: Some("TEAM".into()), ..everything.clone() }).await,
        "conv-a"
    );
    assert_eq!(
        filtered(ConversationQuery { title_contains: Some("бЕт".into()), ..everything.clone() }).await,
        "conv-b"
    );
    assert_eq!(filtered(ConversationQuery { title_contains: Some("%".into()), ..everything.clone() }).await, "");
    assert_eq!(filtered(ConversationQuery { group: Some(false), ..everything.clone() }).await, "conv-c");
    assert_eq!(filtered(ConversationQuery { displayed: Some(false), ..everything.clone() }).await, "conv-d");
    assert_eq!(filtered(ConversationQuery { read_only: Some(true), ..everything.clone() }).await, "conv-d");
    assert_eq!(
        filtered(ConversationQuery { context: Some(("Document.Order".into(), "2".into())), ..everything.clone() })
            .await,
        "conv-g"
    );
    assert_eq!(
        filtered(ConversationQuery { accessible_to: Some("me".into()), ..everything.clone() }).await,
        "conv-f,conv-b,conv-c,conv-e,conv-a"
    );
    assert_eq!(
        filtered(ConversationQuery { accessible_to: Some("you".into()), ..everything.clone() }).await,
        "conv-b,conv-c,conv-d,conv-e"
    );
    assert_eq!(
        filtered(ConversationQuery {
            accessible_to: Some("me".into()),
            group: Some(true),
            has_context: Some(false),
            limit: 2,
            direction: Descending,
            ..everything
        })
        .await,
        "conv-a,conv-e"
    );
}

/// §29.4.4.1: all unread non-context conversations first (newest first),
/// then the others by last activity until `pad_to`.
pub async fn conversation_list_puts_unread_first_and_pads_to_the_requested_size(store: &dyn Store) {
    let app = tenant(store).await;
    let app = app.as_str();
    for (id, created_at) in [("cl-1", 1_000), ("cl-2", 2_000), ("cl-3", 3_000), ("cl-4", 4_000)] {
        store.insert_conversation(app, &conversation_with(id, &["me", "peer"], created_at)).await.unwrap();
    }
    let everyone = Conversation { all_application_users: true, ..conversation_with("cl-5", &[], 5_000) };
    store.insert_conversation(app, &everyone).await.unwrap();
    let contextual = Conversation { context: context("Task", "1"), ..conversation_with("cl-ctx", &["me"], 6_000) };
    store.insert_conversation(app, &contextual).await.unwrap();
    store.insert_conversation(app, &conversation_with("cl-other", &["peer"], 7_000)).await.unwrap();

    append(store, app, message_in("cl-1", "peer", "one", 1_500), &["me"]).await;
    append(store, app, message_in("cl-3", "peer", "three", 3_500), &["me"]).await;
    append(store, app, message_in("cl-ctx", "peer", "context", 6_500), &["me"]).await;
    append(store, app, message_in("cl-other", "peer", "other", 7_500), &["peer"]).await;
    // cl-4 had activity but nothing unread for me.
    append(store, app, message_in("cl-4", "me", "mine", 4_500), &["peer"]).await;
    // An API-only conversation never shows in the list, unread or not.
    let hidden = Conversation { displayed: false, ..conversation_with("cl-hidden", &["me", "peer"], 8_000) };
    store.insert_conversation(app, &hidden).await.unwrap();
    append(store, app, message_in("cl-hidden", "peer", "hidden", 8_500), &["me"]).await;

    let list =
        |pad_to| async move { conversation_ids(&store.conversation_list(app, "me", pad_to).await.unwrap()).join(",") };
    assert_eq!(list(10).await, "cl-3,cl-1,cl-5,cl-4,cl-2");
    assert_eq!(list(4).await, "cl-3,cl-1,cl-5,cl-4");
    assert_eq!(list(1).await, "cl-3,cl-1");
    assert_eq!(list(0).await, "cl-3,cl-1");

    store.mark_read(app, "cl-3", "me", 1).await.unwrap();
    assert_eq!(list(10).await, "cl-1,cl-5,cl-4,cl-3,cl-2");
    let full = store.conversation_list(app, "me", 10).await.unwrap();
    assert_eq!(full[0].member_ids, strings(&["me", "peer"]));
    assert_eq!(full[0].last_message_at, Some(1_500));

    assert_eq!(conversation_ids(&store.conversation_list(app, "peer", 3).await.unwrap()), ["cl-other", "cl-4", "cl-5"]);
}

/// Context access: per-user grants and revocations plus the all-users flag.
pub async fn context_access_is_granted_revoked_and_opened_to_all_users(store: &dyn Store) {
    let app = tenant(store).await;
    let app = app.as_str();
    let contextual = Conversation { context: context("Project", "p-1"), ..conversation_with("ctx", &[], 1_000) };
    store.insert_conversation(app, &contextual).await.unwrap();
    store.insert_conversation(app, &conversation_with("plain", &["u1"], 1_000)).await.unwrap();
    let access = |user: &'static str| async move { store.has_context_access(app, "ctx", user).await.unwrap() };

    assert!(!access("u1").await);
    store.set_context_access(app, "ctx", &strings(&["u1", "u2"]), &[], None).await.unwrap();
    assert!(access("u1").await && access("u2").await && !access("u3").await);
    // Granting twice is harmless; revoking wins over granting in one call.
    // Losing access is logged with the conversation's next seq; a call that
    // takes nothing away logs nothing.
    let revoked =
        store.set_context_access(app, "ctx", &strings(&["u1", "u3"]), &strings(&["u2", "u3"]), None).await.unwrap();
    assert!(access("u1").await && !access("u2").await && !access("u3").await);
    let revoked = revoked.expect("a revocation is logged");
    assert_eq!(revoked.seq, 1);
    assert!(matches!(revoked.kind, EventKind::ConversationChanged(_)));
    assert_eq!(store.events_after(app, "ctx", 0, 10).await.unwrap(), [revoked]);
    assert!(store.set_context_access(app, "ctx", &[], &strings(&["u2"]), None).await.unwrap().is_none());

    store.set_context_access(app, "ctx", &[], &[], Some(true)).await.unwrap();
    assert!(access("u3").await);
    assert!(store.get_conversation(app, "ctx").await.unwrap().unwrap().all_application_users);
    let accessible = ConversationQuery { limit: 10, accessible_to: Some("u3".into()), ..Default::default() };
    assert_eq!(conversation_ids(&store.list_conversations(app, &accessible).await.unwrap()), ["ctx"]);
    let withdrawn = store.set_context_access(app, "ctx", &[], &[], Some(false)).await.unwrap();
    assert_eq!(withdrawn.map(|event| event.seq), Some(2), "withdrawing access for everyone is logged");
    assert!(!access("u3").await && access("u1").await);
    assert!(store.list_conversations(app, &accessible).await.unwrap().is_empty());

    assert!(!store.has_context_access(app, "no-such-conversation", "u1").await.unwrap());
    let missing = store.set_context_access(app, "no-such-conversation", &strings(&["u1"]), &[], None).await;
    assert_eq!(error_code(missing), ErrorCode::ConversationNotFound);
    let not_contextual = store.set_context_access(app, "plain", &strings(&["u1"]), &[], None).await;
    assert_eq!(error_code(not_contextual), ErrorCode::InvalidValue);
}

// ---- messages and events

/// 50 simultaneous appends to one conversation get seqs 1..=50 exactly.
pub async fn concurrent_appends_get_monotonic_gap_free_seqs(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("busy", &["a", "b"], 1_000)).await.unwrap();
    let messages: Vec<NewMessage> = (0..50)
        .map(|index| NewMessage {
            message: message_in("busy", "a", &format!("message {index}"), 2_000 + index),
            notify_user_ids: strings(&["b"]),
        })
        .collect();
    let outcomes = join_all(messages.iter().map(|message| store.append_message(&app, message))).await;
    let mut assigned: Vec<u64> = outcomes
        .into_iter()
        .map(|outcome| {
            let outcome = outcome.unwrap();
            let event = outcome.event.expect("a new message has an event");
            assert_eq!(event.seq, outcome.message.seq);
            assert_eq!(event.kind, EventKind::MessageCreated(outcome.message.clone()));
            outcome.message.seq
        })
        .collect();
    assigned.sort_unstable();
    assert_eq!(assigned, (1..=50).collect::<Vec<u64>>());

    assert_eq!(store.get_conversation(&app, "busy").await.unwrap().unwrap().last_seq, 50);
    let stored = store
        .list_messages(&app, &MessageQuery { limit: 100, conversation_id: "busy".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(seqs(&stored), (1..=50).collect::<Vec<u64>>());
    let events = store.events_after(&app, "busy", 0, 100).await.unwrap();
    assert_eq!(events.iter().map(|event| event.seq).collect::<Vec<_>>(), (1..=50).collect::<Vec<u64>>());
    assert_eq!(store.unread_counts(&app, "b").await.unwrap(), vec![("busy".to_owned(), 50)]);

    let appended = append(store, &app, message_in("busy", "b", "after the rush", 9_000), &[]).await;
    assert_eq!(appended.message.seq, 51);
    assert_eq!(appended.unread, Vec::new());
}

/// A retry (same author and client message id) returns the stored message
/// and writes nothing.
pub async fn append_with_a_client_message_id_is_idempotent(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("conv-1", &["a", "b"], 1_000)).await.unwrap();
    store.insert_conversation(&app, &conversation_with("conv-2", &["a", "b"], 1_000)).await.unwrap();
    let original = Message { client_message_id: Some("client-1".into()), ..message_in("conv-1", "a", "once", 2_000) };
    let first = append(store, &app, original.clone(), &["b"]).await;
    assert_eq!(first.message, Message { seq: 1, ..original.clone() });
    assert!(first.event.is_some());
    assert_eq!(first.unread, vec![UnreadAfterAppend { user_id: "b".into(), unread_in_conversation: 1 }]);

    let retry = Message { id: new_id(), text: "changed on retry".into(), date: 3_000, ..original.clone() };
    let second = append(store, &app, retry, &["b"]).await;
    assert_eq!(second.message, first.message);
    assert_eq!(second.event, None);
    assert_eq!(second.unread, Vec::new());
    let conversation = store.get_conversation(&app, "conv-1").await.unwrap().unwrap();
    assert_eq!((conversation.last_seq, conversation.last_message_at), (1, Some(2_000)));
    assert_eq!(store.unread_counts(&app, "b").await.unwrap(), vec![("conv-1".to_owned(), 1)]);
    assert_eq!(store.events_after(&app, "conv-1", 0, 10).await.unwrap().len(), 1);

    // The id is scoped to author and conversation.
    let other_author = Message { id: new_id(), author_id: "b".into(), ..original.clone() };
    assert_eq!(append(store, &app, other_author, &[]).await.message.seq, 2);
    let other_conversation = Message { id: new_id(), conversation_id: "conv-2".into(), ..original.clone() };
    assert_eq!(append(store, &app, other_conversation, &[]).await.message.seq, 1);
    // Messages without a client id never collide.
    for _ in 0..2 {
        assert!(append(store, &app, message_in("conv-1", "a", "plain", 4_000), &[]).await.event.is_some());
    }
    assert_eq!(store.get_conversation(&app, "conv-1").await.unwrap().unwrap().last_seq, 4);
}

/// Simultaneous retries of one client message id store it exactly once.
pub async fn concurrent_retries_of_one_client_message_id_store_exactly_one_message(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("conv-1", &["a", "b"], 1_000)).await.unwrap();
    let attempts: Vec<NewMessage> = (0..20)
        .map(|_| NewMessage {
            message: Message { client_message_id: Some("client-x".into()), ..message_in("conv-1", "a", "hi", 2_000) },
            notify_user_ids: strings(&["b"]),
        })
        .collect();
    let outcomes: Vec<AppendOutcome> = join_all(attempts.iter().map(|attempt| store.append_message(&app, attempt)))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(outcomes.iter().filter(|outcome| outcome.event.is_some()).count(), 1);
    let ids: HashSet<&str> = outcomes.iter().map(|outcome| outcome.message.id.as_str()).collect();
    assert_eq!(ids.len(), 1);
    assert!(outcomes.iter().all(|outcome| outcome.message.seq == 1));

    let stored = store
        .list_messages(&app, &MessageQuery { limit: 100, conversation_id: "conv-1".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(store.get_conversation(&app, "conv-1").await.unwrap().unwrap().last_seq, 1);
    assert_eq!(store.unread_counts(&app, "b").await.unwrap(), vec![("conv-1".to_owned(), 1)]);
}

/// Each notified user's unread count grows by one per message; marking read
/// up to a seq leaves the later ones unread; marks never move back.
pub async fn notifications_count_unread_and_mark_read_can_be_partial(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("conv-1", &["author", "u1", "u2"], 1_000)).await.unwrap();
    store.insert_conversation(&app, &conversation_with("conv-2", &["author", "u1"], 1_000)).await.unwrap();
    for index in 1..=5 {
        let outcome =
            append(store, &app, message_in("conv-1", "author", "news", 2_000 + index), &["u1", "u2", "u1"]).await;
        let count = u32::try_from(index).unwrap();
        assert_eq!(
            outcome.unread,
            vec![
                UnreadAfterAppend { user_id: "u1".into(), unread_in_conversation: count },
                UnreadAfterAppend { user_id: "u2".into(), unread_in_conversation: count },
            ]
        );
    }
    append(store, &app, message_in("conv-2", "author", "elsewhere", 3_000), &["u1"]).await;
    assert_eq!(store.unread_counts(&app, "u1").await.unwrap(), vec![("conv-1".into(), 5), ("conv-2".into(), 1)]);
    assert_eq!(store.unread_counts(&app, "author").await.unwrap(), Vec::new());

    assert_eq!(store.mark_read(&app, "conv-1", "u1", 3).await.unwrap(), 2);
    assert_eq!(store.unread_counts(&app, "u1").await.unwrap(), vec![("conv-1".into(), 2), ("conv-2".into(), 1)]);
    assert_eq!(store.mark_read(&app, "conv-1", "u1", 1).await.unwrap(), 2, "a mark never moves back");
    assert_eq!(store.mark_read(&app, "conv-1", "u1", 100).await.unwrap(), 0);
    assert_eq!(store.unread_counts(&app, "u1").await.unwrap(), vec![("conv-2".into(), 1)]);
    assert_eq!(store.unread_counts(&app, "u2").await.unwrap(), vec![("conv-1".into(), 5)]);

    // Marking beyond the last seq does not pre-read future messages.
    let next = append(store, &app, message_in("conv-1", "author", "later", 4_000), &["u1", "u2"]).await;
    assert_eq!(next.message.seq, 6);
    assert_eq!(
        next.unread,
        vec![
            UnreadAfterAppend { user_id: "u1".into(), unread_in_conversation: 1 },
            UnreadAfterAppend { user_id: "u2".into(), unread_in_conversation: 6 },
        ]
    );
    assert_eq!(store.mark_read(&app, "conv-1", "u2", 0).await.unwrap(), 6);
    assert_eq!(
        error_code(store.mark_read(&app, "no-such-conversation", "u1", 1).await),
        ErrorCode::ConversationNotFound
    );
}

// ---- unread counts from read marks (issue 11)

/// The counts of a notified user, as the append reported them.
fn pushed(outcome: &AppendOutcome) -> Vec<(&str, u32)> {
    outcome.unread.iter().map(|unread| (unread.user_id.as_str(), unread.unread_in_conversation)).collect()
}

async fn unread_in(store: &dyn Store, app: &str, user: &str, conversation: &str) -> u32 {
    let counts = store.unread_counts(app, user).await.unwrap();
    counts.into_iter().find(|(id, _)| id == conversation).map_or(0, |(_, count)| count)
}

/// A group of members notified as routing would (every member but the
/// author): each count grows by one per message and partial marks leave
/// exactly the later messages unread. Counts in the append outcome, in
/// GetUnreadCounts and from MarkRead agree.
pub async fn unread_of_members_comes_from_read_marks_not_from_rows_per_message(store: &dyn Store) {
    let app = tenant(store).await;
    let members: Vec<String> = (0..40).map(|index| format!("m{index:02}")).collect();
    let member_refs: Vec<&str> = members.iter().map(String::as_str).collect();
    store.insert_conversation(&app, &conversation_with("big", &member_refs, 1_000)).await.unwrap();
    for index in 1..=3 {
        let outcome = append(store, &app, message_in("big", "m00", "hello", 2_000 + index), &member_refs[1..]).await;
        let count = u32::try_from(index).unwrap();
        assert_eq!(pushed(&outcome), member_refs[1..].iter().map(|id| (*id, count)).collect::<Vec<_>>());
    }
    assert_eq!(unread_in(store, &app, "m39", "big").await, 3);
    assert_eq!(store.mark_read(&app, "big", "m05", 2).await.unwrap(), 1);
    assert_eq!(store.mark_read(&app, "big", "m06", 3).await.unwrap(), 0);
    let next = append(store, &app, message_in("big", "m00", "more", 3_000), &member_refs[1..]).await;
    let counts: Vec<(&str, u32)> = pushed(&next);
    assert!(counts.contains(&("m05", 2)) && counts.contains(&("m06", 1)) && counts.contains(&("m07", 4)));
    assert_eq!(store.unread_counts(&app, "m05").await.unwrap(), vec![("big".to_owned(), 2)]);
    assert_eq!(store.unread_counts(&app, "m00").await.unwrap(), Vec::new());
    // A mark never moves back, also for counts derived from marks.
    assert_eq!(store.mark_read(&app, "big", "m06", 1).await.unwrap(), 1);
    assert_eq!(store.mark_read(&app, "big", "m07", 0).await.unwrap(), 4);
}

/// One's own messages are never unread, and writing does not mark what
/// others wrote before as read (MarkRead does): §29.3.4 notifies everyone
/// but the author, and nothing in it reads messages on the author's behalf.
pub async fn own_messages_never_count_and_do_not_mark_earlier_ones_read(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("g", &["a", "b", "c"], 1_000)).await.unwrap();
    append(store, &app, message_in("g", "a", "1", 2_000), &["b", "c"]).await;
    append(store, &app, message_in("g", "a", "2", 2_001), &["b", "c"]).await;
    let reply = append(store, &app, message_in("g", "b", "3", 2_002), &["a", "c"]).await;
    assert_eq!(pushed(&reply), vec![("a", 1), ("c", 3)]);
    assert_eq!(unread_in(store, &app, "b", "g").await, 2, "b's own message leaves a's two unread");
    append(store, &app, message_in("g", "b", "4", 2_003), &["a", "c"]).await;
    // Marking up to a's second message leaves only b's own messages after
    // the mark, and those never count.
    assert_eq!(store.mark_read(&app, "g", "b", 2).await.unwrap(), 0);
    assert_eq!(unread_in(store, &app, "b", "g").await, 0);
    // Partial marks before one's own messages skip them too.
    assert_eq!(store.mark_read(&app, "g", "a", 0).await.unwrap(), 2);
    assert_eq!(store.mark_read(&app, "g", "c", 3).await.unwrap(), 1);
    let later = append(store, &app, message_in("g", "c", "5", 2_004), &["a", "b"]).await;
    assert_eq!(pushed(&later), vec![("a", 3), ("b", 1)]);
    assert_eq!(unread_in(store, &app, "c", "g").await, 1);
}

/// Editing a message creates no new unread; deleting one leaves it counted
/// until read, as the notification was already delivered (and the stored
/// notification of a per-user audience behaves the same way).
pub async fn edits_add_no_unread_and_deleted_messages_stay_unread_until_read(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("g", &["a", "b"], 1_000)).await.unwrap();
    let first = append(store, &app, message_in("g", "a", "first", 2_000), &["b"]).await;
    let second = append(store, &app, message_in("g", "a", "second", 2_001), &["b"]).await;
    store.edit_message(&app, &Message { text: "edited".into(), ..first.message.clone() }).await.unwrap();
    assert_eq!(unread_in(store, &app, "b", "g").await, 2);
    let (_, deleted) = store.delete_message(&app, &second.message.id, 3_000).await.unwrap();
    assert_eq!(deleted.seq, 4);
    assert_eq!(unread_in(store, &app, "b", "g").await, 2);
    // Marking up to the edit's seq reads both messages; the log entries of
    // the edit and the delete are not messages and never count.
    assert_eq!(store.mark_read(&app, "g", "b", 1).await.unwrap(), 1);
    assert_eq!(store.mark_read(&app, "g", "b", 4).await.unwrap(), 0);
    let third = append(store, &app, message_in("g", "a", "third", 4_000), &["b"]).await;
    assert_eq!(pushed(&third), vec![("b", 1)]);
}

/// A member added later starts with nothing unread and counts only what
/// follows; a removed member's counts vanish with the membership, and
/// joining again starts from zero.
pub async fn new_members_start_with_nothing_unread_and_removed_members_lose_their_counts(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("g", &["a", "b"], 1_000)).await.unwrap();
    append(store, &app, message_in("g", "a", "before", 2_000), &["b"]).await;
    let add = |ids: &[&str]| ConversationChange { add_member_ids: strings(ids), ..Default::default() };
    let remove = |ids: &[&str]| ConversationChange { remove_member_ids: strings(ids), ..Default::default() };
    store.update_conversation(&app, "g", &add(&["c"])).await.unwrap();
    assert_eq!(unread_in(store, &app, "c", "g").await, 0);
    let after = append(store, &app, message_in("g", "a", "after", 2_001), &["b", "c"]).await;
    assert_eq!(pushed(&after), vec![("b", 2), ("c", 1)]);
    // Marks below the join do not bring earlier messages back.
    assert_eq!(store.mark_read(&app, "g", "c", 0).await.unwrap(), 1);

    store.update_conversation(&app, "g", &remove(&["b"])).await.unwrap();
    assert_eq!(store.unread_counts(&app, "b").await.unwrap(), Vec::new());
    assert_eq!(conversation_ids(&store.conversation_list(&app, "b", 10).await.unwrap()), Vec::<&str>::new());
    append(store, &app, message_in("g", "a", "without b", 2_002), &["c"]).await;
    assert_eq!(store.unread_counts(&app, "b").await.unwrap(), Vec::new());
    store.update_conversation(&app, "g", &add(&["b"])).await.unwrap();
    assert_eq!(store.unread_counts(&app, "b").await.unwrap(), Vec::new());
    let back = append(store, &app, message_in("g", "a", "welcome back", 2_003), &["b", "c"]).await;
    assert_eq!(pushed(&back), vec![("b", 1), ("c", 3)]);
    // Adding an existing member changes nothing.
    store.update_conversation(&app, "g", &add(&["c"])).await.unwrap();
    assert_eq!(unread_in(store, &app, "c", "g").await, 3);
}

/// A member who switched watching off is not notified: their count stays
/// where it was (what was unread stays unread) and grows again once they
/// watch again. A partial MarkRead later still leaves the muted messages out.
pub async fn watch_off_freezes_a_members_unread_and_watch_on_resumes_it(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("g", &["a", "b", "c"], 1_000)).await.unwrap();
    append(store, &app, message_in("g", "a", "1", 2_000), &["b", "c"]).await;
    append(store, &app, message_in("g", "a", "2", 2_001), &["b", "c"]).await;
    store.set_watch_mode(&app, "g", "c", false).await.unwrap();
    // Routing leaves c out while watching is off.
    for index in 3..=5 {
        let outcome = append(store, &app, message_in("g", "a", "muted", 2_000 + index), &["b"]).await;
        assert_eq!(pushed(&outcome), vec![("b", u32::try_from(index).unwrap())]);
    }
    assert_eq!(unread_in(store, &app, "c", "g").await, 2);
    // Switching off twice does not move the point it was switched off at.
    store.set_watch_mode(&app, "g", "c", false).await.unwrap();
    assert_eq!(store.mark_read(&app, "g", "c", 1).await.unwrap(), 1);
    store.set_watch_mode(&app, "g", "c", true).await.unwrap();
    assert_eq!(unread_in(store, &app, "c", "g").await, 1);
    let watched = append(store, &app, message_in("g", "a", "6", 2_006), &["b", "c"]).await;
    assert_eq!(pushed(&watched), vec![("b", 6), ("c", 2)]);
    // Messages 3..=5 (seqs 3..=5) were never notified to c.
    assert_eq!(store.mark_read(&app, "g", "c", 2).await.unwrap(), 1);
    assert_eq!(store.mark_read(&app, "g", "c", 5).await.unwrap(), 1);
    assert_eq!(store.mark_read(&app, "g", "c", 6).await.unwrap(), 0);
    // Off and on again with nothing in between leaves no trace.
    store.set_watch_mode(&app, "g", "c", false).await.unwrap();
    store.set_watch_mode(&app, "g", "c", true).await.unwrap();
    let last = append(store, &app, message_in("g", "a", "7", 2_007), &["b", "c"]).await;
    assert_eq!(pushed(&last), vec![("b", 7), ("c", 1)]);
    // Watching off before joining: the new member starts muted.
    store.set_watch_mode(&app, "g", "d", false).await.unwrap();
    let change = ConversationChange { add_member_ids: strings(&["d"]), ..Default::default() };
    store.update_conversation(&app, "g", &change).await.unwrap();
    append(store, &app, message_in("g", "a", "8", 2_008), &["b", "c"]).await;
    assert_eq!(unread_in(store, &app, "d", "g").await, 0);
    store.set_watch_mode(&app, "g", "d", true).await.unwrap();
    append(store, &app, message_in("g", "a", "9", 2_009), &["b", "c", "d"]).await;
    assert_eq!(unread_in(store, &app, "d", "g").await, 1);
    assert_eq!(store.mark_read(&app, "g", "d", 0).await.unwrap(), 1);
}

/// A member routing leaves out of a message (a blocked user) is not counted
/// for it, before or after a partial MarkRead; the others still are.
pub async fn members_left_out_of_a_notification_are_not_counted_even_after_a_partial_mark(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("g", &["a", "b", "c", "d"], 1_000)).await.unwrap();
    append(store, &app, message_in("g", "a", "1", 2_000), &["b", "c", "d"]).await;
    let partial = append(store, &app, message_in("g", "a", "2", 2_001), &["b", "c"]).await;
    assert_eq!(pushed(&partial), vec![("b", 2), ("c", 2)]);
    append(store, &app, message_in("g", "a", "3", 2_002), &["b", "c", "d"]).await;
    assert_eq!(unread_in(store, &app, "d", "g").await, 2);
    assert_eq!(store.mark_read(&app, "g", "d", 1).await.unwrap(), 1);
    assert_eq!(unread_in(store, &app, "d", "g").await, 1);
    // A user routing names who is not a member (here the author) counts too.
    let odd = append(store, &app, message_in("g", "a", "4", 2_003), &["a", "b"]).await;
    assert_eq!(pushed(&odd), vec![("a", 1), ("b", 4)]);
    assert_eq!(store.mark_read(&app, "g", "a", 4).await.unwrap(), 0);
    // Nobody notified (an API-only conversation): nothing counts.
    append(store, &app, message_in("g", "a", "5", 2_004), &[]).await;
    assert_eq!(unread_in(store, &app, "b", "g").await, 4);
}

/// Integration users are never notified, so nothing is ever unread for
/// them, whatever their member row says.
pub async fn integration_members_never_have_unread_messages(store: &dyn Store) {
    let app = tenant(store).await;
    let integration = User { id: "bridge".into(), ..User::new(UserKind::Integration, "Bridge") };
    store.insert_user(&app, &integration).await.unwrap();
    store.insert_user(&app, &user_named("a", "Anna")).await.unwrap();
    store.insert_user(&app, &user_named("b", "Boris")).await.unwrap();
    store.insert_conversation(&app, &conversation_with("ext", &["a", "b", "bridge"], 1_000)).await.unwrap();
    let outcome = append(store, &app, message_in("ext", "a", "hi", 2_000), &["b"]).await;
    assert_eq!(pushed(&outcome), vec![("b", 1)]);
    append(store, &app, message_in("ext", "bridge", "from outside", 2_001), &["a", "b"]).await;
    assert_eq!(store.unread_counts(&app, "bridge").await.unwrap(), Vec::new());
    assert_eq!(store.mark_read(&app, "ext", "bridge", 0).await.unwrap(), 0);
    assert_eq!(store.unread_counts(&app, "a").await.unwrap(), vec![("ext".to_owned(), 1)]);
    assert_eq!(store.unread_counts(&app, "b").await.unwrap(), vec![("ext".to_owned(), 2)]);
}

/// What a client reads after reconnecting (GetUnreadCounts, the conversation
/// list) agrees with the counts pushed live, and a send retried after the
/// reconnect (same client message id) counts once.
pub async fn unread_counts_read_again_after_reconnecting_match_the_pushed_counts(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("g1", &["me", "x"], 1_000)).await.unwrap();
    store.insert_conversation(&app, &conversation_with("g2", &["me", "x"], 2_000)).await.unwrap();
    let context_conversation = Conversation { context: context("Order", "7"), ..conversation_with("ctx", &[], 500) };
    store.insert_conversation(&app, &context_conversation).await.unwrap();
    append(store, &app, message_in("g1", "x", "one", 3_000), &["me"]).await;
    let sent = Message { client_message_id: Some("c-1".into()), ..message_in("g2", "x", "two", 3_001) };
    let live = append(store, &app, sent.clone(), &["me"]).await;
    let retried = append(store, &app, Message { id: new_id(), ..sent }, &["me"]).await;
    assert_eq!((retried.event, retried.unread), (None, Vec::new()));
    let in_context = append(store, &app, message_in("ctx", "x", "see the order", 3_002), &["me"]).await;
    assert_eq!(pushed(&in_context), vec![("me", 1)]);
    assert_eq!(pushed(&live), vec![("me", 1)]);
    let expected = vec![("ctx".to_owned(), 1), ("g1".to_owned(), 1), ("g2".to_owned(), 1)];
    assert_eq!(store.unread_counts(&app, "me").await.unwrap(), expected);
    assert_eq!(store.unread_counts(&app, "me").await.unwrap(), expected, "reading does not change counts");
    assert_eq!(conversation_ids(&store.conversation_list(&app, "me", 1).await.unwrap()), ["g2", "g1"]);
    store.mark_read(&app, "g2", "me", 10).await.unwrap();
    assert_eq!(conversation_ids(&store.conversation_list(&app, "me", 2).await.unwrap()), ["g1", "g2"]);
    assert_eq!(store.unread_counts(&app, "me").await.unwrap(), expected[..2].to_vec());
}

/// Edits replace content and log `MessageEdited`; deletes clear content, keep
/// the row and log `MessageDeleted`; deleted messages cannot change again.
pub async fn edits_and_deletes_are_logged_and_deleted_messages_keep_their_row(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("conv-1", &["a", "b"], 1_000)).await.unwrap();
    let original = Message {
        data: Some(MessageData { mime_type: "application/json".into(), content: b"{\"n\":1}".to_vec() }),
        buttons: Some(ButtonPanel { rows: vec![vec![button("Yes"), button("No")]] }),
        recipient_ids: strings(&["b"]),
        ..message_in("conv-1", "a", "Original", 2_000)
    };
    let appended = append(store, &app, original.clone(), &["b"]).await.message;
    assert_eq!(store.get_message(&app, &original.id).await.unwrap(), Some(appended.clone()));

    let edit = Message {
        text: "<b>Edited</b>".into(),
        text_format: TextFormat::Formatted,
        data: None,
        buttons: Some(ButtonPanel { rows: vec![vec![button("Maybe")]] }),
        edited_at: Some(3_000),
        // Routing-owned fields the edit must not change even if sent wrong.
        author_id: "b".into(),
        date: 9_999,
        ..appended.clone()
    };
    let (edited, event) = store.edit_message(&app, &edit).await.unwrap();
    let expected = Message {
        text: "<b>Edited</b>".into(),
        text_format: TextFormat::Formatted,
        data: None,
        buttons: Some(ButtonPanel { rows: vec![vec![button("Maybe")]] }),
        edited_at: Some(3_000),
        ..appended.clone()
    };
    assert_eq!(edited, expected);
    assert_eq!(event.seq, 2);
    assert_eq!(event.at, 3_000);
    assert_eq!(event.kind, EventKind::MessageEdited(expected.clone()));
    assert_eq!(store.get_message(&app, &original.id).await.unwrap(), Some(expected.clone()));

    let (deleted, event) = store.delete_message(&app, &original.id, 4_000).await.unwrap();
    let expected_deleted =
        Message { deleted: true, text: String::new(), data: None, buttons: None, ..expected.clone() };
    assert_eq!(deleted, expected_deleted);
    assert_eq!((event.seq, event.at), (3, 4_000));
    assert_eq!(event.kind, EventKind::MessageDeleted(expected_deleted.clone()));
    assert_eq!(store.get_message(&app, &original.id).await.unwrap(), Some(expected_deleted.clone()));
    assert_eq!(store.get_conversation(&app, "conv-1").await.unwrap().unwrap().last_seq, 3);

    assert_eq!(error_code(store.edit_message(&app, &edit).await), ErrorCode::MessageDeleted);
    assert_eq!(error_code(store.delete_message(&app, &original.id, 5_000).await), ErrorCode::MessageDeleted);
    let ghost = message_in("conv-1", "a", "ghost", 1);
    assert_eq!(error_code(store.edit_message(&app, &ghost).await), ErrorCode::MessageNotFound);
    assert_eq!(error_code(store.delete_message(&app, &ghost.id, 5_000).await), ErrorCode::MessageNotFound);
    assert_eq!(store.get_conversation(&app, "conv-1").await.unwrap().unwrap().last_seq, 3);

    let query = MessageQuery { limit: 10, conversation_id: "conv-1".into(), ..Default::default() };
    assert!(store.list_messages(&app, &query).await.unwrap().is_empty());
    let with_deleted = store.list_messages(&app, &MessageQuery { include_deleted: true, ..query }).await.unwrap();
    assert_eq!(with_deleted, vec![expected_deleted]);
}

/// The event log reads back in seq order, after a seq, at most `limit`.
pub async fn events_after_returns_events_in_seq_order_up_to_the_limit(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("conv-1", &["a"], 1_000)).await.unwrap();
    store.insert_conversation(&app, &conversation_with("conv-2", &["a"], 1_000)).await.unwrap();
    let mut created = Vec::new();
    for index in 0..4 {
        let outcome = append(store, &app, message_in("conv-1", "a", &format!("m{index}"), 2_000 + index), &[]).await;
        created.push(outcome.event.unwrap());
    }
    append(store, &app, message_in("conv-2", "a", "other conversation", 2_000), &[]).await;
    let target = created[1].clone();
    let EventKind::MessageCreated(message) = target.kind else { panic!("expected MessageCreated") };
    let (_, edited) = store.edit_message(&app, &Message { text: "m1 edited".into(), ..message }).await.unwrap();
    let (_, changed) = store
        .update_conversation(&app, "conv-1", &ConversationChange { title: Some("T".into()), ..Default::default() })
        .await
        .unwrap();

    let all = store.events_after(&app, "conv-1", 0, 100).await.unwrap();
    let mut expected = created.clone();
    expected.push(edited);
    expected.push(changed);
    assert_eq!(all, expected);
    assert_eq!(all.iter().map(|event| event.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);

    let window = store.events_after(&app, "conv-1", 2, 2).await.unwrap();
    assert_eq!(window, expected[2..4].to_vec());
    assert_eq!(store.events_after(&app, "conv-1", 5, 10).await.unwrap(), expected[5..].to_vec());
    assert!(store.events_after(&app, "conv-1", 6, 10).await.unwrap().is_empty());
    assert_eq!(store.events_after(&app, "conv-2", 0, 10).await.unwrap().len(), 1);
    assert!(store.events_after(&app, "no-such-conversation", 0, 10).await.unwrap().is_empty());
}

/// Messages come in seq order; author, date range (inclusive), text and
/// deleted filters combine with `after` paging in both directions.
pub async fn list_messages_filters_and_pages_by_seq(store: &dyn Store) {
    let app = tenant(store).await;
    let app = app.as_str();
    store.insert_conversation(app, &conversation_with("conv-1", &["a", "b"], 1_000)).await.unwrap();
    store.insert_conversation(app, &conversation_with("conv-2", &["a", "b"], 1_000)).await.unwrap();
    let texts = ["Hello World", "Привет МИР", "50% off", "plain_text", "hello again", "last"];
    let mut ids = Vec::new();
    for (index, text) in texts.iter().enumerate() {
        let author = if index % 2 == 0 { "a" } else { "b" };
        let offset = i64::try_from(index).unwrap() * 100;
        let message = append(store, app, message_in("conv-1", author, text, 100 + offset), &[]).await.message;
        ids.push(message.id);
    }
    append(store, app, message_in("conv-2", "a", "Hello from elsewhere", 150), &[]).await;
    store.delete_message(app, &ids[5], 1_000).await.unwrap();

    let base = MessageQuery { limit: 100, conversation_id: "conv-1".into(), ..Default::default() };
    let list = |query: MessageQuery| async move { seqs(&store.list_messages(app, &query).await.unwrap()) };

    assert_eq!(list(base.clone()).await, vec![1, 2, 3, 4, 5]);
    assert_eq!(list(MessageQuery { include_deleted: true, ..base.clone() }).await, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(list(MessageQuery { author_id: Some("b".into()), ..base.clone() }).await, vec![2, 4]);
    assert_eq!(list(MessageQuery { start_date: Some(200), end_date: Some(400), ..base.clone() }).await, vec![2, 3, 4]);
    assert_eq!(list(MessageQuery { start_date: Some(201), ..base.clone() }).await, vec![3, 4, 5]);
    assert_eq!(list(MessageQuery { end_date: Some(199), ..base.clone() }).await, vec![1]);
    assert_eq!(list(MessageQuery { text_contains: Some("HELLO".into()), ..base.clone() }).await, vec![1, 5]);
    assert_eq!(list(MessageQuery { text_contains: Some("мир".into()), ..base.clone() }).await, vec![2]);
    assert_eq!(list(MessageQuery { text_contains: Some("%".into()), ..base.clone() }).await, vec![3]);
    assert_eq!(list(MessageQuery { text_contains: Some("_".into()), ..base.clone() }).await, vec![4]);
    assert_eq!(list(MessageQuery { text_contains: Some("last".into()), ..base.clone() }).await, Vec::<u64>::new());

    let page = |direction, after: Option<usize>| MessageQuery {
        limit: 2,
        direction,
        after: after.map(|index| ids[index].clone()),
        ..base.clone()
    };
    use SortDirection::{Ascending, Descending};
    assert_eq!(list(page(Ascending, None)).await, vec![1, 2]);
    assert_eq!(list(page(Ascending, Some(1))).await, vec![3, 4]);
    assert_eq!(list(page(Ascending, Some(3))).await, vec![5]);
    assert_eq!(list(page(Descending, None)).await, vec![5, 4]);
    assert_eq!(list(page(Descending, Some(3))).await, vec![3, 2]);
    assert_eq!(list(page(Descending, Some(1))).await, vec![1]);
    assert_eq!(list(MessageQuery { after: Some("no-such-message".into()), ..base.clone() }).await, Vec::<u64>::new());

    let stored = store.list_messages(app, &MessageQuery { limit: 1, ..base }).await.unwrap();
    assert_eq!(stored[0].text, "Hello World");
    assert_eq!(stored[0].date, 100);
}

/// Watch mode is per (conversation, user) and overwritable; the audience
/// lists the explicit settings.
pub async fn watch_mode_is_stored_per_user_and_forms_the_notification_audience(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("conv-1", &["u1", "u2", "u3"], 1_000)).await.unwrap();
    store.insert_conversation(&app, &conversation_with("conv-2", &["u1"], 1_000)).await.unwrap();
    assert_eq!(store.get_watch_mode(&app, "conv-1", "u1").await.unwrap(), None);
    assert_eq!(store.notification_audience(&app, "conv-1").await.unwrap(), NotificationAudience::default());

    store.set_watch_mode(&app, "conv-1", "u2", false).await.unwrap();
    store.set_watch_mode(&app, "conv-1", "u1", true).await.unwrap();
    store.set_watch_mode(&app, "conv-2", "u1", false).await.unwrap();
    assert_eq!(store.get_watch_mode(&app, "conv-1", "u1").await.unwrap(), Some(true));
    assert_eq!(store.get_watch_mode(&app, "conv-1", "u2").await.unwrap(), Some(false));
    assert_eq!(store.get_watch_mode(&app, "conv-1", "u3").await.unwrap(), None);
    assert_eq!(
        store.notification_audience(&app, "conv-1").await.unwrap(),
        NotificationAudience { watch_modes: vec![("u1".into(), true), ("u2".into(), false)] }
    );

    store.set_watch_mode(&app, "conv-1", "u1", false).await.unwrap();
    assert_eq!(store.get_watch_mode(&app, "conv-1", "u1").await.unwrap(), Some(false));
    assert_eq!(
        store.notification_audience(&app, "conv-2").await.unwrap(),
        NotificationAudience { watch_modes: vec![("u1".into(), false)] }
    );
    let missing = store.set_watch_mode(&app, "no-such-conversation", "u1", true).await;
    assert_eq!(error_code(missing), ErrorCode::ConversationNotFound);
}

/// Do-not-disturb: a user-wide setting and per-conversation settings, each
/// set, replaced and cleared independently.
pub async fn do_not_disturb_is_user_wide_or_per_conversation(store: &dyn Store) {
    let app = tenant(store).await;
    let app = app.as_str();
    let get = |conversation: Option<&'static str>| async move {
        store.get_do_not_disturb(app, "u1", conversation).await.unwrap()
    };
    assert_eq!(get(Some("conv-1")).await, DoNotDisturbState::default());

    store.set_do_not_disturb(app, "u1", None, Some(10_000)).await.unwrap();
    store.set_do_not_disturb(app, "u1", Some("conv-1"), Some(20_000)).await.unwrap();
    store.set_do_not_disturb(app, "u2", None, Some(30_000)).await.unwrap();
    let both = DoNotDisturbState { user_until: Some(10_000), conversation_until: Some(20_000) };
    assert_eq!(get(Some("conv-1")).await, both);
    assert_eq!(get(Some("conv-2")).await, DoNotDisturbState { user_until: Some(10_000), conversation_until: None });
    assert_eq!(get(None).await, DoNotDisturbState { user_until: Some(10_000), conversation_until: None });

    store.set_do_not_disturb(app, "u1", Some("conv-1"), Some(25_000)).await.unwrap();
    store.set_do_not_disturb(app, "u1", None, None).await.unwrap();
    assert_eq!(get(Some("conv-1")).await, DoNotDisturbState { user_until: None, conversation_until: Some(25_000) });
    store.set_do_not_disturb(app, "u1", Some("conv-1"), None).await.unwrap();
    assert_eq!(get(Some("conv-1")).await, DoNotDisturbState::default());
    assert_eq!(
        store.get_do_not_disturb(app, "u2", Some("conv-1")).await.unwrap(),
        DoNotDisturbState { user_until: Some(30_000), conversation_until: None }
    );

    // The batched form answers for a whole audience at a point in time.
    store.set_do_not_disturb(app, "u3", Some("conv-2"), Some(40_000)).await.unwrap();
    let audience: Vec<String> = ["u1", "u2", "u3", "u4"].map(String::from).to_vec();
    assert_eq!(store.silenced_users(app, "conv-1", &audience, 20_000).await.unwrap(), ["u2"]);
    assert_eq!(store.silenced_users(app, "conv-2", &audience, 20_000).await.unwrap(), ["u2", "u3"]);
    assert_eq!(store.silenced_users(app, "conv-2", &audience, 35_000).await.unwrap(), ["u3"]);
    assert!(store.silenced_users(app, "conv-2", &audience, 40_000).await.unwrap().is_empty(), "until is exclusive");
    assert!(store.silenced_users(app, "conv-1", &[], 0).await.unwrap().is_empty());
}

/// Guests filtered in the query, so a page of N holds N non-guests when
/// that many exist.
pub async fn list_users_can_leave_guests_out_without_short_pages(store: &dyn Store) {
    let app = tenant(store).await;
    for (id, kind) in
        [("g1", UserKind::Guest), ("r1", UserKind::Regular), ("g2", UserKind::Guest), ("r2", UserKind::Regular)]
    {
        let user = User { id: id.to_owned(), ..User::new(kind, id.to_uppercase()) };
        store.insert_user(&app, &user).await.unwrap();
    }
    let page =
        store.list_users(&app, &UserQuery { limit: 2, exclude_guests: true, ..Default::default() }).await.unwrap();
    assert_eq!(page.iter().map(|user| user.id.as_str()).collect::<Vec<_>>(), ["r1", "r2"]);
    let everyone = store.list_users(&app, &UserQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(everyone.len(), 4);
}

// ---- tenant isolation

/// Two applications hold identical-looking data (same user, conversation and
/// message ids, keys, context objects, infobase ids). Every read returns only
/// the caller's application's rows, and every change leaves the other
/// application's rows exactly as they were.
pub async fn no_method_reads_or_changes_another_applications_rows(store: &dyn Store) {
    let app_a = tenant(store).await;
    let app_b = tenant(store).await;

    // The same ids and unique values in both applications: uniqueness is per
    // application, so all of this must insert cleanly.
    for (app, label) in [(&app_a, "A"), (&app_b, "B")] {
        for id in ["u1", "u2"] {
            let user = User {
                infobase_user_id: Some(format!("ib-{id}")),
                external_system_type: "telegram".into(),
                external_system_user_id: format!("tg-{id}"),
                matching_key: "mk".into(),
                ..user_named(id, &format!("{label} {id}"))
            };
            store.insert_user(app, &user).await.unwrap();
        }
        let shared = Conversation {
            key: Some("key".into()),
            title: format!("{label} shared"),
            ..conversation_with("conv", &["u1", "u2"], 1_000)
        };
        store.insert_conversation(app, &shared).await.unwrap();
        let contextual = Conversation {
            context: context("Document", "1"),
            title: format!("{label} context"),
            ..conversation_with("ctx", &["u1"], 1_000)
        };
        store.insert_conversation(app, &contextual).await.unwrap();
        let message = Message {
            id: "m1".into(),
            client_message_id: Some("client-1".into()),
            ..message_in("conv", "u1", &format!("{label} text"), 2_000)
        };
        append(store, app, message, &["u2"]).await;
        store.set_watch_mode(app, "conv", "u2", true).await.unwrap();
        store.set_do_not_disturb(app, "u2", None, Some(50_000)).await.unwrap();
    }
    store.insert_conversation(&app_a, &conversation_with("only-a", &["u1"], 1_000)).await.unwrap();
    append(store, &app_a, Message { id: "only-a-message".into(), ..message_in("only-a", "u1", "A", 3_000) }, &[]).await;

    // Snapshot B before A is changed.
    let snapshot = |app: String| async move {
        let users = UserQuery { limit: 100, include_blocked: true, ..Default::default() };
        let conversations = ConversationQuery { limit: 100, ..Default::default() };
        let messages =
            MessageQuery { limit: 100, conversation_id: "conv".into(), include_deleted: true, ..Default::default() };
        (
            store.list_users(&app, &users).await.unwrap(),
            store.list_conversations(&app, &conversations).await.unwrap(),
            store.list_messages(&app, &messages).await.unwrap(),
            store.events_after(&app, "conv", 0, 100).await.unwrap(),
            store.unread_counts(&app, "u2").await.unwrap(),
            store.notification_audience(&app, "conv").await.unwrap(),
            store.get_do_not_disturb(&app, "u2", Some("conv")).await.unwrap(),
            store.has_context_access(&app, "ctx", "u2").await.unwrap(),
        )
    };
    let before_b = snapshot(app_b.clone()).await;
    assert_eq!(names(&before_b.0), ["B u1", "B u2"]);
    assert_eq!(conversation_ids(&before_b.1), ["ctx", "conv"]);
    assert_eq!(before_b.2.len(), 1);
    assert_eq!(before_b.2[0].text, "B text");

    // Reads in A see A's rows only.
    assert_eq!(store.get_user(&app_a, "u1").await.unwrap().unwrap().name, "A u1");
    assert_eq!(store.get_user_by_infobase_id(&app_a, "ib-u1").await.unwrap().unwrap().name, "A u1");
    assert_eq!(names(&store.get_users(&app_a, &strings(&["u1", "u2"])).await.unwrap()), ["A u1", "A u2"]);
    let filtered = UserQuery {
        limit: 10,
        conversation_id: Some("conv".into()),
        matching_key: Some("mk".into()),
        ..Default::default()
    };
    assert_eq!(names(&store.list_users(&app_a, &filtered).await.unwrap()), ["A u1", "A u2"]);
    assert_eq!(store.count_users(&app_a).await.unwrap(), 2);
    assert_eq!(store.get_conversation(&app_a, "conv").await.unwrap().unwrap().title, "A shared");
    assert_eq!(store.get_conversation_by_key(&app_a, "key").await.unwrap().unwrap().title, "A shared");
    assert_eq!(store.get_conversation_by_context(&app_a, "Document", "1").await.unwrap().unwrap().title, "A context");
    assert_eq!(store.get_message(&app_a, "m1").await.unwrap().unwrap().text, "A text");
    assert_eq!(conversation_ids(&store.conversation_list(&app_a, "u2", 10).await.unwrap()), ["conv"]);
    let a_events = store.events_after(&app_a, "conv", 0, 10).await.unwrap();
    assert!(matches!(&a_events[0].kind, EventKind::MessageCreated(message) if message.text == "A text"));

    // Rows that exist only in A are invisible from B.
    assert_eq!(store.get_conversation(&app_b, "only-a").await.unwrap(), None);
    assert_eq!(store.get_message(&app_b, "only-a-message").await.unwrap(), None);
    assert!(store.events_after(&app_b, "only-a", 0, 10).await.unwrap().is_empty());
    let only_a_messages = MessageQuery { limit: 10, conversation_id: "only-a".into(), ..Default::default() };
    assert!(store.list_messages(&app_b, &only_a_messages).await.unwrap().is_empty());
    let only_a_members = UserQuery { limit: 10, conversation_id: Some("only-a".into()), ..Default::default() };
    assert!(store.list_users(&app_b, &only_a_members).await.unwrap().is_empty());
    let only_a_ids = ConversationQuery { limit: 10, ids: strings(&["only-a"]), ..Default::default() };
    assert!(store.list_conversations(&app_b, &only_a_ids).await.unwrap().is_empty());
    // Paging after an A-only conversation must not take A's date as anchor.
    let after_only_a = ConversationQuery {
        limit: 10,
        direction: SortDirection::Descending,
        after_id: Some("only-a".into()),
        ..Default::default()
    };
    assert!(store.list_conversations(&app_b, &after_only_a).await.unwrap().is_empty());

    // Changes addressed through B to A-only rows fail as not found.
    let to_only_a =
        NewMessage { message: message_in("only-a", "u1", "intruder", 4_000), notify_user_ids: strings(&["u1"]) };
    assert_eq!(error_code(store.append_message(&app_b, &to_only_a).await), ErrorCode::ConversationNotFound);
    let change = ConversationChange { title: Some("hijacked".into()), ..Default::default() };
    assert_eq!(error_code(store.update_conversation(&app_b, "only-a", &change).await), ErrorCode::ConversationNotFound);
    let foreign_message = Message { id: "only-a-message".into(), ..message_in("only-a", "u1", "edited", 4_000) };
    assert_eq!(error_code(store.edit_message(&app_b, &foreign_message).await), ErrorCode::MessageNotFound);
    assert_eq!(error_code(store.delete_message(&app_b, "only-a-message", 4_000).await), ErrorCode::MessageNotFound);
    assert_eq!(error_code(store.mark_read(&app_b, "only-a", "u1", 10).await), ErrorCode::ConversationNotFound);
    assert_eq!(error_code(store.set_watch_mode(&app_b, "only-a", "u1", true).await), ErrorCode::ConversationNotFound);
    let grant = store.set_context_access(&app_b, "only-a", &strings(&["u1"]), &[], Some(true)).await;
    assert_eq!(error_code(grant), ErrorCode::ConversationNotFound);
    let a_only = store.get_conversation(&app_a, "only-a").await.unwrap().unwrap();
    assert_eq!((a_only.title.as_str(), a_only.last_seq, a_only.all_application_users), ("", 1, false));

    // Every kind of change in A, on ids that B has too.
    let mut a_user = store.get_user(&app_a, "u1").await.unwrap().unwrap();
    a_user.name = "A renamed".into();
    a_user.blocked = true;
    store.update_user(&app_a, &a_user).await.unwrap();
    store.set_subscriber_administrators(&app_a, &strings(&["u1", "u2"])).await.unwrap();
    let change = ConversationChange {
        title: Some("A renamed".into()),
        displayed: Some(false),
        add_member_ids: strings(&["u3"]),
        remove_member_ids: strings(&["u1", "u2"]),
    };
    store.update_conversation(&app_a, "conv", &change).await.unwrap();
    let retry = Message {
        id: "m-retry".into(),
        client_message_id: Some("client-1".into()),
        ..message_in("conv", "u1", "retry", 5_000)
    };
    let retried = append(store, &app_a, retry, &["u2"]).await;
    assert_eq!((retried.message.id.as_str(), retried.event), ("m1", None));
    append(store, &app_a, Message { id: "m2".into(), ..message_in("conv", "u1", "A second", 5_000) }, &["u2"]).await;
    let a_message = store.get_message(&app_a, "m1").await.unwrap().unwrap();
    store.edit_message(&app_a, &Message { text: "A edited".into(), ..a_message }).await.unwrap();
    store.delete_message(&app_a, "m2", 6_000).await.unwrap();
    store.mark_read(&app_a, "conv", "u2", 1).await.unwrap();
    store.set_context_access(&app_a, "ctx", &strings(&["u2"]), &[], Some(true)).await.unwrap();
    store.set_watch_mode(&app_a, "conv", "u2", false).await.unwrap();
    store.set_do_not_disturb(&app_a, "u2", None, None).await.unwrap();
    store.set_do_not_disturb(&app_a, "u2", Some("conv"), Some(60_000)).await.unwrap();

    // A changed...
    let after_a = snapshot(app_a.clone()).await;
    assert_eq!(names(&after_a.0), ["A renamed", "A u2"]);
    assert!(after_a.0.iter().all(|user| user.subscriber_administrator));
    let a_conversation = after_a.1.iter().find(|conversation| conversation.id == "conv").unwrap();
    assert_eq!(a_conversation.title, "A renamed");
    assert_eq!(a_conversation.member_ids, strings(&["u3"]));
    assert_eq!(
        after_a.2.iter().map(|message| (message.text.as_str(), message.deleted)).collect::<Vec<_>>(),
        [("A edited", false), ("", true)]
    );
    assert_eq!(after_a.3.len(), 5);
    assert_eq!(after_a.4, vec![("conv".to_owned(), 1)]);
    assert_eq!(after_a.5.watch_modes, vec![("u2".to_owned(), false)]);
    assert_eq!(after_a.6, DoNotDisturbState { user_until: None, conversation_until: Some(60_000) });
    assert!(after_a.7);

    // ...and B is exactly as it was.
    assert_eq!(snapshot(app_b.clone()).await, before_b);
    let b_conversation = store.get_conversation(&app_b, "conv").await.unwrap().unwrap();
    assert_eq!((b_conversation.title.as_str(), b_conversation.last_seq), ("B shared", 1));
    assert_eq!(b_conversation.member_ids, strings(&["u1", "u2"]));
    assert_eq!(store.get_user(&app_b, "u1").await.unwrap().unwrap().name, "B u1");
    assert!(!store.get_user(&app_b, "u1").await.unwrap().unwrap().subscriber_administrator);
    assert_eq!(store.count_users(&app_b).await.unwrap(), 2);
    assert_eq!(store.get_watch_mode(&app_b, "conv", "u2").await.unwrap(), Some(true));
    assert_eq!(store.get_conversation_by_key(&app_b, "key").await.unwrap().unwrap().title, "B shared");
    assert!(!store.get_conversation(&app_b, "ctx").await.unwrap().unwrap().all_application_users);
    assert_eq!(store.mark_read(&app_b, "conv", "u2", 0).await.unwrap(), 1);
}
