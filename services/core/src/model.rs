//! Domain objects. They know nothing of the wire: conversions to protobuf
//! live in the routing service, storage encodings in the store.

use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

pub fn now_micros() -> Micros {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
}

/// A new time-ordered identifier (UUID v7, hyphenated).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Subscriber (абонент): owns applications, identified by e-mail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscriber {
    pub id: String,
    /// Lower-cased.
    pub email: String,
    /// SHA-256 of the administration key; the key itself is only e-mailed.
    pub administration_key_hash: Option<String>,
    pub created_at: Micros,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplicationState {
    /// Keys issued; messaging works.
    Registered,
    /// Keys deleted by Unregister; re-registration restores it.
    Unregistered,
    /// Disconnected irrevocably.
    Disconnected,
}

impl ApplicationState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplicationState::Registered => "registered",
            ApplicationState::Unregistered => "unregistered",
            ApplicationState::Disconnected => "disconnected",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "registered" => Some(ApplicationState::Registered),
            "unregistered" => Some(ApplicationState::Unregistered),
            "disconnected" => Some(ApplicationState::Disconnected),
            _ => None,
        }
    }
}

/// Application (приложение): one infobase or data area; the tenant boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Application {
    pub id: String,
    pub subscriber_id: String,
    pub name: String,
    /// The secret shared with the application server; `None` when unregistered.
    pub key: Option<String>,
    pub state: ApplicationState,
    pub created_at: Micros,
}

/// A pending two-step registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingActivation {
    pub email: String,
    pub application_name: String,
    /// Set when re-registering an existing application.
    pub application_id: Option<String>,
    pub code_hash: String,
    pub expires_at: Micros,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserKind {
    Regular,
    Bot,
    Integration,
    External,
    Guest,
}

impl UserKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UserKind::Regular => "regular",
            UserKind::Bot => "bot",
            UserKind::Integration => "integration",
            UserKind::External => "external",
            UserKind::Guest => "guest",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "regular" => Some(UserKind::Regular),
            "bot" => Some(UserKind::Bot),
            "integration" => Some(UserKind::Integration),
            "external" => Some(UserKind::External),
            "guest" => Some(UserKind::Guest),
            _ => None,
        }
    }

    /// Integration users never receive notifications (§29.3.4).
    pub fn receives_notifications(self) -> bool {
        !matches!(self, UserKind::Integration)
    }
}

/// ПользовательСистемыВзаимодействия.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub kind: UserKind,
    pub name: String,
    pub full_name: String,
    pub picture: Vec<u8>,
    pub phone: String,
    pub email: String,
    pub matching_key: String,
    pub infobase_user_id: Option<String>,
    pub blocked: bool,
    pub subscriber_administrator: bool,
    pub external_system_type: String,
    pub external_system_user_id: String,
    pub authentication_email: String,
    pub created_at: Micros,
}

impl User {
    /// A user of the given kind with empty properties.
    pub fn new(kind: UserKind, name: impl Into<String>) -> Self {
        User {
            id: new_id(),
            kind,
            name: name.into(),
            full_name: String::new(),
            picture: Vec::new(),
            phone: String::new(),
            email: String::new(),
            matching_key: String::new(),
            infobase_user_id: None,
            blocked: false,
            subscriber_administrator: false,
            external_system_type: String::new(),
            external_system_user_id: String::new(),
            authentication_email: String::new(),
            created_at: now_micros(),
        }
    }
}

/// The application object a context conversation belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextRef {
    pub object_type: String,
    pub object_id: String,
    pub presentation: String,
}

/// ОбсуждениеСистемыВзаимодействия.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
    pub key: Option<String>,
    pub title: String,
    pub displayed: bool,
    pub read_only: bool,
    pub group: bool,
    pub context: Option<ContextRef>,
    /// Sorted, without duplicates.
    pub member_ids: Vec<String>,
    pub all_application_users: bool,
    pub integration_id: String,
    pub created_at: Micros,
    pub last_message_at: Option<Micros>,
    pub last_seq: u64,
}

impl Conversation {
    pub fn is_one_on_one(&self) -> bool {
        self.context.is_none() && !self.group
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TextFormat {
    Plain,
    Formatted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageData {
    pub mime_type: String,
    pub content: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ButtonKind {
    Button,
    Hyperlink,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ButtonAction {
    RequestLocation,
    RequestPhone,
    ProcessByBot,
    ProcessOnClient,
    SendMessage,
    SendMessageWithData,
    FollowNavigationLink,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Button {
    pub kind: ButtonKind,
    pub text: String,
    pub message_text: String,
    pub data: String,
    pub action: ButtonAction,
    pub enabled: bool,
    pub action_name: String,
    pub picture: Vec<u8>,
    pub navigation_link: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ButtonPanel {
    pub rows: Vec<Vec<Button>>,
}

/// СообщениеСистемыВзаимодействия.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    pub conversation_id: String,
    pub seq: u64,
    pub author_id: String,
    pub date: Micros,
    pub text: String,
    pub text_format: TextFormat,
    pub data: Option<MessageData>,
    pub recipient_ids: Vec<String>,
    pub buttons: Option<ButtonPanel>,
    pub client_message_id: Option<String>,
    pub edited_at: Option<Micros>,
    pub deleted: bool,
}

/// What happened in a conversation; stored in its ordered event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    MessageCreated(Message),
    MessageEdited(Message),
    MessageDeleted(Message),
    ConversationChanged(Conversation),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationEvent {
    pub conversation_id: String,
    pub seq: u64,
    pub at: Micros,
    pub kind: EventKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SortDirection {
    #[default]
    Ascending,
    Descending,
}
