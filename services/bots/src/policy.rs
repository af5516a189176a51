//! Who receives what (§29.4.6.3, "Правила получения ботом сообщений"), and
//! which subscriptions want an event. Decided by the relay once per
//! committed event, against the state of the store at that moment.
//!
//! A bot:
//! - never receives its own messages nor those of other bots;
//! - in a one-on-one with a person receives every message;
//! - in group and context conversations receives the messages addressed to
//!   it (it is among the recipients) and the others when it watches the
//!   conversation (watch mode; by default on in non-context conversations
//!   and off in context ones, as for people);
//! - never receives anything from a conversation it cannot read (not a
//!   member, no access to the context object), recipient or not;
//! - is told when it is added to or removed from a conversation and when a
//!   conversation is created with it;
//! - receives the presses of ProcessByBot buttons of its own messages only.

use std::collections::HashMap;

use beseda_core::Result;
use beseda_core::bots::{
    ApplicationEvent, ApplicationEventKind, Bot, BotEventKind, ConsumerKind, EventSubscription, NewDelivery,
};
use beseda_core::model::{Conversation, Message, UserKind};
use beseda_store::Store;

/// The consumers of one application, loaded once per relay batch.
pub struct Consumers {
    pub bots: Vec<Bot>,
    pub subscriptions: Vec<EventSubscription>,
}

impl Consumers {
    pub async fn load(store: &dyn Store, application_id: &str) -> Result<Self> {
        Ok(Consumers {
            bots: store.list_bots(application_id).await?,
            subscriptions: store.list_subscriptions(application_id).await?,
        })
    }

    fn bot_by_user(&self, user_id: &str) -> Option<&Bot> {
        self.bots.iter().find(|bot| bot.user_id == user_id)
    }
}

/// The deliveries one event makes, bots first, in a stable order.
pub async fn deliveries_for(
    store: &dyn Store,
    application_id: &str,
    consumers: &Consumers,
    conversations: &mut HashMap<String, Option<Conversation>>,
    event: &ApplicationEvent,
) -> Result<Vec<NewDelivery>> {
    let mut deliveries = Vec::new();
    if !consumers.bots.is_empty() {
        for (bot, kind) in bot_recipients(store, application_id, consumers, conversations, event).await? {
            deliveries.push(NewDelivery {
                consumer_kind: ConsumerKind::Bot,
                consumer_id: bot.id.clone(),
                kind: kind.as_str().to_owned(),
                event: event.clone(),
            });
        }
    }
    for subscription in consumers.subscriptions.iter().filter(|subscription| subscription.wants(event)) {
        deliveries.push(NewDelivery {
            consumer_kind: ConsumerKind::Subscription,
            consumer_id: subscription.id.clone(),
            kind: event.kind.name().to_owned(),
            event: event.clone(),
        });
    }
    Ok(deliveries)
}

async fn bot_recipients<'a>(
    store: &dyn Store,
    application_id: &str,
    consumers: &'a Consumers,
    conversations: &mut HashMap<String, Option<Conversation>>,
    event: &ApplicationEvent,
) -> Result<Vec<(&'a Bot, BotEventKind)>> {
    let in_conversation = |conversation: &Conversation, bot: &Bot| {
        conversation.all_application_users || conversation.member_ids.contains(&bot.user_id)
    };
    Ok(match &event.kind {
        ApplicationEventKind::MessageCreated { message } => {
            let conversation = match conversations.get(&message.conversation_id) {
                Some(cached) => cached.clone(),
                None => {
                    let loaded = store.get_conversation(application_id, &message.conversation_id).await?;
                    conversations.insert(message.conversation_id.clone(), loaded.clone());
                    loaded
                }
            };
            let Some(conversation) = conversation else { return Ok(Vec::new()) };
            if written_by_a_bot(store, application_id, consumers, message).await? {
                return Ok(Vec::new());
            }
            let mut recipients = Vec::new();
            for bot in &consumers.bots {
                // Never from a conversation it cannot read, even when named
                // as a recipient.
                let present = in_conversation(&conversation, bot)
                    || (conversation.context.is_some()
                        && store.has_context_access(application_id, &conversation.id, &bot.user_id).await?);
                let receives = if !present {
                    false
                } else if conversation.is_one_on_one() || message.recipient_ids.contains(&bot.user_id) {
                    true
                } else {
                    watches(store, application_id, &conversation, &bot.user_id).await?
                };
                if receives {
                    recipients.push((bot, BotEventKind::Message));
                }
            }
            recipients
        }
        ApplicationEventKind::ConversationCreated { conversation } => consumers
            .bots
            .iter()
            .filter(|bot| conversation.member_ids.contains(&bot.user_id))
            .map(|bot| (bot, BotEventKind::ConversationCreated))
            .collect(),
        ApplicationEventKind::ConversationChanged { added_member_ids, removed_member_ids, .. } => {
            let added = added_member_ids
                .iter()
                .filter_map(|user_id| consumers.bot_by_user(user_id))
                .map(|bot| (bot, BotEventKind::AddedToConversation));
            let removed = removed_member_ids
                .iter()
                .filter_map(|user_id| consumers.bot_by_user(user_id))
                .map(|bot| (bot, BotEventKind::RemovedFromConversation));
            added.chain(removed).collect()
        }
        ApplicationEventKind::ButtonPressed { bot_id, .. } => consumers
            .bots
            .iter()
            .filter(|bot| &bot.id == bot_id)
            .map(|bot| (bot, BotEventKind::ButtonPressed))
            .collect(),
        ApplicationEventKind::MessageEdited { .. }
        | ApplicationEventKind::MessageDeleted { .. }
        | ApplicationEventKind::BotCreated { .. }
        | ApplicationEventKind::BotUpdated { .. }
        | ApplicationEventKind::BotDeleted { .. } => Vec::new(),
    })
}

/// A bot of this application, or a user of kind Bot (a bot of a deleted
/// bot object still speaks as a bot).
async fn written_by_a_bot(
    store: &dyn Store,
    application_id: &str,
    consumers: &Consumers,
    message: &Message,
) -> Result<bool> {
    if consumers.bot_by_user(&message.author_id).is_some() {
        return Ok(true);
    }
    Ok(store.get_user(application_id, &message.author_id).await?.is_some_and(|user| user.kind == UserKind::Bot))
}

async fn watches(store: &dyn Store, application_id: &str, conversation: &Conversation, user_id: &str) -> Result<bool> {
    let explicit = store.get_watch_mode(application_id, &conversation.id, user_id).await?;
    Ok(explicit.unwrap_or(conversation.context.is_none()))
}
