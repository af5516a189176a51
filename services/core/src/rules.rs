//! Validation rules that do not need storage. Each returns a typed error that
//! names the field and says what is accepted.

use crate::error::{Error, ErrorCode, Result};
use crate::limits::*;
use crate::model::{Button, ButtonAction, ButtonKind, ButtonPanel, MessageData, TextFormat};

/// Page size for GetUsers / GetConversations / GetMessages: 0 means the default.
pub fn page_size(requested: u32) -> Result<u32> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        1..=MAX_PAGE_SIZE => Ok(requested),
        _ => Err(Error::new(
            ErrorCode::CountOutOfRange,
            format!("count {requested} is above the maximum of {MAX_PAGE_SIZE}"),
        )
        .with_field("count")),
    }
}

/// The length of a text as 1C counts it: 1C strings are UTF-16, so
/// "characters" are UTF-16 code units and a character outside the Basic
/// Multilingual Plane (most emoji) counts as two, as in the emoticon table of
/// §29.4.4.3 (`Символ(55357) + Символ(56898)`). Every text limit of
/// `limits.rs` is in these units, so a text 1C accepts is accepted here and
/// the other way round.
pub fn char_count(text: &str) -> usize {
    text.encode_utf16().count()
}

/// The longest prefix of `text` of at most `max_chars` characters as
/// [`char_count`] counts them, never splitting a character.
pub fn truncate_chars(text: &str, max_chars: usize) -> &str {
    let mut units = 0;
    for (index, character) in text.char_indices() {
        units += character.len_utf16();
        if units > max_chars {
            return &text[..index];
        }
    }
    text
}

/// A required short text such as a name or a title.
pub fn bounded_text(field: &str, text: &str, max_chars: usize) -> Result<()> {
    let length = char_count(text);
    if length > max_chars {
        return Err(Error::invalid(
            field,
            format!("`{field}` has {length} characters; at most {max_chars} are allowed"),
        ));
    }
    if text.chars().any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r') {
        return Err(Error::invalid(field, format!("`{field}` contains control characters")));
    }
    Ok(())
}

pub fn conversation_key(key: &str) -> Result<()> {
    if key.trim().is_empty() {
        return Err(Error::invalid("key", "`key` must not be blank; omit it for a conversation without a key"));
    }
    bounded_text("key", key, MAX_KEY_CHARS)
}

/// Lower-cases and checks an e-mail address.
pub fn normalize_email(email: &str) -> Result<String> {
    let trimmed = email.trim();
    if trimmed.is_empty() {
        return Err(Error::field_required("email"));
    }
    if !email_address::EmailAddress::is_valid(trimmed) {
        return Err(Error::new(ErrorCode::EmailInvalid, format!("`{trimmed}` is not a valid e-mail address"))
            .with_field("email"));
    }
    Ok(trimmed.to_lowercase())
}

/// Removes everything from formatted text but the allowed elements and style
/// properties — pictures included (§29.4.4.3). Disallowed markup is removed,
/// not escaped, so it never shows up as visible junk.
pub fn sanitize_formatted_text(html: &str) -> String {
    let tags: std::collections::HashSet<&str> =
        ["a", "b", "big", "br", "font", "i", "li", "ol", "p", "s", "small", "span", "strike", "strong", "u", "ul"]
            .into_iter()
            .collect();
    let styles: std::collections::HashSet<&str> =
        ["background-color", "color", "font-family", "font-size", "font-style", "font-weight", "text-decoration"]
            .into_iter()
            .collect();
    ammonia::Builder::default()
        .tags(tags)
        .add_generic_attributes(["style"])
        .add_tag_attributes("font", ["color", "face", "size"])
        .filter_style_properties(styles)
        .clean(html)
        .to_string()
}

/// Checks and normalizes the content of a new or edited message.
/// Returns the text to store (sanitized when formatted).
pub fn message_content(text: &str, format: TextFormat, data: Option<&MessageData>) -> Result<String> {
    let length = char_count(text);
    if length > MAX_TEXT_CHARS {
        return Err(Error::new(
            ErrorCode::TextTooLong,
            format!("text has {length} characters; at most {MAX_TEXT_CHARS} are allowed"),
        )
        .with_field("text"));
    }
    if let Some(data) = data {
        if data.content.len() > MAX_DATA_BYTES {
            return Err(Error::new(
                ErrorCode::DataTooLarge,
                format!("data has {} bytes; at most {MAX_DATA_BYTES} are allowed", data.content.len()),
            )
            .with_field("data"));
        }
        if data.mime_type.trim().is_empty() {
            return Err(Error::field_required("data.mimeType"));
        }
    }
    let stored = match format {
        TextFormat::Plain => text.to_owned(),
        TextFormat::Formatted => sanitize_formatted_text(text),
    };
    if stored.trim().is_empty() && data.is_none() {
        return Err(Error::new(ErrorCode::MessageEmpty, "a message needs text or data").with_field("text"));
    }
    Ok(stored)
}

/// Checks a button panel's shape and each button.
/// `author_is_bot`: ProcessByBot is allowed only on buttons a bot created.
pub fn button_panel(panel: &ButtonPanel, author_is_bot: bool) -> Result<()> {
    if panel.rows.len() > MAX_BUTTON_ROWS {
        return Err(Error::new(
            ErrorCode::ButtonPanelTooLarge,
            format!("the panel has {} rows; at most {MAX_BUTTON_ROWS} are allowed", panel.rows.len()),
        )
        .with_field("buttons.rows"));
    }
    let mut total = 0;
    for (row_index, row) in panel.rows.iter().enumerate() {
        if row.len() > MAX_BUTTONS_PER_ROW {
            return Err(Error::new(
                ErrorCode::ButtonPanelTooLarge,
                format!("row {row_index} has {} buttons; at most {MAX_BUTTONS_PER_ROW} are allowed", row.len()),
            )
            .with_field(format!("buttons.rows[{row_index}]")));
        }
        total += row.len();
        for (button_index, button) in row.iter().enumerate() {
            single_button(button, author_is_bot)
                .map_err(|error| error.with_field(format!("buttons.rows[{row_index}].buttons[{button_index}]")))?;
        }
    }
    if total > MAX_BUTTONS {
        return Err(Error::new(
            ErrorCode::ButtonPanelTooLarge,
            format!("the panel has {total} buttons; at most {MAX_BUTTONS} are allowed"),
        )
        .with_field("buttons"));
    }
    Ok(())
}

fn single_button(button: &Button, author_is_bot: bool) -> Result<()> {
    let invalid = |message: &str| Error::new(ErrorCode::InvalidButton, message.to_owned());
    if button.text.trim().is_empty() {
        return Err(invalid("a button needs text"));
    }
    if char_count(&button.text) > MAX_NAME_CHARS {
        return Err(invalid("button text is longer than 256 characters"));
    }
    if char_count(&button.message_text) > MAX_TEXT_CHARS {
        return Err(invalid("button message text is longer than 4,000 characters"));
    }
    if !button.data.is_empty() && serde_json::from_str::<serde_json::Value>(&button.data).is_err() {
        return Err(invalid("button data must be JSON text"));
    }
    match button.action {
        ButtonAction::ProcessByBot if !author_is_bot => {
            return Err(invalid("ProcessByBot is allowed only on buttons of messages a bot sends"));
        }
        ButtonAction::FollowNavigationLink if button.navigation_link.trim().is_empty() => {
            return Err(invalid("FollowNavigationLink needs navigationLink"));
        }
        _ => {}
    }
    if button.kind == ButtonKind::Hyperlink
        && button.action == ButtonAction::SendMessageWithData
        && button.data.is_empty()
    {
        return Err(invalid("SendMessageWithData needs data"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn button(action: ButtonAction) -> Button {
        Button {
            kind: ButtonKind::Button,
            text: "OK".into(),
            message_text: String::new(),
            data: String::new(),
            action,
            enabled: true,
            action_name: String::new(),
            picture: Vec::new(),
            navigation_link: String::new(),
        }
    }

    #[test]
    fn text_of_exactly_4000_characters_is_accepted_and_4001_rejected() {
        let at_limit: String = "ж".repeat(MAX_TEXT_CHARS);
        assert!(message_content(&at_limit, TextFormat::Plain, None).is_ok());
        let over = format!("{at_limit}ж");
        let error = message_content(&over, TextFormat::Plain, None).unwrap_err();
        assert_eq!(error.code, ErrorCode::TextTooLong);
        assert_eq!(error.field.as_deref(), Some("text"));
    }

    #[test]
    fn emoji_count_as_two_characters_like_utf16_in_1c() {
        // U+1F642 is Символ(55357) + Символ(56898) in 1C: two characters.
        assert_eq!(char_count("🙂"), 2);
        assert_eq!(char_count("ж"), 1);
        let at_limit = "🙂".repeat(MAX_TEXT_CHARS / 2);
        assert!(message_content(&at_limit, TextFormat::Plain, None).is_ok());
        let error = message_content(&format!("{at_limit}a"), TextFormat::Plain, None).unwrap_err();
        assert_eq!(error.code, ErrorCode::TextTooLong);
        assert_eq!(error.message, "text has 4001 characters; at most 4000 are allowed");
        // 3,999 Cyrillic letters and one emoji: 4,001 characters, although
        // only 4,000 Unicode scalar values.
        let mixed = format!("{}🙂", "ж".repeat(MAX_TEXT_CHARS - 1));
        assert_eq!(message_content(&mixed, TextFormat::Plain, None).unwrap_err().code, ErrorCode::TextTooLong);
    }

    #[test]
    fn names_and_button_texts_count_emoji_as_two() {
        let name_at_limit = "🎉".repeat(MAX_NAME_CHARS / 2);
        assert!(bounded_text("name", &name_at_limit, MAX_NAME_CHARS).is_ok());
        let over = format!("{name_at_limit}я");
        assert_eq!(bounded_text("name", &over, MAX_NAME_CHARS).unwrap_err().field.as_deref(), Some("name"));
        let mut long_caption = button(ButtonAction::SendMessage);
        long_caption.text = over;
        let panel = ButtonPanel { rows: vec![vec![long_caption]] };
        assert_eq!(button_panel(&panel, false).unwrap_err().code, ErrorCode::InvalidButton);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_chars("ab🙂c", 3), "ab");
        assert_eq!(truncate_chars("ab🙂c", 4), "ab🙂");
        assert_eq!(truncate_chars("жж", 5), "жж");
    }

    #[test]
    fn data_of_100_kb_is_accepted_and_one_byte_more_rejected() {
        let mut data = MessageData { mime_type: "application/octet-stream".into(), content: vec![0; MAX_DATA_BYTES] };
        assert!(message_content("", TextFormat::Plain, Some(&data)).is_ok());
        data.content.push(0);
        assert_eq!(message_content("", TextFormat::Plain, Some(&data)).unwrap_err().code, ErrorCode::DataTooLarge);
    }

    #[test]
    fn empty_message_is_rejected() {
        assert_eq!(message_content("  ", TextFormat::Plain, None).unwrap_err().code, ErrorCode::MessageEmpty);
    }

    #[test]
    fn formatted_text_loses_pictures_and_scripts_but_keeps_allowed_markup() {
        let cleaned = sanitize_formatted_text(
            r#"<b>bold</b><img src="x.png"><script>alert(1)</script><span style="color: red; position: absolute">red</span>"#,
        );
        assert_eq!(cleaned, r#"<b>bold</b><span style="color:red">red</span>"#);
    }

    #[test]
    fn button_panel_limits() {
        let row = vec![button(ButtonAction::SendMessage); 10];
        let full = ButtonPanel { rows: vec![row.clone(); 10] };
        assert!(button_panel(&full, false).is_ok());
        let too_many_rows = ButtonPanel { rows: vec![row.clone(); 11] };
        assert_eq!(button_panel(&too_many_rows, false).unwrap_err().code, ErrorCode::ButtonPanelTooLarge);
        let long_row = ButtonPanel { rows: vec![vec![button(ButtonAction::SendMessage); 11]] };
        assert_eq!(button_panel(&long_row, false).unwrap_err().code, ErrorCode::ButtonPanelTooLarge);
    }

    #[test]
    fn process_by_bot_needs_a_bot_author() {
        let panel = ButtonPanel { rows: vec![vec![button(ButtonAction::ProcessByBot)]] };
        let error = button_panel(&panel, false).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidButton);
        assert_eq!(error.field.as_deref(), Some("buttons.rows[0].buttons[0]"));
        assert!(button_panel(&panel, true).is_ok());
    }

    #[test]
    fn page_size_defaults_and_caps() {
        assert_eq!(page_size(0).unwrap(), 200);
        assert_eq!(page_size(250).unwrap(), 250);
        assert_eq!(page_size(251).unwrap_err().code, ErrorCode::CountOutOfRange);
    }

    #[test]
    fn email_is_normalized_and_validated() {
        assert_eq!(normalize_email(" Admin@Example.COM ").unwrap(), "admin@example.com");
        assert_eq!(normalize_email("not-an-email").unwrap_err().code, ErrorCode::EmailInvalid);
    }
}
