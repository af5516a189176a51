//! The replicated registry state and the commands that change it.
//!
//! Everything here is deterministic: a command's effect depends only on the
//! state and the command itself (timestamps travel inside the command, stamped
//! by the leader that proposed it), so every replica that applies the same log
//! ends up in the same state and computes the same answers. Maps are
//! `BTreeMap`s so that iteration order, and with it every answer and every
//! snapshot, is the same on every replica.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{PresenceChange, UserKey};

/// One connection opened or closed on a gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delta {
    Connected(UserKey),
    Disconnected(UserKey),
}

/// A command carried by one Raft log entry.
///
/// `session` identifies one run of a gateway process and `sequence` counts
/// its commands, so that a command retried after a lost answer is answered
/// from memory instead of being applied twice (Raft itself gives
/// at-least-once: a leader may commit an entry and die before answering).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Connection changes of one gateway, applied in order; renews the
    /// gateway's lease to `now_ms + lease_ms`. An empty batch is a heartbeat.
    Batch { gateway: String, session: u64, sequence: u64, now_ms: u64, lease_ms: u64, deltas: Vec<Delta> },
    /// Replaces everything known about the gateway with these counts and
    /// starts the session: sent when a gateway starts, and when it learns
    /// that the registry forgot it (expired after a partition, or wiped).
    Resync {
        gateway: String,
        session: u64,
        sequence: u64,
        now_ms: u64,
        lease_ms: u64,
        connections: Vec<(UserKey, u32)>,
    },
    /// Graceful shutdown of a gateway: forget its connections now.
    Deregister { gateway: String },
    /// Forget every gateway whose lease ran out by `now_ms` (proposed by the
    /// leader on a timer).
    Expire { now_ms: u64 },
}

/// What applying one log entry answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    /// A batch: one change per delta, in the batch's order.
    Deltas(Vec<PresenceChange>),
    /// A resync: the users whose presence the resync changed.
    Resynced(Vec<(UserKey, PresenceChange)>),
    /// A batch of a gateway session the registry does not know: nothing was
    /// applied; the gateway must resync, then send the batch again.
    UnknownGateway,
    /// A command older than the gateway's last applied one (a delayed
    /// duplicate nobody waits for): nothing was applied.
    Stale,
    /// A deregistration or expiry: the gateways removed and the users that
    /// went offline with them.
    Removed { gateways: Vec<String>, went_offline: Vec<UserKey> },
    /// A blank or membership entry: no command to apply.
    NoCommand,
}

/// What the registry knows about one gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRecord {
    pub session: u64,
    pub last_sequence: u64,
    /// Milliseconds since the Unix epoch, by the clock of the leader that
    /// proposed the gateway's last command.
    pub lease_expires_ms: u64,
    /// Connection counts per user on this gateway (never zero).
    #[serde(with = "user_counts")]
    pub connections: BTreeMap<UserKey, u32>,
    /// The answer to `last_sequence`, repeated if that command is retried.
    pub last_outcome: CommandOutcome,
}

/// JSON object keys must be strings, so the per-user counts are stored as a
/// list of `[user, count]` pairs.
mod user_counts {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::UserKey;

    pub fn serialize<S: Serializer>(counts: &BTreeMap<UserKey, u32>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(counts.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<UserKey, u32>, D::Error> {
        let pairs = Vec::<(UserKey, u32)>::deserialize(deserializer)?;
        Ok(pairs.into_iter().filter(|(_, count)| *count > 0).collect())
    }
}

/// The persistent form of [`RegistryState`]: the gateways alone; the per-user
/// index is rebuilt from them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub gateways: BTreeMap<String, GatewayRecord>,
}

/// Who is connected where, as replicated by Raft.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryState {
    gateways: BTreeMap<String, GatewayRecord>,
    /// Index: user → gateway → count, for presence questions.
    by_user: BTreeMap<UserKey, BTreeMap<String, u32>>,
    total_connections: u64,
}

impl GatewayRecord {
    /// The answer to a command of this gateway's session that is not new: the
    /// remembered outcome for a retry of the last one, `Stale` for an older
    /// one; `None` for a command still to apply.
    fn replayed(&self, sequence: u64) -> Option<CommandOutcome> {
        match sequence.cmp(&self.last_sequence) {
            Ordering::Equal => Some(self.last_outcome.clone()),
            Ordering::Less => Some(CommandOutcome::Stale),
            Ordering::Greater => None,
        }
    }
}

impl RegistryState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_snapshot(snapshot: StateSnapshot) -> Self {
        let mut state = RegistryState { gateways: snapshot.gateways, ..Default::default() };
        for (gateway, record) in &state.gateways {
            for (user, count) in &record.connections {
                Self::add_to_index(&mut state.by_user, user.clone(), gateway, *count);
                state.total_connections += u64::from(*count);
            }
        }
        state
    }

    pub fn to_snapshot(&self) -> StateSnapshot {
        StateSnapshot { gateways: self.gateways.clone() }
    }

    pub fn apply(&mut self, command: Command) -> CommandOutcome {
        match command {
            Command::Batch { gateway, session, sequence, now_ms, lease_ms, deltas } => {
                self.apply_batch(gateway, session, sequence, now_ms.saturating_add(lease_ms), deltas)
            }
            Command::Resync { gateway, session, sequence, now_ms, lease_ms, connections } => {
                self.apply_resync(gateway, session, sequence, now_ms.saturating_add(lease_ms), connections)
            }
            Command::Deregister { gateway } => self.remove_gateways(vec![gateway]),
            Command::Expire { now_ms } => self.remove_gateways(self.expired_gateways(now_ms)),
        }
    }

    fn apply_batch(
        &mut self,
        gateway: String,
        session: u64,
        sequence: u64,
        lease_expires_ms: u64,
        deltas: Vec<Delta>,
    ) -> CommandOutcome {
        let Some(record) = self.gateways.get_mut(&gateway) else {
            return CommandOutcome::UnknownGateway;
        };
        if record.session != session {
            return CommandOutcome::UnknownGateway;
        }
        if let Some(answer) = record.replayed(sequence) {
            return answer;
        }
        let mut changes = Vec::with_capacity(deltas.len());
        for delta in deltas {
            let change = match delta {
                Delta::Connected(user) => {
                    *record.connections.entry(user.clone()).or_default() += 1;
                    self.total_connections += 1;
                    if Self::add_to_index(&mut self.by_user, user, &gateway, 1) {
                        PresenceChange::CameOnline
                    } else {
                        PresenceChange::Unchanged
                    }
                }
                Delta::Disconnected(user) => {
                    let Some(count) = record.connections.get_mut(&user) else {
                        // Counts never go below zero: a disconnect the
                        // registry has no connection for changes nothing.
                        changes.push(PresenceChange::Unchanged);
                        continue;
                    };
                    *count -= 1;
                    if *count == 0 {
                        record.connections.remove(&user);
                    }
                    self.total_connections -= 1;
                    if Self::remove_from_index(&mut self.by_user, &user, &gateway, 1) {
                        PresenceChange::WentOffline
                    } else {
                        PresenceChange::Unchanged
                    }
                }
            };
            changes.push(change);
        }
        let outcome = CommandOutcome::Deltas(changes);
        record.last_sequence = sequence;
        record.lease_expires_ms = lease_expires_ms;
        record.last_outcome = outcome.clone();
        outcome
    }

    fn apply_resync(
        &mut self,
        gateway: String,
        session: u64,
        sequence: u64,
        lease_expires_ms: u64,
        connections: Vec<(UserKey, u32)>,
    ) -> CommandOutcome {
        if let Some(record) = self.gateways.get(&gateway)
            && record.session == session
            && let Some(answer) = record.replayed(sequence)
        {
            return answer;
        }
        let mut new_counts = BTreeMap::<UserKey, u32>::new();
        for (user, count) in connections {
            if count > 0 {
                let total = new_counts.entry(user).or_default();
                *total = total.saturating_add(count);
            }
        }
        let old_counts = self.gateways.remove(&gateway).map(|record| record.connections).unwrap_or_default();
        let affected: BTreeSet<UserKey> = old_counts.keys().chain(new_counts.keys()).cloned().collect();
        let online_before: BTreeSet<UserKey> =
            affected.iter().filter(|user| self.by_user.contains_key(*user)).cloned().collect();
        for (user, count) in &old_counts {
            Self::remove_from_index(&mut self.by_user, user, &gateway, *count);
            self.total_connections -= u64::from(*count);
        }
        for (user, count) in &new_counts {
            Self::add_to_index(&mut self.by_user, user.clone(), &gateway, *count);
            self.total_connections += u64::from(*count);
        }
        let changes: Vec<(UserKey, PresenceChange)> = affected
            .into_iter()
            .filter_map(|user| {
                let was_online = online_before.contains(&user);
                let is_online = self.by_user.contains_key(&user);
                match (was_online, is_online) {
                    (false, true) => Some((user, PresenceChange::CameOnline)),
                    (true, false) => Some((user, PresenceChange::WentOffline)),
                    _ => None,
                }
            })
            .collect();
        let outcome = CommandOutcome::Resynced(changes);
        self.gateways.insert(
            gateway,
            GatewayRecord {
                session,
                last_sequence: sequence,
                lease_expires_ms,
                connections: new_counts,
                last_outcome: outcome.clone(),
            },
        );
        outcome
    }

    fn remove_gateways(&mut self, gateways: Vec<String>) -> CommandOutcome {
        let mut removed = Vec::new();
        let mut went_offline = BTreeSet::new();
        for gateway in gateways {
            let Some(record) = self.gateways.remove(&gateway) else {
                continue;
            };
            for (user, count) in record.connections {
                self.total_connections -= u64::from(count);
                if Self::remove_from_index(&mut self.by_user, &user, &gateway, count) {
                    went_offline.insert(user);
                }
            }
            removed.push(gateway);
        }
        CommandOutcome::Removed { gateways: removed, went_offline: went_offline.into_iter().collect() }
    }

    /// Adds `count` connections of `user` on `gateway` to the per-user index;
    /// answers whether the user had no connection anywhere before.
    fn add_to_index(
        by_user: &mut BTreeMap<UserKey, BTreeMap<String, u32>>,
        user: UserKey,
        gateway: &str,
        count: u32,
    ) -> bool {
        let nodes = by_user.entry(user).or_default();
        let was_offline = nodes.is_empty();
        match nodes.get_mut(gateway) {
            Some(on_gateway) => *on_gateway += count,
            None => {
                nodes.insert(gateway.to_owned(), count);
            }
        }
        was_offline
    }

    /// Takes `count` connections of `user` on `gateway` out of the per-user
    /// index; answers whether the user has no connection left anywhere.
    fn remove_from_index(
        by_user: &mut BTreeMap<UserKey, BTreeMap<String, u32>>,
        user: &UserKey,
        gateway: &str,
        count: u32,
    ) -> bool {
        let Some(nodes) = by_user.get_mut(user) else {
            return false;
        };
        if let Some(on_gateway) = nodes.get_mut(gateway) {
            *on_gateway = on_gateway.saturating_sub(count);
            if *on_gateway == 0 {
                nodes.remove(gateway);
            }
        }
        if nodes.is_empty() {
            by_user.remove(user);
            true
        } else {
            false
        }
    }

    /// Whether some gateway's lease ran out by `now_ms`.
    pub fn has_expired_gateways(&self, now_ms: u64) -> bool {
        self.gateways.values().any(|record| record.lease_expires_ms <= now_ms)
    }

    /// Gateways whose lease ran out by `now_ms`, in name order.
    pub fn expired_gateways(&self, now_ms: u64) -> Vec<String> {
        self.gateways
            .iter()
            .filter(|(_, record)| record.lease_expires_ms <= now_ms)
            .map(|(gateway, _)| gateway.clone())
            .collect()
    }

    pub fn is_online(&self, user: &UserKey) -> bool {
        self.by_user.contains_key(user)
    }

    /// Gateways where the user has at least one connection, in name order.
    pub fn nodes_of(&self, user: &UserKey) -> Vec<String> {
        self.by_user.get(user).map(|nodes| nodes.keys().cloned().collect()).unwrap_or_default()
    }

    pub fn connection_count(&self) -> u64 {
        self.total_connections
    }

    pub fn gateway_count(&self) -> usize {
        self.gateways.len()
    }

    /// Every gateway with its lease expiry (ms since the epoch) and its
    /// number of connections.
    pub fn gateway_leases(&self) -> Vec<(String, u64, u64)> {
        self.gateways
            .iter()
            .map(|(gateway, record)| {
                (
                    gateway.clone(),
                    record.lease_expires_ms,
                    record.connections.values().map(|count| u64::from(*count)).sum(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserKey {
        UserKey { application_id: "app".into(), user_id: name.into() }
    }

    fn batch(gateway: &str, sequence: u64, now_ms: u64, deltas: Vec<Delta>) -> Command {
        Command::Batch { gateway: gateway.into(), session: 7, sequence, now_ms, lease_ms: 1_000, deltas }
    }

    fn resync(gateway: &str, sequence: u64, now_ms: u64, connections: Vec<(UserKey, u32)>) -> Command {
        Command::Resync { gateway: gateway.into(), session: 7, sequence, now_ms, lease_ms: 1_000, connections }
    }

    fn registered(gateways: &[&str]) -> RegistryState {
        let mut state = RegistryState::new();
        for gateway in gateways {
            state.apply(resync(gateway, 1, 0, vec![]));
        }
        state
    }

    use PresenceChange::{CameOnline, Unchanged, WentOffline};

    #[test]
    fn presence_follows_the_first_and_last_connection_anywhere() {
        let mut state = registered(&["g1", "g2"]);
        let alice = user("alice");
        let outcome = state.apply(batch(
            "g1",
            2,
            10,
            vec![Delta::Connected(alice.clone()), Delta::Connected(alice.clone()), Delta::Disconnected(alice.clone())],
        ));
        assert_eq!(outcome, CommandOutcome::Deltas(vec![CameOnline, Unchanged, Unchanged]));
        assert_eq!(
            state.apply(batch("g2", 2, 10, vec![Delta::Connected(alice.clone())])),
            CommandOutcome::Deltas(vec![Unchanged])
        );
        assert_eq!(state.nodes_of(&alice), vec!["g1", "g2"]);
        assert_eq!(state.connection_count(), 2);
        assert_eq!(
            state.apply(batch("g1", 3, 20, vec![Delta::Disconnected(alice.clone())])),
            CommandOutcome::Deltas(vec![Unchanged])
        );
        assert_eq!(
            state.apply(batch("g2", 3, 20, vec![Delta::Disconnected(alice.clone())])),
            CommandOutcome::Deltas(vec![WentOffline])
        );
        assert!(!state.is_online(&alice));
        assert_eq!(state.connection_count(), 0);
    }

    #[test]
    fn counts_never_go_below_zero() {
        let mut state = registered(&["g1"]);
        let bob = user("bob");
        let outcome = state.apply(batch(
            "g1",
            2,
            0,
            vec![Delta::Disconnected(bob.clone()), Delta::Connected(bob.clone()), Delta::Disconnected(bob.clone())],
        ));
        assert_eq!(outcome, CommandOutcome::Deltas(vec![Unchanged, CameOnline, WentOffline]));
        assert_eq!(state.connection_count(), 0);
    }

    #[test]
    fn a_retried_batch_is_answered_without_being_applied_twice() {
        let mut state = registered(&["g1"]);
        let first = state.apply(batch("g1", 2, 0, vec![Delta::Connected(user("a"))]));
        let retried = state.apply(batch("g1", 2, 0, vec![Delta::Connected(user("a"))]));
        assert_eq!(first, retried);
        assert_eq!(state.connection_count(), 1);
        state.apply(batch("g1", 3, 0, vec![]));
        assert_eq!(state.apply(batch("g1", 2, 0, vec![Delta::Connected(user("a"))])), CommandOutcome::Stale);
        assert_eq!(state.connection_count(), 1);
    }

    #[test]
    fn batches_of_an_unknown_gateway_or_session_are_refused() {
        let mut state = RegistryState::new();
        assert_eq!(state.apply(batch("g1", 1, 0, vec![Delta::Connected(user("a"))])), CommandOutcome::UnknownGateway);
        state.apply(resync("g1", 1, 0, vec![]));
        let other_session = Command::Batch {
            gateway: "g1".into(),
            session: 8,
            sequence: 2,
            now_ms: 0,
            lease_ms: 1_000,
            deltas: vec![Delta::Connected(user("a"))],
        };
        assert_eq!(state.apply(other_session), CommandOutcome::UnknownGateway);
        assert_eq!(state.connection_count(), 0);
    }

    #[test]
    fn resync_replaces_the_gateway_and_answers_what_changed() {
        let mut state = registered(&["g1", "g2"]);
        state.apply(batch("g1", 2, 0, vec![Delta::Connected(user("a")), Delta::Connected(user("b"))]));
        state.apply(batch("g2", 2, 0, vec![Delta::Connected(user("b"))]));
        // A new run of g1 (another session) knows only c and b.
        let outcome = state.apply(Command::Resync {
            gateway: "g1".into(),
            session: 9,
            sequence: 1,
            now_ms: 0,
            lease_ms: 1_000,
            connections: vec![(user("c"), 2), (user("b"), 1), (user("d"), 0)],
        });
        assert_eq!(outcome, CommandOutcome::Resynced(vec![(user("a"), WentOffline), (user("c"), CameOnline)]));
        assert_eq!(state.connection_count(), 4);
        assert_eq!(state.nodes_of(&user("b")), vec!["g1", "g2"]);
        assert!(!state.is_online(&user("d")));
    }

    #[test]
    fn expire_removes_gateways_whose_lease_ran_out() {
        let mut state = registered(&["g1", "g2"]);
        state.apply(batch("g1", 2, 0, vec![Delta::Connected(user("a")), Delta::Connected(user("b"))]));
        state.apply(batch("g2", 2, 500, vec![Delta::Connected(user("b"))]));
        assert_eq!(state.expired_gateways(999), Vec::<String>::new());
        assert!(!state.has_expired_gateways(999));
        assert_eq!(state.expired_gateways(1_000), vec!["g1"]);
        assert!(state.has_expired_gateways(1_000));
        let outcome = state.apply(Command::Expire { now_ms: 1_200 });
        assert_eq!(outcome, CommandOutcome::Removed { gateways: vec!["g1".into()], went_offline: vec![user("a")] });
        assert_eq!(state.gateway_count(), 1);
        assert!(state.is_online(&user("b")));
        // The expired gateway's next batch is refused until it resyncs.
        assert_eq!(state.apply(batch("g1", 3, 1_300, vec![])), CommandOutcome::UnknownGateway);
    }

    #[test]
    fn deregister_forgets_the_gateway_now() {
        let mut state = registered(&["g1", "g2"]);
        state.apply(batch("g1", 2, 0, vec![Delta::Connected(user("a")), Delta::Connected(user("b"))]));
        state.apply(batch("g2", 2, 0, vec![Delta::Connected(user("a"))]));
        let outcome = state.apply(Command::Deregister { gateway: "g1".into() });
        assert_eq!(outcome, CommandOutcome::Removed { gateways: vec!["g1".into()], went_offline: vec![user("b")] });
        assert_eq!(
            state.apply(Command::Deregister { gateway: "g1".into() }),
            CommandOutcome::Removed { gateways: vec![], went_offline: vec![] }
        );
        assert_eq!(state.connection_count(), 1);
    }

    /// Log entries and snapshots written by earlier builds stay readable:
    /// the JSON of users, presence changes, commands, outcomes and gateway
    /// records is pinned here.
    #[test]
    fn the_persisted_json_format_is_stable() {
        let command = Command::Resync {
            gateway: "g1".into(),
            session: 7,
            sequence: 1,
            now_ms: 5,
            lease_ms: 1_000,
            connections: vec![(user("a"), 2)],
        };
        let command_json = r#"{"Resync":{"gateway":"g1","session":7,"sequence":1,"now_ms":5,"lease_ms":1000,"connections":[[{"application_id":"app","user_id":"a"},2]]}}"#;
        assert_eq!(serde_json::to_string(&command).unwrap(), command_json);
        assert_eq!(serde_json::from_str::<Command>(command_json).unwrap(), command);
        let batch = batch("g1", 2, 5, vec![Delta::Connected(user("a")), Delta::Disconnected(user("b"))]);
        let batch_json = r#"{"Batch":{"gateway":"g1","session":7,"sequence":2,"now_ms":5,"lease_ms":1000,"deltas":[{"Connected":{"application_id":"app","user_id":"a"}},{"Disconnected":{"application_id":"app","user_id":"b"}}]}}"#;
        assert_eq!(serde_json::to_string(&batch).unwrap(), batch_json);
        assert_eq!(serde_json::from_str::<Command>(batch_json).unwrap(), batch);

        let mut state = RegistryState::new();
        state.apply(command);
        let snapshot_json = r#"{"gateways":{"g1":{"session":7,"last_sequence":1,"lease_expires_ms":1005,"connections":[[{"application_id":"app","user_id":"a"},2]],"last_outcome":{"Resynced":[[{"application_id":"app","user_id":"a"},"CameOnline"]]}}}}"#;
        assert_eq!(serde_json::to_string(&state.to_snapshot()).unwrap(), snapshot_json);
        let restored = RegistryState::from_snapshot(serde_json::from_str(snapshot_json).unwrap());
        assert_eq!(restored, state);

        let outcomes = vec![
            CommandOutcome::Deltas(vec![CameOnline, Unchanged, WentOffline]),
            CommandOutcome::Removed { gateways: vec!["g1".into()], went_offline: vec![user("a")] },
            CommandOutcome::UnknownGateway,
        ];
        let outcomes_json = r#"[{"Deltas":["CameOnline","Unchanged","WentOffline"]},{"Removed":{"gateways":["g1"],"went_offline":[{"application_id":"app","user_id":"a"}]}},"UnknownGateway"]"#;
        assert_eq!(serde_json::to_string(&outcomes).unwrap(), outcomes_json);
        assert_eq!(serde_json::from_str::<Vec<CommandOutcome>>(outcomes_json).unwrap(), outcomes);
    }

    #[test]
    fn a_snapshot_round_trip_rebuilds_the_same_state() {
        let mut state = registered(&["g1", "g2"]);
        state.apply(batch("g1", 2, 0, vec![Delta::Connected(user("a")), Delta::Connected(user("a"))]));
        state.apply(batch("g2", 2, 0, vec![Delta::Connected(user("a")), Delta::Connected(user("b"))]));
        let json = serde_json::to_vec(&state.to_snapshot()).unwrap();
        let restored = RegistryState::from_snapshot(serde_json::from_slice(&json).unwrap());
        assert_eq!(restored, state);
        assert_eq!(restored.connection_count(), 4);
    }
}
