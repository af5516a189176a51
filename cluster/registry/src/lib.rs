//! The session registry answers "who is connected where". On one node it is
//! a concurrent map; the cluster issue replaces it with an openraft-replicated
//! state machine behind the same trait.

#![forbid(unsafe_code)]

use async_trait::async_trait;
use dashmap::DashMap;

/// A user of one application.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserKey {
    pub application_id: String,
    pub user_id: String,
}

/// A change of a user's presence caused by a connect or disconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceChange {
    CameOnline,
    WentOffline,
    Unchanged,
}

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Records a connection of `user` on `node_id`.
    async fn connected(&self, user: &UserKey, node_id: &str) -> PresenceChange;
    /// Forgets one connection of `user` on `node_id`.
    async fn disconnected(&self, user: &UserKey, node_id: &str) -> PresenceChange;
    async fn is_online(&self, user: &UserKey) -> bool;
    /// Nodes where the user has at least one connection.
    async fn nodes_of(&self, user: &UserKey) -> Vec<String>;
    /// Connections registered in all.
    async fn connection_count(&self) -> usize;
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
}

#[async_trait]
impl Registry for LocalRegistry {
    async fn connected(&self, user: &UserKey, node_id: &str) -> PresenceChange {
        let mut nodes = self.connections.entry(user.clone()).or_default();
        let was_online = !nodes.is_empty();
        match nodes.iter_mut().find(|(node, _)| node == node_id) {
            Some((_, count)) => *count += 1,
            None => nodes.push((node_id.to_owned(), 1)),
        }
        if was_online { PresenceChange::Unchanged } else { PresenceChange::CameOnline }
    }

    async fn disconnected(&self, user: &UserKey, node_id: &str) -> PresenceChange {
        let Some(mut nodes) = self.connections.get_mut(user) else {
            return PresenceChange::Unchanged;
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
            PresenceChange::WentOffline
        } else {
            PresenceChange::Unchanged
        }
    }

    async fn is_online(&self, user: &UserKey) -> bool {
        self.connections.get(user).is_some_and(|nodes| !nodes.is_empty())
    }

    async fn nodes_of(&self, user: &UserKey) -> Vec<String> {
        self.connections.get(user).map(|nodes| nodes.iter().map(|(node, _)| node.clone()).collect()).unwrap_or_default()
    }

    async fn connection_count(&self) -> usize {
        self.connections.iter().map(|entry| entry.value().iter().map(|(_, count)| count).sum::<usize>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn presence_follows_the_first_and_last_connection() {
        let registry = LocalRegistry::new();
        let alice = UserKey { application_id: "app".into(), user_id: "alice".into() };
        assert_eq!(registry.connected(&alice, "node-1").await, PresenceChange::CameOnline);
        assert_eq!(registry.connected(&alice, "node-1").await, PresenceChange::Unchanged);
        assert_eq!(registry.connected(&alice, "node-2").await, PresenceChange::Unchanged);
        assert_eq!(registry.connection_count().await, 3);
        let mut nodes = registry.nodes_of(&alice).await;
        nodes.sort();
        assert_eq!(nodes, vec!["node-1", "node-2"]);
        assert_eq!(registry.disconnected(&alice, "node-1").await, PresenceChange::Unchanged);
        assert_eq!(registry.disconnected(&alice, "node-2").await, PresenceChange::Unchanged);
        assert!(registry.is_online(&alice).await);
        assert_eq!(registry.disconnected(&alice, "node-1").await, PresenceChange::WentOffline);
        assert!(!registry.is_online(&alice).await);
        assert_eq!(registry.connection_count().await, 0);
    }

    #[tokio::test]
    async fn users_of_different_applications_are_distinct() {
        let registry = LocalRegistry::new();
        let in_first = UserKey { application_id: "app-1".into(), user_id: "u".into() };
        let in_second = UserKey { application_id: "app-2".into(), user_id: "u".into() };
        registry.connected(&in_first, "node").await;
        assert!(!registry.is_online(&in_second).await);
    }
}
