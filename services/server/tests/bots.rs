//! Bots end to end: a real server, applications speaking the documented
//! processing connection over WebSocket, people using the REST API.

mod common;

use std::time::Duration;

use common::processing::Processing;
use common::{Application, TestServer, WAIT, one_on_one, user};
use serde_json::{Value, json};

/// Fast retries and polls, so that failure paths finish in seconds.
async fn server_with(lease_seconds: u64) -> TestServer {
    TestServer::start_configured(tempfile::tempdir().unwrap(), None, |config| {
        config.bots.lease_seconds = lease_seconds;
        config.bots.max_attempts = 3;
        config.bots.initial_backoff_milliseconds = 50;
        config.bots.max_backoff_milliseconds = 200;
        config.bots.poll_interval_milliseconds = 50;
    })
    .await
}

async fn send(server: &TestServer, auth: &common::Auth, conversation_id: &str, body: Value) -> Value {
    server.ok("POST", &format!("/api/v1/conversations/{conversation_id}/messages"), auth, Some(body)).await
}

async fn bot_user(server: &TestServer, application: &Application, name: &str) -> String {
    let created = server
        .ok(
            "POST",
            "/api/v1/users",
            &application.privileged(),
            Some(json!({"user": {"name": name, "kind": "USER_KIND_BOT"}})),
        )
        .await;
    created["id"].as_str().unwrap().to_owned()
}

/// CreateBot that must fail with `code`; returns the error.
async fn refuse_bot(server: &TestServer, auth: &common::Auth, body: Value, code: &str) -> Value {
    server.fails("POST", "/api/v1/bots", auth, Some(body), code).await
}

async fn create_bot(server: &TestServer, application: &Application, user_id: &str, bot_type: &str) -> Value {
    server
        .ok(
            "POST",
            "/api/v1/bots",
            &application.privileged(),
            Some(json!({"bot": {"userId": user_id, "botType": bot_type, "additionalParameters": {"answer": "yes"}}})),
        )
        .await
}

#[tokio::test]
async fn the_echo_bot_answers_in_a_one_on_one() {
    let server = server_with(120).await;
    let application = server.register("owner@example.com", "Shop").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let settings = beseda_echo_bot::Settings {
        server_url: server.base_url.clone(),
        application_id: application.id.clone(),
        application_key: application.key.clone(),
        renew: Duration::from_secs(60),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let bot = tokio::spawn(beseda_echo_bot::run(settings, async move {
        let _ = stopped.await;
    }));
    // The predefined bot appears on the first ExecuteBotProcessing.
    let deadline = tokio::time::Instant::now() + WAIT;
    let bot_user_id = loop {
        let bots = server.ok("GET", "/api/v1/bots", &application.privileged(), None).await;
        if let Some(bot) = bots["bots"].as_array().and_then(|bots| bots.first()) {
            assert_eq!(bot["botType"], "EchoBot");
            assert_eq!(bot["predefined"], true);
            break bot["userId"].as_str().unwrap().to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "the predefined bot was not created");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let conversation_id = one_on_one(&server, &application, &alice_id, &bot_user_id).await;
    send(&server, &alice, &conversation_id, json!({"text": "hello\nworld"})).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let page = server
            .ok("POST", &format!("/api/v1/conversations/{conversation_id}/messages/search"), &alice, Some(json!({})))
            .await;
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        if let Some(answer) = messages.iter().find(|message| message["authorId"] == bot_user_id.as_str()) {
            assert_eq!(answer["text"], "echo\n>hello\n>world");
            assert_eq!(messages.len(), 2, "one answer, not more: {messages:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the echo bot did not answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    bot.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_bot_in_a_group_hears_only_what_it_should() {
    let server = server_with(120).await;
    let application = server.register("owner@example.com", "Shop").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, _) = user(&server, &application, "b1", "Bob").await;
    let helper_user = bot_user(&server, &application, "Helper").await;
    let other_user = bot_user(&server, &application, "Other").await;
    let helper = create_bot(&server, &application, &helper_user, "HelperBot").await;
    create_bot(&server, &application, &other_user, "OtherBot").await;
    let mut processing = Processing::connect(&server, &application, json!([])).await;
    let group = common::group(&server, &application, "Team", &[&alice_id, &bob_id, &helper_user, &other_user]).await;
    let created = processing.next_event().await;
    assert_eq!(created["kind"], "BOT_EVENT_KIND_CONVERSATION_CREATED");
    processing.ack(&created).await;
    let created = processing.next_event().await;
    assert_eq!(created["kind"], "BOT_EVENT_KIND_CONVERSATION_CREATED");
    processing.ack(&created).await;
    // Not watching: only what is addressed to it.
    server
        .ok(
            "PUT",
            &format!("/api/v1/conversations/{group}/watch"),
            &application.privileged(),
            Some(json!({"watch": false, "userId": helper_user})),
        )
        .await;
    send(&server, &alice, &group, json!({"text": "1 not addressed"})).await;
    send(&server, &alice, &group, json!({"text": "2 addressed", "recipientIds": [helper_user]})).await;
    send(
        &server,
        &application.acting_as(&other_user),
        &group,
        json!({"text": "3 from a bot", "recipientIds": [helper_user]}),
    )
    .await;
    send(&server, &application.acting_as(&helper_user), &group, json!({"text": "4 its own"})).await;
    // Each bot's events come in conversation order, but how one bot's queue interleaves with
    // another's on the shared connection is not specified: read per bot.
    let mut heard: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    loop {
        let event = processing.next_message_event().await;
        let bot_type = event["bot"]["botType"].as_str().unwrap().to_owned();
        let text = event["message"]["text"].as_str().unwrap().to_owned();
        if bot_type == "HelperBot" {
            assert_eq!(text, "2 addressed", "HelperBot does not watch: only what names it, from people");
            assert_eq!(event["bot"]["id"], helper["id"]);
            assert_eq!(event["bot"]["additionalParameters"]["answer"], "yes");
            assert_eq!(event["attempt"], 1);
        }
        processing.ack(&event).await;
        heard.entry(bot_type.clone()).or_default().push(text);
        // Messages are relayed in order, so HelperBot's "2" means 1 to 4 were all decided.
        if bot_type == "HelperBot" {
            break;
        }
    }
    // Watching again: everything from people.
    server
        .ok(
            "PUT",
            &format!("/api/v1/conversations/{group}/watch"),
            &application.privileged(),
            Some(json!({"watch": true, "userId": helper_user})),
        )
        .await;
    send(&server, &alice, &group, json!({"text": "5 watched"})).await;
    let expected = std::collections::BTreeMap::from([
        ("HelperBot".to_owned(), vec!["2 addressed".to_owned(), "5 watched".to_owned()]),
        // OtherBot watches by default; messages of bots ("3", "4") reach no bot.
        ("OtherBot".to_owned(), vec!["1 not addressed".to_owned(), "2 addressed".to_owned(), "5 watched".to_owned()]),
    ]);
    while heard.values().map(Vec::len).sum::<usize>() < expected.values().map(Vec::len).sum::<usize>() {
        let event = processing.next_message_event().await;
        let bot_type = event["bot"]["botType"].as_str().unwrap().to_owned();
        heard.entry(bot_type).or_default().push(event["message"]["text"].as_str().unwrap().to_owned());
        processing.ack(&event).await;
    }
    assert_eq!(heard, expected, "what each bot heard, in order");
    processing.expect_no_event(Duration::from_millis(300)).await;
    // Removed from the conversation: told so.
    server
        .ok(
            "PATCH",
            &format!("/api/v1/conversations/{group}"),
            &application.privileged(),
            Some(json!({"removeMemberIds": [helper_user]})),
        )
        .await;
    let removed = processing.next_event().await;
    assert_eq!(removed["kind"], "BOT_EVENT_KIND_REMOVED_FROM_CONVERSATION");
    assert_eq!(removed["bot"]["id"], helper["id"]);
    processing.ack(&removed).await;
    // No longer a member: a message addressed to it does not reach it.
    send(&server, &alice, &group, json!({"text": "6 after removal", "recipientIds": [helper_user]})).await;
    let event = processing.next_message_event().await;
    assert_eq!(
        (event["bot"]["botType"].as_str(), event["message"]["text"].as_str()),
        (Some("OtherBot"), Some("6 after removal"))
    );
    processing.ack(&event).await;
    // Added again: told so.
    server
        .ok(
            "PATCH",
            &format!("/api/v1/conversations/{group}"),
            &application.privileged(),
            Some(json!({"addMemberIds": [helper_user]})),
        )
        .await;
    let added = processing.next_event().await;
    assert_eq!(added["kind"], "BOT_EVENT_KIND_ADDED_TO_CONVERSATION");
    assert_eq!(added["bot"]["id"], helper["id"]);
    assert_eq!(added["conversation"]["id"], group.as_str());
}

#[tokio::test]
async fn an_event_of_a_killed_application_comes_again_and_an_acknowledged_one_never() {
    let server = server_with(120).await;
    let application = server.register("owner@example.com", "Shop").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let first = Processing::connect(&server, &application, json!([{"botType": "Echo"}])).await;
    let bot_user_id = first.bot_user("Echo");
    let conversation = one_on_one(&server, &application, &alice_id, &bot_user_id).await;
    let mut first = first;
    let created = first.next_event().await;
    first.ack(&created).await;
    send(&server, &alice, &conversation, json!({"text": "process me"})).await;
    let event = first.next_message_event().await;
    assert_eq!(event["attempt"], 1);
    // The application dies in the middle of processing: no acknowledgement.
    first.kill();
    let mut second = Processing::connect(&server, &application, json!([{"botType": "Echo"}])).await;
    let again = second.next_message_event().await;
    assert_eq!(again["deliveryId"], event["deliveryId"]);
    assert_eq!(again["message"]["text"], "process me");
    assert_eq!(again["attempt"], 2);
    second.ack(&again).await;
    send(&server, &alice, &conversation, json!({"text": "next"})).await;
    let next = second.next_message_event().await;
    assert_eq!(next["message"]["text"], "next");
    second.ack(&next).await;
    drop(second);
    // A new connection gets nothing that was acknowledged.
    let mut third = Processing::connect(&server, &application, json!([{"botType": "Echo"}])).await;
    third.expect_no_event(Duration::from_millis(500)).await;
    // And the predefined bot was created once.
    let bots = server.ok("GET", "/api/v1/bots", &application.privileged(), None).await;
    assert_eq!(bots["bots"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_poison_event_becomes_a_dead_letter_while_other_conversations_flow() {
    let server = server_with(120).await;
    let application = server.register("owner@example.com", "Shop").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (bob_id, bob) = user(&server, &application, "b1", "Bob").await;
    let mut processing = Processing::connect(&server, &application, json!([{"botType": "Fragile"}])).await;
    let bot_user_id = processing.bot_user("Fragile");
    let with_alice = one_on_one(&server, &application, &alice_id, &bot_user_id).await;
    let with_bob = one_on_one(&server, &application, &bob_id, &bot_user_id).await;
    send(&server, &alice, &with_alice, json!({"text": "poison"})).await;
    send(&server, &alice, &with_alice, json!({"text": "after poison"})).await;
    send(&server, &bob, &with_bob, json!({"text": "b1"})).await;
    send(&server, &bob, &with_bob, json!({"text": "b2"})).await;
    let mut bob_texts = Vec::new();
    let mut poison_attempts = Vec::new();
    while bob_texts.len() < 2 || poison_attempts.len() < 3 {
        let event = processing.next_message_event().await;
        match event["message"]["text"].as_str().unwrap() {
            "poison" => {
                poison_attempts.push(event["attempt"].as_u64().unwrap());
                processing.nack(&event, "handler raised: division by zero").await;
            }
            "after poison" => panic!("a later event of the conversation overtook the failing one"),
            text => {
                bob_texts.push(text.to_owned());
                processing.ack(&event).await;
            }
        }
    }
    assert_eq!(bob_texts, ["b1", "b2"]);
    assert_eq!(poison_attempts, [1, 2, 3]);
    // Dead now: the conversation moves on.
    let after = processing.next_message_event().await;
    assert_eq!(after["message"]["text"], "after poison");
    processing.ack(&after).await;
    let dead = server.ok("POST", "/api/v1/dead-letters/search", &application.privileged(), Some(json!({}))).await;
    let letters = dead["deadLetters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{dead}");
    assert_eq!(letters[0]["lastError"], "handler raised: division by zero");
    assert_eq!(letters[0]["attempts"], 3);
    assert_eq!(letters[0]["event"]["message"]["text"], "poison");
    // Retried: delivered once more with a fresh count, then acknowledged.
    let ids = json!({"deliveryIds": [letters[0]["deliveryId"]]});
    let retried = server.ok("POST", "/api/v1/dead-letters/retry", &application.privileged(), Some(ids.clone())).await;
    assert_eq!(retried["affected"], "1");
    let again = processing.next_message_event().await;
    assert_eq!((again["message"]["text"].as_str(), again["attempt"].as_u64()), (Some("poison"), Some(1)));
    processing.ack(&again).await;
    let discarded = server.ok("POST", "/api/v1/dead-letters/discard", &application.privileged(), Some(ids)).await;
    assert!(
        discarded.get("affected").is_none_or(|affected| affected == "0"),
        "an acknowledged event is no dead letter: {discarded}"
    );
    // Another application sees none of it.
    let other = server.register("other@example.com", "Other").await;
    let foreign = server.ok("POST", "/api/v1/dead-letters/search", &other.privileged(), Some(json!({}))).await;
    assert!(foreign["deadLetters"].as_array().is_none_or(|letters| letters.is_empty()), "{foreign}");
}

#[tokio::test]
async fn two_bots_share_one_connection_and_a_newer_connection_takes_over() {
    let server = server_with(120).await;
    let application = server.register("owner@example.com", "Shop").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let mut processing =
        Processing::connect(&server, &application, json!([{"botType": "Yes"}, {"botType": "No", "name": "Nay"}])).await;
    assert_eq!(processing.bots.len(), 2);
    let yes = one_on_one(&server, &application, &alice_id, &processing.bot_user("Yes")).await;
    let no = one_on_one(&server, &application, &alice_id, &processing.bot_user("No")).await;
    send(&server, &alice, &yes, json!({"text": "to yes"})).await;
    send(&server, &alice, &no, json!({"text": "to no"})).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let event = processing.next_message_event().await;
        seen.push(format!(
            "{}:{}",
            event["bot"]["botType"].as_str().unwrap(),
            event["message"]["text"].as_str().unwrap()
        ));
        processing.ack(&event).await;
    }
    seen.sort();
    assert_eq!(seen, ["No:to no", "Yes:to yes"]);
    let _newer = Processing::connect(&server, &application, json!([])).await;
    let closed = processing.closed().await;
    assert_eq!(closed["code"], "lease_superseded");
}

#[tokio::test]
async fn a_lapsed_lease_pauses_delivery_until_the_next_call() {
    let server = server_with(1).await;
    let application = server.register("owner@example.com", "Shop").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let mut processing = Processing::connect(&server, &application, json!([{"botType": "Sleepy"}])).await;
    let conversation = one_on_one(&server, &application, &alice_id, &processing.bot_user("Sleepy")).await;
    // No ExecuteBotProcessing within the lease: the server closes.
    let closed = loop {
        let frame = processing.next_frame().await.expect("a closing frame");
        if let Some(closed) = frame.get("closed") {
            break closed.clone();
        }
        if let Some(event) = frame.get("event") {
            processing.ack(event).await;
        }
    };
    assert_eq!(closed["code"], "lease_expired");
    assert!(closed["message"].as_str().unwrap().contains("ExecuteBotProcessing"));
    send(&server, &alice, &conversation, json!({"text": "while nobody listens"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut renewed = Processing::connect(&server, &application, json!([{"botType": "Sleepy"}])).await;
    let event = renewed.next_message_event().await;
    assert_eq!(event["message"]["text"], "while nobody listens");
    assert_eq!(event["attempt"], 1);
    renewed.ack(&event).await;
}

#[tokio::test]
async fn buttons_reach_the_bot_that_wrote_them_and_disabled_ones_cannot_be_pressed() {
    let server = server_with(120).await;
    let application = server.register("owner@example.com", "Shop").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let (_, bob) = user(&server, &application, "b1", "Bob").await;
    let mut processing = Processing::connect(&server, &application, json!([{"botType": "Orders"}])).await;
    let bot_user_id = processing.bot_user("Orders");
    let conversation = one_on_one(&server, &application, &alice_id, &bot_user_id).await;
    let button = |text: &str, action: &str, enabled: bool| json!({"kind": "BUTTON_KIND_BUTTON", "text": text, "messageText": format!("I chose {text}"), "data": "{\"order\":7}", "action": action, "enabled": enabled});
    let question = send(
        &server,
        &application.acting_as(&bot_user_id),
        &conversation,
        json!({"text": "Confirm order 7?", "buttons": {"rows": [{"buttons": [
            button("Yes", "BUTTON_ACTION_PROCESS_BY_BOT", true),
            button("Later", "BUTTON_ACTION_PROCESS_BY_BOT", false),
            button("Say", "BUTTON_ACTION_SEND_MESSAGE_WITH_DATA", true),
            button("Call", "BUTTON_ACTION_REQUEST_PHONE", true),
        ]}]}}),
    )
    .await;
    let message_id = question["id"].as_str().unwrap();
    let press = |column: u32| json!({"row": 0, "column": column});
    let path = format!("/api/v1/messages/{message_id}/buttons/press");
    server.ok("POST", &path, &alice, Some(press(0))).await;
    server.fails("POST", &path, &alice, Some(press(1)), "button_disabled").await;
    server.fails("POST", &path, &alice, Some(press(3)), "button_not_server_side").await;
    server.fails("POST", &path, &alice, Some(press(9)), "invalid_value").await;
    server.fails("POST", &path, &bob, Some(press(0)), "not_a_member").await;
    let said = server.ok("POST", &path, &alice, Some(press(2))).await;
    assert_eq!(said["sentMessage"]["text"], "I chose Say");
    assert_eq!(said["sentMessage"]["authorId"], alice_id.as_str());
    let pressed = loop {
        let event = processing.next_event().await;
        if event["kind"] == "BOT_EVENT_KIND_BUTTON_PRESSED" {
            break event;
        }
        processing.ack(&event).await;
    };
    assert_eq!(pressed["button"]["text"], "Yes");
    assert_eq!(pressed["buttonColumn"].as_u64().unwrap_or(0), 0);
    assert_eq!(pressed["userId"], alice_id.as_str());
    assert_eq!(pressed["message"]["id"], message_id);
    processing.ack(&pressed).await;
    // The bot states the choice and removes the buttons.
    let edited = server
        .ok(
            "PATCH",
            &format!("/api/v1/messages/{message_id}"),
            &application.acting_as(&bot_user_id),
            Some(json!({"text": "Order 7 confirmed", "clearButtons": true})),
        )
        .await;
    assert!(edited.get("buttons").is_none_or(Value::is_null), "{edited}");
    server.fails("POST", &path, &alice, Some(press(0)), "invalid_value").await;
    // ProcessByBot buttons are for bots only.
    let (_, alice_token_auth) = (alice_id.clone(), alice);
    let error = server
        .fails(
            "POST",
            &format!("/api/v1/conversations/{conversation}/messages"),
            &alice_token_auth,
            Some(json!({"text": "x", "buttons": {"rows": [{"buttons": [button("Yes", "BUTTON_ACTION_PROCESS_BY_BOT", true)]}]}})),
            "invalid_button",
        )
        .await;
    assert!(error["message"].as_str().unwrap().to_lowercase().contains("bot"), "{error}");
}

#[tokio::test]
async fn bot_objects_follow_the_rules_of_standard_798() {
    let server = server_with(120).await;
    let application = server.register("owner@example.com", "Shop").await;
    let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
    let helper_user = bot_user(&server, &application, "Helper").await;
    let privileged = application.privileged();
    // A user paired with an infobase user cannot be a bot's user.
    let error =
        refuse_bot(&server, &privileged, json!({"bot": {"userId": alice_id, "botType": "X"}}), "bot_user_paired").await;
    assert_eq!(error["field"], "bot.userId");
    let bot = create_bot(&server, &application, &helper_user, "Helper").await;
    // Two instances on one user: refused, not silently last-one-wins.
    refuse_bot(&server, &privileged, json!({"bot": {"userId": helper_user, "botType": "Helper"}}), "bot_user_taken")
        .await;
    refuse_bot(&server, &privileged, json!({"bot": {"userId": helper_user, "botType": "Other"}}), "bot_user_taken")
        .await;
    refuse_bot(
        &server,
        &privileged,
        json!({"bot": {"userId": helper_user, "botType": "Y", "predefined": true}}),
        "predefined_bot",
    )
    .await;
    refuse_bot(&server, &privileged, json!({"bot": {"userId": helper_user}}), "field_required").await;
    refuse_bot(&server, &alice, json!({"bot": {"userId": helper_user, "botType": "Z"}}), "privileged_mode_required")
        .await;
    let bot_id = bot["id"].as_str().unwrap();
    let updated = server
        .ok(
            "PATCH",
            &format!("/api/v1/bots/{bot_id}"),
            &privileged,
            Some(json!({"updateMask": ["additionalParameters"], "bot": {"additionalParameters": {"answer": "no"}}})),
        )
        .await;
    assert_eq!(updated["additionalParameters"]["answer"], "no");
    // Predefined bots are created by the processing call and stay.
    let processing = Processing::connect(&server, &application, json!([{"botType": "Fixed"}])).await;
    let fixed = processing.bots.iter().find(|bot| bot["botType"] == "Fixed").unwrap().clone();
    server
        .fails(
            "DELETE",
            &format!("/api/v1/bots/{}", fixed["id"].as_str().unwrap()),
            &privileged,
            None,
            "predefined_bot",
        )
        .await;
    // Another application cannot see or delete them.
    let other = server.register("other@example.com", "Other").await;
    server.fails("GET", &format!("/api/v1/bots/{bot_id}"), &other.privileged(), None, "bot_not_found").await;
    server.fails("DELETE", &format!("/api/v1/bots/{bot_id}"), &other.privileged(), None, "bot_not_found").await;
    let foreign = server.ok("GET", "/api/v1/bots", &other.privileged(), None).await;
    assert!(foreign["bots"].as_array().is_none_or(|bots| bots.is_empty()), "{foreign}");
    server.ok("DELETE", &format!("/api/v1/bots/{bot_id}"), &privileged, None).await;
    server.fails("GET", &format!("/api/v1/bots/{bot_id}"), &privileged, None, "bot_not_found").await;
}

#[tokio::test]
async fn another_applications_processing_connection_receives_nothing_of_ours() {
    let server = server_with(120).await;
    let ours = server.register("owner@example.com", "Shop").await;
    let theirs = server.register("other@example.com", "Other").await;
    let (alice_id, alice) = user(&server, &ours, "a1", "Alice").await;
    let mut our_processing = Processing::connect(&server, &ours, json!([{"botType": "Echo"}])).await;
    let mut their_processing = Processing::connect(&server, &theirs, json!([{"botType": "Echo"}])).await;
    let conversation = one_on_one(&server, &ours, &alice_id, &our_processing.bot_user("Echo")).await;
    send(&server, &alice, &conversation, json!({"text": "private"})).await;
    let event = our_processing.next_message_event().await;
    assert_eq!(event["message"]["text"], "private");
    our_processing.ack(&event).await;
    their_processing.expect_no_event(Duration::from_millis(500)).await;
    // Their credentials cannot acknowledge our deliveries either.
    their_processing.send(json!({"ack": {"deliveryId": event["deliveryId"]}})).await;
    let answer = their_processing.next_frame().await.unwrap();
    assert_eq!(answer["error"]["code"], "delivery_not_found", "{answer}");
}
