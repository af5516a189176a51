//! Executing a parsed command for one integration through routing.

use super::*;

/// One request of one integration.
pub(super) struct Session<'a> {
    pub(super) service: &'a BotsService,
    pub(super) application_id: String,
    pub(super) integration: Integration,
}

impl Session<'_> {
    pub(super) fn routing(&self) -> &dyn Routing {
        self.service.routing.as_ref()
    }

    pub(super) fn store(&self) -> &dyn Store {
        self.service.store.as_ref()
    }

    /// Privileged mode, acting as `user_id` (or as the application).
    pub(super) fn caller(&self, user_id: Option<&str>) -> Caller {
        Caller { application_id: self.application_id.clone(), user_id: user_id.map(str::to_owned), privileged: true }
    }

    pub(super) fn integration_id(&self) -> &str {
        &self.integration.id
    }

    pub(super) async fn execute(&self, command: Command) -> Outcome<Value> {
        match command {
            Command::CreateConversation(params) => self.create_conversation(params).await,
            Command::CreateMessage(_) | Command::UpdateMessage(_) | Command::UpdateConversation(_) => {
                self.in_conversation(command).await
            }
            Command::CreateUser(params) => self.create_user(params).await,
            Command::UpdateUser(params) => self.update_user(params).await,
        }
    }

    /// Commands about an existing conversation: it must exist, and the
    /// anonymous rule applies.
    pub(super) async fn in_conversation(&self, command: Command) -> Outcome<Value> {
        let ext_conversation_id = match &command {
            Command::CreateMessage(params) => params.ext_conversation_id.clone(),
            Command::UpdateMessage(params) => params.ext_conversation_id.clone(),
            Command::UpdateConversation(params) => params.ext_conversation_id.clone(),
            Command::CreateConversation(_) | Command::CreateUser(_) | Command::UpdateUser(_) => {
                return Err(Reject::failed("internal: not a conversation command"));
            }
        };
        let target = self.target(&ext_conversation_id).await?.ok_or_else(|| {
            Reject::failed(format!(
                "conversation `{}` does not exist: create it with createConversation first",
                clip(&ext_conversation_id)
            ))
        })?;
        if target.anonymous {
            check_anonymous(&ext_conversation_id, &command)?;
        }
        match command {
            Command::CreateMessage(params) => self.create_message(params, &target).await,
            Command::UpdateMessage(params) => self.update_message(params, &target).await,
            Command::UpdateConversation(params) => self.update_conversation(params, &target).await,
            Command::CreateConversation(_) | Command::CreateUser(_) | Command::UpdateUser(_) => {
                Err(Reject::failed("internal: not a conversation command"))
            }
        }
    }

    // ---- lookups

    /// The collaboration user behind an external user id; 500 when unknown,
    /// like any other object a request names that does not exist.
    pub(super) async fn mapped_user(&self, field: &str, ext_user_id: &str) -> Outcome<String> {
        self.store().get_integration_user(&self.application_id, self.integration_id(), ext_user_id).await?.ok_or_else(
            || {
                Reject::failed(format!(
                    "{field}: no user has extUserId `{}`; create it with createUser first",
                    clip(ext_user_id)
                ))
            },
        )
    }

    pub(super) async fn mapped_users(&self, field: &str, ext_user_ids: &[String]) -> Outcome<Vec<String>> {
        let mut user_ids = Vec::with_capacity(ext_user_ids.len());
        for ext_user_id in ext_user_ids {
            user_ids.push(self.mapped_user(field, ext_user_id).await?);
        }
        Ok(user_ids)
    }

    /// A mapped conversation, or a conversation of the application whose id
    /// is `ext_conversation_id` (one created through the API).
    pub(super) async fn target(&self, ext_conversation_id: &str) -> Outcome<Option<Target>> {
        if let Some(mapping) = self
            .store()
            .get_integration_conversation(&self.application_id, self.integration_id(), ext_conversation_id)
            .await?
        {
            return Ok(Some(Target {
                conversation_id: mapping.conversation_id,
                created_here: true,
                anonymous: mapping.anonymous,
            }));
        }
        let request = wire::GetConversationRequest { conversation: conversation_ref(ext_conversation_id) };
        match routed(self.routing().get_conversation(self.caller(None).request(request)).await) {
            Ok(conversation) => {
                Ok(Some(Target { conversation_id: conversation.id, created_here: false, anonymous: false }))
            }
            Err(error) if error.code.class() == ErrorClass::NotFound => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    pub(super) async fn conversation(&self, conversation_id: &str) -> Outcome<wire::Conversation> {
        let request = wire::GetConversationRequest { conversation: conversation_ref(conversation_id) };
        Ok(routed(self.routing().get_conversation(self.caller(None).request(request)).await)?)
    }

    /// Pages through the application's integration users for one external
    /// id: only needed when a request stopped between creating a user and
    /// recording it.
    pub(super) async fn find_user_by_external_id(&self, external_id: &str) -> Outcome<Option<String>> {
        let mut query = UserQuery {
            limit: MAX_PAGE_SIZE,
            kind: Some(UserKind::Integration),
            include_blocked: true,
            ..Default::default()
        };
        loop {
            let page = self.store().list_users(&self.application_id, &query).await?;
            if let Some(user) = page
                .iter()
                .find(|user| user.external_system_type == WEBHOOK && user.external_system_user_id == external_id)
            {
                return Ok(Some(user.id.clone()));
            }
            if page.len() < MAX_PAGE_SIZE as usize {
                return Ok(None);
            }
            query.after = page.last().map(|user| user.id.clone());
        }
    }

    /// The user named after the integration that speaks when a request
    /// names nobody; created on first use.
    pub(super) async fn own_user(&self) -> Outcome<String> {
        if let Some(user_id) = &self.integration.own_user_id {
            return Ok(user_id.clone());
        }
        let name = beseda_core::rules::truncate_chars(
            [self.integration.presentation.trim(), self.integration.key.trim(), "Integration"]
                .into_iter()
                .find(|name| !name.is_empty())
                .unwrap_or("Integration"),
            MAX_NAME_CHARS,
        )
        .to_owned();
        let external_id = own_external_user_id(self.integration_id());
        let user = wire::User {
            kind: wire::UserKind::Integration as i32,
            name: name.clone(),
            full_name: name,
            external_system_type: WEBHOOK.to_owned(),
            external_system_user_id: external_id.clone(),
            ..Default::default()
        };
        let request = wire::CreateUserRequest { user: Some(user) };
        let user_id = match routed(self.routing().create_user(self.caller(None).request(request)).await) {
            Ok(user) => user.id,
            // Created by a concurrent request, or by one that stopped before recording it.
            Err(error) if is_already_exists(&error) => {
                self.find_user_by_external_id(&external_id).await?.ok_or_else(|| Reject::failed(error.to_string()))?
            }
            Err(error) => return Err(error.into()),
        };
        // Read again so that a concurrent change of the integration is kept.
        let mut integration = self
            .store()
            .get_integration(&self.application_id, self.integration_id())
            .await?
            .ok_or_else(Reject::not_found)?;
        if integration.own_user_id.as_deref() != Some(user_id.as_str()) {
            integration.own_user_id = Some(user_id.clone());
            self.store().update_integration(&self.application_id, &integration).await?;
        }
        Ok(user_id)
    }

    /// Makes sure `user_id` may post in the conversation: a member already,
    /// added when the integration created the conversation, else a 500.
    pub(super) async fn ensure_member(&self, target: &Target, user_id: &str) -> Outcome<()> {
        let conversation = self.conversation(&target.conversation_id).await?;
        if conversation.all_application_users || conversation.member_ids.iter().any(|member| member == user_id) {
            return Ok(());
        }
        if !target.created_here {
            return Err(Reject::failed(format!(
                "user `{user_id}` is not a member of conversation `{}`, which the application created: \
                 add that user to it in the application first",
                conversation.id
            )));
        }
        let request = wire::UpdateConversationRequest {
            conversation: conversation_ref(&conversation.id),
            add_member_ids: vec![user_id.to_owned()],
            ..Default::default()
        };
        routed(self.routing().update_conversation(self.caller(Some(user_id)).request(request)).await)?;
        Ok(())
    }

    // ---- commands

    pub(super) async fn create_conversation(&self, params: CreateConversation) -> Outcome<Value> {
        let ext_conversation_id = &params.ext_conversation_id;
        let anonymous = params.ext_user_id.is_none();
        if anonymous && !params.members.is_empty() {
            return Err(Reject::bad_request(format!(
                "conversation `{}` is created without extUserId, so the request must not carry members \
                 (requests for such a conversation must not carry extUserId, members, addMembers or removeMembers)",
                clip(ext_conversation_id)
            )));
        }
        if self.target(ext_conversation_id).await?.is_some() {
            return Err(Reject::conflict(format!("conversation `{}` exists already", clip(ext_conversation_id))));
        }
        // Everything the request names is checked before anything is created.
        let named_author = match &params.ext_user_id {
            Some(ext_user_id) => Some(self.mapped_user("extUserId", ext_user_id).await?),
            None => None,
        };
        let members = self.mapped_users("members", &params.members).await?;
        let author = match named_author {
            Some(author) => author,
            None => self.own_user().await?,
        };
        let member_ids: BTreeSet<String> = std::iter::once(author.clone())
            .chain(self.integration.default_member_ids.iter().cloned())
            .chain(members)
            .collect();
        let key = conversation_key(self.integration_id(), ext_conversation_id);
        let conversation = wire::Conversation {
            key: key.clone(),
            title: params.title,
            displayed: Some(true),
            group: true,
            member_ids: member_ids.into_iter().collect(),
            integration_id: self.integration.id.clone(),
            ..Default::default()
        };
        let request = wire::CreateConversationRequest { conversation: Some(conversation) };
        let conversation_id =
            match routed(self.routing().create_conversation(self.caller(Some(&author)).request(request)).await) {
                Ok(conversation) => conversation.id,
                // Left by a request that stopped before recording it (or a
                // concurrent one, which the mapping below turns into a 409).
                Err(error) if error.code == ErrorCode::ConversationKeyTaken => {
                    let request = wire::GetConversationRequest {
                        conversation: Some(wire::ConversationRef { by: Some(wire::conversation_ref::By::Key(key)) }),
                    };
                    routed(self.routing().get_conversation(self.caller(None).request(request)).await)?.id
                }
                Err(error) => return Err(error.into()),
            };
        let mapping = IntegrationConversation {
            ext_conversation_id: ext_conversation_id.clone(),
            conversation_id: conversation_id.clone(),
            anonymous,
        };
        match self.store().put_integration_conversation(&self.application_id, self.integration_id(), &mapping).await {
            Ok(()) => Ok(json!({"conversationId": conversation_id, "authorId": author})),
            Err(error) if is_already_exists(&error) => {
                Err(Reject::conflict(format!("conversation `{}` exists already", clip(ext_conversation_id))))
            }
            Err(error) => Err(error.into()),
        }
    }

    pub(super) async fn create_message(&self, params: CreateMessage, target: &Target) -> Outcome<Value> {
        let replayed = || {
            Reject::conflict(format!(
                "message `{}` exists already in conversation `{}`",
                clip(&params.ext_id),
                clip(&params.ext_conversation_id)
            ))
        };
        if self
            .store()
            .get_integration_message(
                &self.application_id,
                self.integration_id(),
                &params.ext_conversation_id,
                &params.ext_id,
            )
            .await?
            .is_some()
        {
            return Err(replayed());
        }
        let author = match &params.ext_user_id {
            Some(ext_user_id) => self.mapped_user("extUserId", ext_user_id).await?,
            None => self.own_user().await?,
        };
        self.ensure_member(target, &author).await?;
        let request = wire::SendMessageRequest {
            conversation: conversation_ref(&target.conversation_id),
            text: params.text.text.clone(),
            text_format: params.text.wire_format(),
            data: params.data,
            client_message_id: client_message_id(self.integration_id(), &params.ext_conversation_id, &params.ext_id),
            author_id: author.clone(),
            ..Default::default()
        };
        let message = routed(self.routing().send_message(self.caller(Some(&author)).request(request)).await)?;
        match self
            .store()
            .put_integration_message(
                &self.application_id,
                self.integration_id(),
                &params.ext_conversation_id,
                &params.ext_id,
                &message.id,
            )
            .await
        {
            Ok(()) => Ok(json!({
                "messageId": message.id,
                "conversationId": message.conversation_id,
                "authorId": message.author_id,
            })),
            Err(error) if is_already_exists(&error) => Err(replayed()),
            Err(error) => Err(error.into()),
        }
    }

    pub(super) async fn update_message(&self, params: UpdateMessage, target: &Target) -> Outcome<Value> {
        let message_id = self
            .store()
            .get_integration_message(
                &self.application_id,
                self.integration_id(),
                &params.ext_conversation_id,
                &params.ext_id,
            )
            .await?
            .ok_or_else(|| {
                Reject::failed(format!(
                    "message `{}` does not exist in conversation `{}`: create it with createMessage first",
                    clip(&params.ext_id),
                    clip(&params.ext_conversation_id)
                ))
            })?;
        let request = wire::MessageRef { message_id: message_id.clone() };
        let message = routed(self.routing().get_message(self.caller(None).request(request)).await)?;
        if let Some(ext_user_id) = &params.ext_user_id {
            let user_id = self.mapped_user("extUserId", ext_user_id).await?;
            if user_id != message.author_id {
                return Err(Reject::failed(format!(
                    "extUserId `{}` is not the author of message `{}`",
                    clip(ext_user_id),
                    clip(&params.ext_id)
                )));
            }
        }
        let request = wire::EditMessageRequest {
            message_id,
            text: Some(params.text.text.clone()),
            text_format: params.text.wire_format(),
            ..Default::default()
        };
        let edited = routed(self.routing().edit_message(self.caller(Some(&message.author_id)).request(request)).await)?;
        Ok(json!({
            "messageId": edited.id,
            "conversationId": target.conversation_id,
            "authorId": edited.author_id,
        }))
    }

    pub(super) async fn update_conversation(&self, params: UpdateConversation, target: &Target) -> Outcome<Value> {
        if !target.created_here {
            return Err(Reject::failed(format!(
                "conversation `{}` was created by the application, not by this integration: \
                 the integration may post to it but not change it",
                target.conversation_id
            )));
        }
        let acting = match &params.ext_user_id {
            Some(ext_user_id) => Some(self.mapped_user("extUserId", ext_user_id).await?),
            None => None,
        };
        let add_member_ids = self.mapped_users("addMembers", &params.add_members).await?;
        let remove_member_ids = self.mapped_users("removeMembers", &params.remove_members).await?;
        let request = wire::UpdateConversationRequest {
            conversation: conversation_ref(&target.conversation_id),
            title: params.title,
            add_member_ids,
            remove_member_ids,
            displayed: None,
        };
        let updated =
            routed(self.routing().update_conversation(self.caller(acting.as_deref()).request(request)).await)?;
        Ok(json!({"conversationId": updated.id}))
    }

    pub(super) async fn create_user(&self, params: CreateUser) -> Outcome<Value> {
        let exists = || Reject::conflict(format!("user `{}` exists already", clip(&params.ext_user_id)));
        if self
            .store()
            .get_integration_user(&self.application_id, self.integration_id(), &params.ext_user_id)
            .await?
            .is_some()
        {
            return Err(exists());
        }
        let external_id = external_user_id(self.integration_id(), &params.ext_user_id);
        let user = wire::User {
            kind: wire::UserKind::Integration as i32,
            name: params.name.clone(),
            full_name: params.full_name.clone(),
            picture: params.picture.clone().unwrap_or_default(),
            external_system_type: WEBHOOK.to_owned(),
            external_system_user_id: external_id.clone(),
            ..Default::default()
        };
        let request = wire::CreateUserRequest { user: Some(user.clone()) };
        let user_id = match routed(self.routing().create_user(self.caller(None).request(request)).await) {
            Ok(created) => created.id,
            Err(error) if is_already_exists(&error) => {
                // Created by a request that stopped before recording it:
                // take it over with this request's properties.
                let Some(user_id) = self.find_user_by_external_id(&external_id).await? else {
                    return Err(exists());
                };
                let mut update_mask = vec!["name".to_owned(), "fullName".to_owned()];
                if params.picture.is_some() {
                    update_mask.push("picture".to_owned());
                }
                let request = wire::UpdateUserRequest { user_id: user_id.clone(), update_mask, user: Some(user) };
                routed(self.routing().update_user(self.caller(None).request(request)).await)?;
                user_id
            }
            Err(error) => return Err(error.into()),
        };
        match self
            .store()
            .put_integration_user(&self.application_id, self.integration_id(), &params.ext_user_id, &user_id)
            .await
        {
            Ok(()) => Ok(json!({"userId": user_id})),
            Err(error) if is_already_exists(&error) => Err(exists()),
            Err(error) => Err(error.into()),
        }
    }

    pub(super) async fn update_user(&self, params: UpdateUser) -> Outcome<Value> {
        let user_id = self.mapped_user("extUserId", &params.ext_user_id).await?;
        let mut update_mask = Vec::new();
        let mut user = wire::User::default();
        if let Some(name) = params.name {
            update_mask.push("name".to_owned());
            user.name = name;
        }
        if let Some(full_name) = params.full_name {
            update_mask.push("fullName".to_owned());
            user.full_name = full_name;
        }
        if let Some(picture) = params.picture {
            update_mask.push("picture".to_owned());
            user.picture = picture;
        }
        let request = wire::UpdateUserRequest { user_id: user_id.clone(), update_mask, user: Some(user) };
        routed(self.routing().update_user(self.caller(None).request(request)).await)?;
        Ok(json!({"userId": user_id}))
    }
}
