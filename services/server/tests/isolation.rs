//! Tenant isolation: two applications on one server, built alike (same
//! infobase user ids, the same conversation key, context conversations on
//! the same object), and every way one of them could reach the other's
//! data, over HTTP and WebSocket. Each attempt must fail with a not-found or
//! authentication error, and the other tenant's data must be unchanged.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use serde_json::{Value, json};

/// The context object both tenants have a conversation about.
fn shared_order() -> Value {
    json!({"objectType": "Document.SalesOrder", "objectId": "6f1c0e2a-0000-0000-0000-000000000001"})
}

/// One application with two users, four conversations and messages in each.
struct Tenant {
    tag: &'static str,
    application: Application,
    alice_id: String,
    bob_id: String,
    /// A group conversation of Alice and Bob.
    group_id: String,
    /// Keyed "shared-key" in both tenants.
    keyed_id: String,
    /// About the shared order, readable by Alice.
    context_id: String,
    /// Keyed and about an object only this tenant has.
    private_id: String,
    message_ids: Vec<String>,
}

impl Tenant {
    async fn create(server: &TestServer, tag: &'static str) -> Tenant {
        let application = server.register(&format!("{tag}-owner@example.com"), &format!("{tag} app")).await;
        // Both tenants use the same infobase user ids: they must still be different users.
        let (alice_id, alice) = user(server, &application, "alice-1", "Alice").await;
        let (bob_id, _) = user(server, &application, "bob-1", "Bob").await;
        let app = application.privileged();
        let group_id = group(server, &application, &format!("{tag} team"), &[&alice_id, &bob_id]).await;
        let create = |conversation: Value| {
            let app = app.clone();
            async move {
                server.ok("POST", "/api/v1/conversations", &app, Some(json!({"conversation": conversation}))).await
            }
        };
        let keyed = create(json!({"title": format!("{tag} shared"), "group": true, "key": "shared-key", "memberIds": [alice_id, bob_id]})).await;
        let context = create(json!({"title": format!("{tag} order"), "context": shared_order()})).await;
        let private = create(json!({
            "title": format!("{tag} private"), "key": format!("{tag}-only-key"),
            "context": {"objectType": "Catalog.Secrets", "objectId": format!("{tag}-only-object")},
        }))
        .await;
        let keyed_id = keyed["id"].as_str().unwrap().to_owned();
        let context_id = context["id"].as_str().unwrap().to_owned();
        let private_id = private["id"].as_str().unwrap().to_owned();
        for id in [&context_id, &private_id] {
            server
                .ok(
                    "PUT",
                    &format!("/api/v1/conversations/{id}/access"),
                    &app,
                    Some(json!({"grantUserIds": [alice_id]})),
                )
                .await;
        }
        let mut message_ids = Vec::new();
        for id in [&group_id, &keyed_id, &context_id, &private_id] {
            let sent = server
                .ok(
                    "POST",
                    &format!("/api/v1/conversations/{id}/messages"),
                    &alice,
                    Some(json!({"text": format!("{tag} secret in {id}")})),
                )
                .await;
            message_ids.push(sent["id"].as_str().unwrap().to_owned());
        }
        Tenant { tag, application, alice_id, bob_id, group_id, keyed_id, context_id, private_id, message_ids }
    }

    fn conversation_ids(&self) -> [&str; 4] {
        [&self.group_id, &self.keyed_id, &self.context_id, &self.private_id]
    }

    fn user_ids(&self) -> [&str; 2] {
        [&self.alice_id, &self.bob_id]
    }

    /// Alice's own token.
    fn alice(&self) -> Auth {
        self.application.user("alice-1", "Alice")
    }

    /// Everything of this tenant an attack could change, read with its own credentials.
    async fn snapshot(&self, server: &TestServer) -> Value {
        let app = self.application.privileged();
        let as_alice = self.application.acting_as(&self.alice_id);
        let mut conversations = Vec::new();
        for id in self.conversation_ids() {
            let base = format!("/api/v1/conversations/{id}");
            conversations.push(json!({
                "conversation": server.ok("GET", &base, &app, None).await,
                "messages": server.ok("POST", &format!("{base}/messages/search"), &app, Some(json!({"includeDeleted": true}))).await,
                "events": server.ok("GET", &format!("{base}/events"), &app, None).await,
                "aliceWatches": server.ok("GET", &format!("{base}/watch?userId={}", self.alice_id), &app, None).await,
                "aliceDoNotDisturb": server.ok("GET", &format!("/api/v1/do-not-disturb?conversationId={id}&userId={}", self.alice_id), &app, None).await,
            }));
        }
        let mut users = Vec::new();
        for id in self.user_ids() {
            users.push(server.ok("GET", &format!("/api/v1/users/{id}"), &app, None).await);
        }
        json!({
            "conversations": conversations,
            "users": users,
            "allUsers": server.ok("POST", "/api/v1/users/search", &app, Some(json!({"includeBlocked": true}))).await,
            "allConversations": server.ok("POST", "/api/v1/conversations/search", &app, Some(json!({}))).await,
            "aliceList": server.ok("GET", "/api/v1/conversation-list", &as_alice, None).await,
            "aliceUnread": server.ok("GET", "/api/v1/unread", &as_alice, None).await,
            "administrators": server.ok("GET", "/api/v1/subscriber/administrators", &app, None).await,
        })
    }
}

/// Ids found anywhere in a JSON answer.
fn mentions(answer: &Value, id: &str) -> bool {
    match answer {
        Value::String(text) => text.contains(id),
        Value::Array(items) => items.iter().any(|item| mentions(item, id)),
        Value::Object(fields) => fields.values().any(|value| mentions(value, id)),
        _ => false,
    }
}

fn assert_mentions_none(answer: &Value, other: &Tenant, what: &str) {
    for id in
        other.conversation_ids().into_iter().chain(other.user_ids()).chain(other.message_ids.iter().map(String::as_str))
    {
        assert!(!mentions(answer, id), "{what} leaks {id} of tenant {}: {answer}", other.tag);
    }
    assert!(!mentions(answer, &format!("{} secret", other.tag)), "{what} leaks tenant {}'s text: {answer}", other.tag);
}

fn list_len(answer: &Value, field: &str) -> usize {
    answer[field].as_array().map(Vec::len).unwrap_or(0)
}

/// Percent-encodes a path segment completely, so nothing in it is read as path syntax.
fn segment(raw: &str) -> String {
    raw.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || byte == b'-' {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

fn basic(application_id: &str, key: &str) -> Auth {
    Auth::Application { id: application_id.to_owned(), key: key.to_owned(), act_as: None }
}

/// The administration key mailed to a subscriber at registration.
fn administration_key(server: &TestServer, email: &str) -> String {
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(&server.outbox).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if text.lines().any(|line| line.starts_with("To:") && line.contains(email))
            && text.lines().any(|line| line.starts_with("Subject:") && line.contains("administration key"))
        {
            keys.push(key_in(&text.replace("=\r\n", "").replace("=\n", "")));
        }
    }
    assert_eq!(keys.len(), 1, "one administration key mail to {email}");
    keys.remove(0)
}

/// A UUID-shaped id nobody issued: 128 bits from a xorshift generator seeded by the clock.
fn random_uuid(seed: u64) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut state = (nanos ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let hex = format!("{:016x}{:016x}", next(), next());
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

#[tokio::test]
async fn one_tenant_cannot_reach_another_tenants_conversations_messages_or_users_over_http() {
    let server = TestServer::start().await;
    let a = Tenant::create(&server, "A").await;
    let b = Tenant::create(&server, "B").await;
    assert_ne!(a.alice_id, b.alice_id, "the same infobase user in two applications is two users");
    let before = b.snapshot(&server).await;
    assert_mentions_none(&before, &a, "B's own data");

    let a_user = a.alice();
    let a_as = a.application.acting_as(&a.alice_id);
    let a_app = a.application.privileged();
    let every_a = [&a_user, &a_as, &a_app];
    let a_with_user = [&a_user, &a_as];
    let until = "2999-01-01T00:00:00Z";

    // B's conversations, by id, through every route that names a conversation.
    for id in b.conversation_ids() {
        let base = format!("/api/v1/conversations/{id}");
        for auth in every_a {
            server.fails("GET", &base, auth, None, "conversation_not_found").await;
            server
                .fails(
                    "POST",
                    &format!("{base}/messages"),
                    auth,
                    Some(json!({"text": "intrusion"})),
                    "conversation_not_found",
                )
                .await;
            server
                .fails(
                    "POST",
                    &format!("{base}/messages"),
                    auth,
                    Some(json!({"text": "intrusion", "authorId": a.alice_id})),
                    "conversation_not_found",
                )
                .await;
            server
                .fails("POST", &format!("{base}/messages/search"), auth, Some(json!({})), "conversation_not_found")
                .await;
            server.fails("GET", &format!("{base}/events"), auth, None, "conversation_not_found").await;
            server
                .fails("GET", &format!("{base}/events?afterSeq=0&limit=10"), auth, None, "conversation_not_found")
                .await;
            server.fails("PATCH", &base, auth, Some(json!({"title": "taken over"})), "conversation_not_found").await;
            server
                .fails("PATCH", &base, auth, Some(json!({"addMemberIds": [a.alice_id]})), "conversation_not_found")
                .await;
            server
                .fails(
                    "POST",
                    "/api/v1/users/search",
                    auth,
                    Some(json!({"conversationId": id})),
                    "conversation_not_found",
                )
                .await;
            let found = server.ok("POST", "/api/v1/conversations/search", auth, Some(json!({"ids": [id]}))).await;
            assert_eq!(list_len(&found, "conversations"), 0, "{found}");
        }
        for auth in a_with_user {
            server.fails("POST", &format!("{base}/read"), auth, Some(json!({})), "conversation_not_found").await;
            server.fails("POST", &format!("{base}/leave"), auth, None, "conversation_not_found").await;
            server
                .fails("PUT", &format!("{base}/watch"), auth, Some(json!({"watch": false})), "conversation_not_found")
                .await;
            server.fails("GET", &format!("{base}/watch"), auth, None, "conversation_not_found").await;
            server
                .fails(
                    "PUT",
                    "/api/v1/do-not-disturb",
                    auth,
                    Some(json!({"conversation": {"id": id}, "until": until})),
                    "conversation_not_found",
                )
                .await;
            server
                .fails(
                    "GET",
                    &format!("/api/v1/do-not-disturb?conversationId={id}"),
                    auth,
                    None,
                    "conversation_not_found",
                )
                .await;
        }
        // Privileged mode names A's user for the per-user settings; still not B's conversation.
        let alice = &a.alice_id;
        server
            .fails(
                "PUT",
                &format!("{base}/watch"),
                &a_app,
                Some(json!({"watch": false, "userId": alice})),
                "conversation_not_found",
            )
            .await;
        server.fails("GET", &format!("{base}/watch?userId={alice}"), &a_app, None, "conversation_not_found").await;
        server
            .fails(
                "PUT",
                "/api/v1/do-not-disturb",
                &a_app,
                Some(json!({"conversation": {"id": id}, "userId": alice, "until": until})),
                "conversation_not_found",
            )
            .await;
        for auth in [&a_app, &a_as] {
            server
                .fails(
                    "PUT",
                    &format!("{base}/access"),
                    auth,
                    Some(json!({"grantUserIds": [alice]})),
                    "conversation_not_found",
                )
                .await;
            server
                .fails(
                    "PUT",
                    &format!("{base}/access"),
                    auth,
                    Some(json!({"allApplicationUsers": true})),
                    "conversation_not_found",
                )
                .await;
        }
        server
            .fails(
                "PUT",
                &format!("{base}/access"),
                &a_user,
                Some(json!({"grantUserIds": [alice]})),
                "privileged_mode_required",
            )
            .await;
    }

    // B's messages, by id.
    let a_messages = format!("/api/v1/conversations/{}/messages", a.group_id);
    for id in &b.message_ids {
        for auth in every_a {
            server.fails("GET", &format!("/api/v1/messages/{id}"), auth, None, "message_not_found").await;
            server
                .fails(
                    "PATCH",
                    &format!("/api/v1/messages/{id}"),
                    auth,
                    Some(json!({"text": "edited by A"})),
                    "message_not_found",
                )
                .await;
            server.fails("DELETE", &format!("/api/v1/messages/{id}"), auth, None, "message_not_found").await;
            // As a paging anchor in A's own conversation it is simply not there.
            server
                .fails("POST", &format!("{a_messages}/search"), auth, Some(json!({"after": id})), "invalid_value")
                .await;
        }
        for auth in a_with_user {
            server
                .fails(
                    "POST",
                    &format!("/api/v1/conversations/{}/read", a.group_id),
                    auth,
                    Some(json!({"upToMessageId": id})),
                    "message_not_found",
                )
                .await;
        }
    }

    // B's users, by id, wherever a user id is accepted.
    let a_key = administration_key(&server, &a.application.email);
    let b_key = administration_key(&server, &b.application.email);
    for id in b.user_ids() {
        for auth in every_a {
            server.fails("GET", &format!("/api/v1/users/{id}"), auth, None, "user_not_found").await;
            server
                .fails(
                    "PATCH",
                    &format!("/api/v1/users/{id}"),
                    auth,
                    Some(json!({"updateMask": ["fullName"], "user": {"name": "x", "fullName": "Mallory"}})),
                    "user_not_found",
                )
                .await;
            let found = server
                .ok("POST", "/api/v1/users/search", auth, Some(json!({"ids": [id], "includeBlocked": true})))
                .await;
            assert_eq!(list_len(&found, "users"), 0, "{found}");
            server
                .fails(
                    "POST",
                    "/api/v1/conversations",
                    auth,
                    Some(json!({"conversation": {"title": "lure", "group": true, "memberIds": [a.alice_id, id]}})),
                    "user_not_found",
                )
                .await;
            server
                .fails(
                    "PATCH",
                    &format!("/api/v1/conversations/{}", a.group_id),
                    auth,
                    Some(json!({"addMemberIds": [id]})),
                    "user_not_found",
                )
                .await;
        }
        server
            .fails(
                "PATCH",
                &format!("/api/v1/users/{id}"),
                &a_app,
                Some(json!({"updateMask": ["blocked"], "user": {"name": "x", "blocked": true}})),
                "user_not_found",
            )
            .await;
        for auth in a_with_user {
            server
                .fails("POST", &a_messages, auth, Some(json!({"text": "psst", "recipientIds": [id]})), "user_not_found")
                .await;
            server
                .fails(
                    "POST",
                    "/api/v1/conversations",
                    auth,
                    Some(json!({"conversation": {"group": false, "memberIds": [id]}})),
                    "user_not_found",
                )
                .await;
        }
        server
            .fails("POST", &a_messages, &a_app, Some(json!({"text": "forged", "authorId": id})), "user_not_found")
            .await;
        server
            .fails(
                "PUT",
                &format!("/api/v1/conversations/{}/access", a.context_id),
                &a_app,
                Some(json!({"grantUserIds": [id]})),
                "user_not_found",
            )
            .await;
        server
            .fails(
                "PUT",
                &format!("/api/v1/conversations/{}/watch", a.group_id),
                &a_app,
                Some(json!({"watch": false, "userId": id})),
                "user_not_found",
            )
            .await;
        server
            .fails(
                "GET",
                &format!("/api/v1/conversations/{}/watch?userId={id}", a.group_id),
                &a_app,
                None,
                "user_not_found",
            )
            .await;
        server
            .fails(
                "PUT",
                "/api/v1/do-not-disturb",
                &a_app,
                Some(json!({"userId": id, "until": until})),
                "user_not_found",
            )
            .await;
        server.fails("GET", &format!("/api/v1/do-not-disturb?userId={id}"), &a_app, None, "user_not_found").await;
        let found = server.ok("POST", "/api/v1/conversations/search", &a_app, Some(json!({"memberId": id}))).await;
        assert_eq!(list_len(&found, "conversations"), 0, "{found}");
        server
            .fails(
                "POST",
                "/api/v1/conversations/search",
                &a_user,
                Some(json!({"memberId": id})),
                "privileged_mode_required",
            )
            .await;
        // Acting as B's user with A's key.
        server.fails("GET", "/api/v1/application", &a.application.acting_as(id), None, "user_not_found").await;
        server
            .fails(
                "GET",
                &format!("/api/v1/conversations/{}", b.group_id),
                &a.application.acting_as(id),
                None,
                "user_not_found",
            )
            .await;
        // Making B's user an administrator of A, with A's own administration key.
        let credential = json!({"subscriberEmail": a.application.email, "administrationKey": a_key});
        server
            .fails(
                "PUT",
                "/api/v1/subscriber/administrators",
                &a_app,
                Some(json!({"credential": credential, "userIds": [id]})),
                "user_not_found",
            )
            .await;
    }
    // B's administration key does not administer A, nor A's key B.
    let b_credential = json!({"subscriberEmail": b.application.email, "administrationKey": b_key});
    server
        .fails(
            "PUT",
            "/api/v1/subscriber/administrators",
            &a_app,
            Some(json!({"credential": b_credential, "userIds": [a.alice_id]})),
            "subscriber_credential_invalid",
        )
        .await;
    let a_credential_for_b = json!({"subscriberEmail": b.application.email, "administrationKey": a_key});
    server
        .fails(
            "PUT",
            "/api/v1/subscriber/administrators",
            &a_app,
            Some(json!({"credential": a_credential_for_b, "userIds": [a.alice_id]})),
            "subscriber_credential_invalid",
        )
        .await;

    // The same key and the same context object lead each tenant to its own conversation only.
    for auth in every_a {
        let by_key = server.ok("GET", "/api/v1/conversations/by-key/shared-key", auth, None).await;
        assert_eq!(by_key["id"], a.keyed_id.as_str(), "{by_key}");
        let by_context =
            server.ok("POST", "/api/v1/conversations/by-context", auth, Some(json!({"context": shared_order()}))).await;
        assert_eq!(by_context["id"], a.context_id.as_str(), "{by_context}");
        server.fails("GET", "/api/v1/conversations/by-key/B-only-key", auth, None, "conversation_not_found").await;
        server
            .fails(
                "POST",
                "/api/v1/conversations/by-context",
                auth,
                Some(json!({"context": {"objectType": "Catalog.Secrets", "objectId": "B-only-object"}})),
                "conversation_not_found",
            )
            .await;
        let found =
            server.ok("POST", "/api/v1/conversations/search", auth, Some(json!({"context": shared_order()}))).await;
        let ids: Vec<&str> =
            found["conversations"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [a.context_id.as_str()], "{found}");
        let found = server.ok("POST", "/api/v1/users/search", auth, Some(json!({"infobaseUserId": "alice-1"}))).await;
        let ids: Vec<&str> = found["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [a.alice_id.as_str()], "{found}");
    }

    // Credentials mixed across tenants.
    let b_named_a_signed = Auth::Bearer(sign_token(&b.application.id, &a.application.key, "alice-1", "Alice", 600));
    let a_named_b_signed = Auth::Bearer(sign_token(&a.application.id, &b.application.key, "alice-1", "Alice", 600));
    for forged in [&b_named_a_signed, &a_named_b_signed] {
        server.fails("GET", "/api/v1/application", forged, None, "token_invalid").await;
        server.fails("GET", &format!("/api/v1/conversations/{}", b.group_id), forged, None, "token_invalid").await;
        server.fails("GET", &format!("/api/v1/conversations/{}", a.group_id), forged, None, "token_invalid").await;
    }
    for mixed in [basic(&b.application.id, &a.application.key), basic(&a.application.id, &b.application.key)] {
        server.fails("GET", "/api/v1/application", &mixed, None, "unauthenticated").await;
        server.fails("GET", &format!("/api/v1/conversations/{}", b.group_id), &mixed, None, "unauthenticated").await;
    }
    let b_id_a_key_as_b_user = Auth::Application {
        id: b.application.id.clone(),
        key: a.application.key.clone(),
        act_as: Some(b.alice_id.clone()),
    };
    server.fails("GET", "/api/v1/application", &b_id_a_key_as_b_user, None, "unauthenticated").await;

    // Lists of A never contain anything of B.
    for auth in every_a {
        let conversations = server.ok("POST", "/api/v1/conversations/search", auth, Some(json!({"count": 250}))).await;
        assert_mentions_none(&conversations, &b, "GetConversations");
        assert_eq!(list_len(&conversations, "conversations"), 4, "{conversations}");
        let users = server.ok("POST", "/api/v1/users/search", auth, Some(json!({"includeBlocked": true}))).await;
        assert_mentions_none(&users, &b, "GetUsers");
        assert_eq!(list_len(&users, "users"), 2, "{users}");
        let named = server.ok("POST", "/api/v1/users/search", auth, Some(json!({"nameContains": "ali"}))).await;
        assert_mentions_none(&named, &b, "GetUsers by name");
    }
    for auth in a_with_user {
        let list = server.ok("GET", "/api/v1/conversation-list", auth, None).await;
        assert_mentions_none(&list, &b, "the conversation list");
        for id in [&a.group_id, &a.keyed_id] {
            assert!(mentions(&list["conversations"], id), "A's own {id} is listed: {list}");
        }
        let unread = server.ok("GET", "/api/v1/unread", auth, None).await;
        assert_mentions_none(&unread, &b, "unread counts");
        for id in a.conversation_ids() {
            let messages =
                server.ok("POST", &format!("/api/v1/conversations/{id}/messages/search"), auth, Some(json!({}))).await;
            assert_mentions_none(&messages, &b, "A's messages");
            let events = server.ok("GET", &format!("/api/v1/conversations/{id}/events"), auth, None).await;
            assert_mentions_none(&events, &b, "A's events");
        }
    }

    // A key taken in B is free in A: keys are per application.
    let own = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &a_app,
            Some(json!({"conversation": {"title": "A's own", "group": true, "key": "B-only-key"}})),
        )
        .await;
    assert_ne!(own["id"], b.private_id.as_str());
    let theirs = server.ok("GET", "/api/v1/conversations/by-key/B-only-key", &b.application.privileged(), None).await;
    assert_eq!(theirs["id"], b.private_id.as_str());

    // After all of that, B's data is exactly as it was.
    let after = b.snapshot(&server).await;
    assert_eq!(after, before, "tenant B's data changed");
}

#[tokio::test]
async fn guessed_and_garbage_ids_find_nothing_and_break_nothing() {
    let server = TestServer::start().await;
    let a = Tenant::create(&server, "A").await;
    let b = Tenant::create(&server, "B").await;
    let before = b.snapshot(&server).await;
    let a_user = a.alice();
    let a_app = a.application.privileged();

    let mut garbage: Vec<String> = (0..3).map(random_uuid).collect();
    garbage.extend(
        [
            "../",
            "../../api/v1/conversations",
            "..\\..\\",
            "' OR 1=1 --",
            "\" OR \"\"=\"",
            "1; DROP TABLE conversations; --",
            "%",
            "%00",
            "*",
            "0",
            "-1",
            "null",
            "{}",
            "обсуждение",
            "\u{0}",
            "a\u{202e}b",
        ]
        .map(str::to_owned),
    );
    garbage.push("x".repeat(5_000));
    garbage.push(format!("{}{}", b.group_id, "0"));
    garbage.push(b.group_id.to_uppercase());

    for raw in &garbage {
        let id = segment(raw);
        for auth in [&a_user, &a_app] {
            server.fails("GET", &format!("/api/v1/conversations/{id}"), auth, None, "conversation_not_found").await;
            server
                .fails("GET", &format!("/api/v1/conversations/by-key/{id}"), auth, None, "conversation_not_found")
                .await;
            server
                .fails(
                    "POST",
                    &format!("/api/v1/conversations/{id}/messages"),
                    auth,
                    Some(json!({"text": "probe"})),
                    "conversation_not_found",
                )
                .await;
            server
                .fails("GET", &format!("/api/v1/conversations/{id}/events"), auth, None, "conversation_not_found")
                .await;
            server.fails("GET", &format!("/api/v1/messages/{id}"), auth, None, "message_not_found").await;
            server.fails("DELETE", &format!("/api/v1/messages/{id}"), auth, None, "message_not_found").await;
            server.fails("GET", &format!("/api/v1/users/{id}"), auth, None, "user_not_found").await;
            let found = server.ok("POST", "/api/v1/users/search", auth, Some(json!({"ids": [raw]}))).await;
            assert_eq!(list_len(&found, "users"), 0, "{raw}: {found}");
            let found = server.ok("POST", "/api/v1/conversations/search", auth, Some(json!({"ids": [raw]}))).await;
            assert_eq!(list_len(&found, "conversations"), 0, "{raw}: {found}");
            let (status, body) = server
                .call(
                    "POST",
                    "/api/v1/conversations/by-context",
                    auth,
                    Some(json!({"context": {"objectType": raw, "objectId": raw}})),
                )
                .await;
            assert!((400..500).contains(&status), "{raw}: {status} {body}");
            let code = body["error"]["code"].as_str().unwrap_or_default();
            assert!(["conversation_not_found", "invalid_value"].contains(&code), "{raw}: {body}");
        }
        // As an application id: in a token's issuer and in application credentials.
        let token = sign_token(raw, &a.application.key, "alice-1", "Alice", 600);
        let (status, body) = server.call("GET", "/api/v1/application", &Auth::Bearer(token), None).await;
        assert!((400..500).contains(&status), "{raw}: {status} {body}");
        assert!(
            ["application_not_registered", "token_invalid"]
                .contains(&body["error"]["code"].as_str().unwrap_or_default()),
            "{raw}: {body}"
        );
        let printable = raw.chars().all(|c| c.is_ascii_graphic() || c == ' ');
        if printable && !raw.contains(':') {
            server
                .fails(
                    "GET",
                    "/api/v1/application",
                    &basic(raw, &a.application.key),
                    None,
                    "application_not_registered",
                )
                .await;
            // As the user to act as.
            let acting = Auth::Application {
                id: a.application.id.clone(),
                key: a.application.key.clone(),
                act_as: Some(raw.clone()),
            };
            server.fails("GET", "/api/v1/application", &acting, None, "user_not_found").await;
        }
    }

    // Still healthy, and B untouched.
    let (status, health) = server.call("GET", "/rs/health", &Auth::None, None).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(b.snapshot(&server).await, before, "tenant B's data changed");
}

#[tokio::test]
async fn websocket_clients_never_see_another_tenants_conversations_events_or_presence() {
    let server = TestServer::start().await;
    let a = Tenant::create(&server, "A").await;
    let b = Tenant::create(&server, "B").await;
    let before = b.snapshot(&server).await;

    // B's Alice is online and subscribed to her conversations.
    let mut b_alice = Client::connect(&server, &b.application.token("alice-1", "Alice")).await;
    for id in [&b.group_id, &b.keyed_id] {
        let subscribed = b_alice.request(json!({"subscribe": {"conversation": {"id": id}}})).await;
        assert_eq!(subscribed["subscribed"]["conversationId"], id.as_str(), "{subscribed}");
    }

    // A's Alice tries B's conversations every way the protocol allows.
    let mut a_alice = Client::connect(&server, &a.application.token("alice-1", "Alice")).await;
    assert_eq!(a_alice.user_id(), a.alice_id);
    for id in b.conversation_ids() {
        let reference = json!({"id": id});
        for request in [
            json!({"subscribe": {"conversation": reference}}),
            json!({"subscribe": {"conversation": reference, "afterSeq": "0"}}),
            json!({"getConversation": {"conversation": reference}}),
            json!({"getMessages": {"conversation": reference}}),
            json!({"sendMessage": {"conversation": reference, "text": "intrusion"}}),
            json!({"markRead": {"conversation": reference}}),
            json!({"updateConversation": {"conversation": reference, "title": "taken over"}}),
            json!({"leaveConversation": {"conversation": reference}}),
            json!({"setWatchMode": {"conversation": reference, "watch": false}}),
            json!({"setDoNotDisturb": {"conversation": reference, "until": "2999-01-01T00:00:00Z"}}),
        ] {
            let answer = a_alice.request(request.clone()).await;
            assert_eq!(answer["error"]["code"], "conversation_not_found", "{request}: {answer}");
        }
    }
    for id in &b.message_ids {
        let answer = a_alice.request(json!({"editMessage": {"messageId": id, "text": "edited by A"}})).await;
        assert_eq!(answer["error"]["code"], "message_not_found", "{answer}");
        let answer = a_alice.request(json!({"deleteMessage": {"messageId": id}})).await;
        assert_eq!(answer["error"]["code"], "message_not_found", "{answer}");
    }
    let users = a_alice.request(json!({"getUsers": {"ids": b.user_ids()}})).await;
    assert!(users.get("users").is_some(), "{users}");
    assert_mentions_none(&users, &b, "GetUsers over WebSocket");
    let list = a_alice.request(json!({"getConversationList": {}})).await;
    assert_mentions_none(&list, &b, "the conversation list over WebSocket");
    // The shared key names A's own conversation.
    let subscribed = a_alice.request(json!({"subscribe": {"conversation": {"key": "shared-key"}}})).await;
    assert_eq!(subscribed["subscribed"]["conversationId"], a.keyed_id.as_str(), "{subscribed}");
    let subscribed = a_alice.request(json!({"subscribe": {"conversation": {"id": a.group_id}}})).await;
    assert_eq!(subscribed["subscribed"]["conversationId"], a.group_id.as_str(), "{subscribed}");
    // B's Alice is online, but not in A: her id means nobody there.
    let presence = a_alice.request(json!({"watchPresence": {"userIds": [b.alice_id]}})).await;
    let watched = presence["presence"]["users"].as_array().expect("a presence list");
    assert_eq!(watched.len(), 1, "{presence}");
    assert_ne!(watched[0]["online"], true, "{presence}");

    // A cross-signed token does not get a session at all.
    let forged = sign_token(&b.application.id, &a.application.key, "alice-1", "Alice", 600);
    let refused = Client::try_connect(&server, json!({"hello": {"protocolVersion": 1, "token": forged}}))
        .await
        .err()
        .expect("refused");
    assert_eq!(refused["error"]["code"], "token_invalid", "{refused}");

    // Nothing of B changed.
    assert_eq!(b.snapshot(&server).await, before, "tenant B's data changed");

    // B talks in its group and its "shared-key" conversation; B's Alice hears it...
    let b_bob = b.application.user("bob-1", "Bob");
    for id in [&b.group_id, &b.keyed_id] {
        server
            .ok(
                "POST",
                &format!("/api/v1/conversations/{id}/messages"),
                &b_bob,
                Some(json!({"text": format!("B secret live in {id}")})),
            )
            .await;
    }
    for _ in 0..2 {
        let event = b_alice.next_event().await;
        assert!(event["messageCreated"]["text"].as_str().unwrap().starts_with("B secret live"), "{event}");
    }
    // ...and B's Alice goes offline and back, which B's presence watchers would see.
    b_alice.close().await;
    let b_alice = Client::connect(&server, &b.application.token("alice-1", "Alice")).await;

    // A's Bob talks in A's "shared-key" conversation: A's Alice hears that, and only that.
    let a_bob = a.application.user("bob-1", "Bob");
    server
        .ok("POST", &format!("/api/v1/conversations/{}/messages", a.keyed_id), &a_bob, Some(json!({"text": "A live"})))
        .await;
    let event = loop {
        let push = a_alice.next_push().await;
        assert_mentions_none(&push, &b, "a push to A's Alice");
        if let Some(event) = push.get("event") {
            break event.clone();
        }
    };
    assert_eq!(event["messageCreated"]["text"], "A live", "the first event A's Alice sees is A's own: {event}");
    assert_eq!(event["conversationId"], a.keyed_id.as_str(), "{event}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pong = a_alice.request(json!({"ping": {"nonce": "5"}})).await;
    assert_eq!(pong["pong"]["nonce"], "5", "{pong}");
    let pushes: Vec<Value> = a_alice.pushes.drain(..).collect();
    for push in &pushes {
        assert_mentions_none(push, &b, "a push to A's Alice");
        assert!(!mentions(push, "B secret"), "{push}");
    }
    b_alice.close().await;
    a_alice.close().await;
}

#[tokio::test]
async fn credentials_of_one_tenant_never_authenticate_as_the_other() {
    let server = TestServer::start().await;
    let a = Tenant::create(&server, "A").await;
    let b = Tenant::create(&server, "B").await;

    // Sanity: each tenant's own credentials work.
    for tenant in [&a, &b] {
        let info = server.ok("GET", "/api/v1/application", &tenant.alice(), None).await;
        assert_eq!(info["applicationId"], tenant.application.id.as_str());
    }

    // A token's header cannot pick the key: re-signing B's claims with A's key, or the reverse, fails.
    let token = |iss: &str, key: &str| sign_token(iss, key, "alice-1", "Alice", 600);
    for (what, forged) in [
        ("iss B, signed with A's key", token(&b.application.id, &a.application.key)),
        ("iss A, signed with B's key", token(&a.application.id, &b.application.key)),
        ("iss B, signed with an empty key", token(&b.application.id, "")),
    ] {
        let error = server.fails("GET", "/api/v1/application", &Auth::Bearer(forged), None, "token_invalid").await;
        assert!(!error["message"].as_str().unwrap().is_empty(), "{what}");
    }
    // A genuine A token whose payload is edited to name B fails the signature.
    let genuine = a.application.token("alice-1", "Alice");
    let parts: Vec<&str> = genuine.split('.').collect();
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&engine.decode(parts[1]).unwrap()).unwrap();
    claims["iss"] = json!(b.application.id);
    let edited = format!("{}.{}.{}", parts[0], engine.encode(claims.to_string()), parts[2]);
    server.fails("GET", "/api/v1/application", &Auth::Bearer(edited), None, "token_invalid").await;

    // Application credentials: one tenant's id with the other's key.
    server
        .fails("GET", "/api/v1/application", &basic(&b.application.id, &a.application.key), None, "unauthenticated")
        .await;
    server
        .fails("GET", "/api/v1/application", &basic(&a.application.id, &b.application.key), None, "unauthenticated")
        .await;
    server.fails("GET", "/api/v1/application", &basic(&b.application.id, ""), None, "unauthenticated").await;
    // Acting as B's user with A's credentials.
    server.fails("GET", "/api/v1/application", &a.application.acting_as(&b.alice_id), None, "user_not_found").await;
    server.fails("GET", "/api/v1/unread", &a.application.acting_as(&b.alice_id), None, "user_not_found").await;
    server.fails("GET", "/api/v1/conversation-list", &a.application.acting_as(&b.bob_id), None, "user_not_found").await;

    // Unregistering A leaves B alone.
    server.ok("DELETE", "/api/v1/registration", &a.application.privileged(), None).await;
    server.fails("GET", "/api/v1/application", &a.alice(), None, "application_not_registered").await;
    let info = server.ok("GET", "/api/v1/application", &b.alice(), None).await;
    assert_eq!(info["applicationId"], b.application.id.as_str());
    let messages = server
        .ok("POST", &format!("/api/v1/conversations/{}/messages/search", b.group_id), &b.alice(), Some(json!({})))
        .await;
    assert_eq!(list_len(&messages, "messages"), 1, "{messages}");
}

/// How many mails an address has received.
fn mail_count(server: &TestServer, email: &str) -> usize {
    std::fs::read_dir(&server.outbox)
        .unwrap()
        .flatten()
        .filter(|entry| {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            text.lines().any(|line| line.starts_with("To:") && line.contains(email))
        })
        .count()
}

#[tokio::test]
async fn one_subscriber_cannot_take_over_another_subscribers_application_or_address() {
    let server = TestServer::start().await;
    let a = Tenant::create(&server, "A").await;
    let b = Tenant::create(&server, "B").await;
    let before = b.snapshot(&server).await;
    let a_key = administration_key(&server, &a.application.email);
    let b_mail = mail_count(&server, &b.application.email);
    let a_mail = mail_count(&server, &a.application.email);

    // A cannot move its subscription onto B's address.
    let credential = json!({"subscriberEmail": a.application.email, "administrationKey": a_key});
    let error = server
        .fails(
            "POST",
            "/api/v1/subscriber/email",
            &Auth::None,
            Some(json!({"credential": credential, "newEmail": b.application.email.to_uppercase()})),
            "invalid_value",
        )
        .await;
    assert_eq!(error["field"], "newEmail", "{error}");
    // Nor reissue B's administration key, nor name administrators of B, with A's key.
    let a_key_for_b = json!({"subscriberEmail": b.application.email, "administrationKey": a_key});
    server
        .fails(
            "POST",
            "/api/v1/subscriber/administration-key",
            &Auth::None,
            Some(json!({"credential": a_key_for_b})),
            "subscriber_credential_invalid",
        )
        .await;
    server
        .fails(
            "PUT",
            "/api/v1/subscriber/administrators",
            &b.application.privileged(),
            Some(json!({"credential": credential, "userIds": [b.alice_id]})),
            "subscriber_credential_invalid",
        )
        .await;

    // Re-registering B's application id without an e-mail sends the code to B, not to whoever asked.
    let request = json!({"applicationId": b.application.id, "applicationName": "B app", "applicationUserCount": 5});
    let sent = server.ok("POST", "/api/v1/registration/request", &Auth::None, Some(request.clone())).await;
    assert_eq!(sent["email"], b.application.email.as_str());
    assert_eq!(mail_count(&server, &b.application.email), b_mail + 1);
    assert_eq!(mail_count(&server, &a.application.email), a_mail);
    // Asking changes nothing: B's key still works.
    server.ok("GET", "/api/v1/application", &b.application.privileged(), None).await;
    let mut guess = request;
    guess["activationCode"] = json!("00000000");
    server.fails("POST", "/api/v1/registration/complete", &Auth::None, Some(guess), "activation_code_invalid").await;

    // Re-registering B's application id with A's address makes a new application for A, with none of B's data.
    let hijack = server
        .register_with(json!({
            "applicationId": b.application.id, "email": a.application.email,
            "applicationName": "B app", "applicationUserCount": 5,
        }))
        .await;
    assert_ne!(hijack.id, b.application.id);
    assert_ne!(hijack.id, a.application.id);
    for id in b.conversation_ids() {
        server
            .fails("GET", &format!("/api/v1/conversations/{id}"), &hijack.privileged(), None, "conversation_not_found")
            .await;
    }
    let users =
        server.ok("POST", "/api/v1/users/search", &hijack.privileged(), Some(json!({"includeBlocked": true}))).await;
    assert_eq!(list_len(&users, "users"), 0, "{users}");
    server.fails("GET", "/api/v1/application", &hijack.acting_as(&b.alice_id), None, "user_not_found").await;

    // B's credentials and data are untouched.
    let info = server.ok("GET", "/api/v1/application", &b.alice(), None).await;
    assert_eq!(info["applicationId"], b.application.id.as_str());
    assert_eq!(info["subscriberEmail"], b.application.email.as_str());
    assert_eq!(b.snapshot(&server).await, before, "tenant B's data changed");
}
