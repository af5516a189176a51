//! The two HTTP doors of the bots service at the edge:
//!
//! - `GET /bots/v1/processing` (WebSocket): the processing connection of
//!   standard #798. Authenticated with the application's credentials
//!   before the upgrade; frames are `ProcessingClientFrame` /
//!   `ProcessingServerFrame` (beseda/v1/bots.proto) in canonical JSON text,
//!   or protobuf in binary frames (answered in the encoding of the client's
//!   latest frame).
//! - `POST /webhooks/{token}`: an integration's connection point (§29.5.4).
//!   The token is the credential; the answer is the status and text the
//!   bots service decides, even for a body over the limit, which the bots
//!   service answers by the integration's settings (404, 413 or 500).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use beseda_core::limits::MAX_FRAME_BYTES;
use beseda_core::{Error, ErrorCode, Result};
use beseda_proto::v1 as wire;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;

use crate::Gateway;
use crate::http_error::error_response;

pub fn router(gateway: Gateway) -> axum::Router {
    axum::Router::new()
        .route("/bots/v1/processing", axum::routing::get(processing))
        .route("/webhooks/{token}", axum::routing::post(webhook))
        .layer(axum::extract::DefaultBodyLimit::max(beseda_bots::webhook::MAX_WEBHOOK_BODY_BYTES))
        .with_state(gateway)
}

async fn processing(State(gateway): State<Gateway>, headers: HeaderMap, upgrade: WebSocketUpgrade) -> Response {
    let credentials = match crate::auth::credentials_from_headers(&headers) {
        Ok(Some(credentials)) => credentials,
        Ok(None) => {
            return error_response(&Error::new(
                ErrorCode::Unauthenticated,
                "the processing connection needs the application's credentials: `Authorization: Application <id>:<key>` (or Basic)",
            ));
        }
        Err(error) => return error_response(&error),
    };
    let caller = match crate::auth::authenticate(&gateway.routing, credentials).await {
        Ok((caller, _)) => caller,
        Err(error) => return error_response(&error),
    };
    if let Err(error) = caller.require_privileged("the bot processing connection (ExecuteBotProcessing)") {
        return error_response(&error);
    }
    upgrade
        .read_buffer_size(crate::READ_BUFFER_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| serve(gateway, caller, socket))
}

fn decode(message: WsMessage, binary: &AtomicBool) -> Option<Result<wire::ProcessingClientFrame>> {
    match message {
        WsMessage::Text(text) => {
            binary.store(false, Ordering::Relaxed);
            Some(serde_json::from_str(text.as_str()).map_err(|error| {
                Error::new(
                    ErrorCode::MalformedRequest,
                    format!("the text frame is not a ProcessingClientFrame in JSON: {error}"),
                )
            }))
        }
        WsMessage::Binary(bytes) => {
            binary.store(true, Ordering::Relaxed);
            Some(wire::ProcessingClientFrame::decode(bytes.as_ref()).map_err(|error| {
                Error::new(
                    ErrorCode::MalformedRequest,
                    format!("the binary frame is not a protobuf ProcessingClientFrame: {error}"),
                )
            }))
        }
        _ => None,
    }
}

fn encode(frame: &wire::ProcessingServerFrame, binary: bool) -> WsMessage {
    if binary {
        return WsMessage::Binary(frame.encode_to_vec().into());
    }
    match serde_json::to_string(frame) {
        Ok(text) => WsMessage::Text(text.into()),
        Err(error) => {
            tracing::error!(%error, "cannot encode a processing frame");
            WsMessage::Text(r#"{"error":{"code":"internal","message":"cannot encode a frame"}}"#.into())
        }
    }
}

async fn serve(gateway: Gateway, caller: beseda_routing::Caller, socket: WebSocket) {
    let (mut sink, stream) = socket.split();
    let binary = Arc::new(AtomicBool::new(false));
    let reading = binary.clone();
    // Client frames until the client closes; control frames are skipped.
    let inbound = stream
        .take_while(|message| std::future::ready(!matches!(message, Ok(WsMessage::Close(_)) | Err(_))))
        .filter_map(move |message| std::future::ready(message.ok().and_then(|message| decode(message, &reading))))
        .boxed();
    let mut outbound = gateway.processing.open(caller, inbound);
    let mut close_reason = None;
    while let Some(frame) = outbound.next().await {
        if let Some(wire::processing_server_frame::Frame::Closed(closed)) = &frame.frame {
            close_reason = Some(closed.code.clone());
        }
        if sink.send(encode(&frame, binary.load(Ordering::Relaxed))).await.is_err() {
            return;
        }
    }
    let close = CloseFrame { code: 1000, reason: close_reason.unwrap_or_else(|| "closed".into()).into() };
    let _ = sink.send(WsMessage::Close(Some(close))).await;
}

async fn webhook(
    State(gateway): State<Gateway>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let (body, body_too_large) = match body {
        Ok(body) => (body.to_vec(), false),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => (Vec::new(), true),
        Err(rejection) => {
            return error_response(&Error::new(
                ErrorCode::MalformedRequest,
                format!("the request body cannot be read: {}", rejection.body_text()),
            ));
        }
    };
    let signature = headers
        .get(beseda_bots::signature::SIGNATURE_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let request = wire::WebhookRequest { token, body, signature, body_too_large };
    let answer = match gateway.bots.receive_webhook(tonic::Request::new(request)).await {
        Ok(answer) => answer.into_inner(),
        Err(status) => return error_response(&beseda_routing::status::from_status(&status)),
    };
    let status = u16::try_from(answer.status)
        .ok()
        .and_then(|status| StatusCode::from_u16(status).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The HTTP layer's failure, answered like every other one (docs/errors.md).
        let mut response = error_response(&Error::new(ErrorCode::MalformedRequest, answer.text));
        *response.status_mut() = status;
        return response;
    }
    let content_type = if answer.text.starts_with('{') { "application/json" } else { "text/plain; charset=utf-8" };
    let mut response = (status, answer.text).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
