//! Versioned schema migrations, shared by both engines: numbered SQL scripts
//! embedded in the binary, applied in order in one transaction and recorded
//! in `schema_migrations`, so a restart applies only what is new. SQLite
//! migrates synchronously while opening (see `sqlite.rs`) but with the same
//! plan ([`pending`]) and bookkeeping statements.

use beseda_core::{Error, Result, model::now_micros};

use crate::engine::{Engine, Value};

/// One numbered migration script.
pub(crate) struct Migration {
    pub(crate) version: i64,
    pub(crate) sql: &'static str,
}

pub(crate) const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT NOT NULL PRIMARY KEY,
    applied_at BIGINT NOT NULL
)";
pub(crate) const SELECT_APPLIED: &str = "SELECT version FROM schema_migrations ORDER BY version";
pub(crate) const INSERT_APPLIED: &str = "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)";

/// The migrations to apply, in order, given the versions already applied.
/// Refuses a database that records a version this release does not know: it
/// was migrated by a newer release, and old code would misread its rows.
pub(crate) fn pending<'a>(applied: &[i64], migrations: &'a [Migration]) -> Result<Vec<&'a Migration>> {
    if !migrations.windows(2).all(|pair| pair[0].version < pair[1].version) {
        return Err(Error::internal("migrations must have strictly increasing versions"));
    }
    if let Some(unknown) = applied.iter().find(|version| !migrations.iter().any(|known| known.version == **version)) {
        return Err(Error::internal(format!("database schema version {unknown} is unknown to this release")));
    }
    Ok(migrations.iter().filter(|migration| !applied.contains(&migration.version)).collect())
}

/// Applies the migrations not yet recorded, in one transaction. `lock_sql`
/// runs first inside it: PostgreSQL takes a transaction-scoped advisory lock
/// there so that two nodes starting together do not race (the loser waits,
/// then finds everything applied).
pub(crate) async fn run(engine: &dyn Engine, migrations: &[Migration], lock_sql: Option<&str>) -> Result<()> {
    let mut tx = engine.begin().await?;
    if let Some(lock_sql) = lock_sql {
        tx.execute_script(lock_sql).await?;
    }
    tx.execute_script(CREATE_TABLE).await?;
    let applied = tx.query(SELECT_APPLIED, &[]).await?;
    let applied = applied.iter().map(|row| row.int(0)).collect::<Result<Vec<_>>>()?;
    let pending = pending(&applied, migrations)?;
    for migration in &pending {
        tx.execute_script(migration.sql).await?;
        tx.execute(INSERT_APPLIED, &[Value::Int(migration.version), Value::Int(now_micros())]).await?;
        tracing::info!(version = migration.version, "applied schema migration");
    }
    tx.commit().await?;
    tracing::debug!(applied = pending.len(), known = migrations.len(), "schema is up to date");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPTS: &[Migration] = &[Migration { version: 1, sql: "a" }, Migration { version: 2, sql: "b" }];

    #[test]
    fn pending_skips_applied_versions_in_order() {
        let versions =
            |applied: &[i64]| pending(applied, SCRIPTS).unwrap().iter().map(|m| m.version).collect::<Vec<_>>();
        assert_eq!(versions(&[]), vec![1, 2]);
        assert_eq!(versions(&[1]), vec![2]);
        assert!(versions(&[1, 2]).is_empty());
    }

    #[test]
    fn pending_refuses_a_schema_from_a_newer_release() {
        let error = pending(&[1, 2, 3], SCRIPTS).err().unwrap();
        assert!(error.message.contains("version 3"), "{error}");
    }
}
