//! The embedded SQLite engine: one file under the data directory, one
//! connection.
//!
//! Concurrency design: the single `rusqlite::Connection` lives behind a
//! `tokio::sync::Mutex`. Every statement runs on the blocking pool
//! (`spawn_blocking`) with the mutex's *owned* guard moved into the closure
//! and back, so no std mutex is ever held across an `.await` and no runtime
//! thread blocks on SQLite I/O. A transaction keeps the owned guard for its
//! whole life: SQLite has one writer anyway, and holding the connection is
//! what makes `BEGIN IMMEDIATE ... COMMIT` exclusive. A transaction dropped
//! without commit rolls back in `Drop`; should a guard ever be released with
//! a transaction still open (a panic mid-statement), the next user of the
//! connection rolls it back before doing anything else.
//!
//! Case-insensitive search compares Rust-lower-cased copies (`*_lower`
//! columns), so it folds all of Unicode although SQLite's own `LOWER` and
//! `LIKE` fold ASCII only.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use beseda_core::model::*;
use beseda_core::{Error, ErrorCode, Result};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::domain::SqlStore;
use crate::engine::{DbError, DbResult, Engine, Executor, Row, Transaction, Value};
use crate::migrate::{self, Migration};

/// The SQLite schema migrations, in order.
const MIGRATIONS: &[Migration] =
    &[Migration { version: 1, sql: include_str!("../migrations/sqlite/0001_initial.sql") }];

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
        tracing::info!(path = %path.display(), "opened sqlite database");
        Self::from_connection(connection)
    }

    /// A private in-memory database (tests, ephemeral runs).
    pub fn open_in_memory() -> Result<Self> {
        let connection = Connection::open_in_memory().map_err(|error| Error::from(map_error(None, error)))?;
        Self::from_connection(connection)
    }

    fn from_connection(mut connection: Connection) -> Result<Self> {
        let configure = |connection: &Connection| -> rusqlite::Result<()> {
            connection.pragma_update(None, "foreign_keys", "ON")?;
            connection.busy_timeout(BUSY_TIMEOUT)?;
            connection.set_prepared_statement_cache_capacity(256);
            Ok(())
        };
        configure(&connection).map_err(|error| Error::from(map_error(Some(&connection), error)))?;
        migrate_blocking(&mut connection)?;
        let engine = SqliteEngine { connection: Arc::new(Mutex::new(connection)) };
        Ok(SqlStore::new(Box::new(engine)))
    }
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

struct SqliteEngine {
    connection: Arc<Mutex<Connection>>,
}

type Guard = OwnedMutexGuard<Connection>;

/// Runs `work` on the blocking pool with the connection, handing the guard
/// back with the result.
async fn blocking<T, F>(guard: Guard, work: F) -> DbResult<(Guard, DbResult<T>)>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> DbResult<T> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let mut guard = guard;
        let result = work(&mut guard);
        (guard, result)
    })
    .await
    .map_err(|error| DbError::Other(format!("sqlite worker failed: {error}")))
}

/// Rolls back a transaction a previous holder of the connection left open.
fn recover(connection: &Connection) -> DbResult<()> {
    if !connection.is_autocommit() {
        tracing::warn!("rolling back a sqlite transaction left open");
        connection.execute_batch("ROLLBACK").map_err(|error| map_error(Some(connection), error))?;
    }
    Ok(())
}

impl SqliteEngine {
    async fn with_connection<T, F>(&self, work: F) -> DbResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> DbResult<T> + Send + 'static,
    {
        let guard = self.connection.clone().lock_owned().await;
        let (_guard, result) = blocking(guard, move |connection| {
            recover(connection)?;
            work(connection)
        })
        .await?;
        result
    }
}

#[async_trait]
impl Engine for SqliteEngine {
    async fn query(&self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        let (sql, params) = (sql.to_owned(), params.to_vec());
        self.with_connection(move |connection| run_query(connection, &sql, &params)).await
    }

    async fn execute(&self, sql: &str, params: &[Value]) -> DbResult<u64> {
        let (sql, params) = (sql.to_owned(), params.to_vec());
        self.with_connection(move |connection| run_execute(connection, &sql, &params)).await
    }

    async fn begin(&self) -> DbResult<Box<dyn Transaction>> {
        let guard = self.connection.clone().lock_owned().await;
        let (guard, result) = blocking(guard, |connection| {
            recover(connection)?;
            // IMMEDIATE takes the write lock now, not at the first write, so
            // a transaction never fails half-way for lack of it.
            connection.execute_batch("BEGIN IMMEDIATE").map_err(|error| map_error(Some(connection), error))
        })
        .await?;
        result?;
        Ok(Box::new(SqliteTransaction { guard: Some(guard) }))
    }
}

/// An open `BEGIN IMMEDIATE` transaction; owns the connection until it ends.
struct SqliteTransaction {
    guard: Option<Guard>,
}

impl SqliteTransaction {
    async fn run<T, F>(&mut self, work: F) -> DbResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> DbResult<T> + Send + 'static,
    {
        let guard = self.guard.take().ok_or_else(|| DbError::Other("sqlite transaction already ended".into()))?;
        let (guard, result) = blocking(guard, work).await?;
        self.guard = Some(guard);
        result
    }

    async fn finish(mut self: Box<Self>, statement: &'static str) -> DbResult<()> {
        self.run(move |connection| {
            connection.execute_batch(statement).map_err(|error| map_error(Some(connection), error))
        })
        .await
        // A failed COMMIT leaves the transaction open; Drop rolls it back.
    }
}

#[async_trait]
impl Executor for SqliteTransaction {
    async fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        let (sql, params) = (sql.to_owned(), params.to_vec());
        self.run(move |connection| run_query(connection, &sql, &params)).await
    }

    async fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64> {
        let (sql, params) = (sql.to_owned(), params.to_vec());
        self.run(move |connection| run_execute(connection, &sql, &params)).await
    }
}

#[async_trait]
impl Transaction for SqliteTransaction {
    async fn execute_script(&mut self, sql: &str) -> DbResult<()> {
        let sql = sql.to_owned();
        self.run(move |connection| connection.execute_batch(&sql).map_err(|error| map_error(Some(connection), error)))
            .await
    }

    async fn commit(self: Box<Self>) -> DbResult<()> {
        self.finish("COMMIT").await
    }

    async fn rollback(self: Box<Self>) -> DbResult<()> {
        self.finish("ROLLBACK").await
    }
}

impl Drop for SqliteTransaction {
    fn drop(&mut self) {
        // Rolling back only discards this connection's uncommitted pages (no
        // fsync), so doing it synchronously here is cheap.
        if let Some(guard) = self.guard.take()
            && !guard.is_autocommit()
            && let Err(error) = guard.execute_batch("ROLLBACK")
        {
            tracing::warn!(%error, "sqlite rollback failed; the next user of the connection retries it");
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
        assert_eq!(versions, vec![1]);
        let mode: String = connection.query_row("PRAGMA journal_mode", [], |row| row.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }
}
