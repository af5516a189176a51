//! Turns HTTP credentials into a routing [`Caller`] by asking routing's
//! `Authenticate`. Accepted forms (docs/auth.md):
//!
//! - `Authorization: Bearer <user token>`: a user, signed by the application;
//! - `Authorization: Basic base64(<application id>:<application key>)` or
//!   `Authorization: Application <application id>:<application key>`:
//!   the application itself (privileged mode), optionally acting as the user
//!   named by `X-Beseda-Act-As-User`.

use std::sync::Arc;

use axum::http::HeaderMap;
use base64::Engine;
use beseda_core::{Error, ErrorCode, Result};
use beseda_proto::v1 as wire;
use beseda_proto::v1::routing_server::Routing;
use beseda_routing::{Caller, status};

pub const ACT_AS_HEADER: &str = "x-beseda-act-as-user";

/// Credentials found in request headers, before verification.
pub fn credentials_from_headers(headers: &HeaderMap) -> Result<Option<wire::AuthenticateRequest>> {
    use wire::authenticate_request::Credentials;
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value =
        value.to_str().map_err(|_| Error::new(ErrorCode::Unauthenticated, "the Authorization header is not ASCII"))?;
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let act_as = headers.get(ACT_AS_HEADER).and_then(|value| value.to_str().ok()).unwrap_or_default().trim().to_owned();
    let application = |pair: &str| -> Result<Credentials> {
        let (application_id, application_key) = pair.split_once(':').ok_or_else(|| {
            Error::new(
                ErrorCode::Unauthenticated,
                "application credentials must be `<application id>:<application key>`",
            )
        })?;
        Ok(Credentials::Application(wire::ApplicationCredentials {
            application_id: application_id.to_owned(),
            application_key: application_key.to_owned(),
            act_as_user_id: act_as.clone(),
        }))
    };
    let credentials = match scheme.to_ascii_lowercase().as_str() {
        "bearer" => Credentials::UserToken(rest.trim().to_owned()),
        "application" => application(rest.trim())?,
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| {
                    Error::new(ErrorCode::Unauthenticated, "the Basic credentials are not valid base64 UTF-8")
                })?;
            application(&decoded)?
        }
        other => {
            return Err(Error::new(
                ErrorCode::Unauthenticated,
                format!("unsupported authorization scheme `{other}`; use Bearer (user token), Basic or Application"),
            ));
        }
    };
    Ok(Some(wire::AuthenticateRequest { credentials: Some(credentials) }))
}

/// Verifies credentials through routing.
pub async fn authenticate(
    routing: &Arc<dyn Routing>,
    request: wire::AuthenticateRequest,
) -> Result<(Caller, Option<wire::User>)> {
    authenticate_with_expiry(routing, request).await.map(|(caller, user, _)| (caller, user))
}

/// Like [`authenticate`], also returning when a user token expires (`exp`,
/// seconds since the epoch): a WebSocket connection ends then.
pub async fn authenticate_with_expiry(
    routing: &Arc<dyn Routing>,
    request: wire::AuthenticateRequest,
) -> Result<(Caller, Option<wire::User>, Option<i64>)> {
    let authenticated = routing
        .authenticate(tonic::Request::new(request))
        .await
        .map_err(|status| status::from_status(&status))?
        .into_inner();
    let caller = authenticated.caller.ok_or_else(|| Error::internal("authentication answered without a caller"))?;
    let expires_at = authenticated.token_expires_at.map(|at| at.seconds);
    Ok((Caller::from_wire(caller)?, authenticated.user, expires_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::authenticate_request::Credentials;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn basic_credentials_are_application_credentials_with_act_as() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("app-1:secret");
        let found = credentials_from_headers(&headers(&[
            ("authorization", &format!("Basic {encoded}")),
            (ACT_AS_HEADER, "user-7"),
        ]))
        .unwrap()
        .unwrap();
        match found.credentials.unwrap() {
            Credentials::Application(credentials) => {
                assert_eq!(credentials.application_id, "app-1");
                assert_eq!(credentials.application_key, "secret");
                assert_eq!(credentials.act_as_user_id, "user-7");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_schemes_and_garbage_are_rejected_with_advice() {
        let error = credentials_from_headers(&headers(&[("authorization", "Digest abc")])).unwrap_err();
        assert_eq!(error.code, ErrorCode::Unauthenticated);
        assert!(error.message.contains("Bearer"));
        assert!(credentials_from_headers(&headers(&[("authorization", "Basic !!!")])).is_err());
        assert!(credentials_from_headers(&headers(&[("authorization", "Application no-colon")])).is_err());
        assert!(credentials_from_headers(&HeaderMap::new()).unwrap().is_none());
    }
}
