//! Nothing acknowledged is lost when the server process is killed: the
//! `beseda` binary runs as a real OS process, is killed with SIGKILL in the
//! middle of a burst, and every message it acknowledged is there after a
//! restart, exactly once.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

struct ServerProcess {
    child: Child,
    base_url: String,
}

impl ServerProcess {
    async fn start(data_dir: &std::path::Path) -> ServerProcess {
        let port = beseda_testkit::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_beseda"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir)
            .env("BESEDA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start beseda");
        let base_url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while client.get(format!("{base_url}/rs/health")).send().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "beseda did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ServerProcess { child, base_url }
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn acknowledged_messages_survive_a_kill_9_of_the_server() {
    let data_dir = tempfile::tempdir().unwrap();
    let outbox = data_dir.path().join("outbox");
    let process = ServerProcess::start(data_dir.path()).await;
    // Reuse the in-process helpers' HTTP conventions against the child process.
    let http = reqwest::Client::new();
    let first_url = process.base_url.clone();
    let post = |path: String, auth: Option<(String, String)>, token: Option<String>, body: serde_json::Value| {
        let mut request = http.post(format!("{first_url}{path}")).json(&body);
        if let Some((id, key)) = auth {
            request = request.basic_auth(id, Some(key));
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    // Phase 1: register and create a conversation.
    let registration = json!({"email": "owner@example.com", "applicationName": "Crash", "applicationUserCount": 1});
    post("/api/v1/registration/request".into(), None, None, registration.clone()).await.unwrap();
    let code = code_in(&beseda_routing::mail::latest_outbox_body(&outbox, "owner@example.com").unwrap());
    let mut complete = registration;
    complete["activationCode"] = json!(code);
    let data: serde_json::Value =
        post("/api/v1/registration/complete".into(), None, None, complete).await.unwrap().json().await.unwrap();
    let application = Application {
        id: data["applicationId"].as_str().unwrap().to_owned(),
        key: data["applicationKey"].as_str().unwrap().to_owned(),
        email: "owner@example.com".into(),
    };
    let token = application.token("a1", "Alice");
    let conversation: serde_json::Value = post(
        "/api/v1/conversations".into(),
        None,
        Some(token.clone()),
        json!({"conversation": {"title": "Burst", "group": true}}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let conversation_id = conversation["id"].as_str().unwrap().to_owned();

    // Phase 2: a burst of sends from several tasks; the server is killed mid-burst.
    let mut senders = Vec::new();
    for sender in 0..4 {
        let http = http.clone();
        let url = format!("{}/api/v1/conversations/{conversation_id}/messages", process.base_url);
        let token = token.clone();
        senders.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for index in 0..10_000 {
                let client_id = format!("s{sender}-{index}");
                let response = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"text": client_id, "clientMessageId": client_id}))
                    .send()
                    .await;
                match response {
                    Ok(response) if response.status().is_success() => acknowledged.push(client_id),
                    _ => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    process.kill();
    let mut acknowledged = Vec::new();
    for sender in senders {
        acknowledged.extend(sender.await.unwrap());
    }
    assert!(!acknowledged.is_empty(), "some sends were acknowledged before the kill");

    // Phase 3: restart on the same data; every acknowledged message is stored exactly once.
    let process = ServerProcess::start(data_dir.path()).await;
    let mut stored = Vec::new();
    let mut filter = json!({"count": 250});
    loop {
        let page: serde_json::Value = http
            .post(format!("{}/api/v1/conversations/{conversation_id}/messages/search", process.base_url))
            .bearer_auth(&token)
            .json(&filter)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            break;
        }
        stored.extend(messages.iter().map(|message| message["text"].as_str().unwrap().to_owned()));
        filter["after"] = messages.last().unwrap()["id"].clone();
    }
    let unique: std::collections::HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "no message is stored twice");
    for client_id in &acknowledged {
        assert!(unique.contains(client_id), "acknowledged message {client_id} was lost");
    }
    // Retrying an acknowledged send after the restart does not duplicate it.
    let retry = &acknowledged[0];
    let retried = http
        .post(format!("{}/api/v1/conversations/{conversation_id}/messages", process.base_url))
        .bearer_auth(&token)
        .json(&json!({"text": retry, "clientMessageId": retry}))
        .send()
        .await
        .unwrap();
    assert!(retried.status().is_success());
    let events: serde_json::Value = http
        .get(format!("{}/api/v1/conversations/{conversation_id}/events?afterSeq=0&limit=1000", process.base_url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seqs: Vec<u64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["seq"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "the event log has no gaps");
    println!("acknowledged before kill -9: {}, stored after restart: {}", acknowledged.len(), stored.len());
}
