//! Access that ends while a connection is open: a member removed from a
//! conversation or a user whose context access is revoked stops receiving
//! it at the event that took access away, and a connection ends with its
//! token unless the client presents a fresh one in time.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn seq_of(value: &Value) -> u64 {
    value["seq"].as_str().or(value["lastSeq"].as_str()).and_then(|seq| seq.parse().ok()).unwrap_or(0)
}

/// The next frame that concerns `conversation_id`: one of its events or the
/// end of its subscription.
async fn next_about(client: &mut Client, conversation_id: &str) -> Value {
    let id = conversation_id.to_owned();
    client
        .next_matching(move |push| {
            let event = push.get("event").filter(|event| event["conversationId"] == id.as_str());
            let ended = push.get("subscriptionEnded").filter(|ended| ended["conversationId"] == id.as_str());
            event.or(ended).map(|_| push.clone())
        })
        .await
}

/// Reads until `text` arrives as a new message in the conversation.
async fn until_message(client: &mut Client, conversation_id: &str, text: &str) -> u64 {
    loop {
        let frame = next_about(client, conversation_id).await;
        let event = frame.get("event").unwrap_or_else(|| panic!("expected events, got {frame}"));
        if event["messageCreated"]["text"] == text {
            return seq_of(event);
        }
    }
}

async fn send(client: &mut Client, conversation_id: &str, text: &str) -> u64 {
    let sent = client.request(json!({"sendMessage": {"conversation": {"id": conversation_id}, "text": text}})).await;
    seq_of(&sent["message"])
}

/// Nothing about the conversation reaches `client` for a while, although
/// `witness` (subscribed to it on the same server) receives `text`.
async fn nothing_more_about(client: &mut Client, conversation_id: &str, witness: &mut Client, text: &str) {
    until_message(witness, conversation_id, text).await;
    while let Some(frame) = client.next_frame_within(Duration::from_millis(300)).await {
        let about = frame.get("event").or(frame.get("subscriptionEnded")).map(|body| &body["conversationId"]);
        assert_ne!(about, Some(&json!(conversation_id)), "nothing more may arrive: {frame}");
    }
}

#[tokio::test]
async fn a_removed_member_stops_receiving_at_the_removal_and_cannot_resume_past_it() {
    let team = Team::start().await;
    let (carol_id, _) = user(&team.server, &team.application, "c1", "Carol").await;
    let conversation = &team.conversation_id;
    team.server
        .ok(
            "PATCH",
            &format!("/api/v1/conversations/{conversation}"),
            &team.application.privileged(),
            Some(json!({"addMemberIds": [carol_id]})),
        )
        .await;
    let mut alice = Client::connect(&team.server, &team.application.token("a1", "Alice")).await;
    let mut bob = Client::connect(&team.server, &team.application.token("b1", "Bob")).await;
    let mut carol = Client::connect(&team.server, &team.application.token("c1", "Carol")).await;
    for client in [&mut alice, &mut bob, &mut carol] {
        let subscribed = client.request(json!({"subscribe": {"conversation": {"id": conversation}}})).await;
        assert!(subscribed.get("subscribed").is_some(), "{subscribed}");
    }
    send(&mut alice, conversation, "before").await;
    until_message(&mut bob, conversation, "before").await;

    team.server
        .ok(
            "PATCH",
            &format!("/api/v1/conversations/{conversation}"),
            &team.application.privileged(),
            Some(json!({"removeMemberIds": [team.bob_id]})),
        )
        .await;
    send(&mut alice, conversation, "after").await;

    // Bob gets the change that removed him, then the end of the
    // subscription, and nothing committed after it.
    let change = next_about(&mut bob, conversation).await;
    let removal_seq = seq_of(&change["event"]);
    assert!(change["event"].get("conversationChanged").is_some(), "{change}");
    let ended = next_about(&mut bob, conversation).await;
    assert_eq!(ended["subscriptionEnded"]["reason"], "SUBSCRIPTION_END_REASON_REMOVED", "{ended}");
    assert_eq!(seq_of(&ended["subscriptionEnded"]), removal_seq, "{ended}");
    nothing_more_about(&mut bob, conversation, &mut carol, "after").await;

    // Resuming from before the removal hands out nothing, on a new
    // connection or over REST.
    let mut again = Client::connect(&team.server, &team.application.token("b1", "Bob")).await;
    let refused = again
        .request(
            json!({"subscribe": {"conversation": {"id": conversation}, "afterSeq": (removal_seq - 1).to_string()}}),
        )
        .await;
    assert_eq!(refused["error"]["code"], "not_a_member", "{refused}");
    assert!(again.pushes.iter().all(|push| push.get("event").is_none()), "no replay: {:?}", again.pushes);
    team.server
        .fails(
            "GET",
            &format!("/api/v1/conversations/{conversation}/events?afterSeq={}", removal_seq - 1),
            &team.bob,
            None,
            "not_a_member",
        )
        .await;

    // Leaving ends one's own subscriptions too, on every connection.
    alice.request(json!({"leaveConversation": {"conversation": {"id": conversation}}})).await;
    let ended = alice.next_matching(|push| push.get("subscriptionEnded").cloned()).await;
    assert_eq!(ended["reason"], "SUBSCRIPTION_END_REASON_REMOVED", "{ended}");
}

#[tokio::test]
async fn revoking_context_access_ends_the_subscription_before_the_next_event() {
    let team = Team::start().await;
    let app = team.application.privileged();
    let created = team
        .server
        .ok(
            "POST",
            "/api/v1/conversations",
            &app,
            Some(json!({"conversation": {
                "title": "Order 7",
                "context": {"objectType": "Document.Order", "objectId": "o-7"},
                "memberIds": [team.alice_id],
            }})),
        )
        .await;
    let conversation = created["id"].as_str().unwrap().to_owned();
    let access = format!("/api/v1/conversations/{conversation}/access");
    team.server.ok("PUT", &access, &app, Some(json!({"grantUserIds": [team.bob_id]}))).await;

    let mut alice = Client::connect(&team.server, &team.application.token("a1", "Alice")).await;
    let mut bob = Client::connect(&team.server, &team.application.token("b1", "Bob")).await;
    for client in [&mut alice, &mut bob] {
        let subscribed = client.request(json!({"subscribe": {"conversation": {"id": conversation}}})).await;
        assert!(subscribed.get("subscribed").is_some(), "{subscribed}");
    }
    send(&mut alice, &conversation, "granted").await;
    let granted_seq = until_message(&mut bob, &conversation, "granted").await;

    // Granting more changes nothing for Bob, and logs nothing.
    let (carol_id, _) = user(&team.server, &team.application, "c1", "Carol").await;
    team.server.ok("PUT", &access, &app, Some(json!({"grantUserIds": [carol_id]}))).await;
    team.server.ok("PUT", &access, &app, Some(json!({"revokeUserIds": [team.bob_id]}))).await;
    send(&mut alice, &conversation, "revoked").await;

    let change = next_about(&mut bob, &conversation).await;
    assert!(change["event"].get("conversationChanged").is_some(), "the revocation is logged: {change}");
    assert_eq!(seq_of(&change["event"]), granted_seq + 1, "a grant logs nothing: {change}");
    let ended = next_about(&mut bob, &conversation).await;
    assert_eq!(ended["subscriptionEnded"]["reason"], "SUBSCRIPTION_END_REASON_ACCESS_REVOKED", "{ended}");
    nothing_more_about(&mut bob, &conversation, &mut alice, "revoked").await;
    let refused = bob.request(json!({"subscribe": {"conversation": {"id": conversation}, "afterSeq": "1"}})).await;
    assert_eq!(refused["error"]["code"], "not_a_member", "{refused}");
}

#[tokio::test]
async fn a_connection_is_asked_for_a_fresh_token_and_closed_with_token_expired_at_exp() {
    let team = Team::start().await;
    let application = &team.application;
    let short = sign_token(&application.id, &application.key, "b1", "Bob", 3);
    let mut bob = Client::connect(&team.server, &short).await;
    let expiring = bob.next_matching(|push| push.get("tokenExpiring").cloned()).await;
    assert!(expiring["expiresAt"].is_string(), "{expiring}");
    let closed = bob.closed_by_server().await;
    assert_eq!(closed, Some((4001, "token_expired".to_owned())));
    let error = bob.next_matching(|push| push.get("error").cloned()).await;
    assert_eq!(error["code"], "token_expired", "{error}");
}

#[tokio::test]
async fn a_fresh_token_on_the_same_connection_keeps_it_open_past_the_old_exp() {
    let team = Team::start().await;
    let application = &team.application;
    let short = sign_token(&application.id, &application.key, "b1", "Bob", 3);
    let started = std::time::Instant::now();
    let mut bob = Client::connect(&team.server, &short).await;
    bob.next_matching(|push| push.get("tokenExpiring").cloned()).await;

    // Refusals change nothing: another user's token, an empty one, one that
    // expires no later than the current token.
    let alices = application.token("a1", "Alice");
    let refused = bob.request(json!({"refreshToken": {"token": alices}})).await;
    assert_eq!(refused["error"]["code"], "token_invalid", "{refused}");
    let refused = bob.request(json!({"refreshToken": {}})).await;
    assert_eq!(refused["error"]["code"], "field_required", "{refused}");
    let older = sign_token(&application.id, &application.key, "b1", "Bob", 1);
    let refused = bob.request(json!({"refreshToken": {"token": older}})).await;
    assert!(["token_invalid", "token_expired"].contains(&refused["error"]["code"].as_str().unwrap()), "{refused}");

    let fresh = sign_token(&application.id, &application.key, "b1", "Bob", 600);
    let refreshed = bob.request(json!({"refreshToken": {"token": fresh}})).await;
    assert!(refreshed["tokenRefreshed"]["expiresAt"].is_string(), "{refreshed}");

    // Well past the old token's exp the connection still answers.
    let mut nonce = 0;
    while started.elapsed() < Duration::from_secs(5) {
        nonce += 1;
        let pong = bob.request(json!({"ping": {"nonce": nonce.to_string()}})).await;
        assert_eq!(pong["pong"]["nonce"], nonce.to_string(), "{pong}");
        if let Some(frame) = bob.next_frame_within(Duration::from_millis(200)).await {
            assert!(frame.get("error").is_none(), "the connection must stay open: {frame}");
        }
    }
    assert!(bob.pushes.iter().all(|push| push.get("error").is_none()), "{:?}", bob.pushes);
}
