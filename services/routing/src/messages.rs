//! Messages (§29.3.3, §29.4.4.3): send with idempotency, edit, delete, read,
//! list, the event log for resume, and who is notified of what (§29.3.4).

use std::collections::{BTreeSet, HashSet};

use beseda_core::limits::MAX_PAGE_SIZE;
use beseda_core::model::{
    ButtonPanel, Conversation, ConversationEvent, Message, MessageData, Micros, TextFormat, User, UserKind, now_micros,
};
use beseda_core::{Error, ErrorCode, Result, rules};
use beseda_proto::v1 as wire;
use beseda_store::{MessageQuery, NewMessage, UserQuery};
use tracing::Instrument;

use crate::conversations::ConversationSelector;
use crate::{Caller, RoutingService, convert};

/// Most events returned by one GetEvents call.
pub const MAX_EVENTS_PER_CALL: u32 = 1_000;

/// A message as requested by the sender.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    pub text: String,
    pub text_format: TextFormat,
    pub data: Option<MessageData>,
    pub recipient_ids: Vec<String>,
    pub buttons: Option<ButtonPanel>,
    pub client_message_id: Option<String>,
    /// Privileged mode only.
    pub author_id: Option<String>,
    pub date: Option<Micros>,
}

/// Changes to a message.
#[derive(Clone, Debug)]
pub struct MessageEdit {
    pub text: Option<String>,
    pub text_format: TextFormat,
    pub data: Option<MessageData>,
    pub buttons: Option<ButtonPanel>,
    pub clear_buttons: bool,
}

impl RoutingService {
    /// A bot's avatar: a user of kind Bot or the user of a bot object.
    pub(crate) async fn is_bot(&self, application_id: &str, user: &User) -> Result<bool> {
        if user.kind == UserKind::Bot {
            return Ok(true);
        }
        Ok(self.store.get_bot_by_user(application_id, &user.id).await?.is_some())
    }

    /// The author of a new message: the acting user, or whoever privileged
    /// mode names.
    async fn message_author(&self, caller: &Caller, acting: Option<User>, requested: Option<&str>) -> Result<User> {
        match requested {
            Some(author_id) => {
                caller.require_privileged("setting the author of a message")?;
                let author = self.store.get_user(&caller.application_id, author_id).await?.ok_or_else(|| {
                    crate::not_found(ErrorCode::UserNotFound, "user", author_id).with_field("authorId")
                })?;
                Ok(author)
            }
            None => acting.ok_or_else(|| {
                Error::new(
                    ErrorCode::FieldRequired,
                    "privileged mode without a user must name the message's `authorId`",
                )
                .with_field("authorId")
            }),
        }
    }

    /// Every user of the application, for conversations of all users.
    async fn all_user_ids(&self, application_id: &str) -> Result<Vec<User>> {
        let mut users = Vec::new();
        let mut query = UserQuery { limit: MAX_PAGE_SIZE, ..Default::default() };
        loop {
            let page = self.store.list_users(application_id, &query).await?;
            let full = page.len() == MAX_PAGE_SIZE as usize;
            query.after = page.last().map(|user| user.id.clone());
            users.extend(page);
            if !full {
                return Ok(users);
            }
        }
    }

    /// Who gets a notification for a new message (§29.3.4): in a context
    /// conversation its recipients plus those watching it; otherwise every
    /// member who has not switched watching off. Never the author,
    /// integration users or blocked users, and nobody for a conversation
    /// that is not displayed.
    async fn notification_targets(
        &self,
        caller: &Caller,
        conversation: &Conversation,
        message: &Message,
    ) -> Result<Vec<String>> {
        // API-only conversations (Displayed = false) are not shown to people,
        // so nobody is alerted about them.
        if !conversation.displayed {
            return Ok(Vec::new());
        }
        let audience = self.store.notification_audience(&caller.application_id, &conversation.id).await?;
        let watching =
            |user_id: &str| audience.watch_modes.iter().find(|(id, _)| id == user_id).map(|(_, watch)| *watch);
        let candidates: Vec<User> = if conversation.context.is_some() {
            let mut ids: BTreeSet<String> = message.recipient_ids.iter().cloned().collect();
            ids.extend(audience.watch_modes.iter().filter(|(_, watch)| *watch).map(|(id, _)| id.clone()));
            let ids: Vec<String> = ids.into_iter().collect();
            self.store.get_users(&caller.application_id, &ids).await?
        } else if conversation.all_application_users {
            self.all_user_ids(&caller.application_id)
                .await?
                .into_iter()
                .filter(|user| watching(&user.id) != Some(false))
                .collect()
        } else {
            let members: Vec<String> =
                conversation.member_ids.iter().filter(|id| watching(id) != Some(false)).cloned().collect();
            self.store.get_users(&caller.application_id, &members).await?
        };
        Ok(candidates
            .into_iter()
            .filter(|user| user.id != message.author_id && !user.blocked && user.kind.receives_notifications())
            .map(|user| user.id)
            .collect())
    }

    /// SendMessage (СоздатьСообщение / Записать).
    #[tracing::instrument(name = "routing.send_message", skip_all, fields(application_id = %caller.application_id))]
    pub async fn send_message(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
        outgoing: OutgoingMessage,
    ) -> Result<Message> {
        let (conversation, acting) = self.accessible_conversation_and_user(caller, selector).await?;
        if conversation.read_only && !caller.privileged {
            return Err(Error::new(
                ErrorCode::ConversationReadOnly,
                "the conversation is read-only; only the application may post",
            ));
        }
        if outgoing.date.is_some() {
            caller.require_privileged("setting the date of a message")?;
        }
        let author = self.message_author(caller, acting, outgoing.author_id.as_deref()).await?;
        if author.blocked {
            return Err(Error::new(ErrorCode::UserBlocked, format!("user `{}` is blocked", author.name)));
        }
        if caller.privileged
            && outgoing.author_id.is_some()
            && !self.can_access(&caller.application_id, &conversation, &author).await?
        {
            return Err(Error::new(
                ErrorCode::NotAMember,
                format!("author `{}` is not a member of the conversation", author.name),
            )
            .with_field("authorId"));
        }
        let text = rules::message_content(&outgoing.text, outgoing.text_format, outgoing.data.as_ref())?;
        if let Some(panel) = &outgoing.buttons {
            rules::button_panel(panel, self.is_bot(&caller.application_id, &author).await?)?;
        }
        if let Some(client_message_id) = &outgoing.client_message_id {
            rules::bounded_text("clientMessageId", client_message_id, beseda_core::limits::MAX_KEY_CHARS)?;
        }
        let recipient_ids: Vec<String> =
            outgoing.recipient_ids.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        let recipients = self.store.get_users(&caller.application_id, &recipient_ids).await?;
        for recipient_id in &recipient_ids {
            match recipients.iter().find(|user| &user.id == recipient_id) {
                None => {
                    return Err(
                        crate::not_found(ErrorCode::UserNotFound, "recipient", recipient_id).with_field("recipientIds")
                    );
                }
                Some(user) if user.blocked => {
                    return Err(Error::new(
                        ErrorCode::RecipientBlocked,
                        format!("recipient `{}` is blocked", user.name),
                    )
                    .with_field("recipientIds"));
                }
                Some(_) => {}
            }
        }
        if conversation.is_one_on_one() {
            let other_ids: Vec<String> =
                conversation.member_ids.iter().filter(|id| **id != author.id).cloned().collect();
            let others = self.store.get_users(&caller.application_id, &other_ids).await?;
            if let Some(blocked) = others.iter().find(|user| user.blocked) {
                return Err(Error::new(
                    ErrorCode::RecipientBlocked,
                    format!("user `{}` is blocked and cannot receive messages", blocked.name),
                ));
            }
        }
        let message = Message {
            id: beseda_core::model::new_id(),
            conversation_id: conversation.id.clone(),
            seq: 0,
            author_id: author.id.clone(),
            date: outgoing.date.unwrap_or_else(now_micros),
            text,
            text_format: outgoing.text_format,
            data: outgoing.data,
            recipient_ids,
            buttons: outgoing.buttons,
            client_message_id: outgoing.client_message_id,
            edited_at: None,
            deleted: false,
        };
        let notify_user_ids = self.notification_targets(caller, &conversation, &message).await?;
        // Everything that can fail is read before the commit. Once the message
        // is stored and published the send has happened: an error after that
        // point would make the client retry, and the retry (deduplicated by
        // clientMessageId) would find the message stored and skip the
        // notifications. So who has "do not disturb" on is decided here, at
        // the moment the message is decided, not after.
        let silenced: HashSet<String> = self
            .store
            .silenced_users(&caller.application_id, &conversation.id, &notify_user_ids, now_micros())
            .await?
            .into_iter()
            .collect();
        let outcome = self
            .store
            .append_message(&caller.application_id, &NewMessage { message, notify_user_ids })
            .instrument(tracing::info_span!("store.append_message"))
            .await?;
        let Some(event) = &outcome.event else {
            metrics::counter!("beseda_messages_deduplicated_total").increment(1);
            return Ok(outcome.message);
        };
        metrics::counter!("beseda_messages_stored_total").increment(1);
        // From here on nothing returns an error: publishing is best effort
        // (clients catch up from the event log) and the answer is the stored
        // message.
        self.publish_conversation_event(&caller.application_id, event).await;
        for unread in &outcome.unread {
            let silent = silenced.contains(&unread.user_id);
            let preview: String = outcome.message.text.chars().take(200).collect();
            self.publish_user_event(
                &caller.application_id,
                &unread.user_id,
                wire::user_event::Kind::Notification(wire::Notification {
                    conversation_id: conversation.id.clone(),
                    message_id: outcome.message.id.clone(),
                    author_id: outcome.message.author_id.clone(),
                    text: preview,
                    date: Some(convert::timestamp(outcome.message.date)),
                    silent,
                }),
            )
            .await;
            self.publish_user_event(
                &caller.application_id,
                &unread.user_id,
                wire::user_event::Kind::UnreadCount(wire::UnreadCount {
                    conversation_id: conversation.id.clone(),
                    unread_count: unread.unread_in_conversation,
                }),
            )
            .await;
        }
        Ok(outcome.message)
    }

    /// A message the caller may change: its author, or privileged mode.
    async fn own_message(&self, caller: &Caller, message_id: &str) -> Result<(Conversation, Message)> {
        let message = self
            .store
            .get_message(&caller.application_id, message_id)
            .await?
            .ok_or_else(|| crate::not_found(ErrorCode::MessageNotFound, "message", message_id))?;
        let conversation = self.accessible_conversation(caller, &message.conversation_id).await?;
        if !caller.privileged {
            let acting = self.acting_user(caller).await?;
            if acting.id != message.author_id {
                return Err(Error::new(
                    ErrorCode::PermissionDenied,
                    "only the author (or privileged mode) may change a message",
                ));
            }
            if conversation.read_only {
                return Err(Error::new(
                    ErrorCode::ConversationReadOnly,
                    "messages of a read-only conversation cannot be changed",
                ));
            }
        }
        if message.deleted {
            return Err(Error::new(ErrorCode::MessageDeleted, "the message was deleted"));
        }
        Ok((conversation, message))
    }

    #[tracing::instrument(name = "routing.edit_message", skip_all, fields(application_id = %caller.application_id))]
    pub async fn edit_message(&self, caller: &Caller, message_id: &str, edit: MessageEdit) -> Result<Message> {
        if edit.text.is_none() && edit.data.is_none() && edit.buttons.is_none() && !edit.clear_buttons {
            return Err(Error::new(
                ErrorCode::FieldRequired,
                "nothing to change: set text, data, buttons or clearButtons",
            )
            .with_field("text"));
        }
        let (_, mut message) = self.own_message(caller, message_id).await?;
        let author = self.store.get_user(&caller.application_id, &message.author_id).await?;
        if let Some(text) = edit.text {
            message.text = text;
            message.text_format = edit.text_format;
        }
        if edit.data.is_some() {
            message.data = edit.data;
        }
        if edit.clear_buttons {
            message.buttons = None;
        } else if edit.buttons.is_some() {
            message.buttons = edit.buttons;
        }
        message.text = rules::message_content(&message.text, message.text_format, message.data.as_ref())?;
        if let Some(panel) = &message.buttons {
            let author_is_bot = match &author {
                Some(author) => self.is_bot(&caller.application_id, author).await?,
                None => false,
            };
            rules::button_panel(panel, author_is_bot)?;
        }
        message.edited_at = Some(now_micros());
        let (stored, event) = self.store.edit_message(&caller.application_id, &message).await?;
        self.publish_conversation_event(&caller.application_id, &event).await;
        Ok(stored)
    }

    #[tracing::instrument(name = "routing.delete_message", skip_all, fields(application_id = %caller.application_id))]
    pub async fn delete_message(&self, caller: &Caller, message_id: &str) -> Result<()> {
        let (_, message) = self.own_message(caller, message_id).await?;
        let (_, event) = self.store.delete_message(&caller.application_id, &message.id, now_micros()).await?;
        self.publish_conversation_event(&caller.application_id, &event).await;
        Ok(())
    }

    pub async fn get_message(&self, caller: &Caller, message_id: &str) -> Result<Message> {
        let message = self
            .store
            .get_message(&caller.application_id, message_id)
            .await?
            .ok_or_else(|| crate::not_found(ErrorCode::MessageNotFound, "message", message_id))?;
        self.accessible_conversation(caller, &message.conversation_id).await?;
        Ok(message)
    }

    /// GetMessages (ПолучитьСообщения): within one conversation.
    pub async fn get_messages(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
        mut query: MessageQuery,
    ) -> Result<Vec<Message>> {
        let conversation = self.accessible_conversation_by(caller, selector).await?;
        query.conversation_id = conversation.id;
        if let Some(after) = &query.after {
            let anchor = self.store.get_message(&caller.application_id, after).await?;
            if anchor.is_none_or(|anchor| anchor.conversation_id != query.conversation_id) {
                return Err(Error::invalid("after", format!("message `{after}` is not in this conversation")));
            }
        }
        self.store.list_messages(&caller.application_id, &query).await
    }

    /// The conversation's events after `after_seq`, for resuming clients.
    pub async fn get_events(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
        after_seq: u64,
        limit: u32,
        max_bytes: u32,
    ) -> Result<(Vec<ConversationEvent>, bool)> {
        let conversation = self.accessible_conversation_by(caller, selector).await?;
        let limit = match limit {
            0 => MAX_EVENTS_PER_CALL,
            1..=MAX_EVENTS_PER_CALL => limit,
            _ => {
                return Err(Error::new(ErrorCode::CountOutOfRange, format!("limit is at most {MAX_EVENTS_PER_CALL}"))
                    .with_field("limit"));
            }
        };
        let (events, more) = match max_bytes {
            0 => {
                let events =
                    self.store.events_after(&caller.application_id, &conversation.id, after_seq, limit).await?;
                let more = events.len() == limit as usize;
                (events, more)
            }
            max_bytes => {
                let events = self
                    .store
                    .events_after_within(&caller.application_id, &conversation.id, after_seq, limit, max_bytes.into())
                    .await?;
                // A page cut by bytes is shorter than `limit`; the log's end
                // as read above tells whether anything follows it.
                let more = events.last().is_some_and(|last| last.seq < conversation.last_seq);
                (events, more)
            }
        };
        Ok((events, more))
    }

    /// MarkRead: notifications up to a message (or all) become read.
    pub async fn mark_read(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
        up_to_message_id: Option<&str>,
    ) -> Result<u32> {
        let acting = self.acting_user(caller).await?;
        let conversation = self.accessible_conversation_by(caller, selector).await?;
        let up_to_seq = match up_to_message_id {
            Some(message_id) => {
                let message = self
                    .store
                    .get_message(&caller.application_id, message_id)
                    .await?
                    .filter(|message| message.conversation_id == conversation.id)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorCode::MessageNotFound,
                            format!("message `{message_id}` is not in this conversation"),
                        )
                        .with_field("upToMessageId")
                    })?;
                message.seq
            }
            None => conversation.last_seq,
        };
        let remaining = self.store.mark_read(&caller.application_id, &conversation.id, &acting.id, up_to_seq).await?;
        self.publish_user_event(
            &caller.application_id,
            &acting.id,
            wire::user_event::Kind::UnreadCount(wire::UnreadCount {
                conversation_id: conversation.id,
                unread_count: remaining,
            }),
        )
        .await;
        Ok(remaining)
    }
}
