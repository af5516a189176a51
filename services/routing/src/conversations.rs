//! Conversations (§29.3.2, §29.4.4.1): context and non-context, group and
//! one-on-one, keys, read-only, members, leaving, access and the
//! conversation list.

use std::collections::BTreeSet;

use beseda_core::limits::{CONVERSATION_LIST_SIZE, MAX_MEMBERS, MAX_TITLE_CHARS};
use beseda_core::model::{Conversation, User, UserKind, now_micros};
use beseda_core::{Error, ErrorCode, Result, rules};
use beseda_proto::v1 as wire;
use beseda_store::{ConversationChange, ConversationQuery};

use crate::{Caller, RoutingService, convert};

/// How a conversation is named in a request.
#[derive(Clone, Debug)]
pub enum ConversationSelector {
    Id(String),
    Key(String),
}

impl ConversationSelector {
    pub fn from_wire(reference: Option<&wire::ConversationRef>) -> Result<Self> {
        match reference.and_then(|reference| reference.by.as_ref()) {
            Some(wire::conversation_ref::By::Id(id)) if !id.trim().is_empty() => {
                Ok(ConversationSelector::Id(id.clone()))
            }
            Some(wire::conversation_ref::By::Key(key)) if !key.trim().is_empty() => {
                Ok(ConversationSelector::Key(key.clone()))
            }
            _ => Err(Error::new(ErrorCode::FieldRequired, "name the conversation by `id` or by `key`")
                .with_field("conversation")),
        }
    }
}

/// A new conversation as requested.
#[derive(Clone, Debug)]
pub struct NewConversation {
    pub key: Option<String>,
    pub title: String,
    pub displayed: bool,
    pub read_only: bool,
    pub group: bool,
    pub context: Option<beseda_core::model::ContextRef>,
    pub member_ids: Vec<String>,
    pub all_application_users: bool,
    /// The integration whose external chat this is (privileged mode only).
    pub integration_id: Option<String>,
}

impl RoutingService {
    pub(crate) async fn find_conversation(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
    ) -> Result<Conversation> {
        let found = match selector {
            ConversationSelector::Id(id) => self.store.get_conversation(&caller.application_id, id).await?,
            ConversationSelector::Key(key) => self.store.get_conversation_by_key(&caller.application_id, key).await?,
        };
        found.ok_or_else(|| match selector {
            ConversationSelector::Id(id) => crate::not_found(ErrorCode::ConversationNotFound, "conversation", id),
            ConversationSelector::Key(key) => Error::new(
                ErrorCode::ConversationNotFound,
                format!("no conversation has the key `{key}` in this application"),
            ),
        })
    }

    /// Whether `user` may read and post: a member, everyone's conversation,
    /// or a context conversation the application granted access to.
    pub(crate) async fn can_access(
        &self,
        application_id: &str,
        conversation: &Conversation,
        user: &User,
    ) -> Result<bool> {
        if conversation.context.is_some() && user.kind == UserKind::External {
            return Ok(false);
        }
        if conversation.all_application_users && user.kind != UserKind::Guest {
            return Ok(true);
        }
        if conversation.member_ids.binary_search(&user.id).is_ok() {
            return Ok(true);
        }
        if conversation.context.is_some() {
            return self.store.has_context_access(application_id, &conversation.id, &user.id).await;
        }
        Ok(false)
    }

    /// Loads a conversation the caller may access (privileged mode without a
    /// user may access every conversation of its application).
    pub(crate) async fn accessible_conversation_by(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
    ) -> Result<Conversation> {
        Ok(self.accessible_conversation_and_user(caller, selector).await?.0)
    }

    /// Like [`Self::accessible_conversation_by`], also handing back the acting
    /// user it loaded so that callers do not load them again.
    pub(crate) async fn accessible_conversation_and_user(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
    ) -> Result<(Conversation, Option<User>)> {
        let conversation = self.find_conversation(caller, selector).await?;
        let Some(user) = self.optional_acting_user(caller).await? else {
            return Ok((conversation, None));
        };
        if caller.privileged || self.can_access(&caller.application_id, &conversation, &user).await? {
            return Ok((conversation, Some(user)));
        }
        Err(Error::new(
            ErrorCode::NotAMember,
            format!(
                "user `{}` is not a member of conversation `{}` and has no access to it",
                user.name, conversation.id
            ),
        ))
    }

    pub(crate) async fn accessible_conversation(&self, caller: &Caller, conversation_id: &str) -> Result<Conversation> {
        self.accessible_conversation_by(caller, &ConversationSelector::Id(conversation_id.to_owned())).await
    }

    /// Loads members for checks; every id must exist and none may be blocked.
    async fn members_for_change(&self, caller: &Caller, member_ids: &[String], field: &str) -> Result<Vec<User>> {
        let users = self.store.get_users(&caller.application_id, member_ids).await?;
        for member_id in member_ids {
            let Some(user) = users.iter().find(|user| &user.id == member_id) else {
                return Err(crate::not_found(ErrorCode::UserNotFound, "user", member_id).with_field(field));
            };
            if user.blocked {
                return Err(Error::new(
                    ErrorCode::RecipientBlocked,
                    format!("user `{}` is blocked and cannot be added", user.name),
                )
                .with_field(field));
            }
        }
        Ok(users)
    }

    /// CreateConversation (СоздатьОбсуждение).
    pub async fn create_conversation(&self, caller: &Caller, request: NewConversation) -> Result<Conversation> {
        let acting = self.optional_acting_user(caller).await?;
        if let Some(acting) = &acting {
            match acting.kind {
                UserKind::Guest => {
                    return Err(Error::new(ErrorCode::UserKindRestricted, "guest users cannot create conversations"));
                }
                UserKind::External if request.context.is_some() => {
                    return Err(Error::new(
                        ErrorCode::UserKindRestricted,
                        "external users work in non-context conversations only",
                    ));
                }
                _ => {}
            }
        }
        if request.read_only {
            caller.require_privileged("creating a read-only conversation")?;
        }
        if let Some(integration_id) = &request.integration_id {
            caller.require_privileged("marking a conversation as an integration's")?;
            if self.store.get_integration(&caller.application_id, integration_id).await?.is_none() {
                return Err(crate::not_found(ErrorCode::IntegrationNotFound, "integration", integration_id)
                    .with_field("conversation.integrationId"));
            }
        }
        if let Some(key) = &request.key {
            rules::conversation_key(key)?;
        }
        rules::bounded_text("title", &request.title, MAX_TITLE_CHARS)?;
        let mut member_ids: BTreeSet<String> = request.member_ids.iter().cloned().collect();
        if let Some(acting) = &acting {
            member_ids.insert(acting.id.clone());
        }
        let is_context = request.context.is_some();
        let one_on_one = !is_context && !request.group;
        if one_on_one {
            if !request.title.trim().is_empty() {
                return Err(
                    Error::new(ErrorCode::OneOnOneRules, "a one-on-one conversation has no title").with_field("title")
                );
            }
            if request.all_application_users {
                return Err(Error::new(
                    ErrorCode::OneOnOneRules,
                    "a one-on-one conversation cannot be for all application users",
                )
                .with_field("allApplicationUsers"));
            }
            if member_ids.len() != 2 {
                return Err(Error::new(
                    ErrorCode::OneOnOneRules,
                    format!("a one-on-one conversation has exactly two members, not {}", member_ids.len()),
                )
                .with_field("memberIds"));
            }
        }
        if member_ids.len() > MAX_MEMBERS {
            return Err(Error::new(
                ErrorCode::TooManyMembers,
                format!("{} members requested; a conversation has at most {MAX_MEMBERS}", member_ids.len()),
            )
            .with_field("memberIds"));
        }
        let member_ids: Vec<String> = member_ids.into_iter().collect();
        let members = self.members_for_change(caller, &member_ids, "memberIds").await?;
        if one_on_one && members.iter().any(|member| member.kind == UserKind::Integration) {
            return Err(Error::new(
                ErrorCode::UserKindRestricted,
                "integration users have no one-on-one conversations",
            )
            .with_field("memberIds"));
        }
        if is_context && members.iter().any(|member| member.kind == UserKind::External) {
            return Err(Error::new(ErrorCode::UserKindRestricted, "external users cannot join context conversations")
                .with_field("memberIds"));
        }
        let conversation = Conversation {
            id: beseda_core::model::new_id(),
            key: request.key,
            title: request.title,
            // Context conversations are always displayed (§29.3.2).
            displayed: request.displayed || is_context,
            read_only: request.read_only,
            group: request.group || is_context,
            context: request.context,
            member_ids,
            all_application_users: request.all_application_users,
            integration_id: request.integration_id.clone().unwrap_or_default(),
            created_at: now_micros(),
            last_message_at: None,
            last_seq: 0,
        };
        self.store.insert_conversation(&caller.application_id, &conversation).await?;
        // Its outbox row (ConversationCreated) has no conversation event to announce it.
        self.outbox_signal.notify_one();
        for member_id in &conversation.member_ids {
            self.publish_user_event(
                &caller.application_id,
                member_id,
                wire::user_event::Kind::ConversationChanged(convert::conversation_to_wire(&conversation, 0)),
            )
            .await;
        }
        metrics::counter!("beseda_conversations_created_total").increment(1);
        Ok(conversation)
    }

    pub async fn get_conversation_by_context(
        &self,
        caller: &Caller,
        object_type: &str,
        object_id: &str,
    ) -> Result<Conversation> {
        let conversation =
            self.store.get_conversation_by_context(&caller.application_id, object_type, object_id).await?.ok_or_else(
                || {
                    Error::new(
                        ErrorCode::ConversationNotFound,
                        format!("no conversation belongs to {object_type} `{object_id}`"),
                    )
                },
            )?;
        self.accessible_conversation(caller, &conversation.id).await
    }

    /// Rename, add or remove members, change Displayed.
    pub async fn update_conversation(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
        change: ConversationChange,
    ) -> Result<Conversation> {
        if change.title.is_none()
            && change.displayed.is_none()
            && change.add_member_ids.is_empty()
            && change.remove_member_ids.is_empty()
        {
            return Err(Error::new(
                ErrorCode::FieldRequired,
                "nothing to change: set title, displayed, addMemberIds or removeMemberIds",
            )
            .with_field("title"));
        }
        let conversation = self.accessible_conversation_by(caller, selector).await?;
        let acting = self.optional_acting_user(caller).await?;
        if conversation.read_only && !caller.privileged {
            return Err(Error::new(ErrorCode::ConversationReadOnly, "the conversation is read-only"));
        }
        if conversation.is_one_on_one()
            && (change.title.is_some() || !change.add_member_ids.is_empty() || !change.remove_member_ids.is_empty())
        {
            return Err(Error::new(
                ErrorCode::OneOnOneRules,
                "a one-on-one conversation cannot be renamed or change members",
            ));
        }
        if let Some(acting) = &acting
            && matches!(acting.kind, UserKind::External | UserKind::Guest)
        {
            return Err(Error::new(
                ErrorCode::UserKindRestricted,
                "external and guest users can only leave a conversation",
            ));
        }
        if !change.remove_member_ids.is_empty() {
            caller.require_privileged("removing other members")?;
        }
        if let Some(displayed) = change.displayed {
            caller.require_privileged("changing Displayed")?;
            if !displayed && conversation.context.is_some() {
                return Err(Error::invalid("displayed", "context conversations are always displayed"));
            }
        }
        if let Some(title) = &change.title {
            rules::bounded_text("title", title, MAX_TITLE_CHARS)?;
        }
        let added: Vec<String> = change
            .add_member_ids
            .iter()
            .filter(|id| conversation.member_ids.binary_search(id).is_err())
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // Count before looking anyone up, so an oversized request costs no queries.
        let removed: BTreeSet<&String> =
            change.remove_member_ids.iter().filter(|id| conversation.member_ids.binary_search(id).is_ok()).collect();
        let resulting = conversation.member_ids.len() + added.len() - removed.len();
        if resulting > MAX_MEMBERS {
            return Err(Error::new(
                ErrorCode::TooManyMembers,
                format!("the conversation would have {resulting} members; at most {MAX_MEMBERS} are allowed"),
            )
            .with_field("addMemberIds"));
        }
        let added_users = self.members_for_change(caller, &added, "addMemberIds").await?;
        if conversation.context.is_some() && added_users.iter().any(|user| user.kind == UserKind::External) {
            return Err(Error::new(ErrorCode::UserKindRestricted, "external users cannot join context conversations")
                .with_field("addMemberIds"));
        }
        let change = ConversationChange { add_member_ids: added, ..change };
        self.apply_conversation_change(caller, &conversation, change).await
    }

    async fn apply_conversation_change(
        &self,
        caller: &Caller,
        before: &Conversation,
        change: ConversationChange,
    ) -> Result<Conversation> {
        let (after, event) = self.store.update_conversation(&caller.application_id, &before.id, &change).await?;
        self.publish_conversation_event(&caller.application_id, &event).await;
        let affected: BTreeSet<&String> = before.member_ids.iter().chain(after.member_ids.iter()).collect();
        for member_id in affected {
            self.publish_user_event(
                &caller.application_id,
                member_id,
                wire::user_event::Kind::ConversationChanged(convert::conversation_to_wire(&after, 0)),
            )
            .await;
        }
        Ok(after)
    }

    /// LeaveConversation: when the last member leaves, the conversation stays
    /// stored but nobody can access it.
    pub async fn leave_conversation(&self, caller: &Caller, selector: &ConversationSelector) -> Result<()> {
        let acting = self.acting_user(caller).await?;
        let conversation = self.find_conversation(caller, selector).await?;
        if conversation.read_only && !caller.privileged {
            return Err(Error::new(ErrorCode::ConversationReadOnly, "members cannot leave a read-only conversation"));
        }
        if conversation.is_one_on_one() {
            return Err(Error::new(ErrorCode::OneOnOneRules, "a one-on-one conversation cannot be left"));
        }
        if conversation.member_ids.binary_search(&acting.id).is_err() {
            return Err(Error::new(
                ErrorCode::NotAMember,
                format!("user `{}` is not a member of this conversation", acting.name),
            ));
        }
        let change = ConversationChange { remove_member_ids: vec![acting.id.clone()], ..Default::default() };
        self.apply_conversation_change(caller, &conversation, change).await?;
        Ok(())
    }

    /// GetConversations (ПолучитьОбсуждения).
    pub async fn get_conversations(&self, caller: &Caller, mut query: ConversationQuery) -> Result<Vec<Conversation>> {
        let acting = self.optional_acting_user(caller).await?;
        match &acting {
            Some(acting) => {
                if acting.kind == UserKind::Guest {
                    return Err(Error::new(ErrorCode::UserKindRestricted, "guest users have no conversation list"));
                }
                if acting.kind == UserKind::External {
                    query.has_context = Some(false);
                }
                match &query.accessible_to {
                    Some(member) if member != &acting.id && !caller.privileged => {
                        return Err(Error::new(
                            ErrorCode::PrivilegedModeRequired,
                            "listing another user's conversations needs privileged mode",
                        )
                        .with_field("memberId"));
                    }
                    Some(_) => {}
                    None => query.accessible_to = Some(acting.id.clone()),
                }
            }
            None => caller.require_privileged("GetConversations without a user")?,
        }
        self.store.list_conversations(&caller.application_id, &query).await
    }

    /// The conversation list: unread first, padded to 50 by last-message date.
    pub async fn conversation_list(&self, caller: &Caller) -> Result<Vec<Conversation>> {
        let acting = self.acting_user(caller).await?;
        if acting.kind == UserKind::Guest {
            return Err(Error::new(ErrorCode::UserKindRestricted, "guest users have no conversation list"));
        }
        self.store.conversation_list(&caller.application_id, &acting.id, CONVERSATION_LIST_SIZE).await
    }

    /// How the application grants the Read right on a context object.
    pub async fn set_context_access(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
        grant_user_ids: &[String],
        revoke_user_ids: &[String],
        all_application_users: Option<bool>,
    ) -> Result<()> {
        caller.require_privileged("SetContextAccess")?;
        let conversation = self.find_conversation(caller, selector).await?;
        if conversation.context.is_none() {
            return Err(Error::invalid(
                "conversation",
                "access grants apply to context conversations; use members otherwise",
            ));
        }
        self.members_for_change(caller, grant_user_ids, "grantUserIds").await?;
        let revoked = self
            .store
            .set_context_access(
                &caller.application_id,
                &conversation.id,
                grant_user_ids,
                revoke_user_ids,
                all_application_users,
            )
            .await?;
        if let Some(event) = revoked {
            // In seq order with the messages: gateways end the subscriptions
            // of users who lost access before delivering anything after it.
            self.publish_conversation_event(&caller.application_id, &event).await;
        }
        Ok(())
    }

    /// Unread count of the acting user per conversation, for list answers.
    pub async fn unread_by_conversation(&self, caller: &Caller) -> Result<std::collections::HashMap<String, u32>> {
        match &caller.user_id {
            Some(user_id) => Ok(self.store.unread_counts(&caller.application_id, user_id).await?.into_iter().collect()),
            None => Ok(Default::default()),
        }
    }
}
