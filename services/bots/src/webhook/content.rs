//! What a command's text and data become: sanitised HTML, message data by `dataType`.

use super::*;

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
    let length = beseda_core::rules::char_count(&stored);
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
pub(super) fn is_mime_type(text: &str) -> bool {
    let essence = text.split(';').next().unwrap_or_default().trim();
    let token =
        |part: &str| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || "!#$&^_.+-".contains(c));
    beseda_core::rules::char_count(text) <= MAX_NAME_CHARS
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
