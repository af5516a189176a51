//! Inbound webhooks of integrations (§29.5.4): an external system POSTs
//! `{"<command>": {params}}` to the integration's connection point URL
//! (НавигационнаяСсылкаТочкиПодключения) and the server creates or changes
//! users, conversations and messages on its behalf.
//!
//! The request is answered with one of the documented codes: 200 with a
//! small JSON body naming the ids involved, 400 for a request that is wrong
//! in itself (the text names the field), 401 for a missing or wrong
//! signature, 404 "No active integration", 409 for a create… of an existing
//! object (and a replayed createMessage), 413 for a body over 1 MB, 500 with
//! the error text for a valid request that cannot be carried out. The rule
//! between 400 and 500 is one: 400 when the request alone shows it can never
//! succeed (form, fields, limits), 500 when it depends on what is stored
//! (something named does not exist, a rule about stored objects). An
//! integration with `strict_status_codes` answers only the 1C contract's
//! 200, 404, 409 and 500: see [`status_for`].
//!
//! Everything here acts through the routing service in privileged mode, so a
//! webhook obeys every rule a 1C application obeys. The mappings from
//! external ids to collaboration objects live in the store
//! ([`beseda_store::BotStore`]); each create… first does its work through
//! routing (idempotently) and then records the mapping, so a request that
//! stopped half-way is completed by its retry instead of duplicated.
//!
//! Parsing, validation, HTML sanitising, the data mapping and signature
//! checking are pure functions ([`parse`], [`sanitize_html`],
//! [`message_data`], [`check_signature`]) and are tested without a server;
//! docs/webhooks.md describes the contract for integrators.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::panic::AssertUnwindSafe;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use beseda_core::bots::{Integration, IntegrationConversation};
use beseda_core::limits::{MAX_DATA_BYTES, MAX_KEY_CHARS, MAX_NAME_CHARS, MAX_PAGE_SIZE, MAX_TEXT_CHARS};
use beseda_core::model::UserKind;
use beseda_core::{Error, ErrorClass, ErrorCode};
use beseda_proto::v1 as wire;
use beseda_proto::v1::routing_server::Routing;
use beseda_routing::Caller;
use beseda_routing::status::from_status;
use beseda_store::{Store, UserQuery};
use futures_util::FutureExt;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::BotsService;

mod command;
mod content;
mod ids;
mod session;
mod signature;
#[cfg(test)]
mod tests;

pub use command::*;
pub use content::*;
pub use ids::*;
use session::Session;
pub use signature::*;

/// The one external system type this server implements (ТипВнешнейСистемы).
pub const WEBHOOK: &str = "webhook";

pub use crate::signature::SIGNATURE_HEADER;

/// The text of every 404: the documented contract has no other.
pub const NO_ACTIVE_INTEGRATION: &str = "No active integration";

/// The commands, in the order of the 1C documentation's list.
pub const COMMANDS: &[&str] =
    &["createConversation", "createMessage", "createUser", "updateConversation", "updateMessage", "updateUser"];

/// HTML elements kept in `text/html` texts; everything else is removed.
pub const ALLOWED_ELEMENTS: &[&str] =
    &["a", "b", "big", "font", "i", "li", "ol", "s", "small", "span", "strike", "strong", "u", "ul"];

/// Properties kept in `style` attributes; everything else is removed.
pub const ALLOWED_STYLE_PROPERTIES: &[&str] =
    &["background-color", "color", "font-family", "font-size", "font-style", "font-weight", "text-decoration"];

/// The MIME type of XDTO-serialized 1C values, whose data is JSON text.
pub const XDTO_JSON: &str = "application/json+xdto";

// ---- the external system types (ПолучитьТипыВнешнихСистем) -----------------

/// GetExternalSystemTypes: only what this server implements.
pub fn external_system_types() -> wire::ExternalSystemTypes {
    wire::ExternalSystemTypes { types: vec![WEBHOOK.to_owned()] }
}

/// GetExternalSystemDescription (ПолучитьОписаниеВнешнейСистемы).
pub fn describe(system_type: &str) -> beseda_core::Result<wire::ExternalSystemDescription> {
    if system_type != WEBHOOK {
        return Err(Error::new(
            ErrorCode::ExternalSystemTypeUnsupported,
            format!("external system type `{system_type}` is not supported; this server implements `{WEBHOOK}`"),
        )
        .with_field("externalSystemType"));
    }
    Ok(wire::ExternalSystemDescription {
        external_system_type: WEBHOOK.to_owned(),
        // A webhook needs no parameters: the connection point URL is its address.
        parameters: Vec::new(),
        message_editing_available: true,
        videoconferences_available: false,
        supported_button_actions: Vec::new(),
    })
}

// ---- answers -----------------------------------------------------------------

/// A request that is not answered with 200: the HTTP status and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub text: String,
}

impl Reject {
    pub fn bad_request(text: impl Into<String>) -> Self {
        Reject { status: 400, text: text.into() }
    }

    pub fn unauthorized(text: impl Into<String>) -> Self {
        Reject { status: 401, text: text.into() }
    }

    pub fn not_found() -> Self {
        Reject { status: 404, text: NO_ACTIVE_INTEGRATION.to_owned() }
    }

    pub fn conflict(text: impl Into<String>) -> Self {
        Reject { status: 409, text: text.into() }
    }

    pub fn failed(text: impl Into<String>) -> Self {
        Reject { status: 500, text: text.into() }
    }

    pub fn too_large() -> Self {
        Reject {
            status: 413,
            text: format!("the body is larger than {MAX_WEBHOOK_BODY_BYTES} bytes; send one command per request"),
        }
    }
}

/// The largest webhook body the gateway reads (the REST API's limit).
pub const MAX_WEBHOOK_BODY_BYTES: usize = 1024 * 1024;

/// A domain error (from routing or the store), with its `code: message`
/// text: a value the request gave that breaks a rule of the collaboration
/// system (its class is invalid-argument: `text_too_long`, a title over
/// 1,024 characters, …) is the request's fault, a 400 like the webhook's own
/// checks; anything else depends on what is stored, a 500.
impl From<Error> for Reject {
    fn from(error: Error) -> Self {
        match error.code.class() {
            ErrorClass::InvalidArgument => Reject::bad_request(error.to_string()),
            _ => Reject::failed(error.to_string()),
        }
    }
}

/// The status answered for `status` by an integration. Strict, only the 1C
/// contract's codes are used: Beseda's 400 (wrong request), 401 (signature)
/// and 413 (body too large) are all "the command could not be processed",
/// which 1C answers with 500 and the error text; the text is kept.
pub fn status_for(status: u16, strict: bool) -> u16 {
    match status {
        400 | 401 | 413 if strict => 500,
        other => other,
    }
}

type Outcome<T> = std::result::Result<T, Reject>;

// ---- receiving -------------------------------------------------------------------

/// Handles one webhook request; never panics, whatever the input.
pub async fn receive(service: &BotsService, request: wire::WebhookRequest) -> wire::WebhookResponse {
    // Set once the integration is known; a panic before that answers 500,
    // which is in both sets of codes.
    let strict = std::sync::atomic::AtomicBool::new(false);
    let outcome = AssertUnwindSafe(handle(service, request, &strict)).catch_unwind().await;
    let strict = strict.load(std::sync::atomic::Ordering::Relaxed);
    let (status, text) = match outcome {
        Ok(Ok(body)) => (200, body),
        Ok(Err(reject)) => (status_for(reject.status, strict), reject.text),
        Err(_) => {
            tracing::error!("a webhook request panicked");
            (500, "internal: the request could not be processed".to_owned())
        }
    };
    metrics::counter!("beseda_webhook_requests_total", "status" => status.to_string()).increment(1);
    wire::WebhookResponse { status: u32::from(status), text }
}

async fn handle(
    service: &BotsService,
    request: wire::WebhookRequest,
    strict: &std::sync::atomic::AtomicBool,
) -> Outcome<String> {
    let token = request.token.trim();
    if token.is_empty() || token.len() > 512 {
        return Err(Reject::not_found());
    }
    // Nothing about the server's internals is told before the caller is known.
    let found = service.store.find_integration_by_token(token).await.map_err(|error| {
        tracing::warn!(%error, "webhook: cannot look up the integration");
        Reject::failed("unavailable: the integration could not be looked up; retry later")
    })?;
    let Some((application_id, integration)) =
        found.filter(|(_, integration)| integration.enabled && integration.system_type == WEBHOOK)
    else {
        return Err(Reject::not_found());
    };
    strict.store(integration.strict_status_codes, std::sync::atomic::Ordering::Relaxed);
    if request.body_too_large {
        return Err(Reject::too_large());
    }
    check_signature(integration.signing_secret.as_deref(), &request.body, &request.signature)?;
    let command = parse(&request.body)?;
    let name = command.name();
    let session = Session { service, application_id, integration };
    match session.execute(command).await {
        Ok(body) => Ok(body.to_string()),
        Err(reject) => {
            if reject.status == 500 {
                tracing::warn!(
                    application_id = %session.application_id,
                    integration_id = %session.integration.id,
                    command = name,
                    error = %reject.text,
                    "webhook command failed"
                );
            }
            Err(reject)
        }
    }
}

/// A conversation a request addresses.
struct Target {
    conversation_id: String,
    /// Created by this integration (createConversation), not by the application.
    created_here: bool,
    anonymous: bool,
}

fn routed<T>(result: std::result::Result<tonic::Response<T>, tonic::Status>) -> beseda_core::Result<T> {
    result.map(tonic::Response::into_inner).map_err(|status| from_status(&status))
}

fn conversation_ref(conversation_id: &str) -> Option<wire::ConversationRef> {
    Some(wire::ConversationRef { by: Some(wire::conversation_ref::By::Id(conversation_id.to_owned())) })
}

fn is_already_exists(error: &Error) -> bool {
    error.code.class() == ErrorClass::AlreadyExists
}
