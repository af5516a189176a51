//! The openraft state machine: the registry state lives in memory and is made
//! durable by snapshots, JSON documents in `<data_dir>/snapshots/`.
//!
//! Applying does not write to disk: the log is durable already, and a
//! restarted node rebuilds the state from its last snapshot plus the
//! committed entries after it (the log store persists the committed log id,
//! so openraft re-applies them on start). Snapshots are written as a
//! temporary file, synced, then renamed over `current.json`, so a crash
//! leaves either the old or the new snapshot, never half of one.

use std::fs::{self, File};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, Snapshot, StorageError, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::raft_types::{
    RegistryEntry, RegistryLogId, RegistryMembership, RegistrySnapshotMeta, RegistryStorageError, RegistryTypeConfig,
};
use crate::state::{CommandOutcome, RegistryState, StateSnapshot};
use crate::unix_now_ms;

const CURRENT_SNAPSHOT: &str = "current.json";

/// The state machine's contents at its last applied entry.
#[derive(Clone, Debug, Default)]
pub struct AppliedState {
    pub last_applied: Option<RegistryLogId>,
    pub last_membership: RegistryMembership,
    pub registry: RegistryState,
}

/// The applied state, shared between openraft's state machine worker (the
/// only writer) and the API, which reads it for queries and status. Locks
/// are taken for in-memory work only, never across an await.
#[derive(Clone, Default)]
pub struct SharedState(Arc<RwLock<AppliedState>>);

impl SharedState {
    pub fn read(&self) -> RwLockReadGuard<'_, AppliedState> {
        // A panic while applying would have stopped the Raft node anyway;
        // reads of what is there stay possible.
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, AppliedState> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A snapshot file's contents; the same bytes are what a leader sends to a
/// follower that is too far behind.
#[derive(Deserialize)]
struct SnapshotDocument {
    meta: RegistrySnapshotMeta,
    state: StateSnapshot,
}

/// [`SnapshotDocument`] for encoding, by reference.
#[derive(Serialize)]
struct SnapshotDocumentRef<'a> {
    meta: &'a RegistrySnapshotMeta,
    state: &'a StateSnapshot,
}

/// The snapshot directory with the metadata of the snapshot it holds.
struct SnapshotDirectory {
    path: PathBuf,
    /// Serializes writers and remembers the current snapshot, so that a slow
    /// build never replaces a newer snapshot installed meanwhile.
    current: Mutex<Option<RegistrySnapshotMeta>>,
}

impl SnapshotDirectory {
    fn current_path(&self) -> PathBuf {
        self.path.join(CURRENT_SNAPSHOT)
    }

    /// Blocking: the current snapshot file's bytes, if there is one.
    fn read_current(&self) -> Result<Option<Vec<u8>>, String> {
        let path = self.current_path();
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(format!("cannot read {}: {error}", path.display())),
        }
    }

    /// Blocking: reads and decodes the current snapshot, if any (on start).
    fn load(&self) -> Result<Option<SnapshotDocument>, String> {
        let Some(bytes) = self.read_current()? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| format!("{} is not a registry snapshot: {error}", self.current_path().display()))
    }

    /// Blocking: the current snapshot's bytes with its metadata, which
    /// [`Self::current`] holds already (the file is not decoded). The lock
    /// keeps a concurrent [`Self::store`] from pairing new bytes with old
    /// metadata.
    fn current_snapshot(&self) -> Result<Option<(RegistrySnapshotMeta, Vec<u8>)>, String> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(meta) = current.as_ref() else {
            return Ok(None);
        };
        Ok(self.read_current()?.map(|bytes| (meta.clone(), bytes)))
    }

    /// Blocking: makes `bytes` the current snapshot unless a newer one is
    /// there already; answers whether it did.
    fn store(&self, meta: &RegistrySnapshotMeta, bytes: &[u8]) -> Result<bool, String> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = current.as_ref()
            && existing.last_log_id > meta.last_log_id
        {
            return Ok(false);
        }
        let temporary = self.path.join(format!("{CURRENT_SNAPSHOT}.{}.tmp", meta.snapshot_id));
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&temporary, self.current_path())?;
            File::open(&self.path)?.sync_all()
        };
        if let Err(error) = write() {
            let _ = fs::remove_file(&temporary);
            return Err(format!("cannot write the snapshot into {}: {error}", self.path.display()));
        }
        *current = Some(meta.clone());
        Ok(true)
    }
}

fn snapshot_error(meta: Option<&RegistrySnapshotMeta>, message: String) -> RegistryStorageError {
    let signature = meta.map(|meta| meta.signature());
    StorageError::IO { source: StorageIOError::write_snapshot(signature, AnyError::error(message)) }
}

fn read_snapshot_error(message: String) -> RegistryStorageError {
    StorageError::IO { source: StorageIOError::read_snapshot(None, AnyError::error(message)) }
}

async fn blocking<T: Send + 'static>(job: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(job).await.map_err(|error| format!("a snapshot task failed: {error}"))?
}

/// The registry's [`RaftStateMachine`].
pub struct RegistryStateMachine {
    shared: SharedState,
    snapshots: Arc<SnapshotDirectory>,
}

impl RegistryStateMachine {
    /// Opens the snapshot directory and loads the state of its snapshot.
    pub async fn open(snapshot_dir: PathBuf) -> anyhow::Result<Self> {
        let directory = snapshot_dir.clone();
        let loaded = blocking(move || {
            fs::create_dir_all(&directory)
                .map_err(|error| format!("cannot create {}: {error}", directory.display()))?;
            remove_temporary_files(&directory);
            let snapshots = SnapshotDirectory { path: directory, current: Mutex::new(None) };
            let document = snapshots.load()?;
            Ok((snapshots, document))
        })
        .await
        .map_err(anyhow::Error::msg)?;
        let (snapshots, document) = loaded;
        let shared = SharedState::default();
        if let Some(document) = document {
            let mut state = shared.write();
            state.last_applied = document.meta.last_log_id;
            state.last_membership = document.meta.last_membership.clone();
            state.registry = RegistryState::from_snapshot(document.state);
            *snapshots.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(document.meta);
        }
        Ok(RegistryStateMachine { shared, snapshots: Arc::new(snapshots) })
    }

    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }
}

/// Leftovers of a crash in the middle of writing a snapshot.
fn remove_temporary_files(directory: &Path) {
    let Ok(entries) = fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().ends_with(".tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

impl RaftStateMachine<RegistryTypeConfig> for RegistryStateMachine {
    type SnapshotBuilder = RegistrySnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<RegistryLogId>, RegistryMembership), RegistryStorageError> {
        let state = self.shared.read();
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandOutcome>, RegistryStorageError>
    where
        I: IntoIterator<Item = RegistryEntry> + Send,
        I::IntoIter: Send,
    {
        let mut state = self.shared.write();
        let mut outcomes = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => CommandOutcome::NoCommand,
                EntryPayload::Normal(command) => state.registry.apply(command),
                EntryPayload::Membership(membership) => {
                    state.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    CommandOutcome::NoCommand
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let state = self.shared.read();
        RegistrySnapshotBuilder {
            last_applied: state.last_applied,
            last_membership: state.last_membership.clone(),
            state: Arc::new(state.registry.to_snapshot()),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RegistryStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &RegistrySnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RegistryStorageError> {
        let received: SnapshotDocument = serde_json::from_slice(snapshot.get_ref())
            .map_err(|error| snapshot_error(Some(meta), format!("the received snapshot is not valid: {error}")))?;
        // Stored under the metadata openraft hands us, which is authoritative;
        // it is normally the one inside the document, whose bytes are then
        // stored as received.
        let bytes = if received.meta == *meta {
            snapshot.into_inner()
        } else {
            serde_json::to_vec(&SnapshotDocumentRef { meta, state: &received.state })
                .map_err(|error| snapshot_error(Some(meta), format!("cannot encode the snapshot: {error}")))?
        };
        let snapshots = self.snapshots.clone();
        let stored_meta = meta.clone();
        blocking(move || snapshots.store(&stored_meta, &bytes))
            .await
            .map_err(|message| snapshot_error(Some(meta), message))?;
        let mut state = self.shared.write();
        state.last_applied = meta.last_log_id;
        state.last_membership = meta.last_membership.clone();
        state.registry = RegistryState::from_snapshot(received.state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<RegistryTypeConfig>>, RegistryStorageError> {
        let snapshots = self.snapshots.clone();
        let current = blocking(move || snapshots.current_snapshot()).await.map_err(read_snapshot_error)?;
        Ok(current.map(|(meta, bytes)| Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}

/// A copy of the state taken when openraft asked for a snapshot; encoding
/// and writing it run on a blocking thread while applying continues.
pub struct RegistrySnapshotBuilder {
    last_applied: Option<RegistryLogId>,
    last_membership: RegistryMembership,
    state: Arc<StateSnapshot>,
    snapshots: Arc<SnapshotDirectory>,
}

impl RaftSnapshotBuilder<RegistryTypeConfig> for RegistrySnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<RegistryTypeConfig>, RegistryStorageError> {
        let built_at = unix_now_ms();
        let snapshot_id = match &self.last_applied {
            Some(log_id) => {
                format!("{}-{}-{}-{built_at}", log_id.leader_id.term, log_id.leader_id.node_id, log_id.index)
            }
            None => format!("empty-{built_at}"),
        };
        let meta = RegistrySnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id,
        };
        let state = self.state.clone();
        let snapshots = self.snapshots.clone();
        let stored_meta = meta.clone();
        let bytes = blocking(move || {
            let bytes = serde_json::to_vec(&SnapshotDocumentRef { meta: &stored_meta, state: &state })
                .map_err(|error| format!("cannot encode the snapshot: {error}"))?;
            snapshots.store(&stored_meta, &bytes)?;
            Ok(bytes)
        })
        .await
        .map_err(|message| snapshot_error(Some(&meta), message))?;
        tracing::info!(snapshot = %meta, bytes = bytes.len(), "registry snapshot written");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}
