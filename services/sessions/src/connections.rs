//! WebSocket connections per user on this gateway, for the per-user limit.
//! One user's connections each hold a queue, subscriptions and replays, so
//! without a bound one token could open enough of them to exhaust the
//! gateway's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

type UserId = (String, String);

/// Shared by every connection of one gateway; cheap to clone.
#[derive(Clone, Default)]
pub struct UserConnections {
    counts: Arc<Mutex<HashMap<UserId, usize>>>,
}

/// One counted connection; dropping it gives the place back.
pub struct Slot {
    counts: Arc<Mutex<HashMap<UserId, usize>>>,
    user: UserId,
}

impl UserConnections {
    /// Counts a new connection of the user, unless they have `max` already.
    pub fn acquire(&self, application_id: &str, user_id: &str, max: usize) -> Option<Slot> {
        let user = (application_id.to_owned(), user_id.to_owned());
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(user.clone()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot { counts: self.counts.clone(), user })
    }

    /// The user's connections counted now.
    pub fn count(&self, application_id: &str, user_id: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(&(application_id.to_owned(), user_id.to_owned())).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_at_most_max_places_and_dropping_one_frees_it() {
        let connections = UserConnections::default();
        let first = connections.acquire("app", "alice", 2).unwrap();
        let _second = connections.acquire("app", "alice", 2).unwrap();
        assert!(connections.acquire("app", "alice", 2).is_none());
        assert!(connections.acquire("app", "bob", 2).is_some(), "the limit is per user");
        assert!(connections.acquire("other", "alice", 2).is_some(), "and per application");
        drop(first);
        assert_eq!(connections.count("app", "alice"), 1);
        assert!(connections.acquire("app", "alice", 2).is_some());
    }
}
