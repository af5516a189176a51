//! The gateway's side of the cluster registry: [`RaftRegistryClient`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use beseda_proto::v1 as wire;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;

use crate::router::{CallError, LeaderRouter};
use crate::state::Delta;
use crate::wire::{change_from_wire, connections_to_wire, delta_to_wire, user_changes_from_wire, user_to_wire};
use crate::{PresenceChange, Registry, RegistryResult, RegistryUnavailable, UserKey};

/// How a gateway talks to the registry cluster.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// After the first queued change, how long to wait for more before
    /// sending them as one batch.
    pub batch_window: Duration,
    /// The most changes one batch (one Raft entry) carries.
    pub batch_max: usize,
    /// How long a call waits for an answer before it returns
    /// [`RegistryUnavailable`] (a queued write is still delivered later).
    pub request_timeout: Duration,
    /// How often an idle gateway renews its lease with an empty batch.
    pub heartbeat_interval: Duration,
    /// The lease the gateway asks for: the registry forgets its connections
    /// this long after its last successful write.
    pub lease: Duration,
    /// The cluster token presented to the voters (`cluster.token`).
    pub token: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            batch_window: Duration::from_millis(5),
            batch_max: 1000,
            request_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(3),
            lease: Duration::from_secs(10),
            token: None,
        }
    }
}

/// A change waiting for its batch.
enum Queued {
    Delta { delta: Delta, reply: oneshot::Sender<Result<PresenceChange, String>> },
    Deregister { gateway: String, reply: oneshot::Sender<Result<(), String>> },
}

/// The [`Registry`] of a gateway in a cluster, backed by the registry's Raft
/// leader over gRPC.
///
/// **Writes are batched.** `connected` and `disconnected` queue a change and
/// wait for its answer; one background task sends everything queued (up to
/// `batch_max`) as one `Apply`, with at most one in flight, so a storm of
/// connections becomes a few Raft entries and the changes land in the order
/// they were made. An idle gateway sends an empty batch every
/// `heartbeat_interval` to renew its lease. A write whose caller gave up
/// after `request_timeout` stays queued and is delivered when the registry
/// is back, so the registry converges to what the gateway really holds.
///
/// **Exactly once.** Every command carries this client's session (random,
/// per process run) and a sequence number; the registry answers a command it
/// has applied already from memory, so retries after a lost answer are safe.
///
/// **Resync.** The task keeps the connection counts the registry has
/// confirmed. When the registry answers that it does not know this gateway
/// (its lease ran out during a partition, or the registry lost its state),
/// the task sends those counts as a `Resync` and then the pending batch.
/// The presence changes a resync causes (users back online) are published on
/// [`Self::resync_changes`].
///
/// **Reads are linearizable.** `is_online`, `online_of`, `nodes_of` and
/// `connection_count` are answered by the leader after a read-index round:
/// it confirms with a quorum that it still leads and waits until it has
/// applied everything committed before it reads, so a deposed leader can
/// never answer with stale presence. The cost is one heartbeat round trip to
/// a quorum per read, and reads fail (after retries) while no leader is
/// elected; a follower refuses reads and names the leader.
pub struct RaftRegistryClient {
    gateway_id: String,
    request_timeout: Duration,
    router: Arc<LeaderRouter>,
    queue: mpsc::UnboundedSender<Queued>,
    resync_changes: broadcast::Sender<Vec<(UserKey, PresenceChange)>>,
    sender: JoinHandle<()>,
}

impl RaftRegistryClient {
    /// Starts the batching task for gateway `gateway_id`. Connections are
    /// lazy: this succeeds while the registry is down. Must be called within
    /// a Tokio runtime.
    pub fn start(endpoints: Vec<String>, gateway_id: String, config: ClientConfig) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(!gateway_id.is_empty(), "the gateway id must not be empty");
        anyhow::ensure!(config.batch_max > 0, "batch_max must be at least 1");
        anyhow::ensure!(
            config.heartbeat_interval < config.lease,
            "the heartbeat interval ({:?}) must be shorter than the lease ({:?})",
            config.heartbeat_interval,
            config.lease
        );
        let attempt_timeout = (config.request_timeout / 4).clamp(Duration::from_millis(500), Duration::from_secs(5));
        let router = Arc::new(LeaderRouter::new(endpoints, attempt_timeout, config.token.as_deref())?);
        let (queue, queued) = mpsc::unbounded_channel();
        let (resync_changes, _) = broadcast::channel(64);
        let sender = BatchSender {
            gateway: gateway_id.clone(),
            config: config.clone(),
            router: router.clone(),
            queued,
            resync_changes: resync_changes.clone(),
            session: rand::random(),
            sequence: 0,
            confirmed: BTreeMap::new(),
            registered: false,
            deregistered: false,
            last_write: Instant::now(),
        };
        let sender = tokio::spawn(sender.run());
        Ok(Arc::new(RaftRegistryClient {
            gateway_id,
            request_timeout: config.request_timeout,
            router,
            queue,
            resync_changes,
            sender,
        }))
    }

    /// Presence changes caused by this gateway's resyncs (its users coming
    /// back online after the registry had expired the gateway), for the
    /// embedding process to publish.
    pub fn resync_changes(&self) -> broadcast::Receiver<Vec<(UserKey, PresenceChange)>> {
        self.resync_changes.subscribe()
    }

    fn unavailable(&self, what: &str) -> RegistryUnavailable {
        RegistryUnavailable(format!(
            "{what} got no answer within {:?} (gateway {}); {}",
            self.request_timeout,
            self.gateway_id,
            self.router.describe_failures()
        ))
    }

    async fn wait<T>(&self, what: &str, answer: oneshot::Receiver<Result<T, String>>) -> RegistryResult<T> {
        match tokio::time::timeout(self.request_timeout, answer).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(message))) => Err(RegistryUnavailable(message)),
            Ok(Err(_)) => Err(RegistryUnavailable("the registry client has stopped".into())),
            Err(_) => Err(self.unavailable(what)),
        }
    }

    async fn submit(&self, node_id: &str, delta: Delta) -> RegistryResult<PresenceChange> {
        if node_id != self.gateway_id {
            return Err(RegistryUnavailable(format!(
                "this registry client writes for gateway `{}`, not `{node_id}`",
                self.gateway_id
            )));
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued::Delta { delta, reply })
            .map_err(|_| RegistryUnavailable("the registry client has stopped".into()))?;
        self.wait("the registry write", answer).await
    }

    async fn query(&self, query: wire::registry_query_request::Query) -> RegistryResult<wire::RegistryQueryResponse> {
        let deadline = Instant::now() + self.request_timeout;
        let request = wire::RegistryQueryRequest { query: Some(query) };
        self.router
            .call(Some(deadline), |mut client| {
                let request = request.clone();
                async move { client.query(request).await }
            })
            .await
            .map_err(|error| match error {
                CallError::Unavailable(tried) => RegistryUnavailable(format!(
                    "the registry read got no answer within {:?}; {tried}",
                    self.request_timeout
                )),
                CallError::Refused(status) => {
                    RegistryUnavailable(format!("the registry refused the read: {}", status.message()))
                }
            })
    }
}

impl Drop for RaftRegistryClient {
    fn drop(&mut self) {
        self.sender.abort();
    }
}

fn unexpected_answer(query: &str) -> RegistryUnavailable {
    RegistryUnavailable(format!("the registry answered {query} with an answer of another query"))
}

#[async_trait]
impl Registry for RaftRegistryClient {
    async fn connected(&self, user: &UserKey, node_id: &str) -> RegistryResult<PresenceChange> {
        self.submit(node_id, Delta::Connected(user.clone())).await
    }

    async fn disconnected(&self, user: &UserKey, node_id: &str) -> RegistryResult<PresenceChange> {
        self.submit(node_id, Delta::Disconnected(user.clone())).await
    }

    async fn is_online(&self, user: &UserKey) -> RegistryResult<bool> {
        use wire::registry_query_request::Query;
        use wire::registry_query_response::Answer;
        match self.query(Query::IsOnline(user_to_wire(user))).await?.answer {
            Some(Answer::Online(online)) => Ok(online),
            _ => Err(unexpected_answer("is_online")),
        }
    }

    /// One linearizable read for all of `users` (none for an empty list).
    async fn online_of(&self, users: &[UserKey]) -> RegistryResult<Vec<bool>> {
        use wire::registry_query_request::Query;
        use wire::registry_query_response::Answer;
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let list = wire::RegistryUserKeyList { users: users.iter().map(user_to_wire).collect() };
        match self.query(Query::OnlineOf(list)).await?.answer {
            Some(Answer::OnlineOf(answer)) if answer.online.len() == users.len() => Ok(answer.online),
            Some(Answer::OnlineOf(answer)) => Err(RegistryUnavailable(format!(
                "the registry answered online_of for {} users with {} answers",
                users.len(),
                answer.online.len()
            ))),
            _ => Err(unexpected_answer("online_of")),
        }
    }

    async fn nodes_of(&self, user: &UserKey) -> RegistryResult<Vec<String>> {
        use wire::registry_query_request::Query;
        use wire::registry_query_response::Answer;
        match self.query(Query::NodesOf(user_to_wire(user))).await?.answer {
            Some(Answer::Nodes(nodes)) => Ok(nodes.nodes),
            _ => Err(unexpected_answer("nodes_of")),
        }
    }

    /// The voters in the membership of whichever voter answers first.
    async fn voter_count(&self) -> RegistryResult<usize> {
        let deadline = Instant::now() + self.request_timeout;
        let status = self
            .router
            .call(Some(deadline), |mut client| async move { client.status(wire::RegistryStatusRequest {}).await })
            .await
            .map_err(|error| match error {
                CallError::Unavailable(tried) => RegistryUnavailable(format!(
                    "the registry status got no answer within {:?}; {tried}",
                    self.request_timeout
                )),
                CallError::Refused(status) => {
                    RegistryUnavailable(format!("the registry refused the status call: {}", status.message()))
                }
            })?;
        Ok(status.members.iter().filter(|member| member.voter).count())
    }

    async fn connection_count(&self) -> RegistryResult<usize> {
        use wire::registry_query_request::Query;
        use wire::registry_query_response::Answer;
        match self.query(Query::ConnectionCount(wire::RegistryConnectionCountQuery {})).await?.answer {
            Some(Answer::ConnectionCount(count)) => Ok(usize::try_from(count).unwrap_or(usize::MAX)),
            _ => Err(unexpected_answer("connection_count")),
        }
    }

    /// Deregisters `node_id` (after the changes queued before it). For this
    /// client's own gateway it is final: heartbeats stop, later
    /// disconnections are answered locally as unchanged (the registry forgot
    /// them already, and the users who went offline were announced through
    /// the leader's `on_expired`), and later connections are refused.
    async fn node_stopping(&self, node_id: &str) -> RegistryResult<()> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued::Deregister { gateway: node_id.to_owned(), reply })
            .map_err(|_| RegistryUnavailable("the registry client has stopped".into()))?;
        self.wait("the registry deregistration", answer).await
    }

    fn kind(&self) -> &'static str {
        "raft"
    }
}

/// What the registry answered to one `Apply`.
enum Applied {
    Deltas(Vec<i32>),
    Users(wire::RegistryUserChanges),
    UnknownGateway,
}

/// The background task that owns the gateway's session with the registry.
struct BatchSender {
    gateway: String,
    config: ClientConfig,
    router: Arc<LeaderRouter>,
    queued: mpsc::UnboundedReceiver<Queued>,
    resync_changes: broadcast::Sender<Vec<(UserKey, PresenceChange)>>,
    session: u64,
    sequence: u64,
    /// Connection counts per user as the registry has applied them.
    confirmed: BTreeMap<UserKey, u32>,
    /// Whether the registry knows the current session (a resync was applied).
    registered: bool,
    /// This gateway deregistered itself: nothing is sent any more.
    deregistered: bool,
    last_write: Instant,
}

type PendingDelta = (Delta, oneshot::Sender<Result<PresenceChange, String>>);

impl BatchSender {
    async fn run(mut self) {
        let mut carried: Option<Queued> = None;
        loop {
            if !self.registered && !self.deregistered {
                self.resync().await;
            }
            let first = match carried.take() {
                Some(item) => Some(item),
                None if self.deregistered => match self.queued.recv().await {
                    Some(item) => Some(item),
                    None => return,
                },
                None => {
                    let heartbeat_due = self.last_write + self.config.heartbeat_interval;
                    tokio::select! {
                        item = self.queued.recv() => match item {
                            Some(item) => Some(item),
                            None => return,
                        },
                        () = tokio::time::sleep_until(heartbeat_due) => None,
                    }
                }
            };
            match first {
                None => self.send_batch(Vec::new()).await,
                Some(Queued::Deregister { gateway, reply }) => self.deregister(gateway, reply).await,
                Some(Queued::Delta { delta, reply }) => {
                    let mut batch = vec![(delta, reply)];
                    carried = self.collect_batch(&mut batch).await;
                    self.send_batch(batch).await;
                }
            }
        }
    }

    /// Adds what arrives within the batch window (up to `batch_max`) to
    /// `batch`; returns a queued deregistration that ends the batch.
    async fn collect_batch(&mut self, batch: &mut Vec<PendingDelta>) -> Option<Queued> {
        let window_end = Instant::now() + self.config.batch_window;
        while batch.len() < self.config.batch_max {
            let next = match self.queued.try_recv() {
                Ok(item) => item,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(window_end, self.queued.recv()).await {
                        Ok(Some(item)) => item,
                        Ok(None) | Err(_) => return None,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
            };
            match next {
                Queued::Delta { delta, reply } => batch.push((delta, reply)),
                deregister @ Queued::Deregister { .. } => return Some(deregister),
            }
        }
        None
    }

    /// Sends one `Apply`, retrying on the leader until it is applied or
    /// refused for good (there is no deadline: the batch must land, in order).
    async fn apply(&self, command: wire::registry_apply_request::Command) -> Result<Applied, tonic::Status> {
        use wire::registry_apply_response::Outcome;
        let request = wire::RegistryApplyRequest { command: Some(command) };
        let response = self
            .router
            .call(None, |mut client| {
                let request = request.clone();
                async move { client.apply(request).await }
            })
            .await
            .map_err(|error| match error {
                CallError::Refused(status) => status,
                CallError::Unavailable(tried) => tonic::Status::unavailable(tried),
            })?;
        match response.outcome {
            Some(Outcome::Deltas(results)) => Ok(Applied::Deltas(results.changes)),
            Some(Outcome::Users(changes)) => Ok(Applied::Users(changes)),
            Some(Outcome::UnknownGateway(_)) => Ok(Applied::UnknownGateway),
            None => Err(tonic::Status::internal("the registry answered Apply without an outcome")),
        }
    }

    fn lease_ms(&self) -> u64 {
        self.config.lease.as_millis() as u64
    }

    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }

    /// Makes the registry's view of this gateway the confirmed counts and
    /// (re)starts the session; retries until it is applied.
    async fn resync(&mut self) {
        let mut pause = Duration::from_millis(100);
        // The confirmed counts do not change while this retries.
        let connections = connections_to_wire(&self.confirmed);
        loop {
            let resync = wire::RegistryResync {
                gateway: self.gateway.clone(),
                session: self.session,
                sequence: self.next_sequence(),
                lease_ms: self.lease_ms(),
                connections: connections.clone(),
            };
            match self.apply(wire::registry_apply_request::Command::Resync(resync)).await {
                Ok(Applied::Users(changes)) => {
                    self.registered = true;
                    self.last_write = Instant::now();
                    match user_changes_from_wire(changes) {
                        Ok(changes) if !changes.is_empty() => {
                            tracing::info!(gateway = %self.gateway, users = changes.len(), "registry resync changed presence");
                            let _ = self.resync_changes.send(changes);
                        }
                        Ok(_) => {}
                        Err(status) => tracing::warn!(%status, "registry resync answer not understood"),
                    }
                    return;
                }
                Ok(_) => {
                    tracing::error!(gateway = %self.gateway, "the registry answered a resync with another outcome")
                }
                Err(status) if status.code() == Code::Aborted => self.session = rand::random(),
                Err(status) => tracing::error!(gateway = %self.gateway, %status, "the registry refused a resync"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    async fn send_batch(&mut self, batch: Vec<PendingDelta>) {
        if self.deregistered {
            for (delta, reply) in batch {
                let _ = reply.send(match delta {
                    Delta::Connected(_) => Err(format!(
                        "gateway {} has deregistered from the registry (it is stopping) and records no new connections",
                        self.gateway
                    )),
                    Delta::Disconnected(_) => Ok(PresenceChange::Unchanged),
                });
            }
            return;
        }
        let deltas: Vec<wire::RegistryDelta> = batch.iter().map(|(delta, _)| delta_to_wire(delta)).collect();
        loop {
            let command = wire::registry_apply_request::Command::Batch(wire::RegistryBatch {
                gateway: self.gateway.clone(),
                session: self.session,
                sequence: self.next_sequence(),
                lease_ms: self.lease_ms(),
                deltas: deltas.clone(),
            });
            match self.apply(command).await {
                Ok(Applied::Deltas(changes)) => {
                    self.last_write = Instant::now();
                    for (position, (delta, reply)) in batch.into_iter().enumerate() {
                        self.confirm(&delta);
                        let change = changes.get(position).map(|change| change_from_wire(*change));
                        let _ = reply.send(
                            change.ok_or_else(|| "the registry answered fewer changes than the batch held".to_owned()),
                        );
                    }
                    return;
                }
                Ok(Applied::UnknownGateway) => {
                    tracing::warn!(gateway = %self.gateway, "the registry does not know this gateway: resyncing");
                    self.registered = false;
                    self.resync().await;
                }
                Err(status) if status.code() == Code::Aborted => {
                    tracing::warn!(gateway = %self.gateway, %status, "registry session out of step: starting a new one");
                    self.session = rand::random();
                    self.registered = false;
                    self.resync().await;
                }
                refused => {
                    let message = match refused {
                        Err(status) => {
                            format!("the registry refused the batch of connection changes: {}", status.message())
                        }
                        Ok(_) => "the registry answered the batch of connection changes with another outcome".into(),
                    };
                    tracing::error!(gateway = %self.gateway, "{message}");
                    for (_, reply) in batch {
                        let _ = reply.send(Err(message.clone()));
                    }
                    return;
                }
            }
        }
    }

    /// Records an applied change in the confirmed counts, the way the
    /// registry applies it (never below zero).
    fn confirm(&mut self, delta: &Delta) {
        match delta {
            Delta::Connected(user) => *self.confirmed.entry(user.clone()).or_default() += 1,
            Delta::Disconnected(user) => {
                if let Some(count) = self.confirmed.get_mut(user) {
                    *count -= 1;
                    if *count == 0 {
                        self.confirmed.remove(user);
                    }
                }
            }
        }
    }

    async fn deregister(&mut self, gateway: String, reply: oneshot::Sender<Result<(), String>>) {
        let own = gateway == self.gateway;
        let command = wire::registry_apply_request::Command::Deregister(wire::RegistryDeregister { gateway });
        let result = match self.apply(command).await {
            Ok(_) => Ok(()),
            Err(status) => Err(format!("the registry refused the deregistration: {}", status.message())),
        };
        if own && result.is_ok() {
            self.deregistered = true;
            self.confirmed.clear();
        }
        let _ = reply.send(result);
    }
}
