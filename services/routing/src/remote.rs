//! A routing service in another process, reached over gRPC. It implements the
//! same `Routing` trait as [`crate::RoutingService`], so the gateway holds an
//! `Arc<dyn Routing>` and never knows where routing runs.

use beseda_proto::v1 as wire;
use beseda_proto::v1::routing_client::RoutingClient;
use beseda_proto::v1::routing_server::Routing;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Forwards every call, metadata (the caller) included, to a remote routing node.
#[derive(Clone)]
pub struct RemoteRouting {
    client: RoutingClient<Channel>,
}

impl RemoteRouting {
    /// Connects lazily: the first call establishes the channel, and calls
    /// fail with `unavailable` while the node cannot be reached.
    pub fn connect_lazy(endpoint: &str) -> Result<Self, beseda_core::Error> {
        let endpoint = tonic::transport::Endpoint::from_shared(endpoint.to_owned()).map_err(|error| {
            beseda_core::Error::invalid(
                "routing.endpoint",
                format!("`{endpoint}` is not a valid gRPC endpoint URL: {error}"),
            )
        })?;
        Ok(RemoteRouting { client: RoutingClient::new(endpoint.connect_lazy()) })
    }
}

macro_rules! forward {
    ($( $method:ident ( $request:ty ) -> $response:ty; )*) => {
        #[tonic::async_trait]
        impl Routing for RemoteRouting {
            $(
                async fn $method(&self, request: Request<$request>) -> Result<Response<$response>, Status> {
                    self.client.clone().$method(request).await
                }
            )*
        }
    };
}

forward! {
    authenticate(wire::AuthenticateRequest) -> wire::Authenticated;
    get_server_info(wire::Empty) -> wire::ServerInfo;
    request_registration(wire::RequestRegistrationRequest) -> wire::RequestRegistrationResponse;
    complete_registration(wire::CompleteRegistrationRequest) -> wire::RegistrationData;
    unregister(wire::Empty) -> wire::Empty;
    get_registration_data(wire::Empty) -> wire::RegistrationData;
    set_registration_data(wire::SetRegistrationDataRequest) -> wire::SetRegistrationDataResponse;
    get_application_info(wire::Empty) -> wire::ApplicationInfo;
    request_temporary_code(wire::RequestTemporaryCodeRequest) -> wire::Empty;
    reissue_administration_key(wire::ReissueAdministrationKeyRequest) -> wire::Empty;
    get_subscriber_administrators(wire::GetSubscriberAdministratorsRequest) -> wire::SubscriberAdministrators;
    set_subscriber_administrators(wire::SubscriberAdministrators) -> wire::SubscriberAdministrators;
    change_subscriber_email(wire::ChangeSubscriberEmailRequest) -> wire::Empty;
    create_user(wire::CreateUserRequest) -> wire::User;
    get_user(wire::GetUserRequest) -> wire::User;
    update_user(wire::UpdateUserRequest) -> wire::User;
    get_users(wire::UsersFilter) -> wire::UserList;
    create_conversation(wire::CreateConversationRequest) -> wire::Conversation;
    get_conversation(wire::GetConversationRequest) -> wire::Conversation;
    get_conversation_by_context(wire::GetConversationByContextRequest) -> wire::Conversation;
    update_conversation(wire::UpdateConversationRequest) -> wire::Conversation;
    leave_conversation(wire::LeaveConversationRequest) -> wire::Empty;
    get_conversations(wire::ConversationsFilter) -> wire::ConversationList;
    get_conversation_list(wire::Empty) -> wire::ConversationList;
    set_context_access(wire::SetContextAccessRequest) -> wire::Empty;
    send_message(wire::SendMessageRequest) -> wire::Message;
    edit_message(wire::EditMessageRequest) -> wire::Message;
    press_button(wire::PressButtonRequest) -> wire::PressButtonResponse;
    delete_message(wire::MessageRef) -> wire::Empty;
    get_message(wire::MessageRef) -> wire::Message;
    get_messages(wire::MessagesFilter) -> wire::MessageList;
    get_events(wire::GetEventsRequest) -> wire::EventList;
    mark_read(wire::MarkReadRequest) -> wire::UnreadCount;
    set_watch_mode(wire::SetWatchModeRequest) -> wire::WatchMode;
    get_watch_mode(wire::GetWatchModeRequest) -> wire::WatchMode;
    set_do_not_disturb(wire::SetDoNotDisturbRequest) -> wire::DoNotDisturb;
    get_do_not_disturb(wire::GetDoNotDisturbRequest) -> wire::DoNotDisturb;
    get_unread_counts(wire::Empty) -> wire::UnreadCounts;
}
