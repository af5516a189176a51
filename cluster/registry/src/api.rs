//! `beseda.v1.RegistryApi` on a registry node: writes and linearizable reads
//! for gateways, status and membership changes for operators.
//!
//! A node that is not the leader refuses writes, reads and membership
//! changes with the leader's address in the metadata (see [`crate::wire`]);
//! it does not forward them. The callers ([`crate::RaftRegistryClient`] and
//! the admin helpers) follow the hint, and a refusal costs one round trip
//! only when the caller's idea of the leader is out of date.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use beseda_proto::v1 as wire;
use beseda_proto::v1::registry_api_server::RegistryApi;
use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use tonic::{Request, Response, Status};

use crate::admin::{ClusterMember, ClusterStatus, GatewayLease};
use crate::raft_types::RegistryRaft;
use crate::state::{Command, CommandOutcome};
use crate::state_machine::SharedState;
use crate::wire::{
    change_to_wire, connections_from_wire, delta_from_wire, not_leader, status_to_wire, user_changes_to_wire,
};
use crate::{PresenceChange, UserKey, unix_now_ms};

/// Told the users who went offline because the leader expired or
/// deregistered their gateway. Called on the leader only, once per command,
/// on the task that applied it: it must not block (spawn to publish).
pub type ExpiredCallback = Arc<dyn Fn(Vec<UserKey>) + Send + Sync>;

/// Why the leader removed gateways.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Removal {
    /// A gateway (or an operator for it) asked.
    Deregistered,
    /// Their leases ran out.
    Expired,
}

/// Logs the gateways the leader removed and tells `on_expired` who went
/// offline with them.
pub(crate) fn announce_removed(
    on_expired: &ExpiredCallback,
    removal: Removal,
    gateways: &[String],
    went_offline: Vec<UserKey>,
) {
    let users = went_offline.len();
    match removal {
        Removal::Deregistered => tracing::info!(?gateways, users, "registry gateway deregistered"),
        Removal::Expired => tracing::warn!(?gateways, users, "registry gateways expired: their leases ran out"),
    }
    if !went_offline.is_empty() {
        on_expired(went_offline);
    }
}

fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

fn leader_of(forward_leader: Option<u64>, forward_node: Option<BasicNode>) -> Option<(u64, String)> {
    forward_leader.zip(forward_node.map(|node| node.addr))
}

fn write_error(error: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Status {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            not_leader(leader_of(forward.leader_id, forward.leader_node))
        }
        // Transient: the previous change (often the learner just added)
        // commits within a heartbeat or two, so callers retry.
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(progress))) => {
            Status::unavailable(format!("another membership change is in progress, retry shortly: {progress}"))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(refused)) => {
            Status::invalid_argument(format!("the membership change was refused: {refused}"))
        }
        RaftError::Fatal(fatal) => Status::unavailable(format!("this registry node has stopped: {fatal}")),
    }
}

fn read_error(error: RaftError<u64, CheckIsLeaderError<u64, BasicNode>>) -> Status {
    match error {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)) => {
            not_leader(leader_of(forward.leader_id, forward.leader_node))
        }
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(quorum)) => {
            Status::unavailable(format!("the leader could not confirm its leadership with a quorum: {quorum}"))
        }
        RaftError::Fatal(fatal) => Status::unavailable(format!("this registry node has stopped: {fatal}")),
    }
}

/// This node's own view of the cluster.
pub(crate) async fn local_status(raft: &RegistryRaft, shared: &SharedState) -> ClusterStatus {
    let metrics = raft.metrics().borrow().clone();
    let commit_index = raft.with_raft_state(|state| state.committed.map(|log_id| log_id.index)).await.ok().flatten();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| ClusterMember { id: *id, address: node.addr.clone(), voter: voters.contains(id) })
        .collect();
    let leader_address =
        metrics.current_leader.and_then(|leader| membership.get_node(&leader)).map(|node| node.addr.clone());
    let now_ms = unix_now_ms() as i64;
    let state = shared.read();
    let gateways = state
        .registry
        .gateway_leases()
        .into_iter()
        .map(|(gateway, lease_expires_ms, connections)| GatewayLease {
            gateway,
            lease_left_ms: lease_expires_ms as i64 - now_ms,
            connections,
        })
        .collect();
    ClusterStatus {
        node_id: metrics.id,
        role: role_name(metrics.state).to_owned(),
        term: metrics.current_term,
        leader_id: metrics.current_leader,
        leader_address,
        last_log_index: metrics.last_log_index,
        commit_index,
        applied_index: metrics.last_applied.map(|log_id| log_id.index),
        snapshot_index: metrics.snapshot.map(|log_id| log_id.index),
        purged_index: metrics.purged.map(|log_id| log_id.index),
        members,
        joint_consensus: membership.get_joint_config().len() > 1,
        gateways,
        connection_count: state.registry.connection_count(),
    }
}

/// Serves `beseda.v1.RegistryApi` for one registry node.
#[derive(Clone)]
pub(crate) struct RegistryApiService {
    pub raft: RegistryRaft,
    pub shared: SharedState,
    /// The lease of a gateway that does not ask for one.
    pub default_lease: Duration,
    pub on_expired: ExpiredCallback,
}

fn required_gateway(gateway: String) -> Result<String, Status> {
    if gateway.is_empty() { Err(Status::invalid_argument("`gateway` must name the gateway node")) } else { Ok(gateway) }
}

impl RegistryApiService {
    fn lease_ms(&self, requested_ms: u64) -> u64 {
        if requested_ms == 0 { self.default_lease.as_millis() as u64 } else { requested_ms }
    }

    fn command_from_wire(&self, request: wire::RegistryApplyRequest) -> Result<Command, Status> {
        use wire::registry_apply_request::Command as Requested;
        match request.command {
            Some(Requested::Batch(batch)) => {
                let deltas = batch
                    .deltas
                    .into_iter()
                    .enumerate()
                    .map(|(position, delta)| delta_from_wire(delta, position))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Command::Batch {
                    gateway: required_gateway(batch.gateway)?,
                    session: batch.session,
                    sequence: batch.sequence,
                    now_ms: unix_now_ms(),
                    lease_ms: self.lease_ms(batch.lease_ms),
                    deltas,
                })
            }
            Some(Requested::Resync(resync)) => Ok(Command::Resync {
                gateway: required_gateway(resync.gateway)?,
                session: resync.session,
                sequence: resync.sequence,
                now_ms: unix_now_ms(),
                lease_ms: self.lease_ms(resync.lease_ms),
                connections: connections_from_wire(resync.connections)?,
            }),
            Some(Requested::Deregister(deregister)) => {
                Ok(Command::Deregister { gateway: required_gateway(deregister.gateway)? })
            }
            None => Err(Status::invalid_argument("`command` is missing: send a batch, a resync or a deregister")),
        }
    }
}

#[tonic::async_trait]
impl RegistryApi for RegistryApiService {
    async fn apply(
        &self,
        request: Request<wire::RegistryApplyRequest>,
    ) -> Result<Response<wire::RegistryApplyResponse>, Status> {
        use wire::registry_apply_response::Outcome;
        let command = self.command_from_wire(request.into_inner())?;
        // Heartbeats (empty batches) would drown the distribution.
        let batch_size = match &command {
            Command::Batch { deltas, .. } if !deltas.is_empty() => Some(deltas.len()),
            _ => None,
        };
        let written = self.raft.client_write(command).await.map_err(write_error)?;
        if let Some(batch_size) = batch_size {
            metrics::histogram!("beseda_registry_batch_size").record(batch_size as f64);
        }
        let log_index = written.log_id.index;
        let outcome = match written.data {
            CommandOutcome::Deltas(changes) => Outcome::Deltas(wire::RegistryDeltaResults {
                changes: changes.into_iter().map(|change| change_to_wire(change) as i32).collect(),
            }),
            CommandOutcome::Resynced(changes) => {
                Outcome::Users(user_changes_to_wire(changes.iter().map(|(user, change)| (user, *change))))
            }
            CommandOutcome::UnknownGateway => Outcome::UnknownGateway(wire::RegistryUnknownGateway {}),
            CommandOutcome::Removed { gateways, went_offline } => {
                // The answer keeps the documented contract (who went offline),
                // though the in-tree client only checks that it succeeded.
                let changes = user_changes_to_wire(went_offline.iter().map(|user| (user, PresenceChange::WentOffline)));
                announce_removed(&self.on_expired, Removal::Deregistered, &gateways, went_offline);
                Outcome::Users(changes)
            }
            CommandOutcome::Stale => {
                return Err(Status::aborted(
                    "the command is older than the gateway's last applied command; nothing was applied \
                     (start a new session and resync)",
                ));
            }
            CommandOutcome::NoCommand => {
                return Err(Status::internal("the registry applied the command as an entry without a command"));
            }
        };
        Ok(Response::new(wire::RegistryApplyResponse { log_index, outcome: Some(outcome) }))
    }

    /// Linearizable: the leader confirms with a quorum that it still leads
    /// (read index) and waits until it has applied that far before it reads.
    async fn query(
        &self,
        request: Request<wire::RegistryQueryRequest>,
    ) -> Result<Response<wire::RegistryQueryResponse>, Status> {
        use wire::registry_query_request::Query;
        use wire::registry_query_response::Answer;
        let query = request.into_inner().query.ok_or_else(|| {
            Status::invalid_argument("`query` is missing: ask is_online, online_of, nodes_of or connection_count")
        })?;
        let read_log_id = self.raft.ensure_linearizable().await.map_err(read_error)?;
        let state = self.shared.read();
        let answer = match query {
            Query::IsOnline(user) => Answer::Online(state.registry.is_online(&UserKey::from(user))),
            Query::OnlineOf(list) => Answer::OnlineOf(wire::RegistryOnlineList {
                online: list.users.into_iter().map(|user| state.registry.is_online(&UserKey::from(user))).collect(),
            }),
            Query::NodesOf(user) => {
                Answer::Nodes(wire::RegistryNodeList { nodes: state.registry.nodes_of(&UserKey::from(user)) })
            }
            Query::ConnectionCount(_) => Answer::ConnectionCount(state.registry.connection_count()),
        };
        Ok(Response::new(wire::RegistryQueryResponse {
            read_index: read_log_id.map(|log_id| log_id.index).unwrap_or(0),
            answer: Some(answer),
        }))
    }

    async fn status(
        &self,
        _request: Request<wire::RegistryStatusRequest>,
    ) -> Result<Response<wire::RegistryClusterStatus>, Status> {
        Ok(Response::new(status_to_wire(local_status(&self.raft, &self.shared).await)))
    }

    async fn add_learner(
        &self,
        request: Request<wire::RegistryAddLearnerRequest>,
    ) -> Result<Response<wire::RegistryClusterStatus>, Status> {
        let request = request.into_inner();
        tonic::transport::Endpoint::from_shared(request.address.clone()).map_err(|error| {
            Status::invalid_argument(format!("`{}` is not a valid gRPC URL for the learner: {error}", request.address))
        })?;
        self.raft.add_learner(request.id, BasicNode::new(&request.address), true).await.map_err(write_error)?;
        Ok(Response::new(status_to_wire(local_status(&self.raft, &self.shared).await)))
    }

    async fn change_membership(
        &self,
        request: Request<wire::RegistryChangeMembershipRequest>,
    ) -> Result<Response<wire::RegistryClusterStatus>, Status> {
        let voters: BTreeSet<u64> = request.into_inner().voters.into_iter().collect();
        if voters.is_empty() {
            return Err(Status::invalid_argument("`voters` must name at least one node"));
        }
        self.raft.change_membership(voters, false).await.map_err(write_error)?;
        Ok(Response::new(status_to_wire(local_status(&self.raft, &self.shared).await)))
    }
}
