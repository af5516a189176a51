//! The public REST API for application servers, under `/api/v1`. Each route
//! is one row of [`routes`]: the HTTP method and path, the routing operation
//! it calls, the 1C method it mirrors and the request/response messages.
//! The router and the OpenAPI document are both built from that table, so
//! they cannot disagree. Bodies are the canonical proto3 JSON of the named
//! messages (lowerCamelCase; unknown fields are rejected so typos surface).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection, RawPathParamsRejection};
use axum::extract::{Query, RawPathParams, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use beseda_core::{Error, ErrorCode, Result};
use beseda_proto::v1 as wire;
use beseda_routing::{Caller, status};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Gateway;
use crate::http_error::{error_response, malformed};

/// Largest request body: message data is at most 100 KB, which is about
/// 137 KB in base64; a 1 MB ceiling leaves room for big member lists.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The 1C column of an operation that 1C has no method for (Beseda's own
/// operations, and ones chapter 29 does not name).
pub const NO_1C_METHOD: &str = "—";

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No credentials (registration, server info).
    Public,
    /// Credentials used when present (subscriber operations with a key or code).
    Optional,
    /// A user token or application credentials.
    Required,
}

/// Path and query parameters of one call.
pub struct Params {
    pub path: HashMap<String, String>,
    pub query: HashMap<String, String>,
}

impl Params {
    fn path(&self, name: &str) -> String {
        self.path.get(name).cloned().unwrap_or_default()
    }

    fn query(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    fn query_number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>> {
        self.query(name)
            .map(|value| {
                value.parse().map_err(|_| Error::invalid(name, format!("query parameter `{name}` must be a number")))
            })
            .transpose()
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<serde_json::Value>> + Send>>;
type Handler = fn(Gateway, Option<Caller>, Params, Bytes) -> HandlerFuture;

/// One operation of the REST API.
pub struct ApiRoute {
    pub method: Method,
    /// With `{name}` path parameters.
    pub path: &'static str,
    /// The gRPC method it calls (of `beseda.v1.Routing` or `beseda.v1.Bots`).
    pub operation: &'static str,
    /// The 1C:Enterprise methods it mirrors, exactly as chapter 29 of the 1C
    /// developer guide spells them (so a 1C developer finds the operation by
    /// the name they know): names joined by ` / ` (any of them) or ` + ` (in
    /// sequence), `Type.Method` for an object's method, or [`NO_1C_METHOD`].
    /// `tests/one_c_names.rs` checks every name against
    /// `docs/1c-method-names.txt`.
    pub one_c: &'static str,
    pub summary: &'static str,
    pub access: Access,
    /// The body's message (in `beseda.v1`), when the route takes a body.
    pub request_message: Option<&'static str>,
    pub response_message: &'static str,
    /// Query parameters the route reads.
    pub query_parameters: &'static [&'static str],
    handler: Handler,
}

async fn invoke<Req, Resp, Call, Fut>(
    gateway: Gateway,
    caller: Option<Caller>,
    params: Params,
    body: Bytes,
    takes_body: bool,
    prepare: fn(&mut Req, &Params) -> Result<()>,
    call: Call,
) -> Result<serde_json::Value>
where
    Req: DeserializeOwned + Default + Send + 'static,
    Resp: Serialize,
    Call: FnOnce(Gateway, tonic::Request<Req>) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
{
    let mut request: Req = if takes_body && !body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_slice(&body).map_err(|error| malformed("JSON body", error))?
    } else {
        Req::default()
    };
    prepare(&mut request, &params)?;
    let request = match &caller {
        Some(caller) => caller.request(request),
        None => tonic::Request::new(request),
    };
    let response = call(gateway, request).await.map_err(|status| status::from_status(&status))?;
    serde_json::to_value(response.into_inner())
        .map_err(|error| Error::internal(format!("cannot encode the answer: {error}")))
}

fn nothing<T>(_: &mut T, _: &Params) -> Result<()> {
    Ok(())
}

fn conversation_id(params: &Params) -> Option<wire::ConversationRef> {
    Some(wire::ConversationRef { by: Some(wire::conversation_ref::By::Id(params.path("conversationId"))) })
}

macro_rules! route {
    ($service:ident: $method:ident $path:literal => $rpc:ident($request:ident) -> $response:ident,
     $operation:literal, $one_c:literal, $access:ident, body: $body:literal, query: [$($query:literal),*],
     prepare: $prepare:expr, $summary:literal) => {
        ApiRoute {
            method: Method::$method,
            path: $path,
            operation: $operation,
            one_c: $one_c,
            summary: $summary,
            access: Access::$access,
            request_message: if $body { Some(stringify!($request)) } else { None },
            response_message: stringify!($response),
            query_parameters: &[$($query),*],
            handler: |gateway, caller, params, body| {
                Box::pin(invoke::<wire::$request, wire::$response, _, _>(
                    gateway, caller, params, body, $body, $prepare,
                    |gateway, request| async move { gateway.$service.$rpc(request).await },
                ))
            },
        }
    };
}

/// Every route of the REST API, built once per process.
pub fn routes() -> &'static [ApiRoute] {
    static TABLE: std::sync::OnceLock<Vec<ApiRoute>> = std::sync::OnceLock::new();
    TABLE.get_or_init(route_table)
}

fn route_table() -> Vec<ApiRoute> {
    vec![
        route!(routing: GET "/api/v1/server" => get_server_info(Empty) -> ServerInfo,
            "GetServerInfo", "ВерсияСервера", Public, body: false, query: [], prepare: nothing,
            "Server version and the client protocol versions it speaks."),
        route!(routing: POST "/api/v1/registration/request" => request_registration(RequestRegistrationRequest) -> RequestRegistrationResponse,
            "RequestRegistration", "ВыполнитьРегистрациюИнформационнойБазы", Public, body: true, query: [], prepare: nothing,
            "Step 1 of registration: e-mails an activation code to the subscriber."),
        route!(routing: POST "/api/v1/registration/complete" => complete_registration(CompleteRegistrationRequest) -> RegistrationData,
            "CompleteRegistration", "ВыполнитьРегистрациюИнформационнойБазы", Public, body: true, query: [], prepare: nothing,
            "Step 2: with the activation code, registers (or re-registers) the application and returns its id and key."),
        route!(routing: DELETE "/api/v1/registration" => unregister(Empty) -> Empty,
            "Unregister", "ОтменитьРегистрациюИнформационнойБазы", Required, body: false, query: [], prepare: nothing,
            "Deletes the application's keys; re-registering with the same e-mail restores the history."),
        route!(routing: GET "/api/v1/registration/data" => get_registration_data(Empty) -> RegistrationData,
            "GetRegistrationData", "ПолучитьДанныеРегистрацииИнформационнойБазы", Required, body: false, query: [], prepare: nothing,
            "The registration data, to move a data area to another database."),
        route!(routing: PUT "/api/v1/registration/data" => set_registration_data(SetRegistrationDataRequest) -> SetRegistrationDataResponse,
            "SetRegistrationData", "УстановитьДанныеРегистрацииИнформационнойБазы", Optional, body: true, query: [], prepare: nothing,
            "Checks moved registration data; without `data`, disconnects the calling application irrevocably."),
        route!(routing: GET "/api/v1/application" => get_application_info(Empty) -> ApplicationInfo,
            "GetApplicationInfo", "ИнформационнаяБазаЗарегистрирована / ИспользованиеДоступно / АдресЭлектроннойПочтыАбонента / ТекущийПользовательЯвляетсяАдминистраторомАбонента", Required, body: false, query: [], prepare: nothing,
            "Application id, subscriber e-mail, registered, usage available, whether the current user is a subscriber administrator."),
        route!(routing: POST "/api/v1/subscriber/temporary-code" => request_temporary_code(RequestTemporaryCodeRequest) -> Empty,
            "RequestTemporaryCode", "ОтправитьВременныйКод", Public, body: true, query: [], prepare: nothing,
            "E-mails a temporary administration code (valid 24 hours or until first use)."),
        route!(routing: POST "/api/v1/subscriber/administration-key" => reissue_administration_key(ReissueAdministrationKeyRequest) -> Empty,
            "ReissueAdministrationKey", "ПолучитьНовыйКлючАдминистрирования", Optional, body: true, query: [], prepare: nothing,
            "Issues a new administration key (the old one stops working) and e-mails it."),
        route!(routing: GET "/api/v1/subscriber/administrators" => get_subscriber_administrators(GetSubscriberAdministratorsRequest) -> SubscriberAdministrators,
            "GetSubscriberAdministrators", "—", Required, body: false, query: [], prepare: nothing,
            "Users of the application who are subscriber administrators."),
        route!(routing: PUT "/api/v1/subscriber/administrators" => set_subscriber_administrators(SubscriberAdministrators) -> SubscriberAdministrators,
            "SetSubscriberAdministrators", "—", Required, body: true, query: [], prepare: nothing,
            "Sets the subscriber administrators; needs an administrator, or the administration key or a temporary code in `credential`."),
        route!(routing: POST "/api/v1/subscriber/administrators/add" => add_subscriber_administrator(SubscriberAdministratorChange) -> SubscriberAdministrators,
            "AddSubscriberAdministrator", "ДобавитьВАдминистраторыАбонента", Required, body: true, query: [], prepare: nothing,
            "Makes one user a subscriber administrator, leaving the others; same rights as SetSubscriberAdministrators. Answers the resulting list."),
        route!(routing: POST "/api/v1/subscriber/administrators/remove" => remove_subscriber_administrator(SubscriberAdministratorChange) -> SubscriberAdministrators,
            "RemoveSubscriberAdministrator", "ИсключитьИзАдминистраторовАбонента", Required, body: true, query: [], prepare: nothing,
            "Removes one user from the subscriber administrators, leaving the others; same rights as SetSubscriberAdministrators. Answers the resulting list."),
        route!(routing: POST "/api/v1/subscriber/email" => change_subscriber_email(ChangeSubscriberEmailRequest) -> Empty,
            "ChangeSubscriberEmail", "УстановитьАдресЭлектроннойПочтыАбонента", Optional, body: true, query: [], prepare: nothing,
            "Changes the subscriber e-mail."),
        route!(routing: POST "/api/v1/users" => create_user(CreateUserRequest) -> User,
            "CreateUser", "СоздатьПользователя + ПользовательСистемыВзаимодействия.Записать", Required, body: true, query: [], prepare: nothing,
            "Creates a collaboration user (regular, bot, integration or external); privileged mode."),
        route!(routing: GET "/api/v1/users/{userId}" => get_user(GetUserRequest) -> User,
            "GetUser", "—", Required, body: false, query: [],
            prepare: |request: &mut wire::GetUserRequest, params| { request.user_id = params.path("userId"); Ok(()) },
            "One user by id."),
        route!(routing: PATCH "/api/v1/users/{userId}" => update_user(UpdateUserRequest) -> User,
            "UpdateUser", "ПользовательСистемыВзаимодействия.Записать", Required, body: true, query: [],
            prepare: |request: &mut wire::UpdateUserRequest, params| { request.user_id = params.path("userId"); Ok(()) },
            "Changes the properties named in `updateMask` (including `blocked`)."),
        route!(routing: POST "/api/v1/users/search" => get_users(UsersFilter) -> UserList,
            "GetUsers", "ПолучитьПользователей", Required, body: true, query: [], prepare: nothing,
            "Users matching a filter, paged with `after` (default 200, at most 250 a page)."),
        route!(routing: POST "/api/v1/conversations" => create_conversation(CreateConversationRequest) -> Conversation,
            "CreateConversation", "СоздатьОбсуждение + ОбсуждениеСистемыВзаимодействия.Записать", Required, body: true, query: [], prepare: nothing,
            "Creates a group, one-on-one or context conversation."),
        route!(routing: GET "/api/v1/conversations/{conversationId}" => get_conversation(GetConversationRequest) -> Conversation,
            "GetConversation", "ПолучитьОбсуждение", Required, body: false, query: [],
            prepare: |request: &mut wire::GetConversationRequest, params| { request.conversation = conversation_id(params); Ok(()) },
            "One conversation by id."),
        route!(routing: GET "/api/v1/conversations/by-key/{key}" => get_conversation(GetConversationRequest) -> Conversation,
            "GetConversationByKey", "ПолучитьОбсуждение", Required, body: false, query: [],
            prepare: |request: &mut wire::GetConversationRequest, params| {
                request.conversation = Some(wire::ConversationRef { by: Some(wire::conversation_ref::By::Key(params.path("key"))) });
                Ok(())
            },
            "One conversation by its application-chosen key."),
        route!(routing: POST "/api/v1/conversations/by-context" => get_conversation_by_context(GetConversationByContextRequest) -> Conversation,
            "GetConversationByContext", "ПолучитьОбсуждение", Required, body: true, query: [], prepare: nothing,
            "The conversation of a context object."),
        route!(routing: PATCH "/api/v1/conversations/{conversationId}" => update_conversation(UpdateConversationRequest) -> Conversation,
            "UpdateConversation", "ОбсуждениеСистемыВзаимодействия.Записать", Required, body: true, query: [],
            prepare: |request: &mut wire::UpdateConversationRequest, params| { request.conversation = conversation_id(params); Ok(()) },
            "Renames, adds or removes members, changes Displayed."),
        route!(routing: POST "/api/v1/conversations/{conversationId}/leave" => leave_conversation(LeaveConversationRequest) -> Empty,
            "LeaveConversation", "—", Required, body: false, query: [],
            prepare: |request: &mut wire::LeaveConversationRequest, params| { request.conversation = conversation_id(params); Ok(()) },
            "The acting user leaves a group conversation."),
        route!(routing: POST "/api/v1/conversations/search" => get_conversations(ConversationsFilter) -> ConversationList,
            "GetConversations", "ПолучитьОбсуждения", Required, body: true, query: [], prepare: nothing,
            "Conversations matching a filter, paged with `startDate` (and `after` for ties)."),
        route!(routing: GET "/api/v1/conversation-list" => get_conversation_list(Empty) -> ConversationList,
            "GetConversationList", "—", Required, body: false, query: [], prepare: nothing,
            "The acting user's list: unread first, padded to 50 by last-message date."),
        route!(routing: PUT "/api/v1/conversations/{conversationId}/access" => set_context_access(SetContextAccessRequest) -> Empty,
            "SetContextAccess", "—", Required, body: true, query: [],
            prepare: |request: &mut wire::SetContextAccessRequest, params| { request.conversation = conversation_id(params); Ok(()) },
            "Grants or revokes users' access to a context conversation (the Read right on its object)."),
        route!(routing: POST "/api/v1/conversations/{conversationId}/messages" => send_message(SendMessageRequest) -> Message,
            "SendMessage", "СоздатьСообщение + СообщениеСистемыВзаимодействия.Записать", Required, body: true, query: [],
            prepare: |request: &mut wire::SendMessageRequest, params| { request.conversation = conversation_id(params); Ok(()) },
            "Posts a message; a repeated `clientMessageId` returns the stored message instead of a duplicate."),
        route!(routing: POST "/api/v1/conversations/{conversationId}/messages/search" => get_messages(MessagesFilter) -> MessageList,
            "GetMessages", "ПолучитьСообщения", Required, body: true, query: [],
            prepare: |request: &mut wire::MessagesFilter, params| { request.conversation = conversation_id(params); Ok(()) },
            "Messages of a conversation matching a filter, paged with `after`."),
        route!(routing: GET "/api/v1/conversations/{conversationId}/events" => get_events(GetEventsRequest) -> EventList,
            "GetEvents", "—", Required, body: false, query: ["afterSeq", "limit"],
            prepare: |request: &mut wire::GetEventsRequest, params| {
                request.conversation = conversation_id(params);
                request.after_seq = params.query_number("afterSeq")?.unwrap_or(0);
                request.limit = params.query_number("limit")?.unwrap_or(0);
                Ok(())
            },
            "The conversation's event log after a sequence number (resume)."),
        route!(routing: POST "/api/v1/conversations/{conversationId}/read" => mark_read(MarkReadRequest) -> UnreadCount,
            "MarkRead", "—", Required, body: true, query: [],
            prepare: |request: &mut wire::MarkReadRequest, params| { request.conversation = conversation_id(params); Ok(()) },
            "Marks notifications read up to a message (or all)."),
        route!(routing: GET "/api/v1/messages/{messageId}" => get_message(MessageRef) -> Message,
            "GetMessage", "—", Required, body: false, query: [],
            prepare: |request: &mut wire::MessageRef, params| { request.message_id = params.path("messageId"); Ok(()) },
            "One message by id."),
        route!(routing: PATCH "/api/v1/messages/{messageId}" => edit_message(EditMessageRequest) -> Message,
            "EditMessage", "СообщениеСистемыВзаимодействия.Записать", Required, body: true, query: [],
            prepare: |request: &mut wire::EditMessageRequest, params| { request.message_id = params.path("messageId"); Ok(()) },
            "Edits text, data or buttons of a message."),
        route!(routing: DELETE "/api/v1/messages/{messageId}" => delete_message(MessageRef) -> Empty,
            "DeleteMessage", "—", Required, body: false, query: [],
            prepare: |request: &mut wire::MessageRef, params| { request.message_id = params.path("messageId"); Ok(()) },
            "Deletes a message (its place in the log is kept)."),
        route!(routing: PUT "/api/v1/conversations/{conversationId}/watch" => set_watch_mode(SetWatchModeRequest) -> WatchMode,
            "SetWatchMode", "УстановитьРежимНаблюдения", Required, body: true, query: [],
            prepare: |request: &mut wire::SetWatchModeRequest, params| { request.conversation = conversation_id(params); Ok(()) },
            "Turns watching a conversation on or off."),
        route!(routing: GET "/api/v1/conversations/{conversationId}/watch" => get_watch_mode(GetWatchModeRequest) -> WatchMode,
            "GetWatchMode", "ПолучитьРежимНаблюдения", Required, body: false, query: ["userId"],
            prepare: |request: &mut wire::GetWatchModeRequest, params| {
                request.conversation = conversation_id(params);
                request.user_id = params.query("userId").unwrap_or_default().to_owned();
                Ok(())
            },
            "Whether the user watches the conversation."),
        route!(routing: PUT "/api/v1/do-not-disturb" => set_do_not_disturb(SetDoNotDisturbRequest) -> DoNotDisturb,
            "SetDoNotDisturb", "УстановитьОтображениеОповещенийОбсуждения", Required, body: true, query: [], prepare: nothing,
            "Do-not-disturb until a time, for all conversations or one."),
        route!(routing: GET "/api/v1/do-not-disturb" => get_do_not_disturb(GetDoNotDisturbRequest) -> DoNotDisturb,
            "GetDoNotDisturb", "ПолучитьОтображениеОповещенийОбсуждения", Required, body: false, query: ["conversationId", "userId"],
            prepare: |request: &mut wire::GetDoNotDisturbRequest, params| {
                if let Some(conversation_id) = params.query("conversationId") {
                    request.conversation = Some(wire::ConversationRef { by: Some(wire::conversation_ref::By::Id(conversation_id.to_owned())) });
                }
                request.user_id = params.query("userId").unwrap_or_default().to_owned();
                Ok(())
            },
            "The do-not-disturb state in force."),
        route!(routing: GET "/api/v1/unread" => get_unread_counts(Empty) -> UnreadCounts,
            "GetUnreadCounts", "—", Required, body: false, query: [], prepare: nothing,
            "Unread notifications per conversation and in total."),
        route!(routing: POST "/api/v1/messages/{messageId}/buttons/press" => press_button(PressButtonRequest) -> PressButtonResponse,
            "PressButton", "—", Required, body: true, query: [],
            prepare: |request: &mut wire::PressButtonRequest, params| { request.message_id = params.path("messageId"); Ok(()) },
            "Presses a button (row and column from 0) as the acting user: ProcessByBot queues an event for the message's bot, SendMessage(WithData) posts the button's text."),
        route!(bots: POST "/api/v1/bots" => create_bot(CreateBotRequest) -> Bot,
            "CreateBot", "СоздатьБота + БотСистемыВзаимодействия.Записать", Required, body: true, query: [], prepare: nothing,
            "Creates a bot on a collaboration user that is not paired with an infobase user; privileged mode."),
        route!(bots: GET "/api/v1/bots" => get_bots(Empty) -> BotList,
            "GetBots", "ПолучитьБотов", Required, body: false, query: [], prepare: nothing,
            "Every bot of the application, predefined ones included."),
        route!(bots: GET "/api/v1/bots/{botId}" => get_bot(GetBotRequest) -> Bot,
            "GetBot", "ПолучитьБота", Required, body: false, query: [],
            prepare: |request: &mut wire::GetBotRequest, params| { request.bot_id = params.path("botId"); Ok(()) },
            "One bot by id."),
        route!(bots: PATCH "/api/v1/bots/{botId}" => update_bot(UpdateBotRequest) -> Bot,
            "UpdateBot", "БотСистемыВзаимодействия.Записать", Required, body: true, query: [],
            prepare: |request: &mut wire::UpdateBotRequest, params| { request.bot_id = params.path("botId"); Ok(()) },
            "Changes the fields named in `updateMask` (userId, botType, additionalParameters, infobaseUserName)."),
        route!(bots: DELETE "/api/v1/bots/{botId}" => delete_bot(DeleteBotRequest) -> Empty,
            "DeleteBot", "—", Required, body: false, query: [],
            prepare: |request: &mut wire::DeleteBotRequest, params| { request.bot_id = params.path("botId"); Ok(()) },
            "Deletes a (not predefined) bot and its queue."),
        route!(bots: POST "/api/v1/integrations" => create_integration(CreateIntegrationRequest) -> Integration,
            "CreateIntegration", "ИнтеграцияСистемыВзаимодействия.Записать", Required, body: true, query: [], prepare: nothing,
            "Creates an integration; the answer carries its connection point URL."),
        route!(bots: GET "/api/v1/integrations" => get_integrations(Empty) -> IntegrationList,
            "GetIntegrations", "—", Required, body: false, query: [], prepare: nothing,
            "Every integration of the application."),
        route!(bots: GET "/api/v1/integrations/{integrationId}" => get_integration(GetIntegrationRequest) -> Integration,
            "GetIntegration", "ПолучитьИнтеграцию", Required, body: false, query: [],
            prepare: |request: &mut wire::GetIntegrationRequest, params| { request.integration_id = params.path("integrationId"); Ok(()) },
            "One integration by id."),
        route!(bots: PATCH "/api/v1/integrations/{integrationId}" => update_integration(UpdateIntegrationRequest) -> Integration,
            "UpdateIntegration", "ИнтеграцияСистемыВзаимодействия.Записать", Required, body: true, query: [],
            prepare: |request: &mut wire::UpdateIntegrationRequest, params| { request.integration_id = params.path("integrationId"); Ok(()) },
            "Changes the fields named in `updateMask` (key, use, externalSystemParameters, presentation, memberIds, signingSecret)."),
        route!(bots: DELETE "/api/v1/integrations/{integrationId}" => delete_integration(DeleteIntegrationRequest) -> Empty,
            "DeleteIntegration", "—", Required, body: false, query: [],
            prepare: |request: &mut wire::DeleteIntegrationRequest, params| { request.integration_id = params.path("integrationId"); Ok(()) },
            "Deletes an integration; its connection point stops answering."),
        route!(bots: GET "/api/v1/external-system-types" => get_external_system_types(Empty) -> ExternalSystemTypes,
            "GetExternalSystemTypes", "ПолучитьТипыВнешнихСистем", Required, body: false, query: [], prepare: nothing,
            "The external system types this server implements."),
        route!(bots: GET "/api/v1/external-system-types/{type}" => get_external_system_description(GetExternalSystemDescriptionRequest) -> ExternalSystemDescription,
            "GetExternalSystemDescription", "ПолучитьОписаниеВнешнейСистемы", Required, body: false, query: [],
            prepare: |request: &mut wire::GetExternalSystemDescriptionRequest, params| { request.external_system_type = params.path("type"); Ok(()) },
            "Parameters and abilities of one external system type."),
        route!(bots: POST "/api/v1/event-subscriptions" => create_event_subscription(CreateEventSubscriptionRequest) -> EventSubscription,
            "CreateEventSubscription", "—", Required, body: true, query: [], prepare: nothing,
            "Subscribes a URL to the application's events (POSTed as signed JSON); the answer carries the signing secret."),
        route!(bots: GET "/api/v1/event-subscriptions" => get_event_subscriptions(Empty) -> EventSubscriptionList,
            "GetEventSubscriptions", "—", Required, body: false, query: [], prepare: nothing,
            "Every event subscription of the application."),
        route!(bots: GET "/api/v1/event-subscriptions/{subscriptionId}" => get_event_subscription(GetEventSubscriptionRequest) -> EventSubscription,
            "GetEventSubscription", "—", Required, body: false, query: [],
            prepare: |request: &mut wire::GetEventSubscriptionRequest, params| { request.subscription_id = params.path("subscriptionId"); Ok(()) },
            "One event subscription by id."),
        route!(bots: PATCH "/api/v1/event-subscriptions/{subscriptionId}" => update_event_subscription(UpdateEventSubscriptionRequest) -> EventSubscription,
            "UpdateEventSubscription", "—", Required, body: true, query: [],
            prepare: |request: &mut wire::UpdateEventSubscriptionRequest, params| { request.subscription_id = params.path("subscriptionId"); Ok(()) },
            "Changes the fields named in `updateMask` (url, secret, eventKinds, conversationIds, enabled)."),
        route!(bots: DELETE "/api/v1/event-subscriptions/{subscriptionId}" => delete_event_subscription(DeleteEventSubscriptionRequest) -> Empty,
            "DeleteEventSubscription", "—", Required, body: false, query: [],
            prepare: |request: &mut wire::DeleteEventSubscriptionRequest, params| { request.subscription_id = params.path("subscriptionId"); Ok(()) },
            "Deletes a subscription and its queue."),
        route!(bots: POST "/api/v1/event-subscriptions/{subscriptionId}/replay" => replay_events(ReplayEventsRequest) -> ReplayEventsResponse,
            "ReplayEvents", "—", Required, body: true, query: [],
            prepare: |request: &mut wire::ReplayEventsRequest, params| { request.subscription_id = params.path("subscriptionId"); Ok(()) },
            "Queues stored events again: one conversation after `afterSeq`, or all since `since`."),
        route!(bots: POST "/api/v1/dead-letters/search" => list_dead_letters(ListDeadLettersRequest) -> DeadLetterList,
            "ListDeadLetters", "—", Required, body: true, query: [], prepare: nothing,
            "Events that failed `max_attempts` times, of bots (default) or subscriptions, paged with `after`."),
        route!(bots: POST "/api/v1/dead-letters/retry" => retry_dead_letters(DeadLetterIds) -> DeadLetterActionResult,
            "RetryDeadLetters", "—", Required, body: true, query: [], prepare: nothing,
            "Puts dead letters back in their queues with a fresh attempt count."),
        route!(bots: POST "/api/v1/dead-letters/discard" => discard_dead_letters(DeadLetterIds) -> DeadLetterActionResult,
            "DiscardDeadLetters", "—", Required, body: true, query: [], prepare: nothing,
            "Deletes dead letters for good."),
    ]
}

async fn dispatch(
    gateway: Gateway,
    route: &'static ApiRoute,
    path: HashMap<String, String>,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    metrics::counter!("beseda_api_requests_total", "operation" => route.operation).increment(1);
    let caller = match (route.access, crate::auth::credentials_from_headers(&headers)) {
        (Access::Public, _) => None,
        (_, Err(error)) => return error_response(&error),
        (Access::Optional, Ok(None)) => None,
        (Access::Required, Ok(None)) => {
            return error_response(&Error::new(
                ErrorCode::Unauthenticated,
                "this operation needs credentials: `Authorization: Bearer <user token>` or Basic <application id>:<application key>",
            ));
        }
        (_, Ok(Some(credentials))) => match crate::auth::authenticate(&gateway.routing, credentials).await {
            Ok((caller, _)) => Some(caller),
            Err(error) => return error_response(&error),
        },
    };
    let params = Params { path, query };
    match (route.handler)(gateway.clone(), caller, params, body).await {
        Ok(value) => axum::Json(value).into_response(),
        Err(error) => {
            if error.code == ErrorCode::Internal {
                tracing::error!(operation = route.operation, message = %error.message, "api call failed");
            }
            error_response(&error)
        }
    }
}

fn method_filter(method: &Method) -> MethodFilter {
    match *method {
        Method::POST => MethodFilter::POST,
        Method::PUT => MethodFilter::PUT,
        Method::PATCH => MethodFilter::PATCH,
        Method::DELETE => MethodFilter::DELETE,
        _ => MethodFilter::GET,
    }
}

/// The `/api/v1` router, built from [`routes`].
pub fn router(gateway: Gateway) -> axum::Router {
    let table = routes();
    let mut router = axum::Router::new();
    let mut by_path: Vec<(&'static str, Vec<&'static ApiRoute>)> = Vec::new();
    for route in table {
        match by_path.iter_mut().find(|(path, _)| *path == route.path) {
            Some((_, routes)) => routes.push(route),
            None => by_path.push((route.path, vec![route])),
        }
    }
    for (path, routes) in by_path {
        let mut method_router: Option<axum::routing::MethodRouter<Gateway>> = None;
        for route in routes {
            // Rejections of the extractors become typed errors too, never
            // axum's plain-text answers.
            let handler = move |State(gateway): State<Gateway>,
                                path: Result<RawPathParams, RawPathParamsRejection>,
                                query: Result<Query<HashMap<String, String>>, QueryRejection>,
                                headers: HeaderMap,
                                body: Result<Bytes, BytesRejection>| async move {
                let path = match path {
                    Ok(path) => path.iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect(),
                    Err(rejection) => return error_response(&malformed("path", rejection.body_text())),
                };
                let query = match query {
                    Ok(Query(query)) => query,
                    Err(rejection) => return error_response(&malformed("query string", rejection.body_text())),
                };
                let body = match body {
                    Ok(body) => body,
                    Err(rejection) => {
                        return error_response(&Error::new(
                            ErrorCode::MalformedRequest,
                            format!(
                                "the request body cannot be read ({}); bodies are at most {} bytes",
                                rejection.body_text(),
                                MAX_BODY_BYTES
                            ),
                        ));
                    }
                };
                dispatch(gateway, route, path, query, headers, body).await
            };
            let filter = method_filter(&route.method);
            method_router = Some(match method_router {
                Some(existing) => existing.on(filter, handler),
                None => on(filter, handler),
            });
        }
        if let Some(method_router) = method_router {
            router = router.route(path, method_router);
        }
    }
    router
        .fallback(|method: Method, uri: axum::http::Uri| async move {
            error_response(&Error::new(
                ErrorCode::RouteNotFound,
                format!("no API route {method} {}; see /api/openapi.json for the list", uri.path()),
            ))
        })
        .method_not_allowed_fallback(|method: Method, uri: axum::http::Uri| async move {
            error_response(&Error::new(
                ErrorCode::RouteNotFound,
                format!("{} has no {method} operation; see /api/openapi.json for the methods it takes", uri.path()),
            ))
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gateway)
}
