//! Errors on the HTTP API: the status from the error's class, the stable code
//! in the body and in `X-Beseda-Error-Code`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use beseda_core::Error;

/// The JSON body of every error answer:
/// `{"error": {"code": "text_too_long", "message": "...", "field": "text"}}`.
pub fn error_response(error: &Error) -> Response {
    let status = StatusCode::from_u16(error.code.class().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = serde_json::json!({
        "error": { "code": error.code.as_str(), "message": error.message }
    });
    if let Some(field) = &error.field {
        body["error"]["field"] = serde_json::Value::String(field.clone());
    }
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert("x-beseda-error-code", HeaderValue::from_static(error.code.as_str()));
    response
}

/// Serde's message for a body that does not parse, made actionable.
pub fn malformed(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::new(beseda_core::ErrorCode::MalformedRequest, format!("the {what} is not a valid request: {detail}"))
}
