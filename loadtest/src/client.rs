//! A client of the WebSocket protocol (docs/protocol.md) in protobuf binary
//! frames: Hello, Subscribe, SendMessage, and the pushed events. The socket
//! is opened from a chosen source address so that one machine can hold more
//! connections than one address has ports.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use beseda_proto::v1 as wire;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::sources::Target;

pub type Socket = WebSocketStream<TcpStream>;
pub type Writer = SplitSink<Socket, WsMessage>;
pub type Reader = SplitStream<Socket>;

/// The text of a load message: who sent it, its number, when (µs since the epoch).
pub fn payload(sender: u32, seq: u64, sent_micros: i64) -> String {
    format!("lt:{sender}:{seq}:{sent_micros}")
}

/// Reads a load message's text back.
pub fn parse_payload(text: &str) -> Option<(u32, u64, i64)> {
    let mut parts = text.strip_prefix("lt:")?.split(':');
    let sender = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let sent = parts.next()?.parse().ok()?;
    Some((sender, seq, sent))
}

pub fn now_micros() -> i64 {
    let elapsed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX)
}

/// Opens a TCP connection from `source` (any port) to the target and does
/// the WebSocket handshake on `path`.
pub async fn open(source: Option<IpAddr>, target: &Target, url: &str, timeout: Duration) -> anyhow::Result<Socket> {
    let connect = async {
        let socket = match target.address {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(source) = source {
            socket.bind(SocketAddr::new(source, 0)).with_context(|| format!("cannot bind {source}"))?;
        }
        socket.set_nodelay(true)?;
        let stream = socket.connect(target.address).await.with_context(|| format!("connect {}", target.address))?;
        // tungstenite zero-fills its whole read buffer on every read; the
        // default 128 KiB would make the load generator its own bottleneck.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
        let (socket, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .context("WebSocket handshake")?;
        anyhow::Ok(socket)
    };
    tokio::time::timeout(timeout, connect).await.context("connect timed out")?
}

pub fn frame(request_id: u64, body: wire::client_frame::Body) -> WsMessage {
    WsMessage::Binary(wire::ClientFrame { request_id, body: Some(body) }.encode_to_vec().into())
}

pub fn decode(message: &WsMessage) -> Option<wire::ServerFrame> {
    match message {
        WsMessage::Binary(bytes) => wire::ServerFrame::decode(bytes.as_ref()).ok(),
        _ => None,
    }
}

/// Connects and says Hello; returns the socket once welcomed.
pub async fn connect_user(
    source: Option<IpAddr>,
    target: &Target,
    token: &str,
    timeout: Duration,
) -> anyhow::Result<Socket> {
    let mut socket = open(source, target, &target.ws_url, timeout).await?;
    let hello = wire::Hello {
        protocol_version: beseda_proto::MAX_PROTOCOL_VERSION,
        token: token.to_owned(),
        client_name: "beseda-loadtest".into(),
    };
    socket.send(frame(1, wire::client_frame::Body::Hello(hello))).await?;
    let answer = next_frame(&mut socket, timeout).await?;
    match answer.body {
        Some(wire::server_frame::Body::Welcome(_)) => Ok(socket),
        Some(wire::server_frame::Body::Error(error)) => bail!("hello refused: {}: {}", error.code, error.message),
        other => bail!("unexpected answer to hello: {other:?}"),
    }
}

/// The next protobuf frame (skipping control frames).
pub async fn next_frame(socket: &mut Socket, timeout: Duration) -> anyhow::Result<wire::ServerFrame> {
    loop {
        let message = tokio::time::timeout(timeout, socket.next())
            .await
            .context("no answer in time")?
            .context("connection closed")??;
        if let Some(frame) = decode(&message) {
            return Ok(frame);
        }
        if let WsMessage::Close(close) = message {
            bail!("closed by the server: {close:?}");
        }
    }
}

/// Subscribes to a conversation and waits for the answer.
pub async fn subscribe(socket: &mut Socket, conversation_id: &str, timeout: Duration) -> anyhow::Result<()> {
    let subscribe = wire::Subscribe {
        conversation: Some(wire::ConversationRef {
            by: Some(wire::conversation_ref::By::Id(conversation_id.to_owned())),
        }),
        after_seq: 0,
    };
    socket.send(frame(2, wire::client_frame::Body::Subscribe(subscribe))).await?;
    loop {
        let answer = next_frame(socket, timeout).await?;
        match answer.body {
            Some(wire::server_frame::Body::Subscribed(_)) => return Ok(()),
            Some(wire::server_frame::Body::Error(error)) => {
                bail!("subscribe refused: {}: {}", error.code, error.message)
            }
            _ => continue,
        }
    }
}

pub fn send_message(request_id: u64, conversation_id: &str, text: String) -> WsMessage {
    frame(
        request_id,
        wire::client_frame::Body::SendMessage(wire::SendMessageRequest {
            conversation: Some(wire::ConversationRef {
                by: Some(wire::conversation_ref::By::Id(conversation_id.to_owned())),
            }),
            text,
            ..Default::default()
        }),
    )
}

/// The text of a new message pushed to a subscriber, if the frame is one.
pub fn created_text(frame: &wire::ServerFrame) -> Option<&str> {
    match &frame.body {
        Some(wire::server_frame::Body::Event(event)) => match &event.kind {
            Some(wire::conversation_event::Kind::MessageCreated(message)) => Some(message.text.as_str()),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_other_texts_are_not_payloads() {
        assert_eq!(parse_payload(&payload(7, 42, 1_700_000_000_000_000)), Some((7, 42, 1_700_000_000_000_000)));
        assert_eq!(parse_payload("hello"), None);
        assert_eq!(parse_payload("lt:x:1:2"), None);
    }
}
