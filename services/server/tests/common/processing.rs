//! A client of the bot processing connection (`/bots/v1/processing`), as an
//! application server speaks it: JSON frames over WebSocket.

use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{Application, TestServer, WAIT};

pub struct Processing {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    /// The bots listed by the latest lease.
    pub bots: Vec<Value>,
}

impl Processing {
    /// Opens the connection and calls ExecuteBotProcessing with these predefined bots.
    pub async fn connect(server: &TestServer, application: &Application, predefined: Value) -> Processing {
        let url = format!("{}/bots/v1/processing", server.base_url.replacen("http", "ws", 1));
        let mut request = url.into_client_request().unwrap();
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", application.id, application.key));
        request.headers_mut().insert("authorization", format!("Basic {credentials}").parse().unwrap());
        let (socket, _) = tokio_tungstenite::connect_async(request).await.expect("processing connection");
        let mut processing = Processing { socket, bots: Vec::new() };
        processing.execute(predefined).await;
        processing
    }

    /// ExecuteBotProcessing; returns the lease.
    pub async fn execute(&mut self, predefined: Value) -> Value {
        self.send(json!({"execute": {"predefinedBots": predefined}})).await;
        loop {
            let frame = self.next_frame().await.expect("a lease");
            if let Some(lease) = frame.get("lease") {
                self.bots = lease["bots"].as_array().cloned().unwrap_or_default();
                return lease.clone();
            }
            assert!(frame.get("event").is_some(), "expected a lease, got {frame}");
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.socket.send(WsMessage::Text(frame.to_string().into())).await.expect("send a frame");
    }

    /// The next frame, or None when the server closed the connection.
    pub async fn next_frame(&mut self) -> Option<Value> {
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next()).await.expect("a frame in time")?;
            match message {
                Ok(WsMessage::Text(text)) => return Some(serde_json::from_str(text.as_str()).unwrap()),
                Ok(WsMessage::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// The next bot event; panics on anything else but leases.
    pub async fn next_event(&mut self) -> Value {
        loop {
            let frame = self.next_frame().await.expect("connection open");
            if let Some(event) = frame.get("event") {
                return event.clone();
            }
            assert!(frame.get("lease").is_some(), "expected an event, got {frame}");
        }
    }

    /// The next event of kind MESSAGE, acknowledging the others on the way.
    pub async fn next_message_event(&mut self) -> Value {
        loop {
            let event = self.next_event().await;
            if event["kind"] == "BOT_EVENT_KIND_MESSAGE" {
                return event;
            }
            self.ack(&event).await;
        }
    }

    /// Reads until the server closes the connection with a `closed` frame; returns it.
    pub async fn closed(&mut self) -> Value {
        loop {
            let frame = self.next_frame().await.expect("a closing frame");
            if let Some(closed) = frame.get("closed") {
                return closed.clone();
            }
        }
    }

    /// Asserts that no event comes within `within`.
    pub async fn expect_no_event(&mut self, within: Duration) {
        if let Ok(Some(Ok(WsMessage::Text(text)))) = tokio::time::timeout(within, self.socket.next()).await {
            let frame: Value = serde_json::from_str(text.as_str()).unwrap();
            assert!(frame.get("event").is_none(), "unexpected event {frame}");
        }
    }

    pub async fn ack(&mut self, event: &Value) {
        self.send(json!({"ack": {"deliveryId": event["deliveryId"]}})).await;
    }

    pub async fn nack(&mut self, event: &Value, error: &str) {
        self.send(json!({"nack": {"deliveryId": event["deliveryId"], "error": error}})).await;
    }

    /// Drops the TCP connection without a close handshake, like a killed process.
    pub fn kill(self) {
        drop(self.socket);
    }

    pub fn bot_user(&self, bot_type: &str) -> String {
        self.bots
            .iter()
            .find(|bot| bot["botType"] == bot_type)
            .and_then(|bot| bot["userId"].as_str())
            .unwrap_or_else(|| panic!("no bot of type {bot_type} in {:?}", self.bots))
            .to_owned()
    }
}
