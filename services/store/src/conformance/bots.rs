//! Conformance tests of [`BotStore`](crate::BotStore): bots, integrations,
//! subscriptions, the outbox and the delivery queues. Listed in
//! [`conformance_suite!`](crate::conformance_suite) with the others.

use std::collections::BTreeMap;

use beseda_core::ErrorCode;
use beseda_core::bots::*;
use beseda_core::model::*;
use futures_util::future::join_all;

use super::{append, conversation_with, error_code, message_in, strings, tenant};
use crate::bots::{Claim, OutboxEntry};
use crate::{ConversationChange, Store};

// ---- helpers

fn bot(id: &str, user_id: &str, bot_type: &str, predefined: bool) -> Bot {
    Bot {
        id: id.to_owned(),
        user_id: user_id.to_owned(),
        bot_type: bot_type.to_owned(),
        additional_parameters: BTreeMap::from([("mode".to_owned(), "test".to_owned())]),
        predefined,
        infobase_user_name: "Administrator".into(),
        created_at: 1_000,
    }
}

fn integration(id: &str, key: &str, token: &str) -> Integration {
    Integration {
        id: id.to_owned(),
        system_type: "webhook".into(),
        key: key.to_owned(),
        enabled: true,
        parameters: BTreeMap::from([("url".to_owned(), "https://example.com/hook".to_owned())]),
        presentation: format!("Integration {key}"),
        default_member_ids: strings(&["u1", "u2"]),
        connection_token: token.to_owned(),
        signing_secret: Some("signing".into()),
        own_user_id: None,
        created_at: 1_000,
        strict_status_codes: false,
    }
}

fn subscription(id: &str, enabled: bool) -> EventSubscription {
    EventSubscription {
        id: id.to_owned(),
        url: "https://example.com/events".into(),
        secret: "secret".into(),
        event_kinds: strings(&["message.created"]),
        conversation_ids: Vec::new(),
        enabled,
        created_at: 1_000,
    }
}

/// A delivery of a message event in `conversation_id` to a bot.
fn delivery(consumer_id: &str, conversation_id: &str, seq: u64) -> NewDelivery {
    let message = Message {
        id: format!("{conversation_id}-{seq}"),
        seq,
        ..message_in(conversation_id, "author", &format!("m{seq}"), 1_000)
    };
    NewDelivery {
        consumer_kind: ConsumerKind::Bot,
        consumer_id: consumer_id.to_owned(),
        kind: BotEventKind::Message.as_str().to_owned(),
        event: ApplicationEvent {
            conversation_id: conversation_id.to_owned(),
            seq,
            at: 1_000,
            kind: ApplicationEventKind::MessageCreated { message },
        },
    }
}

fn claim_bots(now: Micros, visible_again_at: Micros) -> Claim {
    Claim {
        consumer_kind: ConsumerKind::Bot,
        consumer_ids: Vec::new(),
        now,
        visible_again_at,
        max_attempts: 5,
        limit: 10,
    }
}

/// (conversation, seq, attempts) of claimed deliveries, for compact asserts.
fn claimed(deliveries: &[Delivery]) -> Vec<(&str, u64, u32)> {
    deliveries
        .iter()
        .map(|delivery| (delivery.event.conversation_id.as_str(), delivery.event.seq, delivery.attempts))
        .collect()
}

/// The application's outbox rows (the outbox is shared by all tenants).
async fn outbox_of(store: &dyn Store, application_id: &str) -> Vec<OutboxEntry> {
    let entries = store.outbox_batch(10_000).await.unwrap();
    assert!(entries.windows(2).all(|pair| pair[0].id < pair[1].id), "outbox rows come in id order");
    entries.into_iter().filter(|entry| entry.application_id == application_id).collect()
}

fn event_names(entries: &[OutboxEntry]) -> Vec<&'static str> {
    entries.iter().map(|entry| entry.event.kind.name()).collect()
}

// ---- bots, integrations, subscriptions

/// Bots are stored and listed in creation order; a user serves one bot and
/// a type has one predefined bot; lifecycle changes reach the outbox.
pub async fn bots_are_stored_with_one_bot_per_user_and_one_predefined_bot_per_type(store: &dyn Store) {
    let app = tenant(store).await;
    let echo = bot("bot-1", "u1", "EchoBot", false);
    store.insert_bot(&app, &echo).await.unwrap();
    let helper = Bot { created_at: 2_000, ..bot("bot-2", "u2", "HelperBot", true) };
    store.insert_bot(&app, &helper).await.unwrap();
    assert_eq!(store.get_bot(&app, "bot-1").await.unwrap(), Some(echo.clone()));
    assert_eq!(store.get_bot_by_user(&app, "u2").await.unwrap(), Some(helper.clone()));
    assert_eq!(store.get_bot(&app, "no-such-bot").await.unwrap(), None);
    assert_eq!(store.list_bots(&app).await.unwrap(), vec![echo.clone(), helper.clone()]);

    let same_user = store.insert_bot(&app, &bot("bot-3", "u1", "OtherBot", false)).await;
    assert_eq!(error_code(same_user), ErrorCode::BotUserTaken);
    let second_predefined = store.insert_bot(&app, &bot("bot-3", "u3", "HelperBot", true)).await;
    assert_eq!(error_code(second_predefined), ErrorCode::AlreadyExists);
    let same_id = store.insert_bot(&app, &bot("bot-1", "u4", "EchoBot", false)).await;
    assert_eq!(error_code(same_id), ErrorCode::AlreadyExists);
    // Only predefined bots are unique per type.
    store.insert_bot(&app, &Bot { created_at: 3_000, ..bot("bot-3", "u3", "HelperBot", false) }).await.unwrap();

    let renamed = Bot { infobase_user_name: "Robot".into(), created_at: 9_999, ..echo.clone() };
    store.update_bot(&app, &renamed).await.unwrap();
    let stored = store.get_bot(&app, "bot-1").await.unwrap().unwrap();
    assert_eq!(stored, Bot { created_at: echo.created_at, ..renamed.clone() });
    let taken = store.update_bot(&app, &Bot { user_id: "u2".into(), ..renamed.clone() }).await;
    assert_eq!(error_code(taken), ErrorCode::BotUserTaken);
    let missing = store.update_bot(&app, &bot("no-such-bot", "u9", "EchoBot", false)).await;
    assert_eq!(error_code(missing), ErrorCode::BotNotFound);

    // Deleting a bot deletes its queue, dead letters included.
    store
        .enqueue(&app, &[delivery("bot-1", "c1", 1), delivery("bot-1", "c1", 2), delivery("bot-2", "c1", 1)])
        .await
        .unwrap();
    let first = store.claim(&app, &Claim { consumer_ids: strings(&["bot-1"]), ..claim_bots(10, 20) }).await.unwrap();
    store.fail(&app, first[0].id, "broken", 0, true).await.unwrap();
    store.delete_bot(&app, "bot-1").await.unwrap();
    assert_eq!(store.get_bot(&app, "bot-1").await.unwrap(), None);
    assert_eq!(store.queue_depth(&app, "bot-1").await.unwrap(), 0);
    assert!(store.list_dead(&app, ConsumerKind::Bot, Some("bot-1"), 0, 10).await.unwrap().is_empty());
    assert_eq!(store.queue_depth(&app, "bot-2").await.unwrap(), 1);
    assert_eq!(error_code(store.delete_bot(&app, "bot-1").await), ErrorCode::BotNotFound);

    let outbox = outbox_of(store, &app).await;
    assert_eq!(event_names(&outbox), ["bot.created", "bot.created", "bot.created", "bot.updated", "bot.deleted"]);
    assert!(outbox.iter().all(|entry| entry.event.conversation_id.is_empty() && entry.event.seq == 0));
    assert_eq!(outbox[3].event.kind, ApplicationEventKind::BotUpdated { bot: stored.clone() });
    assert_eq!(outbox[4].event.kind, ApplicationEventKind::BotDeleted { bot: stored });
}

/// Integrations have unique keys and tokens; the token finds the tenant;
/// each external id maps once and goes with its integration.
pub async fn integrations_are_found_by_token_and_map_external_ids_once(store: &dyn Store) {
    let app = tenant(store).await;
    let webhook = integration("int-1", "crm", "token-1");
    store.insert_integration(&app, &webhook).await.unwrap();
    let second = Integration {
        created_at: 2_000,
        own_user_id: Some("own".into()),
        signing_secret: None,
        strict_status_codes: true,
        ..integration("int-2", "erp", "token-2")
    };
    store.insert_integration(&app, &second).await.unwrap();
    assert_eq!(store.get_integration(&app, "int-1").await.unwrap(), Some(webhook.clone()));
    assert_eq!(store.list_integrations(&app).await.unwrap(), vec![webhook.clone(), second.clone()]);
    assert_eq!(store.find_integration_by_token("token-2").await.unwrap(), Some((app.clone(), second.clone())));
    assert_eq!(store.find_integration_by_token("no-such-token").await.unwrap(), None);

    let key_taken = store.insert_integration(&app, &integration("int-3", "crm", "token-3")).await;
    assert_eq!(error_code(key_taken), ErrorCode::IntegrationKeyTaken);
    let token_taken = store.insert_integration(&app, &integration("int-3", "other", "token-1")).await;
    assert_eq!(error_code(token_taken), ErrorCode::AlreadyExists);

    let disabled = Integration {
        enabled: false,
        presentation: "Switched off".into(),
        strict_status_codes: true,
        ..webhook.clone()
    };
    store.update_integration(&app, &disabled).await.unwrap();
    assert_eq!(store.get_integration(&app, "int-1").await.unwrap(), Some(disabled.clone()));
    let key_taken = store.update_integration(&app, &Integration { key: "erp".into(), ..disabled.clone() }).await;
    assert_eq!(error_code(key_taken), ErrorCode::IntegrationKeyTaken);
    let missing = store.update_integration(&app, &integration("no-such", "x", "token-x")).await;
    assert_eq!(error_code(missing), ErrorCode::IntegrationNotFound);

    store.put_integration_user(&app, "int-1", "ext-user", "u1").await.unwrap();
    let again = store.put_integration_user(&app, "int-1", "ext-user", "u2").await;
    assert_eq!(error_code(again), ErrorCode::AlreadyExists);
    assert_eq!(store.get_integration_user(&app, "int-1", "ext-user").await.unwrap().as_deref(), Some("u1"));
    assert_eq!(store.get_integration_user(&app, "int-2", "ext-user").await.unwrap(), None);

    let mapping = IntegrationConversation {
        ext_conversation_id: "ext-conv".into(),
        conversation_id: "c1".into(),
        anonymous: true,
    };
    store.put_integration_conversation(&app, "int-1", &mapping).await.unwrap();
    let again = store
        .put_integration_conversation(&app, "int-1", &IntegrationConversation { anonymous: false, ..mapping.clone() })
        .await;
    assert_eq!(error_code(again), ErrorCode::AlreadyExists);
    assert_eq!(store.get_integration_conversation(&app, "int-1", "ext-conv").await.unwrap(), Some(mapping.clone()));

    store.put_integration_message(&app, "int-1", "ext-conv", "ext-msg", "m1").await.unwrap();
    let replayed = store.put_integration_message(&app, "int-1", "ext-conv", "ext-msg", "m2").await;
    assert_eq!(error_code(replayed), ErrorCode::AlreadyExists);
    // The same external message id in another external conversation is another message.
    store.put_integration_message(&app, "int-1", "ext-conv-2", "ext-msg", "m3").await.unwrap();
    assert_eq!(
        store.get_integration_message(&app, "int-1", "ext-conv", "ext-msg").await.unwrap().as_deref(),
        Some("m1")
    );

    let unknown = store.put_integration_user(&app, "no-such", "ext-user", "u1").await;
    assert_eq!(error_code(unknown), ErrorCode::IntegrationNotFound);

    store.delete_integration(&app, "int-1").await.unwrap();
    assert_eq!(store.get_integration(&app, "int-1").await.unwrap(), None);
    assert_eq!(store.find_integration_by_token("token-1").await.unwrap(), None);
    assert_eq!(store.get_integration_user(&app, "int-1", "ext-user").await.unwrap(), None);
    assert_eq!(store.get_integration_conversation(&app, "int-1", "ext-conv").await.unwrap(), None);
    assert_eq!(store.get_integration_message(&app, "int-1", "ext-conv", "ext-msg").await.unwrap(), None);
    assert_eq!(error_code(store.delete_integration(&app, "int-1").await), ErrorCode::IntegrationNotFound);
    // Re-created, it starts without mappings.
    store.insert_integration(&app, &webhook).await.unwrap();
    store.put_integration_user(&app, "int-1", "ext-user", "u2").await.unwrap();
}

/// Subscriptions are stored and listed; deleting one deletes its queue; the
/// dispatcher's work list holds applications with an enabled subscription.
pub async fn subscriptions_are_stored_and_deleted_with_their_queue(store: &dyn Store) {
    let app = tenant(store).await;
    let idle = tenant(store).await;
    let first = subscription("sub-1", true);
    let second = EventSubscription {
        created_at: 2_000,
        event_kinds: Vec::new(),
        conversation_ids: strings(&["c1", "c2"]),
        ..subscription("sub-2", true)
    };
    store.insert_subscription(&app, &first).await.unwrap();
    store.insert_subscription(&app, &second).await.unwrap();
    store.insert_subscription(&idle, &subscription("sub-3", false)).await.unwrap();
    assert_eq!(error_code(store.insert_subscription(&app, &first).await), ErrorCode::AlreadyExists);
    assert_eq!(store.get_subscription(&app, "sub-1").await.unwrap(), Some(first.clone()));
    assert_eq!(store.list_subscriptions(&app).await.unwrap(), vec![first.clone(), second.clone()]);
    assert_eq!(store.applications_with_subscriptions().await.unwrap(), vec![app.clone()]);

    let changed = EventSubscription { url: "https://example.com/v2".into(), enabled: false, ..first.clone() };
    store.update_subscription(&app, &changed).await.unwrap();
    assert_eq!(store.get_subscription(&app, "sub-1").await.unwrap(), Some(changed));
    let missing = store.update_subscription(&app, &subscription("no-such", true)).await;
    assert_eq!(error_code(missing), ErrorCode::SubscriptionNotFound);

    let to_subscription = |id: &str, seq| NewDelivery {
        consumer_kind: ConsumerKind::Subscription,
        consumer_id: id.to_owned(),
        kind: "message.created".into(),
        ..delivery("unused", "c1", seq)
    };
    store.enqueue(&app, &[to_subscription("sub-2", 1), to_subscription("sub-2", 2)]).await.unwrap();
    assert_eq!(store.queue_depth(&app, "sub-2").await.unwrap(), 2);
    let claim = Claim { consumer_kind: ConsumerKind::Subscription, ..claim_bots(10, 20) };
    let claimed_now = store.claim(&app, &claim).await.unwrap();
    assert_eq!(claimed(&claimed_now), [("c1", 1, 1)]);
    assert_eq!(claimed_now[0].consumer_kind, ConsumerKind::Subscription);
    assert_eq!(claimed_now[0].kind, "message.created");
    store.delete_subscription(&app, "sub-2").await.unwrap();
    assert_eq!(store.queue_depth(&app, "sub-2").await.unwrap(), 0);
    assert_eq!(store.get_subscription(&app, "sub-2").await.unwrap(), None);
    assert_eq!(error_code(store.delete_subscription(&app, "sub-2").await), ErrorCode::SubscriptionNotFound);
    assert!(store.applications_with_subscriptions().await.unwrap().is_empty());
}

// ---- the outbox

/// Every conversation change writes its application event, with exact
/// membership deltas; an idempotent append retry writes none.
pub async fn conversation_changes_write_their_events_to_the_outbox(store: &dyn Store) {
    let app = tenant(store).await;
    let created = conversation_with("c1", &["a", "b"], 1_000);
    store.insert_conversation(&app, &created).await.unwrap();
    let change = ConversationChange {
        add_member_ids: strings(&["c", "b", "c"]),
        remove_member_ids: strings(&["a", "nobody"]),
        ..Default::default()
    };
    let (changed, change_event) = store.update_conversation(&app, "c1", &change).await.unwrap();
    let original = Message { client_message_id: Some("client-1".into()), ..message_in("c1", "b", "hello", 2_000) };
    let appended = append(store, &app, original.clone(), &["c"]).await;
    let retry = append(store, &app, Message { id: new_id(), ..original }, &["c"]).await;
    assert_eq!(retry.event, None);
    let edit = Message { text: "edited".into(), edited_at: Some(5_000), ..appended.message.clone() };
    let (edited, _) = store.edit_message(&app, &edit).await.unwrap();
    let (deleted, _) = store.delete_message(&app, &edited.id, 6_000).await.unwrap();

    let outbox = outbox_of(store, &app).await;
    assert_eq!(
        event_names(&outbox),
        ["conversation.created", "conversation.changed", "message.created", "message.edited", "message.deleted"]
    );
    let events: Vec<&ApplicationEvent> = outbox.iter().map(|entry| &entry.event).collect();
    assert_eq!(
        *events[0],
        ApplicationEvent {
            conversation_id: "c1".into(),
            seq: 0,
            at: 1_000,
            kind: ApplicationEventKind::ConversationCreated { conversation: created },
        }
    );
    assert_eq!(
        *events[1],
        ApplicationEvent {
            conversation_id: "c1".into(),
            seq: 1,
            at: change_event.at,
            kind: ApplicationEventKind::ConversationChanged {
                conversation: changed,
                added_member_ids: strings(&["c"]),
                removed_member_ids: strings(&["a"]),
            },
        }
    );
    assert_eq!(events[2].kind, ApplicationEventKind::MessageCreated { message: appended.message.clone() });
    assert_eq!((events[2].seq, events[2].at), (2, 2_000));
    assert_eq!(events[3].kind, ApplicationEventKind::MessageEdited { message: edited });
    assert_eq!((events[3].seq, events[3].at), (3, 5_000));
    assert_eq!(events[4].kind, ApplicationEventKind::MessageDeleted { message: deleted });
    assert_eq!((events[4].seq, events[4].at), (4, 6_000));

    // A change that fails writes nothing.
    let duplicate = store.insert_conversation(&app, &conversation_with("c1", &["a"], 1_000)).await;
    assert!(duplicate.is_err());
    assert_eq!(outbox_of(store, &app).await.len(), 5);
}

/// A relay moves outbox rows into queues in one transaction; rows that are
/// gone (relayed by another relay) make the whole relay fail.
pub async fn relay_outbox_moves_rows_into_queues_atomically(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("c1", &["a"], 1_000)).await.unwrap();
    let published = ApplicationEvent {
        conversation_id: "c1".into(),
        seq: 0,
        at: 1_500,
        kind: ApplicationEventKind::BotCreated { bot: bot("bot-1", "u1", "EchoBot", false) },
    };
    store.publish_event(&app, &published).await.unwrap();
    let outbox = outbox_of(store, &app).await;
    assert_eq!(event_names(&outbox), ["conversation.created", "bot.created"]);
    assert_eq!(outbox[1].event, published);

    let to_bot = |entry: &OutboxEntry, bot_id: &str| {
        (
            app.clone(),
            NewDelivery {
                consumer_kind: ConsumerKind::Bot,
                consumer_id: bot_id.to_owned(),
                kind: BotEventKind::ConversationCreated.as_str().to_owned(),
                event: entry.event.clone(),
            },
        )
    };
    store.relay_outbox(&[outbox[0].id], &[to_bot(&outbox[0], "bot-1"), to_bot(&outbox[0], "bot-2")]).await.unwrap();
    assert_eq!(outbox_of(store, &app).await.len(), 1);
    assert_eq!(store.queue_depth(&app, "bot-1").await.unwrap(), 1);
    assert_eq!(store.queue_depth(&app, "bot-2").await.unwrap(), 1);

    // One row already relayed: nothing of this relay happens.
    let stale = store.relay_outbox(&[outbox[0].id, outbox[1].id], &[to_bot(&outbox[1], "bot-1")]).await;
    assert_eq!(error_code(stale), ErrorCode::AlreadyExists);
    assert_eq!(outbox_of(store, &app).await.len(), 1);
    assert_eq!(store.queue_depth(&app, "bot-1").await.unwrap(), 1);

    // Rows nobody wants are just deleted.
    store.relay_outbox(&[outbox[1].id], &[]).await.unwrap();
    assert!(outbox_of(store, &app).await.is_empty());
    let delivered = store.claim(&app, &claim_bots(10, 20)).await.unwrap();
    assert_eq!(delivered.len(), 2);
    assert!(delivered.iter().all(|delivery| delivery.event == outbox[0].event && delivery.attempts == 1));
}

/// Replays read the conversation event log: one conversation after a seq,
/// or the whole application by time.
pub async fn events_for_replay_read_the_log_by_seq_or_by_time(store: &dyn Store) {
    let app = tenant(store).await;
    store.insert_conversation(&app, &conversation_with("c1", &["a"], 1_000)).await.unwrap();
    store.insert_conversation(&app, &conversation_with("c2", &["a"], 1_000)).await.unwrap();
    let first = append(store, &app, message_in("c1", "a", "first", 2_000), &[]).await.message;
    append(store, &app, message_in("c2", "a", "other", 2_500), &[]).await;
    let edit = Message { text: "edited".into(), edited_at: Some(3_000), ..first.clone() };
    store.edit_message(&app, &edit).await.unwrap();
    store.delete_message(&app, &first.id, 4_000).await.unwrap();

    let one = store.events_for_replay(&app, Some("c1"), 1, 0, 10).await.unwrap();
    assert_eq!(
        one.iter().map(|event| (event.seq, event.kind.name())).collect::<Vec<_>>(),
        [(2, "message.edited"), (3, "message.deleted")]
    );
    let limited = store.events_for_replay(&app, Some("c1"), 0, 0, 1).await.unwrap();
    assert_eq!(limited[0].kind, ApplicationEventKind::MessageCreated { message: first });

    let all = store.events_for_replay(&app, None, 0, 2_500, 10).await.unwrap();
    let order: Vec<(&str, u64, Micros)> =
        all.iter().map(|event| (event.conversation_id.as_str(), event.seq, event.at)).collect();
    assert_eq!(order, [("c2", 1, 2_500), ("c1", 2, 3_000), ("c1", 3, 4_000)]);

    let (changed, _) = store
        .update_conversation(&app, "c2", &ConversationChange { add_member_ids: strings(&["b"]), ..Default::default() })
        .await
        .unwrap();
    let replayed = store.events_for_replay(&app, Some("c2"), 1, 0, 10).await.unwrap();
    assert_eq!(
        replayed[0].kind,
        ApplicationEventKind::ConversationChanged {
            conversation: changed,
            added_member_ids: Vec::new(),
            removed_member_ids: Vec::new(),
        }
    );
}

// ---- the queues

/// A claim hands out the first live delivery of each (consumer,
/// conversation) only; the next waits for its acknowledgement, and an
/// unacknowledged claim comes back after its visibility timeout.
pub async fn claims_keep_conversation_order_with_one_delivery_in_flight(store: &dyn Store) {
    let app = tenant(store).await;
    store
        .enqueue(&app, &[delivery("bot-1", "A", 1), delivery("bot-1", "A", 2), delivery("bot-1", "B", 1)])
        .await
        .unwrap();
    assert_eq!(store.queue_depth(&app, "bot-1").await.unwrap(), 3);
    assert_eq!(store.next_due(&app, ConsumerKind::Bot).await.unwrap(), Some(0));
    assert_eq!(store.next_due(&app, ConsumerKind::Subscription).await.unwrap(), None);

    let first = store.claim(&app, &claim_bots(1_000, 2_000)).await.unwrap();
    assert_eq!(claimed(&first), [("A", 1, 1), ("B", 1, 1)]);
    assert!(first[0].id < first[1].id);
    assert_eq!((first[0].consumer_id.as_str(), first[0].kind.as_str(), first[0].dead), ("bot-1", "message", false));
    assert_eq!(first[0].event, delivery("bot-1", "A", 1).event);
    assert!(store.claim(&app, &claim_bots(1_000, 2_000)).await.unwrap().is_empty());
    assert_eq!(store.next_due(&app, ConsumerKind::Bot).await.unwrap(), Some(0), "A2 is due, only held back");

    assert!(store.acknowledge(&app, first[0].id).await.unwrap());
    assert!(!store.acknowledge(&app, first[0].id).await.unwrap());
    // Several at once: only the pending ones are reported (and removed).
    assert_eq!(store.acknowledge_many(&app, &[first[0].id, -1]).await.unwrap(), Vec::<i64>::new());
    let second = store.claim(&app, &claim_bots(1_500, 5_000)).await.unwrap();
    assert_eq!(claimed(&second), [("A", 2, 1)]);
    assert_eq!(store.next_due(&app, ConsumerKind::Bot).await.unwrap(), Some(2_000));

    // B1 was never acknowledged: visible again at 2000, with one more attempt.
    assert!(store.claim(&app, &claim_bots(1_999, 6_000)).await.unwrap().is_empty());
    let again = store.claim(&app, &claim_bots(2_000, 6_000)).await.unwrap();
    assert_eq!(claimed(&again), [("B", 1, 2)]);
    assert_eq!(again[0].id, first[1].id);

    // Released deliveries are due at once and keep their attempt counts.
    store.release(&app, &[second[0].id, again[0].id], 2_500).await.unwrap();
    let released = store.claim(&app, &claim_bots(2_500, 9_000)).await.unwrap();
    assert_eq!(claimed(&released), [("A", 2, 2), ("B", 1, 3)]);

    // Other consumers are not held back by bot-1, and filters apply.
    let lifecycle = |seq| NewDelivery { kind: "bot_event".into(), ..delivery("bot-2", "", seq) };
    store.enqueue(&app, &[delivery("bot-2", "A", 1), lifecycle(1), lifecycle(2)]).await.unwrap();
    let only_bot_1 = Claim { consumer_ids: strings(&["bot-1"]), ..claim_bots(3_000, 9_000) };
    assert!(store.claim(&app, &only_bot_1).await.unwrap().is_empty());
    let subscriptions = Claim { consumer_kind: ConsumerKind::Subscription, ..claim_bots(3_000, 9_000) };
    assert!(store.claim(&app, &subscriptions).await.unwrap().is_empty());
    let limited = store.claim(&app, &Claim { limit: 1, ..claim_bots(3_000, 9_000) }).await.unwrap();
    assert_eq!(claimed(&limited), [("A", 1, 1)]);
    // Events outside conversations are ordered among themselves the same way.
    let rest = store.claim(&app, &claim_bots(3_000, 9_000)).await.unwrap();
    assert_eq!(claimed(&rest), [("", 1, 1)]);
    assert!(store.acknowledge(&app, rest[0].id).await.unwrap());
    let last = store.claim(&app, &claim_bots(3_000, 9_000)).await.unwrap();
    assert_eq!(claimed(&last), [("", 2, 1)]);
    let acknowledged = store.acknowledge_many(&app, &[last[0].id, limited[0].id, rest[0].id]).await.unwrap();
    assert_eq!(acknowledged.len(), 2, "the two pending ones, not the one acknowledged before");
    assert!(acknowledged.contains(&last[0].id) && acknowledged.contains(&limited[0].id));
    assert_eq!(store.queue_depth(&app, "bot-2").await.unwrap(), 0);
}

/// Concurrent claims never hand out one delivery twice.
pub async fn concurrent_claims_hand_out_each_delivery_once(store: &dyn Store) {
    let app = tenant(store).await;
    let deliveries: Vec<NewDelivery> =
        (0..40).map(|index| delivery("bot-1", &format!("c{}", index % 20), index / 20 + 1)).collect();
    store.enqueue(&app, &deliveries).await.unwrap();
    let claim = Claim { limit: 5, ..claim_bots(1_000, 2_000) };
    let claims = (0..8).map(|_| store.claim(&app, &claim));
    let mut ids: Vec<i64> = join_all(claims)
        .await
        .into_iter()
        .flat_map(|claimed| claimed.unwrap())
        .inspect(|delivery| assert_eq!((delivery.event.seq, delivery.attempts), (1, 1)))
        .map(|delivery| delivery.id)
        .collect();
    let claimed_count = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), claimed_count, "a delivery was claimed twice");
    let rest = store.claim(&app, &Claim { limit: 100, ..claim_bots(1_000, 2_000) }).await.unwrap();
    assert_eq!(claimed_count + rest.len(), 20, "one delivery per conversation in flight");
}

/// Failed deliveries retry later or become dead letters, which stop
/// blocking their conversation and can be retried or discarded.
pub async fn failed_and_exhausted_deliveries_become_dead_letters(store: &dyn Store) {
    let app = tenant(store).await;
    store
        .enqueue(
            &app,
            &[
                delivery("bot-1", "A", 1),
                delivery("bot-1", "A", 2),
                delivery("bot-1", "C", 1),
                delivery("bot-2", "D", 1),
            ],
        )
        .await
        .unwrap();
    let first = store.claim(&app, &claim_bots(1_000, 2_000)).await.unwrap();
    assert_eq!(claimed(&first), [("A", 1, 1), ("C", 1, 1), ("D", 1, 1)]);
    let (a1, c1, d1) = (first[0].id, first[1].id, first[2].id);

    store.fail(&app, a1, "handler crashed", 0, true).await.unwrap();
    let dead = store.list_dead(&app, ConsumerKind::Bot, None, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].id, dead[0].dead, dead[0].last_error.as_str(), dead[0].attempts),
        (a1, true, "handler crashed", 1)
    );
    // The dead letter no longer holds A back.
    assert_eq!(claimed(&store.claim(&app, &claim_bots(1_000, 2_000)).await.unwrap()), [("A", 2, 1)]);
    assert_eq!(store.queue_depth(&app, "bot-1").await.unwrap(), 2);

    store.fail(&app, c1, "try later", 3_000, false).await.unwrap();
    assert_eq!(store.next_due(&app, ConsumerKind::Bot).await.unwrap(), Some(2_000));
    let bot_1 =
        |now, visible_again_at| Claim { consumer_ids: strings(&["bot-1"]), ..claim_bots(now, visible_again_at) };
    assert_eq!(claimed(&store.claim(&app, &bot_1(2_999, 4_000)).await.unwrap()), [("A", 2, 2)]);
    assert_eq!(claimed(&store.claim(&app, &bot_1(3_000, 4_000)).await.unwrap()), [("C", 1, 2)]);

    // Out of attempts: due deliveries turn dead at claim time instead.
    let exhausted = Claim { max_attempts: 2, ..claim_bots(4_000, 5_000) };
    let handed_out = store.claim(&app, &exhausted).await.unwrap();
    assert_eq!(claimed(&handed_out), [("D", 1, 2)], "D had one attempt left");
    let dead = store.list_dead(&app, ConsumerKind::Bot, Some("bot-1"), 0, 10).await.unwrap();
    let summary: Vec<(i64, &str)> = dead.iter().map(|delivery| (delivery.id, delivery.last_error.as_str())).collect();
    assert_eq!(summary.len(), 3);
    assert_eq!(summary[0], (a1, "handler crashed"));
    assert!(summary[1].1.contains("gave up after 2 attempts"), "{summary:?}");
    assert_eq!(summary[2], (c1, "try later"), "a recorded error is kept");
    let paged = store.list_dead(&app, ConsumerKind::Bot, Some("bot-1"), summary[0].0, 1).await.unwrap();
    assert_eq!(paged.iter().map(|delivery| delivery.id).collect::<Vec<_>>(), [summary[1].0]);
    assert!(store.list_dead(&app, ConsumerKind::Bot, Some("bot-2"), 0, 10).await.unwrap().is_empty());
    assert!(store.list_dead(&app, ConsumerKind::Subscription, None, 0, 10).await.unwrap().is_empty());
    assert_eq!(store.queue_depth(&app, "bot-1").await.unwrap(), 0);
    assert_eq!(store.next_due(&app, ConsumerKind::Bot).await.unwrap(), Some(5_000));

    // Retried dead letters start over; live deliveries are not "retried".
    assert_eq!(store.retry_dead(&app, &[a1, c1, d1], 6_000).await.unwrap(), 2);
    let again = store.claim(&app, &bot_1(6_000, 7_000)).await.unwrap();
    assert_eq!(claimed(&again), [("A", 1, 1), ("C", 1, 1)]);
    assert!(!again[0].dead);
    assert_eq!(store.discard_dead(&app, &[a1, summary[1].0]).await.unwrap(), 1, "only the dead one is discarded");
    assert!(store.list_dead(&app, ConsumerKind::Bot, None, 0, 10).await.unwrap().is_empty());
    assert_eq!(store.queue_depth(&app, "bot-1").await.unwrap(), 2);

    assert_eq!(error_code(store.fail(&app, 999_999_999, "x", 0, true).await), ErrorCode::DeliveryNotFound);
}

/// Another application can neither see nor change this one's bots,
/// integrations, subscriptions, queues or event log.
pub async fn bot_rows_and_queues_are_isolated_between_applications(store: &dyn Store) {
    let app_a = tenant(store).await;
    let app_b = tenant(store).await;
    store.insert_bot(&app_a, &bot("bot-1", "u1", "EchoBot", true)).await.unwrap();
    // Per-application uniqueness: the same ids and values are fine in B.
    store.insert_bot(&app_b, &bot("bot-1", "u1", "EchoBot", true)).await.unwrap();
    store.insert_bot(&app_a, &bot("bot-a", "ua", "OnlyA", false)).await.unwrap();
    store.insert_integration(&app_a, &integration("int-1", "crm", "token-a")).await.unwrap();
    store.insert_integration(&app_b, &integration("int-b", "crm", "token-b")).await.unwrap();
    store.put_integration_user(&app_a, "int-1", "ext", "u1").await.unwrap();
    store.insert_subscription(&app_a, &subscription("sub-1", true)).await.unwrap();
    store.insert_conversation(&app_a, &conversation_with("c1", &["u1"], 1_000)).await.unwrap();
    append(store, &app_a, message_in("c1", "u1", "secret", 2_000), &[]).await;
    store.enqueue(&app_a, &[delivery("bot-a", "c1", 1), delivery("bot-a", "c1", 2)]).await.unwrap();
    let dead = store.claim(&app_a, &claim_bots(1_000, 2_000)).await.unwrap();
    store.fail(&app_a, dead[0].id, "dead in A", 0, true).await.unwrap();
    let live = store.claim(&app_a, &claim_bots(1_000, 2_000)).await.unwrap();
    assert_eq!(claimed(&live), [("c1", 2, 1)]);

    assert_eq!(store.get_bot(&app_b, "bot-a").await.unwrap(), None);
    assert_eq!(store.get_bot_by_user(&app_b, "ua").await.unwrap(), None);
    assert_eq!(store.list_bots(&app_b).await.unwrap().len(), 1);
    assert_eq!(error_code(store.delete_bot(&app_b, "bot-a").await), ErrorCode::BotNotFound);
    assert_eq!(error_code(store.update_bot(&app_b, &bot("bot-a", "ub", "X", false)).await), ErrorCode::BotNotFound);
    assert_eq!(store.get_integration(&app_b, "int-1").await.unwrap(), None);
    assert_eq!(store.list_integrations(&app_b).await.unwrap().len(), 1);
    assert_eq!(store.get_integration_user(&app_b, "int-1", "ext").await.unwrap(), None);
    let foreign = store.put_integration_user(&app_b, "int-1", "ext-2", "u1").await;
    assert_eq!(error_code(foreign), ErrorCode::IntegrationNotFound);
    assert_eq!(error_code(store.delete_integration(&app_b, "int-1").await), ErrorCode::IntegrationNotFound);
    assert_eq!(store.find_integration_by_token("token-a").await.unwrap().unwrap().0, app_a);
    assert_eq!(store.get_subscription(&app_b, "sub-1").await.unwrap(), None);
    assert!(store.list_subscriptions(&app_b).await.unwrap().is_empty());
    assert_eq!(error_code(store.delete_subscription(&app_b, "sub-1").await), ErrorCode::SubscriptionNotFound);

    assert!(store.claim(&app_b, &claim_bots(9_000, 10_000)).await.unwrap().is_empty());
    assert!(!store.acknowledge(&app_b, live[0].id).await.unwrap());
    assert!(store.acknowledge_many(&app_b, &[live[0].id, dead[0].id]).await.unwrap().is_empty());
    assert_eq!(error_code(store.fail(&app_b, live[0].id, "x", 0, true).await), ErrorCode::DeliveryNotFound);
    store.release(&app_b, &[live[0].id], 0).await.unwrap();
    assert!(store.list_dead(&app_b, ConsumerKind::Bot, None, 0, 10).await.unwrap().is_empty());
    assert_eq!(store.retry_dead(&app_b, &[dead[0].id], 0).await.unwrap(), 0);
    assert_eq!(store.discard_dead(&app_b, &[dead[0].id]).await.unwrap(), 0);
    assert_eq!(store.queue_depth(&app_b, "bot-a").await.unwrap(), 0);
    assert_eq!(store.next_due(&app_b, ConsumerKind::Bot).await.unwrap(), None);
    assert!(store.events_for_replay(&app_b, None, 0, 0, 10).await.unwrap().is_empty());
    assert!(store.events_for_replay(&app_b, Some("c1"), 0, 0, 10).await.unwrap().is_empty());

    // A is untouched: the live delivery is still hidden, the dead letter still there.
    assert!(store.claim(&app_a, &claim_bots(1_500, 3_000)).await.unwrap().is_empty());
    assert_eq!(store.list_dead(&app_a, ConsumerKind::Bot, None, 0, 10).await.unwrap().len(), 1);
    assert_eq!(store.queue_depth(&app_a, "bot-a").await.unwrap(), 1);
    assert_eq!(store.get_integration_user(&app_a, "int-1", "ext").await.unwrap().as_deref(), Some("u1"));
    assert_eq!(store.events_for_replay(&app_a, None, 0, 0, 10).await.unwrap().len(), 1);
}
