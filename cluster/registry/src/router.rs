//! Finds the registry leader for callers outside the cluster: tries the
//! known endpoints, follows the leader hints of followers, and retries with
//! backoff while no leader answers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use beseda_proto::ClusterToken;
use beseda_proto::v1::registry_api_client::RegistryApiClient;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status};

use crate::network::MAX_MESSAGE_BYTES;
use crate::wire::{Refusal, classify};

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// Leader hints followed in a row before backing off: hints can point in a
/// circle for a moment while leadership changes.
const MAX_HINTS_IN_A_ROW: usize = 3;
/// How many recent failures an "unavailable" message describes.
const REMEMBERED_FAILURES: usize = 6;

/// Why a routed call failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// No leader answered before the deadline; says what was tried.
    Unavailable(String),
    /// The leader refused the request itself (invalid, conflicting).
    Refused(Status),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unavailable(tried) => write!(formatter, "no registry leader answered: {tried}"),
            CallError::Refused(status) => {
                write!(formatter, "the registry refused the request: {:?} {}", status.code(), status.message())
            }
        }
    }
}

impl std::error::Error for CallError {}

/// A registry API client that presents the cluster token.
pub(crate) type ApiClient = RegistryApiClient<InterceptedService<Channel, ClusterToken>>;

pub(crate) struct LeaderRouter {
    endpoints: Vec<String>,
    /// Bounds one attempt, so that a node that accepts the connection but
    /// never answers (a deposed leader cut off from the others) is left.
    attempt_timeout: Duration,
    clients: Mutex<HashMap<String, ApiClient>>,
    /// Presented on every call (`cluster.token`).
    token: ClusterToken,
    /// The address that answered last, tried first.
    leader: Mutex<Option<String>>,
    next_endpoint: AtomicUsize,
    recent_failures: Mutex<Vec<String>>,
}

impl LeaderRouter {
    pub fn new(endpoints: Vec<String>, attempt_timeout: Duration, token: Option<&str>) -> anyhow::Result<Self> {
        anyhow::ensure!(!endpoints.is_empty(), "no registry endpoint is configured");
        let router = LeaderRouter {
            endpoints,
            attempt_timeout,
            token: ClusterToken::new(token).map_err(anyhow::Error::msg)?,
            clients: Mutex::default(),
            leader: Mutex::default(),
            next_endpoint: AtomicUsize::new(0),
            recent_failures: Mutex::default(),
        };
        for endpoint in &router.endpoints {
            router.client_for(endpoint).map_err(anyhow::Error::msg)?;
        }
        Ok(router)
    }

    /// A lazily connecting client for `address`, one channel per address.
    fn client_for(&self, address: &str) -> Result<ApiClient, String> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(address) {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|error| format!("`{address}` is not a valid registry gRPC URL: {error}"))?
            .connect_timeout(self.attempt_timeout);
        let client = RegistryApiClient::with_interceptor(endpoint.connect_lazy(), self.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        clients.insert(address.to_owned(), client.clone());
        Ok(client)
    }

    fn remembered_leader(&self) -> Option<String> {
        self.leader.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn remember_leader(&self, leader: Option<String>) {
        *self.leader.lock().unwrap_or_else(PoisonError::into_inner) = leader;
    }

    fn note_failure(&self, failure: String) {
        let mut failures = self.recent_failures.lock().unwrap_or_else(PoisonError::into_inner);
        failures.push(failure);
        let excess = failures.len().saturating_sub(REMEMBERED_FAILURES);
        failures.drain(..excess);
    }

    /// The latest failures, for an "unavailable" message.
    pub fn describe_failures(&self) -> String {
        let failures = self.recent_failures.lock().unwrap_or_else(PoisonError::into_inner);
        if failures.is_empty() {
            format!("endpoints {:?}; no attempt has failed yet (the request is still queued)", self.endpoints)
        } else {
            format!("endpoints {:?}; latest failures: {}", self.endpoints, failures.join("; "))
        }
    }

    /// Calls `attempt` on the leader until it succeeds, is refused for good,
    /// or `deadline` passes (`None`: keep trying).
    pub async fn call<T, F, Fut>(&self, deadline: Option<Instant>, mut attempt: F) -> Result<T, CallError>
    where
        F: FnMut(ApiClient) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut backoff = FIRST_BACKOFF;
        let mut hints_in_a_row = 0;
        let mut failures_since_pause = 0;
        loop {
            let target = self.remembered_leader().unwrap_or_else(|| {
                let next = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
                self.endpoints[next % self.endpoints.len()].clone()
            });
            let attempt_timeout = match deadline {
                Some(deadline) => self.attempt_timeout.min(deadline.saturating_duration_since(Instant::now())),
                None => self.attempt_timeout,
            };
            let mut follow_hint_now = false;
            match self.client_for(&target) {
                Err(invalid) => {
                    self.note_failure(invalid);
                    self.remember_leader(None);
                }
                Ok(client) => match tokio::time::timeout(attempt_timeout, attempt(client)).await {
                    Ok(Ok(response)) => {
                        self.remember_leader(Some(target));
                        return Ok(response.into_inner());
                    }
                    Ok(Err(status)) => match classify(&status) {
                        Refusal::NotLeader(leader) if leader != target => {
                            self.note_failure(format!("{target}: not the leader, which is {leader}"));
                            self.remember_leader(Some(leader));
                            hints_in_a_row += 1;
                            follow_hint_now = hints_in_a_row <= MAX_HINTS_IN_A_ROW;
                        }
                        Refusal::NotLeader(_) | Refusal::Retry => {
                            self.note_failure(format!("{target}: {:?} {}", status.code(), status.message()));
                            self.remember_leader(None);
                        }
                        Refusal::Final => return Err(CallError::Refused(status)),
                    },
                    Err(_elapsed) => {
                        self.note_failure(format!("{target}: no answer within {attempt_timeout:?}"));
                        self.remember_leader(None);
                    }
                },
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Err(CallError::Unavailable(self.describe_failures()));
            }
            if follow_hint_now {
                continue;
            }
            hints_in_a_row = 0;
            failures_since_pause += 1;
            // Try every endpoint once before pausing: one of them may lead.
            if failures_since_pause < self.endpoints.len() {
                continue;
            }
            failures_since_pause = 0;
            let pause = match deadline {
                Some(deadline) => backoff.min(deadline.saturating_duration_since(Instant::now())),
                None => backoff,
            };
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}
