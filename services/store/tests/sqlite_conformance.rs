//! The conformance suite against SQLite, each test on its own database file.

use beseda_store::Store;
use beseda_store::conformance::Fixture;
use beseda_store::sqlite::SqliteStore;

struct SqliteFixture {
    store: SqliteStore,
    // Deleted (with the database) when the fixture drops.
    _directory: tempfile::TempDir,
}

impl Fixture for SqliteFixture {
    fn store(&self) -> &dyn Store {
        &self.store
    }

    async fn teardown(self) {}
}

async fn sqlite_fixture() -> Option<SqliteFixture> {
    let directory = tempfile::tempdir().expect("temporary directory");
    // A nested path also proves that open creates the parent directory.
    let store = SqliteStore::open(&directory.path().join("data").join("beseda.db")).expect("open sqlite store");
    Some(SqliteFixture { store, _directory: directory })
}

beseda_store::conformance_suite!(sqlite_fixture);

#[tokio::test]
async fn an_in_memory_store_is_migrated_and_usable() {
    let store = SqliteStore::open_in_memory().unwrap();
    let subscriber = store.upsert_subscriber("memory@example.com").await.unwrap();
    assert_eq!(store.get_subscriber(&subscriber.id).await.unwrap(), Some(subscriber));
}
