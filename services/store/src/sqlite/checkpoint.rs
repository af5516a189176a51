//! WAL checkpoints off the commit path.
//!
//! By default SQLite checkpoints inside the COMMIT that takes the WAL past
//! 1,000 pages, on the committing connection: for Beseda, in the writer
//! thread, while the whole group waits for its acknowledgement. The fan-out
//! profile (docs/BENCHMARKS.md) put 12.5 % of the writer thread there. So the
//! writer connection runs with `wal_autocheckpoint = 0` and a WAL hook that
//! only notes the WAL's size, and this thread, on a connection of its own,
//! checkpoints:
//!
//! - PASSIVE when the writer reports [`Policy::passive_pages`] or more in the
//!   WAL after a commit, and every [`Policy::interval`] anyway. PASSIVE takes
//!   no lock the writer or the readers wait for: it copies what no reader
//!   still needs into the database file and fsyncs it, while commits go on
//!   appending to the WAL. The writer rewinds the WAL at its next
//!   transaction once everything has been copied.
//! - TRUNCATE when the WAL still holds [`Policy::truncate_pages`] or more
//!   after a PASSIVE one: readers that never let go of an old snapshot would
//!   otherwise let it grow without bound. TRUNCATE waits (up to the busy
//!   timeout) for the writer and the readers, so it does hold commits up;
//!   that is the price of bounding the file, paid only in this case.
//!
//! Durability does not depend on checkpoints: a commit is durable once its
//! WAL frames are synced (`synchronous = FULL`), and a checkpoint only moves
//! already-durable pages into the database file. The thread stops when the
//! writer thread does (it drops the nudging side) and closes its connection.

use std::cell::Cell;
use std::os::raw::c_int;
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use crate::engine::{DbError, DbResult};

/// When to checkpoint; see the module documentation.
#[derive(Clone, Copy, Debug)]
pub(super) struct Policy {
    /// WAL pages after a commit that ask for a PASSIVE checkpoint. 1,000 is
    /// SQLite's own `wal_autocheckpoint` default (about 4 MB of 4 KiB pages).
    pub(super) passive_pages: i64,
    /// WAL pages still there after a PASSIVE checkpoint that call for a
    /// TRUNCATE one: 16,384 pages, 64 MB of 4 KiB pages.
    pub(super) truncate_pages: i64,
    /// A PASSIVE checkpoint at least this often, so that a quiet database
    /// also ends up with its pages in the database file. Cheap when nothing
    /// is new: SQLite then returns without any I/O.
    pub(super) interval: Duration,
}

pub(super) const POLICY: Policy =
    Policy { passive_pages: 1_000, truncate_pages: 16_384, interval: Duration::from_secs(5) };

thread_local! {
    /// Pages in the WAL after the last commit on this thread's connection,
    /// set by [`note_wal_pages`]. A thread-local because rusqlite's WAL hook
    /// is a plain function; only the writer thread's connection has it.
    static WAL_PAGES: Cell<i64> = const { Cell::new(0) };
}

/// The writer connection's WAL hook: notes the WAL's size; checkpoints are
/// this module's thread's job.
fn note_wal_pages(_: &rusqlite::hooks::Wal, pages: c_int) -> rusqlite::Result<()> {
    WAL_PAGES.set(i64::from(pages));
    Ok(())
}

/// Turns SQLite's checkpoints inside COMMIT off on the writer connection and
/// installs the hook that measures the WAL instead. In this order: the
/// pragma installs a hook of its own.
pub(super) fn take_checkpoints_off(connection: &Connection) -> rusqlite::Result<()> {
    connection.pragma_update(None, "wal_autocheckpoint", 0)?;
    connection.wal_hook(Some(note_wal_pages));
    Ok(())
}

/// The writer's handle on the checkpoint thread.
pub(super) struct Checkpointer {
    nudge: mpsc::SyncSender<()>,
    thread: JoinHandle<()>,
    policy: Policy,
}

impl Checkpointer {
    /// Opens the thread's own connection to the database at `path` and
    /// starts it.
    pub(super) fn start(path: &Path, policy: Policy) -> DbResult<Self> {
        let connection = Connection::open(path).map_err(|error| super::map_error(None, error))?;
        let configure = |connection: &Connection| -> rusqlite::Result<()> {
            connection.busy_timeout(super::BUSY_TIMEOUT)?;
            // The checkpoint's fsyncs follow the synchronous setting of the
            // connection that runs it.
            connection.pragma_update(None, "synchronous", "FULL")?;
            connection.pragma_update(None, "wal_autocheckpoint", 0)
        };
        configure(&connection).map_err(|error| super::map_error(Some(&connection), error))?;
        // One pending nudge is enough: the checkpoint it causes covers every
        // commit before it.
        let (nudge, nudges) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("beseda-sqlite-checkpoint".into())
            .spawn(move || run(&connection, &nudges, policy))
            .map_err(|error| DbError::Other(format!("cannot start the sqlite checkpoint thread: {error}")))?;
        Ok(Checkpointer { nudge, thread, policy })
    }

    /// Called by the writer after each successful COMMIT.
    pub(super) fn after_commit(&self) {
        if WAL_PAGES.get() >= self.policy.passive_pages {
            // Full: a checkpoint is already asked for. Disconnected: the
            // thread failed; `stop` reports it.
            let _ = self.nudge.try_send(());
        }
    }

    /// Stops the thread after its current checkpoint and waits for it.
    pub(super) fn stop(self) {
        drop(self.nudge);
        if self.thread.join().is_err() {
            tracing::error!("the sqlite checkpoint thread panicked");
        }
    }
}

/// The checkpoint thread: until the writer goes away.
fn run(connection: &Connection, nudges: &mpsc::Receiver<()>, policy: Policy) {
    // A nudge or the interval: checkpoint. The writer gone: stop.
    while let Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) = nudges.recv_timeout(policy.interval) {
        let wal_pages = match checkpoint(connection, "PASSIVE") {
            Ok(wal_pages) => wal_pages,
            Err(error) => {
                tracing::warn!(%error, "sqlite passive checkpoint failed");
                continue;
            }
        };
        if wal_pages >= policy.truncate_pages {
            tracing::warn!(wal_pages, "sqlite WAL still large after a passive checkpoint; truncating it");
            if let Err(error) = checkpoint(connection, "TRUNCATE") {
                tracing::warn!(%error, "sqlite truncate checkpoint failed");
            }
        }
    }
    tracing::debug!("sqlite checkpoint thread stopped");
}

/// Runs one checkpoint; returns the pages left in the WAL (0 once it has
/// been truncated). `mode` is a constant: PASSIVE or TRUNCATE.
fn checkpoint(connection: &Connection, mode: &str) -> rusqlite::Result<i64> {
    let started = std::time::Instant::now();
    let (busy, log, copied): (i64, i64, i64) =
        connection.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
    tracing::debug!(mode, busy, log, copied, elapsed = ?started.elapsed(), "sqlite checkpoint");
    Ok(log.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal_file(path: &Path) -> std::path::PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push("-wal");
        name.into()
    }

    /// A writer connection as the store configures it, with a scratch table.
    fn writer(path: &Path) -> Connection {
        let connection = Connection::open(path).unwrap();
        let _: String = connection.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)).unwrap();
        connection.pragma_update(None, "synchronous", "FULL").unwrap();
        take_checkpoints_off(&connection).unwrap();
        connection.execute_batch("CREATE TABLE scratch (b BLOB NOT NULL)").unwrap();
        connection
    }

    /// 100 commits of 40 KB: about 1,000 pages of 4 KiB in the WAL.
    fn write_4mb(connection: &Connection, checkpointer: Option<&Checkpointer>) {
        for _ in 0..100 {
            connection.execute("INSERT INTO scratch (b) VALUES (zeroblob(40000))", []).unwrap();
            if let Some(checkpointer) = checkpointer {
                checkpointer.after_commit();
            }
        }
    }

    #[test]
    fn the_writer_never_checkpoints_its_own_commits() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("db");
        let connection = writer(&path);
        write_4mb(&connection, None);
        write_4mb(&connection, None);
        // Every page is still only in the WAL: the database file holds the
        // schema page or two and nothing more.
        let database = std::fs::metadata(&path).unwrap().len();
        assert!(database < 64 * 1024, "the writer checkpointed: database file is {database} bytes");
        assert!(WAL_PAGES.get() >= 2_000, "the hook saw {} pages", WAL_PAGES.get());
    }

    #[test]
    fn a_large_wal_is_checkpointed_by_the_thread_which_stops_with_the_writer() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("db");
        let connection = writer(&path);
        // No interval to rely on: only the writer's nudge can cause it.
        let policy = Policy { interval: Duration::from_secs(3600), ..POLICY };
        let checkpointer = Checkpointer::start(&path, policy).unwrap();
        write_4mb(&connection, Some(&checkpointer));
        write_4mb(&connection, Some(&checkpointer));
        // Stopping waits for the checkpoint the nudge asked for, if it is
        // still running; the thread has ended when `stop` returns.
        checkpointer.stop();
        // Without a checkpoint the file would hold the schema pages only (see
        // the test above); a checkpoint copied at least the first ~1,000 pages.
        let database = std::fs::metadata(&path).unwrap().len();
        assert!(database >= 2_000_000, "no checkpoint reached the database file: {database} bytes");
    }

    #[test]
    fn a_wal_grown_past_the_bound_is_truncated() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("db");
        let connection = writer(&path);
        // A reader holding a snapshot from before the writes: nothing could
        // have been checkpointed or rewound while it held it, so the WAL
        // grows past the bound.
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader.query_row("SELECT COUNT(*) FROM scratch", [], |row| row.get(0)).unwrap();
        write_4mb(&connection, None);
        reader.execute_batch("COMMIT").unwrap();
        let grown = std::fs::metadata(wal_file(&path)).unwrap().len();
        assert!(grown >= 4_000_000, "the WAL is {grown} bytes");

        let policy = Policy { passive_pages: 100, truncate_pages: 500, interval: Duration::from_secs(3600) };
        let checkpointer = Checkpointer::start(&path, policy).unwrap();
        checkpointer.after_commit();
        checkpointer.stop();
        let wal = std::fs::metadata(wal_file(&path)).unwrap().len();
        assert_eq!(wal, 0, "the WAL was not truncated");
        let database = std::fs::metadata(&path).unwrap().len();
        assert!(database >= 4_000_000, "database file is {database} bytes");
    }
}
