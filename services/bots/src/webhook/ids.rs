//! Ids derived from external ids: external user ids, idempotency keys, conversation keys.

use super::*;

// ---- ids -----------------------------------------------------------------------

/// ExternalSystemUserId of the user behind `extUserId`: unique per integration.
pub fn external_user_id(integration_id: &str, ext_user_id: &str) -> String {
    format!("{integration_id}:{ext_user_id}")
}

/// ExternalSystemUserId of the integration's own user (no colon, so it
/// never equals one of [`external_user_id`]).
pub fn own_external_user_id(integration_id: &str) -> String {
    integration_id.to_owned()
}

/// `<prefix>` when it fits in 256 characters, else a digest of it: keys and
/// client message ids are limited to 256 characters.
pub(super) fn bounded_id(plain: String, integration_id: &str) -> String {
    if beseda_core::rules::char_count(&plain) <= MAX_KEY_CHARS {
        return plain;
    }
    format!("webhook:{integration_id}:sha256:{}", hex::encode(Sha256::digest(plain.as_bytes())))
}

/// The idempotency key of a createMessage: a replay stores no second message.
pub fn client_message_id(integration_id: &str, ext_conversation_id: &str, ext_id: &str) -> String {
    bounded_id(format!("webhook:{integration_id}:{ext_conversation_id}:{ext_id}"), integration_id)
}

/// The key of a conversation the integration creates: makes a retried
/// createConversation find the conversation instead of making a second one,
/// and lets the application find it by key.
pub fn conversation_key(integration_id: &str, ext_conversation_id: &str) -> String {
    bounded_id(format!("webhook:{integration_id}:{ext_conversation_id}"), integration_id)
}
