//! Authentication. Two credentials exist (docs/auth.md):
//!
//! - the application's id and key (issued at registration): privileged mode,
//!   optionally acting as one of its users;
//! - a user token: a JWT (HS256) that the application server signs with its
//!   key, so it authenticates its users without a round trip to Beseda. The
//!   token's `iss` names the application and only that application's key
//!   verifies it, so a leaked token reaches exactly one user of one
//!   application, for at most its short lifetime.

use base64::Engine;
use beseda_core::limits::MAX_USER_TOKEN_LIFETIME_SECONDS;
use beseda_core::model::{Application, ApplicationState, User, UserKind};
use beseda_core::{Error, ErrorCode, Result, rules};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::{Caller, RoutingService};

/// The audience every user token must name.
pub const TOKEN_AUDIENCE: &str = "beseda";

/// Claims of a user token.
#[derive(Debug, Deserialize)]
pub struct UserTokenClaims {
    /// The application id.
    pub iss: String,
    /// The infobase user's UUID.
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    /// The user's name (ИмяПользователя); refreshed at each authentication.
    pub name: String,
    #[serde(default, rename = "fullName")]
    pub full_name: String,
}

#[derive(Deserialize)]
struct IssuerOnly {
    iss: Option<String>,
}

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const TOKEN_LEEWAY_SECONDS: u64 = 30;

fn token_invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::TokenInvalid, message)
}

#[derive(Deserialize)]
struct AlgorithmOnly {
    alg: Option<serde_json::Value>,
}

/// Refuses any algorithm but HS256 before the JWT library reads the header:
/// its own message for `none` or `RS256` lists algorithms this server
/// refuses anyway.
fn require_hs256(token: &str) -> Result<()> {
    let header = token.split('.').next().unwrap_or_default();
    let algorithm = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<AlgorithmOnly>(&bytes).ok())
        .ok_or_else(|| token_invalid("the user token's header is not base64url JSON"))?
        .alg;
    match algorithm {
        Some(serde_json::Value::String(alg)) if alg == "HS256" => Ok(()),
        _ => Err(token_invalid("the user token's `alg` must be HS256; only HS256 is accepted")),
    }
}

/// The typed error for a failed verification. The library's own text is
/// never echoed: it names internals (serde variants, algorithm lists).
fn token_error(kind: &jsonwebtoken::errors::ErrorKind) -> Error {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::ExpiredSignature => Error::new(ErrorCode::TokenExpired, "the user token has expired"),
        ErrorKind::ImmatureSignature => token_invalid(format!(
            "the user token is not valid yet: its `nbf` is more than {TOKEN_LEEWAY_SECONDS} seconds in the future; \
             check the application server's clock"
        ))
        .with_field("nbf"),
        ErrorKind::InvalidSignature => {
            token_invalid("the user token's signature does not verify with the application's key")
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
            token_invalid("the user token's `alg` must be HS256; only HS256 is accepted")
        }
        ErrorKind::InvalidAudience => {
            token_invalid(format!("the user token's `aud` must be \"{TOKEN_AUDIENCE}\"")).with_field("aud")
        }
        ErrorKind::InvalidIssuer => token_invalid("the user token's `iss` is not the application id").with_field("iss"),
        ErrorKind::MissingRequiredClaim(claim) => {
            // One of the claims this module lists as required, not client text.
            token_invalid(format!("the user token has no `{claim}` claim")).with_field(claim.clone())
        }
        ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => token_invalid(
            "the user token's claims are malformed: `iss`, `aud`, `sub`, `name` and `fullName` are strings, \
             `iat`, `exp` and `nbf` numbers of seconds, and `name` is required",
        ),
        _ => token_invalid("the user token is not a well-formed JWT (header.payload.signature, base64url)"),
    }
}

/// Reads `iss` without verifying, only to pick the key that must verify it.
fn unverified_issuer(token: &str) -> Result<String> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| token_invalid("the user token is not a JWT (header.payload.signature)"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| token_invalid("the user token's payload is not base64url"))?;
    let claims: IssuerOnly =
        serde_json::from_slice(&bytes).map_err(|_| token_invalid("the user token's payload is not a JSON object"))?;
    claims
        .iss
        .filter(|iss| !iss.is_empty())
        .ok_or_else(|| token_invalid("the user token has no `iss` (application id)"))
}

impl RoutingService {
    /// Loads an application that may be used for messaging.
    pub(crate) async fn registered_application(&self, application_id: &str) -> Result<Application> {
        let application = self.store.get_application(application_id).await?.ok_or_else(|| {
            Error::new(
                ErrorCode::ApplicationNotRegistered,
                format!("application `{application_id}` is not registered on this server"),
            )
        })?;
        match application.state {
            ApplicationState::Registered => Ok(application),
            ApplicationState::Unregistered => Err(Error::new(
                ErrorCode::ApplicationNotRegistered,
                format!("application `{application_id}` was unregistered; register it again to restore its history"),
            )),
            ApplicationState::Disconnected => Err(Error::new(
                ErrorCode::ApplicationDisconnected,
                format!("application `{application_id}` was disconnected irrevocably"),
            )),
        }
    }

    /// Verifies application credentials: privileged mode.
    pub async fn authenticate_application(
        &self,
        application_id: &str,
        application_key: &str,
        act_as_user_id: Option<&str>,
    ) -> Result<(Caller, Option<User>)> {
        let application = self.registered_application(application_id).await?;
        let expected = application.key.as_deref().unwrap_or_default();
        if expected.is_empty() || !bool::from(expected.as_bytes().ct_eq(application_key.as_bytes())) {
            return Err(Error::new(
                ErrorCode::Unauthenticated,
                "the application key does not match; use the key issued at the latest registration",
            ));
        }
        let user = match act_as_user_id {
            Some(user_id) => {
                let user = self.store.get_user(application_id, user_id).await?.ok_or_else(|| {
                    crate::not_found(ErrorCode::UserNotFound, "user", user_id).with_field("actAsUserId")
                })?;
                if user.blocked {
                    return Err(Error::new(ErrorCode::UserBlocked, format!("user `{user_id}` is blocked")));
                }
                Some(user)
            }
            None => None,
        };
        let caller = Caller {
            application_id: application.id,
            user_id: user.as_ref().map(|user| user.id.clone()),
            privileged: true,
        };
        Ok((caller, user))
    }

    /// Verifies a user token; creates the regular user at first
    /// authentication and refreshes their names at each one. Also returns
    /// the token's `exp` (seconds since the epoch): a WebSocket connection
    /// authenticated by it ends then.
    pub async fn authenticate_user_token(&self, token: &str) -> Result<(Caller, User, i64)> {
        let application_id = unverified_issuer(token)?;
        require_hs256(token)?;
        let application = self.registered_application(&application_id).await?;
        let key = application.key.as_deref().unwrap_or_default();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[TOKEN_AUDIENCE]);
        validation.set_issuer(&[application_id.as_str()]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = TOKEN_LEEWAY_SECONDS;
        let claims =
            jsonwebtoken::decode::<UserTokenClaims>(token, &DecodingKey::from_secret(key.as_bytes()), &validation)
                .map_err(|error| token_error(error.kind()))?
                .claims;
        let now_seconds = beseda_core::model::now_micros() / 1_000_000;
        if claims.iat > now_seconds + 60 {
            return Err(token_invalid(
                "the user token was issued in the future (iat); check the application server's clock",
            )
            .with_field("iat"));
        }
        if claims.exp.saturating_sub(claims.iat) > MAX_USER_TOKEN_LIFETIME_SECONDS {
            return Err(token_invalid(
                "the user token lives longer than 24 hours (exp - iat); issue short-lived tokens",
            )
            .with_field("exp"));
        }
        if claims.sub.trim().is_empty() {
            return Err(token_invalid("the user token's `sub` (infobase user id) is empty").with_field("sub"));
        }
        if claims.name.trim().is_empty() {
            return Err(token_invalid("the user token's `name` claim is empty").with_field("name"));
        }
        // A claim over a limit is the token's fault (401), not a request
        // value's (400): the client cannot fix it, the token's issuer must.
        for (claim, value) in [("name", &claims.name), ("fullName", &claims.full_name)] {
            rules::bounded_text(claim, value, beseda_core::limits::MAX_NAME_CHARS).map_err(|error| {
                token_invalid(format!("the user token's claim {}", error.message)).with_field(claim)
            })?;
        }
        let user = self.refresh_or_create_regular_user(&application.id, &claims).await?;
        if user.blocked {
            return Err(Error::new(
                ErrorCode::UserBlocked,
                format!("user `{}` is blocked and cannot connect", user.name),
            ));
        }
        let caller = Caller { application_id: application.id, user_id: Some(user.id.clone()), privileged: false };
        Ok((caller, user, claims.exp))
    }

    async fn refresh_or_create_regular_user(&self, application_id: &str, claims: &UserTokenClaims) -> Result<User> {
        if let Some(mut user) = self.store.get_user_by_infobase_id(application_id, &claims.sub).await? {
            if user.name != claims.name || user.full_name != claims.full_name {
                user.name = claims.name.clone();
                user.full_name = claims.full_name.clone();
                self.store.update_user(application_id, &user).await?;
            }
            return Ok(user);
        }
        let mut user = User::new(UserKind::Regular, claims.name.clone());
        user.full_name = claims.full_name.clone();
        user.infobase_user_id = Some(claims.sub.clone());
        match self.store.insert_user(application_id, &user).await {
            Ok(()) => Ok(user),
            // Two first connections of one user raced; the other one created it.
            Err(error) if error.code == ErrorCode::UserExists => self
                .store
                .get_user_by_infobase_id(application_id, &claims.sub)
                .await?
                .ok_or_else(|| Error::internal("user vanished after a concurrent first authentication")),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_is_read_from_a_well_formed_token_only() {
        assert_eq!(unverified_issuer("e30.eyJpc3MiOiJhcHAifQ.sig").unwrap(), "app");
        assert_eq!(unverified_issuer("garbage").unwrap_err().code, ErrorCode::TokenInvalid);
        assert_eq!(unverified_issuer("e30.e30.sig").unwrap_err().code, ErrorCode::TokenInvalid);
        assert_eq!(unverified_issuer("e30.!!!.sig").unwrap_err().code, ErrorCode::TokenInvalid);
    }
}
