//! The small SQL-engine abstraction the domain operations are written over,
//! so that they exist once for both SQLite and PostgreSQL. SQL text uses
//! PostgreSQL's `$1` placeholders; the SQLite engine rewrites them.

use std::any::Any;

use async_trait::async_trait;
use beseda_core::{Error, ErrorCode};
use futures_util::future::BoxFuture;

/// A parameter or column value. Booleans come back from SQLite as `Int`, so
/// readers accept both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Text(String),
    Bool(bool),
    Bytes(Vec<u8>),
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_owned())
    }
}

impl From<&String> for Value {
    fn from(value: &String) -> Self {
        Value::Text(value.clone())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Int(value)
    }
}

impl From<u64> for Value {
    fn from(value: u64) -> Self {
        // Sequence numbers never approach i64::MAX; saturating keeps a corrupt
        // caller value from wrapping into a negative one.
        Value::Int(i64::try_from(value).unwrap_or(i64::MAX))
    }
}

impl From<bool> for Value {
    fn from(value: bool) -> Self {
        Value::Bool(value)
    }
}

impl From<Vec<u8>> for Value {
    fn from(value: Vec<u8>) -> Self {
        Value::Bytes(value)
    }
}

impl From<&[u8]> for Value {
    fn from(value: &[u8]) -> Self {
        Value::Bytes(value.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Self {
        value.map_or(Value::Null, Into::into)
    }
}

/// One result row. Accessors fail with `internal` instead of panicking, since
/// a row is data and data may be corrupt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Row(pub(crate) Vec<Value>);

impl Row {
    fn value(&self, index: usize) -> Result<&Value, Error> {
        self.0.get(index).ok_or_else(|| Error::internal(format!("result column {index} is missing")))
    }

    fn mismatch(&self, index: usize, expected: &str) -> Error {
        Error::internal(format!("result column {index} is not {expected}: {:?}", self.0.get(index)))
    }

    pub(crate) fn text(&self, index: usize) -> Result<String, Error> {
        self.opt_text(index)?.ok_or_else(|| self.mismatch(index, "non-null text"))
    }

    pub(crate) fn opt_text(&self, index: usize) -> Result<Option<String>, Error> {
        match self.value(index)? {
            Value::Null => Ok(None),
            Value::Text(text) => Ok(Some(text.clone())),
            _ => Err(self.mismatch(index, "text")),
        }
    }

    pub(crate) fn int(&self, index: usize) -> Result<i64, Error> {
        self.opt_int(index)?.ok_or_else(|| self.mismatch(index, "non-null integer"))
    }

    pub(crate) fn opt_int(&self, index: usize) -> Result<Option<i64>, Error> {
        match self.value(index)? {
            Value::Null => Ok(None),
            Value::Int(value) => Ok(Some(*value)),
            _ => Err(self.mismatch(index, "an integer")),
        }
    }

    /// A non-negative integer (sequence numbers, counts).
    pub(crate) fn uint(&self, index: usize) -> Result<u64, Error> {
        u64::try_from(self.int(index)?).map_err(|_| self.mismatch(index, "non-negative"))
    }

    pub(crate) fn bool(&self, index: usize) -> Result<bool, Error> {
        match self.value(index)? {
            Value::Bool(value) => Ok(*value),
            Value::Int(value) => Ok(*value != 0),
            _ => Err(self.mismatch(index, "a boolean")),
        }
    }

    pub(crate) fn bytes(&self, index: usize) -> Result<Vec<u8>, Error> {
        self.opt_bytes(index)?.ok_or_else(|| self.mismatch(index, "non-null bytes"))
    }

    pub(crate) fn opt_bytes(&self, index: usize) -> Result<Option<Vec<u8>>, Error> {
        match self.value(index)? {
            Value::Null => Ok(None),
            Value::Bytes(bytes) => Ok(Some(bytes.clone())),
            _ => Err(self.mismatch(index, "bytes")),
        }
    }
}

/// A failure reported by an engine, before it becomes a domain error. Unique
/// violations are kept apart because the domain maps them to typed errors by
/// index name (`conversations_key_uq`, `users_pkey`, ...), which both engines
/// report the same way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DbError {
    Unique { constraint: String },
    Unavailable(String),
    Other(String),
}

impl DbError {
    pub(crate) fn is_unique(&self, constraint: &str) -> bool {
        matches!(self, DbError::Unique { constraint: name } if name == constraint)
    }
}

impl From<DbError> for Error {
    fn from(error: DbError) -> Self {
        match error {
            DbError::Unique { constraint } => {
                Error::internal(format!("database unique constraint violated: {constraint}"))
            }
            DbError::Unavailable(message) => {
                Error::new(ErrorCode::Unavailable, format!("database unavailable: {message}"))
            }
            DbError::Other(message) => Error::internal(format!("database error: {message}")),
        }
    }
}

pub(crate) type DbResult<T> = std::result::Result<T, DbError>;

/// A database the domain operations run on. Statements outside a transaction
/// run in autocommit mode.
#[async_trait]
pub(crate) trait Engine: Send + Sync + 'static {
    async fn query(&self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>>;
    async fn execute(&self, sql: &str, params: &[Value]) -> DbResult<u64>;
    /// Starts a read-write transaction. Dropping it without `commit` rolls it back.
    async fn begin(&self) -> DbResult<Box<dyn Transaction>>;

    /// Runs a whole transaction given as one job: its statements, then the
    /// COMMIT or ROLLBACK the job asks for; an error rolls it back. This
    /// default drives the job on the caller's task over [`begin`](Self::begin)
    /// (PostgreSQL, whose statements are network round trips anyway). The
    /// SQLite engine runs the job inside its writer thread instead, so a
    /// transaction costs one hand-over to that thread rather than one per
    /// statement (see `sqlite.rs`). Use [`transaction`] for a typed result.
    async fn run_job(&self, job: Job) -> beseda_core::Result<Box<dyn Any + Send>> {
        let mut tx = self.begin().await?;
        match job(tx.as_mut()).await {
            Ok((output, Finish::Commit)) => {
                tx.commit().await?;
                Ok(output)
            }
            Ok((output, Finish::Rollback)) => {
                tx.rollback().await?;
                Ok(output)
            }
            Err(error) => {
                // The job's error is the one worth reporting; a failed
                // rollback also discards the connection (see the engines).
                let _ = tx.rollback().await;
                Err(error)
            }
        }
    }
}

/// How a transaction job that succeeded ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    Commit,
    Rollback,
}

/// What a job returns: its output (type-erased, see [`transaction`]) and how
/// its transaction ends.
pub(crate) type JobResult = beseda_core::Result<(Box<dyn Any + Send>, Finish)>;

/// A whole transaction as one unit of work. It must wait on nothing but its
/// own statements: the SQLite engine polls it on the writer thread, where no
/// async runtime runs (a job that waits on anything else fails `internal`).
pub(crate) type Job = Box<dyn for<'t> FnOnce(&'t mut dyn Executor) -> BoxFuture<'t, JobResult> + Send>;

/// Runs `job` as one transaction on `engine` (see [`Engine::run_job`]) and
/// returns its output once the transaction has ended: after a COMMIT, that
/// means durable. Data the job needs is moved into it, since the SQLite
/// writer thread may still run it after the caller has given up waiting.
pub(crate) async fn transaction<T, F>(engine: &dyn Engine, job: F) -> beseda_core::Result<T>
where
    T: Send + 'static,
    F: for<'t> FnOnce(&'t mut dyn Executor) -> BoxFuture<'t, beseda_core::Result<(T, Finish)>> + Send + 'static,
{
    let erased: Job = Box::new(move |executor| {
        let future = job(executor);
        Box::pin(async move {
            let (output, finish) = future.await?;
            Ok((Box::new(output) as Box<dyn Any + Send>, finish))
        })
    });
    let output = engine.run_job(erased).await?;
    output.downcast::<T>().map(|output| *output).map_err(|_| Error::internal("a transaction job returned another type"))
}

/// Something statements run on: a transaction or the engine in autocommit
/// mode, so that helpers serve both.
#[async_trait]
pub(crate) trait Executor: Send {
    async fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>>;
    async fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64>;
}

/// An open transaction.
#[async_trait]
pub(crate) trait Transaction: Executor {
    /// Runs a script of several statements without parameters (migrations).
    async fn execute_script(&mut self, sql: &str) -> DbResult<()>;
    async fn commit(self: Box<Self>) -> DbResult<()>;
    /// Rolls back now; dropping does the same, but this reports failures and,
    /// for PostgreSQL, returns the connection to the pool without a detour.
    async fn rollback(self: Box<Self>) -> DbResult<()>;
}

/// The engine in autocommit mode, as an [`Executor`].
pub(crate) struct Autocommit<'a>(pub(crate) &'a dyn Engine);

#[async_trait]
impl Executor for Autocommit<'_> {
    async fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        self.0.query(sql, params).await
    }

    async fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64> {
        self.0.execute(sql, params).await
    }
}

/// Builds SQL whose shape depends on the request (filters, `IN` lists),
/// numbering placeholders as parameters are bound.
#[derive(Debug, Default)]
pub(crate) struct SqlBuilder {
    pub(crate) sql: String,
    pub(crate) params: Vec<Value>,
}

impl SqlBuilder {
    pub(crate) fn new(sql: &str) -> Self {
        SqlBuilder { sql: sql.to_owned(), params: Vec::new() }
    }

    pub(crate) fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    /// Binds a parameter and returns its placeholder, for SQL that uses it
    /// more than once.
    pub(crate) fn bind(&mut self, value: impl Into<Value>) -> String {
        self.params.push(value.into());
        format!("${}", self.params.len())
    }

    /// Binds a parameter and appends its placeholder.
    pub(crate) fn push_bind(&mut self, value: impl Into<Value>) -> &mut Self {
        let placeholder = self.bind(value);
        self.sql.push_str(&placeholder);
        self
    }

    /// Appends `(p1, p2, ...)`; the caller guarantees `values` is not empty.
    pub(crate) fn push_in_list<T: Into<Value> + Clone>(&mut self, values: &[T]) -> &mut Self {
        self.sql.push('(');
        for (index, value) in values.iter().enumerate() {
            if index > 0 {
                self.sql.push_str(", ");
            }
            self.push_bind(value.clone());
        }
        self.sql.push(')');
        self
    }
}

/// A `LIKE` pattern matching `needle` anywhere, with `%`, `_` and the escape
/// character itself escaped (queries say `ESCAPE '\'`).
pub(crate) fn contains_pattern(needle: &str) -> String {
    let mut pattern = String::with_capacity(needle.len() + 2);
    pattern.push('%');
    for ch in needle.to_lowercase().chars() {
        if matches!(ch, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(ch);
    }
    pattern.push('%');
    pattern
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_pattern_escapes_wildcards_and_lowercases() {
        assert_eq!(contains_pattern("A_b%c\\Д"), "%a\\_b\\%c\\\\д%");
    }

    #[test]
    fn builder_numbers_placeholders_in_order() {
        let mut sql = SqlBuilder::new("SELECT 1 WHERE a = ");
        sql.push_bind("x").push(" AND b IN ").push_in_list(&[1_i64, 2]);
        assert_eq!(sql.sql, "SELECT 1 WHERE a = $1 AND b IN ($2, $3)");
        assert_eq!(sql.params, vec![Value::from("x"), Value::Int(1), Value::Int(2)]);
    }

    #[test]
    fn row_accessors_report_type_mismatches_instead_of_panicking() {
        let row = Row(vec![Value::Int(1), Value::Text("t".into()), Value::Null]);
        assert!(row.bool(0).unwrap());
        assert_eq!(row.text(1).unwrap(), "t");
        assert_eq!(row.opt_text(2).unwrap(), None);
        assert_eq!(row.int(1).unwrap_err().code, ErrorCode::Internal);
        assert_eq!(row.text(7).unwrap_err().code, ErrorCode::Internal);
    }
}
