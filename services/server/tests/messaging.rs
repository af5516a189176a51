//! Real-time messaging over real sockets: delivery, resume, idempotency,
//! limits and the conversation rules.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn two_users_in_a_group_exchange_messages_in_real_time() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, _) = user(&server, &application, "11111111-0000-0000-0000-000000000001", "Alice").await;
    let (bob_id, _) = user(&server, &application, "11111111-0000-0000-0000-000000000002", "Bob").await;
    let conversation_id = group(&server, &application, "Team", &[&alice_id, &bob_id]).await;

    // Both subscribe; Alice sends over WebSocket; Bob receives the event and a notification.
    let mut alice = Client::connect(&server, &application.token("11111111-0000-0000-0000-000000000001", "Alice")).await;
    let mut bob = Client::connect(&server, &application.token("11111111-0000-0000-0000-000000000002", "Bob")).await;
    for client in [&mut alice, &mut bob] {
        let subscribed = client.request(json!({"subscribe": {"conversation": {"id": conversation_id}}})).await;
        assert_eq!(subscribed["subscribed"]["conversationId"], conversation_id.as_str(), "{subscribed}");
    }
    let sent =
        alice.request(json!({"sendMessage": {"conversation": {"id": conversation_id}, "text": "hello, Bob"}})).await;
    assert_eq!(sent["message"]["text"], "hello, Bob", "{sent}");
    assert_eq!(sent["message"]["authorId"], alice_id.as_str());

    let event = bob.next_event().await;
    assert_eq!(event["messageCreated"]["text"], "hello, Bob");
    assert_eq!(event["seq"], "1");
    let notification = bob.next_user_event("notification").await;
    assert_eq!(notification["conversationId"], conversation_id.as_str());
    assert_eq!(notification["authorId"], alice_id.as_str());

    // Bob answers through the REST API; Alice sees it live.
    server
        .ok(
            "POST",
            &format!("/api/v1/conversations/{conversation_id}/messages"),
            &application.user("11111111-0000-0000-0000-000000000002", "Bob"),
            Some(json!({"text": "hi, Alice"})),
        )
        .await;
    // Alice's own message reaches her other devices too, then Bob's answer.
    assert_eq!(alice.next_event().await["messageCreated"]["text"], "hello, Bob");
    let event = alice.next_event().await;
    assert_eq!(event["messageCreated"]["text"], "hi, Alice");
    assert_eq!(event["messageCreated"]["authorId"], bob_id.as_str());
    assert_eq!(event["seq"], "2");
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_the_missed_events_in_order() {
    let Team { server, application, alice, conversation_id, .. } = Team::start().await;
    let send = |text: String| {
        let server = &server;
        let alice = alice.clone();
        let path = format!("/api/v1/conversations/{conversation_id}/messages");
        async move { server.ok("POST", &path, &alice, Some(json!({"text": text}))).await }
    };

    // Bob sees messages 1..=3 live, then disconnects.
    let mut bob = Client::connect(&server, &application.token("b1", "Bob")).await;
    bob.request(json!({"subscribe": {"conversation": {"id": conversation_id}}})).await;
    for index in 1..=3 {
        send(format!("message {index}")).await;
    }
    let mut last_seq = 0;
    for index in 1..=3 {
        let event = bob.next_event().await;
        assert_eq!(event["messageCreated"]["text"], format!("message {index}"));
        last_seq = event["seq"].as_str().unwrap().parse::<u64>().unwrap();
    }
    bob.close().await;

    // Messages arrive while Bob is away.
    for index in 4..=8 {
        send(format!("message {index}")).await;
    }

    // Bob reconnects with his last seq: exactly 4..=8 arrive, in order, then live ones.
    let mut bob = Client::connect(&server, &application.token("b1", "Bob")).await;
    let subscribed = bob
        .request(json!({"subscribe": {"conversation": {"id": conversation_id}, "afterSeq": last_seq.to_string()}}))
        .await;
    assert_eq!(subscribed["subscribed"]["lastSeq"], "8", "{subscribed}");
    for index in 4..=8 {
        let event = bob.next_event().await;
        assert_eq!(event["messageCreated"]["text"], format!("message {index}"));
    }
    send("message 9".into()).await;
    let event = bob.next_event().await;
    assert_eq!(event["messageCreated"]["text"], "message 9");
    assert_eq!(event["seq"], "9");
}

#[tokio::test]
async fn duplicate_sends_with_one_client_id_store_one_message() {
    let Team { server, application, alice, conversation_id, .. } = Team::start().await;
    let path = format!("/api/v1/conversations/{conversation_id}/messages");
    let body = json!({"text": "pay the invoice", "clientMessageId": "retry-1"});
    let first = server.ok("POST", &path, &alice, Some(body.clone())).await;
    let second = server.ok("POST", &path, &alice, Some(body.clone())).await;
    assert_eq!(first["id"], second["id"]);
    let listed = server.ok("POST", &format!("{path}/search"), &alice, Some(json!({}))).await;
    assert_eq!(listed["messages"].as_array().unwrap().len(), 1, "{listed}");
    // Bob got one notification, not two.
    let unread = server.ok("GET", "/api/v1/unread", &application.user("b1", "Bob"), None).await;
    assert_eq!(unread["totalUnread"], 1, "{unread}");
}

#[tokio::test]
async fn limits_are_enforced_with_typed_errors() {
    let Team { server, application, alice, conversation_id, .. } = Team::start().await;
    let path = format!("/api/v1/conversations/{conversation_id}/messages");

    let at_limit = "я".repeat(4000);
    server.ok("POST", &path, &alice, Some(json!({"text": at_limit}))).await;
    let error = server.fails("POST", &path, &alice, Some(json!({"text": "я".repeat(4001)})), "text_too_long").await;
    assert_eq!(error["field"], "text");
    // 1C counts UTF-16 code units: an emoji is two characters, so 2,000 of
    // them are the limit and one letter more is over it.
    let emoji = "😀".repeat(2000);
    server.ok("POST", &path, &alice, Some(json!({"text": emoji}))).await;
    let error = server.fails("POST", &path, &alice, Some(json!({"text": format!("{emoji}я")})), "text_too_long").await;
    assert_eq!(error["message"], "text has 4001 characters; at most 4000 are allowed");
    let error = server
        .fails("POST", &path, &alice, Some(json!({"text": format!("{}😀", "я".repeat(3999))})), "text_too_long")
        .await;
    assert_eq!(error["field"], "text");

    use base64::Engine;
    let encode = |size: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; size]);
    server
        .ok(
            "POST",
            &path,
            &alice,
            Some(json!({"data": {"mimeType": "application/octet-stream", "content": encode(102_400)}})),
        )
        .await;
    server
        .fails(
            "POST",
            &path,
            &alice,
            Some(json!({"data": {"mimeType": "application/octet-stream", "content": encode(102_401)}})),
            "data_too_large",
        )
        .await;
    server.fails("POST", &path, &alice, Some(json!({"text": "   "})), "message_empty").await;

    let button = json!({"text": "OK", "action": "BUTTON_ACTION_SEND_MESSAGE", "enabled": true});
    let row = json!({"buttons": vec![button.clone(); 10]});
    server.ok("POST", &path, &alice, Some(json!({"text": "choose", "buttons": {"rows": vec![row.clone(); 10]}}))).await;
    server
        .fails(
            "POST",
            &path,
            &alice,
            Some(json!({"text": "choose", "buttons": {"rows": vec![row.clone(); 11]}})),
            "button_panel_too_large",
        )
        .await;
    let bot_button = json!({"text": "Go", "action": "BUTTON_ACTION_PROCESS_BY_BOT"});
    server
        .fails(
            "POST",
            &path,
            &alice,
            Some(json!({"text": "x", "buttons": {"rows": [{"buttons": [bot_button]}]}})),
            "invalid_button",
        )
        .await;

    let too_many: Vec<String> = (0..3001).map(|index| format!("u{index}")).collect();
    server
        .fails(
            "POST",
            "/api/v1/conversations",
            &application.privileged(),
            Some(json!({"conversation": {"title": "Everyone", "group": true, "memberIds": too_many}})),
            "too_many_members",
        )
        .await;
    server.fails("POST", &format!("{path}/search"), &alice, Some(json!({"count": 251})), "count_out_of_range").await;
}

#[tokio::test]
async fn a_blocked_user_cannot_connect_and_cannot_be_messaged() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, _) = user(&server, &application, "b1", "Bob").await;
    let one_on_one = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &alice,
            Some(json!({"conversation": {"group": false, "memberIds": [bob_id]}})),
        )
        .await;
    let conversation_id = one_on_one["id"].as_str().unwrap().to_owned();

    // Blocking closes Bob's open connection with a typed error.
    let mut connected_bob = Client::connect(&server, &application.token("b1", "Bob")).await;
    server
        .ok(
            "PATCH",
            &format!("/api/v1/users/{bob_id}"),
            &application.privileged(),
            Some(json!({"updateMask": ["blocked"], "user": {"blocked": true}})),
        )
        .await;
    let closing = connected_bob.next_push().await;
    assert_eq!(closing["error"]["code"], "user_blocked", "{closing}");
    let refused =
        Client::try_connect(&server, json!({"hello": {"protocolVersion": 1, "token": application.token("b1", "Bob")}}))
            .await
            .err()
            .expect("a blocked user is refused");
    assert_eq!(refused["error"]["code"], "user_blocked", "{refused}");
    server
        .fails(
            "POST",
            &format!("/api/v1/conversations/{conversation_id}/messages"),
            &alice,
            Some(json!({"text": "hi"})),
            "recipient_blocked",
        )
        .await;
    server
        .fails(
            "POST",
            "/api/v1/conversations",
            &application.privileged(),
            Some(json!({"conversation": {"title": "x", "group": true, "memberIds": [alice_id, bob_id]}})),
            "recipient_blocked",
        )
        .await;
}

#[tokio::test]
async fn one_on_one_and_read_only_rules_hold() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, _) = user(&server, &application, "b1", "Bob").await;
    let (carol_id, _) = user(&server, &application, "c1", "Carol").await;

    // One-on-one: exactly two members, no title, no membership changes, cannot be left.
    server
        .fails(
            "POST",
            "/api/v1/conversations",
            &alice,
            Some(json!({"conversation": {"group": false, "memberIds": [bob_id, carol_id]}})),
            "one_on_one_rules",
        )
        .await;
    server
        .fails(
            "POST",
            "/api/v1/conversations",
            &alice,
            Some(json!({"conversation": {"group": false, "title": "x", "memberIds": [bob_id]}})),
            "one_on_one_rules",
        )
        .await;
    let pair = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &alice,
            Some(json!({"conversation": {"group": false, "memberIds": [bob_id]}})),
        )
        .await;
    let pair_id = pair["id"].as_str().unwrap();
    server
        .fails(
            "PATCH",
            &format!("/api/v1/conversations/{pair_id}"),
            &alice,
            Some(json!({"addMemberIds": [carol_id]})),
            "one_on_one_rules",
        )
        .await;
    server.fails("POST", &format!("/api/v1/conversations/{pair_id}/leave"), &alice, None, "one_on_one_rules").await;

    // Read-only: created in privileged mode only; members cannot post, rename or leave; the application can post.
    server
        .fails(
            "POST",
            "/api/v1/conversations",
            &alice,
            Some(json!({"conversation": {"title": "News", "group": true, "readOnly": true, "memberIds": [bob_id]}})),
            "privileged_mode_required",
        )
        .await;
    let news = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &application.privileged(),
            Some(json!({"conversation": {"title": "News", "group": true, "readOnly": true, "memberIds": [alice_id, bob_id]}})),
        )
        .await;
    let news_id = news["id"].as_str().unwrap();
    let messages = format!("/api/v1/conversations/{news_id}/messages");
    server.fails("POST", &messages, &alice, Some(json!({"text": "hi"})), "conversation_read_only").await;
    server
        .fails(
            "PATCH",
            &format!("/api/v1/conversations/{news_id}"),
            &alice,
            Some(json!({"title": "Mine"})),
            "conversation_read_only",
        )
        .await;
    server
        .fails("POST", &format!("/api/v1/conversations/{news_id}/leave"), &alice, None, "conversation_read_only")
        .await;
    let posted = server
        .ok(
            "POST",
            &messages,
            &application.privileged(),
            Some(json!({"text": "release 2.0", "authorId": alice_id, "date": "2020-01-02T03:04:05Z"})),
        )
        .await;
    assert_eq!(posted["date"], "2020-01-02T03:04:05Z", "canonical proto3 JSON: UTC with Z");
    assert_eq!(posted["authorId"], alice_id.as_str());
    // Setting the author or date needs privileged mode.
    let group_id = group(&server, &application, "Team", &[&alice_id, &bob_id]).await;
    server
        .fails(
            "POST",
            &format!("/api/v1/conversations/{group_id}/messages"),
            &alice,
            Some(json!({"text": "x", "authorId": bob_id})),
            "privileged_mode_required",
        )
        .await;
}

#[tokio::test]
async fn keys_are_unique_and_context_objects_have_one_conversation() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let app = application.privileged();

    let keyed = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &app,
            Some(json!({"conversation": {"title": "Orders", "group": true, "key": "orders", "memberIds": [alice_id]}})),
        )
        .await;
    server
        .fails(
            "POST",
            "/api/v1/conversations",
            &app,
            Some(json!({"conversation": {"title": "Again", "group": true, "key": "orders"}})),
            "conversation_key_taken",
        )
        .await;
    let by_key = server.ok("GET", "/api/v1/conversations/by-key/orders", &alice, None).await;
    assert_eq!(by_key["id"], keyed["id"]);
    // The key cannot be changed: the update message has no such field.
    server
        .fails(
            "PATCH",
            &format!("/api/v1/conversations/{}", keyed["id"].as_str().unwrap()),
            &app,
            Some(json!({"key": "other"})),
            "malformed_request",
        )
        .await;

    let context = json!({"objectType": "Document.SalesOrder", "objectId": "6f1c0e2a-0000-0000-0000-000000000001"});
    let first = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &app,
            Some(json!({"conversation": {"title": "Order 1", "context": context}})),
        )
        .await;
    assert_eq!(first["displayed"], true, "context conversations are always displayed");
    server
        .fails(
            "POST",
            "/api/v1/conversations",
            &app,
            Some(json!({"conversation": {"title": "Order 1 again", "context": context}})),
            "context_conversation_exists",
        )
        .await;
    // Access to a context conversation is granted by the application.
    server
        .fails("POST", "/api/v1/conversations/by-context", &alice, Some(json!({"context": context})), "not_a_member")
        .await;
    let first_id = first["id"].as_str().unwrap();
    server
        .ok("PUT", &format!("/api/v1/conversations/{first_id}/access"), &app, Some(json!({"grantUserIds": [alice_id]})))
        .await;
    let found = server.ok("POST", "/api/v1/conversations/by-context", &alice, Some(json!({"context": context}))).await;
    assert_eq!(found["id"], first_id);
}

#[tokio::test]
async fn watch_mode_and_do_not_disturb_decide_notifications() {
    let Team { server, application, alice, bob_id, bob, conversation_id, .. } = Team::start().await;
    let messages = format!("/api/v1/conversations/{conversation_id}/messages");
    let mut bob_client = Client::connect(&server, &application.token("b1", "Bob")).await;

    // Default: members of a non-context conversation are notified.
    server.ok("POST", &messages, &alice, Some(json!({"text": "one"}))).await;
    let notification = bob_client.next_user_event("notification").await;
    assert_eq!(notification["silent"], serde_json::Value::Null, "not silent by default: {notification}");

    // Do-not-disturb: still counted, delivered silently.
    let until = "2999-01-01T00:00:00Z";
    let dnd = server.ok("PUT", "/api/v1/do-not-disturb", &bob, Some(json!({"until": until}))).await;
    assert_eq!(dnd["active"], true);
    server.ok("POST", &messages, &alice, Some(json!({"text": "two"}))).await;
    let notification = bob_client.next_user_event("notification").await;
    assert_eq!(notification["silent"], true, "{notification}");
    server.ok("PUT", "/api/v1/do-not-disturb", &bob, Some(json!({}))).await;

    // Watch mode off: no notification at all.
    let watch = server
        .ok("PUT", &format!("/api/v1/conversations/{conversation_id}/watch"), &bob, Some(json!({"watch": false})))
        .await;
    assert_eq!(watch["watch"], serde_json::Value::Null, "false is omitted in canonical JSON: {watch}");
    server.ok("POST", &messages, &alice, Some(json!({"text": "three"}))).await;
    bob_client.expect_no_user_event("notification", Duration::from_millis(300)).await;
    let unread = server.ok("GET", "/api/v1/unread", &bob, None).await;
    assert_eq!(unread["totalUnread"], 2, "{unread}");

    // Changing another user's mode needs privileged mode.
    server
        .fails(
            "PUT",
            &format!("/api/v1/conversations/{conversation_id}/watch"),
            &alice,
            Some(json!({"watch": true, "userId": bob_id})),
            "privileged_mode_required",
        )
        .await;
    server
        .ok(
            "PUT",
            &format!("/api/v1/conversations/{conversation_id}/watch"),
            &application.privileged(),
            Some(json!({"watch": true, "userId": bob_id})),
        )
        .await;

    // Context conversation: recipients are notified, others only when watching.
    let context = json!({"objectType": "Catalog.Clients", "objectId": "client-7"});
    let app = application.privileged();
    let task = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &app,
            Some(json!({"conversation": {"title": "Client 7", "context": context}})),
        )
        .await;
    let task_id = task["id"].as_str().unwrap();
    server
        .ok("PUT", &format!("/api/v1/conversations/{task_id}/access"), &app, Some(json!({"allApplicationUsers": true})))
        .await;
    let task_messages = format!("/api/v1/conversations/{task_id}/messages");
    server.ok("POST", &task_messages, &alice, Some(json!({"text": "for everyone"}))).await;
    bob_client.expect_no_user_event("notification", Duration::from_millis(300)).await;
    server.ok("POST", &task_messages, &alice, Some(json!({"text": "for Bob", "recipientIds": [bob_id]}))).await;
    let notification = bob_client.next_user_event("notification").await;
    assert_eq!(notification["conversationId"], task_id);
}

#[tokio::test]
async fn the_conversation_list_puts_unread_first_and_pages_by_date() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, bob) = user(&server, &application, "b1", "Bob").await;
    let mut ids = Vec::new();
    for index in 0..5 {
        let id = group(&server, &application, &format!("Room {index}"), &[&alice_id, &bob_id]).await;
        server
            .ok(
                "POST",
                &format!("/api/v1/conversations/{id}/messages"),
                &bob,
                Some(json!({"text": format!("in room {index}")})),
            )
            .await;
        ids.push(id);
    }
    // Alice reads everything, then one old room gets a new message from Bob... and she reads room 4 only.
    for id in &ids {
        server.ok("POST", &format!("/api/v1/conversations/{id}/read"), &alice, Some(json!({}))).await;
    }
    let unread_room = &ids[1];
    server
        .ok("POST", &format!("/api/v1/conversations/{unread_room}/messages"), &bob, Some(json!({"text": "news"})))
        .await;
    let list = server.ok("GET", "/api/v1/conversation-list", &alice, None).await;
    let listed: Vec<&str> =
        list["conversations"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(listed[0], unread_room, "unread first: {list}");
    assert_eq!(list["conversations"][0]["unreadCount"], 1);
    assert_eq!(listed.len(), 5);
    assert_eq!(
        &listed[1..],
        &[ids[4].as_str(), ids[3].as_str(), ids[2].as_str(), ids[0].as_str()],
        "then newest first"
    );

    // Paging GetConversations by StartDate, two at a time, ascending: every room exactly once.
    let mut seen = Vec::new();
    let mut filter = json!({"count": 2, "sortDirection": "SORT_DIRECTION_ASCENDING"});
    loop {
        let page = server.ok("POST", "/api/v1/conversations/search", &alice, Some(filter.clone())).await;
        let conversations = page["conversations"].as_array().cloned().unwrap_or_default();
        if conversations.is_empty() {
            break;
        }
        for conversation in &conversations {
            seen.push(conversation["id"].as_str().unwrap().to_owned());
        }
        let last = conversations.last().unwrap();
        filter["startDate"] = last["lastMessageAt"].clone();
        filter["after"] = last["id"].clone();
    }
    let mut expected = ids.clone();
    expected.retain(|id| id != unread_room);
    expected.push(unread_room.clone());
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn messages_page_with_after_in_both_directions() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let conversation_id = group(&server, &application, "Notes", &[&alice_id]).await;
    let path = format!("/api/v1/conversations/{conversation_id}/messages");
    for index in 0..7 {
        server.ok("POST", &path, &alice, Some(json!({"text": format!("note {index}")}))).await;
    }
    for (direction, expected) in [
        ("SORT_DIRECTION_ASCENDING", (0..7).collect::<Vec<_>>()),
        ("SORT_DIRECTION_DESCENDING", (0..7).rev().collect::<Vec<_>>()),
    ] {
        let mut texts = Vec::new();
        let mut filter = json!({"count": 3, "sortDirection": direction});
        loop {
            let page = server.ok("POST", &format!("{path}/search"), &alice, Some(filter.clone())).await;
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                break;
            }
            texts.extend(messages.iter().map(|message| message["text"].as_str().unwrap().to_owned()));
            filter["after"] = messages.last().unwrap()["id"].clone();
        }
        let expected: Vec<String> = expected.iter().map(|index| format!("note {index}")).collect();
        assert_eq!(texts, expected, "{direction}");
    }
}

#[tokio::test]
async fn edits_and_deletes_reach_subscribers_and_only_the_author_may_make_them() {
    let Team { server, application, alice, bob, conversation_id, .. } = Team::start().await;
    let mut bob_client = Client::connect(&server, &application.token("b1", "Bob")).await;
    bob_client.request(json!({"subscribe": {"conversation": {"id": conversation_id}}})).await;
    let sent = server
        .ok(
            "POST",
            &format!("/api/v1/conversations/{conversation_id}/messages"),
            &alice,
            Some(json!({"text": "draft"})),
        )
        .await;
    let message_id = sent["id"].as_str().unwrap();
    assert_eq!(bob_client.next_event().await["messageCreated"]["text"], "draft");

    server
        .fails(
            "PATCH",
            &format!("/api/v1/messages/{message_id}"),
            &bob,
            Some(json!({"text": "hacked"})),
            "permission_denied",
        )
        .await;
    let edited =
        server.ok("PATCH", &format!("/api/v1/messages/{message_id}"), &alice, Some(json!({"text": "final"}))).await;
    assert_eq!(edited["text"], "final");
    assert!(edited["editedAt"].is_string());
    assert_eq!(bob_client.next_event().await["messageEdited"]["text"], "final");
    server.ok("DELETE", &format!("/api/v1/messages/{message_id}"), &alice, None).await;
    let deleted = bob_client.next_event().await;
    assert_eq!(deleted["messageDeleted"]["id"], message_id);
    server
        .fails(
            "PATCH",
            &format!("/api/v1/messages/{message_id}"),
            &alice,
            Some(json!({"text": "again"})),
            "message_deleted",
        )
        .await;
}

#[tokio::test]
async fn when_the_last_member_leaves_the_conversation_is_inaccessible_but_kept() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, bob) = user(&server, &application, "b1", "Bob").await;
    let conversation_id = group(&server, &application, "Temporary", &[&alice_id, &bob_id]).await;
    let path = format!("/api/v1/conversations/{conversation_id}");
    server.ok("POST", &format!("{path}/messages"), &alice, Some(json!({"text": "keep me"}))).await;

    // Members may rename and add, but only privileged mode removes others.
    server.ok("PATCH", &path, &bob, Some(json!({"title": "Renamed by Bob"}))).await;
    server.fails("PATCH", &path, &bob, Some(json!({"removeMemberIds": [alice_id]})), "privileged_mode_required").await;

    server.ok("POST", &format!("{path}/leave"), &alice, None).await;
    server.fails("POST", &format!("{path}/messages"), &alice, Some(json!({"text": "back?"})), "not_a_member").await;
    server.ok("POST", &format!("{path}/leave"), &bob, None).await;
    server.fails("GET", &path, &bob, None, "not_a_member").await;

    // The content is kept: the application still reads it.
    let kept = server.ok("GET", &path, &application.privileged(), None).await;
    assert!(kept.get("memberIds").is_none(), "no members left: {kept}");
    let messages =
        server.ok("POST", &format!("{path}/messages/search"), &application.privileged(), Some(json!({}))).await;
    assert_eq!(messages["messages"][0]["text"], "keep me");
}

#[tokio::test]
async fn an_update_that_changes_nothing_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let conversation_id = group(&server, &application, "Team", &[&alice_id]).await;
    let sent = server
        .ok(
            "POST",
            &format!("/api/v1/conversations/{conversation_id}/messages"),
            &alice,
            Some(json!({"text": "as is"})),
        )
        .await;
    let message_path = format!("/api/v1/messages/{}", sent["id"].as_str().unwrap());
    server.fails("PATCH", &message_path, &alice, Some(json!({})), "field_required").await;
    let unchanged = server.ok("GET", &message_path, &alice, None).await;
    assert!(unchanged.get("editedAt").is_none(), "not marked edited: {unchanged}");
    server
        .fails("PATCH", &format!("/api/v1/conversations/{conversation_id}"), &alice, Some(json!({})), "field_required")
        .await;
    let events = server.ok("GET", &format!("/api/v1/conversations/{conversation_id}/events"), &alice, None).await;
    assert_eq!(events["events"].as_array().unwrap().len(), 1, "only the message was logged: {events}");
}

#[tokio::test]
async fn api_only_conversations_are_neither_listed_nor_notified() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, bob) = user(&server, &application, "b1", "Bob").await;
    let app = application.privileged();
    // Displayed defaults to true; false makes a conversation API-only.
    let shown = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &app,
            Some(json!({"conversation": {"title": "Shown", "group": true, "memberIds": [alice_id, bob_id]}})),
        )
        .await;
    assert_eq!(shown["displayed"], true, "{shown}");
    let hidden = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &app,
            Some(json!({"conversation": {"title": "Exchange", "group": true, "displayed": false, "memberIds": [alice_id, bob_id]}})),
        )
        .await;
    assert_eq!(hidden["displayed"], false, "{hidden}");
    let hidden_id = hidden["id"].as_str().unwrap();
    let mut bob_client = Client::connect(&server, &application.token("b1", "Bob")).await;
    server
        .ok(
            "POST",
            &format!("/api/v1/conversations/{hidden_id}/messages"),
            &alice,
            Some(json!({"text": "data exchange"})),
        )
        .await;
    bob_client.expect_no_user_event("notification", Duration::from_millis(300)).await;
    let list = server.ok("GET", "/api/v1/conversation-list", &bob, None).await;
    let listed: Vec<&str> =
        list["conversations"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [shown["id"].as_str().unwrap()]);
    // It is still reachable through the API.
    let messages =
        server.ok("POST", &format!("/api/v1/conversations/{hidden_id}/messages/search"), &bob, Some(json!({}))).await;
    assert_eq!(messages["messages"][0]["text"], "data exchange");
}

#[tokio::test]
async fn membership_changes_count_each_member_once_and_respect_the_limit() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, _) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, _) = user(&server, &application, "b1", "Bob").await;
    let app = application.privileged();
    let conversation_id = group(&server, &application, "Team", &[&alice_id, &bob_id]).await;
    let path = format!("/api/v1/conversations/{conversation_id}");
    // The same member named many times is removed once, and nothing overflows.
    let removed = server.ok("PATCH", &path, &app, Some(json!({"removeMemberIds": [bob_id, bob_id, bob_id]}))).await;
    assert_eq!(removed["memberIds"], json!([alice_id]));
    // An oversized addition is refused before anyone is looked up.
    let crowd: Vec<String> = (0..3000).map(|index| format!("user-{index}")).collect();
    server.fails("PATCH", &path, &app, Some(json!({"addMemberIds": crowd})), "too_many_members").await;
}

#[tokio::test]
async fn a_button_panel_written_as_in_the_1c_documentation_works() {
    let Team { server, application, alice, bob, bob_id, conversation_id, .. } = Team::start().await;
    // §29.4.4.3.2: Ряд1.Добавить(, "Кнопка 1 1") — captions only, two rows of two.
    let caption = |text: &str| json!({"text": text});
    let panel = json!({"rows": [
        {"buttons": [caption("Кнопка 1 1"), caption("Кнопка 1 2")]},
        {"buttons": [caption("Кнопка 2 1"), caption("Кнопка 2 2")]},
    ]});
    let path = format!("/api/v1/conversations/{conversation_id}/messages");
    let sent = server.ok("POST", &path, &alice, Some(json!({"text": "Текст сообщения", "buttons": panel}))).await;
    let stored = &sent["buttons"]["rows"][1]["buttons"][0];
    assert_eq!(stored["text"], "Кнопка 2 1", "{sent}");
    assert_eq!(stored["action"], "BUTTON_ACTION_SEND_MESSAGE", "{sent}");
    assert_eq!(stored["enabled"], true, "{sent}");
    assert_eq!(stored["kind"], "BUTTON_KIND_BUTTON", "{sent}");

    // Pressing one sends its caption as a message from whoever pressed it.
    let message_id = sent["id"].as_str().unwrap();
    let press = format!("/api/v1/messages/{message_id}/buttons/press");
    let pressed = server.ok("POST", &press, &bob, Some(json!({"row": 1, "column": 0}))).await;
    assert_eq!(pressed["sentMessage"]["text"], "Кнопка 2 1", "{pressed}");
    assert_eq!(pressed["sentMessage"]["authorId"], bob_id.as_str());
    let listed = server.ok("POST", &format!("{path}/search"), &alice, Some(json!({}))).await;
    let texts: Vec<&str> = listed["messages"].as_array().unwrap().iter().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts.last(), Some(&"Кнопка 2 1"), "{listed}");

    // The same panel over the WebSocket protocol (JSON frames).
    let mut client = Client::connect(&server, &application.token("a1", "Alice")).await;
    let sent = client
        .request(json!({"sendMessage": {"conversation": {"id": conversation_id}, "text": "Да или нет?",
            "buttons": {"rows": [{"buttons": [caption("Да"), {"text": "Нет", "enabled": false}]}]}}}))
        .await;
    let buttons = &sent["message"]["buttons"]["rows"][0]["buttons"];
    assert_eq!(buttons[0]["enabled"], true, "{sent}");
    assert_eq!(buttons[0]["action"], "BUTTON_ACTION_SEND_MESSAGE", "{sent}");
    assert_eq!(buttons[1]["enabled"], false, "an explicit false is kept: {sent}");
    let message_id = sent["message"]["id"].as_str().unwrap();
    let press = format!("/api/v1/messages/{message_id}/buttons/press");
    server.fails("POST", &press, &bob, Some(json!({"row": 0, "column": 1})), "button_disabled").await;
    let pressed = server.ok("POST", &press, &bob, Some(json!({"row": 0, "column": 0}))).await;
    assert_eq!(pressed["sentMessage"]["text"], "Да", "{pressed}");
}

#[tokio::test]
async fn timestamps_are_canonical_rfc_3339_in_utc_and_any_offset_is_read() {
    let Team { server, application, alice_id, conversation_id, .. } = Team::start().await;
    let path = format!("/api/v1/conversations/{conversation_id}/messages");
    // An offset on input is converted to UTC; fractions keep 3, 6 or 9 digits.
    let posted = server
        .ok(
            "POST",
            &path,
            &application.privileged(),
            Some(json!({"text": "dated", "authorId": alice_id, "date": "2020-01-02T06:04:05.120+03:00"})),
        )
        .await;
    assert_eq!(posted["date"], "2020-01-02T03:04:05.120Z", "{posted}");
    let fetched = server
        .ok("GET", &format!("/api/v1/messages/{}", posted["id"].as_str().unwrap()), &application.privileged(), None)
        .await;
    assert_eq!(fetched["date"], "2020-01-02T03:04:05.120Z");
    // Server-set times (microseconds) end in Z as well, in REST and WebSocket answers.
    let conversation =
        server.ok("GET", &format!("/api/v1/conversations/{conversation_id}"), &application.privileged(), None).await;
    let created = conversation["createdAt"].as_str().unwrap();
    assert!(created.ends_with('Z') && !created.contains("+00:00"), "{conversation}");
    let mut client = Client::connect(&server, &application.token("a1", "Alice")).await;
    let sent = client.request(json!({"sendMessage": {"conversation": {"id": conversation_id}, "text": "now"}})).await;
    let date = sent["message"]["date"].as_str().unwrap();
    assert!(date.ends_with('Z') && date.len() <= "2020-01-02T03:04:05.123456Z".len(), "{sent}");
}
