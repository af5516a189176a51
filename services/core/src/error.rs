//! The one error type of Beseda's domain. Each [`ErrorCode`] has a stable
//! string that travels to clients (HTTP JSON body, WebSocket `Error` frame,
//! gRPC metadata) and a class that fixes its HTTP status and gRPC code once.
//! docs/errors.md lists every code; a test keeps the two in step.

use std::fmt;

/// How an error is classified on every transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Internal,
}

impl ErrorClass {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorClass::InvalidArgument => 400,
            ErrorClass::Unauthenticated => 401,
            ErrorClass::PermissionDenied => 403,
            ErrorClass::NotFound => 404,
            ErrorClass::AlreadyExists => 409,
            ErrorClass::FailedPrecondition => 409,
            ErrorClass::ResourceExhausted => 429,
            ErrorClass::Unavailable => 503,
            ErrorClass::Internal => 500,
        }
    }
}

macro_rules! error_codes {
    ($( $variant:ident = $code:literal, $class:ident, $remedy:literal; )*) => {
        /// Stable, documented error codes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $( $variant, )* }

        impl ErrorCode {
            /// Every code, in documentation order.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            /// The stable string clients match on.
            pub fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $code, )* }
            }

            pub fn class(self) -> ErrorClass {
                match self { $( ErrorCode::$variant => ErrorClass::$class, )* }
            }

            /// What the caller should do about it; shown in docs/errors.md.
            pub fn remedy(self) -> &'static str {
                match self { $( ErrorCode::$variant => $remedy, )* }
            }

            pub fn from_code_str(code: &str) -> Option<ErrorCode> {
                match code { $( $code => Some(ErrorCode::$variant), )* _ => None }
            }
        }
    };
}

error_codes! {
    MalformedRequest = "malformed_request", InvalidArgument, "Fix the request body or frame so that it parses as the documented JSON or protobuf message.";
    FieldRequired = "field_required", InvalidArgument, "Set the field named in `field`.";
    InvalidValue = "invalid_value", InvalidArgument, "Correct the field named in `field`; the message says what is accepted.";
    TextTooLong = "text_too_long", InvalidArgument, "Shorten the message text to at most 4,000 characters or send the rest as another message.";
    DataTooLarge = "data_too_large", InvalidArgument, "Keep message data at most 100 KB (102,400 bytes); send larger content as an attachment.";
    MessageEmpty = "message_empty", InvalidArgument, "A message needs text or data; set one of them.";
    TooManyMembers = "too_many_members", InvalidArgument, "A conversation has at most 3,000 members; use allApplicationUsers for everyone.";
    ButtonPanelTooLarge = "button_panel_too_large", InvalidArgument, "A button panel has at most 10 rows, 10 buttons a row and 100 buttons in all.";
    InvalidButton = "invalid_button", InvalidArgument, "Fix the button named in `field`: it needs text, a known action and what that action requires.";
    CountOutOfRange = "count_out_of_range", InvalidArgument, "Ask for 1 to 250 objects per page (the default is 200).";
    EmailInvalid = "email_invalid", InvalidArgument, "Give a valid e-mail address, e.g. admin@example.com.";
    Unauthenticated = "unauthenticated", Unauthenticated, "Send credentials: `Authorization: Bearer <user token>` or `Authorization: Application <id>:<key>`.";
    TokenInvalid = "token_invalid", Unauthenticated, "Sign the user token with the application key issued at registration (HS256) and set iss to the application id.";
    TokenExpired = "token_expired", Unauthenticated, "Issue a fresh user token; tokens live at most 24 hours.";
    ApplicationNotRegistered = "application_not_registered", Unauthenticated, "Register the application (RequestRegistration, then CompleteRegistration) or re-register it with its subscriber e-mail.";
    ApplicationDisconnected = "application_disconnected", PermissionDenied, "This application was disconnected irrevocably; register a new application.";
    UserBlocked = "user_blocked", PermissionDenied, "The user is blocked; an administrator can unblock them with UpdateUser (blocked = false).";
    PermissionDenied = "permission_denied", PermissionDenied, "The calling user may not do this; the message says which right is missing.";
    PrivilegedModeRequired = "privileged_mode_required", PermissionDenied, "Call with the application's credentials (privileged mode) to do this.";
    SubscriberCredentialInvalid = "subscriber_credential_invalid", PermissionDenied, "Present the subscriber's administration key or a temporary code from the subscriber e-mail (valid 24 h, single use).";
    NotAMember = "not_a_member", PermissionDenied, "The user is not a member of the conversation (or has no Read right on its context object); add them first.";
    UserKindRestricted = "user_kind_restricted", PermissionDenied, "This kind of user (guest, external, integration or bot) may not do this; see docs/api.md, Users.";
    RouteNotFound = "route_not_found", NotFound, "Check the method and path; /api/openapi.json lists every route.";
    ApplicationNotFound = "application_not_found", NotFound, "Check the application id; use RequestRegistration for a new application.";
    UserNotFound = "user_not_found", NotFound, "Check the user id; users are scoped to one application.";
    ConversationNotFound = "conversation_not_found", NotFound, "Check the conversation id or key; conversations are scoped to one application.";
    MessageNotFound = "message_not_found", NotFound, "Check the message id.";
    ConversationKeyTaken = "conversation_key_taken", AlreadyExists, "Choose another key or fetch the existing conversation by this key.";
    ContextConversationExists = "context_conversation_exists", AlreadyExists, "Each context object has one conversation; fetch it with GetConversationByContext.";
    UserExists = "user_exists", AlreadyExists, "A user with this infobase user id or external id already exists; update it instead.";
    BotNotFound = "bot_not_found", NotFound, "Check the bot id; list the application's bots with GetBots.";
    IntegrationNotFound = "integration_not_found", NotFound, "Check the integration id; list them with GetIntegrations.";
    SubscriptionNotFound = "subscription_not_found", NotFound, "Check the event subscription id; list them with GetEventSubscriptions.";
    DeliveryNotFound = "delivery_not_found", NotFound, "The delivery was acknowledged already or never existed; nothing to do.";
    BotUserTaken = "bot_user_taken", AlreadyExists, "Another bot already speaks as this collaboration user; give each bot instance its own user (standard #798 item 3).";
    BotUserPaired = "bot_user_paired", FailedPrecondition, "A bot's collaboration user must not be paired with an infobase user; create a separate user for the bot (standard #798 item 2).";
    PredefinedBot = "predefined_bot", FailedPrecondition, "Predefined bots are created by ExecuteBotProcessing and cannot be created or deleted explicitly; declare them in the processing call instead.";
    IntegrationKeyTaken = "integration_key_taken", AlreadyExists, "Choose another integration key or update the integration that has it.";
    ExternalSystemTypeUnsupported = "external_system_type_unsupported", InvalidArgument, "Use an external system type from GetExternalSystemTypes (this server implements `webhook`).";
    AlreadyExists = "already_exists", AlreadyExists, "The object exists already; update it instead of creating it again.";
    ButtonDisabled = "button_disabled", FailedPrecondition, "The button is disabled (Enabled = false) and cannot be pressed.";
    ButtonNotServerSide = "button_not_server_side", FailedPrecondition, "This button's action is carried out by the client (location, phone, client handler, navigation link); only ProcessByBot, SendMessage and SendMessageWithData are pressed on the server.";
    LeaseSuperseded = "lease_superseded", FailedPrecondition, "Another bot processing connection of this application took over; keep one connection per application (data area).";
    LeaseExpired = "lease_expired", FailedPrecondition, "Call ExecuteBotProcessing at least every 2 minutes (the lease time) to keep the processing connection; events wait in the queue meanwhile.";
    ConversationReadOnly = "conversation_read_only", FailedPrecondition, "The conversation is read-only; only privileged mode may post, edit or change it.";
    OneOnOneRules = "one_on_one_rules", FailedPrecondition, "A one-on-one conversation has exactly two members, no title and no membership changes; create a group conversation instead.";
    RecipientBlocked = "recipient_blocked", FailedPrecondition, "A user in `field` is blocked; remove them from the request.";
    MessageDeleted = "message_deleted", FailedPrecondition, "The message was deleted and cannot be edited.";
    ActivationCodeInvalid = "activation_code_invalid", PermissionDenied, "Use the activation code from the latest registration e-mail, or request a new one.";
    ApplicationHasNoUsers = "application_has_no_users", FailedPrecondition, "Create at least one infobase user before registering the application.";
    ProtocolVersionUnsupported = "protocol_version_unsupported", FailedPrecondition, "Upgrade the client (or the server) so that the client's protocol version is within the server's supported range given in the message.";
    HelloRequired = "hello_required", FailedPrecondition, "Send a Hello frame (protocol version and user token) as the first frame of the connection.";
    TooManyAttempts = "too_many_attempts", ResourceExhausted, "Too many wrong codes, or too many code e-mails, for this address; wait for the time the message names.";
    SlowConsumer = "slow_consumer", ResourceExhausted, "The client read too slowly and its queue overflowed; reconnect and resume from the last seq.";
    TooManyConnections = "too_many_connections", ResourceExhausted, "The user has as many WebSocket connections to this gateway as it allows; close one (or reuse it) before opening another.";
    FrameTooLarge = "frame_too_large", InvalidArgument, "A WebSocket frame or message is over 128 KB; send large data in binary frames or over REST.";
    Unavailable = "unavailable", Unavailable, "A backing service is unavailable; retry with backoff (sends with clientMessageId are safe to retry).";
    Internal = "internal", Internal, "An unexpected server error; retry, and report it with the request id if it persists.";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed domain error: a code, a message that says what was wrong, and the
/// field at fault when there is one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, message: message.into(), field: None }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn field_required(field: &str) -> Self {
        Error::new(ErrorCode::FieldRequired, format!("`{field}` is required")).with_field(field)
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidValue, message).with_field(field)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate code {code}");
            assert_eq!(ErrorCode::from_code_str(code.as_str()), Some(*code));
            assert!(!code.remedy().is_empty());
        }
    }

    #[test]
    fn every_code_is_documented_in_the_error_catalogue() {
        let catalogue = include_str!("../../../docs/errors.md");
        for code in ErrorCode::ALL {
            assert!(catalogue.contains(&format!("`{}`", code.as_str())), "docs/errors.md lacks `{code}`");
        }
    }
}
