//! A whole Beseda node on port 0 with its own data directory, and clients
//! that speak the real protocols to it: HTTP for the API, WebSocket for the
//! client protocol. Nothing here reaches into the server's internals.

#![allow(dead_code)]

pub mod cluster;
pub mod processing;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use beseda::config::NodeConfig;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub const WAIT: Duration = Duration::from_secs(10);

/// The PostgreSQL URL of tests that need it, from `BESEDA_TEST_PG_URL`
/// (CI sets it, and then those tests must pass); `None`, with a note naming
/// `what` was skipped, where it is not set.
pub fn postgres_url(what: &str) -> Option<String> {
    match std::env::var("BESEDA_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("BESEDA_TEST_PG_URL is not set: {what} need PostgreSQL and were skipped");
            None
        }
    }
}

pub struct TestServer {
    pub base_url: String,
    pub ws_url: String,
    pub outbox: PathBuf,
    pub data_dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    http: reqwest::Client,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_in(tempfile::tempdir().expect("temporary directory")).await
    }

    /// Starts a node on an existing data directory (to test restarts).
    pub async fn start_in(data_dir: tempfile::TempDir) -> TestServer {
        Self::start_with(data_dir, None).await
    }

    /// Starts a node on PostgreSQL, in its own schema of the database at `url`.
    pub async fn start_on_postgres(url: &str, schema: &str) -> TestServer {
        Self::start_with(tempfile::tempdir().expect("temporary directory"), Some((url.to_owned(), schema.to_owned())))
            .await
    }

    async fn start_with(data_dir: tempfile::TempDir, postgres: Option<(String, String)>) -> TestServer {
        Self::start_configured(data_dir, postgres, |_| {}).await
    }

    /// Starts a node with settings changed by `tweak` (e.g. short bot leases).
    pub async fn start_configured(
        data_dir: tempfile::TempDir,
        postgres: Option<(String, String)>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> TestServer {
        let mut config = NodeConfig::default();
        if let Some((url, schema)) = postgres {
            config.store.backend = beseda::config::StoreBackend::Postgres;
            config.store.postgres_url = Some(url);
            config.store.postgres_schema = Some(schema);
            config.store.pool_size = 4;
        }
        config.server.data_dir = data_dir.path().to_owned();
        config.server.shutdown_grace_seconds = 2;
        // Test receivers of outbound events listen on loopback.
        config.bots.outbound_allow_private_addresses = true;
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().unwrap();
        config.server.public_url = Some(format!("http://{address}"));
        let outbox = config.outbox_dir();
        let (shutdown, signal) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(beseda::app::run(config, listener, async move {
            let _ = signal.await;
        }));
        let server = TestServer {
            base_url: format!("http://{address}"),
            ws_url: format!("ws://{address}/ws"),
            outbox,
            data_dir,
            shutdown: Some(shutdown),
            task: Some(task),
            http: reqwest::Client::new(),
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while server.http.get(format!("{}/rs/health", server.base_url)).send().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    /// A handle on a server running elsewhere (another process), for the
    /// same helpers; `outbox` is where its routing writes mail.
    pub fn remote(base_url: &str, outbox: PathBuf) -> TestServer {
        TestServer {
            base_url: base_url.to_owned(),
            ws_url: format!("{}/ws", base_url.replacen("http://", "ws://", 1)),
            outbox,
            data_dir: tempfile::tempdir().expect("temporary directory"),
            shutdown: None,
            task: None,
            http: reqwest::Client::new(),
        }
    }

    /// Stops the node and returns its data directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, task).await;
        }
        let placeholder = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.data_dir, placeholder)
    }

    /// Any HTTP call; returns status and JSON body (Null when empty).
    pub async fn call(&self, method: &str, path: &str, auth: &Auth, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.base_url));
        request = auth.apply(request);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("http request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        (status, value)
    }

    /// A call that must succeed.
    pub async fn ok(&self, method: &str, path: &str, auth: &Auth, body: Option<Value>) -> Value {
        let (status, value) = self.call(method, path, auth, body).await;
        assert_eq!(status, 200, "{method} {path} failed: {value}");
        value
    }

    /// A call that must fail with this error code; returns the error body.
    pub async fn fails(&self, method: &str, path: &str, auth: &Auth, body: Option<Value>, code: &str) -> Value {
        let (status, value) = self.call(method, path, auth, body).await;
        assert_ne!(status, 200, "{method} {path} should have failed with {code}: {value}");
        assert_eq!(value["error"]["code"], code, "{method} {path}: {value}");
        assert!(!value["error"]["message"].as_str().unwrap_or_default().is_empty());
        value["error"].clone()
    }

    /// The newest e-mail body to `email`.
    pub fn latest_mail(&self, email: &str) -> String {
        beseda_routing::mail::latest_outbox_body(&self.outbox, email).unwrap_or_else(|| panic!("no mail to {email}"))
    }

    /// Registers an application through both steps; returns its credentials.
    pub async fn register(&self, email: &str, name: &str) -> Application {
        self.register_with(json!({"email": email, "applicationName": name, "applicationUserCount": 5})).await
    }

    pub async fn register_with(&self, request: Value) -> Application {
        let sent_to = self.ok("POST", "/api/v1/registration/request", &Auth::None, Some(request.clone())).await;
        let email = sent_to["email"].as_str().unwrap().to_owned();
        let code = code_in(&self.latest_mail(&email));
        let mut complete = request;
        complete["activationCode"] = json!(code);
        let data = self.ok("POST", "/api/v1/registration/complete", &Auth::None, Some(complete)).await;
        Application {
            id: data["applicationId"].as_str().unwrap().to_owned(),
            key: data["applicationKey"].as_str().unwrap().to_owned(),
            email,
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// The first run of eight digits in a mail body.
pub fn code_in(body: &str) -> String {
    body.split(|c: char| !c.is_ascii_alphanumeric())
        .find(|word| word.len() == 8 && word.chars().all(|c| c.is_ascii_digit()))
        .unwrap_or_else(|| panic!("no code in {body}"))
        .to_owned()
}

/// The first 64-hex-digit secret in a mail body.
pub fn key_in(body: &str) -> String {
    body.split(|c: char| !c.is_ascii_alphanumeric())
        .find(|word| word.len() == 64 && word.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no key in {body}"))
        .to_owned()
}

#[derive(Clone, Debug)]
pub struct Application {
    pub id: String,
    pub key: String,
    pub email: String,
}

impl Application {
    pub fn privileged(&self) -> Auth {
        Auth::Application { id: self.id.clone(), key: self.key.clone(), act_as: None }
    }

    pub fn acting_as(&self, user_id: &str) -> Auth {
        Auth::Application { id: self.id.clone(), key: self.key.clone(), act_as: Some(user_id.to_owned()) }
    }

    /// A user token for the infobase user `infobase_id`, as the application server signs it.
    pub fn token(&self, infobase_id: &str, name: &str) -> String {
        sign_token(&self.id, &self.key, infobase_id, name, 600)
    }

    pub fn user(&self, infobase_id: &str, name: &str) -> Auth {
        Auth::Bearer(self.token(infobase_id, name))
    }
}

pub fn sign_token(application_id: &str, key: &str, infobase_id: &str, name: &str, ttl_seconds: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = json!({
        "iss": application_id, "aud": "beseda", "sub": infobase_id, "name": name, "fullName": format!("{name} Full"),
        "iat": now, "exp": now + ttl_seconds,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

#[derive(Clone, Debug)]
pub enum Auth {
    None,
    Bearer(String),
    Application { id: String, key: String, act_as: Option<String> },
}

impl Auth {
    fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::Application { id, key, act_as } => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{key}"));
                let request = request.header("authorization", format!("Basic {encoded}"));
                match act_as {
                    Some(user) => request.header("x-beseda-act-as-user", user),
                    None => request,
                }
            }
        }
    }
}

/// A user known to the server: created by authenticating once.
pub async fn user(server: &TestServer, application: &Application, infobase_id: &str, name: &str) -> (String, Auth) {
    let auth = application.user(infobase_id, name);
    let info = server.ok("GET", "/api/v1/application", &auth, None).await;
    assert_eq!(info["applicationId"], application.id.as_str());
    // The user exists after authentication; find their id.
    let found = server
        .ok("POST", "/api/v1/users/search", &application.privileged(), Some(json!({"infobaseUserId": infobase_id})))
        .await;
    let id = found["users"][0]["id"].as_str().unwrap_or_else(|| panic!("user {name} not found: {found}")).to_owned();
    (id, auth)
}

/// A JSON WebSocket client of the client protocol.
pub struct Client {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_request_id: u64,
    /// Pushes received while waiting for answers.
    pub pushes: std::collections::VecDeque<Value>,
    pub welcome: Value,
}

impl Client {
    /// Connects and says Hello; panics unless welcomed.
    pub async fn connect(server: &TestServer, token: &str) -> Client {
        match Self::try_connect(server, json!({"hello": {"protocolVersion": 1, "token": token}})).await {
            Ok(client) => client,
            Err(error) => panic!("not welcomed: {error}"),
        }
    }

    /// Connects and sends `hello` as the first frame; returns the error frame when refused.
    pub async fn try_connect(server: &TestServer, hello: Value) -> Result<Client, Value> {
        Self::try_connect_url(&server.ws_url, hello).await
    }

    /// Connects to any gateway's WebSocket URL and says Hello.
    pub async fn connect_url(ws_url: &str, token: &str) -> Client {
        match Self::try_connect_url(ws_url, json!({"hello": {"protocolVersion": 1, "token": token}})).await {
            Ok(client) => client,
            Err(error) => panic!("not welcomed: {error}"),
        }
    }

    pub async fn try_connect_url(ws_url: &str, hello: Value) -> Result<Client, Value> {
        let (mut socket, _) = tokio_tungstenite::connect_async(ws_url).await.expect("websocket connect");
        socket.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
        let first = next_json(&mut socket).await.expect("an answer to hello");
        if first.get("welcome").is_some() {
            Ok(Client { socket, next_request_id: 1, pushes: Default::default(), welcome: first["welcome"].clone() })
        } else {
            Err(first)
        }
    }

    pub fn user_id(&self) -> String {
        self.welcome["user"]["id"].as_str().unwrap().to_owned()
    }

    /// Sends a request body (e.g. {"sendMessage": {...}}) and returns the
    /// answer's body, keeping pushes that arrive meanwhile.
    pub async fn request(&mut self, body: Value) -> Value {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let mut frame = body;
        frame["requestId"] = json!(request_id.to_string());
        self.socket.send(WsMessage::Text(frame.to_string().into())).await.unwrap();
        loop {
            let answer = tokio::time::timeout(WAIT, next_json(&mut self.socket))
                .await
                .expect("answer in time")
                .expect("socket open");
            let answered = answer.get("requestId").and_then(|id| id.as_str()).map(|id| id == request_id.to_string());
            if answered == Some(true) {
                return answer;
            }
            self.pushes.push_back(answer);
        }
    }

    /// Sends raw text and returns the next frame.
    pub async fn raw(&mut self, message: WsMessage) -> Option<Value> {
        self.socket.send(message).await.ok()?;
        tokio::time::timeout(WAIT, next_json(&mut self.socket)).await.ok()?
    }

    /// The next push (buffered or from the socket).
    pub async fn next_push(&mut self) -> Value {
        if let Some(push) = self.pushes.pop_front() {
            return push;
        }
        tokio::time::timeout(WAIT, next_json(&mut self.socket)).await.expect("a push in time").expect("socket open")
    }

    /// The first push (buffered or from the socket) for which `extract`
    /// returns something; other pushes stay buffered, in order.
    pub async fn next_matching(&mut self, extract: impl Fn(&Value) -> Option<Value>) -> Value {
        if let Some(position) = self.pushes.iter().position(|push| extract(push).is_some()) {
            let push = self.pushes.remove(position).unwrap();
            return extract(&push).unwrap();
        }
        loop {
            let push = tokio::time::timeout(WAIT, next_json(&mut self.socket))
                .await
                .expect("a push in time")
                .expect("socket open");
            if let Some(found) = extract(&push) {
                return found;
            }
            self.pushes.push_back(push);
        }
    }

    /// The next conversation event push.
    pub async fn next_event(&mut self) -> Value {
        self.next_matching(|push| push.get("event").cloned()).await
    }

    /// The next user event push of the given kind ("notification", "unreadCount", ...).
    pub async fn next_user_event(&mut self, kind: &str) -> Value {
        self.next_matching(|push| push.get("userEvent").and_then(|event| event.get(kind)).cloned()).await
    }

    /// Asserts nothing of `kind` arrives within a short while.
    pub async fn expect_no_user_event(&mut self, kind: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while let Some(push) = self.pushes.pop_front() {
            assert!(push.get("userEvent").and_then(|event| event.get(kind)).is_none(), "unexpected {kind}: {push}");
        }
        while let Ok(Some(push)) = tokio::time::timeout_at(deadline, next_json(&mut self.socket)).await {
            assert!(push.get("userEvent").and_then(|event| event.get(kind)).is_none(), "unexpected {kind}: {push}");
        }
    }

    /// The next frame of any kind, or None when the server closed the socket
    /// (or nothing came within `within`).
    pub async fn next_frame_within(&mut self, within: Duration) -> Option<Value> {
        if let Some(push) = self.pushes.pop_front() {
            return Some(push);
        }
        tokio::time::timeout(within, next_json(&mut self.socket)).await.ok().flatten()
    }

    /// Waits (at most [`WAIT`]) for the server to close the socket; keeps
    /// data frames meanwhile in `pushes` and answers the close code and
    /// reason, or None when the socket ended without a Close frame.
    pub async fn closed_by_server(&mut self) -> Option<(u16, String)> {
        let read = async {
            loop {
                match self.socket.next().await? {
                    Ok(WsMessage::Close(frame)) => {
                        return frame.map(|frame| (u16::from(frame.code), frame.reason.to_string()));
                    }
                    Ok(WsMessage::Text(text)) => {
                        self.pushes.push_back(serde_json::from_str(text.as_str()).expect("server sends JSON"))
                    }
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        };
        tokio::time::timeout(WAIT, read).await.expect("the server closes the socket in time")
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

async fn next_json(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) -> Option<Value> {
    loop {
        match socket.next().await? {
            Ok(WsMessage::Text(text)) => return Some(serde_json::from_str(text.as_str()).expect("server sends JSON")),
            Ok(WsMessage::Binary(bytes)) => {
                return Some(json!({"binary": base64::engine::general_purpose::STANDARD.encode(bytes)}));
            }
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Creates a one-on-one conversation of `a` and `b` as the application.
pub async fn one_on_one(server: &TestServer, application: &Application, a: &str, b: &str) -> String {
    let created = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &application.privileged(),
            Some(json!({"conversation": {"group": false, "memberIds": [a, b]}})),
        )
        .await;
    created["id"].as_str().unwrap().to_owned()
}

/// Creates a group conversation as the application, with these members.
pub async fn group(server: &TestServer, application: &Application, title: &str, members: &[&str]) -> String {
    let created = server
        .ok(
            "POST",
            "/api/v1/conversations",
            &application.privileged(),
            Some(json!({"conversation": {"title": title, "group": true, "memberIds": members}})),
        )
        .await;
    created["id"].as_str().unwrap().to_owned()
}

/// The most common starting point: an application with Alice and Bob in a
/// group conversation "Team".
pub struct Team {
    pub server: TestServer,
    pub application: Application,
    pub alice_id: String,
    pub alice: Auth,
    pub bob_id: String,
    pub bob: Auth,
    pub conversation_id: String,
}

impl Team {
    pub async fn start() -> Team {
        let server = TestServer::start().await;
        let application = server.register("owner@example.com", "Sales").await;
        let (alice_id, alice) = user(&server, &application, "a1", "Alice").await;
        let (bob_id, bob) = user(&server, &application, "b1", "Bob").await;
        let conversation_id = group(&server, &application, "Team", &[&alice_id, &bob_id]).await;
        Team { server, application, alice_id, alice, bob_id, bob, conversation_id }
    }
}
