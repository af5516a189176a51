//! `beseda.v1.Routing` over the domain operations: read the caller, convert
//! the request, call the operation, convert the answer. No rules live here.

use beseda_core::model::{User, UserKind};
use beseda_core::{Error, ErrorCode, Result, rules};
use beseda_proto::v1 as wire;
use beseda_proto::v1::routing_server::Routing;
use beseda_store::{ConversationChange, ConversationQuery, MessageQuery, UserQuery};
use tonic::{Request, Response, Status};

use crate::conversations::{ConversationSelector, NewConversation};
use crate::convert::{self, non_empty};
use crate::messages::{MessageEdit, OutgoingMessage};
use crate::registration::{RegistrationData, RegistrationRequest, SubscriberProof};
use crate::{Caller, RoutingService, SERVER_VERSION, status};

type Reply<T> = std::result::Result<Response<T>, Status>;

fn answer<T>(result: Result<T>) -> Reply<T> {
    result.map(Response::new).map_err(status::to_status)
}

fn caller_of<T>(request: &Request<T>) -> std::result::Result<Caller, Status> {
    Caller::from_request(request).map_err(status::to_status)
}

fn optional_caller_of<T>(request: &Request<T>) -> Option<Caller> {
    Caller::from_request(request).ok()
}

fn registration_data_to_wire(data: RegistrationData) -> wire::RegistrationData {
    wire::RegistrationData {
        application_id: data.application_id,
        application_key: data.application_key,
        subscriber_email: data.subscriber_email,
        application_name: data.application_name,
    }
}

fn proof_from_wire(credential: Option<&wire::SubscriberCredential>) -> (String, SubscriberProof) {
    use wire::subscriber_credential::Proof;
    match credential {
        Some(credential) => {
            let proof = match &credential.proof {
                Some(Proof::AdministrationKey(key)) => SubscriberProof::AdministrationKey(key.clone()),
                Some(Proof::TemporaryCode(code)) => SubscriberProof::TemporaryCode(code.clone()),
                None => SubscriberProof::Caller,
            };
            (credential.subscriber_email.clone(), proof)
        }
        None => (String::new(), SubscriberProof::Caller),
    }
}

fn user_from_wire(user: &wire::User) -> Result<User> {
    let kind = convert::user_kind_from_wire(user.kind)?.unwrap_or(UserKind::Regular);
    let mut domain = User::new(kind, user.name.clone());
    domain.full_name = user.full_name.clone();
    domain.picture = user.picture.clone();
    domain.phone = user.phone.clone();
    domain.email = user.email.clone();
    domain.matching_key = user.matching_key.clone();
    domain.infobase_user_id = non_empty(&user.infobase_user_id);
    domain.blocked = user.blocked;
    domain.external_system_type = user.external_system_type.clone();
    domain.external_system_user_id = user.external_system_user_id.clone();
    domain.authentication_email = user.authentication_email.clone();
    Ok(domain)
}

fn selector(reference: Option<&wire::ConversationRef>) -> Result<ConversationSelector> {
    ConversationSelector::from_wire(reference)
}

fn optional_selector(reference: Option<&wire::ConversationRef>) -> Result<Option<ConversationSelector>> {
    match reference {
        Some(reference) if reference.by.is_some() => selector(Some(reference)).map(Some),
        _ => Ok(None),
    }
}

impl RoutingService {
    async fn conversations_to_wire(
        &self,
        caller: &Caller,
        conversations: Vec<beseda_core::model::Conversation>,
    ) -> Result<wire::ConversationList> {
        let unread = self.unread_by_conversation(caller).await?;
        Ok(wire::ConversationList {
            conversations: conversations
                .iter()
                .map(|conversation| {
                    convert::conversation_to_wire(conversation, unread.get(&conversation.id).copied().unwrap_or(0))
                })
                .collect(),
        })
    }

    async fn conversation_to_wire(
        &self,
        caller: &Caller,
        conversation: beseda_core::model::Conversation,
    ) -> Result<wire::Conversation> {
        let mut list = self.conversations_to_wire(caller, vec![conversation]).await?;
        list.conversations.pop().ok_or_else(|| Error::internal("conversation conversion lost its item"))
    }
}

fn dnd_to_wire(state: beseda_store::DoNotDisturbState) -> wire::DoNotDisturb {
    let now = beseda_core::model::now_micros();
    let until = state.conversation_until.into_iter().chain(state.user_until).max();
    wire::DoNotDisturb {
        until: convert::optional_timestamp(until),
        active: crate::notifications::is_silenced(&state, now),
    }
}

#[tonic::async_trait]
impl Routing for RoutingService {
    async fn authenticate(&self, request: Request<wire::AuthenticateRequest>) -> Reply<wire::Authenticated> {
        use wire::authenticate_request::Credentials;
        let result = match request.into_inner().credentials {
            Some(Credentials::UserToken(token)) => self
                .authenticate_user_token(&token)
                .await
                .map(|(caller, user, expires_at)| (caller, Some(user), Some(expires_at))),
            Some(Credentials::Application(credentials)) => self
                .authenticate_application(
                    &credentials.application_id,
                    &credentials.application_key,
                    non_empty(&credentials.act_as_user_id).as_deref(),
                )
                .await
                .map(|(caller, user)| (caller, user, None)),
            None => Err(Error::new(ErrorCode::Unauthenticated, "no credentials were presented")),
        };
        answer(result.map(|(caller, user, expires_at)| wire::Authenticated {
            caller: Some(caller.to_wire()),
            user: user.as_ref().map(convert::user_to_wire),
            token_expires_at: expires_at.map(|seconds| convert::timestamp(seconds.saturating_mul(1_000_000))),
        }))
    }

    async fn get_server_info(&self, _request: Request<wire::Empty>) -> Reply<wire::ServerInfo> {
        answer(Ok(wire::ServerInfo {
            server_version: SERVER_VERSION.to_owned(),
            min_protocol_version: beseda_proto::MIN_PROTOCOL_VERSION,
            max_protocol_version: beseda_proto::MAX_PROTOCOL_VERSION,
        }))
    }

    async fn request_registration(
        &self,
        request: Request<wire::RequestRegistrationRequest>,
    ) -> Reply<wire::RequestRegistrationResponse> {
        let request = request.into_inner();
        let registration = RegistrationRequest {
            email: non_empty(&request.email),
            application_name: request.application_name,
            application_user_count: request.application_user_count,
            application_id: non_empty(&request.application_id),
        };
        answer(self.request_registration(&registration).await.map(|email| wire::RequestRegistrationResponse { email }))
    }

    async fn complete_registration(
        &self,
        request: Request<wire::CompleteRegistrationRequest>,
    ) -> Reply<wire::RegistrationData> {
        let request = request.into_inner();
        let registration = RegistrationRequest {
            email: non_empty(&request.email),
            application_name: request.application_name,
            application_user_count: request.application_user_count,
            application_id: non_empty(&request.application_id),
        };
        answer(self.complete_registration(&registration, &request.activation_code).await.map(registration_data_to_wire))
    }

    async fn unregister(&self, request: Request<wire::Empty>) -> Reply<wire::Empty> {
        let caller = caller_of(&request)?;
        answer(self.unregister(&caller).await.map(|()| wire::Empty {}))
    }

    async fn get_registration_data(&self, request: Request<wire::Empty>) -> Reply<wire::RegistrationData> {
        let caller = caller_of(&request)?;
        answer(self.registration_data(&caller).await.map(registration_data_to_wire))
    }

    async fn set_registration_data(
        &self,
        request: Request<wire::SetRegistrationDataRequest>,
    ) -> Reply<wire::SetRegistrationDataResponse> {
        let caller = optional_caller_of(&request);
        let data = request.into_inner().data.map(|data| RegistrationData {
            application_id: data.application_id,
            application_key: data.application_key,
            subscriber_email: data.subscriber_email,
            application_name: data.application_name,
        });
        answer(
            self.set_registration_data(caller.as_ref(), data.as_ref())
                .await
                .map(|registered| wire::SetRegistrationDataResponse { registered }),
        )
    }

    async fn get_application_info(&self, request: Request<wire::Empty>) -> Reply<wire::ApplicationInfo> {
        let caller = caller_of(&request)?;
        answer(self.application_info(&caller).await.map(|info| wire::ApplicationInfo {
            application_id: info.application.id,
            application_name: info.application.name,
            subscriber_email: info.subscriber_email,
            registered: true,
            usage_available: info.usage_available,
            current_user_is_subscriber_administrator: info.current_user_is_subscriber_administrator,
            server_version: SERVER_VERSION.to_owned(),
        }))
    }

    async fn request_temporary_code(&self, request: Request<wire::RequestTemporaryCodeRequest>) -> Reply<wire::Empty> {
        answer(self.request_temporary_code(&request.into_inner().subscriber_email).await.map(|()| wire::Empty {}))
    }

    async fn reissue_administration_key(
        &self,
        request: Request<wire::ReissueAdministrationKeyRequest>,
    ) -> Reply<wire::Empty> {
        let caller = optional_caller_of(&request);
        let (email, proof) = proof_from_wire(request.get_ref().credential.as_ref());
        answer(self.reissue_administration_key(caller.as_ref(), &email, &proof).await.map(|()| wire::Empty {}))
    }

    async fn get_subscriber_administrators(
        &self,
        request: Request<wire::GetSubscriberAdministratorsRequest>,
    ) -> Reply<wire::SubscriberAdministrators> {
        let caller = caller_of(&request)?;
        answer(
            self.subscriber_administrators(&caller)
                .await
                .map(|user_ids| wire::SubscriberAdministrators { credential: None, user_ids }),
        )
    }

    async fn set_subscriber_administrators(
        &self,
        request: Request<wire::SubscriberAdministrators>,
    ) -> Reply<wire::SubscriberAdministrators> {
        let caller = caller_of(&request)?;
        let (email, proof) = proof_from_wire(request.get_ref().credential.as_ref());
        answer(
            self.set_subscriber_administrators(&caller, &email, &proof, &request.get_ref().user_ids)
                .await
                .map(|user_ids| wire::SubscriberAdministrators { credential: None, user_ids }),
        )
    }

    async fn add_subscriber_administrator(
        &self,
        request: Request<wire::SubscriberAdministratorChange>,
    ) -> Reply<wire::SubscriberAdministrators> {
        let caller = caller_of(&request)?;
        let (email, proof) = proof_from_wire(request.get_ref().credential.as_ref());
        answer(
            self.set_subscriber_administrator(&caller, &email, &proof, &request.get_ref().user_id, true)
                .await
                .map(|user_ids| wire::SubscriberAdministrators { credential: None, user_ids }),
        )
    }

    async fn remove_subscriber_administrator(
        &self,
        request: Request<wire::SubscriberAdministratorChange>,
    ) -> Reply<wire::SubscriberAdministrators> {
        let caller = caller_of(&request)?;
        let (email, proof) = proof_from_wire(request.get_ref().credential.as_ref());
        answer(
            self.set_subscriber_administrator(&caller, &email, &proof, &request.get_ref().user_id, false)
                .await
                .map(|user_ids| wire::SubscriberAdministrators { credential: None, user_ids }),
        )
    }

    async fn change_subscriber_email(
        &self,
        request: Request<wire::ChangeSubscriberEmailRequest>,
    ) -> Reply<wire::Empty> {
        let caller = optional_caller_of(&request);
        let (email, proof) = proof_from_wire(request.get_ref().credential.as_ref());
        answer(
            self.change_subscriber_email(caller.as_ref(), &email, &proof, &request.get_ref().new_email)
                .await
                .map(|()| wire::Empty {}),
        )
    }

    async fn create_user(&self, request: Request<wire::CreateUserRequest>) -> Reply<wire::User> {
        let caller = caller_of(&request)?;
        let result = async {
            let user = request.get_ref().user.as_ref().ok_or_else(|| Error::field_required("user"))?;
            let user = user_from_wire(user)?;
            self.create_user(&caller, user).await
        };
        answer(result.await.map(|user| convert::user_to_wire(&user)))
    }

    async fn get_user(&self, request: Request<wire::GetUserRequest>) -> Reply<wire::User> {
        let caller = caller_of(&request)?;
        answer(self.get_user(&caller, &request.get_ref().user_id).await.map(|user| convert::user_to_wire(&user)))
    }

    async fn update_user(&self, request: Request<wire::UpdateUserRequest>) -> Reply<wire::User> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let changes = user_from_wire(request.user.as_ref().ok_or_else(|| Error::field_required("user"))?)?;
            self.update_user(&caller, &request.user_id, &request.update_mask, changes).await
        };
        answer(result.await.map(|user| convert::user_to_wire(&user)))
    }

    async fn get_users(&self, request: Request<wire::UsersFilter>) -> Reply<wire::UserList> {
        let caller = caller_of(&request)?;
        let result = async {
            let filter = request.get_ref();
            let query = UserQuery {
                limit: rules::page_size(filter.count)?,
                direction: convert::sort_direction_from_wire(filter.sort_direction)?,
                after: non_empty(&filter.after),
                ids: filter.ids.clone(),
                name_contains: non_empty(&filter.name_contains),
                kind: convert::user_kind_from_wire(filter.kind)?,
                conversation_id: non_empty(&filter.conversation_id),
                infobase_user_id: non_empty(&filter.infobase_user_id),
                matching_key: non_empty(&filter.matching_key),
                include_blocked: filter.include_blocked,
                exclude_guests: false,
            };
            self.get_users(&caller, query).await
        };
        answer(result.await.map(|users| wire::UserList { users: users.iter().map(convert::user_to_wire).collect() }))
    }

    async fn create_conversation(
        &self,
        request: Request<wire::CreateConversationRequest>,
    ) -> Reply<wire::Conversation> {
        let caller = caller_of(&request)?;
        let result = async {
            let conversation =
                request.get_ref().conversation.as_ref().ok_or_else(|| Error::field_required("conversation"))?;
            let context = conversation.context.as_ref().map(convert::context_from_wire).transpose()?;
            let new_conversation = NewConversation {
                key: non_empty(&conversation.key),
                title: conversation.title.trim().to_owned(),
                displayed: conversation.displayed.unwrap_or(true),
                read_only: conversation.read_only,
                group: conversation.group,
                context,
                member_ids: conversation.member_ids.clone(),
                all_application_users: conversation.all_application_users,
                integration_id: non_empty(&conversation.integration_id),
            };
            let created = self.create_conversation(&caller, new_conversation).await?;
            self.conversation_to_wire(&caller, created).await
        };
        answer(result.await)
    }

    async fn get_conversation(&self, request: Request<wire::GetConversationRequest>) -> Reply<wire::Conversation> {
        let caller = caller_of(&request)?;
        let result = async {
            let selector = selector(request.get_ref().conversation.as_ref())?;
            let conversation = self.accessible_conversation_by(&caller, &selector).await?;
            self.conversation_to_wire(&caller, conversation).await
        };
        answer(result.await)
    }

    async fn get_conversation_by_context(
        &self,
        request: Request<wire::GetConversationByContextRequest>,
    ) -> Reply<wire::Conversation> {
        let caller = caller_of(&request)?;
        let result = async {
            let context = request.get_ref().context.as_ref().ok_or_else(|| Error::field_required("context"))?;
            let context = convert::context_from_wire(context)?;
            let conversation =
                self.get_conversation_by_context(&caller, &context.object_type, &context.object_id).await?;
            self.conversation_to_wire(&caller, conversation).await
        };
        answer(result.await)
    }

    async fn update_conversation(
        &self,
        request: Request<wire::UpdateConversationRequest>,
    ) -> Reply<wire::Conversation> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let selector = selector(request.conversation.as_ref())?;
            let change = ConversationChange {
                title: request.title.as_ref().map(|title| title.trim().to_owned()),
                displayed: request.displayed,
                add_member_ids: request.add_member_ids.clone(),
                remove_member_ids: request.remove_member_ids.clone(),
            };
            let updated = self.update_conversation(&caller, &selector, change).await?;
            self.conversation_to_wire(&caller, updated).await
        };
        answer(result.await)
    }

    async fn leave_conversation(&self, request: Request<wire::LeaveConversationRequest>) -> Reply<wire::Empty> {
        let caller = caller_of(&request)?;
        let result = async {
            let selector = selector(request.get_ref().conversation.as_ref())?;
            self.leave_conversation(&caller, &selector).await
        };
        answer(result.await.map(|()| wire::Empty {}))
    }

    async fn get_conversations(&self, request: Request<wire::ConversationsFilter>) -> Reply<wire::ConversationList> {
        let caller = caller_of(&request)?;
        let result = async {
            let filter = request.get_ref();
            let context = filter.context.as_ref().map(convert::context_from_wire).transpose()?;
            let query = ConversationQuery {
                limit: rules::page_size(filter.count)?,
                direction: convert::sort_direction_from_wire(filter.sort_direction)?,
                start_date: filter.start_date.as_ref().map(convert::micros),
                after_id: non_empty(&filter.after),
                ids: filter.ids.clone(),
                title_contains: non_empty(&filter.title_contains),
                accessible_to: non_empty(&filter.member_id),
                context: context.map(|context| (context.object_type, context.object_id)),
                group: filter.group,
                displayed: filter.displayed,
                read_only: filter.read_only,
                has_context: filter.has_context,
            };
            let conversations = self.get_conversations(&caller, query).await?;
            self.conversations_to_wire(&caller, conversations).await
        };
        answer(result.await)
    }

    async fn get_conversation_list(&self, request: Request<wire::Empty>) -> Reply<wire::ConversationList> {
        let caller = caller_of(&request)?;
        let result = async {
            let conversations = self.conversation_list(&caller).await?;
            self.conversations_to_wire(&caller, conversations).await
        };
        answer(result.await)
    }

    async fn set_context_access(&self, request: Request<wire::SetContextAccessRequest>) -> Reply<wire::Empty> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let selector = selector(request.conversation.as_ref())?;
            self.set_context_access(
                &caller,
                &selector,
                &request.grant_user_ids,
                &request.revoke_user_ids,
                request.all_application_users,
            )
            .await
        };
        answer(result.await.map(|()| wire::Empty {}))
    }

    async fn send_message(&self, request: Request<wire::SendMessageRequest>) -> Reply<wire::Message> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let selector = selector(request.conversation.as_ref())?;
            let outgoing = OutgoingMessage {
                text: request.text.clone(),
                text_format: convert::text_format_from_wire(request.text_format)?,
                data: convert::data_from_wire(request.data.as_ref()),
                recipient_ids: request.recipient_ids.clone(),
                buttons: convert::button_panel_from_wire(request.buttons.as_ref())?,
                client_message_id: non_empty(&request.client_message_id),
                author_id: non_empty(&request.author_id),
                date: request.date.as_ref().map(convert::micros),
            };
            self.send_message(&caller, &selector, outgoing).await
        };
        answer(result.await.map(|message| convert::message_to_wire(&message)))
    }

    async fn edit_message(&self, request: Request<wire::EditMessageRequest>) -> Reply<wire::Message> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let edit = MessageEdit {
                text: request.text.clone(),
                text_format: convert::text_format_from_wire(request.text_format)?,
                data: convert::data_from_wire(request.data.as_ref()),
                buttons: convert::button_panel_from_wire(request.buttons.as_ref())?,
                clear_buttons: request.clear_buttons,
            };
            self.edit_message(&caller, &request.message_id, edit).await
        };
        answer(result.await.map(|message| convert::message_to_wire(&message)))
    }

    async fn press_button(&self, request: Request<wire::PressButtonRequest>) -> Reply<wire::PressButtonResponse> {
        let caller = caller_of(&request)?;
        let request = request.get_ref();
        let result = self.press_button(&caller, &request.message_id, request.row, request.column).await;
        answer(result.map(|pressed| wire::PressButtonResponse {
            sent_message: match pressed {
                crate::buttons::Pressed::QueuedForBot => None,
                crate::buttons::Pressed::Sent(message) => Some(convert::message_to_wire(&message)),
            },
        }))
    }

    async fn delete_message(&self, request: Request<wire::MessageRef>) -> Reply<wire::Empty> {
        let caller = caller_of(&request)?;
        answer(self.delete_message(&caller, &request.get_ref().message_id).await.map(|()| wire::Empty {}))
    }

    async fn get_message(&self, request: Request<wire::MessageRef>) -> Reply<wire::Message> {
        let caller = caller_of(&request)?;
        answer(
            self.get_message(&caller, &request.get_ref().message_id)
                .await
                .map(|message| convert::message_to_wire(&message)),
        )
    }

    async fn get_messages(&self, request: Request<wire::MessagesFilter>) -> Reply<wire::MessageList> {
        let caller = caller_of(&request)?;
        let result = async {
            let filter = request.get_ref();
            let selector = selector(filter.conversation.as_ref())?;
            let query = MessageQuery {
                limit: rules::page_size(filter.count)?,
                direction: convert::sort_direction_from_wire(filter.sort_direction)?,
                conversation_id: String::new(),
                after: non_empty(&filter.after),
                author_id: non_empty(&filter.author_id),
                start_date: filter.start_date.as_ref().map(convert::micros),
                end_date: filter.end_date.as_ref().map(convert::micros),
                text_contains: non_empty(&filter.text_contains),
                include_deleted: filter.include_deleted,
            };
            self.get_messages(&caller, &selector, query).await
        };
        answer(
            result.await.map(|messages| wire::MessageList {
                messages: messages.iter().map(convert::message_to_wire).collect(),
            }),
        )
    }

    async fn get_events(&self, request: Request<wire::GetEventsRequest>) -> Reply<wire::EventList> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let selector = selector(request.conversation.as_ref())?;
            self.get_events(&caller, &selector, request.after_seq, request.limit, request.max_bytes).await
        };
        answer(result.await.map(|(events, more)| wire::EventList {
            events: events.iter().map(convert::event_to_wire).collect(),
            more,
        }))
    }

    async fn mark_read(&self, request: Request<wire::MarkReadRequest>) -> Reply<wire::UnreadCount> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let selector = selector(request.conversation.as_ref())?;
            let remaining = self.mark_read(&caller, &selector, non_empty(&request.up_to_message_id).as_deref()).await?;
            let conversation = self.find_conversation(&caller, &selector).await?;
            Ok(wire::UnreadCount { conversation_id: conversation.id, unread_count: remaining })
        };
        answer(result.await)
    }

    async fn set_watch_mode(&self, request: Request<wire::SetWatchModeRequest>) -> Reply<wire::WatchMode> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let selector = selector(request.conversation.as_ref())?;
            self.set_watch_mode(&caller, &selector, non_empty(&request.user_id).as_deref(), request.watch).await
        };
        answer(result.await.map(|watch| wire::WatchMode { watch }))
    }

    async fn get_watch_mode(&self, request: Request<wire::GetWatchModeRequest>) -> Reply<wire::WatchMode> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let selector = selector(request.conversation.as_ref())?;
            self.watch_mode(&caller, &selector, non_empty(&request.user_id).as_deref()).await
        };
        answer(result.await.map(|watch| wire::WatchMode { watch }))
    }

    async fn set_do_not_disturb(&self, request: Request<wire::SetDoNotDisturbRequest>) -> Reply<wire::DoNotDisturb> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let selector = optional_selector(request.conversation.as_ref())?;
            let until = request.until.as_ref().map(convert::micros);
            crate::notifications::check_until(until)?;
            self.set_do_not_disturb(&caller, selector.as_ref(), non_empty(&request.user_id).as_deref(), until).await
        };
        answer(result.await.map(dnd_to_wire))
    }

    async fn get_do_not_disturb(&self, request: Request<wire::GetDoNotDisturbRequest>) -> Reply<wire::DoNotDisturb> {
        let caller = caller_of(&request)?;
        let result = async {
            let request = request.get_ref();
            let selector = optional_selector(request.conversation.as_ref())?;
            self.do_not_disturb(&caller, selector.as_ref(), non_empty(&request.user_id).as_deref()).await
        };
        answer(result.await.map(dnd_to_wire))
    }

    async fn get_unread_counts(&self, request: Request<wire::Empty>) -> Reply<wire::UnreadCounts> {
        let caller = caller_of(&request)?;
        answer(self.unread_counts(&caller).await.map(|counts| {
            let total_unread = counts.iter().map(|(_, count)| count).sum();
            wire::UnreadCounts {
                conversations: counts
                    .into_iter()
                    .map(|(conversation_id, unread_count)| wire::UnreadCount { conversation_id, unread_count })
                    .collect(),
                total_unread,
            }
        }))
    }
}
