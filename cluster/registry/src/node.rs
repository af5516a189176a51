//! A registry node: one Raft member with its storage, its gRPC services and
//! the leader's lease-expiry timer.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use beseda_proto::v1::registry_api_server::RegistryApiServer;
use beseda_proto::v1::registry_raft_server::RegistryRaftServer;
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admin::ClusterStatus;
use crate::api::{ExpiredCallback, RegistryApiService, Removal, announce_removed, local_status};
use crate::log_store::SqliteLogStore;
use crate::network::{GrpcNetworkFactory, MAX_MESSAGE_BYTES, RaftRpcService};
use crate::raft_types::RegistryRaft;
use crate::state::{Command, CommandOutcome};
use crate::state_machine::{RegistryStateMachine, SharedState};
use crate::unix_now_ms;

/// The node's gauges are published at most this often (changes in between
/// are coalesced into the next publication) …
const METRICS_MIN_GAP: Duration = Duration::from_millis(100);
/// … and at least this often, changed or not.
const METRICS_REFRESH: Duration = Duration::from_secs(1);

/// How a registry node runs.
#[derive(Clone, Debug)]
pub struct RegistryNodeConfig {
    pub node_id: u64,
    /// Holds `raft.db` (log, vote, markers) and `snapshots/`.
    pub data_dir: PathBuf,
    /// The initial voters, this node included: node id → gRPC URL (e.g.
    /// `http://127.0.0.1:9301`). A node that is not among them (a learner to
    /// be added later) starts empty and waits for the leader to add it.
    pub peers: BTreeMap<u64, String>,
    /// How often the leader sends heartbeats to the other nodes.
    pub heartbeat_interval: Duration,
    /// The shortest election timeout; the longest is twice as long. A
    /// follower that hears no leader for that long starts an election, but
    /// only once the old leader's lease (openraft's: the longest election
    /// timeout) has run out too, so a dead leader is replaced after about 3–4
    /// election timeouts (3–4 s by default), plus a round per split vote.
    pub election_timeout: Duration,
    /// The lease of a gateway that does not ask for one: a gateway whose
    /// heartbeats stop is forgotten this long after its last one.
    pub gateway_lease: Duration,
    /// A snapshot is built every this many entries, and the log before it
    /// is purged.
    pub snapshot_every_entries: u64,
    /// The cluster token presented to the other voters (`cluster.token`);
    /// the embedding process checks it on the way in.
    pub token: Option<String>,
    /// The local address Raft connections to the other voters leave from;
    /// `None` lets the operating system choose. For a host with several
    /// addresses whose peers admit only one; the partition test gives each
    /// voter its own loopback address this way, so that a relay can tell
    /// the voters' traffic apart.
    pub peer_source_address: Option<IpAddr>,
}

impl RegistryNodeConfig {
    /// The default timings: heartbeats every 250 ms, elections after 1–2 s,
    /// 10 s gateway leases and a snapshot every 5,000 entries.
    pub fn new(node_id: u64, data_dir: impl Into<PathBuf>, peers: BTreeMap<u64, String>) -> Self {
        RegistryNodeConfig {
            node_id,
            data_dir: data_dir.into(),
            peers,
            heartbeat_interval: Duration::from_millis(250),
            election_timeout: Duration::from_secs(1),
            gateway_lease: Duration::from_secs(10),
            snapshot_every_entries: 5_000,
            token: None,
            peer_source_address: None,
        }
    }

    fn raft_config(&self) -> anyhow::Result<Config> {
        let millis = |duration: Duration| duration.as_millis() as u64;
        anyhow::ensure!(
            self.heartbeat_interval < self.election_timeout,
            "the registry heartbeat interval ({:?}) must be shorter than the election timeout ({:?})",
            self.heartbeat_interval,
            self.election_timeout
        );
        anyhow::ensure!(self.snapshot_every_entries > 0, "snapshot_every_entries must be at least 1");
        anyhow::ensure!(
            self.gateway_lease >= Duration::from_millis(4),
            "the gateway lease ({:?}) is too short",
            self.gateway_lease
        );
        let config = Config {
            cluster_name: "beseda-registry".into(),
            heartbeat_interval: millis(self.heartbeat_interval).max(1),
            election_timeout_min: millis(self.election_timeout),
            election_timeout_max: millis(self.election_timeout) * 2,
            install_snapshot_timeout: millis(self.election_timeout) * 4,
            // Each entry can hold a whole batch (up to a thousand deltas), so
            // AppendEntries carries fewer of them than openraft's default.
            max_payload_entries: 64,
            // Snapshot chunks travel as JSON number arrays (up to 4 bytes per
            // byte), which must stay well under MAX_MESSAGE_BYTES.
            snapshot_max_chunk_size: 1024 * 1024,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            // Purge the whole log behind a snapshot: a follower that is
            // behind it receives the snapshot.
            max_in_snapshot_log_to_keep: 0,
            ..Config::default()
        };
        Ok(config.validate()?)
    }
}

/// A running registry node. The embedding process serves [`Self::routes`]
/// on its gRPC server at the URL the other nodes know this node by.
pub struct RegistryNode {
    node_id: u64,
    raft: RegistryRaft,
    shared: SharedState,
    api: RegistryApiService,
    background: Mutex<Vec<JoinHandle<()>>>,
}

impl RegistryNode {
    /// Opens the data directory, starts the Raft member and, on the node
    /// with the lowest id of `peers` whose log is empty, initializes the
    /// cluster with `peers`. Only that one node does: a voter added later
    /// (scaling 3 to 5, where every pod is given the new peer list) must wait
    /// to be added by `add-learner`/`change-membership` instead of founding a
    /// cluster of its own; the other initial voters join when the first one
    /// calls its election. `on_expired` hears the users that went offline when this node,
    /// as leader, expires or deregisters gateways.
    pub async fn start(config: RegistryNodeConfig, on_expired: ExpiredCallback) -> anyhow::Result<RegistryNode> {
        let raft_config = Arc::new(config.raft_config()?);
        for (peer, address) in &config.peers {
            tonic::transport::Endpoint::from_shared(address.clone())
                .with_context(|| format!("registry peer {peer}: `{address}` is not a valid gRPC URL"))?;
        }
        let data_dir = config.data_dir.clone();
        let log_store = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("cannot create the registry data directory {}", data_dir.display()))?;
            SqliteLogStore::open(&data_dir.join("raft.db"))
                .with_context(|| format!("cannot open {}", data_dir.join("raft.db").display()))
        })
        .await??;
        let state_machine = RegistryStateMachine::open(config.data_dir.join("snapshots")).await?;
        let shared = state_machine.shared();
        let network = GrpcNetworkFactory {
            node_id: config.node_id,
            connect_timeout: config.election_timeout,
            request_timeout: Duration::from_millis(raft_config.install_snapshot_timeout),
            token: beseda_proto::ClusterToken::new(config.token.as_deref()).map_err(anyhow::Error::msg)?,
            source_address: config.peer_source_address,
        };
        let raft = Raft::new(config.node_id, raft_config, network, log_store, state_machine)
            .await
            .context("cannot start the registry's Raft member")?;

        // Asked of every node, founder or not: the answer comes from the Raft
        // core, so once it is here the core has loaded its log and snapshot
        // and its metrics (status) describe the recovered state.
        let initialized = raft.is_initialized().await?;
        let founder = config.peers.keys().next() == Some(&config.node_id);
        if founder && !initialized {
            let members: BTreeMap<u64, BasicNode> =
                config.peers.iter().map(|(id, address)| (*id, BasicNode::new(address))).collect();
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(error) => return Err(anyhow::anyhow!("cannot initialize the registry cluster: {error}")),
            }
        }

        let background = vec![
            tokio::spawn(publish_metrics(config.node_id, raft.clone(), shared.clone())),
            tokio::spawn(expire_gateways(raft.clone(), shared.clone(), config.gateway_lease, on_expired.clone())),
        ];
        let api = RegistryApiService {
            raft: raft.clone(),
            shared: shared.clone(),
            default_lease: config.gateway_lease,
            on_expired,
        };
        tracing::info!(node_id = config.node_id, data_dir = %config.data_dir.display(), "registry node started");
        Ok(RegistryNode { node_id: config.node_id, raft, shared, api, background: Mutex::new(background) })
    }

    /// The gRPC services of this node (`RegistryRaft` and `RegistryApi`), to
    /// add to the embedding process's tonic server.
    pub fn routes(&self) -> tonic::service::Routes {
        let raft_service = RegistryRaftServer::new(RaftRpcService { raft: self.raft.clone() })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        tonic::service::Routes::new(raft_service).add_service(RegistryApiServer::new(self.api.clone()))
    }

    /// This node's own view of the cluster (what `RegistryApi.Status` answers).
    pub async fn status(&self) -> ClusterStatus {
        local_status(&self.raft, &self.shared).await
    }

    /// The openraft member, for embedding code that waits on its metrics.
    pub fn raft(&self) -> &RegistryRaft {
        &self.raft
    }

    /// Stops the timers and the Raft member; the services from
    /// [`Self::routes`] answer UNAVAILABLE from then on. Idempotent.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        let background = std::mem::take(&mut *self.background.lock().unwrap_or_else(PoisonError::into_inner));
        for task in background {
            task.abort();
        }
        self.raft.shutdown().await.map_err(|error| anyhow::anyhow!("the registry's Raft member failed: {error}"))?;
        tracing::info!(node_id = self.node_id, "registry node stopped");
        Ok(())
    }
}

impl Drop for RegistryNode {
    fn drop(&mut self) {
        for task in self.background.get_mut().unwrap_or_else(PoisonError::into_inner).drain(..) {
            task.abort();
        }
    }
}

/// Publishes the Raft and registry gauges at start, then after changes of
/// openraft's metrics (a new role or term, appended, committed or applied
/// entries, heartbeat acknowledgements), coalesced to at most one
/// publication per [`METRICS_MIN_GAP`], and at least every
/// [`METRICS_REFRESH`]. Applying entries does no metrics work itself.
///
/// The gauges are looked up on each publication rather than kept: the
/// embedding process may install its metrics recorder after the node
/// started, and a handle taken before that would stay a no-op.
async fn publish_metrics(node_id: u64, raft: RegistryRaft, shared: SharedState) {
    let node = node_id.to_string();
    let gauge = |name: &'static str| metrics::gauge!(name, "node_id" => node.clone());
    let mut watched = raft.metrics();
    loop {
        let (term, last_log_index, last_applied, is_leader, quorum_ack_age) = {
            let metrics = watched.borrow_and_update();
            let is_leader = metrics.state == ServerState::Leader;
            // A leader cut off from its voters keeps believing it leads;
            // this age grows on it while a new leader is elected elsewhere.
            let quorum_ack_age = metrics.millis_since_quorum_ack.filter(|_| is_leader).unwrap_or(0);
            let last_applied = metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0);
            (metrics.current_term, metrics.last_log_index.unwrap_or(0), last_applied, is_leader, quorum_ack_age)
        };
        gauge("beseda_raft_term").set(term as f64);
        gauge("beseda_raft_last_log_index").set(last_log_index as f64);
        gauge("beseda_raft_last_applied_index").set(last_applied as f64);
        // openraft's metrics leave the commit index out; its state has it.
        if let Ok(committed) = raft.with_raft_state(|state| state.committed.map(|log_id| log_id.index)).await {
            gauge("beseda_raft_commit_index").set(committed.unwrap_or(0) as f64);
        }
        gauge("beseda_raft_leader_quorum_ack_age_seconds").set(quorum_ack_age as f64 / 1000.0);
        gauge("beseda_raft_is_leader").set(if is_leader { 1.0 } else { 0.0 });
        let (gateways, connections) = {
            let state = shared.read();
            (state.registry.gateway_count(), state.registry.connection_count())
        };
        gauge("beseda_registry_gateways").set(gateways as f64);
        gauge("beseda_registry_connections").set(connections as f64);

        tokio::time::sleep(METRICS_MIN_GAP).await;
        tokio::select! {
            changed = watched.changed() => {
                // The Raft member has stopped.
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(METRICS_REFRESH - METRICS_MIN_GAP) => {}
        }
    }
}

/// On the leader, every quarter lease: proposes `Expire` when some gateway's
/// lease has run out, and tells `on_expired` who went offline.
///
/// A new leader waits one full lease before it expires anything: during the
/// election gateways could not renew, and they get a lease's time to reach
/// the new leader before they are declared gone.
async fn expire_gateways(raft: RegistryRaft, shared: SharedState, lease: Duration, on_expired: ExpiredCallback) {
    let mut ticker = tokio::time::interval(lease / 4);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader_since: Option<Instant> = None;
    loop {
        ticker.tick().await;
        let leading = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            metrics.state == ServerState::Leader
        };
        if !leading {
            leader_since = None;
            continue;
        }
        if leader_since.get_or_insert_with(Instant::now).elapsed() < lease {
            continue;
        }
        let now_ms = unix_now_ms();
        if !shared.read().registry.has_expired_gateways(now_ms) {
            continue;
        }
        match raft.client_write(Command::Expire { now_ms }).await {
            Ok(written) => {
                if let CommandOutcome::Removed { gateways, went_offline } = written.data {
                    announce_removed(&on_expired, Removal::Expired, &gateways, went_offline);
                }
            }
            Err(error) => tracing::debug!(%error, "registry expiry not proposed"),
        }
    }
}
