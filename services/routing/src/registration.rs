//! Subscribers and applications (§29.4.2): two-step registration with an
//! e-mailed activation code, re-registration that restores history,
//! unregistering, irrevocable disconnect, and the subscriber's
//! administration key, temporary codes and administrators.

use beseda_core::limits::TEMPORARY_CODE_TTL_MICROS;
use beseda_core::model::{Application, ApplicationState, PendingActivation, Subscriber, new_id, now_micros};
use beseda_core::{Error, ErrorCode, Result, rules};

use crate::{Caller, RoutingService, hash_secret, new_code, new_secret};

/// What the application sends at both registration steps.
#[derive(Clone, Debug)]
pub struct RegistrationRequest {
    pub email: Option<String>,
    pub application_name: String,
    pub application_user_count: u32,
    /// Set when re-registering.
    pub application_id: Option<String>,
}

/// Credentials returned at registration (ДанныеРегистрации).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationData {
    pub application_id: String,
    pub application_key: String,
    pub subscriber_email: String,
    pub application_name: String,
}

/// How a subscriber operation proves the right to administer.
#[derive(Clone, Debug)]
pub enum SubscriberProof {
    AdministrationKey(String),
    TemporaryCode(String),
    /// The caller is a subscriber administrator of one of the subscriber's applications.
    Caller,
}

pub struct ApplicationInfo {
    pub application: Application,
    pub subscriber_email: String,
    pub usage_available: bool,
    pub current_user_is_subscriber_administrator: bool,
}

impl RoutingService {
    /// The subscriber that owns an application; every application has one.
    async fn subscriber_of(&self, application: &Application) -> Result<Subscriber> {
        self.store
            .get_subscriber(&application.subscriber_id)
            .await?
            .ok_or_else(|| Error::internal("application without subscriber"))
    }

    /// Resolves which e-mail and which application a registration is about.
    /// Re-registering without an e-mail uses the original one; another
    /// e-mail than the original means a new application (§29.4.2).
    async fn resolve_registration(&self, request: &RegistrationRequest) -> Result<(String, Option<String>)> {
        if request.application_user_count == 0 {
            return Err(Error::new(
                ErrorCode::ApplicationHasNoUsers,
                "the application reports no users; create at least one infobase user first",
            )
            .with_field("applicationUserCount"));
        }
        rules::bounded_text("applicationName", &request.application_name, beseda_core::limits::MAX_NAME_CHARS)?;
        if request.application_name.trim().is_empty() {
            return Err(Error::field_required("applicationName"));
        }
        let existing = match &request.application_id {
            Some(application_id) => {
                let application = self.store.get_application(application_id).await?.ok_or_else(|| {
                    crate::not_found(ErrorCode::ApplicationNotFound, "application", application_id)
                        .with_field("applicationId")
                })?;
                if application.state == ApplicationState::Disconnected {
                    return Err(Error::new(
                        ErrorCode::ApplicationDisconnected,
                        format!(
                            "application `{application_id}` was disconnected irrevocably; register without applicationId to create a new one"
                        ),
                    ));
                }
                let subscriber = self.subscriber_of(&application).await?;
                Some((application, subscriber))
            }
            None => None,
        };
        match (&request.email, existing) {
            (Some(email), Some((application, subscriber))) => {
                let email = rules::normalize_email(email)?;
                if email == subscriber.email {
                    Ok((email, Some(application.id)))
                } else {
                    Ok((email, None))
                }
            }
            (Some(email), None) => Ok((rules::normalize_email(email)?, None)),
            (None, Some((application, subscriber))) => Ok((subscriber.email, Some(application.id))),
            (None, None) => Err(Error::new(
                ErrorCode::FieldRequired,
                "`email` is required for a new application (it may be omitted only when re-registering with applicationId)",
            )
            .with_field("email")),
        }
    }

    /// Step 1: e-mail an activation code. Returns the address it went to.
    pub async fn request_registration(&self, request: &RegistrationRequest) -> Result<String> {
        let (email, application_id) = self.resolve_registration(request).await?;
        self.code_mails.check(&email)?;
        let code = new_code();
        let activation = PendingActivation {
            email: email.clone(),
            application_name: request.application_name.trim().to_owned(),
            application_id,
            code_hash: hash_secret(&code),
            expires_at: now_micros() + TEMPORARY_CODE_TTL_MICROS,
        };
        self.store.put_pending_activation(&activation).await?;
        let body = format!(
            "Your activation code for registering \"{}\" on the Beseda server {} is:\n\n    {code}\n\nIt is valid for 24 hours. If you did not ask for it, ignore this e-mail.\n",
            activation.application_name, self.config.public_url
        );
        self.mailer.send(&email, "Beseda: application activation code", &body).await?;
        self.code_mails.record(&email);
        tracing::info!(email = %email, "activation code sent");
        Ok(email)
    }

    /// Step 2: check the code, then register (or re-register) and issue keys.
    pub async fn complete_registration(
        &self,
        request: &RegistrationRequest,
        activation_code: &str,
    ) -> Result<RegistrationData> {
        if activation_code.trim().is_empty() {
            return Err(Error::field_required("activationCode"));
        }
        let (email, _) = self.resolve_registration(request).await?;
        // Activation codes are guarded against guessing like temporary codes (docs/auth.md).
        self.code_attempts.check(&email)?;
        let activation =
            match self.store.take_pending_activation(&email, &hash_secret(activation_code), now_micros()).await? {
                Some(activation) => {
                    self.code_attempts.clear(&email);
                    activation
                }
                None => {
                    self.code_attempts.record(&email);
                    return Err(Error::new(
                        ErrorCode::ActivationCodeInvalid,
                        "the activation code is wrong, used or expired; request a new one",
                    )
                    .with_field("activationCode"));
                }
            };
        let subscriber = self.store.upsert_subscriber(&email).await?;
        let application_key = new_secret();
        let application = match &activation.application_id {
            Some(application_id) => {
                let mut application =
                    self.store.get_application(application_id).await?.ok_or_else(|| {
                        crate::not_found(ErrorCode::ApplicationNotFound, "application", application_id)
                    })?;
                if application.state == ApplicationState::Disconnected {
                    return Err(Error::new(
                        ErrorCode::ApplicationDisconnected,
                        "the application was disconnected irrevocably",
                    ));
                }
                application.key = Some(application_key.clone());
                application.state = ApplicationState::Registered;
                application.name = activation.application_name.clone();
                self.store.update_application(&application).await?;
                self.publish_credentials_changed(&application.id, "the application was registered again with new keys")
                    .await;
                application
            }
            None => {
                let application = Application {
                    id: new_id(),
                    subscriber_id: subscriber.id.clone(),
                    name: activation.application_name.clone(),
                    key: Some(application_key.clone()),
                    state: ApplicationState::Registered,
                    created_at: now_micros(),
                };
                self.store.insert_application(&application).await?;
                application
            }
        };
        if subscriber.administration_key_hash.is_none() {
            self.issue_administration_key(&subscriber).await?;
        }
        tracing::info!(application_id = %application.id, email = %email, "application registered");
        Ok(RegistrationData {
            application_id: application.id,
            application_key,
            subscriber_email: email,
            application_name: application.name,
        })
    }

    async fn issue_administration_key(&self, subscriber: &Subscriber) -> Result<()> {
        let key = new_secret();
        self.store.set_administration_key_hash(&subscriber.id, &hash_secret(&key)).await?;
        let body = format!(
            "The administration key of your Beseda subscription {} is:\n\n    {key}\n\nKeep it secret: it administers every application of this subscription. Issuing a new key invalidates this one.\n",
            subscriber.email
        );
        self.mailer.send(&subscriber.email, "Beseda: subscriber administration key", &body).await
    }

    /// Deletes the application's keys: messaging stops until it registers again.
    pub async fn unregister(&self, caller: &Caller) -> Result<()> {
        caller.require_privileged("Unregister")?;
        let mut application = self.registered_application(&caller.application_id).await?;
        application.key = None;
        application.state = ApplicationState::Unregistered;
        self.store.update_application(&application).await?;
        self.publish_credentials_changed(&application.id, "the application was unregistered").await;
        tracing::info!(application_id = %application.id, "application unregistered");
        Ok(())
    }

    pub async fn registration_data(&self, caller: &Caller) -> Result<RegistrationData> {
        caller.require_privileged("GetRegistrationData")?;
        let application = self.registered_application(&caller.application_id).await?;
        let subscriber = self.subscriber_of(&application).await?;
        Ok(RegistrationData {
            application_id: application.id,
            application_key: application.key.unwrap_or_default(),
            subscriber_email: subscriber.email,
            application_name: application.name,
        })
    }

    /// SetRegistrationData: with data, checks that it is a valid registration
    /// (a data area moved to another database); without data, disconnects the
    /// calling application irrevocably.
    pub async fn set_registration_data(
        &self,
        caller: Option<&Caller>,
        data: Option<&RegistrationData>,
    ) -> Result<bool> {
        match data {
            Some(data) => {
                let verified = self.authenticate_application(&data.application_id, &data.application_key, None).await;
                Ok(verified.is_ok())
            }
            None => {
                let caller = caller.ok_or_else(|| {
                    Error::new(ErrorCode::Unauthenticated, "disconnecting needs the application's credentials")
                })?;
                caller.require_privileged("disconnecting the application")?;
                let mut application = self.store.get_application(&caller.application_id).await?.ok_or_else(|| {
                    crate::not_found(ErrorCode::ApplicationNotFound, "application", &caller.application_id)
                })?;
                application.key = None;
                application.state = ApplicationState::Disconnected;
                self.store.update_application(&application).await?;
                self.publish_credentials_changed(&application.id, "the application was disconnected").await;
                tracing::warn!(application_id = %application.id, "application disconnected irrevocably");
                Ok(false)
            }
        }
    }

    pub async fn application_info(&self, caller: &Caller) -> Result<ApplicationInfo> {
        let application = self.registered_application(&caller.application_id).await?;
        let subscriber = self.subscriber_of(&application).await?;
        let user_count = self.store.count_users(&application.id).await?;
        let current_user_is_subscriber_administrator = match &caller.user_id {
            Some(user_id) => {
                self.store.get_user(&application.id, user_id).await?.is_some_and(|user| user.subscriber_administrator)
            }
            None => false,
        };
        Ok(ApplicationInfo {
            application,
            subscriber_email: subscriber.email,
            usage_available: user_count > 0,
            current_user_is_subscriber_administrator,
        })
    }

    /// E-mails a temporary administration code (24 h or first use). Answers
    /// the same whether or not the subscriber exists, so the call cannot be
    /// used to find out which addresses are subscribers: the e-mail limit is
    /// checked and counted for the address before looking it up (and apart
    /// from registration mails), so the sixth call within the hour is
    /// refused for every address alike.
    pub async fn request_temporary_code(&self, subscriber_email: &str) -> Result<()> {
        let email = rules::normalize_email(subscriber_email)?;
        self.temporary_code_mails.check(&email)?;
        self.temporary_code_mails.record(&email);
        let Some(subscriber) = self.store.get_subscriber_by_email(&email).await? else {
            tracing::info!(email = %email, "temporary code requested for an unknown subscriber");
            return Ok(());
        };
        let code = new_code();
        self.store
            .put_temporary_code(&subscriber.id, &hash_secret(&code), now_micros() + TEMPORARY_CODE_TTL_MICROS)
            .await?;
        let body = format!(
            "Your temporary Beseda administration code is:\n\n    {code}\n\nIt is valid for 24 hours or until first use. The administration key stays unchanged.\n"
        );
        self.mailer.send(&subscriber.email, "Beseda: temporary administration code", &body).await?;
        Ok(())
    }

    /// Checks a proof of subscriber administration rights.
    pub async fn verify_subscriber(
        &self,
        caller: Option<&Caller>,
        email: &str,
        proof: &SubscriberProof,
    ) -> Result<Subscriber> {
        let denied = || {
            Error::new(
                ErrorCode::SubscriberCredentialInvalid,
                "the administration key or temporary code is wrong, used or expired for this subscriber",
            )
        };
        let subscriber = match proof {
            SubscriberProof::Caller => {
                let caller = caller.ok_or_else(denied)?;
                let application = self.registered_application(&caller.application_id).await?;
                let is_administrator = match &caller.user_id {
                    Some(user_id) => self
                        .store
                        .get_user(&application.id, user_id)
                        .await?
                        .is_some_and(|user| user.subscriber_administrator),
                    None => false,
                };
                if !is_administrator {
                    return Err(denied());
                }
                return self.store.get_subscriber(&application.subscriber_id).await?.ok_or_else(denied);
            }
            _ => self.store.get_subscriber_by_email(&rules::normalize_email(email)?).await?.ok_or_else(denied)?,
        };
        let accepted = match proof {
            SubscriberProof::AdministrationKey(key) => {
                subscriber.administration_key_hash.as_deref().is_some_and(|expected| expected == hash_secret(key))
            }
            SubscriberProof::TemporaryCode(code) => {
                self.code_attempts.check(&subscriber.email)?;
                let accepted =
                    self.store.consume_temporary_code(&subscriber.id, &hash_secret(code), now_micros()).await?;
                if accepted {
                    self.code_attempts.clear(&subscriber.email);
                } else {
                    self.code_attempts.record(&subscriber.email);
                }
                accepted
            }
            SubscriberProof::Caller => true,
        };
        if accepted { Ok(subscriber) } else { Err(denied()) }
    }

    pub async fn reissue_administration_key(
        &self,
        caller: Option<&Caller>,
        email: &str,
        proof: &SubscriberProof,
    ) -> Result<()> {
        let subscriber = self.verify_subscriber(caller, email, proof).await?;
        self.issue_administration_key(&subscriber).await
    }

    pub async fn change_subscriber_email(
        &self,
        caller: Option<&Caller>,
        email: &str,
        proof: &SubscriberProof,
        new_email: &str,
    ) -> Result<()> {
        let subscriber = self.verify_subscriber(caller, email, proof).await?;
        let new_email = rules::normalize_email(new_email).map_err(|error| error.with_field("newEmail"))?;
        self.store.change_subscriber_email(&subscriber.id, &new_email).await
    }

    /// The subscriber administrators among the calling application's users.
    /// Editing needs an administrator or the subscriber's key or code.
    pub async fn set_subscriber_administrators(
        &self,
        caller: &Caller,
        email: &str,
        proof: &SubscriberProof,
        user_ids: &[String],
    ) -> Result<Vec<String>> {
        let application = self.administered_application(caller, email, proof).await?;
        let users = self.store.get_users(&application.id, user_ids).await?;
        if let Some(missing) = user_ids.iter().find(|id| !users.iter().any(|user| &user.id == *id)) {
            return Err(crate::not_found(ErrorCode::UserNotFound, "user", missing).with_field("userIds"));
        }
        self.store.set_subscriber_administrators(&application.id, user_ids).await?;
        self.subscriber_administrators(caller).await
    }

    /// Adds one user to the subscriber administrators (`administrator` true)
    /// or removes them, with the same rights as
    /// [`Self::set_subscriber_administrators`]; the others stay as they are.
    pub async fn set_subscriber_administrator(
        &self,
        caller: &Caller,
        email: &str,
        proof: &SubscriberProof,
        user_id: &str,
        administrator: bool,
    ) -> Result<Vec<String>> {
        if user_id.is_empty() {
            return Err(Error::invalid("userId", "`userId` is required: the user to add or remove"));
        }
        let application = self.administered_application(caller, email, proof).await?;
        self.store.set_subscriber_administrator(&application.id, user_id, administrator).await.map_err(|error| {
            match error.code {
                ErrorCode::UserNotFound => {
                    crate::not_found(ErrorCode::UserNotFound, "user", user_id).with_field("userId")
                }
                _ => error,
            }
        })?;
        self.subscriber_administrators(caller).await
    }

    /// The calling application, once the caller has proved the right to
    /// administer its subscriber.
    async fn administered_application(
        &self,
        caller: &Caller,
        email: &str,
        proof: &SubscriberProof,
    ) -> Result<Application> {
        let subscriber = self.verify_subscriber(Some(caller), email, proof).await?;
        let application = self.registered_application(&caller.application_id).await?;
        if application.subscriber_id != subscriber.id {
            return Err(Error::new(
                ErrorCode::SubscriberCredentialInvalid,
                "the application belongs to another subscriber",
            ));
        }
        Ok(application)
    }

    pub async fn subscriber_administrators(&self, caller: &Caller) -> Result<Vec<String>> {
        let mut administrators = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_users(
                    &caller.application_id,
                    &beseda_store::UserQuery {
                        limit: beseda_core::limits::MAX_PAGE_SIZE,
                        after: after.clone(),
                        include_blocked: true,
                        ..Default::default()
                    },
                )
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            let full_page = page.len() == beseda_core::limits::MAX_PAGE_SIZE as usize;
            administrators.extend(page.into_iter().filter(|user| user.subscriber_administrator).map(|user| user.id));
            if !full_page {
                break;
            }
        }
        Ok(administrators)
    }
}
