//! The whole server on PostgreSQL, over real sockets. Runs when
//! `BESEDA_TEST_PG_URL` is set (CI sets it, and then these tests must pass);
//! each test uses its own schema and drops it.

mod common;

use common::*;
use serde_json::json;

fn postgres_url() -> Option<String> {
    common::postgres_url("the PostgreSQL end-to-end tests")
}

fn fresh_schema() -> String {
    format!("e2e_{}", uuid_like())
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

#[tokio::test]
async fn chat_resume_and_restart_work_on_postgresql() {
    let Some(url) = postgres_url() else { return };
    let schema = fresh_schema();

    // Phase 1: registration, users and a live exchange on PostgreSQL.
    let server = TestServer::start_on_postgres(&url, &schema).await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, _) = user(&server, &application, "b1", "Bob").await;
    let conversation_id = group(&server, &application, "Team", &[&alice_id, &bob_id]).await;
    let path = format!("/api/v1/conversations/{conversation_id}/messages");
    let mut bob = Client::connect(&server, &application.token("b1", "Bob")).await;
    bob.request(json!({"subscribe": {"conversation": {"id": conversation_id}}})).await;
    server.ok("POST", &path, &alice, Some(json!({"text": "one", "clientMessageId": "c-1"}))).await;
    server.ok("POST", &path, &alice, Some(json!({"text": "one", "clientMessageId": "c-1"}))).await;
    assert_eq!(bob.next_event().await["messageCreated"]["text"], "one");
    bob.close().await;

    // Phase 2: messages while Bob is away; then the node restarts on the same schema.
    server.ok("POST", &path, &alice, Some(json!({"text": "two"}))).await;
    server.ok("POST", &path, &alice, Some(json!({"text": "three"}))).await;
    let data_dir = server.stop().await;
    drop(data_dir);
    let server = TestServer::start_on_postgres(&url, &schema).await;

    // Phase 3: Bob resumes after seq 1 and gets exactly the two he missed.
    let mut bob = Client::connect(&server, &application.token("b1", "Bob")).await;
    let subscribed =
        bob.request(json!({"subscribe": {"conversation": {"id": conversation_id}, "afterSeq": "1"}})).await;
    assert_eq!(subscribed["subscribed"]["lastSeq"], "3", "{subscribed}");
    assert_eq!(bob.next_event().await["messageCreated"]["text"], "two");
    assert_eq!(bob.next_event().await["messageCreated"]["text"], "three");
    let listed = server.ok("POST", &format!("{path}/search"), &alice, Some(json!({}))).await;
    let texts: Vec<&str> =
        listed["messages"].as_array().unwrap().iter().map(|message| message["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["one", "two", "three"], "the retried send was stored once");

    server.stop().await;
    beseda_store::postgres::PostgresStore::drop_schema(&url, &schema).await.unwrap();
}

#[tokio::test]
async fn bot_events_survive_a_restart_and_webhooks_work_on_postgresql() {
    let Some(url) = postgres_url() else { return };
    let schema = fresh_schema();
    let server = TestServer::start_on_postgres(&url, &schema).await;
    let application = server.register("owner@example.com", "Sales").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let mut processing = processing::Processing::connect(&server, &application, json!([{"botType": "Echo"}])).await;
    let bot_user = processing.bot_user("Echo");
    let conversation_id = one_on_one(&server, &application, &alice_id, &bot_user).await;
    let path = format!("/api/v1/conversations/{conversation_id}/messages");
    server.ok("POST", &path, &alice, Some(json!({"text": "first"}))).await;
    let first = processing.next_message_event().await;
    assert_eq!(first["message"]["text"], "first");
    processing.ack(&first).await;
    // Handed out but never acknowledged when the node stops.
    server.ok("POST", &path, &alice, Some(json!({"text": "second"}))).await;
    let second = processing.next_message_event().await;
    processing.kill();
    server.stop().await;

    let server = TestServer::start_on_postgres(&url, &schema).await;
    let mut processing = processing::Processing::connect(&server, &application, json!([{"botType": "Echo"}])).await;
    let again = processing.next_message_event().await;
    assert_eq!(again["deliveryId"], second["deliveryId"]);
    assert_eq!(again["message"]["text"], "second");
    processing.ack(&again).await;
    processing.expect_no_event(std::time::Duration::from_millis(300)).await;

    // A webhook command, replayed: stored once.
    let integration = server
        .ok(
            "POST",
            "/api/v1/integrations",
            &application.privileged(),
            Some(json!({"integration": {"externalSystemType": "webhook", "key": "crm", "use": true, "presentation": "CRM", "memberIds": [alice_id]}})),
        )
        .await;
    let hook = integration["connectionPointUrl"].as_str().unwrap().to_owned();
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| http.post(&hook).json(&body).send();
    assert_eq!(
        post(json!({"createConversation": {"extConversationId": "c1", "title": "Lead"}})).await.unwrap().status(),
        200
    );
    let message = json!({"createMessage": {"extId": "m1", "extConversationId": "c1", "text": "hello"}});
    assert_eq!(post(message.clone()).await.unwrap().status(), 200);
    assert_eq!(post(message).await.unwrap().status(), 409);

    server.stop().await;
    beseda_store::postgres::PostgresStore::drop_schema(&url, &schema).await.unwrap();
}
