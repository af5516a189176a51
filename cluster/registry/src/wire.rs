//! Conversions between `beseda.v1` registry messages and the registry's own
//! types, and the leader hint a follower attaches to a refusal.

use beseda_proto::v1 as wire;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::admin::{ClusterMember, ClusterStatus, GatewayLease};
use crate::state::Delta;
use crate::{PresenceChange, UserKey};

/// Metadata of a "not the leader" refusal: the leader's node id.
pub const LEADER_ID_METADATA: &str = "beseda-registry-leader-id";
/// Metadata of a "not the leader" refusal: the leader's gRPC URL.
pub const LEADER_ADDRESS_METADATA: &str = "beseda-registry-leader-address";

/// The refusal of a node that is not the leader: FAILED_PRECONDITION naming
/// the leader when one is known, UNAVAILABLE while an election runs.
pub(crate) fn not_leader(leader: Option<(u64, String)>) -> Status {
    let Some((leader_id, leader_address)) = leader else {
        return Status::unavailable(
            "this registry node is not the leader and knows no leader yet (an election is running)",
        );
    };
    let mut status = Status::failed_precondition(format!(
        "this registry node is not the leader; the leader is node {leader_id} at {leader_address}"
    ));
    status.metadata_mut().insert(LEADER_ID_METADATA, MetadataValue::from(leader_id));
    if let Ok(address) = MetadataValue::try_from(leader_address.as_str()) {
        status.metadata_mut().insert(LEADER_ADDRESS_METADATA, address);
    }
    status
}

/// What a caller should make of a failed registry call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not the leader; retry on the leader at this address.
    NotLeader(String),
    /// No leader known, node unreachable, timed out or stopping: retry
    /// elsewhere or later.
    Retry,
    /// The request itself was refused; retrying changes nothing.
    Final,
}

pub(crate) fn classify(status: &Status) -> Refusal {
    match status.code() {
        Code::FailedPrecondition => status
            .metadata()
            .get(LEADER_ADDRESS_METADATA)
            .and_then(|address| address.to_str().ok())
            .map(|address| Refusal::NotLeader(address.to_owned()))
            .unwrap_or(Refusal::Retry),
        // Transport failures surface as these too: a connection reset is
        // UNKNOWN, and an HTTP/2 GOAWAY racing a request (a node shutting
        // down) is INTERNAL. A retry is always safe: commands are
        // deduplicated by session and sequence.
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal
        | Code::ResourceExhausted => Refusal::Retry,
        _ => Refusal::Final,
    }
}

pub(crate) fn user_to_wire(user: &UserKey) -> wire::RegistryUserKey {
    wire::RegistryUserKey { application_id: user.application_id.clone(), user_id: user.user_id.clone() }
}

impl From<wire::RegistryUserKey> for UserKey {
    fn from(user: wire::RegistryUserKey) -> Self {
        UserKey { application_id: user.application_id, user_id: user.user_id }
    }
}

/// An optional message field that must be set.
pub(crate) fn user_from_wire(user: Option<wire::RegistryUserKey>, field: &str) -> Result<UserKey, Status> {
    user.map(UserKey::from).ok_or_else(|| Status::invalid_argument(format!("`{field}` is missing")))
}

pub(crate) fn delta_to_wire(delta: &Delta) -> wire::RegistryDelta {
    let (user, kind) = match delta {
        Delta::Connected(user) => (user, wire::RegistryDeltaKind::Connected),
        Delta::Disconnected(user) => (user, wire::RegistryDeltaKind::Disconnected),
    };
    wire::RegistryDelta { user: Some(user_to_wire(user)), kind: kind as i32 }
}

pub(crate) fn delta_from_wire(delta: wire::RegistryDelta, position: usize) -> Result<Delta, Status> {
    let user = user_from_wire(delta.user, &format!("deltas[{position}].user"))?;
    match wire::RegistryDeltaKind::try_from(delta.kind) {
        Ok(wire::RegistryDeltaKind::Connected) => Ok(Delta::Connected(user)),
        Ok(wire::RegistryDeltaKind::Disconnected) => Ok(Delta::Disconnected(user)),
        _ => Err(Status::invalid_argument(format!(
            "deltas[{position}].kind must be CONNECTED or DISCONNECTED, not {}",
            delta.kind
        ))),
    }
}

pub(crate) fn connections_to_wire<'a>(
    connections: impl IntoIterator<Item = (&'a UserKey, &'a u32)>,
) -> Vec<wire::RegistryConnectionCount> {
    connections
        .into_iter()
        .map(|(user, count)| wire::RegistryConnectionCount { user: Some(user_to_wire(user)), count: *count })
        .collect()
}

pub(crate) fn connections_from_wire(
    connections: Vec<wire::RegistryConnectionCount>,
) -> Result<Vec<(UserKey, u32)>, Status> {
    connections
        .into_iter()
        .enumerate()
        .map(|(position, entry)| {
            Ok((user_from_wire(entry.user, &format!("connections[{position}].user"))?, entry.count))
        })
        .collect()
}

pub(crate) fn change_to_wire(change: PresenceChange) -> wire::RegistryPresenceChange {
    match change {
        PresenceChange::CameOnline => wire::RegistryPresenceChange::CameOnline,
        PresenceChange::WentOffline => wire::RegistryPresenceChange::WentOffline,
        PresenceChange::Unchanged => wire::RegistryPresenceChange::Unchanged,
    }
}

/// Unknown values (a newer server) read as "unchanged": presence events are
/// advisory, and the answer is still a successful write.
pub(crate) fn change_from_wire(change: i32) -> PresenceChange {
    match wire::RegistryPresenceChange::try_from(change) {
        Ok(wire::RegistryPresenceChange::CameOnline) => PresenceChange::CameOnline,
        Ok(wire::RegistryPresenceChange::WentOffline) => PresenceChange::WentOffline,
        _ => PresenceChange::Unchanged,
    }
}

pub(crate) fn user_changes_to_wire<'a>(
    changes: impl IntoIterator<Item = (&'a UserKey, PresenceChange)>,
) -> wire::RegistryUserChanges {
    wire::RegistryUserChanges {
        changes: changes
            .into_iter()
            .map(|(user, change)| wire::RegistryUserPresenceChange {
                user: Some(user_to_wire(user)),
                change: change_to_wire(change) as i32,
            })
            .collect(),
    }
}

pub(crate) fn user_changes_from_wire(
    changes: wire::RegistryUserChanges,
) -> Result<Vec<(UserKey, PresenceChange)>, Status> {
    changes
        .changes
        .into_iter()
        .enumerate()
        .map(|(position, entry)| {
            Ok((user_from_wire(entry.user, &format!("changes[{position}].user"))?, change_from_wire(entry.change)))
        })
        .collect()
}

pub(crate) fn status_to_wire(status: ClusterStatus) -> wire::RegistryClusterStatus {
    wire::RegistryClusterStatus {
        node_id: status.node_id,
        role: status.role,
        term: status.term,
        leader_id: status.leader_id,
        leader_address: status.leader_address.unwrap_or_default(),
        last_log_index: status.last_log_index,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        snapshot_index: status.snapshot_index,
        purged_index: status.purged_index,
        members: status
            .members
            .into_iter()
            .map(|member| wire::RegistryMember { id: member.id, address: member.address, voter: member.voter })
            .collect(),
        joint_consensus: status.joint_consensus,
        gateways: status
            .gateways
            .into_iter()
            .map(|lease| wire::RegistryGatewayLease {
                gateway: lease.gateway,
                lease_left_ms: lease.lease_left_ms,
                connections: lease.connections,
            })
            .collect(),
        connection_count: status.connection_count,
    }
}

pub(crate) fn status_from_wire(status: wire::RegistryClusterStatus) -> ClusterStatus {
    ClusterStatus {
        node_id: status.node_id,
        role: status.role,
        term: status.term,
        leader_id: status.leader_id,
        leader_address: Some(status.leader_address).filter(|address| !address.is_empty()),
        last_log_index: status.last_log_index,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        snapshot_index: status.snapshot_index,
        purged_index: status.purged_index,
        members: status
            .members
            .into_iter()
            .map(|member| ClusterMember { id: member.id, address: member.address, voter: member.voter })
            .collect(),
        joint_consensus: status.joint_consensus,
        gateways: status
            .gateways
            .into_iter()
            .map(|lease| GatewayLease {
                gateway: lease.gateway,
                lease_left_ms: lease.lease_left_ms,
                connections: lease.connections,
            })
            .collect(),
        connection_count: status.connection_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_leader_and_is_classified_as_such() {
        let status = not_leader(Some((2, "http://127.0.0.1:9302".into())));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(classify(&status), Refusal::NotLeader("http://127.0.0.1:9302".into()));
        assert_eq!(classify(&not_leader(None)), Refusal::Retry);
        assert_eq!(classify(&Status::invalid_argument("bad")), Refusal::Final);
    }

    #[test]
    fn a_delta_without_kind_is_refused_with_its_position() {
        let delta = wire::RegistryDelta {
            user: Some(wire::RegistryUserKey { application_id: "a".into(), user_id: "u".into() }),
            kind: 0,
        };
        let error = delta_from_wire(delta, 3).unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(error.message().contains("deltas[3].kind"), "{}", error.message());
        let missing_user = wire::RegistryDelta { user: None, kind: 1 };
        assert!(delta_from_wire(missing_user, 0).unwrap_err().message().contains("deltas[0].user"));
    }
}
