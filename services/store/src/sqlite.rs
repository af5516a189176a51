//! The embedded SQLite engine: one file under the data directory, one
//! connection.
//!
//! Concurrency design: a dedicated writer thread owns the read-write
//! connection and receives transactions as messages, so no lock is held
//! across an `.await` and no runtime thread blocks on SQLite I/O. It group-
//! commits: logical transactions run in SAVEPOINTs of one SQLite transaction
//! that is committed (one fsync) when the queue is empty, after 256
//! transactions or after 5 ms, and each is acknowledged only after that
//! COMMIT. A transaction given as a whole job ([`Engine::run_job`], used by
//! `append_message`) runs inside the writer thread in one hand-over; others
//! send their statements one by one. WAL checkpoints run on a thread of
//! their own ([`checkpoint`]), not inside the writer's COMMIT. Autocommit
//! reads use a few read-only connections, which under WAL see committed data
//! only. See [`SqliteEngine`].
//!
//! Case-insensitive search compares Rust-lower-cased copies (`*_lower`
//! columns), so it folds all of Unicode although SQLite's own `LOWER` and
//! `LIKE` fold ASCII only.

mod checkpoint;

use std::any::Any;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use beseda_core::model::*;
use beseda_core::{Error, ErrorCode, Result};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

use crate::domain::SqlStore;
use crate::engine::{DbError, DbResult, Engine, Executor, Finish, Job, JobResult, Row, Transaction, Value};
use crate::migrate::{self, Migration};

/// The SQLite schema migrations, in order.
const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, sql: include_str!("../migrations/sqlite/0001_initial.sql") },
    Migration { version: 2, sql: include_str!("../migrations/sqlite/0002_unread_counters.sql") },
    Migration { version: 3, sql: include_str!("../migrations/sqlite/0003_bots.sql") },
    Migration { version: 4, sql: include_str!("../migrations/sqlite/0004_integration_status_codes.sql") },
    Migration { version: 5, sql: include_str!("../migrations/sqlite/0005_unread_from_read_marks.sql") },
];

/// How long a statement waits for a lock held by another process (a backup
/// tool, say) before failing with `unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// [`Store`](crate::Store) on an embedded SQLite database.
pub type SqliteStore = SqlStore;

impl SqliteStore {
    /// Opens (creating it and its parent directory if needed) the database
    /// file, in WAL mode with `synchronous = FULL`, and migrates it.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|error| {
                Error::new(ErrorCode::Unavailable, format!("cannot create directory {}: {error}", parent.display()))
            })?;
        }
        let connection = Connection::open(path).map_err(|error| Error::from(map_error(None, error)))?;
        // WAL lets readers of other processes (backups) run beside the writer.
        // FULL syncs the WAL at every commit: what is acknowledged survives a
        // power loss too, not only a process crash (NORMAL would not).
        let mode: String = connection
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|error| Error::from(map_error(Some(&connection), error)))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::internal(format!("sqlite refused wal journal mode (got {mode})")));
        }
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|error| Error::from(map_error(Some(&connection), error)))?;
        checkpoint::take_checkpoints_off(&connection)
            .map_err(|error| Error::from(map_error(Some(&connection), error)))?;
        tracing::info!(path = %path.display(), "opened sqlite database");
        Self::from_connection(connection, Some(path))
    }

    /// A private in-memory database (tests, ephemeral runs).
    pub fn open_in_memory() -> Result<Self> {
        let connection = Connection::open_in_memory().map_err(|error| Error::from(map_error(None, error)))?;
        Self::from_connection(connection, None)
    }

    /// `path` is `None` for an in-memory database, which has no reader
    /// connections (they could not see it) and commits each transaction alone.
    fn from_connection(mut connection: Connection, path: Option<&Path>) -> Result<Self> {
        configure(&connection).map_err(|error| Error::from(map_error(Some(&connection), error)))?;
        migrate_blocking(&mut connection)?;
        let (readers, checkpointer) = match path {
            Some(path) => {
                let checkpointer = checkpoint::Checkpointer::start(path, checkpoint::POLICY)?;
                (open_readers(path)?, Some(checkpointer))
            }
            None => (Vec::new(), None),
        };
        let engine = SqliteEngine::start(connection, readers, checkpointer)?;
        Ok(SqlStore::new(Box::new(engine)))
    }
}

fn configure(connection: &Connection) -> rusqlite::Result<()> {
    connection.pragma_update(None, "foreign_keys", "ON")?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.set_prepared_statement_cache_capacity(256);
    Ok(())
}

/// Read-only connections to the database file, for autocommit reads.
fn open_readers(path: &Path) -> Result<Vec<Connection>> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    (0..READERS)
        .map(|_| {
            let connection =
                Connection::open_with_flags(path, flags).map_err(|error| Error::from(map_error(None, error)))?;
            configure(&connection).map_err(|error| Error::from(map_error(Some(&connection), error)))?;
            Ok(connection)
        })
        .collect()
}

/// Applies pending migrations before the connection is shared; opening is
/// synchronous, so this uses rusqlite directly with the shared plan.
fn migrate_blocking(connection: &mut Connection) -> Result<()> {
    let run = |connection: &mut Connection| -> DbResult<usize> {
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(plain_error)?;
        tx.execute_batch(migrate::CREATE_TABLE).map_err(plain_error)?;
        let applied = run_query(&tx, migrate::SELECT_APPLIED, &[])?;
        let applied = applied.iter().map(|row| row.int(0)).collect::<Result<Vec<_>>>().map_err(domain_error)?;
        let pending = migrate::pending(&applied, MIGRATIONS).map_err(domain_error)?;
        for migration in &pending {
            tx.execute_batch(migration.sql).map_err(plain_error)?;
            run_execute(&tx, migrate::INSERT_APPLIED, &[Value::Int(migration.version), Value::Int(now_micros())])?;
            tracing::info!(version = migration.version, "applied schema migration");
        }
        tx.commit().map_err(plain_error)?;
        Ok(pending.len())
    };
    let applied = run(connection)?;
    tracing::debug!(applied, known = MIGRATIONS.len(), "schema is up to date");
    Ok(())
}

fn plain_error(error: rusqlite::Error) -> DbError {
    map_error(None, error)
}

fn domain_error(error: Error) -> DbError {
    DbError::Other(error.message)
}

/// Logical transactions committed together in one SQLite transaction, at most.
const MAX_GROUP_COMMIT: usize = 256;
/// The longest a group stays open while more work keeps arriving, so the
/// first transaction of a busy group is not acknowledged late.
const MAX_GROUP_DURATION: Duration = Duration::from_millis(5);
/// Read-only connections serving autocommit reads of a database file.
const READERS: usize = 4;

/// A completion waiting for the group's COMMIT.
type Acknowledgement = Box<dyn FnOnce(DbResult<()>) + Send>;

/// What the async side asks of the writer thread.
enum WriterCommand {
    /// Opens a logical transaction; its statements follow on the returned channel.
    Begin { reply: oneshot::Sender<DbResult<mpsc::Sender<TxCommand>>> },
    /// One autocommit write: a logical transaction of one statement.
    Execute { sql: String, params: Vec<Value>, reply: oneshot::Sender<DbResult<u64>> },
    /// An autocommit read where no reader connections exist (in-memory databases).
    Query { sql: String, params: Vec<Value>, reply: oneshot::Sender<DbResult<Vec<Row>>> },
    /// A whole logical transaction, run by the writer thread in one go.
    Job { job: Job, reply: oneshot::Sender<Result<Box<dyn Any + Send>>> },
}

/// A statement of an open logical transaction.
enum TxCommand {
    Query { sql: String, params: Vec<Value>, reply: oneshot::Sender<DbResult<Vec<Row>>> },
    Execute { sql: String, params: Vec<Value>, reply: oneshot::Sender<DbResult<u64>> },
    Script { sql: String, reply: oneshot::Sender<DbResult<()>> },
    Commit { reply: oneshot::Sender<DbResult<()>> },
    Rollback { reply: oneshot::Sender<DbResult<()>> },
}

/// The SQLite engine: one writer thread and a few reader connections.
///
/// The writer thread owns the only read-write connection; transactions are
/// sent to it as messages, so no lock is held across an `.await` anywhere.
/// It runs each logical transaction inside a SAVEPOINT of a larger SQLite
/// transaction and commits that one when no further work is waiting (or
/// after [`MAX_GROUP_COMMIT`]): one fsync then makes a whole group durable.
/// A logical commit is acknowledged only after that COMMIT succeeded; if it
/// fails, every member of the group gets the error, so nothing acknowledged
/// is ever lost. Autocommit reads go to separate read-only connections,
/// which under WAL see committed data only and never wait for the writer.
struct SqliteEngine {
    writer: mpsc::Sender<WriterCommand>,
    readers: Option<Arc<ReaderPool>>,
}

struct ReaderPool {
    idle: std::sync::Mutex<Vec<Connection>>,
    permits: tokio::sync::Semaphore,
}

fn disconnected() -> DbError {
    DbError::Unavailable("the sqlite writer thread has stopped".into())
}

async fn answer<T>(receiver: oneshot::Receiver<DbResult<T>>) -> DbResult<T> {
    receiver.await.unwrap_or_else(|_| Err(disconnected()))
}

impl SqliteEngine {
    /// A database file has a checkpointer and group-commits; an in-memory
    /// one has neither (there is no WAL, and nothing to share an fsync).
    fn start(
        connection: Connection,
        readers: Vec<Connection>,
        checkpointer: Option<checkpoint::Checkpointer>,
    ) -> Result<Self> {
        let (writer, commands) = mpsc::channel();
        let group_commit = checkpointer.is_some();
        std::thread::Builder::new()
            .name("beseda-sqlite-writer".into())
            .spawn(move || {
                Writer {
                    connection,
                    group_commit,
                    checkpointer,
                    lost_groups: 0,
                    pending: Vec::new(),
                    in_group: false,
                    group_started: std::time::Instant::now(),
                }
                .run(commands)
            })
            .map_err(|error| Error::internal(format!("cannot start the sqlite writer thread: {error}")))?;
        let readers = (!readers.is_empty()).then(|| {
            Arc::new(ReaderPool {
                permits: tokio::sync::Semaphore::new(readers.len()),
                idle: std::sync::Mutex::new(readers),
            })
        });
        Ok(SqliteEngine { writer, readers })
    }

    async fn read(pool: &Arc<ReaderPool>, sql: String, params: Vec<Value>) -> DbResult<Vec<Row>> {
        let _permit = pool.permits.acquire().await.map_err(|_| disconnected())?;
        let connection = pool.idle.lock().map_err(|_| disconnected())?.pop().ok_or_else(disconnected)?;
        let pool = pool.clone();
        tokio::task::spawn_blocking(move || {
            let result = run_query(&connection, &sql, &params);
            if let Ok(mut idle) = pool.idle.lock() {
                idle.push(connection);
            }
            result
        })
        .await
        .map_err(|error| DbError::Other(format!("sqlite reader failed: {error}")))?
    }
}

#[async_trait]
impl Engine for SqliteEngine {
    async fn query(&self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        if let Some(pool) = &self.readers {
            return Self::read(pool, sql.to_owned(), params.to_vec()).await;
        }
        let (reply, receiver) = oneshot::channel();
        let command = WriterCommand::Query { sql: sql.to_owned(), params: params.to_vec(), reply };
        self.writer.send(command).map_err(|_| disconnected())?;
        answer(receiver).await
    }

    async fn execute(&self, sql: &str, params: &[Value]) -> DbResult<u64> {
        let (reply, receiver) = oneshot::channel();
        let command = WriterCommand::Execute { sql: sql.to_owned(), params: params.to_vec(), reply };
        self.writer.send(command).map_err(|_| disconnected())?;
        answer(receiver).await
    }

    async fn begin(&self) -> DbResult<Box<dyn Transaction>> {
        let (reply, receiver) = oneshot::channel();
        self.writer.send(WriterCommand::Begin { reply }).map_err(|_| disconnected())?;
        let statements = answer(receiver).await?;
        Ok(Box::new(SqliteTransaction { statements: Some(statements) }))
    }

    /// One hand-over to the writer thread for the whole transaction instead
    /// of one per statement, BEGIN and COMMIT; and the writer is not idle
    /// while the async side prepares the next statement.
    async fn run_job(&self, job: Job) -> Result<Box<dyn Any + Send>> {
        let (reply, receiver) = oneshot::channel();
        self.writer.send(WriterCommand::Job { job, reply }).map_err(|_| disconnected())?;
        receiver.await.unwrap_or_else(|_| Err(disconnected().into()))
    }
}

/// The async side of a logical transaction. Dropping it (its channel) makes
/// the writer roll the transaction back.
struct SqliteTransaction {
    statements: Option<mpsc::Sender<TxCommand>>,
}

impl SqliteTransaction {
    async fn send<T>(&self, command: impl FnOnce(oneshot::Sender<DbResult<T>>) -> TxCommand) -> DbResult<T> {
        let statements =
            self.statements.as_ref().ok_or_else(|| DbError::Other("sqlite transaction already ended".into()))?;
        let (reply, receiver) = oneshot::channel();
        statements.send(command(reply)).map_err(|_| disconnected())?;
        answer(receiver).await
    }
}

#[async_trait]
impl Executor for SqliteTransaction {
    async fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        let (sql, params) = (sql.to_owned(), params.to_vec());
        self.send(|reply| TxCommand::Query { sql, params, reply }).await
    }

    async fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64> {
        let (sql, params) = (sql.to_owned(), params.to_vec());
        self.send(|reply| TxCommand::Execute { sql, params, reply }).await
    }
}

#[async_trait]
impl Transaction for SqliteTransaction {
    async fn execute_script(&mut self, sql: &str) -> DbResult<()> {
        let sql = sql.to_owned();
        self.send(|reply| TxCommand::Script { sql, reply }).await
    }

    async fn commit(mut self: Box<Self>) -> DbResult<()> {
        let result = self.send(|reply| TxCommand::Commit { reply }).await;
        self.statements = None;
        result
    }

    async fn rollback(mut self: Box<Self>) -> DbResult<()> {
        let result = self.send(|reply| TxCommand::Rollback { reply }).await;
        self.statements = None;
        result
    }
}

/// How a logical transaction ended on the writer.
enum Ended {
    /// Released into the group; acknowledged when the group commits.
    Released(Acknowledgement),
    RolledBack,
    /// SQLite rolled back the whole group (an I/O error, say).
    GroupLost(DbError),
}

/// The writer thread's state.
struct Writer {
    connection: Connection,
    group_commit: bool,
    /// Stopped when the writer stops; `None` for in-memory databases.
    checkpointer: Option<checkpoint::Checkpointer>,
    /// Groups rolled back by a failure so far.
    lost_groups: u64,
    /// Logical commits waiting for the group's COMMIT.
    pending: Vec<Acknowledgement>,
    in_group: bool,
    group_started: std::time::Instant,
}

const SAVEPOINT: &str = "SAVEPOINT beseda_tx";
const RELEASE: &str = "RELEASE beseda_tx";
const ROLLBACK_SAVEPOINT: &str = "ROLLBACK TO beseda_tx; RELEASE beseda_tx";

impl Writer {
    fn run(mut self, commands: mpsc::Receiver<WriterCommand>) {
        loop {
            let command = if self.pending.is_empty() {
                match commands.recv() {
                    Ok(command) => command,
                    Err(_) => break,
                }
            } else if self.pending.len() >= MAX_GROUP_COMMIT || self.group_started.elapsed() >= MAX_GROUP_DURATION {
                self.commit_group();
                continue;
            } else {
                match commands.try_recv() {
                    Ok(command) => command,
                    Err(mpsc::TryRecvError::Empty) => {
                        self.commit_group();
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            };
            self.handle(command);
            if !self.group_commit {
                self.commit_group();
            }
        }
        self.commit_group();
        if let Some(checkpointer) = self.checkpointer.take() {
            checkpointer.stop();
        }
    }

    fn batch(&self, sql: &str) -> DbResult<()> {
        self.connection.execute_batch(sql).map_err(|error| map_error(Some(&self.connection), error))
    }

    fn open_group(&mut self) -> DbResult<()> {
        if !self.in_group {
            // IMMEDIATE takes the write lock now, so a group never fails
            // half-way for lack of it.
            self.batch("BEGIN IMMEDIATE")?;
            self.in_group = true;
            self.group_started = std::time::Instant::now();
        }
        Ok(())
    }

    fn handle(&mut self, command: WriterCommand) {
        match command {
            WriterCommand::Query { sql, params, reply } => {
                let _ = reply.send(run_query(&self.connection, &sql, &params));
            }
            WriterCommand::Execute { sql, params, reply } => {
                if let Err(error) = self.open_group().and_then(|()| self.batch(SAVEPOINT)) {
                    let _ = reply.send(Err(error));
                    return;
                }
                match run_execute(&self.connection, &sql, &params) {
                    Ok(changed) => self.release(Box::new(move |result| {
                        let _ = reply.send(result.map(|()| changed));
                    })),
                    Err(error) => {
                        self.abandon();
                        let _ = reply.send(Err(error));
                    }
                }
            }
            WriterCommand::Begin { reply } => {
                if let Err(error) = self.open_group().and_then(|()| self.batch(SAVEPOINT)) {
                    let _ = reply.send(Err(error));
                    return;
                }
                let (statements, incoming) = mpsc::channel();
                if reply.send(Ok(statements)).is_err() {
                    self.abandon();
                    return;
                }
                match self.serve_transaction(&incoming) {
                    Ended::Released(acknowledge) => self.pending.push(acknowledge),
                    Ended::RolledBack => {}
                    Ended::GroupLost(error) => self.fail_group(error),
                }
            }
            WriterCommand::Job { job, reply } => {
                if let Err(error) = self.open_group().and_then(|()| self.batch(SAVEPOINT)) {
                    let _ = reply.send(Err(error.into()));
                    return;
                }
                match run_job(&mut self.connection, job) {
                    Ok((output, Finish::Commit)) => self.release(Box::new(move |result| {
                        let _ = reply.send(result.map(|()| output).map_err(Error::from));
                    })),
                    Ok((output, Finish::Rollback)) => {
                        self.roll_back_and_answer(Box::new(move |result| {
                            let _ = reply.send(result.map(|()| output).map_err(Error::from));
                        }));
                    }
                    Err(error) => {
                        self.abandon();
                        let _ = reply.send(Err(error));
                    }
                }
            }
        }
    }

    /// Runs one logical transaction's statements until it commits, rolls
    /// back or is dropped.
    fn serve_transaction(&mut self, incoming: &mpsc::Receiver<TxCommand>) -> Ended {
        loop {
            let Ok(command) = incoming.recv() else {
                self.abandon();
                return Ended::RolledBack;
            };
            let failed = match command {
                TxCommand::Query { sql, params, reply } => {
                    let result = run_query(&self.connection, &sql, &params);
                    let failed = result.is_err();
                    let _ = reply.send(result);
                    failed
                }
                TxCommand::Execute { sql, params, reply } => {
                    let result = run_execute(&self.connection, &sql, &params);
                    let failed = result.is_err();
                    let _ = reply.send(result);
                    failed
                }
                TxCommand::Script { sql, reply } => {
                    let result = self.batch(&sql);
                    let failed = result.is_err();
                    let _ = reply.send(result);
                    failed
                }
                TxCommand::Commit { reply } => {
                    return match self.batch(RELEASE) {
                        Ok(()) => Ended::Released(Box::new(move |result| {
                            let _ = reply.send(result);
                        })),
                        Err(error) => {
                            self.abandon();
                            let _ = reply.send(Err(error));
                            Ended::RolledBack
                        }
                    };
                }
                TxCommand::Rollback { reply } => {
                    self.roll_back_and_answer(Box::new(move |result| {
                        let _ = reply.send(result);
                    }));
                    return Ended::RolledBack;
                }
            };
            // Some errors (I/O, disk full) make SQLite roll back the whole
            // transaction, taking released savepoints of the group with it.
            if failed && self.in_group && self.connection.is_autocommit() {
                self.in_group = false;
                return Ended::GroupLost(DbError::Unavailable(
                    "sqlite rolled back the transaction after an error".into(),
                ));
            }
        }
    }

    /// Releases a one-statement logical transaction into the group.
    fn release(&mut self, acknowledge: Acknowledgement) {
        match self.batch(RELEASE) {
            Ok(()) => self.pending.push(acknowledge),
            Err(error) => {
                self.abandon();
                acknowledge(Err(error));
            }
        }
    }

    /// Rolls the current logical transaction back, keeping the group.
    fn abandon(&mut self) {
        if self.connection.is_autocommit() {
            if self.in_group {
                // SQLite already rolled back the whole group after an error
                // (I/O, disk full): its released members are lost too and
                // must not be acknowledged as committed.
                self.fail_group(DbError::Unavailable("sqlite rolled back the transaction after an error".into()));
            }
            return;
        }
        if let Err(error) = self.batch(ROLLBACK_SAVEPOINT) {
            tracing::warn!(?error, "sqlite savepoint rollback failed; abandoning the group");
            self.fail_group(error);
        }
    }

    /// Rolls the current logical transaction back on its request and answers
    /// it. The answer may rest on what earlier members of the open group
    /// wrote (a retried append finds the message a neighbour stored a moment
    /// before and returns it), so, like a commit's, it is given only once
    /// that group has committed, and becomes the group's error if it fails.
    fn roll_back_and_answer(&mut self, acknowledge: Acknowledgement) {
        let lost_groups = self.lost_groups;
        self.abandon();
        if self.lost_groups != lost_groups {
            acknowledge(Err(DbError::Unavailable("sqlite rolled back the transaction after an error".into())));
        } else if self.in_group {
            self.pending.push(acknowledge);
        } else {
            acknowledge(Ok(()));
        }
    }

    fn fail_group(&mut self, error: DbError) {
        if !self.connection.is_autocommit() {
            let _ = self.connection.execute_batch("ROLLBACK");
        }
        self.in_group = false;
        self.lost_groups += 1;
        for acknowledge in self.pending.drain(..) {
            acknowledge(Err(error.clone()));
        }
    }

    fn commit_group(&mut self) {
        if !self.in_group {
            for acknowledge in self.pending.drain(..) {
                acknowledge(Ok(()));
            }
            return;
        }
        metrics::histogram!("beseda_store_group_commit_size").record(self.pending.len() as f64);
        match self.batch("COMMIT") {
            Ok(()) => {
                self.in_group = false;
                for acknowledge in self.pending.drain(..) {
                    acknowledge(Ok(()));
                }
                if let Some(checkpointer) = &self.checkpointer {
                    checkpointer.after_commit();
                }
            }
            Err(error) => {
                tracing::error!(?error, transactions = self.pending.len(), "sqlite group commit failed");
                self.fail_group(error);
            }
        }
    }
}

/// The writer connection as the [`Executor`] of a [`Job`]. Its futures are
/// ready at once: every statement runs synchronously when it is awaited.
struct WriterExecutor<'c> {
    /// `&mut`, not `&`: a `Connection` is `Send` but not `Sync`, and the
    /// executor must be `Send`.
    connection: &'c mut Connection,
}

#[async_trait]
impl Executor for WriterExecutor<'_> {
    async fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        run_query(self.connection, sql, params)
    }

    async fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64> {
        run_execute(self.connection, sql, params)
    }
}

/// Runs a job to completion on the writer thread. Since the statements'
/// futures are ready at once, a job finishes in one poll; there is no
/// runtime here to wake it, so a job that waits on anything else is a bug,
/// reported as `internal` (and its statements rolled back by the caller). A
/// panic is caught likewise, so one bad job cannot stop the writer.
fn run_job(connection: &mut Connection, job: Job) -> JobResult {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut executor = WriterExecutor { connection };
        let mut future = job(&mut executor);
        future.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }));
    match outcome {
        Ok(Poll::Ready(result)) => result,
        Ok(Poll::Pending) => {
            Err(Error::internal("a sqlite transaction job waited on something other than its own statements"))
        }
        Err(panic) => {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(reason, "a sqlite transaction job panicked");
            Err(Error::internal(format!("a sqlite transaction job panicked: {reason}")))
        }
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(value) => ValueRef::Integer(*value),
            Value::Text(text) => ValueRef::Text(text.as_bytes()),
            Value::Bool(value) => ValueRef::Integer(i64::from(*value)),
            Value::Bytes(bytes) => ValueRef::Blob(bytes),
        }))
    }
}

/// Rewrites PostgreSQL's `$1` placeholders as SQLite's `?1`. The domain's
/// SQL has no `$` inside string literals, so a plain scan is exact.
fn sqlite_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(ch);
        }
    }
    out
}

fn run_query(connection: &Connection, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
    let fail = |error| map_error(Some(connection), error);
    let mut statement = connection.prepare_cached(&sqlite_sql(sql)).map_err(fail)?;
    let columns = statement.column_count();
    let mut rows = statement.query(rusqlite::params_from_iter(params)).map_err(fail)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(fail)? {
        let mut values = Vec::with_capacity(columns);
        for index in 0..columns {
            values.push(match row.get_ref(index).map_err(fail)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(value) => Value::Int(value),
                ValueRef::Text(text) => Value::Text(
                    String::from_utf8(text.to_vec())
                        .map_err(|_| DbError::Other(format!("column {index} holds text that is not utf-8")))?,
                ),
                ValueRef::Blob(bytes) => Value::Bytes(bytes.to_vec()),
                ValueRef::Real(_) => return Err(DbError::Other(format!("column {index} holds an unexpected real"))),
            });
        }
        out.push(Row(values));
    }
    Ok(out)
}

fn run_execute(connection: &Connection, sql: &str, params: &[Value]) -> DbResult<u64> {
    let fail = |error| map_error(Some(connection), error);
    let mut statement = connection.prepare_cached(&sqlite_sql(sql)).map_err(fail)?;
    let changed = statement.execute(rusqlite::params_from_iter(params)).map_err(fail)?;
    Ok(u64::try_from(changed).unwrap_or(u64::MAX))
}

/// Maps a rusqlite error. Unique violations are named after the violated
/// index as PostgreSQL names them (`<table>_pkey` for primary keys), which
/// needs the connection to look the index up.
fn map_error(connection: Option<&Connection>, error: rusqlite::Error) -> DbError {
    use rusqlite::ffi;
    if let rusqlite::Error::SqliteFailure(failure, message) = &error {
        let unique = [ffi::SQLITE_CONSTRAINT_UNIQUE, ffi::SQLITE_CONSTRAINT_PRIMARYKEY];
        if unique.contains(&failure.extended_code) {
            let message = message.clone().unwrap_or_default();
            let constraint = connection.and_then(|connection| unique_index_name(connection, &message));
            return DbError::Unique { constraint: constraint.unwrap_or(message) };
        }
        if matches!(
            failure.code,
            rusqlite::ErrorCode::DatabaseBusy
                | rusqlite::ErrorCode::DatabaseLocked
                | rusqlite::ErrorCode::CannotOpen
                | rusqlite::ErrorCode::SystemIoFailure
                | rusqlite::ErrorCode::DiskFull
                | rusqlite::ErrorCode::ReadOnly
                | rusqlite::ErrorCode::PermissionDenied
        ) {
            return DbError::Unavailable(format!("sqlite: {error}"));
        }
    }
    DbError::Other(format!("sqlite: {error}"))
}

/// Finds the unique index a "UNIQUE constraint failed: t.a, t.b" message
/// refers to. SQLite reports columns, not index names, for these.
fn unique_index_name(connection: &Connection, message: &str) -> Option<String> {
    let detail = message.strip_prefix("UNIQUE constraint failed: ")?;
    if let Some(name) = detail.strip_prefix("index '").and_then(|rest| rest.strip_suffix('\'')) {
        return Some(name.to_owned());
    }
    let mut table = None;
    let mut columns = Vec::new();
    for qualified in detail.split(", ") {
        let (owner, column) = qualified.split_once('.')?;
        if table.is_some_and(|table| table != owner) {
            return None;
        }
        table = Some(owner);
        columns.push(column.to_owned());
    }
    let table = table?;
    let mut indexes = connection.prepare("SELECT name, origin FROM pragma_index_list(?1) WHERE \"unique\" = 1").ok()?;
    let indexes = indexes
        .query_map([table], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))
        .ok()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ok()?;
    for (name, origin) in indexes {
        let mut info = connection.prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno").ok()?;
        let indexed =
            info.query_map([&name], |row| row.get::<_, String>(0)).ok()?.collect::<rusqlite::Result<Vec<_>>>().ok()?;
        if indexed == columns {
            return Some(if origin == "pk" { format!("{table}_pkey") } else { name });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_rewritten_for_sqlite() {
        assert_eq!(sqlite_sql("SELECT $1, $12 WHERE a = '$'"), "SELECT ?1, ?12 WHERE a = '$'");
    }

    #[test]
    fn unique_violations_are_named_like_postgres_names_them() {
        let connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch(
                "CREATE TABLE t (a TEXT NOT NULL, b TEXT NOT NULL, c TEXT, PRIMARY KEY (a, b));
                 CREATE UNIQUE INDEX t_c_uq ON t (a, c);
                 INSERT INTO t VALUES ('1', '1', 'x');",
            )
            .unwrap();
        let failure = |sql: &str| map_error(Some(&connection), connection.execute(sql, []).unwrap_err());
        assert_eq!(failure("INSERT INTO t VALUES ('1', '1', 'y')"), DbError::Unique { constraint: "t_pkey".into() });
        assert_eq!(failure("INSERT INTO t VALUES ('1', '2', 'x')"), DbError::Unique { constraint: "t_c_uq".into() });
    }

    #[tokio::test]
    async fn a_dropped_transaction_rolls_back_and_frees_the_connection() {
        let store = SqliteStore::open_in_memory().unwrap();
        let engine = store.engine();
        let mut tx = engine.begin().await.unwrap();
        tx.execute(
            "INSERT INTO subscribers (id, email, administration_key_hash, created_at) VALUES ($1, $2, NULL, 0)",
            &["s1".into(), "s1@example.com".into()],
        )
        .await
        .unwrap();
        drop(tx);
        let rows = engine.query("SELECT COUNT(*) FROM subscribers", &[]).await.unwrap();
        assert_eq!(rows[0].int(0).unwrap(), 0);
        // The connection is free again for a new transaction.
        let tx = engine.begin().await.unwrap();
        tx.commit().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_acknowledged_write_is_committed_when_acknowledged() {
        // Many concurrent writers are grouped into few commits; each one's
        // acknowledgement must mean "committed": another connection sees it.
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("beseda.db");
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        let mut writers = Vec::new();
        for index in 0..64 {
            let store = store.clone();
            let path = path.clone();
            writers.push(tokio::spawn(async move {
                let id = format!("s{index}");
                let mut tx = store.engine().begin().await.unwrap();
                tx.execute(
                    "INSERT INTO subscribers (id, email, administration_key_hash, created_at) VALUES ($1, $2, NULL, 0)",
                    &[id.clone().into(), format!("{id}@example.com").into()],
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
                let outsider = Connection::open(&path).unwrap();
                let seen: i64 = outsider
                    .query_row("SELECT COUNT(*) FROM subscribers WHERE id = ?1", [&id], |row| row.get(0))
                    .unwrap();
                assert_eq!(seen, 1, "{id} was acknowledged before it was committed");
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        let rows = store.engine().query("SELECT COUNT(*) FROM subscribers", &[]).await.unwrap();
        assert_eq!(rows[0].int(0).unwrap(), 64);
    }

    #[tokio::test]
    async fn a_failed_statement_rolls_back_only_its_own_transaction() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("beseda.db")).unwrap();
        let insert =
            "INSERT INTO subscribers (id, email, administration_key_hash, created_at) VALUES ($1, $2, NULL, 0)";
        let mut first = store.engine().begin().await.unwrap();
        first.execute(insert, &["a".into(), "a@example.com".into()]).await.unwrap();
        first.commit().await.unwrap();
        let mut second = store.engine().begin().await.unwrap();
        second.execute(insert, &["b".into(), "b@example.com".into()]).await.unwrap();
        assert!(second.execute(insert, &["a".into(), "again@example.com".into()]).await.is_err());
        second.rollback().await.unwrap();
        let ids = store.engine().query("SELECT id FROM subscribers ORDER BY id", &[]).await.unwrap();
        assert_eq!(ids.len(), 1, "only the committed transaction's row remains: {ids:?}");
    }

    const INSERT_SUBSCRIBER: &str =
        "INSERT INTO subscribers (id, email, administration_key_hash, created_at) VALUES ($1, $2, NULL, 0)";

    /// A job inserting subscriber `id`, then, if `fail`, a duplicate of the
    /// first one (a unique violation) after it.
    async fn insert_job(engine: &dyn Engine, id: String, fail: bool) -> Result<String> {
        crate::engine::transaction(engine, move |tx| {
            Box::pin(async move {
                tx.execute(INSERT_SUBSCRIBER, &[id.clone().into(), format!("{id}@example.com").into()]).await?;
                if fail {
                    tx.execute(INSERT_SUBSCRIBER, &["s0".into(), "again@example.com".into()]).await?;
                }
                Ok((id, Finish::Commit))
            })
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_group_commit_and_a_failing_one_does_not_fail_its_neighbours() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("beseda.db");
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        insert_job(store.engine(), "s0".into(), false).await.unwrap();
        let mut jobs = Vec::new();
        for index in 1..=64 {
            let (store, path) = (store.clone(), path.clone());
            jobs.push(tokio::spawn(async move {
                let fail = index % 3 == 0;
                let result = insert_job(store.engine(), format!("s{index}"), fail).await;
                let outsider = Connection::open(&path).unwrap();
                let seen: i64 = outsider
                    .query_row("SELECT COUNT(*) FROM subscribers WHERE id = ?1", [format!("s{index}")], |row| {
                        row.get(0)
                    })
                    .unwrap();
                if fail {
                    assert!(result.is_err(), "s{index} should have failed");
                    assert_eq!(seen, 0, "the failed job's own first insert was kept");
                } else {
                    assert_eq!(result.unwrap(), format!("s{index}"));
                    assert_eq!(seen, 1, "s{index} was acknowledged before it was committed");
                }
            }));
        }
        for job in jobs {
            job.await.unwrap();
        }
        let rows = store.engine().query("SELECT COUNT(*) FROM subscribers", &[]).await.unwrap();
        assert_eq!(rows[0].int(0).unwrap(), 1 + 64 - 21);
    }

    #[tokio::test]
    async fn a_job_that_asks_for_rollback_returns_its_output_and_keeps_nothing() {
        let store = SqliteStore::open_in_memory().unwrap();
        let output = crate::engine::transaction(store.engine(), |tx| {
            Box::pin(async move {
                tx.execute(INSERT_SUBSCRIBER, &["r".into(), "r@example.com".into()]).await?;
                Ok((7_u32, Finish::Rollback))
            })
        })
        .await
        .unwrap();
        assert_eq!(output, 7);
        let rows = store.engine().query("SELECT COUNT(*) FROM subscribers", &[]).await.unwrap();
        assert_eq!(rows[0].int(0).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_job_that_waits_on_something_else_or_panics_is_rolled_back_and_the_writer_goes_on() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("beseda.db")).unwrap();
        let waits = crate::engine::transaction(store.engine(), |tx| {
            Box::pin(async move {
                tx.execute(INSERT_SUBSCRIBER, &["w".into(), "w@example.com".into()]).await?;
                tokio::task::yield_now().await;
                Ok(((), Finish::Commit))
            })
        })
        .await;
        assert_eq!(waits.unwrap_err().code, ErrorCode::Internal);
        let panics = crate::engine::transaction(store.engine(), |tx| {
            Box::pin(async move {
                tx.execute(INSERT_SUBSCRIBER, &["p".into(), "p@example.com".into()]).await?;
                panic!("a bug in a job");
                #[allow(unreachable_code)]
                Ok(((), Finish::Commit))
            })
        })
        .await;
        assert!(panics.unwrap_err().message.contains("a bug in a job"));
        insert_job(store.engine(), "after".into(), false).await.unwrap();
        let ids = store.engine().query("SELECT id FROM subscribers", &[]).await.unwrap();
        assert_eq!(ids, vec![Row(vec![Value::Text("after".into())])]);
    }

    #[test]
    fn migrating_twice_applies_nothing_the_second_time() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("nested").join("beseda.db");
        drop(SqliteStore::open(&path).unwrap());
        drop(SqliteStore::open(&path).unwrap());
        let connection = Connection::open(&path).unwrap();
        let versions: Vec<i64> = connection
            .prepare("SELECT version FROM schema_migrations")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(versions, vec![1, 2, 3, 4, 5]);
        let mode: String = connection.query_row("PRAGMA journal_mode", [], |row| row.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }
}
