//! Bots, integrations, outbound event subscriptions and the durable delivery
//! queue they share. Plain data: the rules of who receives what live in the
//! bots service, the rows in the store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Button, Conversation, Message, Micros};

/// БотСистемыВзаимодействия: an application's bot, bound to one
/// collaboration user (its avatar in conversations).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bot {
    pub id: String,
    /// The collaboration user the bot speaks as; never paired with an
    /// infobase user, and serves at most one bot.
    pub user_id: String,
    /// The 1C metadata object name (Метаданные), e.g. "EchoBot".
    pub bot_type: String,
    /// ДополнительныеПараметры, handed to the application with each event.
    pub additional_parameters: BTreeMap<String, String>,
    /// Created by ExecuteBotProcessing; cannot be created or deleted explicitly.
    pub predefined: bool,
    /// ИмяПользователяИнформационнойБазыВыполненияОбработки: whose data
    /// rights the application runs the handler with (opaque to the server).
    pub infobase_user_name: String,
    pub created_at: Micros,
}

/// ИнтеграцияСистемыВзаимодействия.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Integration {
    pub id: String,
    /// ТипВнешнейСистемы; only "webhook" is implemented.
    pub system_type: String,
    /// Ключ: unique within the application.
    pub key: String,
    /// Использование: a switched-off integration answers 404 "No active integration".
    pub enabled: bool,
    /// ПараметрыВнешнейСистемы.
    pub parameters: BTreeMap<String, String>,
    /// Представление.
    pub presentation: String,
    /// Участники: default members of every conversation it creates.
    pub default_member_ids: Vec<String>,
    /// The unguessable last segment of the connection point URL.
    pub connection_token: String,
    /// When set, every webhook request must carry
    /// `X-Beseda-Signature: sha256=<hex HMAC-SHA256 of the body>`.
    pub signing_secret: Option<String>,
    /// The user named after the integration, created on first use by
    /// requests without `extUserId`.
    pub own_user_id: Option<String>,
    pub created_at: Micros,
    /// Webhooks answer only the 1C contract's statuses (200, 404, 409, 500):
    /// Beseda's 400, 401 and 413 become 500 with the same text.
    pub strict_status_codes: bool,
}

/// Where an application's events are POSTed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSubscription {
    pub id: String,
    pub url: String,
    /// Key of the `X-Beseda-Signature` HMAC-SHA256 over each body.
    pub secret: String,
    /// Event kinds delivered (see [`ApplicationEventKind::name`]); empty = all.
    pub event_kinds: Vec<String>,
    /// Only these conversations; empty = all.
    pub conversation_ids: Vec<String>,
    pub enabled: bool,
    pub created_at: Micros,
}

impl EventSubscription {
    pub fn wants(&self, event: &ApplicationEvent) -> bool {
        self.enabled
            && (self.event_kinds.is_empty() || self.event_kinds.iter().any(|kind| kind == event.kind.name()))
            && (self.conversation_ids.is_empty() || self.conversation_ids.contains(&event.conversation_id))
    }
}

/// Something that happened in an application, as the store commits it in
/// the same transaction as the change itself (the transactional outbox):
/// bots and event subscriptions are fed from these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationEvent {
    /// Empty for events outside any conversation (bot lifecycle).
    pub conversation_id: String,
    /// The conversation's event sequence number (0 for its creation and
    /// for events outside conversations).
    pub seq: u64,
    pub at: Micros,
    pub kind: ApplicationEventKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum ApplicationEventKind {
    MessageCreated {
        message: Message,
    },
    MessageEdited {
        message: Message,
    },
    MessageDeleted {
        message: Message,
    },
    ConversationCreated {
        conversation: Conversation,
    },
    #[serde(rename_all = "camelCase")]
    ConversationChanged {
        conversation: Conversation,
        added_member_ids: Vec<String>,
        removed_member_ids: Vec<String>,
    },
    /// A ProcessByBot button pressed; goes to the bot that wrote the message only.
    #[serde(rename_all = "camelCase")]
    ButtonPressed {
        message: Message,
        button: Button,
        row: u32,
        column: u32,
        user_id: String,
        bot_id: String,
    },
    BotCreated {
        bot: Bot,
    },
    BotUpdated {
        bot: Bot,
    },
    BotDeleted {
        bot: Bot,
    },
}

/// Every event kind a subscription can ask for.
pub const EVENT_KINDS: &[&str] = &[
    "message.created",
    "message.edited",
    "message.deleted",
    "conversation.created",
    "conversation.changed",
    "button.pressed",
    "bot.created",
    "bot.updated",
    "bot.deleted",
];

impl ApplicationEventKind {
    /// The event's name in subscriptions and in outbound bodies.
    pub fn name(&self) -> &'static str {
        match self {
            ApplicationEventKind::MessageCreated { .. } => "message.created",
            ApplicationEventKind::MessageEdited { .. } => "message.edited",
            ApplicationEventKind::MessageDeleted { .. } => "message.deleted",
            ApplicationEventKind::ConversationCreated { .. } => "conversation.created",
            ApplicationEventKind::ConversationChanged { .. } => "conversation.changed",
            ApplicationEventKind::ButtonPressed { .. } => "button.pressed",
            ApplicationEventKind::BotCreated { .. } => "bot.created",
            ApplicationEventKind::BotUpdated { .. } => "bot.updated",
            ApplicationEventKind::BotDeleted { .. } => "bot.deleted",
        }
    }
}

/// What a bot is told about; one per bot handler of the 1C bot module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BotEventKind {
    /// ОбработкаСообщенияСистемыВзаимодействия.
    Message,
    /// ПриДобавленииВОбсуждениеСистемыВзаимодействия.
    AddedToConversation,
    /// ПриУдаленииИзОбсужденияСистемыВзаимодействия.
    RemovedFromConversation,
    /// ПриСозданииОбсужденияСистемыВзаимодействия.
    ConversationCreated,
    /// ОбработкаНажатияКнопкиПанелиКнопокСообщенияСистемыВзаимодействия.
    ButtonPressed,
}

impl BotEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BotEventKind::Message => "message",
            BotEventKind::AddedToConversation => "added_to_conversation",
            BotEventKind::RemovedFromConversation => "removed_from_conversation",
            BotEventKind::ConversationCreated => "conversation_created",
            BotEventKind::ButtonPressed => "button_pressed",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [
            BotEventKind::Message,
            BotEventKind::AddedToConversation,
            BotEventKind::RemovedFromConversation,
            BotEventKind::ConversationCreated,
            BotEventKind::ButtonPressed,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == value)
    }
}

/// Whose queue a delivery is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsumerKind {
    Bot,
    Subscription,
}

impl ConsumerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerKind::Bot => "bot",
            ConsumerKind::Subscription => "subscription",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "bot" => Some(ConsumerKind::Bot),
            "subscription" => Some(ConsumerKind::Subscription),
            _ => None,
        }
    }
}

/// An event to put in a consumer's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDelivery {
    pub consumer_kind: ConsumerKind,
    pub consumer_id: String,
    /// For bots a [`BotEventKind`] name, for subscriptions the event's name.
    pub kind: String,
    pub event: ApplicationEvent,
}

/// One event in one consumer's durable queue. Removed when acknowledged;
/// after too many failed attempts it stays as a dead letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Increases in enqueue order; per conversation, the delivery order.
    pub id: i64,
    pub consumer_kind: ConsumerKind,
    pub consumer_id: String,
    pub kind: String,
    pub event: ApplicationEvent,
    /// Attempts started so far, including the one this claim starts.
    pub attempts: u32,
    pub dead: bool,
    pub last_error: String,
    pub created_at: Micros,
}

/// One conversation mapped by an integration (§29.5.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntegrationConversation {
    pub ext_conversation_id: String,
    pub conversation_id: String,
    /// Created without `extUserId`: the integration's own user speaks in it
    /// and requests for it must not name users.
    pub anonymous: bool,
}
