//! Parsing and validating the six commands of §29.5.4: the documented JSON,
//! with errors that name the field.

use super::*;

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
    pub(super) fn wire_format(&self) -> i32 {
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
/// requests for them must not name users. A 500: whether the conversation
/// is anonymous is a fact of the store, not of the request.
pub fn check_anonymous(ext_conversation_id: &str, command: &Command) -> Outcome<()> {
    let carried = command.named_user_parameters();
    if carried.is_empty() {
        return Ok(());
    }
    Err(Reject::failed(format!(
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
                title: params.title(params.required_string("title")?)?,
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
                title: params.optional_string("title")?.map(|title| params.title(title)).transpose()?,
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
pub(super) fn describe_json(value: &Value) -> &'static str {
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
pub(super) fn clip(text: &str) -> String {
    const MAX: usize = 64;
    if text.chars().count() <= MAX {
        return text.to_owned();
    }
    let mut clipped: String = text.chars().take(MAX).collect();
    clipped.push('…');
    clipped
}

/// The parameters of one command, read with errors that name the field.
pub(super) struct Params<'a> {
    command: &'static str,
    map: &'a Map<String, Value>,
}

impl Params<'_> {
    /// A conversation title within the collaboration system's limit, checked
    /// here so that a too-long title is a 400 before anything is created.
    fn title(&self, title: String) -> Outcome<String> {
        let length = beseda_core::rules::char_count(&title);
        if length > beseda_core::limits::MAX_TITLE_CHARS {
            return Err(Reject::bad_request(format!(
                "field `title` of {} has {length} characters; at most {} are allowed",
                self.command,
                beseda_core::limits::MAX_TITLE_CHARS
            )));
        }
        Ok(title)
    }

    /// Unknown parameters are rejected so that typos (`extUserID`) surface
    /// instead of silently changing what the request means.
    pub(super) fn only(&self, known: &[&str]) -> Outcome<()> {
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
    pub(super) fn value(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|value| !value.is_null())
    }

    pub(super) fn required(&self, name: &str) -> Outcome<&Value> {
        self.value(name).ok_or_else(|| Reject::bad_request(format!("field `{name}` is required in {}", self.command)))
    }

    pub(super) fn wrong_type(&self, name: &str, expected: &str, value: &Value) -> Reject {
        Reject::bad_request(format!(
            "field `{name}` of {} must be {expected}, not {}",
            self.command,
            describe_json(value)
        ))
    }

    pub(super) fn string_of(&self, name: &str, value: &Value) -> Outcome<String> {
        match value {
            Value::String(text) => Ok(text.clone()),
            other => Err(self.wrong_type(name, "a string", other)),
        }
    }

    pub(super) fn required_string(&self, name: &str) -> Outcome<String> {
        self.string_of(name, self.required(name)?)
    }

    pub(super) fn optional_string(&self, name: &str) -> Outcome<Option<String>> {
        self.value(name).map(|value| self.string_of(name, value)).transpose()
    }

    /// An external id: a string (integers are taken as their decimal text),
    /// at most 256 characters, without control characters.
    pub(super) fn id_of(&self, name: &str, value: &Value) -> Outcome<String> {
        let id = match value {
            Value::String(text) => text.clone(),
            Value::Number(number) if number.is_i64() || number.is_u64() => number.to_string(),
            other => return Err(self.wrong_type(name, "a string", other)),
        };
        if beseda_core::rules::char_count(&id) > MAX_KEY_CHARS {
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

    pub(super) fn required_id(&self, name: &str) -> Outcome<String> {
        let id = self.id_of(name, self.required(name)?)?;
        if id.is_empty() {
            return Err(Reject::bad_request(format!("field `{name}` of {} must not be empty", self.command)));
        }
        Ok(id)
    }

    /// An optional external id; an empty string counts as absent.
    pub(super) fn optional_id(&self, name: &str) -> Outcome<Option<String>> {
        Ok(self.value(name).map(|value| self.id_of(name, value)).transpose()?.filter(|id| !id.is_empty()))
    }

    /// An array of external ids, without duplicates, in the order given.
    pub(super) fn id_list(&self, name: &str) -> Outcome<Vec<String>> {
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

    pub(super) fn text_format(&self) -> Outcome<TextFormat> {
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
    pub(super) fn picture(&self) -> Outcome<Option<Vec<u8>>> {
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
