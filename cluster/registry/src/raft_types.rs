//! The openraft type configuration of the registry.

use std::io::Cursor;

use openraft::BasicNode;

use crate::state::{Command, CommandOutcome};

openraft::declare_raft_types!(
    /// Registry nodes are numbered `u64`s whose `BasicNode::addr` is the
    /// node's gRPC URL; log entries carry [`Command`]s; snapshots are JSON
    /// documents held in memory while they are sent or received.
    pub RegistryTypeConfig:
        D = Command,
        R = CommandOutcome,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<RegistryTypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
        Responder = openraft::impls::OneshotResponder<RegistryTypeConfig>,
);

/// A running Raft member of the registry.
pub type RegistryRaft = openraft::Raft<RegistryTypeConfig>;
pub type RegistryLogId = openraft::LogId<u64>;
pub type RegistryEntry = openraft::Entry<RegistryTypeConfig>;
pub type RegistryMembership = openraft::StoredMembership<u64, BasicNode>;
pub type RegistrySnapshotMeta = openraft::SnapshotMeta<u64, BasicNode>;
pub type RegistryStorageError = openraft::StorageError<u64>;
