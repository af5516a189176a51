//! Inbound webhooks of integrations end to end (§29.5.4, docs/webhooks.md):
//! a real server, integrations created through the REST API, commands
//! POSTed over real HTTP to the connection point URL, effects read back
//! through the REST API. The curl examples of docs/webhooks.md are run with
//! the real `curl` binary, so the page cannot drift from the server.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine;
use common::*;
use serde_json::{Value, json};

// ---- helpers -------------------------------------------------------------------

/// An integration as the tests use it.
struct Integration {
    id: String,
    /// The connection point URL.
    url: String,
}

/// Creates an integration through the REST API.
async fn create_integration(server: &TestServer, application: &Application, integration: Value) -> Integration {
    let created = server
        .ok("POST", "/api/v1/integrations", &application.privileged(), Some(json!({ "integration": integration })))
        .await;
    let id = created["id"].as_str().unwrap_or_else(|| panic!("no id: {created}")).to_owned();
    let url = created["connectionPointUrl"].as_str().unwrap_or_else(|| panic!("no connectionPointUrl: {created}"));
    let token = url.rsplit('/').next().unwrap();
    assert!(url.ends_with(&format!("/webhooks/{token}")), "{url}");
    assert!(token.len() >= 32, "the token must be unguessable: {url}");
    assert_eq!(created["externalSystemType"], "webhook");
    assert_eq!(created["messageEditingAvailable"], true, "{created}");
    Integration { id, url: format!("{}/webhooks/{token}", server.base_url) }
}

/// POSTs raw bytes; returns status and text.
async fn post_raw(url: &str, body: impl Into<reqwest::Body>, signature: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().post(url).header("content-type", "application/json").body(body);
    if let Some(signature) = signature {
        request = request.header("x-beseda-signature", signature);
    }
    let response = request.send().await.expect("webhook request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn post(url: &str, body: Value) -> (u16, String) {
    post_raw(url, body.to_string(), None).await
}

/// A command that must succeed; returns its JSON answer.
async fn ok(url: &str, body: Value) -> Value {
    let (status, text) = post(url, body.clone()).await;
    assert_eq!(status, 200, "{body} failed: {text}");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("200 answers are JSON: {text}"))
}

/// A command that must fail with `status`; returns the text.
async fn fails(url: &str, body: Value, status: u16) -> String {
    let (got, text) = post(url, body.clone()).await;
    assert_eq!(got, status, "{body}: {text}");
    assert!(!text.is_empty(), "{body}: an error answer says what is wrong");
    text
}

fn id(value: &Value, field: &str) -> String {
    value[field].as_str().unwrap_or_else(|| panic!("no {field} in {value}")).to_owned()
}

/// `sha256=<hex HMAC-SHA256>` computed by openssl, independently of the server.
fn openssl_signature(secret: &str, body: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    format!("sha256={}", text.trim().rsplit(' ').next().unwrap())
}

/// An application with Alice and Bob in "Team", and a webhook integration
/// "CRM" whose default member is Alice.
struct Fixture {
    team: Team,
    integration: Integration,
}

async fn fixture() -> Fixture {
    let team = Team::start().await;
    let integration = create_integration(
        &team.server,
        &team.application,
        json!({"externalSystemType": "webhook", "key": "crm", "use": true, "presentation": "CRM",
               "memberIds": [team.alice_id]}),
    )
    .await;
    Fixture { team, integration }
}

impl Fixture {
    fn url(&self) -> &str {
        &self.integration.url
    }

    async fn get(&self, path: &str) -> Value {
        self.team.server.ok("GET", path, &self.team.application.privileged(), None).await
    }

    async fn conversation(&self, conversation_id: &str) -> Value {
        self.get(&format!("/api/v1/conversations/{conversation_id}")).await
    }

    async fn messages(&self, conversation_id: &str) -> Vec<Value> {
        let found = self
            .team
            .server
            .ok(
                "POST",
                &format!("/api/v1/conversations/{conversation_id}/messages/search"),
                &self.team.application.privileged(),
                Some(json!({"sortDirection": "SORT_DIRECTION_ASCENDING"})),
            )
            .await;
        found["messages"].as_array().cloned().unwrap_or_default()
    }

    async fn create_user(&self, ext_user_id: &str, name: &str) -> String {
        let answer =
            ok(self.url(), json!({"createUser": {"extUserId": ext_user_id, "name": name, "fullName": ""}})).await;
        id(&answer, "userId")
    }

    /// Everything a webhook can change, as the API shows it: integration
    /// users, and every conversation with its members and last event.
    async fn snapshot(&self) -> Value {
        let server = &self.team.server;
        let privileged = self.team.application.privileged();
        let users = server
            .ok(
                "POST",
                "/api/v1/users/search",
                &privileged,
                Some(json!({"kind": "USER_KIND_INTEGRATION", "includeBlocked": true, "count": 250})),
            )
            .await;
        let conversations = server.ok("POST", "/api/v1/conversations/search", &privileged, Some(json!({}))).await;
        let mut conversations: Vec<Value> = conversations["conversations"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|conversation| {
                json!({
                    "id": conversation["id"], "title": conversation["title"], "memberIds": conversation["memberIds"],
                    "lastSeq": conversation["lastSeq"],
                })
            })
            .collect();
        conversations.sort_by_key(|conversation| conversation["id"].as_str().unwrap_or_default().to_owned());
        json!({"users": users["users"], "conversations": conversations})
    }
}

// ---- docs/webhooks.md ------------------------------------------------------------

/// One ```sh block of the page that runs curl.
struct Example {
    section: String,
    expect: u16,
    script: String,
}

fn documented_examples() -> Vec<Example> {
    let page = include_str!("../../../docs/webhooks.md");
    let mut examples = Vec::new();
    let mut section = String::new();
    let mut block: Option<Vec<&str>> = None;
    for line in page.lines() {
        match &mut block {
            Some(lines) if line.trim_start().starts_with("```") => {
                let script = lines.join("\n");
                if script.contains("curl") {
                    let expect = lines
                        .iter()
                        .find_map(|line| line.trim().strip_prefix("# expect:"))
                        .unwrap_or_else(|| panic!("a curl example without `# expect:` in {section}:\n{script}"))
                        .trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("a bad `# expect:` in {section}:\n{script}"));
                    examples.push(Example { section: section.clone(), expect, script });
                }
                block = None;
            }
            Some(lines) => lines.push(line),
            None if line.trim() == "```sh" => block = Some(Vec::new()),
            None => {
                if let Some(heading) = line.strip_prefix("## ") {
                    section = heading.trim().to_owned();
                }
            }
        }
    }
    examples
}

/// Runs an example with `sh`; returns the HTTP status curl saw and the body.
async fn run_example(script: &str, env: HashMap<String, String>) -> (u16, String) {
    assert!(script.contains("curl "), "{script}");
    // Make curl print the status after the body, and never hang.
    let script = script.replacen("curl ", "curl --max-time 30 -w '\\n%{http_code}' ", 1);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("sh").arg("-c").arg(&script).envs(env).output().expect("sh and curl are installed")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "curl failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    (status.trim().parse().unwrap_or_else(|_| panic!("no status in {stdout}")), body.to_owned())
}

#[tokio::test]
async fn the_documented_examples_run_as_documented() {
    let examples = documented_examples();
    assert!(examples.len() >= 20, "docs/webhooks.md lost its examples: {}", examples.len());
    for command in
        ["createConversation", "createMessage", "createUser", "updateConversation", "updateMessage", "updateUser"]
    {
        assert!(examples.iter().any(|example| example.script.contains(command)), "no example of {command}");
    }
    for status in [200, 400, 401, 404, 409, 413, 500] {
        assert!(examples.iter().any(|example| example.expect == status), "no example answering {status}");
    }

    let Team { server, application, alice_id, .. } = Team::start().await;
    let docs = create_integration(
        &server,
        &application,
        json!({"externalSystemType": "webhook", "key": "docs", "use": true, "presentation": "Docs",
               "memberIds": [alice_id]}),
    )
    .await;
    let signed = create_integration(
        &server,
        &application,
        json!({"externalSystemType": "webhook", "key": "docs-signed", "use": true, "presentation": "Signed",
               "signingSecret": "correct horse battery staple"}),
    )
    .await;
    let mut env: HashMap<String, String> = HashMap::from([
        ("BESEDA_URL".into(), server.base_url.clone()),
        ("APPLICATION_ID".into(), application.id.clone()),
        ("APPLICATION_KEY".into(), application.key.clone()),
        ("MANAGER_ID".into(), alice_id.clone()),
    ]);
    for example in &examples {
        let signing = example.section == "Signing requests";
        let url = if signing { &signed.url } else { &docs.url };
        env.insert("CONNECTION_POINT_URL".into(), url.clone());
        env.insert(
            "SIGNING_SECRET".into(),
            if signing { "correct horse battery staple".into() } else { String::new() },
        );
        if example.script.contains("$CONVERSATION_ID") && !env.contains_key("CONVERSATION_ID") {
            // The application created this conversation and added Ivan (extUserId 1) to it.
            let found = server
                .ok(
                    "POST",
                    "/api/v1/users/search",
                    &application.privileged(),
                    Some(json!({"kind": "USER_KIND_INTEGRATION", "nameContains": "Ivan"})),
                )
                .await;
            let ivan = found["users"][0]["id"].as_str().unwrap_or_else(|| panic!("no Ivan: {found}")).to_owned();
            env.insert(
                "CONVERSATION_ID".into(),
                group(&server, &application, "Announcements", &[&alice_id, &ivan]).await,
            );
        }
        let (status, body) = run_example(&example.script, env.clone()).await;
        assert_eq!(status, example.expect, "example in \"{}\" answered {body}:\n{}", example.section, example.script);
    }

    // What the examples did is visible through the API.
    let key = format!("webhook:{}:order-1001", docs.id);
    let order = server.ok("GET", &format!("/api/v1/conversations/by-key/{key}"), &application.privileged(), None).await;
    assert_eq!(order["title"], "Order 1001 (paid)", "{order}");
    let order_id = order["id"].as_str().unwrap();
    let messages = server
        .ok(
            "POST",
            &format!("/api/v1/conversations/{order_id}/messages/search"),
            &application.privileged(),
            Some(json!({"sortDirection": "SORT_DIRECTION_ASCENDING"})),
        )
        .await;
    let texts: Vec<&str> =
        messages["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        [
            "The order is paid in full",
            r#"<b>Shipped</b> by <span style="color:green">courier</span>"#,
            "The receipt",
            "Order total"
        ],
        "{messages}"
    );
    // The page's promise about formatted text holds.
    let page = include_str!("../../../docs/webhooks.md");
    assert!(page.contains(r#"<b>Shipped</b> by <span style="color:green">courier</span>"#));
}

// ---- the commands ----------------------------------------------------------------

#[tokio::test]
async fn every_command_acts_through_the_collaboration_system() {
    let fixture = fixture().await;
    let url = fixture.url();
    let team = &fixture.team;

    // createUser: an integration user with an external id unique per integration.
    let created = ok(
        url,
        json!({"createUser": {"extUserId": "1", "name": "Ivan", "fullName": "Ivan Petrov", "picture": "iVBORw0KGgo="}}),
    )
    .await;
    let ivan = id(&created, "userId");
    let user = fixture.get(&format!("/api/v1/users/{ivan}")).await;
    assert_eq!(user["kind"], "USER_KIND_INTEGRATION", "{user}");
    assert_eq!(user["name"], "Ivan");
    assert_eq!(user["fullName"], "Ivan Petrov");
    assert_eq!(user["picture"], "iVBORw0KGgo=");
    assert_eq!(user["externalSystemType"], "webhook");
    assert_eq!(user["externalSystemUserId"], format!("{}:1", fixture.integration.id));
    let maria = fixture.create_user("2", "Maria").await;

    // createConversation: a displayed group of the author, the default members and `members`.
    let created = ok(
        url,
        json!({"createConversation": {"extConversationId": "order-1", "title": "Order 1", "extUserId": "1", "members": ["2"]}}),
    )
    .await;
    let conversation_id = id(&created, "conversationId");
    assert_eq!(created["authorId"], ivan.as_str());
    let conversation = fixture.conversation(&conversation_id).await;
    assert_eq!(conversation["title"], "Order 1", "{conversation}");
    assert_eq!(conversation["group"], true);
    assert_ne!(conversation["displayed"], false);
    assert_eq!(conversation["key"], format!("webhook:{}:order-1", fixture.integration.id));
    let mut expected = vec![team.alice_id.clone(), ivan.clone(), maria.clone()];
    expected.sort();
    assert_eq!(conversation["memberIds"], json!(expected));

    // createMessage, by a member; Alice, a default member, is notified.
    let sent = ok(
        url,
        json!({"createMessage": {"extId": "m-1", "extConversationId": "order-1", "extUserId": "1", "text": "Paid"}}),
    )
    .await;
    let message_id = id(&sent, "messageId");
    assert_eq!(sent["conversationId"], conversation_id.as_str());
    assert_eq!(sent["authorId"], ivan.as_str());
    let message = fixture.get(&format!("/api/v1/messages/{message_id}")).await;
    assert_eq!(message["text"], "Paid", "{message}");
    assert_eq!(message["authorId"], ivan.as_str());
    assert_eq!(message["clientMessageId"], format!("webhook:{}:order-1:m-1", fixture.integration.id));
    let unread = team.server.ok("GET", "/api/v1/unread", &team.alice, None).await;
    assert_eq!(unread["totalUnread"], 1, "{unread}");

    // updateMessage: edited as its author.
    let edited = ok(
        url,
        json!({"updateMessage": {"extId": "m-1", "extConversationId": "order-1", "text": "Paid <b>in full</b>", "textFormat": "text/html"}}),
    )
    .await;
    assert_eq!(edited["messageId"], message_id.as_str());
    let message = fixture.get(&format!("/api/v1/messages/{message_id}")).await;
    assert_eq!(message["text"], "Paid <b>in full</b>", "{message}");
    assert_eq!(message["textFormat"], "TEXT_FORMAT_FORMATTED");
    assert!(message.get("editedAt").is_some(), "{message}");
    let not_author = fails(
        url,
        json!({"updateMessage": {"extId": "m-1", "extConversationId": "order-1", "extUserId": "2", "text": "x"}}),
        500,
    )
    .await;
    assert!(not_author.contains("not the author"), "{not_author}");

    // updateConversation: rename and remove a member.
    ok(
        url,
        json!({"updateConversation": {"extConversationId": "order-1", "title": "Order 1 (paid)", "extUserId": "1", "removeMembers": ["2"]}}),
    )
    .await;
    let conversation = fixture.conversation(&conversation_id).await;
    assert_eq!(conversation["title"], "Order 1 (paid)");
    assert!(!conversation["memberIds"].as_array().unwrap().contains(&json!(maria)), "{conversation}");

    // An author who is not a member of a conversation the integration created is added.
    ok(
        url,
        json!({"createMessage": {"extId": "m-2", "extConversationId": "order-1", "extUserId": "2", "text": "Back"}}),
    )
    .await;
    let conversation = fixture.conversation(&conversation_id).await;
    assert!(conversation["memberIds"].as_array().unwrap().contains(&json!(maria)), "{conversation}");

    // updateConversation: add members.
    fixture.create_user("3", "Petr").await;
    ok(url, json!({"updateConversation": {"extConversationId": "order-1", "addMembers": ["3"]}})).await;
    assert_eq!(fixture.conversation(&conversation_id).await["memberIds"].as_array().unwrap().len(), 4);

    // updateUser: only the given properties change.
    let updated = ok(url, json!({"updateUser": {"extUserId": "1", "name": "Vanya"}})).await;
    assert_eq!(updated["userId"], ivan.as_str());
    let user = fixture.get(&format!("/api/v1/users/{ivan}")).await;
    assert_eq!(user["name"], "Vanya");
    assert_eq!(user["fullName"], "Ivan Petrov");
    ok(url, json!({"updateUser": {"extUserId": "1", "picture": ""}})).await;
    assert!(fixture.get(&format!("/api/v1/users/{ivan}")).await.get("picture").is_none());

    // An extUserId is unique per integration, not per application.
    let other = create_integration(
        &team.server,
        &team.application,
        json!({"externalSystemType": "webhook", "key": "helpdesk", "use": true, "presentation": "Helpdesk"}),
    )
    .await;
    let other_ivan = ok(&other.url, json!({"createUser": {"extUserId": "1", "name": "Other", "fullName": ""}})).await;
    assert_ne!(id(&other_ivan, "userId"), ivan);
    // And the other integration does not see this one's conversations.
    fails(&other.url, json!({"createMessage": {"extId": "x", "extConversationId": "order-1", "text": "x"}}), 500).await;
}

#[tokio::test]
async fn conversations_created_by_an_integration_are_marked_with_it() {
    let fixture = fixture().await;
    let created = ok(fixture.url(), json!({"createConversation": {"extConversationId": "c", "title": "Marked"}})).await;
    let conversation = fixture.conversation(&id(&created, "conversationId")).await;
    assert_eq!(conversation["integrationId"], fixture.integration.id.as_str(), "{conversation}");
}

// ---- answers -----------------------------------------------------------------------

#[tokio::test]
async fn answers_use_the_documented_status_codes() {
    let fixture = fixture().await;
    let url = fixture.url();
    let team = &fixture.team;
    fixture.create_user("1", "Ivan").await;
    let created =
        ok(url, json!({"createConversation": {"extConversationId": "c", "title": "C", "extUserId": "1"}})).await;
    let conversation_id = id(&created, "conversationId");
    let message = json!({"createMessage": {"extId": "m", "extConversationId": "c", "extUserId": "1", "text": "hi"}});
    ok(url, message.clone()).await;

    // 400: malformed, missing fields named, unknown commands listed, wrong types named.
    let (status, text) = post_raw(url, "{\"createMessage\": {", None).await;
    assert_eq!(status, 400);
    assert!(text.contains("not valid JSON"), "{text}");
    let (status, text) = post_raw(url, vec![0xff, 0xfe, b'{', b'}'], None).await;
    assert_eq!(status, 400);
    assert!(text.contains("UTF-8"), "{text}");
    let text = fails(url, json!({"createMessage": {"extId": "m2", "text": "hi"}}), 400).await;
    assert!(text.contains("field `extConversationId` is required"), "{text}");
    let text = fails(url, json!({"createUser": {"extUserId": "9", "fullName": ""}}), 400).await;
    assert!(text.contains("field `name` is required"), "{text}");
    let text = fails(url, json!({"sendMessage": {}}), 400).await;
    for command in
        ["createConversation", "createMessage", "createUser", "updateConversation", "updateMessage", "updateUser"]
    {
        assert!(text.contains(command), "{text}");
    }
    let text = fails(url, json!({"createConversation": {"extConversationId": "d", "title": ["x"]}}), 400).await;
    assert!(text.contains("field `title`"), "{text}");
    let text =
        fails(url, json!({"createUser": {"extUserId": "1", "name": "A", "fullName": "", "picture": "@@"}}), 400).await;
    assert!(text.contains("`picture`"), "{text}");
    let long_title = "t".repeat(1025);
    let text = fails(
        url,
        json!({"createConversation": {"extConversationId": "long", "title": long_title, "extUserId": "1"}}),
        400,
    )
    .await;
    assert!(text.contains("field `title`") && text.contains("at most 1024"), "{text}");
    let text =
        fails(url, json!({"createMessage": {"extId": "m3", "extConversationId": "c", "text": "ж".repeat(4001)}}), 400)
            .await;
    assert!(text.contains("field `text`") && text.contains("at most 4000"), "{text}");
    let (status, _) = post_raw(url, "", None).await;
    assert_eq!(status, 400);

    // A UTF-8 byte order mark is tolerated.
    let mut with_bom = b"\xEF\xBB\xBF".to_vec();
    with_bom.extend_from_slice(br#"{"updateUser": {"extUserId": "1", "fullName": "With BOM"}}"#);
    let (status, text) = post_raw(url, with_bom, None).await;
    assert_eq!(status, 200, "{text}");

    // 404: unknown token; switched-off integration (and back on).
    let (status, text) = post(&format!("{}/webhooks/no-such-token", team.server.base_url), message.clone()).await;
    assert_eq!((status, text.as_str()), (404, "No active integration"));
    let (status, text) = post(&format!("{url}x"), message.clone()).await;
    assert_eq!((status, text.as_str()), (404, "No active integration"));
    let path = format!("/api/v1/integrations/{}", fixture.integration.id);
    let privileged = team.application.privileged();
    team.server
        .ok("PATCH", &path, &privileged, Some(json!({"updateMask": ["use"], "integration": {"use": false}})))
        .await;
    let (status, text) = post(url, json!({"updateUser": {"extUserId": "1", "name": "Off"}})).await;
    assert_eq!((status, text.as_str()), (404, "No active integration"));
    team.server
        .ok("PATCH", &path, &privileged, Some(json!({"updateMask": ["use"], "integration": {"use": true}})))
        .await;
    ok(url, json!({"updateUser": {"extUserId": "1", "name": "On"}})).await;

    // 409: create… of what exists, and a replayed createMessage.
    let text =
        fails(url, json!({"createConversation": {"extConversationId": "c", "title": "C", "extUserId": "1"}}), 409)
            .await;
    assert!(text.contains("exists"), "{text}");
    fails(url, json!({"createUser": {"extUserId": "1", "name": "Ivan", "fullName": ""}}), 409).await;
    fails(url, message.clone(), 409).await;
    let changed_body =
        json!({"createMessage": {"extId": "m", "extConversationId": "c", "extUserId": "1", "text": "other"}});
    fails(url, changed_body, 409).await;

    // 500: what does not exist, and rules of the collaboration system as `code: message`.
    let text =
        fails(url, json!({"createMessage": {"extId": "m", "extConversationId": "nope", "text": "hi"}}), 500).await;
    assert!(text.contains("createConversation first"), "{text}");
    let text = fails(url, json!({"updateMessage": {"extId": "zz", "extConversationId": "c", "text": "hi"}}), 500).await;
    assert!(text.contains("createMessage first"), "{text}");
    let text = fails(url, json!({"updateConversation": {"extConversationId": "nope", "title": "x"}}), 500).await;
    assert!(text.contains("createConversation first"), "{text}");
    // An extUserId that was never created is missing like a conversation is.
    let text = fails(
        url,
        json!({"createMessage": {"extId": "m3", "extConversationId": "c", "extUserId": "404", "text": "x"}}),
        500,
    )
    .await;
    assert!(text.contains("`404`") && text.contains("createUser"), "{text}");
    let text = fails(
        url,
        json!({"createConversation": {"extConversationId": "e", "title": "E", "extUserId": "1", "members": ["ghost"]}}),
        500,
    )
    .await;
    assert!(text.contains("members") && text.contains("`ghost`"), "{text}");

    // Exactly the one message in "c" after all of that.
    let messages = fixture.messages(&conversation_id).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0]["text"], "hi");
}

#[tokio::test]
async fn failed_requests_change_nothing() {
    let fixture = fixture().await;
    let url = fixture.url();
    fixture.create_user("1", "Ivan").await;
    ok(url, json!({"createConversation": {"extConversationId": "c", "title": "C", "extUserId": "1"}})).await;
    let message = json!({"createMessage": {"extId": "m", "extConversationId": "c", "extUserId": "1", "text": "hi"}});
    ok(url, message.clone()).await;
    let before = fixture.snapshot().await;

    let failing: Vec<(Value, u16)> = vec![
        // Unknown members: neither the conversation nor the own user is created.
        (
            json!({"createConversation": {"extConversationId": "c2", "title": "C2", "extUserId": "1", "members": ["ghost"]}}),
            500,
        ),
        (json!({"createConversation": {"extConversationId": "c3", "title": "C3", "members": ["1"]}}), 400),
        (json!({"createConversation": {"extConversationId": "c4", "title": "C4", "extUserId": "ghost"}}), 500),
        (json!({"createConversation": {"extConversationId": "c", "title": "Again", "extUserId": "1"}}), 409),
        (json!({"createConversation": {"extConversationId": "c5", "title": "t".repeat(1025), "extUserId": "1"}}), 400),
        (message.clone(), 409),
        (json!({"createMessage": {"extId": "m2", "extConversationId": "c", "extUserId": "ghost", "text": "x"}}), 500),
        (json!({"createMessage": {"extId": "m2", "extConversationId": "c", "text": "ж".repeat(4001)}}), 400),
        (
            json!({"createMessage": {"extId": "m2", "extConversationId": "c", "text": "x", "data": "!", "dataType": "image/png"}}),
            400,
        ),
        (json!({"createMessage": {"extId": "m2", "extConversationId": "nope", "text": "x"}}), 500),
        (json!({"createUser": {"extUserId": "1", "name": "Twin", "fullName": ""}}), 409),
        (json!({"updateMessage": {"extId": "zz", "extConversationId": "c", "text": "x"}}), 500),
        (json!({"updateConversation": {"extConversationId": "c", "addMembers": ["ghost"]}}), 500),
        (json!({"updateConversation": {"extConversationId": "c", "title": "New", "removeMembers": ["ghost"]}}), 500),
        (json!({"updateUser": {"extUserId": "ghost", "name": "x"}}), 500),
        (json!({"updateUser": {"extUserId": "1", "name": ""}}), 400),
    ];
    for (body, status) in failing {
        fails(url, body, status).await;
    }
    post_raw(url, "{", None).await;
    post(&format!("{}/webhooks/nope", fixture.team.server.base_url), message.clone()).await;

    assert_eq!(fixture.snapshot().await, before, "a failed request changed something");
}

// ---- formatted text and data ----------------------------------------------------------

#[tokio::test]
async fn html_is_sanitised_to_the_allow_list() {
    let fixture = fixture().await;
    let url = fixture.url();
    let created = ok(url, json!({"createConversation": {"extConversationId": "c", "title": "C"}})).await;
    let conversation_id = id(&created, "conversationId");
    let html = concat!(
        r#"<b>bold</b> <i>it</i> <u>u</u> <s>s</s> <strike>st</strike> <strong>str</strong> <big>big</big> <small>sm</small>"#,
        r#"<ul><li>one</li></ul><ol><li>two</li></ol><font color="red" face="Arial" onclick="x()">font</font>"#,
        r#"<a href="https://example.com/" onclick="steal()">link</a><a href="javascript:alert(1)">bad</a>"#,
        r#"<span style="background-color: yellow; color: blue; font-family: serif; font-size: 12px; font-style: italic; font-weight: bold; text-decoration: underline; position: fixed; background-image: url(x)">styled</span>"#,
        r#"<img src="https://example.com/x.png" onerror="alert(1)"><script>alert("x")</script><style>b{color:red}</style>"#,
        r#"<iframe src="https://example.com/"></iframe><div class="c" id="d">div text</div><p>para</p>"#,
    );
    let sent = ok(
        url,
        json!({"createMessage": {"extId": "h", "extConversationId": "c", "text": html, "textFormat": "text/html"}}),
    )
    .await;
    let message = fixture.get(&format!("/api/v1/messages/{}", id(&sent, "messageId"))).await;
    let stored = message["text"].as_str().unwrap();
    assert_eq!(message["textFormat"], "TEXT_FORMAT_FORMATTED");
    assert_eq!(
        stored,
        concat!(
            r#"<b>bold</b> <i>it</i> <u>u</u> <s>s</s> <strike>st</strike> <strong>str</strong> <big>big</big> <small>sm</small>"#,
            r#"<ul><li>one</li></ul><ol><li>two</li></ol><font color="red" face="Arial">font</font>"#,
            r#"<a href="https://example.com/" rel="noopener noreferrer">link</a><a rel="noopener noreferrer">bad</a>"#,
            r#"<span style="background-color:yellow;color:blue;font-family:serif;font-size:12px;font-style:italic;font-weight:bold;text-decoration:underline">styled</span>"#,
            r#"div textpara"#,
        )
    );
    for junk in ["&lt;", "script", "alert", "img", "iframe", "onclick", "position", "class="] {
        assert!(!stored.contains(junk), "{junk} left in {stored}");
    }
    // Plain text is kept as it is.
    let sent =
        ok(url, json!({"createMessage": {"extId": "p", "extConversationId": "c", "text": "<b>literally</b>"}})).await;
    let message = fixture.get(&format!("/api/v1/messages/{}", id(&sent, "messageId"))).await;
    assert_eq!(message["text"], "<b>literally</b>");
    assert_ne!(message["textFormat"], "TEXT_FORMAT_FORMATTED");
    // Markup only, cleaned to nothing: a 400, and no message.
    let text = fails(
        url,
        json!({"createMessage": {"extId": "e", "extConversationId": "c", "text": "<img src=x><script>1</script>", "textFormat": "text/html"}}),
        400,
    )
    .await;
    assert!(text.contains("text"), "{text}");
    assert_eq!(fixture.messages(&conversation_id).await.len(), 2);
}

#[tokio::test]
async fn message_data_is_mapped_by_its_type() {
    let fixture = fixture().await;
    let url = fixture.url();
    let created = ok(url, json!({"createConversation": {"extConversationId": "c", "title": "C"}})).await;
    let conversation_id = id(&created, "conversationId");
    let b64 = base64::engine::general_purpose::STANDARD;
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
    let cases = [
        ("image", json!(b64.encode(png)), "image/png", "image/png", png.to_vec()),
        ("binary", json!("AAEC/w=="), "application/octet-stream", "application/octet-stream", vec![0, 1, 2, 255]),
        (
            "xdto",
            json!(r##"{"#type": "jxs:decimal", "#value": 1250.5}"##),
            "application/json+xdto",
            "application/json+xdto",
            br##"{"#type": "jxs:decimal", "#value": 1250.5}"##.to_vec(),
        ),
        ("csv", json!("a;b\n1;2"), "text/csv", "text/csv", b"a;b\n1;2".to_vec()),
        ("untyped", json!("just a string"), "", "text/plain", b"just a string".to_vec()),
    ];
    for (ext_id, data, data_type, mime_type, content) in cases {
        let sent = ok(
            url,
            json!({"createMessage": {"extId": ext_id, "extConversationId": "c", "text": ext_id, "data": data, "dataType": data_type}}),
        )
        .await;
        let message = fixture.get(&format!("/api/v1/messages/{}", id(&sent, "messageId"))).await;
        assert_eq!(message["data"]["mimeType"], mime_type, "{ext_id}: {message}");
        let stored = b64.decode(message["data"]["content"].as_str().unwrap()).unwrap();
        assert_eq!(stored, content, "{ext_id}");
    }
    // The documented example's empty data means no data.
    let sent = ok(
        url,
        json!({"createMessage": {"extId": "none", "extConversationId": "c", "text": "no data", "data": "", "dataType": ""}}),
    )
    .await;
    assert!(fixture.get(&format!("/api/v1/messages/{}", id(&sent, "messageId"))).await.get("data").is_none());
    // Bad data is named and stores nothing.
    let text = fails(
        url,
        json!({"createMessage": {"extId": "bad", "extConversationId": "c", "text": "x", "data": "not base64!", "dataType": "image/png"}}),
        400,
    )
    .await;
    assert!(text.contains("field `data`"), "{text}");
    let text = fails(
        url,
        json!({"createMessage": {"extId": "bad", "extConversationId": "c", "text": "x", "data": "{oops", "dataType": "application/json+xdto"}}),
        400,
    )
    .await;
    assert!(text.contains("field `data`"), "{text}");
    assert_eq!(fixture.messages(&conversation_id).await.len(), 6);
}

// ---- conversations -------------------------------------------------------------------

#[tokio::test]
async fn a_conversation_created_through_the_api_is_targeted_by_its_id() {
    let fixture = fixture().await;
    let url = fixture.url();
    let team = &fixture.team;
    let ivan = fixture.create_user("1", "Ivan").await;
    let target = team.conversation_id.clone();
    let message = json!({"createMessage": {"extId": "a-1", "extConversationId": target, "extUserId": "1", "text": "Hello, team"}});

    // Not a member of the application's conversation: a 500 naming the user, and no message.
    let text = fails(url, message.clone(), 500).await;
    assert!(text.contains(&ivan) && text.contains("not a member"), "{text}");
    assert!(fixture.messages(&target).await.is_empty());
    assert!(!fixture.conversation(&target).await["memberIds"].as_array().unwrap().contains(&json!(ivan)));

    // The application adds Ivan; now the message lands there.
    team.server
        .ok(
            "PATCH",
            &format!("/api/v1/conversations/{target}"),
            &team.application.privileged(),
            Some(json!({"addMemberIds": [ivan]})),
        )
        .await;
    let sent = ok(url, message.clone()).await;
    assert_eq!(sent["conversationId"], target.as_str());
    let messages = fixture.messages(&target).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["text"], "Hello, team");
    assert_eq!(messages[0]["authorId"], ivan.as_str());
    fails(url, message, 409).await;
    ok(url, json!({"updateMessage": {"extId": "a-1", "extConversationId": target, "text": "Hello again"}})).await;
    assert_eq!(fixture.messages(&target).await[0]["text"], "Hello again");

    // The integration may post there but not change it or create it again.
    let text = fails(url, json!({"updateConversation": {"extConversationId": target, "title": "Mine now"}}), 500).await;
    assert!(text.contains("created by the application"), "{text}");
    assert_eq!(fixture.conversation(&target).await["title"], "Team");
    fails(url, json!({"createConversation": {"extConversationId": target, "title": "Dup", "extUserId": "1"}}), 409)
        .await;
}

#[tokio::test]
async fn anonymous_conversations_speak_as_the_integration() {
    let fixture = fixture().await;
    let url = fixture.url();
    let team = &fixture.team;
    fixture.create_user("1", "Ivan").await;

    // Without extUserId the integration's own user, named after it, creates and writes.
    let created = ok(url, json!({"createConversation": {"extConversationId": "fb", "title": "Feedback"}})).await;
    let own = id(&created, "authorId");
    let user = fixture.get(&format!("/api/v1/users/{own}")).await;
    assert_eq!(user["name"], "CRM", "{user}");
    assert_eq!(user["kind"], "USER_KIND_INTEGRATION");
    let conversation_id = id(&created, "conversationId");
    let mut members = vec![team.alice_id.clone(), own.clone()];
    members.sort();
    assert_eq!(fixture.conversation(&conversation_id).await["memberIds"], json!(members));
    let sent = ok(url, json!({"createMessage": {"extId": "1", "extConversationId": "fb", "text": "Great site"}})).await;
    assert_eq!(sent["authorId"], own.as_str());

    // Its requests must not name users: a 500, since that the conversation is
    // anonymous is stored; creating one with members is wrong in itself, a 400.
    for (body, status) in [
        (json!({"createMessage": {"extId": "2", "extConversationId": "fb", "extUserId": "1", "text": "x"}}), 500),
        (json!({"updateMessage": {"extId": "1", "extConversationId": "fb", "extUserId": "1", "text": "x"}}), 500),
        (json!({"updateConversation": {"extConversationId": "fb", "addMembers": ["1"]}}), 500),
        (json!({"updateConversation": {"extConversationId": "fb", "removeMembers": ["1"]}}), 500),
        (json!({"updateConversation": {"extConversationId": "fb", "title": "x", "extUserId": "1"}}), 500),
        (json!({"createConversation": {"extConversationId": "fb2", "title": "x", "members": ["1"]}}), 400),
    ] {
        let text = fails(url, body, status).await;
        assert!(text.contains("without extUserId"), "{text}");
    }
    ok(url, json!({"updateConversation": {"extConversationId": "fb", "title": "Site feedback"}})).await;
    ok(url, json!({"updateMessage": {"extId": "1", "extConversationId": "fb", "text": "Great site!"}})).await;
    assert_eq!(fixture.conversation(&conversation_id).await["title"], "Site feedback");
    assert_eq!(fixture.messages(&conversation_id).await.len(), 1);

    // The own user is created once, whatever needs it.
    let second = ok(url, json!({"createConversation": {"extConversationId": "fb3", "title": "More"}})).await;
    assert_eq!(second["authorId"], own.as_str());
    // In a conversation with named users, a message without extUserId is the own user's, who is added.
    let named =
        ok(url, json!({"createConversation": {"extConversationId": "n", "title": "Named", "extUserId": "1"}})).await;
    let sent =
        ok(url, json!({"createMessage": {"extId": "1", "extConversationId": "n", "text": "From the CRM"}})).await;
    assert_eq!(sent["authorId"], own.as_str());
    let members = fixture.conversation(&id(&named, "conversationId")).await["memberIds"].clone();
    assert!(members.as_array().unwrap().contains(&json!(own)), "{members}");
}

// ---- signatures ---------------------------------------------------------------------------

#[tokio::test]
async fn signed_integrations_refuse_unsigned_and_tampered_requests() {
    let team = Team::start().await;
    let secret = "s3cret-of-the-crm";
    let signed = create_integration(
        &team.server,
        &team.application,
        json!({"externalSystemType": "webhook", "key": "signed", "use": true, "presentation": "Signed", "signingSecret": secret}),
    )
    .await;
    let body = br#"{"createUser": {"extUserId": "1", "name": "Ivan", "fullName": ""}}"#.to_vec();
    let signature = openssl_signature(secret, &body);

    let (status, text) = post_raw(&signed.url, body.clone(), None).await;
    assert_eq!(status, 401);
    assert!(text.contains("X-Beseda-Signature") && text.contains("sha256="), "{text}");
    let wrong = openssl_signature("another secret", &body);
    assert_eq!(post_raw(&signed.url, body.clone(), Some(&wrong)).await.0, 401);
    let mut tampered = body.clone();
    tampered.insert(1, b' ');
    assert_eq!(post_raw(&signed.url, tampered, Some(&signature)).await.0, 401);
    assert_eq!(post_raw(&signed.url, body.clone(), Some(signature.trim_start_matches("sha256="))).await.0, 401);
    // Nothing was created by the refused requests: the signed one creates the user now.
    let (status, text) = post_raw(&signed.url, body.clone(), Some(&signature)).await;
    assert_eq!(status, 200, "{text}");
    // Signed but replayed: the signature is fine, the command conflicts.
    assert_eq!(post_raw(&signed.url, body, Some(&signature)).await.0, 409);
    // An unknown token stays a 404, signature or not.
    let (status, _) = post_raw(&format!("{}/webhooks/nope", team.server.base_url), "{}", Some(&signature)).await;
    assert_eq!(status, 404);
}

// ---- strict 1C status codes and the body limit --------------------------------------

/// A body of `size` bytes that is otherwise a valid createUser.
fn padded_body(size: usize) -> Vec<u8> {
    let head = r#"{"createUser": {"extUserId": "1", "name": "Ivan", "fullName": ""#;
    let tail = r#""}}"#;
    let mut body = head.as_bytes().to_vec();
    body.resize(size - tail.len(), b' ');
    body.extend_from_slice(tail.as_bytes());
    body
}

#[tokio::test]
async fn a_body_over_one_megabyte_is_the_documented_json_error() {
    let fixture = fixture().await;
    let too_large = padded_body(1024 * 1024 + 1);
    let response = reqwest::Client::new()
        .post(fixture.url())
        .header("content-type", "application/json")
        .body(too_large.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    assert_eq!(response.headers()["x-beseda-error-code"], "malformed_request");
    let error: Value = response.json().await.expect("a JSON error body, not the framework's text");
    assert_eq!(error["error"]["code"], "malformed_request", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("1048576 bytes"), "{error}");
    // Nothing was created: the same user can be created afterwards.
    ok(fixture.url(), json!({"createUser": {"extUserId": "1", "name": "Ivan", "fullName": ""}})).await;
    // An unknown token is a 404 whatever the size: the body tells nothing about the caller.
    let (status, text) =
        post_raw(&format!("{}/webhooks/no-such-token", fixture.team.server.base_url), too_large, None).await;
    assert_eq!((status, text.as_str()), (404, "No active integration"));
    // Exactly at the limit the body is read (and here answered 409: the user exists).
    assert_eq!(post_raw(fixture.url(), padded_body(1024 * 1024), None).await.0, 409);
}

#[tokio::test]
async fn strict_integrations_answer_only_the_1c_status_codes() {
    let team = Team::start().await;
    let secret = "strict-secret";
    let created = team
        .server
        .ok(
            "POST",
            "/api/v1/integrations",
            &team.application.privileged(),
            Some(json!({"integration": {"externalSystemType": "webhook", "key": "strict", "use": true,
                        "presentation": "Strict", "strictStatusCodes": true}})),
        )
        .await;
    assert_eq!(created["strictStatusCodes"], true, "{created}");
    let integration_id = created["id"].as_str().unwrap().to_owned();
    let token = created["connectionPointUrl"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let url = format!("{}/webhooks/{token}", team.server.base_url);

    // What Beseda answers 400 is a 500 with the same text.
    let (status, text) = post_raw(&url, "{\"createMessage\": {", None).await;
    assert_eq!(status, 500);
    assert!(text.contains("not valid JSON"), "{text}");
    let text = fails(&url, json!({"createMessage": {"extId": "m", "text": "hi"}}), 500).await;
    assert!(text.contains("field `extConversationId` is required"), "{text}");
    // A body over 1 MB: 500 with the text, not 413.
    let (status, text) = post_raw(&url, padded_body(1024 * 1024 + 1), None).await;
    assert_eq!(status, 500);
    assert!(text.contains("larger than 1048576 bytes"), "{text}");
    // 200, 409 and 404 are the 1C codes already.
    ok(&url, json!({"createUser": {"extUserId": "1", "name": "Ivan", "fullName": ""}})).await;
    fails(&url, json!({"createUser": {"extUserId": "1", "name": "Ivan", "fullName": ""}}), 409).await;

    // A signing secret's 401 is a 500 too.
    let path = format!("/api/v1/integrations/{integration_id}");
    let privileged = team.application.privileged();
    team.server
        .ok(
            "PATCH",
            &path,
            &privileged,
            Some(json!({"updateMask": ["signingSecret"], "integration": {"signingSecret": secret}})),
        )
        .await;
    let body = br#"{"createUser": {"extUserId": "2", "name": "Maria", "fullName": ""}}"#.to_vec();
    let (status, text) = post_raw(&url, body.clone(), None).await;
    assert_eq!(status, 500);
    assert!(text.contains("X-Beseda-Signature"), "{text}");

    // Switched off through the update API: Beseda's own codes again.
    let updated = team
        .server
        .ok(
            "PATCH",
            &path,
            &privileged,
            Some(json!({"updateMask": ["strictStatusCodes"], "integration": {"strictStatusCodes": false}})),
        )
        .await;
    assert!(updated.get("strictStatusCodes").is_none(), "false is omitted: {updated}");
    assert_eq!(post_raw(&url, body.clone(), None).await.0, 401);
    assert_eq!(post_raw(&url, "{", Some(&openssl_signature(secret, b"{"))).await.0, 400);
    let (status, text) = post_raw(&url, body.clone(), Some(&openssl_signature(secret, &body))).await;
    assert_eq!(status, 200, "{text}");
    let stored = team.server.ok("GET", &path, &privileged, None).await;
    assert!(stored.get("strictStatusCodes").is_none(), "{stored}");
}
