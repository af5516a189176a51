//! Watch mode and do-not-disturb (§29.3.4). Changing them for another user
//! needs privileged mode.

use beseda_core::model::{Micros, now_micros};
use beseda_core::{Error, ErrorCode, Result};
use beseda_store::DoNotDisturbState;

use crate::conversations::ConversationSelector;
use crate::{Caller, RoutingService};

impl RoutingService {
    /// The user whose setting is read or changed: the acting user, or
    /// another one in privileged mode.
    async fn settings_owner(&self, caller: &Caller, user_id: Option<&str>) -> Result<String> {
        match user_id {
            Some(user_id) if caller.user_id.as_deref() != Some(user_id) => {
                caller.require_privileged("changing another user's notification settings")?;
                self.store
                    .get_user(&caller.application_id, user_id)
                    .await?
                    .map(|user| user.id)
                    .ok_or_else(|| crate::not_found(ErrorCode::UserNotFound, "user", user_id).with_field("userId"))
            }
            _ => Ok(self.acting_user(caller).await?.id),
        }
    }

    /// The default when nothing was set: non-context conversations notify,
    /// context conversations notify only of messages addressed to the user.
    pub async fn watch_mode(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
        user_id: Option<&str>,
    ) -> Result<bool> {
        let owner = self.settings_owner(caller, user_id).await?;
        let conversation = self.accessible_conversation_by(caller, selector).await?;
        let explicit = self.store.get_watch_mode(&caller.application_id, &conversation.id, &owner).await?;
        Ok(explicit.unwrap_or(conversation.context.is_none()))
    }

    pub async fn set_watch_mode(
        &self,
        caller: &Caller,
        selector: &ConversationSelector,
        user_id: Option<&str>,
        watch: bool,
    ) -> Result<bool> {
        let owner = self.settings_owner(caller, user_id).await?;
        let conversation = self.accessible_conversation_by(caller, selector).await?;
        self.store.set_watch_mode(&caller.application_id, &conversation.id, &owner, watch).await?;
        Ok(watch)
    }

    pub async fn set_do_not_disturb(
        &self,
        caller: &Caller,
        selector: Option<&ConversationSelector>,
        user_id: Option<&str>,
        until: Option<Micros>,
    ) -> Result<DoNotDisturbState> {
        let owner = self.settings_owner(caller, user_id).await?;
        let conversation_id = match selector {
            Some(selector) => Some(self.accessible_conversation_by(caller, selector).await?.id),
            None => None,
        };
        let until = until.filter(|until| *until > now_micros());
        self.store.set_do_not_disturb(&caller.application_id, &owner, conversation_id.as_deref(), until).await?;
        self.store.get_do_not_disturb(&caller.application_id, &owner, conversation_id.as_deref()).await
    }

    pub async fn do_not_disturb(
        &self,
        caller: &Caller,
        selector: Option<&ConversationSelector>,
        user_id: Option<&str>,
    ) -> Result<DoNotDisturbState> {
        let owner = self.settings_owner(caller, user_id).await?;
        let conversation_id = match selector {
            Some(selector) => Some(self.accessible_conversation_by(caller, selector).await?.id),
            None => None,
        };
        self.store.get_do_not_disturb(&caller.application_id, &owner, conversation_id.as_deref()).await
    }

    pub async fn unread_counts(&self, caller: &Caller) -> Result<Vec<(String, u32)>> {
        let acting = self.acting_user(caller).await?;
        self.store.unread_counts(&caller.application_id, &acting.id).await
    }
}

/// Whether a do-not-disturb state silences notifications now.
pub fn is_silenced(state: &DoNotDisturbState, now: Micros) -> bool {
    state.user_until.is_some_and(|until| until > now) || state.conversation_until.is_some_and(|until| until > now)
}

/// Rejects a do-not-disturb "until" that is not a time at all.
pub fn check_until(until: Option<Micros>) -> Result<()> {
    match until {
        Some(until) if until < 0 => Err(Error::invalid("until", "`until` must be after 1970")),
        _ => Ok(()),
    }
}
