//! The Raft log, the vote and the committed and purged markers, in SQLite
//! (`<data_dir>/raft.db`, WAL journal, `synchronous=FULL`, so a transaction
//! is on disk when it commits — except the committed marker's, see
//! [`SqliteLogStore::save_committed`]).
//!
//! One dedicated thread owns the connection and runs every job in the order
//! it was queued. That serializes all log and vote IO, as openraft requires,
//! keeps blocking SQLite calls off the async runtime, and makes `append`
//! cheap: it queues the write and returns, and the thread reports the flush
//! through openraft's callback once the transaction has committed. Any read
//! queued after an append runs after it, so appended entries are readable as
//! soon as `append` returns.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, RaftLogReader, StorageError, StorageIOError, Vote};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::raft_types::{RegistryEntry, RegistryLogId, RegistryStorageError, RegistryTypeConfig};

type LogJob = Box<dyn FnOnce(&mut Connection) + Send>;

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The SQLite-backed [`RaftLogStorage`]. Clones share the same connection
/// thread (the log reader openraft's replication tasks use is a clone).
#[derive(Clone)]
pub struct SqliteLogStore {
    jobs: mpsc::Sender<LogJob>,
}

impl SqliteLogStore {
    /// Opens (or creates) the database and starts its thread. The thread
    /// ends when the store and all its clones are dropped.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut connection = Connection::open(path)?;
        let journal_mode: String = connection.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))?;
        anyhow::ensure!(
            journal_mode.eq_ignore_ascii_case("wal"),
            "{} could not be switched to the WAL journal (got `{journal_mode}`)",
            path.display()
        );
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.execute_batch(
            "CREATE TABLE IF NOT EXISTS raft_log (
                 log_index INTEGER PRIMARY KEY,
                 log_id TEXT NOT NULL,
                 entry TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS raft_meta (
                 name TEXT PRIMARY KEY,
                 value TEXT NOT NULL
             );",
        )?;
        let (jobs, queued) = mpsc::channel::<LogJob>();
        std::thread::Builder::new().name("registry-raft-log".into()).spawn(move || {
            while let Ok(job) = queued.recv() {
                job(&mut connection);
            }
        })?;
        Ok(SqliteLogStore { jobs })
    }

    /// Runs `job` on the connection thread and waits for its result.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |connection| {
                let _ = reply.send(job(connection));
            }))
            .map_err(|_| "the registry log thread has stopped".to_owned())?;
        answer.await.map_err(|_| "the registry log thread dropped a job".to_owned())?
    }
}

fn to_sql_index(index: u64) -> Result<i64, String> {
    i64::try_from(index).map_err(|_| format!("log index {index} does not fit SQLite's INTEGER"))
}

fn to_json<T: Serialize>(value: &T) -> Result<String, String> {
    serde_json::to_string(value).map_err(|error| format!("cannot encode a log record as JSON: {error}"))
}

fn from_json<T: DeserializeOwned>(json: &str) -> Result<T, String> {
    serde_json::from_str(json).map_err(|error| format!("a stored log record is not valid JSON for its type: {error}"))
}

fn read_meta<T: DeserializeOwned>(connection: &Connection, name: &str) -> Result<Option<T>, String> {
    let value: Option<String> = connection
        .query_row("SELECT value FROM raft_meta WHERE name = ?1", params![name], |row| row.get(0))
        .optional()
        .map_err(|error| error.to_string())?;
    value.map(|json| from_json(&json)).transpose()
}

fn write_meta(connection: &Connection, name: &str, json: &str) -> Result<(), String> {
    connection
        .execute(
            "INSERT INTO raft_meta (name, value) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            params![name, json],
        )
        .map(|_| ())
        .map_err(|error| error.to_string())
}

fn io_error(make: fn(AnyError) -> StorageIOError<u64>, message: String) -> RegistryStorageError {
    StorageError::IO { source: make(AnyError::error(message)) }
}

impl RaftLogReader<RegistryTypeConfig> for SqliteLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<RegistryEntry>, RegistryStorageError> {
        let start = match range.start_bound() {
            Bound::Included(index) => *index,
            Bound::Excluded(index) => index.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(index) => index.saturating_add(1),
            Bound::Excluded(index) => *index,
            Bound::Unbounded => u64::MAX,
        };
        self.run(move |connection| {
            let start = to_sql_index(start)?;
            let end = i64::try_from(end).unwrap_or(i64::MAX);
            let mut statement = connection
                .prepare_cached(
                    "SELECT entry FROM raft_log WHERE log_index >= ?1 AND log_index < ?2 ORDER BY log_index",
                )
                .map_err(|error| error.to_string())?;
            let rows = statement
                .query_map(params![start, end], |row| row.get::<_, String>(0))
                .map_err(|error| error.to_string())?;
            let mut entries = Vec::new();
            for row in rows {
                entries.push(from_json::<RegistryEntry>(&row.map_err(|error| error.to_string())?)?);
            }
            Ok(entries)
        })
        .await
        .map_err(|message| io_error(StorageIOError::read_logs, message))
    }
}

impl RaftLogStorage<RegistryTypeConfig> for SqliteLogStore {
    type LogReader = SqliteLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<RegistryTypeConfig>, RegistryStorageError> {
        self.run(|connection| {
            let last_purged_log_id: Option<RegistryLogId> = read_meta(connection, LAST_PURGED)?;
            let last_log_id: Option<String> = connection
                .query_row("SELECT log_id FROM raft_log ORDER BY log_index DESC LIMIT 1", [], |row| row.get(0))
                .optional()
                .map_err(|error| error.to_string())?;
            let last_log_id = match last_log_id {
                Some(json) => Some(from_json::<RegistryLogId>(&json)?),
                None => last_purged_log_id,
            };
            Ok(LogState { last_purged_log_id, last_log_id })
        })
        .await
        .map_err(|message| io_error(StorageIOError::read_logs, message))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), RegistryStorageError> {
        let json = to_json(vote).map_err(|message| io_error(StorageIOError::write_vote, message))?;
        self.run(move |connection| write_meta(connection, VOTE, &json))
            .await
            .map_err(|message| io_error(StorageIOError::write_vote, message))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, RegistryStorageError> {
        self.run(|connection| read_meta(connection, VOTE))
            .await
            .map_err(|message| io_error(StorageIOError::read_vote, message))
    }

    /// Persisting the committed log id lets a restarted node re-apply its
    /// committed entries on start (the state machine lives in memory and is
    /// rebuilt from the last snapshot plus the log).
    ///
    /// openraft awaits this before every apply, and the marker is only a
    /// hint (a node that loses it re-learns the commit index from the
    /// leader; reads are served by the leader after a read-index round), so
    /// it is written without an fsync: with `synchronous=NORMAL` a WAL commit
    /// is durable once a later synced commit (a vote or an append) or a
    /// checkpoint fsyncs the WAL, and survives a process crash meanwhile.
    async fn save_committed(&mut self, committed: Option<RegistryLogId>) -> Result<(), RegistryStorageError> {
        let json = to_json(&committed).map_err(|message| io_error(StorageIOError::write, message))?;
        self.run(move |connection| {
            // An optional hint on the hot path: no fsync of its own (see above).
            connection.pragma_update(None, "synchronous", "NORMAL").map_err(|error| error.to_string())?;
            let written = write_meta(connection, COMMITTED, &json);
            // The vote and the log stay fully synced.
            connection.pragma_update(None, "synchronous", "FULL").map_err(|error| error.to_string())?;
            written
        })
        .await
        .map_err(|message| io_error(StorageIOError::write, message))
    }

    async fn read_committed(&mut self) -> Result<Option<RegistryLogId>, RegistryStorageError> {
        self.run(|connection| Ok(read_meta::<Option<RegistryLogId>>(connection, COMMITTED)?.flatten()))
            .await
            .map_err(|message| io_error(StorageIOError::read, message))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<RegistryTypeConfig>,
    ) -> Result<(), RegistryStorageError>
    where
        I: IntoIterator<Item = RegistryEntry> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for entry in entries {
            let encoded = to_sql_index(entry.log_id.index)
                .and_then(|index| Ok((index, to_json(&entry.log_id)?, to_json(&entry)?)))
                .map_err(|message| io_error(StorageIOError::write_logs, message))?;
            rows.push(encoded);
        }
        let job: LogJob = Box::new(move |connection| {
            let written = (|| -> rusqlite::Result<()> {
                let transaction = connection.transaction()?;
                {
                    let mut insert = transaction.prepare_cached(
                        "INSERT OR REPLACE INTO raft_log (log_index, log_id, entry) VALUES (?1, ?2, ?3)",
                    )?;
                    for (index, log_id, entry) in &rows {
                        insert.execute(params![index, log_id, entry])?;
                    }
                }
                transaction.commit()
            })();
            callback.log_io_completed(written.map_err(std::io::Error::other));
        });
        self.jobs
            .send(job)
            .map_err(|_| io_error(StorageIOError::write_logs, "the registry log thread has stopped".to_owned()))
    }

    async fn truncate(&mut self, log_id: RegistryLogId) -> Result<(), RegistryStorageError> {
        self.run(move |connection| {
            connection
                .execute("DELETE FROM raft_log WHERE log_index >= ?1", params![to_sql_index(log_id.index)?])
                .map(|_| ())
                .map_err(|error| error.to_string())
        })
        .await
        .map_err(|message| io_error(StorageIOError::write_logs, message))
    }

    async fn purge(&mut self, log_id: RegistryLogId) -> Result<(), RegistryStorageError> {
        let json = to_json(&log_id).map_err(|message| io_error(StorageIOError::write_logs, message))?;
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(|error| error.to_string())?;
            write_meta(&transaction, LAST_PURGED, &json)?;
            transaction
                .execute("DELETE FROM raft_log WHERE log_index <= ?1", params![to_sql_index(log_id.index)?])
                .map_err(|error| error.to_string())?;
            transaction.commit().map_err(|error| error.to_string())
        })
        .await
        .map_err(|message| io_error(StorageIOError::write_logs, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synchronous(connection: &Connection) -> Result<i64, String> {
        connection.query_row("PRAGMA synchronous", [], |row| row.get(0)).map_err(|error| error.to_string())
    }

    /// The committed marker is written without an fsync; everything after it
    /// (votes, appends) is synced again.
    #[tokio::test]
    async fn only_the_committed_marker_skips_the_fsync() {
        const FULL: i64 = 2;
        let directory = tempfile::tempdir().unwrap();
        let mut store = SqliteLogStore::open(&directory.path().join("raft.db")).unwrap();
        assert_eq!(store.run(|connection| synchronous(connection)).await.unwrap(), FULL);
        let committed = Some(RegistryLogId::new(openraft::CommittedLeaderId::new(1, 1), 3));
        store.save_committed(committed).await.unwrap();
        assert_eq!(store.run(|connection| synchronous(connection)).await.unwrap(), FULL);
        assert_eq!(store.read_committed().await.unwrap(), committed);
    }
}
