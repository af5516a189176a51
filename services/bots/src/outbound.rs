//! The outbound event stream: POSTs every delivery in a subscription's queue
//! to the subscription's URL, signed with its secret, and removes it from
//! the queue only when the receiver answered 2xx (see docs/events.md).
//!
//! The queue itself gives the guarantees: a claim hands out at most one
//! delivery per (subscription, conversation) at a time and never one while
//! an earlier live delivery of that conversation is pending, so the
//! receiver sees each conversation in order while different conversations
//! (and subscriptions, and applications) are POSTed in parallel. A claimed
//! delivery is hidden for the POST timeout plus a margin; if this process
//! dies meanwhile it is handed out again (at-least-once). A failed POST is
//! retried with exponential backoff and becomes a dead letter after
//! `max_attempts`; the delivery state lives in the store, so it survives
//! restarts and is shared by every node running a dispatcher.
//!
//! The dispatcher does not wait for a whole batch before claiming more:
//! each finished POST makes its application claim again at once (the next
//! event of that conversation is due now), and a round over every
//! application runs when the relay queued something, when a retry or the
//! store's next due delivery comes due, and at least every `poll_interval`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::signature::{SIGNATURE_HEADER, sign};
use beseda_core::bots::{ConsumerKind, Delivery, EventSubscription};
use beseda_core::model::{Micros, now_micros};
use beseda_store::Store;
use beseda_store::bots::Claim;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::{BotsConfig, BotsService, backoff, convert};

/// `X-Beseda-Event`: the event kind, e.g. `message.created`.
pub const EVENT_HEADER: &str = "x-beseda-event";
/// `X-Beseda-Delivery`: the delivery id (also `deliveryId` in the body).
pub const DELIVERY_HEADER: &str = "x-beseda-delivery";
/// `X-Beseda-Signature`: `sha256=<lowercase hex HMAC-SHA256(secret, body)>`.
/// `X-Beseda-Timestamp`: when the request was sent, in Unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-beseda-timestamp";

/// A claimed delivery stays hidden this long after the POST timeout, so
/// that acknowledging or failing it has time to reach the store before it
/// is handed out again.
const VISIBILITY_MARGIN: Duration = Duration::from_secs(15);
/// How much of a failed answer's body is kept as the delivery's error.
const ERROR_BODY_BYTES: usize = 200;
/// Longest error text recorded for a transport failure.
const ERROR_TEXT_CHARS: usize = 300;
/// How long shutting down may spend handing unfinished deliveries back.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The exact bytes POSTed for a delivery (and signed):
/// `{"deliveryId", "subscriptionId", "applicationId", "attempt", "event"}`.
pub fn request_body(application_id: &str, delivery: &Delivery) -> beseda_core::Result<Vec<u8>> {
    let event = convert::event_json(&delivery.event)?;
    let body = json!({
        "deliveryId": delivery.id.to_string(),
        "subscriptionId": delivery.consumer_id,
        "applicationId": application_id,
        "attempt": delivery.attempts,
        "event": event,
    });
    serde_json::to_vec(&body)
        .map_err(|error| beseda_core::Error::internal(format!("cannot encode an outbound body: {error}")))
}

/// What became of one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered 2xx: acknowledged, removed from the queue.
    Ok,
    /// Failed: due again after the backoff.
    Retry,
    /// Failed the last allowed attempt: kept as a dead letter.
    Dead,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retry => "retry",
            Outcome::Dead => "dead",
        }
    }
}

/// Only a 2xx answer acknowledges; redirects are not followed and count as failures.
pub fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

/// `attempts` counts the attempt that just ended.
pub fn classify(succeeded: bool, attempts: u32, max_attempts: u32) -> Outcome {
    if succeeded {
        Outcome::Ok
    } else if attempts >= max_attempts {
        Outcome::Dead
    } else {
        Outcome::Retry
    }
}

/// `HTTP 503: <the first 200 bytes of the body>`.
pub fn status_error(status: u16, body: &[u8]) -> String {
    let mut cut = &body[..body.len().min(ERROR_BODY_BYTES)];
    // Do not keep half of a character cut at the end.
    if let Err(error) = std::str::from_utf8(cut)
        && error.error_len().is_none()
    {
        cut = &cut[..error.valid_up_to()];
    }
    let text = String::from_utf8_lossy(cut);
    let text = text.trim();
    if text.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {text}") }
}

/// A transport failure (connection refused, TLS, timeout) with its causes.
pub fn transport_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    truncate_chars(text, ERROR_TEXT_CHARS)
}

fn truncate_chars(text: String, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => text[..end].to_owned(),
        None => text,
    }
}

fn duration_micros(duration: Duration) -> Micros {
    Micros::try_from(duration.as_micros()).unwrap_or(Micros::MAX)
}

/// How long the dispatcher may sleep: until the earliest future due time,
/// at most until the next full round.
pub fn sleep_until(now: Micros, due: impl IntoIterator<Item = Micros>, full_round_in: Duration) -> Duration {
    due.into_iter()
        .filter(|at| *at > now)
        .map(|at| Duration::from_micros(u64::try_from(at - now).unwrap_or(u64::MAX)))
        .fold(full_round_in, Duration::min)
}

/// The one HTTP client of the dispatcher: the configured timeout for the
/// whole exchange, no redirects.
pub fn http_client(config: &BotsConfig) -> reqwest::Result<reqwest::Client> {
    let builder = reqwest::Client::builder()
        .timeout(config.outbound_timeout)
        .connect_timeout(config.outbound_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("Beseda/", env!("CARGO_PKG_VERSION")));
    if config.allow_private_targets {
        builder.build()
    } else {
        builder.dns_resolver(std::sync::Arc::new(crate::targets::PublicOnly)).build()
    }
}

/// POSTs one delivery; `Err` carries the error text to record.
async fn post(
    client: &reqwest::Client,
    application_id: &str,
    subscription: &EventSubscription,
    delivery: &Delivery,
) -> Result<(), String> {
    let body = request_body(application_id, delivery).map_err(|error| format!("cannot encode the event: {error}"))?;
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default();
    let request = client
        .post(&subscription.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(EVENT_HEADER, delivery.event.kind.name())
        .header(DELIVERY_HEADER, delivery.id.to_string())
        .header(SIGNATURE_HEADER, sign(&subscription.secret, &body))
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .body(body);
    let mut response = request.send().await.map_err(|error| transport_error(&error))?;
    let status = response.status().as_u16();
    if is_success(status) {
        return Ok(());
    }
    // Only the start of the answer is kept: read no more than that.
    let mut start = Vec::new();
    while start.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => start.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    Err(status_error(status, &start))
}

/// What a finished POST task reports back to the loop.
struct Finished {
    /// When the delivery is due again, if it is.
    retry_at: Option<Micros>,
}

/// Runs one attempt to the end: POST, then acknowledge or fail in the store.
async fn deliver(
    store: Arc<dyn Store>,
    client: reqwest::Client,
    config: Arc<BotsConfig>,
    application_id: String,
    subscription: Arc<EventSubscription>,
    delivery: Delivery,
) -> Finished {
    let started = std::time::Instant::now();
    let refused = if config.allow_private_targets {
        None
    } else {
        reqwest::Url::parse(&subscription.url).ok().as_ref().and_then(crate::targets::refuse_host)
    };
    let result = match refused {
        Some(reason) => Err(format!("refused target: {reason} (bots.outbound_allow_private_addresses is false)")),
        None => post(&client, &application_id, &subscription, &delivery).await,
    };
    metrics::histogram!("beseda_outbound_delivery_seconds").record(started.elapsed().as_secs_f64());
    let outcome = classify(result.is_ok(), delivery.attempts, config.max_attempts);
    metrics::counter!("beseda_outbound_deliveries_total", "outcome" => outcome.as_str()).increment(1);
    match result {
        Ok(()) => {
            if let Err(error) = store.acknowledge(&application_id, delivery.id).await {
                // It is handed out again after the visibility timeout: a duplicate, never a loss.
                tracing::warn!(%error, application_id, delivery_id = delivery.id, "cannot acknowledge an outbound delivery");
            }
            Finished { retry_at: None }
        }
        Err(error) => {
            let dead = outcome == Outcome::Dead;
            let retry_at = now_micros()
                + duration_micros(backoff::delay(config.initial_backoff, config.max_backoff, delivery.attempts));
            tracing::debug!(
                application_id,
                subscription_id = subscription.id,
                delivery_id = delivery.id,
                attempt = delivery.attempts,
                dead,
                error,
                "an outbound delivery failed"
            );
            if let Err(store_error) = store.fail(&application_id, delivery.id, &error, retry_at, dead).await {
                tracing::warn!(
                    error = %store_error,
                    application_id,
                    delivery_id = delivery.id,
                    "cannot record a failed outbound delivery"
                );
            }
            Finished { retry_at: (!dead).then_some(retry_at) }
        }
    }
}

/// A POST under way.
struct InFlight {
    application_id: String,
    delivery_id: i64,
}

/// The dispatcher's state; lives in the one task that runs [`run`].
struct Dispatcher {
    store: Arc<dyn Store>,
    config: Arc<BotsConfig>,
    client: reqwest::Client,
    wakeup: Arc<Notify>,
    tasks: JoinSet<Finished>,
    in_flight: HashMap<tokio::task::Id, InFlight>,
    in_flight_ids: HashSet<(String, i64)>,
    in_flight_per_application: HashMap<String, u32>,
    /// The store's next due delivery per application (future ones only).
    store_due: HashMap<String, Micros>,
    /// Retry times this dispatcher set (the store's next due may be hidden
    /// behind deliveries that wait for their conversation's turn).
    retries: BinaryHeap<Reverse<Micros>>,
    next_full_round: Instant,
}

/// Runs the dispatcher until `shutdown` flips.
pub async fn run(service: BotsService, mut shutdown: watch::Receiver<bool>) {
    let client = match http_client(&service.config) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot create the HTTP client: outbound event subscriptions are not delivered");
            while !*shutdown.borrow() && shutdown.changed().await.is_ok() {}
            return;
        }
    };
    Dispatcher::new(service.store.clone(), service.config.clone(), client, service.outbound_wakeup.clone())
        .run(shutdown)
        .await;
}

impl Dispatcher {
    fn new(store: Arc<dyn Store>, config: Arc<BotsConfig>, client: reqwest::Client, wakeup: Arc<Notify>) -> Self {
        Dispatcher {
            store,
            config,
            client,
            wakeup,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            in_flight_ids: HashSet::new(),
            in_flight_per_application: HashMap::new(),
            store_due: HashMap::new(),
            retries: BinaryHeap::new(),
            next_full_round: Instant::now(),
        }
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut full_round = true;
        let mut finished_applications: HashSet<String> = HashSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            // A retry that came due, or a round that is due, while finished
            // POSTs kept the loop busy also makes a full round.
            let retry_due = self.retries.peek().is_some_and(|Reverse(at)| *at <= now_micros());
            if full_round || retry_due || Instant::now() >= self.next_full_round {
                finished_applications.clear();
                self.round().await;
            } else {
                for application_id in std::mem::take(&mut finished_applications) {
                    self.round_application(&application_id).await;
                }
            }
            let pause = sleep_until(
                now_micros(),
                self.store_due.values().copied().chain(self.retries.peek().map(|Reverse(at)| *at)),
                self.next_full_round.saturating_duration_since(Instant::now()),
            );
            full_round = false;
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finished(joined, &mut finished_applications);
                    while let Some(joined) = self.tasks.try_join_next_with_id() {
                        self.finished(joined, &mut finished_applications);
                    }
                }
                _ = self.wakeup.notified() => full_round = true,
                _ = tokio::time::sleep(pause) => full_round = true,
            }
        }
        self.stop().await;
    }

    /// Claims for every application with subscriptions.
    async fn round(&mut self) {
        self.next_full_round = Instant::now() + self.config.poll_interval;
        let now = now_micros();
        while self.retries.peek().is_some_and(|Reverse(at)| *at <= now) {
            self.retries.pop();
        }
        let applications = match self.store.applications_with_subscriptions().await {
            Ok(applications) => applications,
            Err(error) => {
                tracing::warn!(%error, "cannot list the applications with event subscriptions; retrying");
                return;
            }
        };
        self.store_due.retain(|application_id, _| applications.contains(application_id));
        for application_id in applications {
            self.round_application(&application_id).await;
        }
    }

    /// Claims what is due for the application's enabled subscriptions, as
    /// far as its in-flight budget allows, and starts POSTing it.
    async fn round_application(&mut self, application_id: &str) {
        let subscriptions = match self.store.list_subscriptions(application_id).await {
            Ok(subscriptions) => subscriptions,
            Err(error) => {
                tracing::warn!(%error, application_id, "cannot list event subscriptions; retrying");
                return;
            }
        };
        let enabled: HashMap<String, Arc<EventSubscription>> = subscriptions
            .into_iter()
            .filter(|subscription| subscription.enabled)
            .map(|subscription| (subscription.id.clone(), Arc::new(subscription)))
            .collect();
        // No consumer ids would mean every subscription, disabled ones included.
        if enabled.is_empty() {
            self.store_due.remove(application_id);
            return;
        }
        let busy = self.in_flight_per_application.get(application_id).copied().unwrap_or(0);
        let room = self.config.max_in_flight.max(1).saturating_sub(busy);
        if room > 0 {
            let now = now_micros();
            let claim = Claim {
                consumer_kind: ConsumerKind::Subscription,
                consumer_ids: enabled.keys().cloned().collect(),
                now,
                visible_again_at: now + duration_micros(self.config.outbound_timeout + VISIBILITY_MARGIN),
                max_attempts: self.config.max_attempts,
                limit: room,
            };
            match self.store.claim(application_id, &claim).await {
                Ok(deliveries) => {
                    for delivery in deliveries {
                        self.start(application_id, &enabled, delivery).await;
                    }
                }
                Err(error) => tracing::warn!(%error, application_id, "cannot claim outbound deliveries; retrying"),
            }
        }
        match self.store.next_due(application_id, ConsumerKind::Subscription).await {
            Ok(Some(at)) if at > now_micros() => {
                self.store_due.insert(application_id.to_owned(), at);
            }
            Ok(_) => {
                self.store_due.remove(application_id);
            }
            Err(error) => tracing::warn!(%error, application_id, "cannot read the next due outbound delivery"),
        }
    }

    async fn start(
        &mut self,
        application_id: &str,
        enabled: &HashMap<String, Arc<EventSubscription>>,
        delivery: Delivery,
    ) {
        let key = (application_id.to_owned(), delivery.id);
        if self.in_flight_ids.contains(&key) {
            // Still being POSTed (its store update is late): that attempt acknowledges or fails it.
            return;
        }
        let Some(subscription) = enabled.get(&delivery.consumer_id) else {
            self.not_enabled(application_id, delivery).await;
            return;
        };
        let handle = self.tasks.spawn(deliver(
            self.store.clone(),
            self.client.clone(),
            self.config.clone(),
            application_id.to_owned(),
            subscription.clone(),
            delivery,
        ));
        self.in_flight.insert(handle.id(), InFlight { application_id: key.0.clone(), delivery_id: key.1 });
        *self.in_flight_per_application.entry(key.0.clone()).or_default() += 1;
        self.in_flight_ids.insert(key);
    }

    /// A delivery claimed for a subscription that changed since it was
    /// listed: dropped if the subscription is gone, handed back if it is
    /// disabled (it waits in the queue until it is enabled again).
    async fn not_enabled(&self, application_id: &str, delivery: Delivery) {
        let store = self.store.as_ref();
        let result = match store.get_subscription(application_id, &delivery.consumer_id).await {
            Ok(None) => store.acknowledge(application_id, delivery.id).await.map(drop),
            Ok(Some(_)) => store.release(application_id, &[delivery.id], now_micros()).await,
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            tracing::warn!(%error, application_id, delivery_id = delivery.id, "cannot set aside an outbound delivery");
        }
    }

    fn finished(
        &mut self,
        joined: Result<(tokio::task::Id, Finished), tokio::task::JoinError>,
        applications: &mut HashSet<String>,
    ) {
        let (id, finished) = match joined {
            Ok((id, finished)) => (id, Some(finished)),
            Err(error) => {
                tracing::error!(%error, "an outbound delivery task failed");
                (error.id(), None)
            }
        };
        if let Some(Finished { retry_at: Some(at) }) = finished {
            self.retries.push(Reverse(at));
        }
        if let Some(entry) = self.forget(id) {
            applications.insert(entry.application_id);
        }
    }

    fn forget(&mut self, id: tokio::task::Id) -> Option<InFlight> {
        let entry = self.in_flight.remove(&id)?;
        self.in_flight_ids.remove(&(entry.application_id.clone(), entry.delivery_id));
        if let Some(count) = self.in_flight_per_application.get_mut(&entry.application_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.in_flight_per_application.remove(&entry.application_id);
            }
        }
        Some(entry)
    }

    /// Stops the POSTs under way and hands their deliveries back to the
    /// queue, due at once (with their attempt counts), so that the next
    /// dispatcher does not wait for the visibility timeout.
    async fn stop(mut self) {
        self.tasks.abort_all();
        let mut unfinished: HashMap<String, Vec<i64>> = HashMap::new();
        while let Some(joined) = self.tasks.join_next_with_id().await {
            let (id, cancelled) = match joined {
                Ok((id, _)) => (id, false),
                Err(error) => (error.id(), error.is_cancelled()),
            };
            if let Some(entry) = self.forget(id)
                && cancelled
            {
                unfinished.entry(entry.application_id).or_default().push(entry.delivery_id);
            }
        }
        let store = self.store.clone();
        let release = async move {
            let now = now_micros();
            for (application_id, delivery_ids) in unfinished {
                if let Err(error) = store.release(&application_id, &delivery_ids, now).await {
                    tracing::warn!(%error, application_id, "cannot hand back unfinished outbound deliveries");
                }
            }
        };
        if tokio::time::timeout(RELEASE_TIMEOUT, release).await.is_err() {
            tracing::warn!("handing back unfinished outbound deliveries timed out; they are due after their timeout");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::hmac_sha256_hex;
    use beseda_core::bots::{ApplicationEvent, ApplicationEventKind, Bot};

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hmac_matches_rfc_4231_test_case_6_with_a_key_longer_than_a_block() {
        assert_eq!(
            hmac_sha256_hex(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First"),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    fn bot_event_delivery() -> Delivery {
        let bot = Bot {
            id: "bot-1".into(),
            user_id: "user-1".into(),
            bot_type: "EchoBot".into(),
            additional_parameters: Default::default(),
            predefined: false,
            infobase_user_name: String::new(),
            created_at: 1_700_000_000_000_000,
        };
        Delivery {
            id: 42,
            consumer_kind: ConsumerKind::Subscription,
            consumer_id: "sub-1".into(),
            kind: "bot.created".into(),
            event: ApplicationEvent {
                conversation_id: String::new(),
                seq: 0,
                at: 1_700_000_000_000_000,
                kind: ApplicationEventKind::BotCreated { bot },
            },
            attempts: 3,
            dead: false,
            last_error: String::new(),
            created_at: 1_700_000_000_000_000,
        }
    }

    #[test]
    fn the_body_names_the_delivery_and_carries_the_event_json() {
        let delivery = bot_event_delivery();
        let body = request_body("app-1", &delivery).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["deliveryId"], "42");
        assert_eq!(value["subscriptionId"], "sub-1");
        assert_eq!(value["applicationId"], "app-1");
        assert_eq!(value["attempt"], 3);
        assert_eq!(value["event"], convert::event_json(&delivery.event).unwrap());
        assert_eq!(value["event"]["type"], "bot.created");
        assert_eq!(value["event"]["bot"]["id"], "bot-1");
        assert_eq!(value.as_object().unwrap().len(), 5, "{value}");
        // The signature is over exactly these bytes.
        assert_eq!(sign("s3cret", &body), format!("sha256={}", hmac_sha256_hex(b"s3cret", &body)));
    }

    #[test]
    fn only_2xx_acknowledges_and_the_last_attempt_makes_a_dead_letter() {
        assert!(is_success(200) && is_success(204) && is_success(299));
        assert!(!is_success(199) && !is_success(301) && !is_success(404) && !is_success(503));
        assert_eq!(classify(true, 10, 10), Outcome::Ok);
        assert_eq!(classify(false, 1, 10), Outcome::Retry);
        assert_eq!(classify(false, 9, 10), Outcome::Retry);
        assert_eq!(classify(false, 10, 10), Outcome::Dead);
        assert_eq!(classify(false, 11, 10), Outcome::Dead);
        assert_eq!(Outcome::Retry.as_str(), "retry");
    }

    #[test]
    fn status_errors_keep_the_status_and_the_start_of_the_body() {
        assert_eq!(status_error(503, b""), "HTTP 503");
        assert_eq!(status_error(500, b" boom \n"), "HTTP 500: boom");
        let long = "x".repeat(1000);
        assert_eq!(status_error(502, long.as_bytes()), format!("HTTP 502: {}", "x".repeat(200)));
        // 199 ASCII bytes and a two-byte letter: the half letter is dropped, not garbled.
        let cut = format!("{}я", "a".repeat(199));
        assert_eq!(status_error(400, cut.as_bytes()), format!("HTTP 400: {}", "a".repeat(199)));
    }

    #[test]
    fn transport_errors_include_their_causes_and_stay_short() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = Outer(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"));
        assert_eq!(transport_error(&error), "error sending request: connection refused");
        let long = std::io::Error::other("é".repeat(1000));
        assert_eq!(transport_error(&long).chars().count(), 300);
    }

    #[test]
    fn sleeps_until_the_earliest_future_due_time_or_the_next_round() {
        let poll = Duration::from_secs(1);
        assert_eq!(sleep_until(1_000, [], poll), poll);
        assert_eq!(sleep_until(1_000, [1_000 + 250_000, 1_000 + 500_000], poll), Duration::from_millis(250));
        // Due times already past are waiting for their conversation's turn: a finished POST wakes them.
        assert_eq!(sleep_until(1_000, [500, 1_000], poll), poll);
        assert_eq!(sleep_until(1_000, [1_000 + 5_000_000], poll), poll);
    }

    #[tokio::test]
    async fn requests_are_signed_and_redirects_are_not_followed() {
        use std::sync::Mutex;

        use axum::http::{HeaderMap, StatusCode};

        type Seen = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;
        let seen: Seen = Arc::default();
        let record = {
            let seen = seen.clone();
            move |headers: HeaderMap, body: axum::body::Bytes| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push((headers, body.to_vec()));
                    StatusCode::NO_CONTENT
                }
            }
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(record))
            .route(
                "/moved",
                axum::routing::post(|| async { (StatusCode::TEMPORARY_REDIRECT, [("location", "/hook")]) }),
            )
            .route("/down", axum::routing::post(|| async { (StatusCode::SERVICE_UNAVAILABLE, "try later") }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let config = BotsConfig { outbound_timeout: Duration::from_secs(5), ..BotsConfig::default() };
        let client = http_client(&config).unwrap();
        let delivery = bot_event_delivery();
        let subscription = |path: &str| EventSubscription {
            id: "sub-1".into(),
            url: format!("http://{address}{path}"),
            secret: "s3cret".into(),
            event_kinds: vec![],
            conversation_ids: vec![],
            enabled: true,
            created_at: 0,
        };

        post(&client, "app-1", &subscription("/hook"), &delivery).await.unwrap();
        let (headers, body) = seen.lock().unwrap().pop().unwrap();
        assert_eq!(body, request_body("app-1", &delivery).unwrap());
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers[EVENT_HEADER], "bot.created");
        assert_eq!(headers[DELIVERY_HEADER], "42");
        assert_eq!(headers[SIGNATURE_HEADER].to_str().unwrap(), sign("s3cret", &body));
        let sent_at: u64 = headers[TIMESTAMP_HEADER].to_str().unwrap().parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(sent_at <= now && now - sent_at < 60, "{sent_at} vs {now}");

        assert_eq!(post(&client, "app-1", &subscription("/moved"), &delivery).await.unwrap_err(), "HTTP 307");
        assert!(seen.lock().unwrap().is_empty(), "the redirect was followed");
        assert_eq!(post(&client, "app-1", &subscription("/down"), &delivery).await.unwrap_err(), "HTTP 503: try later");

        server.abort();

        // Nobody listening: a transport error, not a status.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_address = closed.local_addr().unwrap();
        drop(closed);
        let mut nowhere = subscription("/hook");
        nowhere.url = format!("http://{closed_address}/hook");
        let refused = post(&client, "app-1", &nowhere, &delivery).await.unwrap_err();
        assert!(!refused.is_empty() && !refused.starts_with("HTTP"), "{refused}");
    }

    // ---- the dispatcher against the real store (SQLite in memory)

    mod dispatcher {
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicBool, Ordering};

        use axum::http::StatusCode;
        use beseda_core::bots::{ApplicationEvent, ApplicationEventKind, NewDelivery};
        use beseda_core::model::{Application, ApplicationState, new_id};
        use beseda_store::sqlite::SqliteStore;

        use super::*;

        const WAIT: Duration = Duration::from_secs(20);

        /// Conversation "stuck" answers 503; "hang" never answers; the rest 200.
        #[derive(Default)]
        struct Receiver {
            got: Mutex<Vec<serde_json::Value>>,
            stuck_fixed: AtomicBool,
        }

        async fn receiver() -> (Arc<Receiver>, String) {
            let state = Arc::new(Receiver::default());
            let handler = {
                let state = state.clone();
                move |body: axum::body::Bytes| {
                    let state = state.clone();
                    async move {
                        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let conversation = value["event"]["conversationId"].as_str().unwrap_or_default().to_owned();
                        state.got.lock().unwrap().push(value);
                        match conversation.as_str() {
                            "hang" => std::future::pending::<StatusCode>().await,
                            "stuck" if !state.stuck_fixed.load(Ordering::SeqCst) => StatusCode::SERVICE_UNAVAILABLE,
                            _ => StatusCode::OK,
                        }
                    }
                }
            };
            let app = axum::Router::new().route("/hook", axum::routing::post(handler));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/hook", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            (state, url)
        }

        impl Receiver {
            fn seqs_of(&self, conversation: &str) -> Vec<u64> {
                let got = self.got.lock().unwrap();
                got.iter()
                    .filter(|value| value["event"]["conversationId"] == conversation)
                    .map(|value| value["event"]["seq"].as_str().unwrap().parse().unwrap())
                    .collect()
            }
        }

        async fn tenant(store: &dyn Store) -> String {
            let subscriber = store.upsert_subscriber(&format!("{}@example.com", new_id())).await.unwrap();
            let application = Application {
                id: new_id(),
                subscriber_id: subscriber.id,
                name: "Outbound".into(),
                key: Some("secret".into()),
                state: ApplicationState::Registered,
                created_at: now_micros(),
            };
            store.insert_application(&application).await.unwrap();
            application.id
        }

        async fn subscription(store: &dyn Store, application_id: &str, url: &str, enabled: bool) -> EventSubscription {
            let subscription = EventSubscription {
                id: new_id(),
                url: url.to_owned(),
                secret: "0123456789abcdef".into(),
                event_kinds: vec![],
                conversation_ids: vec![],
                enabled,
                created_at: now_micros(),
            };
            store.insert_subscription(application_id, &subscription).await.unwrap();
            subscription
        }

        fn delivery(subscription_id: &str, conversation: &str, seq: u64) -> NewDelivery {
            let bot = beseda_core::bots::Bot {
                id: format!("bot-{seq}"),
                user_id: "user".into(),
                bot_type: "EchoBot".into(),
                additional_parameters: Default::default(),
                predefined: false,
                infobase_user_name: String::new(),
                created_at: 0,
            };
            NewDelivery {
                consumer_kind: ConsumerKind::Subscription,
                consumer_id: subscription_id.to_owned(),
                kind: "bot.updated".into(),
                event: ApplicationEvent {
                    conversation_id: conversation.to_owned(),
                    seq,
                    at: now_micros(),
                    kind: ApplicationEventKind::BotUpdated { bot },
                },
            }
        }

        async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
            let deadline = Instant::now() + WAIT;
            while !check() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        fn config(max_attempts: u32) -> Arc<BotsConfig> {
            Arc::new(BotsConfig {
                max_attempts,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(50),
                poll_interval: Duration::from_millis(50),
                outbound_timeout: Duration::from_secs(1),
                max_in_flight: 8,
                // The receivers of these tests listen on loopback.
                allow_private_targets: true,
                ..BotsConfig::default()
            })
        }

        fn spawn(store: Arc<dyn Store>, config: Arc<BotsConfig>) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
            let (stop, shutdown) = watch::channel(false);
            let client = http_client(&config).unwrap();
            let dispatcher = Dispatcher::new(store, config, client, Arc::new(Notify::new()));
            (stop, tokio::spawn(dispatcher.run(shutdown)))
        }

        #[test]
        fn the_dispatcher_future_is_send() {
            fn send<T: Send>(_: &T) {}
            fn check(service: BotsService, shutdown: watch::Receiver<bool>) {
                send(&run(service, shutdown));
            }
            let _ = check;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_failing_conversation_holds_back_only_itself_and_dies_after_max_attempts() {
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
            let application_id = tenant(store.as_ref()).await;
            let (received, url) = receiver().await;
            let live = subscription(store.as_ref(), &application_id, &url, true).await;
            let disabled = subscription(store.as_ref(), &application_id, &url, false).await;
            let mut deliveries = Vec::new();
            for seq in 1..=5 {
                deliveries.push(delivery(&live.id, "stuck", seq));
                deliveries.push(delivery(&live.id, "fine", seq));
                deliveries.push(delivery(&disabled.id, "other", seq));
            }
            store.enqueue(&application_id, &deliveries).await.unwrap();
            // Attempts do not run out yet: "fine" flows, in order, while
            // "stuck" retries its first event and holds back only its own.
            let (stop, task) = spawn(store.clone(), config(1_000));
            eventually("the healthy conversation", || {
                received.seqs_of("fine").len() == 5 && received.seqs_of("stuck").len() >= 3
            })
            .await;
            assert_eq!(received.seqs_of("fine"), [1, 2, 3, 4, 5]);
            stop.send(true).unwrap();
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
            let stuck_before = received.seqs_of("stuck");
            assert!(stuck_before.iter().all(|seq| *seq == 1), "{stuck_before:?}");

            // With 3 attempts, "stuck"'s events die one after the other, in order:
            // the first at once (it used more), the others after 3 attempts each.
            let (stop, task) = spawn(store.clone(), config(3));
            eventually("dead letters", || received.seqs_of("stuck").len() >= stuck_before.len() + 12).await;
            assert_eq!(received.seqs_of("stuck")[stuck_before.len()..], [2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]);
            // The receiver counts a request when it arrives; the dispatcher
            // records the last one's dead letter after reading the answer.
            let deadline = Instant::now() + WAIT;
            let dead = loop {
                let dead = store.list_dead(&application_id, ConsumerKind::Subscription, None, 0, 100).await.unwrap();
                if dead.len() >= 5 || Instant::now() >= deadline {
                    break dead;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            assert_eq!(dead.len(), 5);
            assert!(dead.iter().all(|delivery| delivery.last_error == "HTTP 503"), "{dead:?}");
            assert!(dead.iter().skip(1).all(|delivery| delivery.attempts == 3), "{dead:?}");
            // A disabled subscription's queue is left alone.
            assert!(received.seqs_of("other").is_empty());
            assert_eq!(store.queue_depth(&application_id, &disabled.id).await.unwrap(), 5);
            assert_eq!(store.queue_depth(&application_id, &live.id).await.unwrap(), 0);

            // Enabled again, it flows; retried dead letters flow too, from a fresh count.
            received.stuck_fixed.store(true, Ordering::SeqCst);
            store
                .update_subscription(&application_id, &EventSubscription { enabled: true, ..disabled.clone() })
                .await
                .unwrap();
            let ids: Vec<i64> = dead.iter().map(|delivery| delivery.id).collect();
            assert_eq!(store.retry_dead(&application_id, &ids, now_micros()).await.unwrap(), 5);
            eventually("the re-enabled subscription", || received.seqs_of("other").len() == 5).await;
            assert_eq!(received.seqs_of("other"), [1, 2, 3, 4, 5]);
            eventually("the retried dead letters", || received.seqs_of("stuck").len() == stuck_before.len() + 17).await;
            let stuck = received.seqs_of("stuck");
            assert_eq!(stuck[stuck.len() - 5..], [1, 2, 3, 4, 5]);
            let attempts: Vec<u64> = received.got.lock().unwrap()[..]
                .iter()
                .filter(|value| value["event"]["conversationId"] == "stuck")
                .map(|value| value["attempt"].as_u64().unwrap())
                .collect();
            assert_eq!(attempts[attempts.len() - 8..], [1, 2, 3, 1, 1, 1, 1, 1]);

            stop.send(true).unwrap();
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_receiver_that_never_answers_times_out_and_shutdown_hands_back_what_is_in_flight() {
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
            let application_id = tenant(store.as_ref()).await;
            let (received, url) = receiver().await;
            let live = subscription(store.as_ref(), &application_id, &url, true).await;
            store
                .enqueue(&application_id, &[delivery(&live.id, "hang", 1), delivery(&live.id, "hang", 2)])
                .await
                .unwrap();

            // The 1 s timeout fails the first attempt; the second one is under way at shutdown.
            let (stop, task) = spawn(store.clone(), config(10));
            eventually("a retry after the timeout", || received.seqs_of("hang").len() == 2).await;
            assert_eq!(received.seqs_of("hang"), [1, 1], "the next event waits for the first");
            stop.send(true).unwrap();
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();

            // Handed back: due now with its attempt count, not after the visibility timeout.
            let claim = Claim {
                consumer_kind: ConsumerKind::Subscription,
                consumer_ids: vec![live.id.clone()],
                now: now_micros(),
                visible_again_at: now_micros() + 60_000_000,
                max_attempts: 10,
                limit: 10,
            };
            let claimed = store.claim(&application_id, &claim).await.unwrap();
            assert_eq!(claimed.len(), 1, "{claimed:?}");
            assert_eq!((claimed[0].event.seq, claimed[0].attempts), (1, 3));
            assert!(
                claimed[0].last_error.contains("timed out") || claimed[0].last_error.contains("timeout"),
                "{}",
                claimed[0].last_error
            );
        }
    }
}
