//! Registration, re-registration and disconnecting (§29.4.2), the
//! subscriber's administration key and temporary codes, and user tokens:
//! everything an application does before and around messaging.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use common::*;
use serde_json::{Value, json};

/// The mail one address receives, read from the outbox. Each mail is handed
/// out once, so a test sees exactly what a step sent (file times are too
/// coarse to order mails written within one clock tick).
struct Mailbox {
    address: String,
    seen: HashSet<PathBuf>,
}

struct Mail {
    subject: String,
    body: String,
}

impl Mailbox {
    /// Starts watching `address`; mail already delivered counts as read.
    fn open(server: &TestServer, address: &str) -> Mailbox {
        let mut mailbox = Mailbox { address: address.to_lowercase(), seen: HashSet::new() };
        mailbox.take(server);
        mailbox
    }

    /// Mail that arrived since the last look.
    fn take(&mut self, server: &TestServer) -> Vec<Mail> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&server.outbox).expect("outbox").flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|extension| extension != "eml") || self.seen.contains(&path) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            let header_end =
                text.find("\r\n\r\n").or_else(|| text.find("\n\n")).expect("a mail has headers and a body");
            let (headers, body) = text.split_at(header_end);
            let addressed = headers.lines().any(|line| {
                line.to_ascii_lowercase().starts_with("to:") && line.to_lowercase().contains(&self.address)
            });
            if !addressed {
                continue;
            }
            let subject =
                headers.lines().find_map(|line| line.strip_prefix("Subject:")).unwrap_or_default().trim().to_owned();
            // Undo quoted-printable soft line breaks, should the mailer use them.
            let body = body.replace("=\r\n", "").replace("=\n", "");
            self.seen.insert(path);
            found.push(Mail { subject, body });
        }
        found
    }

    /// Exactly one new mail, whose subject mentions `about`.
    fn one(&mut self, server: &TestServer, about: &str) -> String {
        let mut mails = self.take(server);
        assert_eq!(mails.len(), 1, "expected one new mail to {} about {about}", self.address);
        let mail = mails.remove(0);
        assert!(mail.subject.contains(about), "mail to {} is about `{}`, not {about}", self.address, mail.subject);
        mail.body
    }

    fn none(&mut self, server: &TestServer) {
        let mails = self.take(server);
        assert!(
            mails.is_empty(),
            "unexpected mail to {}: {:?}",
            self.address,
            mails.iter().map(|mail| &mail.subject).collect::<Vec<_>>()
        );
    }
}

const ACTIVATION: &str = "activation code";
const ADMINISTRATION_KEY: &str = "administration key";
const TEMPORARY_CODE: &str = "temporary administration code";

/// Step 1: asks for an activation code; returns where it went and the code.
async fn request_code(server: &TestServer, mailbox: &mut Mailbox, request: &Value) -> String {
    let answer = server.ok("POST", "/api/v1/registration/request", &Auth::None, Some(request.clone())).await;
    assert_eq!(answer["email"], mailbox.address.as_str(), "the code goes to the subscriber: {answer}");
    code_in(&mailbox.one(server, ACTIVATION))
}

/// Both steps; returns the registration data.
async fn register_through(server: &TestServer, mailbox: &mut Mailbox, request: Value) -> Application {
    let code = request_code(server, mailbox, &request).await;
    let mut complete = request;
    complete["activationCode"] = json!(code);
    let data = server.ok("POST", "/api/v1/registration/complete", &Auth::None, Some(complete)).await;
    Application {
        id: data["applicationId"].as_str().unwrap().to_owned(),
        key: data["applicationKey"].as_str().unwrap().to_owned(),
        email: data["subscriberEmail"].as_str().unwrap().to_owned(),
    }
}

fn flag(value: &Value) -> bool {
    value.as_bool().unwrap_or(false)
}

fn is_hex_key(key: &str) -> bool {
    key.len() == 64 && key.chars().all(|c| c.is_ascii_hexdigit())
}

/// A user token with arbitrary claims, signed with `key`.
fn sign_claims(key: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

fn now_seconds() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn message_texts(server: &TestServer, auth: &Auth, conversation_id: &str) -> Vec<String> {
    let listed = server
        .ok(
            "POST",
            &format!("/api/v1/conversations/{conversation_id}/messages/search"),
            auth,
            Some(json!({"sortDirection": "SORT_DIRECTION_ASCENDING"})),
        )
        .await;
    listed["messages"].as_array().unwrap().iter().map(|message| message["text"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn registration_takes_two_steps_and_mails_the_administration_key() {
    let server = TestServer::start().await;
    let mut mailbox = Mailbox::open(&server, "owner@example.com");
    let request = json!({"email": "Owner@Example.com", "applicationName": "Sales", "applicationUserCount": 5});

    // Step 1 e-mails an eight-digit activation code to the (normalized) subscriber address.
    let code = request_code(&server, &mut mailbox, &request).await;
    assert_eq!(code.len(), 8);

    // A wrong code is refused and does not use up the right one.
    let wrong = format!("{:08}", (code.parse::<u32>().unwrap() + 1) % 100_000_000);
    let mut complete = request.clone();
    complete["activationCode"] = json!(wrong);
    let error = server
        .fails("POST", "/api/v1/registration/complete", &Auth::None, Some(complete.clone()), "activation_code_invalid")
        .await;
    assert_eq!(error["field"], "activationCode");
    mailbox.none(&server);

    // The right code registers: the server assigns the id and issues a 256-bit key.
    complete["activationCode"] = json!(code);
    let data = server.ok("POST", "/api/v1/registration/complete", &Auth::None, Some(complete.clone())).await;
    let application_id = data["applicationId"].as_str().unwrap().to_owned();
    let application_key = data["applicationKey"].as_str().unwrap().to_owned();
    assert!(!application_id.is_empty(), "{data}");
    assert!(is_hex_key(&application_key), "{data}");
    assert_eq!(data["subscriberEmail"], "owner@example.com");
    assert_eq!(data["applicationName"], "Sales");

    // Then the subscriber receives the administration key: a different 64-hex secret.
    let administration_key = key_in(&mailbox.one(&server, ADMINISTRATION_KEY));
    assert_ne!(administration_key, application_key);

    // A code works once.
    server.fails("POST", "/api/v1/registration/complete", &Auth::None, Some(complete), "activation_code_invalid").await;
    mailbox.none(&server);

    // The issued credentials work, and the application starts without users.
    let application =
        Application { id: application_id.clone(), key: application_key, email: "owner@example.com".into() };
    let info = server.ok("GET", "/api/v1/application", &application.privileged(), None).await;
    assert_eq!(info["applicationId"], application_id.as_str());
    assert_eq!(info["applicationName"], "Sales");
    assert_eq!(info["subscriberEmail"], "owner@example.com");
    assert!(flag(&info["registered"]), "{info}");
    assert!(!flag(&info["usageAvailable"]), "no user has authenticated yet: {info}");
    assert!(!flag(&info["currentUserIsSubscriberAdministrator"]), "{info}");

    // A second application of the same subscriber gets its own id but no second administration key.
    let second = register_through(
        &server,
        &mut mailbox,
        json!({"email": "owner@example.com", "applicationName": "Warehouse", "applicationUserCount": 1}),
    )
    .await;
    assert_ne!(second.id, application_id);
    mailbox.none(&server);
}

#[tokio::test]
async fn registration_needs_users_a_valid_email_and_a_name() {
    let server = TestServer::start().await;
    let mut mailbox = Mailbox::open(&server, "owner@example.com");

    // An application without users cannot register, at either step.
    let no_users = json!({"email": "owner@example.com", "applicationName": "Empty", "applicationUserCount": 0});
    let error = server
        .fails("POST", "/api/v1/registration/request", &Auth::None, Some(no_users.clone()), "application_has_no_users")
        .await;
    assert_eq!(error["field"], "applicationUserCount");
    let mut complete = no_users.clone();
    complete["activationCode"] = json!("12345678");
    server
        .fails("POST", "/api/v1/registration/complete", &Auth::None, Some(complete), "application_has_no_users")
        .await;
    let mut omitted = no_users;
    omitted.as_object_mut().unwrap().remove("applicationUserCount");
    server.fails("POST", "/api/v1/registration/request", &Auth::None, Some(omitted), "application_has_no_users").await;

    // Invalid addresses, header injection included, are refused before any mail is written.
    for email in [
        "not-an-email",
        "owner@",
        "@example.com",
        "two words@example.com",
        "owner@example.com\r\nBcc: thief@example.org",
        "owner@@example.com",
    ] {
        let request = json!({"email": email, "applicationName": "Sales", "applicationUserCount": 5});
        let error =
            server.fails("POST", "/api/v1/registration/request", &Auth::None, Some(request), "email_invalid").await;
        assert_eq!(error["field"], "email", "{email}");
    }
    let thief = Mailbox::open(&server, "thief@example.org");
    assert!(thief.seen.is_empty(), "nothing was sent to an injected address");

    // A new application needs an e-mail and a name.
    server
        .fails(
            "POST",
            "/api/v1/registration/request",
            &Auth::None,
            Some(json!({"applicationName": "Sales", "applicationUserCount": 5})),
            "field_required",
        )
        .await;
    server
        .fails(
            "POST",
            "/api/v1/registration/request",
            &Auth::None,
            Some(json!({"email": "owner@example.com", "applicationName": "   ", "applicationUserCount": 5})),
            "field_required",
        )
        .await;

    // Re-registering an id the server never issued is refused.
    server
        .fails(
            "POST",
            "/api/v1/registration/request",
            &Auth::None,
            Some(json!({"applicationId": "00000000-0000-0000-0000-000000000000", "applicationName": "Sales", "applicationUserCount": 5})),
            "application_not_found",
        )
        .await;
    mailbox.none(&server);
}

#[tokio::test]
async fn unregistering_stops_the_key_and_tokens_and_re_registering_restores_the_history() {
    let server = TestServer::start().await;
    let mut mailbox = Mailbox::open(&server, "owner@example.com");
    let application = register_through(
        &server,
        &mut mailbox,
        json!({"email": "owner@example.com", "applicationName": "Sales", "applicationUserCount": 5}),
    )
    .await;
    mailbox.one(&server, ADMINISTRATION_KEY);
    let (alice_id, alice) = user(&server, &application, "alice-1", "Alice").await;
    let conversation_id = group(&server, &application, "Team", &[&alice_id]).await;
    let messages = format!("/api/v1/conversations/{conversation_id}/messages");
    server.ok("POST", &messages, &alice, Some(json!({"text": "before unregistering"}))).await;

    // Only the application itself may unregister.
    server.fails("DELETE", "/api/v1/registration", &alice, None, "privileged_mode_required").await;
    server.fails("DELETE", "/api/v1/registration", &Auth::None, None, "unauthenticated").await;
    server.ok("DELETE", "/api/v1/registration", &application.privileged(), None).await;

    // Now neither the key nor tokens signed with it work, over HTTP or WebSocket.
    server.fails("GET", "/api/v1/application", &application.privileged(), None, "application_not_registered").await;
    server
        .fails(
            "POST",
            &format!("{messages}/search"),
            &application.privileged(),
            Some(json!({})),
            "application_not_registered",
        )
        .await;
    server.fails("GET", "/api/v1/application", &alice, None, "application_not_registered").await;
    server.fails("POST", &messages, &alice, Some(json!({"text": "after"})), "application_not_registered").await;
    server.fails("DELETE", "/api/v1/registration", &application.privileged(), None, "application_not_registered").await;
    let refused = Client::try_connect(
        &server,
        json!({"hello": {"protocolVersion": 1, "token": application.token("alice-1", "Alice")}}),
    )
    .await
    .err()
    .expect("an unregistered application's users cannot connect");
    assert_eq!(refused["error"]["code"], "application_not_registered", "{refused}");

    // Re-registering with the id and no e-mail: the code goes to the original address.
    let again = register_through(
        &server,
        &mut mailbox,
        json!({"applicationId": application.id, "applicationName": "Sales", "applicationUserCount": 5}),
    )
    .await;
    assert_eq!(again.id, application.id, "the application keeps its id");
    assert_ne!(again.key, application.key, "and gets a new key");
    assert!(is_hex_key(&again.key));
    assert_eq!(again.email, "owner@example.com");
    mailbox.none(&server);

    // The whole history is there under the new key; the old key and its tokens stay dead.
    let conversation =
        server.ok("GET", &format!("/api/v1/conversations/{conversation_id}"), &again.privileged(), None).await;
    assert_eq!(conversation["title"], "Team");
    assert_eq!(message_texts(&server, &again.privileged(), &conversation_id).await, ["before unregistering"]);
    let new_alice = again.user("alice-1", "Alice");
    assert_eq!(message_texts(&server, &new_alice, &conversation_id).await, ["before unregistering"]);
    let found = server
        .ok("POST", "/api/v1/users/search", &again.privileged(), Some(json!({"infobaseUserId": "alice-1"})))
        .await;
    assert_eq!(found["users"].as_array().unwrap().len(), 1, "Alice is the same user, not a second one: {found}");
    assert_eq!(found["users"][0]["id"], alice_id.as_str());
    server.ok("POST", &messages, &new_alice, Some(json!({"text": "after re-registering"}))).await;
    assert_eq!(
        message_texts(&server, &new_alice, &conversation_id).await,
        ["before unregistering", "after re-registering"]
    );
    server.fails("GET", "/api/v1/application", &application.privileged(), None, "unauthenticated").await;
    server.fails("GET", "/api/v1/application", &alice, None, "token_invalid").await;

    // Re-registering with the original address spelled differently is the same application.
    let third = register_through(
        &server,
        &mut mailbox,
        json!({"applicationId": application.id, "email": "OWNER@example.com", "applicationName": "Sales", "applicationUserCount": 5}),
    )
    .await;
    assert_eq!(third.id, application.id);
    assert_eq!(message_texts(&server, &third.privileged(), &conversation_id).await.len(), 2);
    server.fails("GET", "/api/v1/application", &again.privileged(), None, "unauthenticated").await;
}

#[tokio::test]
async fn re_registering_with_another_email_makes_a_new_application_without_the_old_data() {
    let server = TestServer::start().await;
    let mut owner = Mailbox::open(&server, "owner@example.com");
    let mut other = Mailbox::open(&server, "other@example.com");
    let application = register_through(
        &server,
        &mut owner,
        json!({"email": "owner@example.com", "applicationName": "Sales", "applicationUserCount": 5}),
    )
    .await;
    let (alice_id, alice) = user(&server, &application, "alice-1", "Alice").await;
    let conversation_id = group(&server, &application, "Team", &[&alice_id]).await;
    let message = server
        .ok(
            "POST",
            &format!("/api/v1/conversations/{conversation_id}/messages"),
            &alice,
            Some(json!({"text": "old data"})),
        )
        .await;
    let message_id = message["id"].as_str().unwrap();
    server.ok("DELETE", "/api/v1/registration", &application.privileged(), None).await;
    owner.take(&server);

    // The id with another address: the code goes to the new address, and a new application is born.
    let moved = register_through(
        &server,
        &mut other,
        json!({"applicationId": application.id, "email": "other@example.com", "applicationName": "Sales", "applicationUserCount": 5}),
    )
    .await;
    owner.none(&server);
    assert_ne!(moved.id, application.id, "another e-mail means another application");
    assert_eq!(moved.email, "other@example.com");
    other.one(&server, ADMINISTRATION_KEY);

    // It sees nothing of the old application's data.
    let app = moved.privileged();
    server
        .fails("GET", &format!("/api/v1/conversations/{conversation_id}"), &app, None, "conversation_not_found")
        .await;
    server
        .fails(
            "POST",
            &format!("/api/v1/conversations/{conversation_id}/messages/search"),
            &app,
            Some(json!({})),
            "conversation_not_found",
        )
        .await;
    server.fails("GET", &format!("/api/v1/messages/{message_id}"), &app, None, "message_not_found").await;
    server.fails("GET", &format!("/api/v1/users/{alice_id}"), &app, None, "user_not_found").await;
    let users = server.ok("POST", "/api/v1/users/search", &app, Some(json!({"includeBlocked": true}))).await;
    assert_eq!(users["users"].as_array().map(Vec::len).unwrap_or(0), 0, "{users}");
    let conversations = server.ok("POST", "/api/v1/conversations/search", &app, Some(json!({}))).await;
    assert_eq!(conversations["conversations"].as_array().map(Vec::len).unwrap_or(0), 0, "{conversations}");
    // Its Alice is a new user, with none of the old conversations.
    let new_alice = moved.user("alice-1", "Alice");
    let list = server.ok("GET", "/api/v1/conversation-list", &new_alice, None).await;
    assert_eq!(list["conversations"].as_array().map(Vec::len).unwrap_or(0), 0, "{list}");

    // The old application is still only unregistered: re-registering it with its own address restores it.
    let restored = register_through(
        &server,
        &mut owner,
        json!({"applicationId": application.id, "applicationName": "Sales", "applicationUserCount": 5}),
    )
    .await;
    assert_eq!(restored.id, application.id);
    assert_eq!(message_texts(&server, &restored.privileged(), &conversation_id).await, ["old data"]);
}

#[tokio::test]
async fn setting_no_registration_data_disconnects_the_application_irrevocably() {
    let server = TestServer::start().await;
    let mut mailbox = Mailbox::open(&server, "owner@example.com");
    let application = register_through(
        &server,
        &mut mailbox,
        json!({"email": "owner@example.com", "applicationName": "Sales", "applicationUserCount": 5}),
    )
    .await;
    mailbox.one(&server, ADMINISTRATION_KEY);
    let (alice_id, alice) = user(&server, &application, "alice-1", "Alice").await;
    let conversation_id = group(&server, &application, "Team", &[&alice_id]).await;

    // Neither a user nor an anonymous caller can disconnect the application.
    server.fails("PUT", "/api/v1/registration/data", &alice, Some(json!({})), "privileged_mode_required").await;
    server.fails("PUT", "/api/v1/registration/data", &Auth::None, Some(json!({})), "unauthenticated").await;
    server.ok("GET", "/api/v1/application", &application.privileged(), None).await;

    // The application itself can.
    let answer = server.ok("PUT", "/api/v1/registration/data", &application.privileged(), Some(json!({}))).await;
    assert!(!flag(&answer["registered"]), "{answer}");
    server.fails("GET", "/api/v1/application", &application.privileged(), None, "application_disconnected").await;
    server
        .fails("GET", &format!("/api/v1/conversations/{conversation_id}"), &alice, None, "application_disconnected")
        .await;
    let refused = Client::try_connect(
        &server,
        json!({"hello": {"protocolVersion": 1, "token": application.token("alice-1", "Alice")}}),
    )
    .await
    .err()
    .expect("a disconnected application's users cannot connect");
    assert_eq!(refused["error"]["code"], "application_disconnected", "{refused}");

    // Irrevocably: re-registering the id fails at both steps, with or without the e-mail, and mails nothing.
    for request in [
        json!({"applicationId": application.id, "applicationName": "Sales", "applicationUserCount": 5}),
        json!({"applicationId": application.id, "email": "owner@example.com", "applicationName": "Sales", "applicationUserCount": 5}),
    ] {
        server
            .fails(
                "POST",
                "/api/v1/registration/request",
                &Auth::None,
                Some(request.clone()),
                "application_disconnected",
            )
            .await;
        let mut complete = request;
        complete["activationCode"] = json!("12345678");
        server
            .fails("POST", "/api/v1/registration/complete", &Auth::None, Some(complete), "application_disconnected")
            .await;
    }
    mailbox.none(&server);
    let check = server
        .ok(
            "PUT",
            "/api/v1/registration/data",
            &Auth::None,
            Some(json!({"data": {"applicationId": application.id, "applicationKey": application.key}})),
        )
        .await;
    assert!(!flag(&check["registered"]), "the old registration data is no longer valid: {check}");

    // The subscriber can still register a new application, which starts empty.
    let fresh = register_through(
        &server,
        &mut mailbox,
        json!({"email": "owner@example.com", "applicationName": "Sales", "applicationUserCount": 5}),
    )
    .await;
    assert_ne!(fresh.id, application.id);
    server
        .fails(
            "GET",
            &format!("/api/v1/conversations/{conversation_id}"),
            &fresh.privileged(),
            None,
            "conversation_not_found",
        )
        .await;
}

#[tokio::test]
async fn registration_data_and_application_info_tell_the_truth() {
    let server = TestServer::start().await;
    let mut mailbox = Mailbox::open(&server, "owner@example.com");
    let application = register_through(
        &server,
        &mut mailbox,
        json!({"email": "owner@example.com", "applicationName": "Sales", "applicationUserCount": 5}),
    )
    .await;
    let app = application.privileged();

    // Before any user has authenticated, the application is registered but not usable.
    let info = server.ok("GET", "/api/v1/application", &app, None).await;
    assert_eq!(info["applicationId"], application.id.as_str());
    assert!(flag(&info["registered"]) && !flag(&info["usageAvailable"]), "{info}");

    // GetRegistrationData returns what registration issued; users may not read the key.
    let data = server.ok("GET", "/api/v1/registration/data", &app, None).await;
    assert_eq!(data["applicationId"], application.id.as_str());
    assert_eq!(data["applicationKey"], application.key.as_str());
    assert_eq!(data["subscriberEmail"], "owner@example.com");
    assert_eq!(data["applicationName"], "Sales");
    let alice = application.user("alice-1", "Alice");
    server.fails("GET", "/api/v1/registration/data", &alice, None, "privileged_mode_required").await;
    server.fails("GET", "/api/v1/registration/data", &Auth::None, None, "unauthenticated").await;

    // SetRegistrationData checks moved data: the real data is registered, a wrong key or id is not.
    let checked = server.ok("PUT", "/api/v1/registration/data", &Auth::None, Some(json!({"data": data.clone()}))).await;
    assert!(flag(&checked["registered"]), "{checked}");
    let checked = server.ok("PUT", "/api/v1/registration/data", &app, Some(json!({"data": data.clone()}))).await;
    assert!(flag(&checked["registered"]), "{checked}");
    let mut wrong_key = data.clone();
    wrong_key["applicationKey"] = json!("0".repeat(64));
    let checked = server.ok("PUT", "/api/v1/registration/data", &Auth::None, Some(json!({"data": wrong_key}))).await;
    assert!(!flag(&checked["registered"]), "{checked}");
    let mut wrong_id = data.clone();
    wrong_id["applicationId"] = json!("00000000-0000-0000-0000-000000000000");
    let checked = server.ok("PUT", "/api/v1/registration/data", &Auth::None, Some(json!({"data": wrong_id}))).await;
    assert!(!flag(&checked["registered"]), "{checked}");
    // Checking data never disconnects anything.
    server.ok("GET", "/api/v1/application", &app, None).await;

    // Usage became available once the application had a user (Alice, at her first authentication).
    let info = server.ok("GET", "/api/v1/application", &alice, None).await;
    assert_eq!(info["applicationId"], application.id.as_str());
    assert!(flag(&info["registered"]) && flag(&info["usageAvailable"]), "{info}");
    assert!(!flag(&info["currentUserIsSubscriberAdministrator"]), "{info}");
    assert!(!info["serverVersion"].as_str().unwrap_or_default().is_empty(), "{info}");
    let info = server.ok("GET", "/api/v1/application", &app, None).await;
    assert!(flag(&info["usageAvailable"]), "{info}");
}

#[tokio::test]
async fn temporary_codes_work_once_and_the_administration_key_until_it_is_reissued() {
    let server = TestServer::start().await;
    let mut mailbox = Mailbox::open(&server, "owner@example.com");
    let application = register_through(
        &server,
        &mut mailbox,
        json!({"email": "owner@example.com", "applicationName": "Sales", "applicationUserCount": 5}),
    )
    .await;
    let administration_key = key_in(&mailbox.one(&server, ADMINISTRATION_KEY));
    let (alice_id, alice) = user(&server, &application, "alice-1", "Alice").await;
    let (bob_id, bob) = user(&server, &application, "bob-1", "Bob").await;
    let app = application.privileged();
    let administrators = "/api/v1/subscriber/administrators";
    let with_code = |code: &str, user_ids: &[&str]| json!({"credential": {"subscriberEmail": "owner@example.com", "temporaryCode": code}, "userIds": user_ids});
    let with_key = |key: &str, user_ids: &[&str]| json!({"credential": {"subscriberEmail": "owner@example.com", "administrationKey": key}, "userIds": user_ids});

    // Without a credential, neither the application nor a plain user may name administrators.
    server
        .fails("PUT", administrators, &app, Some(json!({"userIds": [alice_id]})), "subscriber_credential_invalid")
        .await;
    server
        .fails("PUT", administrators, &bob, Some(json!({"userIds": [bob_id]})), "subscriber_credential_invalid")
        .await;

    // A temporary code is e-mailed; an unknown subscriber gets the same answer and no mail.
    server
        .ok(
            "POST",
            "/api/v1/subscriber/temporary-code",
            &Auth::None,
            Some(json!({"subscriberEmail": "owner@example.com"})),
        )
        .await;
    let code = code_in(&mailbox.one(&server, TEMPORARY_CODE));
    let mut stranger = Mailbox::open(&server, "stranger@example.com");
    server
        .ok(
            "POST",
            "/api/v1/subscriber/temporary-code",
            &Auth::None,
            Some(json!({"subscriberEmail": "stranger@example.com"})),
        )
        .await;
    stranger.none(&server);
    server
        .fails(
            "POST",
            "/api/v1/subscriber/temporary-code",
            &Auth::None,
            Some(json!({"subscriberEmail": "not-an-email"})),
            "email_invalid",
        )
        .await;

    // The code works once.
    let set = server.ok("PUT", administrators, &app, Some(with_code(&code, &[&alice_id]))).await;
    assert_eq!(set["userIds"], json!([alice_id]), "{set}");
    server
        .fails("PUT", administrators, &app, Some(with_code(&code, &[&bob_id])), "subscriber_credential_invalid")
        .await;
    let listed = server.ok("GET", administrators, &app, None).await;
    assert_eq!(listed["userIds"], json!([alice_id]), "the second use changed nothing: {listed}");

    // Alice is now an administrator, and knows it; Bob is not.
    let info = server.ok("GET", "/api/v1/application", &alice, None).await;
    assert!(flag(&info["currentUserIsSubscriberAdministrator"]), "{info}");
    let info = server.ok("GET", "/api/v1/application", &bob, None).await;
    assert!(!flag(&info["currentUserIsSubscriberAdministrator"]), "{info}");

    // The administration key works again and again; a wrong key or address does not.
    let mut both = vec![alice_id.clone(), bob_id.clone()];
    both.sort();
    let set = server.ok("PUT", administrators, &app, Some(with_key(&administration_key, &[&alice_id, &bob_id]))).await;
    let mut set_ids: Vec<String> = serde_json::from_value(set["userIds"].clone()).unwrap();
    set_ids.sort();
    assert_eq!(set_ids, both);
    let set = server.ok("PUT", administrators, &app, Some(with_key(&administration_key, &[&alice_id]))).await;
    assert_eq!(set["userIds"], json!([alice_id]));
    server
        .fails(
            "PUT",
            administrators,
            &app,
            Some(with_key(&"0".repeat(64), &[&bob_id])),
            "subscriber_credential_invalid",
        )
        .await;
    let wrong_address = json!({"credential": {"subscriberEmail": "other@example.com", "administrationKey": administration_key}, "userIds": [bob_id]});
    server.fails("PUT", administrators, &app, Some(wrong_address), "subscriber_credential_invalid").await;
    // An administrator needs no credential.
    server.ok("PUT", administrators, &alice, Some(json!({"userIds": [alice_id]}))).await;
    // Administrators are users of this application only.
    server
        .fails(
            "PUT",
            administrators,
            &app,
            Some(with_key(&administration_key, &["00000000-0000-0000-0000-000000000000"])),
            "user_not_found",
        )
        .await;

    // Reissuing the key e-mails a new one; the old one stops working everywhere.
    let reissue = |key: &str| json!({"credential": {"subscriberEmail": "owner@example.com", "administrationKey": key}});
    server
        .fails(
            "POST",
            "/api/v1/subscriber/administration-key",
            &Auth::None,
            Some(reissue(&"0".repeat(64))),
            "subscriber_credential_invalid",
        )
        .await;
    mailbox.none(&server);
    server.ok("POST", "/api/v1/subscriber/administration-key", &Auth::None, Some(reissue(&administration_key))).await;
    let new_key = key_in(&mailbox.one(&server, ADMINISTRATION_KEY));
    assert_ne!(new_key, administration_key);
    server
        .fails(
            "PUT",
            administrators,
            &app,
            Some(with_key(&administration_key, &[&bob_id])),
            "subscriber_credential_invalid",
        )
        .await;
    server
        .fails(
            "POST",
            "/api/v1/subscriber/administration-key",
            &Auth::None,
            Some(reissue(&administration_key)),
            "subscriber_credential_invalid",
        )
        .await;
    let set = server.ok("PUT", administrators, &app, Some(with_key(&new_key, &[&bob_id]))).await;
    assert_eq!(set["userIds"], json!([bob_id]));
    let info = server.ok("GET", "/api/v1/application", &bob, None).await;
    assert!(flag(&info["currentUserIsSubscriberAdministrator"]), "{info}");
    let info = server.ok("GET", "/api/v1/application", &alice, None).await;
    assert!(!flag(&info["currentUserIsSubscriberAdministrator"]), "{info}");

    // A temporary code issued now leaves the (new) key unchanged.
    server
        .ok(
            "POST",
            "/api/v1/subscriber/temporary-code",
            &Auth::None,
            Some(json!({"subscriberEmail": "owner@example.com"})),
        )
        .await;
    let second_code = code_in(&mailbox.one(&server, TEMPORARY_CODE));
    server.ok("PUT", administrators, &app, Some(with_code(&second_code, &[&alice_id, &bob_id]))).await;
    server.ok("PUT", administrators, &app, Some(with_key(&new_key, &[&alice_id]))).await;
}

#[tokio::test]
async fn user_tokens_are_verified_and_users_are_created_and_refreshed_at_authentication() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let other = server.register("other@example.com", "Warehouse").await;
    let app = application.privileged();

    // Before the first authentication the user does not exist.
    let found = server.ok("POST", "/api/v1/users/search", &app, Some(json!({"infobaseUserId": "alice-1"}))).await;
    assert_eq!(found["users"].as_array().map(Vec::len).unwrap_or(0), 0, "{found}");

    // The first authentication creates a regular user with the token's names.
    let token = sign_token(&application.id, &application.key, "alice-1", "Alice", 600);
    server.ok("GET", "/api/v1/application", &Auth::Bearer(token), None).await;
    let found = server.ok("POST", "/api/v1/users/search", &app, Some(json!({"infobaseUserId": "alice-1"}))).await;
    let users = found["users"].as_array().unwrap();
    assert_eq!(users.len(), 1, "{found}");
    let alice_id = users[0]["id"].as_str().unwrap().to_owned();
    let card = server.ok("GET", &format!("/api/v1/users/{alice_id}"), &app, None).await;
    assert_eq!(card["name"], "Alice");
    assert_eq!(card["fullName"], "Alice Full");
    assert_eq!(card["infobaseUserId"], "alice-1");

    // The next authentication refreshes the names of the same user.
    let renamed = sign_token(&application.id, &application.key, "alice-1", "Alicia", 600);
    server.ok("GET", "/api/v1/application", &Auth::Bearer(renamed.clone()), None).await;
    let card = server.ok("GET", &format!("/api/v1/users/{alice_id}"), &app, None).await;
    assert_eq!(card["name"], "Alicia", "{card}");
    assert_eq!(card["fullName"], "Alicia Full", "{card}");
    let found = server.ok("POST", "/api/v1/users/search", &app, Some(json!({"infobaseUserId": "alice-1"}))).await;
    assert_eq!(found["users"].as_array().unwrap().len(), 1, "no second user: {found}");
    // Over WebSocket too.
    let client =
        Client::connect(&server, &sign_token(&application.id, &application.key, "alice-1", "Alice W", 600)).await;
    assert_eq!(client.user_id(), alice_id);
    assert_eq!(client.welcome["user"]["name"], "Alice W");
    client.close().await;
    let card = server.ok("GET", &format!("/api/v1/users/{alice_id}"), &app, None).await;
    assert_eq!(card["name"], "Alice W");

    // An expired token.
    let expired = sign_token(&application.id, &application.key, "alice-1", "Alice", -120);
    server.fails("GET", "/api/v1/application", &Auth::Bearer(expired.clone()), None, "token_expired").await;
    let refused = Client::try_connect(&server, json!({"hello": {"protocolVersion": 1, "token": expired}}))
        .await
        .err()
        .expect("refused");
    assert_eq!(refused["error"]["code"], "token_expired", "{refused}");

    // A token naming this application but signed with another application's key.
    let forged = sign_token(&application.id, &other.key, "alice-1", "Alice", 600);
    server.fails("GET", "/api/v1/application", &Auth::Bearer(forged.clone()), None, "token_invalid").await;
    let refused = Client::try_connect(&server, json!({"hello": {"protocolVersion": 1, "token": forged}}))
        .await
        .err()
        .expect("refused");
    assert_eq!(refused["error"]["code"], "token_invalid", "{refused}");

    // Tokens live at most 24 hours.
    let day = 24 * 3600;
    server
        .ok(
            "GET",
            "/api/v1/application",
            &Auth::Bearer(sign_token(&application.id, &application.key, "alice-1", "Alice", day)),
            None,
        )
        .await;
    let long_lived = sign_token(&application.id, &application.key, "alice-1", "Alice", day + 60);
    server.fails("GET", "/api/v1/application", &Auth::Bearer(long_lived), None, "token_invalid").await;

    // Other malformed tokens.
    let now = now_seconds();
    let claims = |overrides: Value| {
        let mut claims = json!({"iss": application.id, "aud": "beseda", "sub": "alice-1", "name": "Alice", "iat": now, "exp": now + 600});
        for (name, value) in overrides.as_object().unwrap() {
            if value.is_null() {
                claims.as_object_mut().unwrap().remove(name);
            } else {
                claims[name] = value.clone();
            }
        }
        sign_claims(&application.key, &claims)
    };
    for (what, token, code) in [
        ("another audience", claims(json!({"aud": "someone-else"})), "token_invalid"),
        ("no audience", claims(json!({"aud": null})), "token_invalid"),
        ("no subject", claims(json!({"sub": null})), "token_invalid"),
        ("an empty subject", claims(json!({"sub": "  "})), "token_invalid"),
        ("an empty name", claims(json!({"name": ""})), "token_invalid"),
        ("no expiry", claims(json!({"exp": null})), "token_invalid"),
        ("no issuer", claims(json!({"iss": null})), "token_invalid"),
        ("issued an hour in the future", claims(json!({"iat": now + 3600, "exp": now + 3900})), "token_invalid"),
        ("no issue time", claims(json!({"iat": null})), "token_invalid"),
        ("garbage", "garbage".to_owned(), "token_invalid"),
        ("three garbage parts", "a.b.c".to_owned(), "token_invalid"),
        ("a name over 256 characters", claims(json!({"name": "x".repeat(257)})), "token_invalid"),
        ("a full name over 256 characters", claims(json!({"fullName": "x".repeat(257)})), "token_invalid"),
        ("a name with control characters", claims(json!({"name": "Al\u{0}ice"})), "token_invalid"),
        ("not valid for another five minutes", claims(json!({"nbf": now + 300})), "token_invalid"),
        ("a name that is a number", claims(json!({"name": 42})), "token_invalid"),
    ] {
        let error = server.fails("GET", "/api/v1/application", &Auth::Bearer(token), None, code).await;
        assert!(!error["message"].as_str().unwrap().is_empty(), "{what}: {error}");
    }
    // An unsigned token ("alg": "none") is never accepted.
    use base64::Engine;
    let encode = |value: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string());
    let unsigned = format!(
        "{}.{}.",
        encode(json!({"alg": "none", "typ": "JWT"})),
        encode(
            json!({"iss": application.id, "aud": "beseda", "sub": "alice-1", "name": "Alice", "iat": now, "exp": now + 600})
        )
    );
    let refused = server.fails("GET", "/api/v1/application", &Auth::Bearer(unsigned), None, "token_invalid").await;
    // The message says what is accepted, not what the JWT library knows of.
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("only HS256 is accepted"), "{refused}");
    assert!(!message.contains("variant") && !message.contains("RS256"), "{refused}");
    // A claim over a limit is the token's fault: 401, naming the claim and the limit.
    let (status, long_name) =
        server.call("GET", "/api/v1/application", &Auth::Bearer(claims(json!({"name": "x".repeat(257)}))), None).await;
    assert_eq!(status, 401, "{long_name}");
    assert_eq!(long_name["error"]["field"], "name", "{long_name}");
    let message = long_name["error"]["message"].as_str().unwrap();
    assert!(message.contains("`name`") && message.contains("256"), "{long_name}");
    // `nbf` in the future is refused with a clear message; within the
    // 30-second leeway (clock skew) it is accepted.
    let early = server
        .fails("GET", "/api/v1/application", &Auth::Bearer(claims(json!({"nbf": now + 300}))), None, "token_invalid")
        .await;
    assert_eq!(early["field"], "nbf", "{early}");
    assert!(early["message"].as_str().unwrap().contains("not valid yet"), "{early}");
    let malformed = server
        .fails("GET", "/api/v1/application", &Auth::Bearer(claims(json!({"name": 42}))), None, "token_invalid")
        .await;
    assert!(!malformed["message"].as_str().unwrap().contains("invalid type"), "no serde text: {malformed}");
    server.ok("GET", "/api/v1/application", &Auth::Bearer(claims(json!({"nbf": now + 10}))), None).await;
    // The same over the WebSocket: the Hello is refused with the same error.
    let refused = Client::try_connect(
        &server,
        json!({"hello": {"protocolVersion": 1, "token": claims(json!({"nbf": now + 300}))}}),
    )
    .await
    .err()
    .expect("a token not valid yet is refused");
    assert_eq!(refused["error"]["code"], "token_invalid", "{refused}");
    // A token naming an application the server does not know.
    let unknown = sign_token("00000000-0000-0000-0000-000000000000", &application.key, "alice-1", "Alice", 600);
    server.fails("GET", "/api/v1/application", &Auth::Bearer(unknown), None, "application_not_registered").await;

    // None of the refused tokens created a user (the early-but-in-leeway one
    // was accepted and is the same infobase user).
    let everyone = server.ok("POST", "/api/v1/users/search", &app, Some(json!({"includeBlocked": true}))).await;
    assert_eq!(everyone["users"].as_array().unwrap().len(), 1, "{everyone}");
    let everyone =
        server.ok("POST", "/api/v1/users/search", &other.privileged(), Some(json!({"includeBlocked": true}))).await;
    assert_eq!(everyone["users"].as_array().map(Vec::len).unwrap_or(0), 0, "{everyone}");
}

#[tokio::test]
async fn guessing_codes_is_cut_off_after_ten_wrong_ones() {
    let server = TestServer::start().await;
    let mut owner = Mailbox::open(&server, "owner@example.com");
    let wrong_codes = |code: &str| -> Vec<String> {
        let code: u32 = code.parse().unwrap();
        (1..=10).map(|offset| format!("{:08}", (code + offset) % 100_000_000)).collect()
    };

    // Activation codes: ten wrong guesses for one address, then even the right code is refused.
    let request = json!({"email": "owner@example.com", "applicationName": "Sales", "applicationUserCount": 5});
    let code = request_code(&server, &mut owner, &request).await;
    let mut complete = request.clone();
    for wrong in wrong_codes(&code) {
        complete["activationCode"] = json!(wrong);
        server
            .fails(
                "POST",
                "/api/v1/registration/complete",
                &Auth::None,
                Some(complete.clone()),
                "activation_code_invalid",
            )
            .await;
    }
    complete["activationCode"] = json!(code);
    let (status, body) = server.call("POST", "/api/v1/registration/complete", &Auth::None, Some(complete)).await;
    assert_eq!(body["error"]["code"], "too_many_attempts", "{body}");
    assert_eq!(status, 429);
    owner.none(&server);
    // Other addresses are not affected.
    let other = server.register("other@example.com", "Warehouse").await;

    // Temporary administration codes: the same.
    let mut other_mail = Mailbox::open(&server, "other@example.com");
    server
        .ok(
            "POST",
            "/api/v1/subscriber/temporary-code",
            &Auth::None,
            Some(json!({"subscriberEmail": "other@example.com"})),
        )
        .await;
    let code = code_in(&other_mail.one(&server, TEMPORARY_CODE));
    let (alice_id, _) = user(&server, &other, "alice-1", "Alice").await;
    let with_code = |code: &str| json!({"credential": {"subscriberEmail": "other@example.com", "temporaryCode": code}, "userIds": [alice_id]});
    let administrators = "/api/v1/subscriber/administrators";
    for wrong in wrong_codes(&code) {
        server
            .fails("PUT", administrators, &other.privileged(), Some(with_code(&wrong)), "subscriber_credential_invalid")
            .await;
    }
    let (status, body) = server.call("PUT", administrators, &other.privileged(), Some(with_code(&code))).await;
    assert_eq!(body["error"]["code"], "too_many_attempts", "{body}");
    assert_eq!(status, 429);
    let listed = server.ok("GET", administrators, &other.privileged(), None).await;
    assert_eq!(listed["userIds"].as_array().map(Vec::len).unwrap_or(0), 0, "nobody became an administrator: {listed}");
}

#[tokio::test]
async fn the_public_registration_call_cannot_be_used_to_flood_an_address_with_mail() {
    let server = TestServer::start().await;
    let request = json!({"email": "victim@example.com", "applicationName": "Spam", "applicationUserCount": 1});
    for _ in 0..5 {
        server.ok("POST", "/api/v1/registration/request", &Auth::None, Some(request.clone())).await;
    }
    let mails_before = std::fs::read_dir(&server.outbox).unwrap().count();
    let error =
        server.fails("POST", "/api/v1/registration/request", &Auth::None, Some(request), "too_many_attempts").await;
    assert!(error["message"].as_str().unwrap().contains("victim@example.com"), "{error}");
    assert_eq!(std::fs::read_dir(&server.outbox).unwrap().count(), mails_before, "no sixth mail was sent");
    // Another address is not affected.
    server
        .ok(
            "POST",
            "/api/v1/registration/request",
            &Auth::None,
            Some(json!({"email": "other@example.com", "applicationName": "Fine", "applicationUserCount": 1})),
        )
        .await;
}

#[tokio::test]
async fn the_temporary_code_limit_answers_alike_for_subscribers_and_unknown_addresses() {
    let server = TestServer::start().await;
    // A subscriber who registered within the hour (an activation mail went
    // to the address) and an address that is no subscriber.
    server.register("known@example.com", "Sales").await;
    let mut known_mail = Mailbox::open(&server, "known@example.com");
    let path = "/api/v1/subscriber/temporary-code";
    let call = |email: &'static str| {
        let server = &server;
        async move { server.call("POST", path, &Auth::None, Some(json!({"subscriberEmail": email}))).await }
    };
    for attempt in 1..=6 {
        let (known_status, known_body) = call("known@example.com").await;
        let (unknown_status, unknown_body) = call("nobody@example.com").await;
        assert_eq!(known_status, unknown_status, "call {attempt}: {known_body} / {unknown_body}");
        let anonymised = known_body.to_string().replace("known@example.com", "nobody@example.com");
        assert_eq!(anonymised, unknown_body.to_string(), "call {attempt}");
        let expected = if attempt <= 5 { 200 } else { 429 };
        assert_eq!(known_status, expected, "call {attempt}: {known_body}");
    }
    let (_, refused) = call("nobody@example.com").await;
    assert_eq!(refused["error"]["code"], "too_many_attempts", "{refused}");
    // Five codes reached the subscriber, and the refused calls sent nothing.
    let mails = known_mail.take(&server);
    assert_eq!(mails.len(), 5);
    assert!(mails.iter().all(|mail| mail.subject.contains(TEMPORARY_CODE)));
}

#[tokio::test]
async fn single_subscriber_administrators_are_added_and_removed_beside_the_others() {
    let server = TestServer::start().await;
    let application = server.register("owner@example.com", "Sales").await;
    let administration_key = key_in(&server.latest_mail("owner@example.com"));
    let (alice_id, alice) = user(&server, &application, "alice-1", "Alice").await;
    let (bob_id, bob) = user(&server, &application, "bob-1", "Bob").await;
    let (carol_id, _) = user(&server, &application, "carol-1", "Carol").await;
    let app = application.privileged();
    let (add, remove) = ("/api/v1/subscriber/administrators/add", "/api/v1/subscriber/administrators/remove");
    let with_key = |user_id: &str| json!({"credential": {"subscriberEmail": "owner@example.com", "administrationKey": administration_key}, "userId": user_id});
    let sorted = |value: &Value| {
        let mut ids: Vec<String> = serde_json::from_value(value["userIds"].clone()).unwrap_or_default();
        ids.sort();
        ids
    };
    let expected = |ids: &[&String]| {
        let mut ids: Vec<String> = ids.iter().map(|id| (*id).clone()).collect();
        ids.sort();
        ids
    };

    // The same rights as setting the list: no credential, no change.
    server.fails("POST", add, &app, Some(json!({"userId": alice_id})), "subscriber_credential_invalid").await;
    server.fails("POST", add, &bob, Some(json!({"userId": bob_id})), "subscriber_credential_invalid").await;

    // ДобавитьВАдминистраторыАбонента with the key: one user joins, the others stay.
    let added = server.ok("POST", add, &app, Some(with_key(&alice_id))).await;
    assert_eq!(sorted(&added), expected(&[&alice_id]), "{added}");
    let added = server.ok("POST", add, &app, Some(with_key(&bob_id))).await;
    assert_eq!(sorted(&added), expected(&[&alice_id, &bob_id]), "{added}");
    // Adding an administrator again changes nothing.
    let again = server.ok("POST", add, &app, Some(with_key(&bob_id))).await;
    assert_eq!(sorted(&again), expected(&[&alice_id, &bob_id]), "{again}");
    // An administrator needs no credential.
    let added = server.ok("POST", add, &alice, Some(json!({"userId": carol_id}))).await;
    assert_eq!(sorted(&added), expected(&[&alice_id, &bob_id, &carol_id]), "{added}");

    // ИсключитьИзАдминистраторовАбонента: one user leaves, the others stay.
    let removed = server.ok("POST", remove, &alice, Some(json!({"userId": bob_id}))).await;
    assert_eq!(sorted(&removed), expected(&[&alice_id, &carol_id]), "{removed}");
    let listed = server.ok("GET", "/api/v1/subscriber/administrators", &app, None).await;
    assert_eq!(sorted(&listed), expected(&[&alice_id, &carol_id]), "{listed}");
    // Bob is no longer an administrator, so he cannot remove anyone.
    server.fails("POST", remove, &bob, Some(json!({"userId": alice_id})), "subscriber_credential_invalid").await;

    // Bad input is a typed error naming the field.
    let error =
        server.fails("POST", add, &app, Some(with_key("00000000-0000-0000-0000-000000000000")), "user_not_found").await;
    assert_eq!(error["field"], "userId", "{error}");
    let error = server.fails("POST", remove, &alice, Some(json!({})), "invalid_value").await;
    assert_eq!(error["field"], "userId", "{error}");
    let listed = server.ok("GET", "/api/v1/subscriber/administrators", &app, None).await;
    assert_eq!(sorted(&listed), expected(&[&alice_id, &carol_id]), "failed calls changed nothing: {listed}");
}

/// `beseda ctl outbox` as the README's first steps run it.
fn ctl_outbox(server: &TestServer, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_beseda"))
        .args(["ctl", "outbox", "--email", "owner@example.com", "--outbox-dir"])
        .arg(&server.outbox)
        .args(args)
        .output()
        .expect("run beseda ctl");
    (output.status.success(), String::from_utf8(output.stdout).expect("UTF-8 output"))
}

#[tokio::test]
async fn ctl_outbox_prints_the_decoded_mail_and_with_code_only_the_code() {
    let server = TestServer::start().await;
    let (found, _) = ctl_outbox(&server, &[]);
    assert!(!found, "no mail yet is a failure for scripts");
    let request = json!({"email": "owner@example.com", "applicationName": "Sales", "applicationUserCount": 5});
    server.ok("POST", "/api/v1/registration/request", &Auth::None, Some(request.clone())).await;

    // The whole mail, decoded: the server address is whole, not `http://12=` / `7.0.0.1`.
    let (found, text) = ctl_outbox(&server, &[]);
    assert!(found, "{text}");
    assert!(text.contains("on the Beseda server http://127.0.0.1"), "{text}");
    assert!(!text.contains("=\n") && !text.contains("=\r\n") && !text.contains("=3D"), "still encoded: {text}");
    assert!(text.contains("\"Sales\""), "{text}");

    // --code: the code alone, which completes the registration.
    let (found, code) = ctl_outbox(&server, &["--code"]);
    assert!(found, "{code}");
    let code = code.strip_suffix('\n').expect("one line");
    assert!(code.len() == 8 && code.chars().all(|c| c.is_ascii_digit()), "{code:?}");
    let mut complete = request;
    complete["activationCode"] = json!(code);
    server.ok("POST", "/api/v1/registration/complete", &Auth::None, Some(complete)).await;

    // The newest mail is now the administration key, and --code prints the key.
    let (found, key) = ctl_outbox(&server, &["--code"]);
    assert!(found, "{key}");
    assert_eq!(key.trim_end(), key_in(&server.latest_mail("owner@example.com")));
}
