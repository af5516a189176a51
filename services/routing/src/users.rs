//! Users (§29.4.3): kinds and their restrictions, properties, blocking,
//! listing with filters and paging.

use std::collections::HashSet;

use beseda_core::limits::{MAX_NAME_CHARS, MAX_PAGE_SIZE};
use beseda_core::model::{User, UserKind, now_micros};
use beseda_core::{Error, ErrorCode, Result, rules};
use beseda_proto::v1 as wire;
use beseda_store::{ConversationQuery, UserQuery};

use crate::{Caller, RoutingService};

/// Fields of [`User`] an update may name (canonical JSON names).
pub const UPDATABLE_FIELDS: &[&str] =
    &["name", "fullName", "picture", "phone", "email", "matchingKey", "infobaseUserId", "blocked"];
/// What users may change about themselves; everything else needs privileged mode.
const SELF_EDITABLE_FIELDS: &[&str] = &["fullName", "picture", "phone", "email"];
/// Guests may also change their own name (§29.3.6).
const GUEST_SELF_EDITABLE_FIELDS: &[&str] = &["name", "fullName", "picture", "phone", "email"];

fn check_properties(user: &User) -> Result<()> {
    rules::bounded_text("name", &user.name, MAX_NAME_CHARS)?;
    rules::bounded_text("fullName", &user.full_name, MAX_NAME_CHARS)?;
    rules::bounded_text("phone", &user.phone, MAX_NAME_CHARS)?;
    rules::bounded_text("matchingKey", &user.matching_key, MAX_NAME_CHARS)?;
    if user.name.trim().is_empty() {
        return Err(Error::field_required("name"));
    }
    if !user.email.is_empty() {
        rules::normalize_email(&user.email)?;
    }
    if user.picture.len() > beseda_core::limits::MAX_DATA_BYTES {
        return Err(Error::invalid("picture", "the picture is larger than 100 KB"));
    }
    Ok(())
}

impl RoutingService {
    /// The acting user, loaded; errors if the caller acts as nobody.
    pub(crate) async fn acting_user(&self, caller: &Caller) -> Result<User> {
        let user_id = caller.user()?;
        let user = self
            .store
            .get_user(&caller.application_id, user_id)
            .await?
            .ok_or_else(|| crate::not_found(ErrorCode::UserNotFound, "user", user_id))?;
        if user.blocked {
            return Err(Error::new(ErrorCode::UserBlocked, format!("user `{}` is blocked", user.name)));
        }
        Ok(user)
    }

    /// The acting user when there is one (privileged calls may have none).
    pub(crate) async fn optional_acting_user(&self, caller: &Caller) -> Result<Option<User>> {
        match caller.user_id {
            Some(_) => self.acting_user(caller).await.map(Some),
            None => Ok(None),
        }
    }

    /// CreateUser (СоздатьПользователя): privileged mode only.
    pub async fn create_user(&self, caller: &Caller, mut user: User) -> Result<User> {
        caller.require_privileged("CreateUser")?;
        user.id = beseda_core::model::new_id();
        user.created_at = now_micros();
        user.subscriber_administrator = false;
        check_properties(&user)?;
        match user.kind {
            UserKind::Regular => {}
            UserKind::Bot => {
                if user.infobase_user_id.is_some() {
                    return Err(Error::invalid(
                        "infobaseUserId",
                        "a bot's collaboration user must not be paired with an infobase user",
                    ));
                }
            }
            UserKind::Integration => {
                if user.external_system_type.trim().is_empty() {
                    return Err(Error::field_required("externalSystemType"));
                }
                if user.external_system_user_id.trim().is_empty() {
                    return Err(Error::field_required("externalSystemUserId"));
                }
            }
            UserKind::External => {
                if user.authentication_email.trim().is_empty() {
                    return Err(Error::field_required("authenticationEmail"));
                }
                user.authentication_email = rules::normalize_email(&user.authentication_email)
                    .map_err(|error| error.with_field("authenticationEmail"))?;
                if user.infobase_user_id.is_some() {
                    return Err(Error::invalid(
                        "infobaseUserId",
                        "an external user is not paired with an infobase user",
                    ));
                }
            }
            UserKind::Guest => {
                return Err(Error::new(
                    ErrorCode::UserKindRestricted,
                    "guest users are created only by following an invitation link",
                )
                .with_field("kind"));
            }
        }
        self.store.insert_user(&caller.application_id, &user).await?;
        Ok(user)
    }

    /// GetUser: guests cannot open user cards; external users see only the
    /// users they share a conversation with.
    pub async fn get_user(&self, caller: &Caller, user_id: &str) -> Result<User> {
        let acting = self.optional_acting_user(caller).await?;
        let user = self
            .store
            .get_user(&caller.application_id, user_id)
            .await?
            .ok_or_else(|| crate::not_found(ErrorCode::UserNotFound, "user", user_id))?;
        if let Some(acting) = &acting
            && acting.id != user.id
        {
            match acting.kind {
                UserKind::Guest => {
                    return Err(Error::new(ErrorCode::UserKindRestricted, "guest users cannot open user cards"));
                }
                UserKind::External
                    if !self.users_sharing_conversations(caller, &acting.id).await?.contains(&user.id) =>
                {
                    return Err(crate::not_found(ErrorCode::UserNotFound, "user", user_id));
                }
                _ => {}
            }
        }
        Ok(user)
    }

    /// Ids of the users who share at least one conversation with `user_id`.
    async fn users_sharing_conversations(&self, caller: &Caller, user_id: &str) -> Result<HashSet<String>> {
        let mut visible = HashSet::from([user_id.to_owned()]);
        let mut query = ConversationQuery {
            limit: MAX_PAGE_SIZE,
            accessible_to: Some(user_id.to_owned()),
            has_context: Some(false),
            ..Default::default()
        };
        loop {
            let page = self.store.list_conversations(&caller.application_id, &query).await?;
            for conversation in &page {
                visible.extend(conversation.member_ids.iter().cloned());
            }
            let Some(last) = page.last() else { break };
            if page.len() < MAX_PAGE_SIZE as usize {
                break;
            }
            query.start_date = Some(last.last_message_at.unwrap_or(last.created_at));
            query.after_id = Some(last.id.clone());
        }
        Ok(visible)
    }

    /// UpdateUser: `mask` names the fields to change (canonical JSON names).
    pub async fn update_user(&self, caller: &Caller, user_id: &str, mask: &[String], changes: User) -> Result<User> {
        if mask.is_empty() {
            return Err(Error::new(
                ErrorCode::FieldRequired,
                "`updateMask` must name the fields to change, e.g. [\"fullName\"]",
            )
            .with_field("updateMask"));
        }
        let mut user = self
            .store
            .get_user(&caller.application_id, user_id)
            .await?
            .ok_or_else(|| crate::not_found(ErrorCode::UserNotFound, "user", user_id))?;
        let was_blocked = user.blocked;
        if !caller.privileged {
            let acting = self.acting_user(caller).await?;
            if acting.id != user.id {
                return Err(Error::new(ErrorCode::PermissionDenied, "users may change only their own properties"));
            }
            let allowed =
                if acting.kind == UserKind::Guest { GUEST_SELF_EDITABLE_FIELDS } else { SELF_EDITABLE_FIELDS };
            if let Some(field) = mask.iter().find(|field| !allowed.contains(&field.as_str())) {
                return Err(Error::new(
                    ErrorCode::PrivilegedModeRequired,
                    format!("changing `{field}` needs privileged mode; users may change {}", allowed.join(", ")),
                )
                .with_field(field.clone()));
            }
        }
        for field in mask {
            match field.as_str() {
                "name" => user.name = changes.name.clone(),
                "fullName" => user.full_name = changes.full_name.clone(),
                "picture" => user.picture = changes.picture.clone(),
                "phone" => user.phone = changes.phone.clone(),
                "email" => user.email = changes.email.clone(),
                "matchingKey" => user.matching_key = changes.matching_key.clone(),
                "infobaseUserId" => {
                    if user.kind != UserKind::Regular && changes.infobase_user_id.is_some() {
                        return Err(Error::invalid(
                            "infobaseUserId",
                            "only regular users are paired with infobase users",
                        ));
                    }
                    user.infobase_user_id = changes.infobase_user_id.clone();
                }
                "blocked" => user.blocked = changes.blocked,
                other => {
                    return Err(Error::invalid(
                        "updateMask",
                        format!("`{other}` cannot be updated; updatable fields are {}", UPDATABLE_FIELDS.join(", ")),
                    ));
                }
            }
        }
        check_properties(&user)?;
        let newly_blocked = user.blocked && !was_blocked;
        self.store.update_user(&caller.application_id, &user).await?;
        if newly_blocked {
            // Blocked users cannot stay connected either.
            self.publish_user_event(
                &caller.application_id,
                &user.id,
                wire::user_event::Kind::Blocked(wire::UserBlocked {}),
            )
            .await;
        }
        Ok(user)
    }

    /// GetUsers (ПолучитьПользователей). Blocked users and guests are hidden
    /// from pickers unless asked for; guests may not list users; external
    /// users see only the users they share conversations with.
    pub async fn get_users(&self, caller: &Caller, mut query: UserQuery) -> Result<Vec<User>> {
        let acting = self.optional_acting_user(caller).await?;
        if let Some(acting) = &acting {
            match acting.kind {
                UserKind::Guest => {
                    return Err(Error::new(ErrorCode::UserKindRestricted, "guest users cannot list users"));
                }
                UserKind::External => {
                    let visible = self.users_sharing_conversations(caller, &acting.id).await?;
                    query.ids = if query.ids.is_empty() {
                        visible.into_iter().collect()
                    } else {
                        query.ids.into_iter().filter(|id| visible.contains(id)).collect()
                    };
                    if query.ids.is_empty() {
                        return Ok(Vec::new());
                    }
                }
                _ => {}
            }
        }
        if let Some(conversation_id) = &query.conversation_id {
            self.accessible_conversation(caller, conversation_id).await?;
        }
        // Guests are not offered as participants; filtering in the query keeps pages full.
        query.exclude_guests = !caller.privileged && query.kind != Some(UserKind::Guest);
        self.store.list_users(&caller.application_id, &query).await
    }
}
