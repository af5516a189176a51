//! A routing service in other processes, reached over gRPC. It implements the
//! same `Routing` trait as [`crate::RoutingService`], so the gateway holds an
//! `Arc<dyn Routing>` and never knows where routing runs.

use std::sync::Arc;

use beseda_proto::v1 as wire;
use beseda_proto::v1::routing_client::RoutingClient;
use beseda_proto::v1::routing_server::Routing;

use crate::endpoints::{ClusterClientConfig, EndpointPool};

/// Forwards every call, metadata (the caller) included, to one of the
/// routing instances (see [`crate::endpoints`] for how one is chosen).
#[derive(Clone)]
pub struct RemoteRouting {
    pool: Arc<EndpointPool>,
}

impl RemoteRouting {
    /// Resolves the endpoints now; connections are made by the first calls,
    /// which fail with `unavailable` while no instance can be reached.
    pub async fn connect(endpoints: &[String], config: ClusterClientConfig) -> Result<Self, beseda_core::Error> {
        Ok(RemoteRouting { pool: EndpointPool::start("routing", endpoints, config).await? })
    }

    /// One endpoint with the default client settings.
    pub async fn connect_one(endpoint: &str) -> Result<Self, beseda_core::Error> {
        Self::connect(&[endpoint.to_owned()], ClusterClientConfig::default()).await
    }
}

/// Implements a tonic service trait by forwarding every call, through the
/// generated `$client`, to a pool of remote instances (the struct has a
/// `pool: Arc<EndpointPool>` field). Used for every service a process reaches
/// over the network, so they all fail over, authenticate and size their
/// messages the same way.
#[macro_export]
macro_rules! forward_to_pool {
    (impl $service:ident for $remote:ident via $client:ident { $( $method:ident ( $request:ty ) -> $response:ty; )* }) => {
        #[tonic::async_trait]
        impl $service for $remote {
            $(
                async fn $method(
                    &self,
                    request: tonic::Request<$request>,
                ) -> Result<tonic::Response<$response>, tonic::Status> {
                    let (metadata, _, message) = request.into_parts();
                    self.pool
                        .call(|channel| {
                            let request =
                                tonic::Request::from_parts(metadata.clone(), Default::default(), message.clone());
                            let mut client = $client::new(channel)
                                .max_decoding_message_size(beseda_proto::INTERNAL_MAX_MESSAGE_BYTES)
                                .max_encoding_message_size(beseda_proto::INTERNAL_MAX_MESSAGE_BYTES);
                            async move { client.$method(request).await }
                        })
                        .await
                }
            )*
        }
    };
}

crate::forward_to_pool! {
impl Routing for RemoteRouting via RoutingClient {
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
    add_subscriber_administrator(wire::SubscriberAdministratorChange) -> wire::SubscriberAdministrators;
    remove_subscriber_administrator(wire::SubscriberAdministratorChange) -> wire::SubscriberAdministrators;
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
}
