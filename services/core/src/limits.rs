//! Every limit of the product, in one place. These are requirements from the
//! 1C:Enterprise documentation (see ../shared/spec/SEED-DIGEST.md) and are
//! enforced by the server, never only by clients.

/// Message text. Every "characters" limit here counts UTF-16 code units, as
/// 1C does (its strings are UTF-16; an emoji is two characters): see
/// `rules::char_count`.
pub const MAX_TEXT_CHARS: usize = 4_000;
/// Serialized message data.
pub const MAX_DATA_BYTES: usize = 100 * 1024;
/// Explicit members of one conversation.
pub const MAX_MEMBERS: usize = 3_000;
pub const MAX_BUTTON_ROWS: usize = 10;
pub const MAX_BUTTONS_PER_ROW: usize = 10;
pub const MAX_BUTTONS: usize = 100;
/// Listing page size: default and maximum.
pub const DEFAULT_PAGE_SIZE: u32 = 200;
pub const MAX_PAGE_SIZE: u32 = 250;
/// The conversation list is padded to this many entries.
pub const CONVERSATION_LIST_SIZE: usize = 50;
/// Temporary administration codes and activation codes expire after this.
pub const TEMPORARY_CODE_TTL_MICROS: i64 = 24 * 3600 * 1_000_000;
/// WebSocket frame size (the original's maxFramePayloadLength).
pub const MAX_FRAME_BYTES: usize = 128 * 1024;
/// Title, name and key lengths, in characters.
pub const MAX_TITLE_CHARS: usize = 1_024;
pub const MAX_NAME_CHARS: usize = 256;
pub const MAX_KEY_CHARS: usize = 256;
/// User tokens may not live longer than this.
pub const MAX_USER_TOKEN_LIFETIME_SECONDS: i64 = 24 * 3600;
/// Additional parameters of a bot, or external system parameters of an integration.
pub const MAX_PARAMETERS: usize = 64;
/// Characters of one parameter value.
pub const MAX_PARAMETER_VALUE_CHARS: usize = 4_000;
/// Event subscriptions of one application.
pub const MAX_EVENT_SUBSCRIPTIONS: usize = 50;
/// Characters of an outbound URL.
pub const MAX_URL_CHARS: usize = 2_048;
/// Events one ReplayEvents call enqueues at most.
pub const MAX_REPLAY_EVENTS: usize = 100_000;
