//! Operator helpers behind `beseda ctl registry …`: cluster status and
//! membership changes, each sent to the leader (followers' hints followed).

use std::future::Future;
use std::time::Duration;

use beseda_proto::v1 as wire;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::{Response, Status};

use crate::router::{ApiClient, LeaderRouter};
use crate::wire::status_from_wire;

/// How long an operator command may take in all. Adding a learner waits
/// until it has caught up with the leader, which can take a while.
const ADMIN_DEADLINE: Duration = Duration::from_secs(120);
/// How long one status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// A registry node's view of the cluster; prints as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: u64,
    /// "leader", "follower", "candidate", "learner" or "shutdown".
    pub role: String,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub leader_address: Option<String>,
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub members: Vec<ClusterMember>,
    /// True while a membership change is between its joint and final step.
    pub joint_consensus: bool,
    pub gateways: Vec<GatewayLease>,
    pub connection_count: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMember {
    pub id: u64,
    pub address: String,
    /// False for a learner.
    pub voter: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayLease {
    pub gateway: String,
    /// Milliseconds until the lease runs out by the answering node's clock;
    /// negative once it has run out and the leader has not expired it yet.
    pub lease_left_ms: i64,
    pub connections: u64,
}

/// Calls `attempt` through `endpoint`, following leader hints, until it is
/// answered or refused for good or `timeout` has passed.
async fn call_routed<T, F, Fut>(endpoint: &str, token: Option<&str>, timeout: Duration, attempt: F) -> anyhow::Result<T>
where
    F: FnMut(ApiClient) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let router = LeaderRouter::new(vec![endpoint.to_owned()], timeout, token)?;
    Ok(router.call(Some(Instant::now() + timeout), attempt).await?)
}

/// The status of the node at `endpoint` itself.
async fn status_of(endpoint: &str, token: Option<&str>) -> anyhow::Result<ClusterStatus> {
    let status = call_routed(endpoint, token, STATUS_TIMEOUT, |mut client| async move {
        client.status(wire::RegistryStatusRequest {}).await
    })
    .await?;
    Ok(status_from_wire(status))
}

/// The leader's status, asked through `endpoint`: any node names the
/// leader. When the leader cannot be reached, the status of `endpoint`
/// itself is returned (its `role` and `leader_id` show what it knows).
/// `token` is the cluster token, when the cluster has one.
pub async fn status(endpoint: &str, token: Option<&str>) -> anyhow::Result<ClusterStatus> {
    let local = status_of(endpoint, token).await?;
    if local.role == "leader" {
        return Ok(local);
    }
    let Some(leader_address) = local.leader_address.clone() else {
        return Ok(local);
    };
    match status_of(&leader_address, token).await {
        Ok(leader) => Ok(leader),
        Err(error) => {
            tracing::warn!(%error, leader = %leader_address, "registry leader unreachable; showing {endpoint}'s own status");
            Ok(local)
        }
    }
}

/// Adds node `id` at `address` (its gRPC URL) as a learner and returns once
/// it has caught up; then it can be made a voter with [`change_membership`].
pub async fn add_learner(endpoint: &str, token: Option<&str>, id: u64, address: &str) -> anyhow::Result<ClusterStatus> {
    let request = wire::RegistryAddLearnerRequest { id, address: address.to_owned() };
    let status = call_routed(endpoint, token, ADMIN_DEADLINE, |mut client| {
        let request = request.clone();
        async move { client.add_learner(request).await }
    })
    .await?;
    Ok(status_from_wire(status))
}

/// Makes exactly `voters` the voting members (each must be a member
/// already, e.g. a caught-up learner); removed voters leave the cluster.
pub async fn change_membership(endpoint: &str, token: Option<&str>, voters: Vec<u64>) -> anyhow::Result<ClusterStatus> {
    let request = wire::RegistryChangeMembershipRequest { voters };
    let status = call_routed(endpoint, token, ADMIN_DEADLINE, |mut client| {
        let request = request.clone();
        async move { client.change_membership(request).await }
    })
    .await?;
    Ok(status_from_wire(status))
}
