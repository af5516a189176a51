//! `beseda.v1.Bots` and `beseda.v1.BotProcessing` over the service: read the
//! caller, validate, call the store, convert the answer.

use std::collections::BTreeMap;
use std::pin::Pin;

use beseda_core::bots::{Bot, ConsumerKind, EVENT_KINDS, EventSubscription, Integration};
use beseda_core::limits::{
    MAX_EVENT_SUBSCRIPTIONS, MAX_MEMBERS, MAX_NAME_CHARS, MAX_PARAMETER_VALUE_CHARS, MAX_PARAMETERS, MAX_REPLAY_EVENTS,
    MAX_URL_CHARS,
};
use beseda_core::model::{new_id, now_micros};
use beseda_core::{Error, ErrorCode, Result, rules};
use beseda_proto::v1 as wire;
use beseda_proto::v1::bot_processing_server::BotProcessing;
use beseda_proto::v1::bots_server::Bots;
use beseda_routing::convert::micros;
use beseda_routing::{Caller, status};
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::BotsService;
use crate::convert::{bot_to_wire, dead_letter_to_wire, integration_to_wire};
use crate::webhook;

type Reply<T> = std::result::Result<Response<T>, Status>;

fn answer<T>(result: Result<T>) -> Reply<T> {
    result.map(Response::new).map_err(status::to_status)
}

fn caller_of<T>(request: &Request<T>) -> std::result::Result<Caller, Status> {
    Caller::from_request(request).map_err(status::to_status)
}

fn secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

pub(crate) fn validate_bot_type(bot_type: &str, field: &str) -> Result<()> {
    if bot_type.trim().is_empty() {
        return Err(Error::field_required(field));
    }
    if rules::char_count(bot_type) > MAX_NAME_CHARS {
        return Err(Error::invalid(field, format!("at most {MAX_NAME_CHARS} characters")));
    }
    Ok(())
}

fn validate_parameters(parameters: &BTreeMap<String, String>, field: &str) -> Result<()> {
    if parameters.len() > MAX_PARAMETERS {
        return Err(Error::invalid(field, format!("at most {MAX_PARAMETERS} parameters")));
    }
    for (name, value) in parameters {
        if name.is_empty() || rules::char_count(name) > MAX_NAME_CHARS {
            return Err(Error::invalid(field, format!("parameter names have 1 to {MAX_NAME_CHARS} characters")));
        }
        if rules::char_count(value) > MAX_PARAMETER_VALUE_CHARS {
            return Err(Error::invalid(
                field,
                format!("parameter `{name}` is longer than {MAX_PARAMETER_VALUE_CHARS} characters"),
            ));
        }
    }
    Ok(())
}

fn masked(mask: &[String], field: &str) -> bool {
    mask.iter().any(|name| name == field)
}

fn check_mask(mask: &[String], allowed: &[&str]) -> Result<()> {
    if mask.is_empty() {
        return Err(Error::invalid(
            "updateMask",
            format!("name the fields to change, some of: {}", allowed.join(", ")),
        ));
    }
    for name in mask {
        if !allowed.contains(&name.as_str()) {
            return Err(Error::invalid(
                "updateMask",
                format!("`{name}` cannot be changed; changeable fields: {}", allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

impl BotsService {
    /// A bot's user: exists in the application and is not paired with an infobase user.
    async fn check_bot_user(&self, application_id: &str, user_id: &str) -> Result<()> {
        if user_id.is_empty() {
            return Err(Error::field_required("bot.userId"));
        }
        let user = self.store.get_user(application_id, user_id).await?.ok_or_else(|| {
            Error::new(ErrorCode::UserNotFound, format!("user `{user_id}` does not exist in this application"))
                .with_field("bot.userId")
        })?;
        if user.infobase_user_id.is_some() {
            return Err(Error::new(
                ErrorCode::BotUserPaired,
                format!("user `{user_id}` is paired with an infobase user and cannot be a bot's user"),
            )
            .with_field("bot.userId"));
        }
        Ok(())
    }

    async fn existing_bot(&self, application_id: &str, bot_id: &str) -> Result<Bot> {
        self.store.get_bot(application_id, bot_id).await?.ok_or_else(|| {
            Error::new(ErrorCode::BotNotFound, format!("bot `{bot_id}` does not exist in this application"))
                .with_field("botId")
        })
    }

    async fn check_members(&self, application_id: &str, member_ids: &[String]) -> Result<()> {
        if member_ids.len() > MAX_MEMBERS {
            return Err(Error::new(ErrorCode::TooManyMembers, format!("at most {MAX_MEMBERS} default members"))
                .with_field("integration.memberIds"));
        }
        let found = self.store.get_users(application_id, member_ids).await?;
        if let Some(missing) = member_ids.iter().find(|id| !found.iter().any(|user| &user.id == *id)) {
            return Err(Error::new(
                ErrorCode::UserNotFound,
                format!("user `{missing}` does not exist in this application"),
            )
            .with_field("integration.memberIds"));
        }
        Ok(())
    }

    async fn existing_integration(&self, application_id: &str, integration_id: &str) -> Result<Integration> {
        self.store.get_integration(application_id, integration_id).await?.ok_or_else(|| {
            Error::new(
                ErrorCode::IntegrationNotFound,
                format!("integration `{integration_id}` does not exist in this application"),
            )
            .with_field("integrationId")
        })
    }

    async fn existing_subscription(&self, application_id: &str, subscription_id: &str) -> Result<EventSubscription> {
        self.store.get_subscription(application_id, subscription_id).await?.ok_or_else(|| {
            Error::new(
                ErrorCode::SubscriptionNotFound,
                format!("event subscription `{subscription_id}` does not exist in this application"),
            )
            .with_field("subscriptionId")
        })
    }

    fn subscription_fields(subscription: &mut EventSubscription, source: &wire::EventSubscription, mask: &[String]) {
        let all = mask.is_empty();
        if all || masked(mask, "url") {
            subscription.url = source.url.trim().to_owned();
        }
        if all || masked(mask, "secret") {
            subscription.secret = if source.secret.is_empty() { secret() } else { source.secret.clone() };
        }
        if all || masked(mask, "eventKinds") {
            subscription.event_kinds = source.event_kinds.clone();
        }
        if all || masked(mask, "conversationIds") {
            subscription.conversation_ids = source.conversation_ids.clone();
        }
        if all || masked(mask, "enabled") {
            subscription.enabled = source.enabled.unwrap_or(true);
        }
    }

    fn validate_subscription(&self, subscription: &EventSubscription) -> Result<()> {
        if subscription.url.is_empty() {
            return Err(Error::field_required("subscription.url"));
        }
        if rules::char_count(&subscription.url) > MAX_URL_CHARS {
            return Err(Error::invalid("subscription.url", format!("at most {MAX_URL_CHARS} characters")));
        }
        let url = reqwest::Url::parse(&subscription.url)
            .map_err(|error| Error::invalid("subscription.url", format!("not a URL ({error})")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(Error::invalid("subscription.url", "an http:// or https:// URL with a host"));
        }
        if !self.config.allow_private_targets
            && let Some(reason) = crate::targets::refuse_host(&url)
        {
            return Err(Error::invalid(
                "subscription.url",
                format!(
                    "{reason}; this server POSTs events to public addresses only (its operator can allow private ones \
                     with bots.outbound_allow_private_addresses)"
                ),
            ));
        }
        if let Some(kind) = subscription.event_kinds.iter().find(|kind| !EVENT_KINDS.contains(&kind.as_str())) {
            return Err(Error::invalid(
                "subscription.eventKinds",
                format!("unknown event kind `{kind}`; known kinds: {}", EVENT_KINDS.join(", ")),
            ));
        }
        if subscription.conversation_ids.len() > MAX_MEMBERS {
            return Err(Error::invalid("subscription.conversationIds", format!("at most {MAX_MEMBERS} conversations")));
        }
        if subscription.secret.len() < 16 {
            return Err(Error::invalid("subscription.secret", "at least 16 characters (or leave it empty to get one)"));
        }
        Ok(())
    }
}

fn subscription_to_wire(subscription: &EventSubscription) -> wire::EventSubscription {
    wire::EventSubscription {
        id: subscription.id.clone(),
        url: subscription.url.clone(),
        secret: subscription.secret.clone(),
        event_kinds: subscription.event_kinds.clone(),
        conversation_ids: subscription.conversation_ids.clone(),
        enabled: Some(subscription.enabled),
        created_at: Some(beseda_routing::convert::timestamp(subscription.created_at)),
    }
}

fn consumer_kind(value: &str) -> Result<ConsumerKind> {
    if value.is_empty() {
        return Ok(ConsumerKind::Bot);
    }
    ConsumerKind::parse(value)
        .ok_or_else(|| Error::invalid("consumerKind", format!("`{value}` is neither \"bot\" nor \"subscription\"")))
}

#[tonic::async_trait]
impl Bots for BotsService {
    async fn create_bot(&self, request: Request<wire::CreateBotRequest>) -> Reply<wire::Bot> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("creating a bot")?;
            let source = request.get_ref().bot.as_ref().ok_or_else(|| Error::field_required("bot"))?;
            if source.predefined {
                return Err(Error::new(
                    ErrorCode::PredefinedBot,
                    "predefined bots are created by ExecuteBotProcessing, not by CreateBot",
                )
                .with_field("bot.predefined"));
            }
            validate_bot_type(&source.bot_type, "bot.botType")?;
            let additional_parameters: BTreeMap<String, String> =
                source.additional_parameters.clone().into_iter().collect();
            validate_parameters(&additional_parameters, "bot.additionalParameters")?;
            self.check_bot_user(&caller.application_id, &source.user_id).await?;
            let bot = Bot {
                id: new_id(),
                user_id: source.user_id.clone(),
                bot_type: source.bot_type.trim().to_owned(),
                additional_parameters,
                predefined: false,
                infobase_user_name: source.infobase_user_name.clone(),
                created_at: now_micros(),
            };
            self.store.insert_bot(&caller.application_id, &bot).await?;
            self.wake();
            Ok(bot_to_wire(&bot))
        };
        answer(result.await)
    }

    async fn get_bot(&self, request: Request<wire::GetBotRequest>) -> Reply<wire::Bot> {
        let caller = caller_of(&request)?;
        answer(self.existing_bot(&caller.application_id, &request.get_ref().bot_id).await.map(|bot| bot_to_wire(&bot)))
    }

    async fn update_bot(&self, request: Request<wire::UpdateBotRequest>) -> Reply<wire::Bot> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("changing a bot")?;
            let request = request.get_ref();
            let source = request.bot.as_ref().ok_or_else(|| Error::field_required("bot"))?;
            let mask = &request.update_mask;
            check_mask(mask, &["userId", "botType", "additionalParameters", "infobaseUserName"])?;
            let mut bot = self.existing_bot(&caller.application_id, &request.bot_id).await?;
            if masked(mask, "userId") && source.user_id != bot.user_id {
                self.check_bot_user(&caller.application_id, &source.user_id).await?;
                bot.user_id = source.user_id.clone();
            }
            if masked(mask, "botType") {
                if bot.predefined && source.bot_type.trim() != bot.bot_type {
                    return Err(Error::new(
                        ErrorCode::PredefinedBot,
                        "the type (Метаданные) of a predefined bot cannot change",
                    )
                    .with_field("bot.botType"));
                }
                validate_bot_type(&source.bot_type, "bot.botType")?;
                bot.bot_type = source.bot_type.trim().to_owned();
            }
            if masked(mask, "additionalParameters") {
                let parameters: BTreeMap<String, String> = source.additional_parameters.clone().into_iter().collect();
                validate_parameters(&parameters, "bot.additionalParameters")?;
                bot.additional_parameters = parameters;
            }
            if masked(mask, "infobaseUserName") {
                bot.infobase_user_name = source.infobase_user_name.clone();
            }
            self.store.update_bot(&caller.application_id, &bot).await?;
            self.wake();
            Ok(bot_to_wire(&bot))
        };
        answer(result.await)
    }

    async fn delete_bot(&self, request: Request<wire::DeleteBotRequest>) -> Reply<wire::Empty> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("deleting a bot")?;
            let bot = self.existing_bot(&caller.application_id, &request.get_ref().bot_id).await?;
            if bot.predefined {
                return Err(Error::new(
                    ErrorCode::PredefinedBot,
                    "a predefined bot cannot be deleted; remove it from the application's metadata instead",
                )
                .with_field("botId"));
            }
            self.store.delete_bot(&caller.application_id, &bot.id).await?;
            self.wake();
            Ok(wire::Empty {})
        };
        answer(result.await)
    }

    async fn get_bots(&self, request: Request<wire::Empty>) -> Reply<wire::BotList> {
        let caller = caller_of(&request)?;
        let result = self.store.list_bots(&caller.application_id).await;
        answer(result.map(|bots| wire::BotList { bots: bots.iter().map(bot_to_wire).collect() }))
    }

    async fn create_integration(&self, request: Request<wire::CreateIntegrationRequest>) -> Reply<wire::Integration> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("creating an integration")?;
            let source = request.get_ref().integration.as_ref().ok_or_else(|| Error::field_required("integration"))?;
            webhook::describe(&source.external_system_type)?;
            if source.key.trim().is_empty() {
                return Err(Error::field_required("integration.key"));
            }
            rules::bounded_text("integration.key", &source.key, beseda_core::limits::MAX_KEY_CHARS)?;
            rules::bounded_text("integration.presentation", &source.presentation, MAX_NAME_CHARS)?;
            let parameters: BTreeMap<String, String> = source.external_system_parameters.clone().into_iter().collect();
            validate_parameters(&parameters, "integration.externalSystemParameters")?;
            self.check_members(&caller.application_id, &source.member_ids).await?;
            let integration = Integration {
                id: new_id(),
                system_type: source.external_system_type.clone(),
                key: source.key.trim().to_owned(),
                enabled: source.r#use,
                parameters,
                presentation: source.presentation.clone(),
                default_member_ids: source.member_ids.clone(),
                connection_token: secret(),
                signing_secret: Some(source.signing_secret.clone()).filter(|secret| !secret.is_empty()),
                own_user_id: None,
                created_at: now_micros(),
                strict_status_codes: source.strict_status_codes,
            };
            self.store.insert_integration(&caller.application_id, &integration).await?;
            Ok(integration_to_wire(&integration, &self.config.public_url))
        };
        answer(result.await)
    }

    async fn get_integration(&self, request: Request<wire::GetIntegrationRequest>) -> Reply<wire::Integration> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("reading an integration (its connection point URL is a secret)")?;
            let integration =
                self.existing_integration(&caller.application_id, &request.get_ref().integration_id).await?;
            Ok(integration_to_wire(&integration, &self.config.public_url))
        };
        answer(result.await)
    }

    async fn update_integration(&self, request: Request<wire::UpdateIntegrationRequest>) -> Reply<wire::Integration> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("changing an integration")?;
            let request = request.get_ref();
            let source = request.integration.as_ref().ok_or_else(|| Error::field_required("integration"))?;
            let mask = &request.update_mask;
            check_mask(
                mask,
                &[
                    "key",
                    "use",
                    "externalSystemParameters",
                    "presentation",
                    "memberIds",
                    "signingSecret",
                    "strictStatusCodes",
                ],
            )?;
            let mut integration = self.existing_integration(&caller.application_id, &request.integration_id).await?;
            if masked(mask, "key") {
                if source.key.trim().is_empty() {
                    return Err(Error::field_required("integration.key"));
                }
                rules::bounded_text("integration.key", &source.key, beseda_core::limits::MAX_KEY_CHARS)?;
                integration.key = source.key.trim().to_owned();
            }
            if masked(mask, "use") {
                integration.enabled = source.r#use;
            }
            if masked(mask, "externalSystemParameters") {
                let parameters: BTreeMap<String, String> =
                    source.external_system_parameters.clone().into_iter().collect();
                validate_parameters(&parameters, "integration.externalSystemParameters")?;
                integration.parameters = parameters;
            }
            if masked(mask, "presentation") {
                rules::bounded_text("integration.presentation", &source.presentation, MAX_NAME_CHARS)?;
                integration.presentation = source.presentation.clone();
            }
            if masked(mask, "memberIds") {
                self.check_members(&caller.application_id, &source.member_ids).await?;
                integration.default_member_ids = source.member_ids.clone();
            }
            if masked(mask, "signingSecret") {
                integration.signing_secret = Some(source.signing_secret.clone()).filter(|secret| !secret.is_empty());
            }
            if masked(mask, "strictStatusCodes") {
                integration.strict_status_codes = source.strict_status_codes;
            }
            self.store.update_integration(&caller.application_id, &integration).await?;
            Ok(integration_to_wire(&integration, &self.config.public_url))
        };
        answer(result.await)
    }

    async fn delete_integration(&self, request: Request<wire::DeleteIntegrationRequest>) -> Reply<wire::Empty> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("deleting an integration")?;
            let integration =
                self.existing_integration(&caller.application_id, &request.get_ref().integration_id).await?;
            self.store.delete_integration(&caller.application_id, &integration.id).await?;
            Ok(wire::Empty {})
        };
        answer(result.await)
    }

    async fn get_integrations(&self, request: Request<wire::Empty>) -> Reply<wire::IntegrationList> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("listing integrations (their connection point URLs are secrets)")?;
            let integrations = self.store.list_integrations(&caller.application_id).await?;
            Ok(wire::IntegrationList {
                integrations: integrations
                    .iter()
                    .map(|integration| integration_to_wire(integration, &self.config.public_url))
                    .collect(),
            })
        };
        answer(result.await)
    }

    async fn get_external_system_types(&self, request: Request<wire::Empty>) -> Reply<wire::ExternalSystemTypes> {
        caller_of(&request)?;
        Ok(Response::new(webhook::external_system_types()))
    }

    async fn get_external_system_description(
        &self,
        request: Request<wire::GetExternalSystemDescriptionRequest>,
    ) -> Reply<wire::ExternalSystemDescription> {
        caller_of(&request)?;
        answer(webhook::describe(&request.get_ref().external_system_type))
    }

    async fn receive_webhook(&self, request: Request<wire::WebhookRequest>) -> Reply<wire::WebhookResponse> {
        Ok(Response::new(webhook::receive(self, request.into_inner()).await))
    }

    async fn create_event_subscription(
        &self,
        request: Request<wire::CreateEventSubscriptionRequest>,
    ) -> Reply<wire::EventSubscription> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("subscribing to events")?;
            let source =
                request.get_ref().subscription.as_ref().ok_or_else(|| Error::field_required("subscription"))?;
            if self.store.list_subscriptions(&caller.application_id).await?.len() >= MAX_EVENT_SUBSCRIPTIONS {
                return Err(Error::new(
                    ErrorCode::InvalidValue,
                    format!(
                        "an application has at most {MAX_EVENT_SUBSCRIPTIONS} event subscriptions; delete one first"
                    ),
                ));
            }
            let mut subscription = EventSubscription {
                id: new_id(),
                url: String::new(),
                secret: String::new(),
                event_kinds: Vec::new(),
                conversation_ids: Vec::new(),
                enabled: true,
                created_at: now_micros(),
            };
            Self::subscription_fields(&mut subscription, source, &[]);
            self.validate_subscription(&subscription)?;
            self.store.insert_subscription(&caller.application_id, &subscription).await?;
            Ok(subscription_to_wire(&subscription))
        };
        answer(result.await)
    }

    async fn get_event_subscription(
        &self,
        request: Request<wire::GetEventSubscriptionRequest>,
    ) -> Reply<wire::EventSubscription> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("reading an event subscription")?;
            let subscription =
                self.existing_subscription(&caller.application_id, &request.get_ref().subscription_id).await?;
            Ok(subscription_to_wire(&subscription))
        };
        answer(result.await)
    }

    async fn update_event_subscription(
        &self,
        request: Request<wire::UpdateEventSubscriptionRequest>,
    ) -> Reply<wire::EventSubscription> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("changing an event subscription")?;
            let request = request.get_ref();
            let source = request.subscription.as_ref().ok_or_else(|| Error::field_required("subscription"))?;
            check_mask(&request.update_mask, &["url", "secret", "eventKinds", "conversationIds", "enabled"])?;
            let mut subscription = self.existing_subscription(&caller.application_id, &request.subscription_id).await?;
            Self::subscription_fields(&mut subscription, source, &request.update_mask);
            self.validate_subscription(&subscription)?;
            self.store.update_subscription(&caller.application_id, &subscription).await?;
            self.outbound_wakeup.notify_one();
            Ok(subscription_to_wire(&subscription))
        };
        answer(result.await)
    }

    async fn delete_event_subscription(
        &self,
        request: Request<wire::DeleteEventSubscriptionRequest>,
    ) -> Reply<wire::Empty> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("deleting an event subscription")?;
            let subscription =
                self.existing_subscription(&caller.application_id, &request.get_ref().subscription_id).await?;
            self.store.delete_subscription(&caller.application_id, &subscription.id).await?;
            Ok(wire::Empty {})
        };
        answer(result.await)
    }

    async fn get_event_subscriptions(&self, request: Request<wire::Empty>) -> Reply<wire::EventSubscriptionList> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("listing event subscriptions")?;
            let subscriptions = self.store.list_subscriptions(&caller.application_id).await?;
            Ok(wire::EventSubscriptionList { subscriptions: subscriptions.iter().map(subscription_to_wire).collect() })
        };
        answer(result.await)
    }

    async fn replay_events(&self, request: Request<wire::ReplayEventsRequest>) -> Reply<wire::ReplayEventsResponse> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("replaying events")?;
            let request = request.get_ref();
            let subscription = self.existing_subscription(&caller.application_id, &request.subscription_id).await?;
            let conversation_id = Some(request.conversation_id.as_str()).filter(|id| !id.is_empty());
            let since = request.since.as_ref().map(micros).unwrap_or(0);
            if conversation_id.is_none() && request.since.is_none() {
                return Err(Error::invalid(
                    "conversationId",
                    "name a conversation (with afterSeq) or set `since` to replay every conversation from a time",
                ));
            }
            let (mut after_seq, mut since) = (request.after_seq, since);
            let mut enqueued = 0usize;
            // Across conversations a page ends at a time, and the next page
            // starts at that same time (events can share a microsecond):
            // the ones of the boundary already taken are skipped.
            let mut taken_at_boundary: std::collections::HashSet<(String, u64)> = std::collections::HashSet::new();
            const PAGE: u32 = 1000;
            loop {
                let events = self
                    .store
                    .events_for_replay(&caller.application_id, conversation_id, after_seq, since, PAGE)
                    .await?;
                let page_full = events.len() == PAGE as usize;
                let fresh: Vec<_> = events
                    .into_iter()
                    .filter(|event| !taken_at_boundary.contains(&(event.conversation_id.clone(), event.seq)))
                    .collect();
                let Some(last) = fresh.last() else { break };
                if last.at != since {
                    taken_at_boundary.clear();
                }
                (after_seq, since) = (last.seq, last.at);
                taken_at_boundary.extend(
                    fresh
                        .iter()
                        .filter(|event| event.at == since)
                        .map(|event| (event.conversation_id.clone(), event.seq)),
                );
                let deliveries: Vec<_> = fresh
                    .iter()
                    .filter(|event| subscription.wants(event))
                    .map(|event| beseda_core::bots::NewDelivery {
                        consumer_kind: ConsumerKind::Subscription,
                        consumer_id: subscription.id.clone(),
                        kind: event.kind.name().to_owned(),
                        event: event.clone(),
                    })
                    .collect();
                self.store.enqueue(&caller.application_id, &deliveries).await?;
                enqueued += deliveries.len();
                if !page_full || enqueued >= MAX_REPLAY_EVENTS {
                    break;
                }
            }
            self.outbound_wakeup.notify_one();
            Ok(wire::ReplayEventsResponse { enqueued: enqueued as u64 })
        };
        answer(result.await)
    }

    async fn list_dead_letters(&self, request: Request<wire::ListDeadLettersRequest>) -> Reply<wire::DeadLetterList> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("reading dead letters")?;
            let request = request.get_ref();
            let kind = consumer_kind(&request.consumer_kind)?;
            let limit = rules::page_size(request.count)?;
            let consumer_id = Some(request.consumer_id.as_str()).filter(|id| !id.is_empty());
            let dead = self.store.list_dead(&caller.application_id, kind, consumer_id, request.after, limit).await?;
            Ok(wire::DeadLetterList { dead_letters: dead.iter().map(dead_letter_to_wire).collect::<Result<_>>()? })
        };
        answer(result.await)
    }

    async fn retry_dead_letters(&self, request: Request<wire::DeadLetterIds>) -> Reply<wire::DeadLetterActionResult> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("retrying dead letters")?;
            let ids = &request.get_ref().delivery_ids;
            if ids.is_empty() {
                return Err(Error::field_required("deliveryIds"));
            }
            let affected = self.store.retry_dead(&caller.application_id, ids, now_micros()).await?;
            self.processing.wake(&caller.application_id);
            self.outbound_wakeup.notify_one();
            Ok(wire::DeadLetterActionResult { affected })
        };
        answer(result.await)
    }

    async fn discard_dead_letters(&self, request: Request<wire::DeadLetterIds>) -> Reply<wire::DeadLetterActionResult> {
        let caller = caller_of(&request)?;
        let result = async {
            caller.require_privileged("discarding dead letters")?;
            let ids = &request.get_ref().delivery_ids;
            if ids.is_empty() {
                return Err(Error::field_required("deliveryIds"));
            }
            let affected = self.store.discard_dead(&caller.application_id, ids).await?;
            Ok(wire::DeadLetterActionResult { affected })
        };
        answer(result.await)
    }
}

/// `beseda.v1.BotProcessing` for gRPC clients; the WebSocket endpoint of the
/// gateway calls [`BotsService::open_processing`] directly.
#[derive(Clone)]
pub struct ProcessingGrpc(pub BotsService);

#[tonic::async_trait]
impl BotProcessing for ProcessingGrpc {
    type ProcessStream = Pin<Box<dyn Stream<Item = std::result::Result<wire::ProcessingServerFrame, Status>> + Send>>;

    async fn process(&self, request: Request<Streaming<wire::ProcessingClientFrame>>) -> Reply<Self::ProcessStream> {
        let caller = caller_of(&request)?;
        let inbound = request.into_inner().map(|frame| frame.map_err(|status| status::from_status(&status))).boxed();
        let outbound = self.0.open_processing(caller, inbound).map(Ok).boxed();
        Ok(Response::new(outbound))
    }
}
