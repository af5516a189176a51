//! Inbound webhooks of integrations (§29.5.4): an external system POSTs
//! `{"<command>": {params}}` to the integration's connection point URL
//! (НавигационнаяСсылкаТочкиПодключения) and the server creates or changes
//! users, conversations and messages on its behalf.
//!
//! The request is answered with one of the documented codes: 200 with a
//! small JSON body naming the ids involved, 400 for a request that cannot be
//! understood (the text names the field), 401 for a missing or wrong
//! signature, 404 "No active integration", 409 for a create… of an existing
//! object (and a replayed createMessage), 500 with the error text otherwise.
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
use hmac::{Hmac, Mac};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::BotsService;

/// The one external system type this server implements (ТипВнешнейСистемы).
pub const WEBHOOK: &str = "webhook";

/// The header that carries the body's signature when the integration has a
/// signing secret.
pub const SIGNATURE_HEADER: &str = "X-Beseda-Signature";

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
}

/// A domain error (from routing or the store) is a 500 with its
/// `code: message` text.
impl From<Error> for Reject {
    fn from(error: Error) -> Self {
        Reject::failed(error.to_string())
    }
}

type Outcome<T> = std::result::Result<T, Reject>;

// ---- signatures --------------------------------------------------------------

/// `sha256=<lowercase hex HMAC-SHA256(secret, body)>`: the header value a
/// request signed with `secret` carries.
pub fn signature_for(secret: &str, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        // HMAC takes keys of any length; this branch is unreachable.
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks the signature header when the integration has a signing secret
/// (an empty secret counts as none). The comparison takes constant time.
pub fn check_signature(secret: Option<&str>, body: &[u8], header: &str) -> Outcome<()> {
    let Some(secret) = secret.filter(|secret| !secret.is_empty()) else {
        return Ok(());
    };
    let header = header.trim();
    if header.is_empty() {
        return Err(Reject::unauthorized(format!(
            "this integration requires the {SIGNATURE_HEADER} header: \
             sha256=<lowercase hex HMAC-SHA256 of the request body keyed with the integration's signing secret>"
        )));
    }
    // Only the scheme name and hex digits are normalised; neither depends on the secret.
    let presented = match header.split_once('=') {
        Some((scheme, digest)) if scheme.eq_ignore_ascii_case("sha256") => {
            format!("sha256={}", digest.trim().to_ascii_lowercase())
        }
        _ => header.to_owned(),
    };
    let expected = signature_for(secret, body);
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(Reject::unauthorized(format!(
            "the {SIGNATURE_HEADER} header does not match the body: expected sha256=<lowercase hex HMAC-SHA256 \
             of the exact request body bytes keyed with the integration's signing secret>"
        )))
    }
}

// ---- commands ----------------------------------------------------------------

/// The text format of a message (`textFormat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextFormat {
    Plain,
    Html,
}

/// A message's text as it will be stored: sanitised when HTML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageText {
    pub text: String,
    pub format: TextFormat,
}

impl MessageText {
    fn wire_format(&self) -> i32 {
        match self.format {
            TextFormat::Plain => wire::TextFormat::Plain as i32,
            TextFormat::Html => wire::TextFormat::Formatted as i32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateConversation {
    pub ext_conversation_id: String,
    pub title: String,
    pub ext_user_id: Option<String>,
    pub members: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CreateMessage {
    pub ext_id: String,
    pub ext_conversation_id: String,
    pub ext_user_id: Option<String>,
    pub text: MessageText,
    pub data: Option<wire::MessageData>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateUser {
    pub ext_user_id: String,
    pub name: String,
    pub full_name: String,
    pub picture: Option<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateConversation {
    pub ext_conversation_id: String,
    pub title: Option<String>,
    pub ext_user_id: Option<String>,
    pub add_members: Vec<String>,
    pub remove_members: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateMessage {
    pub ext_id: String,
    pub ext_conversation_id: String,
    pub ext_user_id: Option<String>,
    pub text: MessageText,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateUser {
    pub ext_user_id: String,
    pub name: Option<String>,
    pub full_name: Option<String>,
    pub picture: Option<Vec<u8>>,
}

/// One parsed and validated webhook command.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    CreateConversation(CreateConversation),
    CreateMessage(CreateMessage),
    CreateUser(CreateUser),
    UpdateConversation(UpdateConversation),
    UpdateMessage(UpdateMessage),
    UpdateUser(UpdateUser),
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::CreateConversation(_) => "createConversation",
            Command::CreateMessage(_) => "createMessage",
            Command::CreateUser(_) => "createUser",
            Command::UpdateConversation(_) => "updateConversation",
            Command::UpdateMessage(_) => "updateMessage",
            Command::UpdateUser(_) => "updateUser",
        }
    }

    /// The parameters naming users that an anonymous conversation's
    /// requests must not carry, as far as this command carries them.
    pub fn named_user_parameters(&self) -> Vec<&'static str> {
        let mut carried = Vec::new();
        let (ext_user_id, lists): (&Option<String>, Vec<(&'static str, &Vec<String>)>) = match self {
            Command::CreateConversation(command) => (&command.ext_user_id, vec![("members", &command.members)]),
            Command::CreateMessage(command) => (&command.ext_user_id, Vec::new()),
            Command::UpdateConversation(command) => (
                &command.ext_user_id,
                vec![("addMembers", &command.add_members), ("removeMembers", &command.remove_members)],
            ),
            Command::UpdateMessage(command) => (&command.ext_user_id, Vec::new()),
            Command::CreateUser(_) | Command::UpdateUser(_) => return carried,
        };
        if ext_user_id.is_some() {
            carried.push("extUserId");
        }
        carried.extend(lists.into_iter().filter(|(_, list)| !list.is_empty()).map(|(name, _)| name));
        carried
    }
}

/// The rule of anonymous conversations (created without `extUserId`):
/// requests for them must not name users.
pub fn check_anonymous(ext_conversation_id: &str, command: &Command) -> Outcome<()> {
    let carried = command.named_user_parameters();
    if carried.is_empty() {
        return Ok(());
    }
    Err(Reject::bad_request(format!(
        "conversation `{ext_conversation_id}` was created without extUserId: requests for it must not carry \
         extUserId, members, addMembers or removeMembers (this {} carries {})",
        command.name(),
        carried.join(", ")
    )))
}

/// Parses and validates a request body: UTF-8 (a leading BOM is tolerated),
/// a JSON object with exactly one key, the command.
pub fn parse(body: &[u8]) -> Outcome<Command> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(body);
    let text = std::str::from_utf8(body).map_err(|error| {
        Reject::bad_request(format!(
            "the body is not UTF-8 text (invalid byte at offset {}); send UTF-8 JSON",
            error.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(Reject::bad_request(
            "the body is empty; send a JSON object with one command, e.g. {\"createMessage\": {...}}",
        ));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|error| Reject::bad_request(format!("the body is not valid JSON: {error}")))?;
    let Value::Object(object) = value else {
        return Err(Reject::bad_request(format!(
            "the body must be a JSON object with one command key, not {}",
            describe_json(&value)
        )));
    };
    let mut entries = object.into_iter();
    let (command, params) = match (entries.next(), entries.next()) {
        (Some(entry), None) => entry,
        (None, _) => {
            return Err(Reject::bad_request(format!(
                "the body is an empty object; it must have exactly one key, the command: {}",
                COMMANDS.join(", ")
            )));
        }
        (Some(_), Some(_)) => {
            return Err(Reject::bad_request(format!(
                "the body has several keys; it must have exactly one, the command: {}",
                COMMANDS.join(", ")
            )));
        }
    };
    let Some(name) = COMMANDS.iter().copied().find(|known| *known == command) else {
        return Err(Reject::bad_request(format!(
            "unknown command `{}`; the commands are {}",
            clip(&command),
            COMMANDS.join(", ")
        )));
    };
    let Value::Object(params) = params else {
        return Err(Reject::bad_request(format!(
            "`{name}` must be an object of parameters, not {}",
            describe_json(&params)
        )));
    };
    let params = Params { command: name, map: &params };
    match name {
        "createConversation" => {
            params.only(&["extConversationId", "title", "extUserId", "members"])?;
            Ok(Command::CreateConversation(CreateConversation {
                ext_conversation_id: params.required_id("extConversationId")?,
                title: params.required_string("title")?,
                ext_user_id: params.optional_id("extUserId")?,
                members: params.id_list("members")?,
            }))
        }
        "createMessage" => {
            params.only(&["extId", "text", "textFormat", "extUserId", "extConversationId", "data", "dataType"])?;
            let ext_id = params.required_id("extId")?;
            let ext_conversation_id = params.required_id("extConversationId")?;
            let ext_user_id = params.optional_id("extUserId")?;
            let raw_text = params.required_string("text")?;
            let format = params.text_format()?;
            let data_type = params.optional_string("dataType")?;
            let data = message_data(params.value("data"), data_type.as_deref())?;
            let text = message_text(&raw_text, format, data.is_some())?;
            Ok(Command::CreateMessage(CreateMessage { ext_id, ext_conversation_id, ext_user_id, text, data }))
        }
        "createUser" => {
            params.only(&["extUserId", "name", "fullName", "picture"])?;
            let ext_user_id = params.required_id("extUserId")?;
            let name = params.required_string("name")?;
            if name.trim().is_empty() {
                return Err(Reject::bad_request("field `name` of createUser must not be empty"));
            }
            let full_name = params.required_string("fullName")?;
            let picture = params.picture()?;
            Ok(Command::CreateUser(CreateUser { ext_user_id, name, full_name, picture }))
        }
        "updateConversation" => {
            params.only(&["extConversationId", "title", "extUserId", "addMembers", "removeMembers"])?;
            let command = UpdateConversation {
                ext_conversation_id: params.required_id("extConversationId")?,
                title: params.optional_string("title")?,
                ext_user_id: params.optional_id("extUserId")?,
                add_members: params.id_list("addMembers")?,
                remove_members: params.id_list("removeMembers")?,
            };
            if command.title.is_none() && command.add_members.is_empty() && command.remove_members.is_empty() {
                return Err(Reject::bad_request(
                    "updateConversation changes nothing: give title, addMembers or removeMembers",
                ));
            }
            Ok(Command::UpdateConversation(command))
        }
        "updateMessage" => {
            params.only(&["extId", "text", "textFormat", "extUserId", "extConversationId"])?;
            let ext_id = params.required_id("extId")?;
            let ext_conversation_id = params.required_id("extConversationId")?;
            let ext_user_id = params.optional_id("extUserId")?;
            let raw_text = params.required_string("text")?;
            let text = message_text(&raw_text, params.text_format()?, false)?;
            Ok(Command::UpdateMessage(UpdateMessage { ext_id, ext_conversation_id, ext_user_id, text }))
        }
        _ => {
            params.only(&["extUserId", "name", "fullName", "picture"])?;
            let command = UpdateUser {
                ext_user_id: params.required_id("extUserId")?,
                name: params.optional_string("name")?,
                full_name: params.optional_string("fullName")?,
                picture: params.picture()?,
            };
            if command.name.as_deref().is_some_and(|name| name.trim().is_empty()) {
                return Err(Reject::bad_request("field `name` of updateUser must not be empty"));
            }
            if command.name.is_none() && command.full_name.is_none() && command.picture.is_none() {
                return Err(Reject::bad_request("updateUser changes nothing: give name, fullName or picture"));
            }
            Ok(Command::UpdateUser(command))
        }
    }
}

/// What a JSON value is, for error texts.
fn describe_json(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A client-supplied name shortened for an error text.
fn clip(text: &str) -> String {
    const MAX: usize = 64;
    if text.chars().count() <= MAX {
        return text.to_owned();
    }
    let mut clipped: String = text.chars().take(MAX).collect();
    clipped.push('…');
    clipped
}

/// The parameters of one command, read with errors that name the field.
struct Params<'a> {
    command: &'static str,
    map: &'a Map<String, Value>,
}

impl Params<'_> {
    /// Unknown parameters are rejected so that typos (`extUserID`) surface
    /// instead of silently changing what the request means.
    fn only(&self, known: &[&str]) -> Outcome<()> {
        match self.map.keys().find(|key| !known.contains(&key.as_str())) {
            None => Ok(()),
            Some(unknown) => Err(Reject::bad_request(format!(
                "unknown field `{}` in {}; its fields are {}",
                clip(unknown),
                self.command,
                known.join(", ")
            ))),
        }
    }

    /// A parameter's value; `null` counts as absent.
    fn value(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|value| !value.is_null())
    }

    fn required(&self, name: &str) -> Outcome<&Value> {
        self.value(name).ok_or_else(|| Reject::bad_request(format!("field `{name}` is required in {}", self.command)))
    }

    fn wrong_type(&self, name: &str, expected: &str, value: &Value) -> Reject {
        Reject::bad_request(format!(
            "field `{name}` of {} must be {expected}, not {}",
            self.command,
            describe_json(value)
        ))
    }

    fn string_of(&self, name: &str, value: &Value) -> Outcome<String> {
        match value {
            Value::String(text) => Ok(text.clone()),
            other => Err(self.wrong_type(name, "a string", other)),
        }
    }

    fn required_string(&self, name: &str) -> Outcome<String> {
        self.string_of(name, self.required(name)?)
    }

    fn optional_string(&self, name: &str) -> Outcome<Option<String>> {
        self.value(name).map(|value| self.string_of(name, value)).transpose()
    }

    /// An external id: a string (integers are taken as their decimal text),
    /// at most 256 characters, without control characters.
    fn id_of(&self, name: &str, value: &Value) -> Outcome<String> {
        let id = match value {
            Value::String(text) => text.clone(),
            Value::Number(number) if number.is_i64() || number.is_u64() => number.to_string(),
            other => return Err(self.wrong_type(name, "a string", other)),
        };
        if id.chars().count() > MAX_KEY_CHARS {
            return Err(Reject::bad_request(format!(
                "field `{name}` of {} is longer than {MAX_KEY_CHARS} characters",
                self.command
            )));
        }
        if id.chars().any(char::is_control) {
            return Err(Reject::bad_request(format!("field `{name}` of {} contains control characters", self.command)));
        }
        Ok(id)
    }

    fn required_id(&self, name: &str) -> Outcome<String> {
        let id = self.id_of(name, self.required(name)?)?;
        if id.is_empty() {
            return Err(Reject::bad_request(format!("field `{name}` of {} must not be empty", self.command)));
        }
        Ok(id)
    }

    /// An optional external id; an empty string counts as absent.
    fn optional_id(&self, name: &str) -> Outcome<Option<String>> {
        Ok(self.value(name).map(|value| self.id_of(name, value)).transpose()?.filter(|id| !id.is_empty()))
    }

    /// An array of external ids, without duplicates, in the order given.
    fn id_list(&self, name: &str) -> Outcome<Vec<String>> {
        let Some(value) = self.value(name) else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = value else {
            return Err(self.wrong_type(name, "an array of external user ids", value));
        };
        let mut seen = HashSet::new();
        let mut ids = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let item_name = format!("{name}[{index}]");
            let id = self.id_of(&item_name, item)?;
            if id.is_empty() {
                return Err(Reject::bad_request(format!("field `{item_name}` of {} must not be empty", self.command)));
            }
            if seen.insert(id.clone()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn text_format(&self) -> Outcome<TextFormat> {
        let Some(format) = self.optional_string("textFormat")? else {
            return Ok(TextFormat::Plain);
        };
        match format.trim().to_ascii_lowercase().as_str() {
            "" | "text/plain" => Ok(TextFormat::Plain),
            "text/html" => Ok(TextFormat::Html),
            _ => Err(Reject::bad_request(format!(
                "field `textFormat` of {} must be text/plain or text/html, not `{}`",
                self.command,
                clip(&format)
            ))),
        }
    }

    /// `picture`: base64; an empty string removes the picture.
    fn picture(&self) -> Outcome<Option<Vec<u8>>> {
        let Some(encoded) = self.optional_string("picture")? else {
            return Ok(None);
        };
        let picture = decode_base64("picture", &encoded)?;
        if picture.len() > MAX_DATA_BYTES {
            return Err(Reject::bad_request(format!(
                "field `picture` of {} has {} bytes; at most {MAX_DATA_BYTES} are allowed",
                self.command,
                picture.len()
            )));
        }
        Ok(Some(picture))
    }
}

// ---- content -------------------------------------------------------------------

/// Keeps only the allowed elements and style properties of `text/html`
/// (links keep `href` with http, https, mailto or tel; `font` keeps color,
/// face and size). Everything else is removed, never escaped into visible
/// markup: the contents of `script` and `style` go with them, other removed
/// elements leave their text.
pub fn sanitize_html(html: &str) -> String {
    let tags: HashSet<&str> = ALLOWED_ELEMENTS.iter().copied().collect();
    let styles: HashSet<&str> = ALLOWED_STYLE_PROPERTIES.iter().copied().collect();
    let tag_attributes: HashMap<&str, HashSet<&str>> =
        HashMap::from([("a", HashSet::from(["href"])), ("font", HashSet::from(["color", "face", "size"]))]);
    ammonia::Builder::default()
        .tags(tags)
        .tag_attributes(tag_attributes)
        .generic_attributes(HashSet::from(["style"]))
        .generic_attribute_prefixes(HashSet::new())
        .tag_attribute_values(HashMap::new())
        .allowed_classes(HashMap::new())
        .url_schemes(HashSet::from(["http", "https", "mailto", "tel"]))
        .url_relative(ammonia::UrlRelative::Deny)
        .filter_style_properties(styles)
        .clean(html)
        .to_string()
}

/// Checks a message's text and makes the text to store.
pub fn message_text(text: &str, format: TextFormat, has_data: bool) -> Outcome<MessageText> {
    let stored = match format {
        TextFormat::Plain => text.to_owned(),
        TextFormat::Html => sanitize_html(text),
    };
    let length = stored.chars().count();
    if length > MAX_TEXT_CHARS {
        return Err(Reject::bad_request(format!(
            "field `text` has {length} characters; at most {MAX_TEXT_CHARS} are allowed"
        )));
    }
    if stored.trim().is_empty() && !has_data {
        let why = if text.trim().is_empty() { "" } else { " after removing unsupported HTML" };
        return Err(Reject::bad_request(format!("field `text` is empty{why}; a message needs text or data")));
    }
    Ok(MessageText { text: stored, format })
}

/// Base64 in the standard or URL-safe alphabet, padded or not; whitespace
/// (line breaks of MIME base64) is ignored.
pub fn decode_base64(field: &str, encoded: &str) -> Outcome<Vec<u8>> {
    let compact: String = encoded.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let config = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    GeneralPurpose::new(&base64::alphabet::STANDARD, config)
        .decode(&compact)
        .or_else(|_| GeneralPurpose::new(&base64::alphabet::URL_SAFE, config).decode(&compact))
        .map_err(|error| Reject::bad_request(format!("field `{field}` is not valid base64: {error}")))
}

/// `type/subtype`, optionally followed by `;parameters`, within 256 characters.
fn is_mime_type(text: &str) -> bool {
    let essence = text.split(';').next().unwrap_or_default().trim();
    let token =
        |part: &str| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || "!#$&^_.+-".contains(c));
    text.chars().count() <= MAX_NAME_CHARS
        && !text.chars().any(char::is_control)
        && essence.split_once('/').is_some_and(|(kind, subtype)| token(kind) && token(subtype))
}

/// The message data of `data` and `dataType` (СообщениеСистемыВзаимодействия.Данные):
/// - `image/*` and `application/octet-stream`: `data` is base64, the content its bytes;
/// - `application/json+xdto`: `data` is JSON (text, or a JSON value), the content that JSON text;
/// - any other type: `data` is a string, stored as is with that type;
/// - no `dataType`: a `text/plain` string.
///
/// An absent or empty `data` means no data, whatever `dataType` says.
pub fn message_data(data: Option<&Value>, data_type: Option<&str>) -> Outcome<Option<wire::MessageData>> {
    let data_type = data_type.map(str::trim).unwrap_or_default();
    let data = match data {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(text)) if text.is_empty() => return Ok(None),
        Some(value) => value,
    };
    let mime_type = if data_type.is_empty() { "text/plain".to_owned() } else { data_type.to_ascii_lowercase() };
    if !is_mime_type(&mime_type) {
        return Err(Reject::bad_request(format!(
            "field `dataType` must be a MIME type such as image/png, not `{}`",
            clip(data_type)
        )));
    }
    let as_string = |value: &Value| match value {
        Value::String(text) => Ok(text.clone()),
        other => Err(Reject::bad_request(format!(
            "field `data` must be a string for dataType {mime_type}, not {}",
            describe_json(other)
        ))),
    };
    let content = if mime_type.starts_with("image/") || mime_type == "application/octet-stream" {
        decode_base64("data", &as_string(data)?)?
    } else if mime_type == XDTO_JSON {
        match data {
            Value::String(text) => {
                if serde_json::from_str::<Value>(text).is_err() {
                    return Err(Reject::bad_request(format!(
                        "field `data` must hold JSON text for dataType {XDTO_JSON}"
                    )));
                }
                text.clone().into_bytes()
            }
            value => value.to_string().into_bytes(),
        }
    } else {
        as_string(data)?.into_bytes()
    };
    if content.is_empty() {
        return Ok(None);
    }
    if content.len() > MAX_DATA_BYTES {
        return Err(Reject::bad_request(format!(
            "field `data` has {} bytes; at most {MAX_DATA_BYTES} are allowed",
            content.len()
        )));
    }
    Ok(Some(wire::MessageData { mime_type, content }))
}

// ---- ids -----------------------------------------------------------------------

/// ExternalSystemUserId of the user behind `extUserId`: unique per integration.
pub fn external_user_id(integration_id: &str, ext_user_id: &str) -> String {
    format!("{integration_id}:{ext_user_id}")
}

/// ExternalSystemUserId of the integration's own user (no colon, so it
/// never equals one of [`external_user_id`]).
pub fn own_external_user_id(integration_id: &str) -> String {
    integration_id.to_owned()
}

/// `<prefix>` when it fits in 256 characters, else a digest of it: keys and
/// client message ids are limited to 256 characters.
fn bounded_id(plain: String, integration_id: &str) -> String {
    if plain.chars().count() <= MAX_KEY_CHARS {
        return plain;
    }
    format!("webhook:{integration_id}:sha256:{}", hex::encode(Sha256::digest(plain.as_bytes())))
}

/// The idempotency key of a createMessage: a replay stores no second message.
pub fn client_message_id(integration_id: &str, ext_conversation_id: &str, ext_id: &str) -> String {
    bounded_id(format!("webhook:{integration_id}:{ext_conversation_id}:{ext_id}"), integration_id)
}

/// The key of a conversation the integration creates: makes a retried
/// createConversation find the conversation instead of making a second one,
/// and lets the application find it by key.
pub fn conversation_key(integration_id: &str, ext_conversation_id: &str) -> String {
    bounded_id(format!("webhook:{integration_id}:{ext_conversation_id}"), integration_id)
}

// ---- receiving -------------------------------------------------------------------

/// Handles one webhook request; never panics, whatever the input.
pub async fn receive(service: &BotsService, request: wire::WebhookRequest) -> wire::WebhookResponse {
    let outcome = AssertUnwindSafe(handle(service, request)).catch_unwind().await;
    let (status, text) = match outcome {
        Ok(Ok(body)) => (200, body),
        Ok(Err(reject)) => (reject.status, reject.text),
        Err(_) => {
            tracing::error!("a webhook request panicked");
            (500, "internal: the request could not be processed".to_owned())
        }
    };
    metrics::counter!("beseda_webhook_requests_total", "status" => status.to_string()).increment(1);
    wire::WebhookResponse { status: u32::from(status), text }
}

async fn handle(service: &BotsService, request: wire::WebhookRequest) -> Outcome<String> {
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

/// One request of one integration.
struct Session<'a> {
    service: &'a BotsService,
    application_id: String,
    integration: Integration,
}

impl Session<'_> {
    fn routing(&self) -> &dyn Routing {
        self.service.routing.as_ref()
    }

    fn store(&self) -> &dyn Store {
        self.service.store.as_ref()
    }

    /// Privileged mode, acting as `user_id` (or as the application).
    fn caller(&self, user_id: Option<&str>) -> Caller {
        Caller { application_id: self.application_id.clone(), user_id: user_id.map(str::to_owned), privileged: true }
    }

    fn integration_id(&self) -> &str {
        &self.integration.id
    }

    async fn execute(&self, command: Command) -> Outcome<Value> {
        match command {
            Command::CreateConversation(params) => self.create_conversation(params).await,
            Command::CreateMessage(_) | Command::UpdateMessage(_) | Command::UpdateConversation(_) => {
                self.in_conversation(command).await
            }
            Command::CreateUser(params) => self.create_user(params).await,
            Command::UpdateUser(params) => self.update_user(params).await,
        }
    }

    /// Commands about an existing conversation: it must exist, and the
    /// anonymous rule applies.
    async fn in_conversation(&self, command: Command) -> Outcome<Value> {
        let ext_conversation_id = match &command {
            Command::CreateMessage(params) => params.ext_conversation_id.clone(),
            Command::UpdateMessage(params) => params.ext_conversation_id.clone(),
            Command::UpdateConversation(params) => params.ext_conversation_id.clone(),
            Command::CreateConversation(_) | Command::CreateUser(_) | Command::UpdateUser(_) => {
                return Err(Reject::failed("internal: not a conversation command"));
            }
        };
        let target = self.target(&ext_conversation_id).await?.ok_or_else(|| {
            Reject::failed(format!(
                "conversation `{}` does not exist: create it with createConversation first",
                clip(&ext_conversation_id)
            ))
        })?;
        if target.anonymous {
            check_anonymous(&ext_conversation_id, &command)?;
        }
        match command {
            Command::CreateMessage(params) => self.create_message(params, &target).await,
            Command::UpdateMessage(params) => self.update_message(params, &target).await,
            Command::UpdateConversation(params) => self.update_conversation(params, &target).await,
            Command::CreateConversation(_) | Command::CreateUser(_) | Command::UpdateUser(_) => {
                Err(Reject::failed("internal: not a conversation command"))
            }
        }
    }

    // ---- lookups

    /// The collaboration user behind an external user id; 400 when unknown.
    async fn mapped_user(&self, field: &str, ext_user_id: &str) -> Outcome<String> {
        self.store().get_integration_user(&self.application_id, self.integration_id(), ext_user_id).await?.ok_or_else(
            || {
                Reject::bad_request(format!(
                    "{field}: no user has extUserId `{}`; create it with createUser first",
                    clip(ext_user_id)
                ))
            },
        )
    }

    async fn mapped_users(&self, field: &str, ext_user_ids: &[String]) -> Outcome<Vec<String>> {
        let mut user_ids = Vec::with_capacity(ext_user_ids.len());
        for ext_user_id in ext_user_ids {
            user_ids.push(self.mapped_user(field, ext_user_id).await?);
        }
        Ok(user_ids)
    }

    /// A mapped conversation, or a conversation of the application whose id
    /// is `ext_conversation_id` (one created through the API).
    async fn target(&self, ext_conversation_id: &str) -> Outcome<Option<Target>> {
        if let Some(mapping) = self
            .store()
            .get_integration_conversation(&self.application_id, self.integration_id(), ext_conversation_id)
            .await?
        {
            return Ok(Some(Target {
                conversation_id: mapping.conversation_id,
                created_here: true,
                anonymous: mapping.anonymous,
            }));
        }
        let request = wire::GetConversationRequest { conversation: conversation_ref(ext_conversation_id) };
        match routed(self.routing().get_conversation(self.caller(None).request(request)).await) {
            Ok(conversation) => {
                Ok(Some(Target { conversation_id: conversation.id, created_here: false, anonymous: false }))
            }
            Err(error) if error.code.class() == ErrorClass::NotFound => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    async fn conversation(&self, conversation_id: &str) -> Outcome<wire::Conversation> {
        let request = wire::GetConversationRequest { conversation: conversation_ref(conversation_id) };
        Ok(routed(self.routing().get_conversation(self.caller(None).request(request)).await)?)
    }

    /// Pages through the application's integration users for one external
    /// id: only needed when a request stopped between creating a user and
    /// recording it.
    async fn find_user_by_external_id(&self, external_id: &str) -> Outcome<Option<String>> {
        let mut query = UserQuery {
            limit: MAX_PAGE_SIZE,
            kind: Some(UserKind::Integration),
            include_blocked: true,
            ..Default::default()
        };
        loop {
            let page = self.store().list_users(&self.application_id, &query).await?;
            if let Some(user) = page
                .iter()
                .find(|user| user.external_system_type == WEBHOOK && user.external_system_user_id == external_id)
            {
                return Ok(Some(user.id.clone()));
            }
            if page.len() < MAX_PAGE_SIZE as usize {
                return Ok(None);
            }
            query.after = page.last().map(|user| user.id.clone());
        }
    }

    /// The user named after the integration that speaks when a request
    /// names nobody; created on first use.
    async fn own_user(&self) -> Outcome<String> {
        if let Some(user_id) = &self.integration.own_user_id {
            return Ok(user_id.clone());
        }
        let name: String = [self.integration.presentation.trim(), self.integration.key.trim(), "Integration"]
            .into_iter()
            .find(|name| !name.is_empty())
            .unwrap_or("Integration")
            .chars()
            .take(MAX_NAME_CHARS)
            .collect();
        let external_id = own_external_user_id(self.integration_id());
        let user = wire::User {
            kind: wire::UserKind::Integration as i32,
            name: name.clone(),
            full_name: name,
            external_system_type: WEBHOOK.to_owned(),
            external_system_user_id: external_id.clone(),
            ..Default::default()
        };
        let request = wire::CreateUserRequest { user: Some(user) };
        let user_id = match routed(self.routing().create_user(self.caller(None).request(request)).await) {
            Ok(user) => user.id,
            // Created by a concurrent request, or by one that stopped before recording it.
            Err(error) if is_already_exists(&error) => {
                self.find_user_by_external_id(&external_id).await?.ok_or_else(|| Reject::failed(error.to_string()))?
            }
            Err(error) => return Err(error.into()),
        };
        // Read again so that a concurrent change of the integration is kept.
        let mut integration = self
            .store()
            .get_integration(&self.application_id, self.integration_id())
            .await?
            .ok_or_else(Reject::not_found)?;
        if integration.own_user_id.as_deref() != Some(user_id.as_str()) {
            integration.own_user_id = Some(user_id.clone());
            self.store().update_integration(&self.application_id, &integration).await?;
        }
        Ok(user_id)
    }

    /// Makes sure `user_id` may post in the conversation: a member already,
    /// added when the integration created the conversation, else a 500.
    async fn ensure_member(&self, target: &Target, user_id: &str) -> Outcome<()> {
        let conversation = self.conversation(&target.conversation_id).await?;
        if conversation.all_application_users || conversation.member_ids.iter().any(|member| member == user_id) {
            return Ok(());
        }
        if !target.created_here {
            return Err(Reject::failed(format!(
                "user `{user_id}` is not a member of conversation `{}`, which the application created: \
                 add that user to it in the application first",
                conversation.id
            )));
        }
        let request = wire::UpdateConversationRequest {
            conversation: conversation_ref(&conversation.id),
            add_member_ids: vec![user_id.to_owned()],
            ..Default::default()
        };
        routed(self.routing().update_conversation(self.caller(Some(user_id)).request(request)).await)?;
        Ok(())
    }

    // ---- commands

    async fn create_conversation(&self, params: CreateConversation) -> Outcome<Value> {
        let ext_conversation_id = &params.ext_conversation_id;
        let anonymous = params.ext_user_id.is_none();
        if anonymous && !params.members.is_empty() {
            return Err(Reject::bad_request(format!(
                "conversation `{}` is created without extUserId, so the request must not carry members \
                 (requests for such a conversation must not carry extUserId, members, addMembers or removeMembers)",
                clip(ext_conversation_id)
            )));
        }
        if self.target(ext_conversation_id).await?.is_some() {
            return Err(Reject::conflict(format!("conversation `{}` exists already", clip(ext_conversation_id))));
        }
        // Everything the request names is checked before anything is created.
        let named_author = match &params.ext_user_id {
            Some(ext_user_id) => Some(self.mapped_user("extUserId", ext_user_id).await?),
            None => None,
        };
        let members = self.mapped_users("members", &params.members).await?;
        let author = match named_author {
            Some(author) => author,
            None => self.own_user().await?,
        };
        let member_ids: BTreeSet<String> = std::iter::once(author.clone())
            .chain(self.integration.default_member_ids.iter().cloned())
            .chain(members)
            .collect();
        let key = conversation_key(self.integration_id(), ext_conversation_id);
        let conversation = wire::Conversation {
            key: key.clone(),
            title: params.title,
            displayed: Some(true),
            group: true,
            member_ids: member_ids.into_iter().collect(),
            integration_id: self.integration.id.clone(),
            ..Default::default()
        };
        let request = wire::CreateConversationRequest { conversation: Some(conversation) };
        let conversation_id =
            match routed(self.routing().create_conversation(self.caller(Some(&author)).request(request)).await) {
                Ok(conversation) => conversation.id,
                // Left by a request that stopped before recording it (or a
                // concurrent one, which the mapping below turns into a 409).
                Err(error) if error.code == ErrorCode::ConversationKeyTaken => {
                    let request = wire::GetConversationRequest {
                        conversation: Some(wire::ConversationRef { by: Some(wire::conversation_ref::By::Key(key)) }),
                    };
                    routed(self.routing().get_conversation(self.caller(None).request(request)).await)?.id
                }
                Err(error) => return Err(error.into()),
            };
        let mapping = IntegrationConversation {
            ext_conversation_id: ext_conversation_id.clone(),
            conversation_id: conversation_id.clone(),
            anonymous,
        };
        match self.store().put_integration_conversation(&self.application_id, self.integration_id(), &mapping).await {
            Ok(()) => Ok(json!({"conversationId": conversation_id, "authorId": author})),
            Err(error) if is_already_exists(&error) => {
                Err(Reject::conflict(format!("conversation `{}` exists already", clip(ext_conversation_id))))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn create_message(&self, params: CreateMessage, target: &Target) -> Outcome<Value> {
        let replayed = || {
            Reject::conflict(format!(
                "message `{}` exists already in conversation `{}`",
                clip(&params.ext_id),
                clip(&params.ext_conversation_id)
            ))
        };
        if self
            .store()
            .get_integration_message(
                &self.application_id,
                self.integration_id(),
                &params.ext_conversation_id,
                &params.ext_id,
            )
            .await?
            .is_some()
        {
            return Err(replayed());
        }
        let author = match &params.ext_user_id {
            Some(ext_user_id) => self.mapped_user("extUserId", ext_user_id).await?,
            None => self.own_user().await?,
        };
        self.ensure_member(target, &author).await?;
        let request = wire::SendMessageRequest {
            conversation: conversation_ref(&target.conversation_id),
            text: params.text.text.clone(),
            text_format: params.text.wire_format(),
            data: params.data,
            client_message_id: client_message_id(self.integration_id(), &params.ext_conversation_id, &params.ext_id),
            author_id: author.clone(),
            ..Default::default()
        };
        let message = routed(self.routing().send_message(self.caller(Some(&author)).request(request)).await)?;
        match self
            .store()
            .put_integration_message(
                &self.application_id,
                self.integration_id(),
                &params.ext_conversation_id,
                &params.ext_id,
                &message.id,
            )
            .await
        {
            Ok(()) => Ok(json!({
                "messageId": message.id,
                "conversationId": message.conversation_id,
                "authorId": message.author_id,
            })),
            Err(error) if is_already_exists(&error) => Err(replayed()),
            Err(error) => Err(error.into()),
        }
    }

    async fn update_message(&self, params: UpdateMessage, target: &Target) -> Outcome<Value> {
        let message_id = self
            .store()
            .get_integration_message(
                &self.application_id,
                self.integration_id(),
                &params.ext_conversation_id,
                &params.ext_id,
            )
            .await?
            .ok_or_else(|| {
                Reject::failed(format!(
                    "message `{}` does not exist in conversation `{}`: create it with createMessage first",
                    clip(&params.ext_id),
                    clip(&params.ext_conversation_id)
                ))
            })?;
        let request = wire::MessageRef { message_id: message_id.clone() };
        let message = routed(self.routing().get_message(self.caller(None).request(request)).await)?;
        if let Some(ext_user_id) = &params.ext_user_id {
            let user_id = self.mapped_user("extUserId", ext_user_id).await?;
            if user_id != message.author_id {
                return Err(Reject::bad_request(format!(
                    "extUserId `{}` is not the author of message `{}`",
                    clip(ext_user_id),
                    clip(&params.ext_id)
                )));
            }
        }
        let request = wire::EditMessageRequest {
            message_id,
            text: Some(params.text.text.clone()),
            text_format: params.text.wire_format(),
            ..Default::default()
        };
        let edited = routed(self.routing().edit_message(self.caller(Some(&message.author_id)).request(request)).await)?;
        Ok(json!({
            "messageId": edited.id,
            "conversationId": target.conversation_id,
            "authorId": edited.author_id,
        }))
    }

    async fn update_conversation(&self, params: UpdateConversation, target: &Target) -> Outcome<Value> {
        if !target.created_here {
            return Err(Reject::failed(format!(
                "conversation `{}` was created by the application, not by this integration: \
                 the integration may post to it but not change it",
                target.conversation_id
            )));
        }
        let acting = match &params.ext_user_id {
            Some(ext_user_id) => Some(self.mapped_user("extUserId", ext_user_id).await?),
            None => None,
        };
        let add_member_ids = self.mapped_users("addMembers", &params.add_members).await?;
        let remove_member_ids = self.mapped_users("removeMembers", &params.remove_members).await?;
        let request = wire::UpdateConversationRequest {
            conversation: conversation_ref(&target.conversation_id),
            title: params.title,
            add_member_ids,
            remove_member_ids,
            displayed: None,
        };
        let updated =
            routed(self.routing().update_conversation(self.caller(acting.as_deref()).request(request)).await)?;
        Ok(json!({"conversationId": updated.id}))
    }

    async fn create_user(&self, params: CreateUser) -> Outcome<Value> {
        let exists = || Reject::conflict(format!("user `{}` exists already", clip(&params.ext_user_id)));
        if self
            .store()
            .get_integration_user(&self.application_id, self.integration_id(), &params.ext_user_id)
            .await?
            .is_some()
        {
            return Err(exists());
        }
        let external_id = external_user_id(self.integration_id(), &params.ext_user_id);
        let user = wire::User {
            kind: wire::UserKind::Integration as i32,
            name: params.name.clone(),
            full_name: params.full_name.clone(),
            picture: params.picture.clone().unwrap_or_default(),
            external_system_type: WEBHOOK.to_owned(),
            external_system_user_id: external_id.clone(),
            ..Default::default()
        };
        let request = wire::CreateUserRequest { user: Some(user.clone()) };
        let user_id = match routed(self.routing().create_user(self.caller(None).request(request)).await) {
            Ok(created) => created.id,
            Err(error) if is_already_exists(&error) => {
                // Created by a request that stopped before recording it:
                // take it over with this request's properties.
                let Some(user_id) = self.find_user_by_external_id(&external_id).await? else {
                    return Err(exists());
                };
                let mut update_mask = vec!["name".to_owned(), "fullName".to_owned()];
                if params.picture.is_some() {
                    update_mask.push("picture".to_owned());
                }
                let request = wire::UpdateUserRequest { user_id: user_id.clone(), update_mask, user: Some(user) };
                routed(self.routing().update_user(self.caller(None).request(request)).await)?;
                user_id
            }
            Err(error) => return Err(error.into()),
        };
        match self
            .store()
            .put_integration_user(&self.application_id, self.integration_id(), &params.ext_user_id, &user_id)
            .await
        {
            Ok(()) => Ok(json!({"userId": user_id})),
            Err(error) if is_already_exists(&error) => Err(exists()),
            Err(error) => Err(error.into()),
        }
    }

    async fn update_user(&self, params: UpdateUser) -> Outcome<Value> {
        let user_id = self.mapped_user("extUserId", &params.ext_user_id).await?;
        let mut update_mask = Vec::new();
        let mut user = wire::User::default();
        if let Some(name) = params.name {
            update_mask.push("name".to_owned());
            user.name = name;
        }
        if let Some(full_name) = params.full_name {
            update_mask.push("fullName".to_owned());
            user.full_name = full_name;
        }
        if let Some(picture) = params.picture {
            update_mask.push("picture".to_owned());
            user.picture = picture;
        }
        let request = wire::UpdateUserRequest { user_id: user_id.clone(), update_mask, user: Some(user) };
        routed(self.routing().update_user(self.caller(None).request(request)).await)?;
        Ok(json!({"userId": user_id}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(body: &str) -> Reject {
        let reject = parse(body.as_bytes()).expect_err("should be rejected");
        assert_eq!(reject.status, 400, "{body}: {reject:?}");
        reject
    }

    fn parsed(body: &str) -> Command {
        parse(body.as_bytes()).unwrap_or_else(|reject| panic!("{body}: {reject:?}"))
    }

    // ---- types

    #[test]
    fn only_webhook_is_offered_and_described() {
        assert_eq!(external_system_types().types, vec!["webhook"]);
        let description = describe("webhook").unwrap();
        assert!(description.parameters.iter().all(|parameter| !parameter.required));
        assert!(description.message_editing_available);
        assert!(!description.videoconferences_available);
        for unknown in ["Telegram", "WebChat", "", "WEBHOOK"] {
            assert_eq!(describe(unknown).unwrap_err().code, ErrorCode::ExternalSystemTypeUnsupported);
        }
    }

    // ---- the documented examples, byte for byte

    #[test]
    fn the_documented_examples_parse() {
        let command = parsed(
            r#"{ "createConversation": { "extConversationId": "1", "title": "Заголовок обсуждения", "extUserId": "1", "members": [ "1" ] } }"#,
        );
        assert_eq!(
            command,
            Command::CreateConversation(CreateConversation {
                ext_conversation_id: "1".into(),
                title: "Заголовок обсуждения".into(),
                ext_user_id: Some("1".into()),
                members: vec!["1".into()],
            })
        );
        let command = parsed(
            r#"{ "createMessage": { "extId": "1", "text": "Тест сообщения", "textFormat": "text/plain", "extUserId": "1", "extConversationId": "1", "data": "", "dataType": "" } }"#,
        );
        assert_eq!(
            command,
            Command::CreateMessage(CreateMessage {
                ext_id: "1".into(),
                ext_conversation_id: "1".into(),
                ext_user_id: Some("1".into()),
                text: MessageText { text: "Тест сообщения".into(), format: TextFormat::Plain },
                data: None,
            })
        );
        let command = parsed(
            r#"{ "updateConversation": { "extConversationId": "1", "title": "Новый заголовок обсуждения", "extUserId": "5", "addMembers": [ "5" ], "removeMembers": [ "1" ] } }"#,
        );
        assert_eq!(command.named_user_parameters(), vec!["extUserId", "addMembers", "removeMembers"]);
        let command = parsed(
            r#"{ "updateMessage": { "extId": "1", "text": "Тест сообщения", "textFormat": "text/plain", "extUserId": "1", "extConversationId": "1" } }"#,
        );
        assert_eq!(command.name(), "updateMessage");
        let command = parsed(
            r#"{ "createUser" : { "extUserId": "7", "name": "Ivan", "fullName": "", "picture": "iVBORw0KGgo=" } }"#,
        );
        assert_eq!(
            command,
            Command::CreateUser(CreateUser {
                ext_user_id: "7".into(),
                name: "Ivan".into(),
                full_name: String::new(),
                picture: Some(b"\x89PNG\r\n\x1a\n".to_vec()),
            })
        );
        let command = parsed(r#"{ "updateUser" : { "extUserId": "7", "fullName": "Ivan Petrov" } }"#);
        assert_eq!(
            command,
            Command::UpdateUser(UpdateUser {
                ext_user_id: "7".into(),
                name: None,
                full_name: Some("Ivan Petrov".into()),
                picture: None,
            })
        );
    }

    #[test]
    fn a_utf8_bom_is_tolerated_and_other_encodings_are_not() {
        let mut body = b"\xEF\xBB\xBF".to_vec();
        body.extend_from_slice(br#"{"updateUser": {"extUserId": "1", "name": "A"}}"#);
        assert_eq!(parse(&body).unwrap().name(), "updateUser");
        // "Тест" in Windows-1251.
        let mut latin = br#"{"updateUser": {"extUserId": "1", "name": ""#.to_vec();
        latin.extend_from_slice(b"\xD2\xE5\xF1\xF2\"}}");
        let reject = parse(&latin).unwrap_err();
        assert_eq!(reject.status, 400);
        assert!(reject.text.contains("UTF-8"), "{}", reject.text);
    }

    #[test]
    fn the_envelope_is_checked() {
        assert!(bad("").text.contains("empty"));
        assert!(bad("{\"createMessage\": ").text.contains("not valid JSON"));
        assert!(bad("[1]").text.contains("JSON object"));
        assert!(bad("{}").text.contains("exactly one key"));
        assert!(bad(r#"{"createUser": {}, "updateUser": {}}"#).text.contains("exactly one"));
        let unknown = bad(r#"{"deleteMessage": {"extId": "1"}}"#);
        assert!(unknown.text.contains("`deleteMessage`"), "{}", unknown.text);
        for command in COMMANDS {
            assert!(unknown.text.contains(command), "{}", unknown.text);
        }
        assert!(bad(r#"{"createMessage": "hello"}"#).text.contains("must be an object"));
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let missing = bad(r#"{"createMessage": {"extId": "1", "text": "hi"}}"#);
        assert!(missing.text.contains("field `extConversationId` is required"), "{}", missing.text);
        let missing = bad(r#"{"createConversation": {"extConversationId": "1"}}"#);
        assert!(missing.text.contains("field `title` is required"), "{}", missing.text);
        let null = bad(r#"{"createUser": {"extUserId": null, "name": "A", "fullName": ""}}"#);
        assert!(null.text.contains("field `extUserId` is required"), "{}", null.text);
        let typed = bad(r#"{"createConversation": {"extConversationId": "1", "title": 5}}"#);
        assert!(typed.text.contains("field `title`") && typed.text.contains("a string"), "{}", typed.text);
        let typed = bad(r#"{"createConversation": {"extConversationId": "1", "title": "t", "members": "1"}}"#);
        assert!(typed.text.contains("field `members`"), "{}", typed.text);
        let typed = bad(r#"{"createConversation": {"extConversationId": "1", "title": "t", "members": ["1", true]}}"#);
        assert!(typed.text.contains("field `members[1]`"), "{}", typed.text);
        let typed = bad(r#"{"createConversation": {"extConversationId": 1.5, "title": "t"}}"#);
        assert!(typed.text.contains("field `extConversationId`"), "{}", typed.text);
        let typo =
            bad(r#"{"createMessage": {"extId": "1", "text": "hi", "extConversationId": "1", "extUserID": "2"}}"#);
        assert!(typo.text.contains("unknown field `extUserID`"), "{}", typo.text);
        let empty = bad(r#"{"createMessage": {"extId": "", "text": "hi", "extConversationId": "1"}}"#);
        assert!(empty.text.contains("field `extId`"), "{}", empty.text);
        let format = bad(
            r#"{"createMessage": {"extId": "1", "text": "hi", "extConversationId": "1", "textFormat": "markdown"}}"#,
        );
        assert!(format.text.contains("textFormat"), "{}", format.text);
        let long = format!(r#"{{"createUser": {{"extUserId": "{}", "name": "A", "fullName": ""}}}}"#, "x".repeat(257));
        assert!(bad(&long).text.contains("longer than 256"));
        assert!(bad(r#"{"updateUser": {"extUserId": "1"}}"#).text.contains("changes nothing"));
        assert!(bad(r#"{"updateConversation": {"extConversationId": "1"}}"#).text.contains("changes nothing"));
        assert!(bad(r#"{"createUser": {"extUserId": "1", "name": " ", "fullName": ""}}"#).text.contains("`name`"));
        assert!(
            bad(r#"{"createUser": {"extUserId": "1", "name": "A", "fullName": "", "picture": "*"}}"#)
                .text
                .contains("`picture`")
        );
    }

    #[test]
    fn integer_ids_empty_optional_ids_and_duplicates_are_normalised() {
        let command = parsed(
            r#"{"createConversation": {"extConversationId": 42, "title": "t", "extUserId": "", "members": [7, "7", "8"]}}"#,
        );
        assert_eq!(
            command,
            Command::CreateConversation(CreateConversation {
                ext_conversation_id: "42".into(),
                title: "t".into(),
                ext_user_id: None,
                members: vec!["7".into(), "8".into()],
            })
        );
    }

    #[test]
    fn message_text_rules() {
        let too_long = format!(
            r#"{{"createMessage": {{"extId": "1", "extConversationId": "1", "text": "{}"}}}}"#,
            "ж".repeat(4001)
        );
        assert!(bad(&too_long).text.contains("at most 4000"));
        assert!(
            bad(r#"{"createMessage": {"extId": "1", "extConversationId": "1", "text": " "}}"#)
                .text
                .contains("needs text or data")
        );
        let only_markup = bad(
            r#"{"createMessage": {"extId": "1", "extConversationId": "1", "text": "<img src=x>", "textFormat": "text/html"}}"#,
        );
        assert!(only_markup.text.contains("after removing unsupported HTML"), "{}", only_markup.text);
        // Data alone is a message.
        let Command::CreateMessage(message) =
            parsed(r#"{"createMessage": {"extId": "1", "extConversationId": "1", "text": "", "data": "x"}}"#)
        else {
            panic!("not createMessage")
        };
        assert_eq!(message.data.unwrap().mime_type, "text/plain");
        let Command::UpdateMessage(update) = parsed(
            r#"{"updateMessage": {"extId": "1", "extConversationId": "1", "text": "<b>x</b><script>y</script>", "textFormat": "TEXT/HTML"}}"#,
        ) else {
            panic!("not updateMessage")
        };
        assert_eq!(update.text, MessageText { text: "<b>x</b>".into(), format: TextFormat::Html });
    }

    // ---- the anonymous rule

    #[test]
    fn anonymous_conversations_refuse_named_users() {
        let message = parsed(r#"{"createMessage": {"extId": "1", "extConversationId": "c", "text": "hi"}}"#);
        assert!(check_anonymous("c", &message).is_ok());
        let named =
            parsed(r#"{"createMessage": {"extId": "1", "extConversationId": "c", "text": "hi", "extUserId": "u"}}"#);
        let reject = check_anonymous("c", &named).unwrap_err();
        assert_eq!(reject.status, 400);
        assert!(reject.text.contains("without extUserId") && reject.text.contains("carries extUserId"));
        let rename = parsed(r#"{"updateConversation": {"extConversationId": "c", "title": "New"}}"#);
        assert!(check_anonymous("c", &rename).is_ok());
        let add = parsed(r#"{"updateConversation": {"extConversationId": "c", "addMembers": ["u"]}}"#);
        assert!(check_anonymous("c", &add).unwrap_err().text.contains("carries addMembers"));
    }

    // ---- HTML

    #[test]
    fn html_keeps_only_the_allowed_elements_and_styles() {
        let cleaned = sanitize_html(
            r#"<b>bold</b><img src="x.png" onerror="alert(1)"><script>alert(1)</script><style>b{}</style><span style="color: red; position: absolute; font-weight: bold">red</span><div onclick="x()">plain</div><p>para</p><table><tr><td>cell</td></tr></table>"#,
        );
        assert_eq!(cleaned, r#"<b>bold</b><span style="color:red;font-weight:bold">red</span>plainparacell"#);
        for element in ALLOWED_ELEMENTS {
            let html = format!("<{element}>x</{element}>");
            let cleaned = sanitize_html(&html);
            assert!(cleaned.starts_with(&format!("<{element}")), "{element}: {cleaned}");
        }
        for property in ALLOWED_STYLE_PROPERTIES {
            let cleaned = sanitize_html(&format!(r#"<span style="{property}: inherit">x</span>"#));
            assert_eq!(cleaned, format!(r#"<span style="{property}:inherit">x</span>"#));
        }
    }

    #[test]
    fn the_documented_html_example_is_stored_as_documented() {
        assert_eq!(
            sanitize_html(
                r#"<b>Shipped</b> by <span style="color: green; position: fixed">courier</span><img src="x.png"><script>alert(1)</script>"#
            ),
            r#"<b>Shipped</b> by <span style="color:green">courier</span>"#
        );
    }

    #[test]
    fn html_links_and_fonts_keep_safe_attributes_only() {
        assert_eq!(
            sanitize_html(r#"<a href="https://example.com/x" target="_blank" class="c">x</a>"#),
            r#"<a href="https://example.com/x" rel="noopener noreferrer">x</a>"#
        );
        assert_eq!(sanitize_html(r#"<a href="javascript:alert(1)">x</a>"#), r#"<a rel="noopener noreferrer">x</a>"#);
        assert_eq!(
            sanitize_html(r#"<font color="red" face="Arial" size="3" id="f">x</font>"#),
            r#"<font color="red" face="Arial" size="3">x</font>"#
        );
        // Removed, not escaped: no visible junk.
        let cleaned = sanitize_html("<iframe src=x></iframe><object>o</object>text &amp; <u>more</u>");
        assert!(!cleaned.contains("&lt;"), "{cleaned}");
        assert!(cleaned.ends_with("text &amp; <u>more</u>"), "{cleaned}");
    }

    // ---- data

    fn data(value: Value, data_type: &str) -> Outcome<Option<wire::MessageData>> {
        message_data(Some(&value), Some(data_type))
    }

    #[test]
    fn data_maps_by_its_type() {
        let image = data(json!("iVBORw0KGgo="), "image/png").unwrap().unwrap();
        assert_eq!(image, wire::MessageData { mime_type: "image/png".into(), content: b"\x89PNG\r\n\x1a\n".to_vec() });
        let binary = data(json!("AAEC\n/w=="), "application/octet-stream").unwrap().unwrap();
        assert_eq!(binary.content, vec![0, 1, 2, 255]);
        assert_eq!(binary.mime_type, "application/octet-stream");
        let xdto = data(json!(r##"{"#type":"jxs:string","#value":"x"}"##), XDTO_JSON).unwrap().unwrap();
        assert_eq!(xdto.mime_type, XDTO_JSON);
        assert_eq!(xdto.content, br##"{"#type":"jxs:string","#value":"x"}"##.to_vec());
        let xdto_value = data(json!({"a": 1}), XDTO_JSON).unwrap().unwrap();
        assert_eq!(xdto_value.content, br#"{"a":1}"#.to_vec());
        let csv = data(json!("a;b\n1;2"), "text/csv").unwrap().unwrap();
        assert_eq!(csv, wire::MessageData { mime_type: "text/csv".into(), content: b"a;b\n1;2".to_vec() });
        let untyped = message_data(Some(&json!("just text")), None).unwrap().unwrap();
        assert_eq!(untyped.mime_type, "text/plain");
        assert_eq!(untyped.content, b"just text".to_vec());
        assert_eq!(message_data(Some(&json!("")), Some("image/png")).unwrap(), None);
        assert_eq!(message_data(None, Some("image/png")).unwrap(), None);
    }

    #[test]
    fn bad_data_is_named() {
        for (value, data_type) in [(json!("not base64!"), "image/png"), (json!("%%"), "application/octet-stream")] {
            let reject = data(value, data_type).unwrap_err();
            assert_eq!(reject.status, 400);
            assert!(reject.text.contains("field `data`"), "{}", reject.text);
        }
        assert!(data(json!("{not json"), XDTO_JSON).unwrap_err().text.contains("field `data`"));
        assert!(data(json!(5), "text/csv").unwrap_err().text.contains("field `data`"));
        assert!(data(json!("x"), "nonsense").unwrap_err().text.contains("field `dataType`"));
        let huge = base64::engine::general_purpose::STANDARD.encode(vec![0u8; MAX_DATA_BYTES + 1]);
        assert!(data(json!(huge), "application/octet-stream").unwrap_err().text.contains("at most 102400"));
    }

    // ---- signatures

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature_for("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let body = br#"{"createUser": {"extUserId": "1", "name": "A", "fullName": ""}}"#;
        let good = signature_for("s3cret", body);
        assert!(check_signature(Some("s3cret"), body, &good).is_ok());
        assert!(check_signature(Some("s3cret"), body, &good.to_uppercase().replacen("SHA256", "sha256", 1)).is_ok());
        assert!(check_signature(None, body, "").is_ok());
        assert!(check_signature(Some(""), body, "").is_ok());
        let missing = check_signature(Some("s3cret"), body, "").unwrap_err();
        assert_eq!(missing.status, 401);
        assert!(missing.text.contains(SIGNATURE_HEADER) && missing.text.contains("sha256="));
        for wrong in [signature_for("other", body), "sha256=00".into(), "garbage".into(), good.replace("sha256=", "")] {
            assert_eq!(check_signature(Some("s3cret"), body, &wrong).unwrap_err().status, 401, "{wrong}");
        }
        let mut tampered = body.to_vec();
        tampered.push(b' ');
        assert_eq!(check_signature(Some("s3cret"), &tampered, &good).unwrap_err().status, 401);
    }

    // ---- ids

    #[test]
    fn ids_fit_the_limits() {
        assert_eq!(external_user_id("int", "7"), "int:7");
        assert_ne!(own_external_user_id("int"), external_user_id("int", ""));
        assert_eq!(client_message_id("int", "c", "m"), "webhook:int:c:m");
        assert_eq!(conversation_key("int", "c"), "webhook:int:c");
        let long = "x".repeat(MAX_KEY_CHARS);
        let id = client_message_id("int", &long, &long);
        assert!(id.chars().count() <= MAX_KEY_CHARS && id.starts_with("webhook:int:sha256:"), "{id}");
        assert_ne!(id, client_message_id("int", &long, "other"));
        assert!(conversation_key("int", &long).chars().count() <= MAX_KEY_CHARS);
    }

    #[test]
    fn errors_become_texts_with_their_code() {
        let reject = Reject::from(Error::new(ErrorCode::TextTooLong, "too long"));
        assert_eq!(reject, Reject { status: 500, text: "text_too_long: too long".into() });
        assert_eq!(Reject::not_found().text, "No active integration");
    }

    #[test]
    fn parsing_never_panics_on_odd_input() {
        let odd: &[&[u8]] = &[
            b"\xEF\xBB\xBF",
            b"\xFF\xFE{}",
            b"null",
            b"\"createUser\"",
            b"{\"createUser\": null}",
            b"{\"createMessage\": {\"extId\": {}, \"text\": [], \"extConversationId\": -1}}",
            b"{\"createMessage\": {\"extId\": \"1\", \"text\": \"x\", \"extConversationId\": \"1\", \"data\": [1], \"dataType\": \"image/png\"}}",
            b"{\"createMessage\": {\"extId\": \"1\", \"text\": \"x\", \"extConversationId\": \"1\", \"data\": \"x\", \"dataType\": \"/\"}}",
            b"{\"updateUser\": {\"extUserId\": \"\\u0000\", \"name\": \"x\"}}",
            b"{\"createUser\": {\"extUserId\": 18446744073709551615, \"name\": \"x\", \"fullName\": \"\"}}",
        ];
        for body in odd {
            let _ = parse(body);
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(parse(deep.as_bytes()).unwrap_err().status, 400);
    }
}
