//! The PostgreSQL engine, for clusters: tokio-postgres connections in a
//! deadpool pool.
//!
//! A transaction holds one pooled connection from `BEGIN` to `COMMIT`. If it
//! is dropped unfinished (an error path, a cancelled request), the connection
//! must not go back to the pool mid-transaction: `Drop` moves it into a task
//! that rolls back first, and a connection whose rollback fails, or that has
//! no runtime to roll back on, is detached from the pool and closed (the
//! server then aborts the transaction itself).
//!
//! Round trips: statements are prepared once per connection (deadpool's
//! statement cache), and a transaction's BEGIN is not a round trip of its
//! own: it is sent together with the first statement, pipelined on the
//! connection (tokio-postgres writes both before reading either answer).

use std::error::Error as _;
use std::time::Duration;

use async_trait::async_trait;
use beseda_core::{Error, Result};
use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Config, NoTls};

use crate::domain::SqlStore;
use crate::engine::{DbError, DbResult, Engine, Executor, Row, Transaction, Value};
use crate::migrate::{self, Migration};

/// The PostgreSQL schema migrations, in order.
const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, sql: include_str!("../migrations/postgres/0001_initial.sql") },
    Migration { version: 2, sql: include_str!("../migrations/postgres/0002_unread_counters.sql") },
    Migration { version: 3, sql: include_str!("../migrations/postgres/0003_bots.sql") },
    Migration { version: 4, sql: include_str!("../migrations/postgres/0004_integration_status_codes.sql") },
    Migration { version: 5, sql: include_str!("../migrations/postgres/0005_unread_from_read_marks.sql") },
];

/// Serializes migrations of one schema across nodes. Transaction-scoped, so
/// it is released with the migration's COMMIT (or a crash).
const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(1650811201, hashtext(current_schema()))";
const MIGRATION_LOCK_KEY: i32 = 1_650_811_201;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Dead-peer detection: a connection whose server vanished without a reset
/// (a failed-over host, a partition) would otherwise hang its queries until
/// the kernel gives up retransmitting, about 15 minutes on Linux, with
/// tokio-postgres's 2-hour keepalive idle. With these, an idle connection is
/// probed after 30 s and dropped after 3 unanswered probes 10 s apart, and
/// one with unacknowledged data is dropped after 30 s.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// tokio-postgres's own keepalive idle, which a URL that sets none leaves.
const DRIVER_KEEPALIVE_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// [`Store`](crate::Store) on PostgreSQL.
pub type PostgresStore = SqlStore;

impl PostgresStore {
    /// Connects a pool of at most `pool_size` connections to `url` (a
    /// `postgres://` URL or key-value string) and migrates the schema that
    /// the connection's `search_path` selects.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self> {
        Self::connect_with(parse_config(url)?, pool_size).await
    }

    /// Like [`connect`](Self::connect), but creates `schema` if needed and
    /// puts every pooled connection's `search_path` on it, so that separate
    /// schemas (tests, tenants of a shared server) never see each other.
    /// `schema` must be a plain identifier (ASCII letters, digits, `_`).
    pub async fn connect_in_schema(url: &str, schema: &str, pool_size: usize) -> Result<Self> {
        check_schema_name(schema)?;
        let mut config = parse_config(url)?;
        let client = connect_one(&config).await?;
        // Concurrent CREATE SCHEMA IF NOT EXISTS can still collide in the
        // catalog; the migration's advisory lock (same key) serializes it.
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY}, hashtext('{schema}')); \
                 CREATE SCHEMA IF NOT EXISTS \"{schema}\"; COMMIT"
            ))
            .await
            .map_err(pg_error)?;
        let options = match config.get_options() {
            Some(existing) if !existing.is_empty() => format!("{existing} -c search_path={schema}"),
            _ => format!("-c search_path={schema}"),
        };
        config.options(options);
        Self::connect_with(config, pool_size).await
    }

    /// Drops `schema` and everything in it (test clean-up).
    pub async fn drop_schema(url: &str, schema: &str) -> Result<()> {
        check_schema_name(schema)?;
        let client = connect_one(&parse_config(url)?).await?;
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await.map_err(pg_error)?;
        Ok(())
    }

    async fn connect_with(mut config: Config, pool_size: usize) -> Result<Self> {
        apply_connection_defaults(&mut config);
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|error| Error::internal(format!("cannot build postgres pool: {error}")))?;
        let engine = PostgresEngine { pool };
        migrate::run(&engine, MIGRATIONS, Some(MIGRATION_LOCK)).await?;
        tracing::info!(pool_size, "connected to postgres");
        Ok(SqlStore::new(Box::new(engine)))
    }
}

/// Timeouts and dead-peer detection, each unless the URL sets its own
/// (`connect_timeout`, `keepalives`, `keepalives_idle`,
/// `keepalives_interval`, `keepalives_retries`, `tcp_user_timeout`).
fn apply_connection_defaults(config: &mut Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    // `keepalives=0` turns probing off; the probe timings then do not matter.
    if config.get_keepalives() {
        if config.get_keepalives_idle() == DRIVER_KEEPALIVE_IDLE {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
    }
}

fn parse_config(url: &str) -> Result<Config> {
    url.parse::<Config>().map_err(|error| Error::internal(format!("invalid postgres url: {error}")))
}

fn check_schema_name(schema: &str) -> Result<()> {
    let mut chars = schema.chars();
    let valid = chars.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        && schema.len() <= 63;
    if !valid {
        return Err(Error::internal(format!("invalid postgres schema name {schema:?}")));
    }
    Ok(())
}

/// One connection outside the pool, for schema management.
async fn connect_one(config: &Config) -> Result<tokio_postgres::Client> {
    let mut config = config.clone();
    apply_connection_defaults(&mut config);
    let (client, connection) = config.connect(NoTls).await.map_err(pg_error)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "postgres connection ended with an error");
        }
    });
    Ok(client)
}

fn pg_error(error: tokio_postgres::Error) -> Error {
    map_error(error).into()
}

fn map_error(error: tokio_postgres::Error) -> DbError {
    if let Some(db) = error.as_db_error() {
        let code = db.code();
        if *code == SqlState::UNIQUE_VIOLATION {
            return DbError::Unique { constraint: db.constraint().unwrap_or_default().to_owned() };
        }
        // Class 08: connection exception; 53: insufficient resources;
        // 57P0x: the server is shutting down or restarting.
        let class = code.code();
        if class.starts_with("08") || class.starts_with("53") || class.starts_with("57P0") {
            return DbError::Unavailable(format!("postgres {class}: {}", db.message()));
        }
        return DbError::Other(format!("postgres {class}: {}", db.message()));
    }
    let io = error.source().is_some_and(|source| source.is::<std::io::Error>());
    if error.is_closed() || io {
        return DbError::Unavailable(format!("postgres: {error}"));
    }
    DbError::Other(format!("postgres: {error}"))
}

fn pool_error(error: PoolError) -> DbError {
    match error {
        PoolError::Backend(error) => map_error(error),
        other => DbError::Unavailable(format!("postgres pool: {other}")),
    }
}

struct PostgresEngine {
    pool: Pool,
}

impl PostgresEngine {
    async fn connection(&self) -> DbResult<Object> {
        self.pool.get().await.map_err(pool_error)
    }
}

fn as_params(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|value| value as &(dyn ToSql + Sync)).collect()
}

/// Prepared statements kept per connection. Filters and `IN` lists make
/// many distinct statement texts, and deadpool's cache never evicts, so it is
/// emptied when it reaches this size rather than growing without bound.
const STATEMENT_CACHE_LIMIT: usize = 512;

async fn prepare(client: &Object, sql: &str) -> DbResult<tokio_postgres::Statement> {
    if client.statement_cache.size() >= STATEMENT_CACHE_LIMIT {
        client.statement_cache.clear();
    }
    client.prepare_cached(sql).await.map_err(map_error)
}

async fn run_query(client: &Object, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
    let statement = prepare(client, sql).await?;
    let rows = client.query(&statement, &as_params(params)).await.map_err(map_error)?;
    rows.iter().map(convert_row).collect()
}

async fn run_execute(client: &Object, sql: &str, params: &[Value]) -> DbResult<u64> {
    let statement = prepare(client, sql).await?;
    client.execute(&statement, &as_params(params)).await.map_err(map_error)
}

fn convert_row(row: &tokio_postgres::Row) -> DbResult<Row> {
    let wrong = |index: usize, error: tokio_postgres::Error| DbError::Other(format!("column {index}: {error}"));
    let mut values = Vec::with_capacity(row.len());
    for (index, column) in row.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(index).map_err(|error| wrong(index, error))?.map(Value::Int)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(index).map_err(|error| wrong(index, error))?.map(|v| Value::Int(v.into()))
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(index).map_err(|error| wrong(index, error))?.map(|v| Value::Int(v.into()))
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(index).map_err(|error| wrong(index, error))?.map(Value::Bool)
        } else if *ty == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(index).map_err(|error| wrong(index, error))?.map(Value::Bytes)
        } else if <&str as tokio_postgres::types::FromSql>::accepts(ty) {
            row.try_get::<_, Option<String>>(index).map_err(|error| wrong(index, error))?.map(Value::Text)
        } else {
            return Err(DbError::Other(format!("column {index} has unsupported type {ty}")));
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(value) if *ty == Type::INT4 => i32::try_from(*value)?.to_sql(ty, out),
            Value::Int(value) if *ty == Type::INT2 => i16::try_from(*value)?.to_sql(ty, out),
            Value::Int(value) if *ty == Type::INT8 => value.to_sql(ty, out),
            Value::Text(text) if <&str as ToSql>::accepts(ty) => text.as_str().to_sql(ty, out),
            Value::Bool(value) if *ty == Type::BOOL => value.to_sql(ty, out),
            Value::Bytes(bytes) if *ty == Type::BYTEA => bytes.as_slice().to_sql(ty, out),
            other => Err(format!("cannot bind {other:?} as postgres type {ty}").into()),
        }
    }

    // The parameter's SQL type comes from the statement; `to_sql` checks the
    // pairing per value, since one `Value` type stands for all of them.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

#[async_trait]
impl Engine for PostgresEngine {
    async fn query(&self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        run_query(&self.connection().await?, sql, params).await
    }

    async fn execute(&self, sql: &str, params: &[Value]) -> DbResult<u64> {
        run_execute(&self.connection().await?, sql, params).await
    }

    async fn begin(&self) -> DbResult<Box<dyn Transaction>> {
        let client = self.connection().await?;
        // BEGIN goes out with the first statement (`PostgresTransaction::pipelined`).
        Ok(Box::new(PostgresTransaction { client: Some(client), begun: false }))
    }
}

/// An open transaction on one pooled connection.
struct PostgresTransaction {
    /// `None` once finished.
    client: Option<Object>,
    /// Whether BEGIN has been sent. Until then the session is not in a
    /// transaction, and ending it needs no round trip.
    begun: bool,
}

impl PostgresTransaction {
    fn client(&mut self) -> DbResult<&Object> {
        self.client.as_ref().ok_or_else(|| DbError::Other("postgres transaction already ended".into()))
    }

    /// Runs `request` (which sends its statement when first polled) inside
    /// the transaction: if BEGIN has not gone out yet, it is sent first and
    /// both travel in one round trip. The server runs them in order, so the
    /// statement runs inside the transaction; BEGIN cannot fail on its own
    /// (a broken connection fails both, and a session is never pooled inside
    /// an aborted transaction, see `Drop`).
    async fn pipelined<T>(
        client: &Object,
        begin: bool,
        request: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> DbResult<T> {
        if begin {
            let (begun, result) = futures_util::join!(client.batch_execute("BEGIN"), request);
            begun.map_err(map_error)?;
            result.map_err(map_error)
        } else {
            request.await.map_err(map_error)
        }
    }

    /// Whether the next statement must take BEGIN along; from then on the
    /// transaction counts as begun (a ROLLBACK of a BEGIN that never
    /// arrived is only a warning).
    fn begin_now(&mut self) -> bool {
        !std::mem::replace(&mut self.begun, true)
    }

    async fn finish(mut self: Box<Self>, statement: &str) -> DbResult<()> {
        let client = self.client.take().ok_or_else(|| DbError::Other("postgres transaction already ended".into()))?;
        if !self.begun {
            // Nothing was sent: the connection goes back to the pool as it came.
            return Ok(());
        }
        match client.batch_execute(statement).await {
            Ok(()) => Ok(()),
            Err(error) => {
                // The transaction's state is unknown: never pool this connection again.
                drop(Object::take(client));
                Err(map_error(error))
            }
        }
    }
}

#[async_trait]
impl Executor for PostgresTransaction {
    async fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        let statement = prepare(self.client()?, sql).await?;
        let begin = self.begin_now();
        let client = self.client()?;
        let params = as_params(params);
        let rows = Self::pipelined(client, begin, client.query(&statement, &params)).await?;
        rows.iter().map(convert_row).collect()
    }

    async fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64> {
        let statement = prepare(self.client()?, sql).await?;
        let begin = self.begin_now();
        let client = self.client()?;
        let params = as_params(params);
        Self::pipelined(client, begin, client.execute(&statement, &params)).await
    }
}

#[async_trait]
impl Transaction for PostgresTransaction {
    async fn execute_script(&mut self, sql: &str) -> DbResult<()> {
        let begin = self.begin_now();
        let client = self.client()?;
        Self::pipelined(client, begin, client.batch_execute(sql)).await
    }

    async fn commit(self: Box<Self>) -> DbResult<()> {
        self.finish("COMMIT").await
    }

    async fn rollback(self: Box<Self>) -> DbResult<()> {
        self.finish("ROLLBACK").await
    }
}

impl Drop for PostgresTransaction {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if !self.begun {
            // Nothing was sent: the session is not in a transaction.
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(error) = client.batch_execute("ROLLBACK").await {
                        tracing::warn!(%error, "postgres rollback failed; closing the connection");
                        drop(Object::take(client));
                    }
                    // Otherwise `client` drops here, back into the pool, clean.
                });
            }
            Err(_) => drop(Object::take(client)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_detect_dead_peers_unless_the_url_says_otherwise() {
        let mut defaults = parse_config("postgres://beseda@db:5432/beseda").unwrap();
        apply_connection_defaults(&mut defaults);
        assert_eq!(defaults.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert!(defaults.get_keepalives());
        assert_eq!(defaults.get_keepalives_idle(), KEEPALIVE_IDLE);
        assert_eq!(defaults.get_keepalives_interval(), Some(KEEPALIVE_INTERVAL));
        assert_eq!(defaults.get_keepalives_retries(), Some(KEEPALIVE_RETRIES));
        assert_eq!(defaults.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));

        let mut chosen = parse_config(
            "postgres://beseda@db/beseda?connect_timeout=3&keepalives_idle=120&keepalives_interval=5\
             &keepalives_retries=9&tcp_user_timeout=60",
        )
        .unwrap();
        apply_connection_defaults(&mut chosen);
        assert_eq!(chosen.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(chosen.get_keepalives_idle(), Duration::from_secs(120));
        assert_eq!(chosen.get_keepalives_interval(), Some(Duration::from_secs(5)));
        assert_eq!(chosen.get_keepalives_retries(), Some(9));
        assert_eq!(chosen.get_tcp_user_timeout(), Some(&Duration::from_secs(60)));

        let mut off = parse_config("postgres://beseda@db/beseda?keepalives=0").unwrap();
        apply_connection_defaults(&mut off);
        assert!(!off.get_keepalives(), "keepalives=0 is kept");
        assert_eq!(off.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT), "unacknowledged data still times out");
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(check_schema_name("beseda_test_1").is_ok());
        assert!(check_schema_name("_x").is_ok());
        for bad in ["", "1abc", "a-b", "a\"; DROP SCHEMA public; --", &"a".repeat(64)] {
            assert!(check_schema_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// With one pooled connection, whatever runs after a dropped transaction
    /// runs on the same session: it must see the rollback, not the open or
    /// aborted transaction.
    #[tokio::test]
    async fn a_dropped_transaction_rolls_back_before_its_connection_is_reused() {
        let Ok(url) = std::env::var("BESEDA_TEST_PG_URL") else {
            eprintln!("skipped: BESEDA_TEST_PG_URL is not set");
            return;
        };
        let schema = format!("beseda_unit_{}", uuid::Uuid::new_v4().simple());
        let store = PostgresStore::connect_in_schema(&url, &schema, 1).await.expect("postgres is reachable");
        let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
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

            let mut tx = engine.begin().await.unwrap();
            assert!(tx.query("SELECT * FROM no_such_table", &[]).await.is_err());
            drop(tx);
            // An aborted transaction leaking into the pool would fail this.
            let rows = engine.query("SELECT COUNT(*) FROM subscribers", &[]).await.unwrap();
            assert_eq!(rows[0].int(0).unwrap(), 0);
        }))
        .await;
        drop(store);
        PostgresStore::drop_schema(&url, &schema).await.unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    /// BEGIN is pipelined with the first statement: that statement must
    /// still run inside the transaction (were it to run in autocommit, the
    /// other pooled connection would see the row, and the rollback would
    /// not remove it).
    #[tokio::test]
    async fn the_first_statement_runs_inside_the_transaction_its_begin_travels_with() {
        let Ok(url) = std::env::var("BESEDA_TEST_PG_URL") else {
            eprintln!("skipped: BESEDA_TEST_PG_URL is not set");
            return;
        };
        let schema = format!("beseda_unit_{}", uuid::Uuid::new_v4().simple());
        let store = PostgresStore::connect_in_schema(&url, &schema, 2).await.expect("postgres is reachable");
        let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
            let engine = store.engine();
            let insert =
                "INSERT INTO subscribers (id, email, administration_key_hash, created_at) VALUES ($1, $2, NULL, 0)";
            let count = || async { engine.query("SELECT COUNT(*) FROM subscribers", &[]).await.unwrap()[0].int(0) };
            let mut tx = engine.begin().await.unwrap();
            tx.execute(insert, &["s1".into(), "s1@example.com".into()]).await.unwrap();
            assert_eq!(count().await.unwrap(), 0, "an uncommitted row is visible: the statement ran outside BEGIN");
            tx.rollback().await.unwrap();
            assert_eq!(count().await.unwrap(), 0);

            // A transaction that sent nothing ends without a round trip.
            engine.begin().await.unwrap().commit().await.unwrap();
            engine.begin().await.unwrap().rollback().await.unwrap();
            drop(engine.begin().await.unwrap());

            let mut tx = engine.begin().await.unwrap();
            tx.execute(insert, &["s2".into(), "s2@example.com".into()]).await.unwrap();
            tx.commit().await.unwrap();
            assert_eq!(count().await.unwrap(), 1);
        }))
        .await;
        drop(store);
        PostgresStore::drop_schema(&url, &schema).await.unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn values_bind_to_the_statement_types() {
        let mut out = BytesMut::new();
        assert!(matches!(Value::Int(7).to_sql(&Type::INT4, &mut out), Ok(IsNull::No)));
        assert!(Value::Int(i64::MAX).to_sql(&Type::INT4, &mut out).is_err());
        assert!(matches!(Value::Null.to_sql(&Type::BOOL, &mut out), Ok(IsNull::Yes)));
        assert!(Value::Text("x".into()).to_sql(&Type::INT8, &mut out).is_err());
        assert!(matches!(Value::Bool(true).to_sql(&Type::BOOL, &mut out), Ok(IsNull::No)));
    }
}
