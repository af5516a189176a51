//! The session registry answers "who is connected where". On one node it is
//! a concurrent map ([`LocalRegistry`]); in a cluster it is an
//! openraft-replicated state machine behind the same trait.
//!
//! The cluster pieces:
//! - [`RegistryNode`]: a registry voter (or learner) — the Raft member, its
//!   SQLite log and JSON snapshots under its data directory, and the
//!   `beseda.v1.RegistryRaft`/`RegistryApi` gRPC services the embedding
//!   process serves ([`RegistryNode::routes`]);
//! - [`RaftRegistryClient`]: the gateway's [`Registry`], batching writes to
//!   the leader and reading linearizably;
//! - [`admin`]: status and membership changes for `beseda ctl registry`;
//! - [`state`]: the deterministic state machine every replica applies.

#![forbid(unsafe_code)]

pub mod admin;
mod api;
mod client;
mod log_store;
pub mod metric_families;
mod network;
mod node;
mod raft_types;
mod router;
pub mod state;
mod state_machine;
#[cfg(test)]
mod storage_suite;
mod wire;

pub use admin::{ClusterMember, ClusterStatus, GatewayLease};
pub use api::ExpiredCallback;
pub use client::{ClientConfig, RaftRegistryClient};
pub use node::{RegistryNode, RegistryNodeConfig};
pub use raft_types::{RegistryRaft, RegistryTypeConfig};
pub use wire::{LEADER_ADDRESS_METADATA, LEADER_ID_METADATA};

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

/// A user of one application. The same type is stored in the Raft log and
/// in snapshots (as `{"application_id": …, "user_id": …}`); ordered so that
/// the replicated maps keyed by it iterate alike on every replica.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserKey {
    pub application_id: String,
    pub user_id: String,
}

/// A change of a user's presence caused by a connect or disconnect (also
/// stored in the Raft log, as the variant's name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PresenceChange {
    CameOnline,
    WentOffline,
    Unchanged,
}

/// The registry could not answer: in a cluster, no registry voter was
/// reachable or no leader was elected within the client's deadline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryUnavailable(pub String);

impl std::fmt::Display for RegistryUnavailable {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "the session registry is unavailable: {}", self.0)
    }
}

impl std::error::Error for RegistryUnavailable {}

pub type RegistryResult<T> = Result<T, RegistryUnavailable>;

/// Milliseconds since the Unix epoch by this host's clock.
pub(crate) fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Records a connection of `user` on `node_id`.
    async fn connected(&self, user: &UserKey, node_id: &str) -> RegistryResult<PresenceChange>;
    /// Forgets one connection of `user` on `node_id`.
    async fn disconnected(&self, user: &UserKey, node_id: &str) -> RegistryResult<PresenceChange>;
    async fn is_online(&self, user: &UserKey) -> RegistryResult<bool>;
    /// Whether each of `users` is online, in the same order: one question
    /// for many users (in a cluster, one linearizable read for all of them).
    async fn online_of(&self, users: &[UserKey]) -> RegistryResult<Vec<bool>>;
    /// Nodes where the user has at least one connection.
    async fn nodes_of(&self, user: &UserKey) -> RegistryResult<Vec<String>>;
    /// Connections registered in all.
    async fn connection_count(&self) -> RegistryResult<usize>;
    /// The gateway `node_id` is stopping: forget all its connections at once
    /// (graceful shutdown deregisters instead of waiting for the lease).
    async fn node_stopping(&self, node_id: &str) -> RegistryResult<()>;
    /// What kind of registry this is, for /rs/health ("single-node", "raft").
    fn kind(&self) -> &'static str;
    /// How many voters the registry has (1 for the single-node registry), as
    /// the registry itself answers it: /rs/health reports it in the original
    /// server's `hazelcast.members`.
    async fn voter_count(&self) -> RegistryResult<usize>;
}

/// The single-node registry: connection counts per user and node.
#[derive(Default)]
pub struct LocalRegistry {
    connections: DashMap<UserKey, Vec<(String, usize)>>,
}

impl LocalRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn online(&self, user: &UserKey) -> bool {
        self.connections.get(user).is_some_and(|nodes| !nodes.is_empty())
    }
}

#[async_trait]
impl Registry for LocalRegistry {
    async fn voter_count(&self) -> RegistryResult<usize> {
        Ok(1)
    }

    async fn connected(&self, user: &UserKey, node_id: &str) -> RegistryResult<PresenceChange> {
        let mut nodes = self.connections.entry(user.clone()).or_default();
        let was_online = !nodes.is_empty();
        match nodes.iter_mut().find(|(node, _)| node == node_id) {
            Some((_, count)) => *count += 1,
            None => nodes.push((node_id.to_owned(), 1)),
        }
        Ok(if was_online { PresenceChange::Unchanged } else { PresenceChange::CameOnline })
    }

    async fn disconnected(&self, user: &UserKey, node_id: &str) -> RegistryResult<PresenceChange> {
        let Some(mut nodes) = self.connections.get_mut(user) else {
            return Ok(PresenceChange::Unchanged);
        };
        if let Some(position) = nodes.iter().position(|(node, _)| node == node_id) {
            nodes[position].1 -= 1;
            if nodes[position].1 == 0 {
                nodes.remove(position);
            }
        }
        let now_offline = nodes.is_empty();
        drop(nodes);
        if now_offline {
            self.connections.remove_if(user, |_, nodes| nodes.is_empty());
            Ok(PresenceChange::WentOffline)
        } else {
            Ok(PresenceChange::Unchanged)
        }
    }

    async fn is_online(&self, user: &UserKey) -> RegistryResult<bool> {
        Ok(self.online(user))
    }

    async fn online_of(&self, users: &[UserKey]) -> RegistryResult<Vec<bool>> {
        Ok(users.iter().map(|user| self.online(user)).collect())
    }

    async fn nodes_of(&self, user: &UserKey) -> RegistryResult<Vec<String>> {
        Ok(self
            .connections
            .get(user)
            .map(|nodes| nodes.iter().map(|(node, _)| node.clone()).collect())
            .unwrap_or_default())
    }

    async fn connection_count(&self) -> RegistryResult<usize> {
        Ok(self.connections.iter().map(|entry| entry.value().iter().map(|(_, count)| count).sum::<usize>()).sum())
    }

    async fn node_stopping(&self, node_id: &str) -> RegistryResult<()> {
        self.connections.retain(|_, nodes| {
            nodes.retain(|(node, _)| node != node_id);
            !nodes.is_empty()
        });
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "single-node"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn presence_follows_the_first_and_last_connection() {
        let registry = LocalRegistry::new();
        let alice = UserKey { application_id: "app".into(), user_id: "alice".into() };
        assert_eq!(registry.connected(&alice, "node-1").await.unwrap(), PresenceChange::CameOnline);
        assert_eq!(registry.connected(&alice, "node-1").await.unwrap(), PresenceChange::Unchanged);
        assert_eq!(registry.connected(&alice, "node-2").await.unwrap(), PresenceChange::Unchanged);
        assert_eq!(registry.connection_count().await.unwrap(), 3);
        let mut nodes = registry.nodes_of(&alice).await.unwrap();
        nodes.sort();
        assert_eq!(nodes, vec!["node-1", "node-2"]);
        assert_eq!(registry.disconnected(&alice, "node-1").await.unwrap(), PresenceChange::Unchanged);
        assert_eq!(registry.disconnected(&alice, "node-2").await.unwrap(), PresenceChange::Unchanged);
        assert!(registry.is_online(&alice).await.unwrap());
        assert_eq!(registry.disconnected(&alice, "node-1").await.unwrap(), PresenceChange::WentOffline);
        assert!(!registry.is_online(&alice).await.unwrap());
        assert_eq!(registry.connection_count().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn users_of_different_applications_are_distinct() {
        let registry = LocalRegistry::new();
        let in_first = UserKey { application_id: "app-1".into(), user_id: "u".into() };
        let in_second = UserKey { application_id: "app-2".into(), user_id: "u".into() };
        registry.connected(&in_first, "node").await.unwrap();
        assert!(!registry.is_online(&in_second).await.unwrap());
    }

    #[tokio::test]
    async fn online_of_answers_like_is_online_for_each_user_in_order() {
        let registry = LocalRegistry::new();
        let users: Vec<UserKey> = ["alice", "bob", "carol", "alice"]
            .into_iter()
            .map(|name| UserKey { application_id: "app".into(), user_id: name.into() })
            .collect();
        registry.connected(&users[0], "node-1").await.unwrap();
        registry.connected(&users[2], "node-2").await.unwrap();
        let mut one_by_one = Vec::new();
        for user in &users {
            one_by_one.push(registry.is_online(user).await.unwrap());
        }
        assert_eq!(registry.online_of(&users).await.unwrap(), one_by_one);
        assert_eq!(one_by_one, vec![true, false, true, true]);
        assert_eq!(registry.online_of(&[]).await.unwrap(), Vec::<bool>::new());
    }

    #[tokio::test]
    async fn a_stopping_node_takes_its_connections_with_it() {
        let registry = LocalRegistry::new();
        let alice = UserKey { application_id: "app".into(), user_id: "alice".into() };
        let bob = UserKey { application_id: "app".into(), user_id: "bob".into() };
        registry.connected(&alice, "node-1").await.unwrap();
        registry.connected(&alice, "node-2").await.unwrap();
        registry.connected(&bob, "node-1").await.unwrap();
        registry.node_stopping("node-1").await.unwrap();
        assert_eq!(registry.nodes_of(&alice).await.unwrap(), vec!["node-2"]);
        assert!(!registry.is_online(&bob).await.unwrap());
        assert_eq!(registry.connection_count().await.unwrap(), 1);
    }
}
