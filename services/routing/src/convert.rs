//! Conversions between wire (protobuf) and domain types, in one place.
//! Incoming values are validated here only for shape (enums known, required
//! nested messages present); domain rules are checked by the operations.

use beseda_core::model::{self as domain, Micros};
use beseda_core::{Error, Result};
use beseda_proto::Timestamp;
use beseda_proto::v1 as wire;

pub fn timestamp(micros: Micros) -> Timestamp {
    Timestamp { seconds: micros.div_euclid(1_000_000), nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32 }
}

pub fn optional_timestamp(micros: Option<Micros>) -> Option<Timestamp> {
    micros.map(timestamp)
}

pub fn micros(timestamp: &Timestamp) -> Micros {
    timestamp.seconds.saturating_mul(1_000_000).saturating_add(i64::from(timestamp.nanos) / 1_000)
}

pub fn non_empty(text: &str) -> Option<String> {
    Some(text.trim()).filter(|text| !text.is_empty()).map(str::to_owned)
}

pub fn user_kind_to_wire(kind: domain::UserKind) -> wire::UserKind {
    match kind {
        domain::UserKind::Regular => wire::UserKind::Regular,
        domain::UserKind::Bot => wire::UserKind::Bot,
        domain::UserKind::Integration => wire::UserKind::Integration,
        domain::UserKind::External => wire::UserKind::External,
        domain::UserKind::Guest => wire::UserKind::Guest,
    }
}

pub fn user_kind_from_wire(kind: i32) -> Result<Option<domain::UserKind>> {
    match wire::UserKind::try_from(kind) {
        Ok(wire::UserKind::Unspecified) => Ok(None),
        Ok(wire::UserKind::Regular) => Ok(Some(domain::UserKind::Regular)),
        Ok(wire::UserKind::Bot) => Ok(Some(domain::UserKind::Bot)),
        Ok(wire::UserKind::Integration) => Ok(Some(domain::UserKind::Integration)),
        Ok(wire::UserKind::External) => Ok(Some(domain::UserKind::External)),
        Ok(wire::UserKind::Guest) => Ok(Some(domain::UserKind::Guest)),
        Err(_) => Err(Error::invalid("kind", format!("unknown user kind {kind}"))),
    }
}

pub fn user_to_wire(user: &domain::User) -> wire::User {
    wire::User {
        id: user.id.clone(),
        kind: user_kind_to_wire(user.kind) as i32,
        name: user.name.clone(),
        full_name: user.full_name.clone(),
        picture: user.picture.clone(),
        phone: user.phone.clone(),
        email: user.email.clone(),
        matching_key: user.matching_key.clone(),
        infobase_user_id: user.infobase_user_id.clone().unwrap_or_default(),
        blocked: user.blocked,
        subscriber_administrator: user.subscriber_administrator,
        external_system_type: user.external_system_type.clone(),
        external_system_user_id: user.external_system_user_id.clone(),
        authentication_email: user.authentication_email.clone(),
        created_at: Some(timestamp(user.created_at)),
    }
}

pub fn context_to_wire(context: &domain::ContextRef) -> wire::ContextRef {
    wire::ContextRef {
        object_type: context.object_type.clone(),
        object_id: context.object_id.clone(),
        presentation: context.presentation.clone(),
    }
}

pub fn context_from_wire(context: &wire::ContextRef) -> Result<domain::ContextRef> {
    if context.object_type.trim().is_empty() {
        return Err(Error::field_required("context.objectType"));
    }
    if context.object_id.trim().is_empty() {
        return Err(Error::field_required("context.objectId"));
    }
    Ok(domain::ContextRef {
        object_type: context.object_type.trim().to_owned(),
        object_id: context.object_id.trim().to_owned(),
        presentation: context.presentation.clone(),
    })
}

pub fn conversation_to_wire(conversation: &domain::Conversation, unread_count: u32) -> wire::Conversation {
    wire::Conversation {
        id: conversation.id.clone(),
        key: conversation.key.clone().unwrap_or_default(),
        title: conversation.title.clone(),
        displayed: Some(conversation.displayed),
        read_only: conversation.read_only,
        group: conversation.group,
        context: conversation.context.as_ref().map(context_to_wire),
        member_ids: conversation.member_ids.clone(),
        all_application_users: conversation.all_application_users,
        integration_id: conversation.integration_id.clone(),
        created_at: Some(timestamp(conversation.created_at)),
        last_message_at: optional_timestamp(conversation.last_message_at),
        last_seq: conversation.last_seq,
        unread_count,
    }
}

pub fn text_format_from_wire(format: i32) -> Result<domain::TextFormat> {
    match wire::TextFormat::try_from(format) {
        Ok(wire::TextFormat::Unspecified | wire::TextFormat::Plain) => Ok(domain::TextFormat::Plain),
        Ok(wire::TextFormat::Formatted) => Ok(domain::TextFormat::Formatted),
        Err(_) => Err(Error::invalid("textFormat", format!("unknown text format {format}"))),
    }
}

fn text_format_to_wire(format: domain::TextFormat) -> wire::TextFormat {
    match format {
        domain::TextFormat::Plain => wire::TextFormat::Plain,
        domain::TextFormat::Formatted => wire::TextFormat::Formatted,
    }
}

pub fn data_from_wire(data: Option<&wire::MessageData>) -> Option<domain::MessageData> {
    data.map(|data| domain::MessageData { mime_type: data.mime_type.clone(), content: data.content.clone() })
}

fn button_from_wire(button: &wire::Button) -> Result<domain::Button> {
    let kind = match wire::ButtonKind::try_from(button.kind) {
        Ok(wire::ButtonKind::Unspecified | wire::ButtonKind::Button) => domain::ButtonKind::Button,
        Ok(wire::ButtonKind::Hyperlink) => domain::ButtonKind::Hyperlink,
        Err(_) => return Err(Error::invalid("kind", format!("unknown button kind {}", button.kind))),
    };
    let action = match wire::ButtonAction::try_from(button.action) {
        // A button added with its caption only sends that caption (§29.4.4.3.2).
        Ok(wire::ButtonAction::Unspecified | wire::ButtonAction::SendMessage) => domain::ButtonAction::SendMessage,
        Ok(wire::ButtonAction::RequestLocation) => domain::ButtonAction::RequestLocation,
        Ok(wire::ButtonAction::RequestPhone) => domain::ButtonAction::RequestPhone,
        Ok(wire::ButtonAction::ProcessByBot) => domain::ButtonAction::ProcessByBot,
        Ok(wire::ButtonAction::ProcessOnClient) => domain::ButtonAction::ProcessOnClient,
        Ok(wire::ButtonAction::SendMessageWithData) => domain::ButtonAction::SendMessageWithData,
        Ok(wire::ButtonAction::FollowNavigationLink) => domain::ButtonAction::FollowNavigationLink,
        Err(_) => return Err(Error::invalid("action", format!("unknown button action {}", button.action))),
    };
    Ok(domain::Button {
        kind,
        text: button.text.clone(),
        message_text: button.message_text.clone(),
        data: button.data.clone(),
        action,
        // Buttons are enabled unless disabled explicitly, as in 1C.
        enabled: button.enabled.unwrap_or(true),
        action_name: button.action_name.clone(),
        picture: button.picture.clone(),
        navigation_link: button.navigation_link.clone(),
    })
}

pub fn button_to_wire(button: &domain::Button) -> wire::Button {
    let action = match button.action {
        domain::ButtonAction::RequestLocation => wire::ButtonAction::RequestLocation,
        domain::ButtonAction::RequestPhone => wire::ButtonAction::RequestPhone,
        domain::ButtonAction::ProcessByBot => wire::ButtonAction::ProcessByBot,
        domain::ButtonAction::ProcessOnClient => wire::ButtonAction::ProcessOnClient,
        domain::ButtonAction::SendMessage => wire::ButtonAction::SendMessage,
        domain::ButtonAction::SendMessageWithData => wire::ButtonAction::SendMessageWithData,
        domain::ButtonAction::FollowNavigationLink => wire::ButtonAction::FollowNavigationLink,
    };
    let kind = match button.kind {
        domain::ButtonKind::Button => wire::ButtonKind::Button,
        domain::ButtonKind::Hyperlink => wire::ButtonKind::Hyperlink,
    };
    wire::Button {
        kind: kind as i32,
        text: button.text.clone(),
        message_text: button.message_text.clone(),
        data: button.data.clone(),
        action: action as i32,
        // Always written, so that readers never depend on the default.
        enabled: Some(button.enabled),
        action_name: button.action_name.clone(),
        picture: button.picture.clone(),
        navigation_link: button.navigation_link.clone(),
    }
}

/// `None` for an absent or empty panel.
pub fn button_panel_from_wire(panel: Option<&wire::ButtonPanel>) -> Result<Option<domain::ButtonPanel>> {
    let Some(panel) = panel.filter(|panel| !panel.rows.is_empty()) else {
        return Ok(None);
    };
    let mut rows = Vec::with_capacity(panel.rows.len());
    for (row_index, row) in panel.rows.iter().enumerate() {
        let mut buttons = Vec::with_capacity(row.buttons.len());
        for (button_index, button) in row.buttons.iter().enumerate() {
            buttons.push(button_from_wire(button).map_err(|error| {
                let inner = error.field.clone().unwrap_or_default();
                error.with_field(format!("buttons.rows[{row_index}].buttons[{button_index}].{inner}"))
            })?);
        }
        rows.push(buttons);
    }
    Ok(Some(domain::ButtonPanel { rows }))
}

pub fn message_to_wire(message: &domain::Message) -> wire::Message {
    wire::Message {
        id: message.id.clone(),
        conversation_id: message.conversation_id.clone(),
        seq: message.seq,
        author_id: message.author_id.clone(),
        date: Some(timestamp(message.date)),
        text: message.text.clone(),
        text_format: text_format_to_wire(message.text_format) as i32,
        data: message
            .data
            .as_ref()
            .map(|data| wire::MessageData { mime_type: data.mime_type.clone(), content: data.content.clone() }),
        recipient_ids: message.recipient_ids.clone(),
        buttons: message.buttons.as_ref().map(|panel| wire::ButtonPanel {
            rows: panel
                .rows
                .iter()
                .map(|row| wire::ButtonRow { buttons: row.iter().map(button_to_wire).collect() })
                .collect(),
        }),
        client_message_id: message.client_message_id.clone().unwrap_or_default(),
        edited_at: optional_timestamp(message.edited_at),
        deleted: message.deleted,
    }
}

pub fn event_to_wire(event: &domain::ConversationEvent) -> wire::ConversationEvent {
    use wire::conversation_event::Kind;
    let kind = match &event.kind {
        domain::EventKind::MessageCreated(message) => Kind::MessageCreated(message_to_wire(message)),
        domain::EventKind::MessageEdited(message) => Kind::MessageEdited(message_to_wire(message)),
        domain::EventKind::MessageDeleted(message) => Kind::MessageDeleted(message_to_wire(message)),
        domain::EventKind::ConversationChanged(conversation) => {
            Kind::ConversationChanged(conversation_to_wire(conversation, 0))
        }
    };
    wire::ConversationEvent {
        conversation_id: event.conversation_id.clone(),
        seq: event.seq,
        at: Some(timestamp(event.at)),
        kind: Some(kind),
    }
}

pub fn sort_direction_from_wire(direction: i32) -> Result<domain::SortDirection> {
    match wire::SortDirection::try_from(direction) {
        Ok(wire::SortDirection::Unspecified | wire::SortDirection::Ascending) => Ok(domain::SortDirection::Ascending),
        Ok(wire::SortDirection::Descending) => Ok(domain::SortDirection::Descending),
        Err(_) => Err(Error::invalid("sortDirection", format!("unknown sort direction {direction}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for value in [0, 1, 1_700_000_000_123_456, -1, -1_500_000] {
            assert_eq!(micros(&timestamp(value)), value);
        }
    }

    #[test]
    fn an_unknown_button_action_names_its_position() {
        let button = wire::Button { text: "Yes".into(), action: 99, ..Default::default() };
        let panel = wire::ButtonPanel { rows: vec![wire::ButtonRow { buttons: vec![button] }] };
        let error = button_panel_from_wire(Some(&panel)).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("buttons.rows[0].buttons[0].action"));
    }

    /// Decodes a panel from the binary encoding, as a WebSocket binary frame
    /// or an internal gRPC call carries it.
    fn panel_through_protobuf(buttons: Vec<wire::Button>) -> domain::ButtonPanel {
        use prost::Message as _;
        let bytes = wire::ButtonPanel { rows: vec![wire::ButtonRow { buttons }] }.encode_to_vec();
        let decoded = wire::ButtonPanel::decode(bytes.as_slice()).unwrap();
        button_panel_from_wire(Some(&decoded)).unwrap().unwrap()
    }

    #[test]
    fn a_caption_only_button_is_an_enabled_send_message_button_in_protobuf() {
        let panel =
            panel_through_protobuf(vec![wire::Button { text: "Кнопка 1 1".into(), ..Default::default() }]);
        let button = &panel.rows[0][0];
        assert_eq!(button.action, domain::ButtonAction::SendMessage);
        assert_eq!(button.kind, domain::ButtonKind::Button);
        assert!(button.enabled);
    }

    #[test]
    fn an_explicitly_disabled_button_stays_disabled_in_protobuf() {
        let panel = panel_through_protobuf(vec![wire::Button {
            text: "Later".into(),
            enabled: Some(false),
            ..Default::default()
        }]);
        assert!(!panel.rows[0][0].enabled);
        let written = button_to_wire(&panel.rows[0][0]);
        assert_eq!(written.enabled, Some(false), "answers always carry enabled");
    }

    #[test]
    fn a_caption_only_button_is_an_enabled_send_message_button_in_json() {
        let decoded: wire::ButtonPanel =
            serde_json::from_str(r#"{"rows": [{"buttons": [{"text": "Да"}, {"text": "Нет", "enabled": false}]}]}"#)
                .unwrap();
        let panel = button_panel_from_wire(Some(&decoded)).unwrap().unwrap();
        assert_eq!(panel.rows[0][0].action, domain::ButtonAction::SendMessage);
        assert!(panel.rows[0][0].enabled);
        assert!(!panel.rows[0][1].enabled);
    }
}
