//! Domain ↔ wire conversions of the bots service, and the JSON form of an
//! application event used in outbound bodies and dead letters (the same
//! canonical proto3 JSON as the REST API, so a message looks the same
//! everywhere).

use beseda_core::bots::{ApplicationEvent, ApplicationEventKind, Bot, Delivery, Integration};
use beseda_core::{Error, Result};
use beseda_proto::v1 as wire;
use beseda_routing::convert::{button_to_wire, conversation_to_wire, message_to_wire, timestamp};
use serde_json::{Value, json};

pub fn bot_to_wire(bot: &Bot) -> wire::Bot {
    wire::Bot {
        id: bot.id.clone(),
        user_id: bot.user_id.clone(),
        bot_type: bot.bot_type.clone(),
        additional_parameters: bot.additional_parameters.clone().into_iter().collect(),
        predefined: bot.predefined,
        infobase_user_name: bot.infobase_user_name.clone(),
        created_at: Some(timestamp(bot.created_at)),
    }
}

/// The connection point URL of an integration on a server at `public_url`.
pub fn connection_point_url(public_url: &str, token: &str) -> String {
    format!("{}/webhooks/{token}", public_url.trim_end_matches('/'))
}

pub fn integration_to_wire(integration: &Integration, public_url: &str) -> wire::Integration {
    let webhook = integration.system_type == crate::webhook::WEBHOOK;
    wire::Integration {
        id: integration.id.clone(),
        external_system_type: integration.system_type.clone(),
        key: integration.key.clone(),
        r#use: integration.enabled,
        external_system_parameters: integration.parameters.clone().into_iter().collect(),
        presentation: integration.presentation.clone(),
        member_ids: integration.default_member_ids.clone(),
        message_editing_available: webhook,
        videoconferences_available: false,
        connection_point_url: connection_point_url(public_url, &integration.connection_token),
        signing_secret: integration.signing_secret.clone().unwrap_or_default(),
        created_at: Some(timestamp(integration.created_at)),
        strict_status_codes: integration.strict_status_codes,
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).map_err(|error| Error::internal(format!("cannot encode an event: {error}")))
}

/// `{"type": "message.created", "conversationId", "seq", "at", ...}` with
/// messages, conversations and bots in their REST API JSON form.
pub fn event_json(event: &ApplicationEvent) -> Result<Value> {
    let mut body = json!({
        "type": event.kind.name(),
        "conversationId": event.conversation_id,
        "seq": event.seq.to_string(),
        "at": to_json(&timestamp(event.at))?,
    });
    let extra = match &event.kind {
        ApplicationEventKind::MessageCreated { message }
        | ApplicationEventKind::MessageEdited { message }
        | ApplicationEventKind::MessageDeleted { message } => json!({ "message": to_json(&message_to_wire(message))? }),
        ApplicationEventKind::ConversationCreated { conversation } => {
            json!({ "conversation": to_json(&conversation_to_wire(conversation, 0))? })
        }
        ApplicationEventKind::ConversationChanged { conversation, added_member_ids, removed_member_ids } => json!({
            "conversation": to_json(&conversation_to_wire(conversation, 0))?,
            "addedMemberIds": added_member_ids,
            "removedMemberIds": removed_member_ids,
        }),
        ApplicationEventKind::ButtonPressed { message, button, row, column, user_id, bot_id } => json!({
            "message": to_json(&message_to_wire(message))?,
            "button": to_json(&button_to_wire(button))?,
            "row": row,
            "column": column,
            "userId": user_id,
            "botId": bot_id,
        }),
        ApplicationEventKind::BotCreated { bot }
        | ApplicationEventKind::BotUpdated { bot }
        | ApplicationEventKind::BotDeleted { bot } => json!({ "bot": to_json(&bot_to_wire(bot))? }),
    };
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    Ok(body)
}

pub fn dead_letter_to_wire(delivery: &Delivery) -> Result<wire::DeadLetter> {
    let event = event_json(&delivery.event)?;
    let event: pbjson_types::Struct = serde_json::from_value(event)
        .map_err(|error| Error::internal(format!("cannot encode a dead letter: {error}")))?;
    Ok(wire::DeadLetter {
        delivery_id: delivery.id,
        consumer_kind: delivery.consumer_kind.as_str().into(),
        consumer_id: delivery.consumer_id.clone(),
        kind: delivery.kind.clone(),
        conversation_id: delivery.event.conversation_id.clone(),
        seq: delivery.event.seq,
        attempts: delivery.attempts,
        last_error: delivery.last_error.clone(),
        created_at: Some(timestamp(delivery.created_at)),
        event: Some(event),
    })
}
