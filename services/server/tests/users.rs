//! User kinds and their restrictions, over real sockets: bots, integration
//! users, external users, and what plain users may change about themselves.

mod common;

use common::*;
use serde_json::json;

async fn create_user(server: &TestServer, application: &Application, user: serde_json::Value) -> String {
    let created = server.ok("POST", "/api/v1/users", &application.privileged(), Some(json!({"user": user}))).await;
    created["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn each_kind_is_created_with_its_own_required_data() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let app = application.privileged();
    let (_, alice) = user(&server, &application, "a1", "Alice").await;

    // Only privileged mode creates users.
    server
        .fails("POST", "/api/v1/users", &alice, Some(json!({"user": {"name": "x"}})), "privileged_mode_required")
        .await;
    // A bot must not be paired with an infobase user.
    server
        .fails(
            "POST",
            "/api/v1/users",
            &app,
            Some(json!({"user": {"kind": "USER_KIND_BOT", "name": "Helper", "infobaseUserId": "ib-1"}})),
            "invalid_value",
        )
        .await;
    let bot = server
        .ok("POST", "/api/v1/users", &app, Some(json!({"user": {"kind": "USER_KIND_BOT", "name": "Helper"}})))
        .await;
    assert_eq!(bot["kind"], "USER_KIND_BOT");
    // Integration users need their external system and id.
    let error = server
        .fails(
            "POST",
            "/api/v1/users",
            &app,
            Some(json!({"user": {"kind": "USER_KIND_INTEGRATION", "name": "Tg"}})),
            "field_required",
        )
        .await;
    assert_eq!(error["field"], "externalSystemType");
    // External users need an authentication e-mail, stored lower-cased.
    let external = server
        .ok(
            "POST",
            "/api/v1/users",
            &app,
            Some(json!({"user": {"kind": "USER_KIND_EXTERNAL", "name": "Partner", "authenticationEmail": "Partner@Example.COM"}})),
        )
        .await;
    assert_eq!(external["authenticationEmail"], "partner@example.com");
    // Guests come only from invitation links.
    server
        .fails(
            "POST",
            "/api/v1/users",
            &app,
            Some(json!({"user": {"kind": "USER_KIND_GUEST", "name": "Visitor"}})),
            "user_kind_restricted",
        )
        .await;
    // The same infobase user cannot be paired twice.
    create_user(&server, &application, json!({"name": "Boris", "infobaseUserId": "ib-boris"})).await;
    server
        .fails(
            "POST",
            "/api/v1/users",
            &app,
            Some(json!({"user": {"name": "Boris 2", "infobaseUserId": "ib-boris"}})),
            "user_exists",
        )
        .await;
}

#[tokio::test]
async fn integration_users_get_no_notifications_and_no_one_on_one() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let telegram_user = create_user(
        &server,
        &application,
        json!({"kind": "USER_KIND_INTEGRATION", "name": "Ivan (Telegram)", "externalSystemType": "Telegram", "externalSystemUserId": "tg-42"}),
    )
    .await;
    server
        .fails(
            "POST",
            "/api/v1/conversations",
            &alice,
            Some(json!({"conversation": {"group": false, "memberIds": [telegram_user]}})),
            "user_kind_restricted",
        )
        .await;
    let conversation_id = group(&server, &application, "Support", &[&alice_id, &telegram_user]).await;
    server
        .ok(
            "POST",
            &format!("/api/v1/conversations/{conversation_id}/messages"),
            &alice,
            Some(json!({"text": "hello"})),
        )
        .await;
    let unread = server.ok("GET", "/api/v1/unread", &application.acting_as(&telegram_user), None).await;
    assert!(unread.get("totalUnread").is_none(), "integration users are never notified: {unread}");
}

#[tokio::test]
async fn external_users_stay_in_non_context_conversations_and_see_only_who_they_share_them_with() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let app = application.privileged();
    let (alice_id, _) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, _) = user(&server, &application, "b1", "Bob").await;
    let partner = create_user(
        &server,
        &application,
        json!({"kind": "USER_KIND_EXTERNAL", "name": "Partner", "authenticationEmail": "partner@example.com"}),
    )
    .await;
    let as_partner = application.acting_as(&partner);
    let shared = group(&server, &application, "With partner", &[&alice_id, &partner]).await;

    // They see the users they share a conversation with, and nobody else.
    let visible = server.ok("POST", "/api/v1/users/search", &as_partner, Some(json!({}))).await;
    let mut names: Vec<&str> =
        visible["users"].as_array().unwrap().iter().map(|user| user["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["Alice", "Partner"]);
    server.ok("GET", &format!("/api/v1/users/{alice_id}"), &as_partner, None).await;
    server.fails("GET", &format!("/api/v1/users/{bob_id}"), &as_partner, None, "user_not_found").await;

    // They may not be put into context conversations, nor create them.
    let context = json!({"objectType": "Document.Order", "objectId": "o-1"});
    server
        .fails(
            "POST",
            "/api/v1/conversations",
            &app,
            Some(json!({"conversation": {"title": "Order", "context": context, "memberIds": [partner]}})),
            "user_kind_restricted",
        )
        .await;
    server
        .fails(
            "POST",
            "/api/v1/conversations",
            &as_partner,
            Some(json!({"conversation": {"title": "Mine", "context": context}})),
            "user_kind_restricted",
        )
        .await;

    // They can only leave, not rename or add people.
    server
        .fails(
            "PATCH",
            &format!("/api/v1/conversations/{shared}"),
            &as_partner,
            Some(json!({"title": "Renamed"})),
            "user_kind_restricted",
        )
        .await;
    server
        .fails(
            "PATCH",
            &format!("/api/v1/conversations/{shared}"),
            &as_partner,
            Some(json!({"addMemberIds": [bob_id]})),
            "user_kind_restricted",
        )
        .await;
    server.ok("POST", &format!("/api/v1/conversations/{shared}/leave"), &as_partner, None).await;
}

#[tokio::test]
async fn users_change_only_some_of_their_own_properties_and_names_come_from_the_token() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, _) = user(&server, &application, "b1", "Bob").await;
    let path = format!("/api/v1/users/{alice_id}");

    let changed = server.ok("PATCH", &path, &alice, Some(json!({"updateMask": ["phone", "email"], "user": {"phone": "+7 900 000-00-00", "email": "alice@example.com"}}))).await;
    assert_eq!(changed["phone"], "+7 900 000-00-00");
    let error = server
        .fails(
            "PATCH",
            &path,
            &alice,
            Some(json!({"updateMask": ["blocked"], "user": {"blocked": false}})),
            "privileged_mode_required",
        )
        .await;
    assert_eq!(error["field"], "blocked");
    server
        .fails(
            "PATCH",
            &format!("/api/v1/users/{bob_id}"),
            &alice,
            Some(json!({"updateMask": ["phone"], "user": {"phone": "1"}})),
            "permission_denied",
        )
        .await;
    server.fails("PATCH", &path, &alice, Some(json!({"user": {"phone": "1"}})), "field_required").await;
    server
        .fails(
            "PATCH",
            &path,
            &application.privileged(),
            Some(json!({"updateMask": ["email"], "user": {"email": "not an address"}})),
            "email_invalid",
        )
        .await;
    // Subscriber administration is read-only here.
    server
        .fails(
            "PATCH",
            &path,
            &application.privileged(),
            Some(json!({"updateMask": ["subscriberAdministrator"], "user": {"subscriberAdministrator": true}})),
            "invalid_value",
        )
        .await;
}

#[tokio::test]
async fn get_users_filters_by_name_kind_and_conversation_and_hides_blocked_users() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let app = application.privileged();
    let (alice_id, alice) = user(&server, &application, "a1", "Алиса").await;
    let (bob_id, _) = user(&server, &application, "b1", "Борис").await;
    user(&server, &application, "c1", "Clara").await;
    create_user(&server, &application, json!({"kind": "USER_KIND_BOT", "name": "Бот-помощник"})).await;
    let conversation_id = group(&server, &application, "Pair", &[&alice_id, &bob_id]).await;
    let names = |value: &serde_json::Value| -> Vec<String> {
        value["users"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|user| user["name"].as_str().unwrap().to_owned())
            .collect()
    };

    // Case-insensitive search across Unicode.
    assert_eq!(
        names(&server.ok("POST", "/api/v1/users/search", &alice, Some(json!({"nameContains": "БОР"}))).await),
        ["Борис"]
    );
    assert_eq!(
        names(&server.ok("POST", "/api/v1/users/search", &alice, Some(json!({"kind": "USER_KIND_BOT"}))).await),
        ["Бот-помощник"]
    );
    assert_eq!(
        names(
            &server.ok("POST", "/api/v1/users/search", &alice, Some(json!({"conversationId": conversation_id}))).await
        ),
        ["Алиса", "Борис"]
    );
    // Blocked users are hidden from pickers unless asked for.
    server
        .ok(
            "PATCH",
            &format!("/api/v1/users/{bob_id}"),
            &app,
            Some(json!({"updateMask": ["blocked"], "user": {"blocked": true}})),
        )
        .await;
    assert!(
        !names(&server.ok("POST", "/api/v1/users/search", &alice, Some(json!({}))).await).contains(&"Борис".to_owned())
    );
    let with_blocked = server.ok("POST", "/api/v1/users/search", &alice, Some(json!({"includeBlocked": true}))).await;
    assert!(names(&with_blocked).contains(&"Борис".to_owned()));
    // Descending order pages from the other end.
    let first = server
        .ok(
            "POST",
            "/api/v1/users/search",
            &alice,
            Some(json!({"count": 1, "sortDirection": "SORT_DIRECTION_DESCENDING"})),
        )
        .await;
    assert_eq!(names(&first), ["Бот-помощник"]);
}
