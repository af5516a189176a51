//! Pressing a button of a message's panel (§29.4.4.3). The server carries
//! out the actions that need it: ProcessByBot (an event for the bot that
//! wrote the message, and for no one else) and SendMessage /
//! SendMessageWithData (a message from the presser). The other actions
//! (location, phone, client handler, navigation link) happen in the client.

use beseda_core::bots::{ApplicationEvent, ApplicationEventKind};
use beseda_core::model::{ButtonAction, Message, MessageData, TextFormat, now_micros};
use beseda_core::{Error, ErrorCode, Result};

use crate::conversations::ConversationSelector;
use crate::messages::OutgoingMessage;
use crate::{Caller, RoutingService};

/// What a press did.
#[derive(Debug)]
pub enum Pressed {
    /// Queued for the bot.
    QueuedForBot,
    /// Posted this message.
    Sent(Box<Message>),
}

impl RoutingService {
    pub async fn press_button(&self, caller: &Caller, message_id: &str, row: u32, column: u32) -> Result<Pressed> {
        let message = self.store.get_message(&caller.application_id, message_id).await?.ok_or_else(|| {
            crate::not_found(ErrorCode::MessageNotFound, "message", message_id).with_field("messageId")
        })?;
        let selector = ConversationSelector::Id(message.conversation_id.clone());
        let (_, acting) = self.accessible_conversation_and_user(caller, &selector).await?;
        let presser = acting.ok_or_else(|| {
            Error::new(ErrorCode::FieldRequired, "a button is pressed by a user: act as one (X-Beseda-Act-As-User)")
                .with_field("actAsUserId")
        })?;
        if message.deleted {
            return Err(Error::new(ErrorCode::MessageDeleted, "the message was deleted; its buttons are gone"));
        }
        let button = message
            .buttons
            .as_ref()
            .and_then(|panel| panel.rows.get(row as usize))
            .and_then(|buttons| buttons.get(column as usize))
            .cloned()
            .ok_or_else(|| {
                Error::invalid(
                    "row",
                    format!("the message has no button at row {row}, column {column} (both count from 0)"),
                )
            })?;
        if !button.enabled {
            return Err(Error::new(ErrorCode::ButtonDisabled, format!("button \"{}\" is disabled", button.text)));
        }
        match button.action {
            ButtonAction::ProcessByBot => {
                let bot =
                    self.store.get_bot_by_user(&caller.application_id, &message.author_id).await?.ok_or_else(|| {
                        Error::new(
                            ErrorCode::ButtonNotServerSide,
                            "the message was not written by a bot of this application, so no bot can process the press",
                        )
                    })?;
                let event = ApplicationEvent {
                    conversation_id: message.conversation_id.clone(),
                    seq: message.seq,
                    at: now_micros(),
                    kind: ApplicationEventKind::ButtonPressed {
                        message,
                        button,
                        row,
                        column,
                        user_id: presser.id,
                        bot_id: bot.id,
                    },
                };
                self.store.publish_event(&caller.application_id, &event).await?;
                self.outbox_signal.notify_one();
                Ok(Pressed::QueuedForBot)
            }
            ButtonAction::SendMessage | ButtonAction::SendMessageWithData => {
                let text =
                    if button.message_text.is_empty() { button.text.clone() } else { button.message_text.clone() };
                let data = (button.action == ButtonAction::SendMessageWithData && !button.data.is_empty()).then(|| {
                    MessageData { mime_type: "application/json".into(), content: button.data.clone().into_bytes() }
                });
                let outgoing = OutgoingMessage {
                    text,
                    text_format: TextFormat::Plain,
                    data,
                    recipient_ids: Vec::new(),
                    buttons: None,
                    client_message_id: None,
                    author_id: None,
                    date: None,
                };
                let acting_caller = Caller { user_id: Some(presser.id), ..caller.clone() };
                Ok(Pressed::Sent(Box::new(self.send_message(&acting_caller, &selector, outgoing).await?)))
            }
            ButtonAction::RequestLocation
            | ButtonAction::RequestPhone
            | ButtonAction::ProcessOnClient
            | ButtonAction::FollowNavigationLink => Err(Error::new(
                ErrorCode::ButtonNotServerSide,
                format!("button \"{}\" is handled by the client, not pressed on the server", button.text),
            )),
        }
    }
}
