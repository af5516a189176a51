//! Unit tests of the pure parts: parsing, signatures, HTML, data, ids.

use super::*;

fn bad(body: &str) -> Reject {
    let reject = parse(body.as_bytes()).expect_err("should be rejected");
    assert_eq!(reject.status, 400, "{body}: {reject:?}");
    reject
}

fn parsed(body: &str) -> Command {
    parse(body.as_bytes()).unwrap_or_else(|reject| panic!("{body}: {reject:?}"))
}

// ---- types

#[test]
fn only_webhook_is_offered_and_described() {
    assert_eq!(external_system_types().types, vec!["webhook"]);
    let description = describe("webhook").unwrap();
    assert!(description.parameters.iter().all(|parameter| !parameter.required));
    assert!(description.message_editing_available);
    assert!(!description.videoconferences_available);
    for unknown in ["Telegram", "WebChat", "", "WEBHOOK"] {
        assert_eq!(describe(unknown).unwrap_err().code, ErrorCode::ExternalSystemTypeUnsupported);
    }
}

// ---- the documented examples, byte for byte

#[test]
fn the_documented_examples_parse() {
    let command = parsed(
        r#"{ "createConversation": { "extConversationId": "1", "title": "Заголовок обсуждения", "extUserId": "1", "members": [ "1" ] } }"#,
    );
    assert_eq!(
        command,
        Command::CreateConversation(CreateConversation {
            ext_conversation_id: "1".into(),
            title: "Заголовок обсуждения".into(),
            ext_user_id: Some("1".into()),
            members: vec!["1".into()],
        })
    );
    let command = parsed(
        r#"{ "createMessage": { "extId": "1", "text": "Тест сообщения", "textFormat": "text/plain", "extUserId": "1", "extConversationId": "1", "data": "", "dataType": "" } }"#,
    );
    assert_eq!(
        command,
        Command::CreateMessage(CreateMessage {
            ext_id: "1".into(),
            ext_conversation_id: "1".into(),
            ext_user_id: Some("1".into()),
            text: MessageText { text: "Тест сообщения".into(), format: TextFormat::Plain },
            data: None,
        })
    );
    let command = parsed(
        r#"{ "updateConversation": { "extConversationId": "1", "title": "Новый заголовок обсуждения", "extUserId": "5", "addMembers": [ "5" ], "removeMembers": [ "1" ] } }"#,
    );
    assert_eq!(command.named_user_parameters(), vec!["extUserId", "addMembers", "removeMembers"]);
    let command = parsed(
        r#"{ "updateMessage": { "extId": "1", "text": "Тест сообщения", "textFormat": "text/plain", "extUserId": "1", "extConversationId": "1" } }"#,
    );
    assert_eq!(command.name(), "updateMessage");
    let command =
        parsed(r#"{ "createUser" : { "extUserId": "7", "name": "Ivan", "fullName": "", "picture": "iVBORw0KGgo=" } }"#);
    assert_eq!(
        command,
        Command::CreateUser(CreateUser {
            ext_user_id: "7".into(),
            name: "Ivan".into(),
            full_name: String::new(),
            picture: Some(b"\x89PNG\r\n\x1a\n".to_vec()),
        })
    );
    let command = parsed(r#"{ "updateUser" : { "extUserId": "7", "fullName": "Ivan Petrov" } }"#);
    assert_eq!(
        command,
        Command::UpdateUser(UpdateUser {
            ext_user_id: "7".into(),
            name: None,
            full_name: Some("Ivan Petrov".into()),
            picture: None,
        })
    );
}

#[test]
fn a_utf8_bom_is_tolerated_and_other_encodings_are_not() {
    let mut body = b"\xEF\xBB\xBF".to_vec();
    body.extend_from_slice(br#"{"updateUser": {"extUserId": "1", "name": "A"}}"#);
    assert_eq!(parse(&body).unwrap().name(), "updateUser");
    // "Тест" in Windows-1251.
    let mut latin = br#"{"updateUser": {"extUserId": "1", "name": ""#.to_vec();
    latin.extend_from_slice(b"\xD2\xE5\xF1\xF2\"}}");
    let reject = parse(&latin).unwrap_err();
    assert_eq!(reject.status, 400);
    assert!(reject.text.contains("UTF-8"), "{}", reject.text);
}

#[test]
fn the_envelope_is_checked() {
    assert!(bad("").text.contains("empty"));
    assert!(bad("{\"createMessage\": ").text.contains("not valid JSON"));
    assert!(bad("[1]").text.contains("JSON object"));
    assert!(bad("{}").text.contains("exactly one key"));
    assert!(bad(r#"{"createUser": {}, "updateUser": {}}"#).text.contains("exactly one"));
    let unknown = bad(r#"{"deleteMessage": {"extId": "1"}}"#);
    assert!(unknown.text.contains("`deleteMessage`"), "{}", unknown.text);
    for command in COMMANDS {
        assert!(unknown.text.contains(command), "{}", unknown.text);
    }
    assert!(bad(r#"{"createMessage": "hello"}"#).text.contains("must be an object"));
}

#[test]
fn missing_and_mistyped_fields_are_named() {
    let missing = bad(r#"{"createMessage": {"extId": "1", "text": "hi"}}"#);
    assert!(missing.text.contains("field `extConversationId` is required"), "{}", missing.text);
    let missing = bad(r#"{"createConversation": {"extConversationId": "1"}}"#);
    assert!(missing.text.contains("field `title` is required"), "{}", missing.text);
    let null = bad(r#"{"createUser": {"extUserId": null, "name": "A", "fullName": ""}}"#);
    assert!(null.text.contains("field `extUserId` is required"), "{}", null.text);
    let typed = bad(r#"{"createConversation": {"extConversationId": "1", "title": 5}}"#);
    assert!(typed.text.contains("field `title`") && typed.text.contains("a string"), "{}", typed.text);
    let typed = bad(r#"{"createConversation": {"extConversationId": "1", "title": "t", "members": "1"}}"#);
    assert!(typed.text.contains("field `members`"), "{}", typed.text);
    let typed = bad(r#"{"createConversation": {"extConversationId": "1", "title": "t", "members": ["1", true]}}"#);
    assert!(typed.text.contains("field `members[1]`"), "{}", typed.text);
    let typed = bad(r#"{"createConversation": {"extConversationId": 1.5, "title": "t"}}"#);
    assert!(typed.text.contains("field `extConversationId`"), "{}", typed.text);
    let typo = bad(r#"{"createMessage": {"extId": "1", "text": "hi", "extConversationId": "1", "extUserID": "2"}}"#);
    assert!(typo.text.contains("unknown field `extUserID`"), "{}", typo.text);
    let empty = bad(r#"{"createMessage": {"extId": "", "text": "hi", "extConversationId": "1"}}"#);
    assert!(empty.text.contains("field `extId`"), "{}", empty.text);
    let format =
        bad(r#"{"createMessage": {"extId": "1", "text": "hi", "extConversationId": "1", "textFormat": "markdown"}}"#);
    assert!(format.text.contains("textFormat"), "{}", format.text);
    let long = format!(r#"{{"createUser": {{"extUserId": "{}", "name": "A", "fullName": ""}}}}"#, "x".repeat(257));
    assert!(bad(&long).text.contains("longer than 256"));
    assert!(bad(r#"{"updateUser": {"extUserId": "1"}}"#).text.contains("changes nothing"));
    assert!(bad(r#"{"updateConversation": {"extConversationId": "1"}}"#).text.contains("changes nothing"));
    assert!(bad(r#"{"createUser": {"extUserId": "1", "name": " ", "fullName": ""}}"#).text.contains("`name`"));
    assert!(
        bad(r#"{"createUser": {"extUserId": "1", "name": "A", "fullName": "", "picture": "*"}}"#)
            .text
            .contains("`picture`")
    );
}

#[test]
fn integer_ids_empty_optional_ids_and_duplicates_are_normalised() {
    let command = parsed(
        r#"{"createConversation": {"extConversationId": 42, "title": "t", "extUserId": "", "members": [7, "7", "8"]}}"#,
    );
    assert_eq!(
        command,
        Command::CreateConversation(CreateConversation {
            ext_conversation_id: "42".into(),
            title: "t".into(),
            ext_user_id: None,
            members: vec!["7".into(), "8".into()],
        })
    );
}

#[test]
fn message_text_rules() {
    let too_long =
        format!(r#"{{"createMessage": {{"extId": "1", "extConversationId": "1", "text": "{}"}}}}"#, "ж".repeat(4001));
    assert!(bad(&too_long).text.contains("at most 4000"));
    assert!(
        bad(r#"{"createMessage": {"extId": "1", "extConversationId": "1", "text": " "}}"#)
            .text
            .contains("needs text or data")
    );
    let only_markup = bad(
        r#"{"createMessage": {"extId": "1", "extConversationId": "1", "text": "<img src=x>", "textFormat": "text/html"}}"#,
    );
    assert!(only_markup.text.contains("after removing unsupported HTML"), "{}", only_markup.text);
    // Data alone is a message.
    let Command::CreateMessage(message) =
        parsed(r#"{"createMessage": {"extId": "1", "extConversationId": "1", "text": "", "data": "x"}}"#)
    else {
        panic!("not createMessage")
    };
    assert_eq!(message.data.unwrap().mime_type, "text/plain");
    let Command::UpdateMessage(update) = parsed(
        r#"{"updateMessage": {"extId": "1", "extConversationId": "1", "text": "<b>x</b><script>y</script>", "textFormat": "TEXT/HTML"}}"#,
    ) else {
        panic!("not updateMessage")
    };
    assert_eq!(update.text, MessageText { text: "<b>x</b>".into(), format: TextFormat::Html });
}

// ---- the anonymous rule

#[test]
fn anonymous_conversations_refuse_named_users() {
    let message = parsed(r#"{"createMessage": {"extId": "1", "extConversationId": "c", "text": "hi"}}"#);
    assert!(check_anonymous("c", &message).is_ok());
    let named =
        parsed(r#"{"createMessage": {"extId": "1", "extConversationId": "c", "text": "hi", "extUserId": "u"}}"#);
    let reject = check_anonymous("c", &named).unwrap_err();
    assert_eq!(reject.status, 500, "the conversation's kind is stored, so this is not a 400");
    assert!(reject.text.contains("without extUserId") && reject.text.contains("carries extUserId"));
    let rename = parsed(r#"{"updateConversation": {"extConversationId": "c", "title": "New"}}"#);
    assert!(check_anonymous("c", &rename).is_ok());
    let add = parsed(r#"{"updateConversation": {"extConversationId": "c", "addMembers": ["u"]}}"#);
    assert!(check_anonymous("c", &add).unwrap_err().text.contains("carries addMembers"));
}

// ---- HTML

#[test]
fn html_keeps_only_the_allowed_elements_and_styles() {
    let cleaned = sanitize_html(
        r#"<b>bold</b><img src="x.png" onerror="alert(1)"><script>alert(1)</script><style>b{}</style><span style="color: red; position: absolute; font-weight: bold">red</span><div onclick="x()">plain</div><p>para</p><table><tr><td>cell</td></tr></table>"#,
    );
    assert_eq!(cleaned, r#"<b>bold</b><span style="color:red;font-weight:bold">red</span>plainparacell"#);
    for element in ALLOWED_ELEMENTS {
        let html = format!("<{element}>x</{element}>");
        let cleaned = sanitize_html(&html);
        assert!(cleaned.starts_with(&format!("<{element}")), "{element}: {cleaned}");
    }
    for property in ALLOWED_STYLE_PROPERTIES {
        let cleaned = sanitize_html(&format!(r#"<span style="{property}: inherit">x</span>"#));
        assert_eq!(cleaned, format!(r#"<span style="{property}:inherit">x</span>"#));
    }
}

#[test]
fn the_documented_html_example_is_stored_as_documented() {
    assert_eq!(
        sanitize_html(
            r#"<b>Shipped</b> by <span style="color: green; position: fixed">courier</span><img src="x.png"><script>alert(1)</script>"#
        ),
        r#"<b>Shipped</b> by <span style="color:green">courier</span>"#
    );
}

#[test]
fn html_links_and_fonts_keep_safe_attributes_only() {
    assert_eq!(
        sanitize_html(r#"<a href="https://example.com/x" target="_blank" class="c">x</a>"#),
        r#"<a href="https://example.com/x" rel="noopener noreferrer">x</a>"#
    );
    assert_eq!(sanitize_html(r#"<a href="javascript:alert(1)">x</a>"#), r#"<a rel="noopener noreferrer">x</a>"#);
    assert_eq!(
        sanitize_html(r#"<font color="red" face="Arial" size="3" id="f">x</font>"#),
        r#"<font color="red" face="Arial" size="3">x</font>"#
    );
    // Removed, not escaped: no visible junk.
    let cleaned = sanitize_html("<iframe src=x></iframe><object>o</object>text &amp; <u>more</u>");
    assert!(!cleaned.contains("&lt;"), "{cleaned}");
    assert!(cleaned.ends_with("text &amp; <u>more</u>"), "{cleaned}");
}

// ---- data

fn data(value: Value, data_type: &str) -> Outcome<Option<wire::MessageData>> {
    message_data(Some(&value), Some(data_type))
}

#[test]
fn data_maps_by_its_type() {
    let image = data(json!("iVBORw0KGgo="), "image/png").unwrap().unwrap();
    assert_eq!(image, wire::MessageData { mime_type: "image/png".into(), content: b"\x89PNG\r\n\x1a\n".to_vec() });
    let binary = data(json!("AAEC\n/w=="), "application/octet-stream").unwrap().unwrap();
    assert_eq!(binary.content, vec![0, 1, 2, 255]);
    assert_eq!(binary.mime_type, "application/octet-stream");
    let xdto = data(json!(r##"{"#type":"jxs:string","#value":"x"}"##), XDTO_JSON).unwrap().unwrap();
    assert_eq!(xdto.mime_type, XDTO_JSON);
    assert_eq!(xdto.content, br##"{"#type":"jxs:string","#value":"x"}"##.to_vec());
    let xdto_value = data(json!({"a": 1}), XDTO_JSON).unwrap().unwrap();
    assert_eq!(xdto_value.content, br#"{"a":1}"#.to_vec());
    let csv = data(json!("a;b\n1;2"), "text/csv").unwrap().unwrap();
    assert_eq!(csv, wire::MessageData { mime_type: "text/csv".into(), content: b"a;b\n1;2".to_vec() });
    let untyped = message_data(Some(&json!("just text")), None).unwrap().unwrap();
    assert_eq!(untyped.mime_type, "text/plain");
    assert_eq!(untyped.content, b"just text".to_vec());
    assert_eq!(message_data(Some(&json!("")), Some("image/png")).unwrap(), None);
    assert_eq!(message_data(None, Some("image/png")).unwrap(), None);
}

#[test]
fn bad_data_is_named() {
    for (value, data_type) in [(json!("not base64!"), "image/png"), (json!("%%"), "application/octet-stream")] {
        let reject = data(value, data_type).unwrap_err();
        assert_eq!(reject.status, 400);
        assert!(reject.text.contains("field `data`"), "{}", reject.text);
    }
    assert!(data(json!("{not json"), XDTO_JSON).unwrap_err().text.contains("field `data`"));
    assert!(data(json!(5), "text/csv").unwrap_err().text.contains("field `data`"));
    assert!(data(json!("x"), "nonsense").unwrap_err().text.contains("field `dataType`"));
    let huge = base64::engine::general_purpose::STANDARD.encode(vec![0u8; MAX_DATA_BYTES + 1]);
    assert!(data(json!(huge), "application/octet-stream").unwrap_err().text.contains("at most 102400"));
}

// ---- signatures

#[test]
fn signatures_are_hmac_sha256_of_the_body() {
    // RFC 4231 test case 2.
    assert_eq!(
        crate::signature::sign("Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    let body = br#"{"createUser": {"extUserId": "1", "name": "A", "fullName": ""}}"#;
    let good = crate::signature::sign("s3cret", body);
    assert!(check_signature(Some("s3cret"), body, &good).is_ok());
    assert!(check_signature(Some("s3cret"), body, &good.to_uppercase().replacen("SHA256", "sha256", 1)).is_ok());
    assert!(check_signature(None, body, "").is_ok());
    assert!(check_signature(Some(""), body, "").is_ok());
    let missing = check_signature(Some("s3cret"), body, "").unwrap_err();
    assert_eq!(missing.status, 401);
    assert!(missing.text.contains(SIGNATURE_HEADER) && missing.text.contains("sha256="));
    for wrong in
        [crate::signature::sign("other", body), "sha256=00".into(), "garbage".into(), good.replace("sha256=", "")]
    {
        assert_eq!(check_signature(Some("s3cret"), body, &wrong).unwrap_err().status, 401, "{wrong}");
    }
    let mut tampered = body.to_vec();
    tampered.push(b' ');
    assert_eq!(check_signature(Some("s3cret"), &tampered, &good).unwrap_err().status, 401);
}

// ---- ids

#[test]
fn ids_fit_the_limits() {
    assert_eq!(external_user_id("int", "7"), "int:7");
    assert_ne!(own_external_user_id("int"), external_user_id("int", ""));
    assert_eq!(client_message_id("int", "c", "m"), "webhook:int:c:m");
    assert_eq!(conversation_key("int", "c"), "webhook:int:c");
    let long = "x".repeat(MAX_KEY_CHARS);
    let id = client_message_id("int", &long, &long);
    assert!(id.chars().count() <= MAX_KEY_CHARS && id.starts_with("webhook:int:sha256:"), "{id}");
    assert_ne!(id, client_message_id("int", &long, "other"));
    assert!(conversation_key("int", &long).chars().count() <= MAX_KEY_CHARS);
}

#[test]
fn errors_become_texts_with_their_code() {
    let reject = Reject::from(Error::new(ErrorCode::ConversationNotFound, "no such conversation"));
    assert_eq!(reject, Reject { status: 500, text: "conversation_not_found: no such conversation".into() });
    assert_eq!(Reject::not_found().text, "No active integration");
}

#[test]
fn parsing_never_panics_on_odd_input() {
    let odd: &[&[u8]] = &[
        b"\xEF\xBB\xBF",
        b"\xFF\xFE{}",
        b"null",
        b"\"createUser\"",
        b"{\"createUser\": null}",
        b"{\"createMessage\": {\"extId\": {}, \"text\": [], \"extConversationId\": -1}}",
        b"{\"createMessage\": {\"extId\": \"1\", \"text\": \"x\", \"extConversationId\": \"1\", \"data\": [1], \"dataType\": \"image/png\"}}",
        b"{\"createMessage\": {\"extId\": \"1\", \"text\": \"x\", \"extConversationId\": \"1\", \"data\": \"x\", \"dataType\": \"/\"}}",
        b"{\"updateUser\": {\"extUserId\": \"\\u0000\", \"name\": \"x\"}}",
        b"{\"createUser\": {\"extUserId\": 18446744073709551615, \"name\": \"x\", \"fullName\": \"\"}}",
    ];
    for body in odd {
        let _ = parse(body);
    }
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(parse(deep.as_bytes()).unwrap_err().status, 400);
}

// ---- status codes

#[test]
fn a_title_over_the_limit_is_a_400_naming_it() {
    let title = "t".repeat(beseda_core::limits::MAX_TITLE_CHARS + 1);
    let created = bad(&format!(r#"{{"createConversation": {{"extConversationId": "c", "title": "{title}"}}}}"#));
    assert!(created.text.contains("field `title`") && created.text.contains("at most 1024"), "{}", created.text);
    let renamed = bad(&format!(r#"{{"updateConversation": {{"extConversationId": "c", "title": "{title}"}}}}"#));
    assert!(renamed.text.contains("field `title`"), "{}", renamed.text);
    let fits = "t".repeat(beseda_core::limits::MAX_TITLE_CHARS);
    parsed(&format!(r#"{{"createConversation": {{"extConversationId": "c", "title": "{fits}"}}}}"#));
}

#[test]
fn strict_integrations_answer_only_the_1c_codes() {
    // The 1C contract (§29.5.4): 200, 404, 409 and 500.
    for status in [200, 404, 409, 500] {
        assert_eq!(status_for(status, true), status);
        assert_eq!(status_for(status, false), status);
    }
    for status in [400, 401, 413] {
        assert_eq!(status_for(status, true), 500, "{status} in strict mode");
        assert_eq!(status_for(status, false), status, "{status} by default");
    }
}

#[test]
fn collaboration_rules_on_the_requests_values_are_400_and_the_rest_500() {
    let too_long = Reject::from(Error::new(ErrorCode::TextTooLong, "too long"));
    assert_eq!(too_long.status, 400);
    assert!(too_long.text.starts_with("text_too_long: "), "{}", too_long.text);
    let blocked = Reject::from(Error::new(ErrorCode::UserBlocked, "blocked"));
    assert_eq!(blocked.status, 500);
    let missing = Reject::from(Error::new(ErrorCode::UserNotFound, "no such user"));
    assert_eq!(missing.status, 500);
}
