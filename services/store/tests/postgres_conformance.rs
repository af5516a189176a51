//! The conformance suite against PostgreSQL. Set `BESEDA_TEST_PG_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`) to run it; without it every
//! test is skipped with a note on stderr. With it set, an unreachable server
//! fails the tests. Each test gets a fresh schema, dropped at the end.

use beseda_core::ErrorCode;
use beseda_store::Store;
use beseda_store::conformance::Fixture;
use beseda_store::postgres::PostgresStore;

const URL_VARIABLE: &str = "BESEDA_TEST_PG_URL";

fn test_url() -> Option<String> {
    match std::env::var(URL_VARIABLE) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!("skipped: {URL_VARIABLE} is not set, so the postgres conformance tests do not run");
            None
        }
    }
}

fn fresh_schema() -> String {
    format!("beseda_test_{}", uuid::Uuid::new_v4().simple())
}

struct PostgresFixture {
    store: PostgresStore,
    url: String,
    schema: String,
}

impl Fixture for PostgresFixture {
    fn store(&self) -> &dyn Store {
        &self.store
    }

    async fn teardown(self) {
        let PostgresFixture { store, url, schema } = self;
        // Close the pool first so that no session of it holds the schema.
        drop(store);
        PostgresStore::drop_schema(&url, &schema).await.expect("drop test schema");
    }
}

async fn postgres_fixture() -> Option<PostgresFixture> {
    let url = test_url()?;
    let schema = fresh_schema();
    let store = PostgresStore::connect_in_schema(&url, &schema, 4)
        .await
        .unwrap_or_else(|error| panic!("{URL_VARIABLE} is set but postgres is unusable: {error}"));
    Some(PostgresFixture { store, url, schema })
}

beseda_store::conformance_suite!(postgres_fixture);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_one_schema_once() {
    let Some(url) = test_url() else {
        return;
    };
    let schema = fresh_schema();
    let starts = (0..4).map(|_| PostgresStore::connect_in_schema(&url, &schema, 2));
    let stores: Vec<PostgresStore> =
        futures_util::future::join_all(starts).await.into_iter().map(|store| store.expect("connect")).collect();
    // A restart finds everything applied.
    let restarted = PostgresStore::connect_in_schema(&url, &schema, 2).await.expect("reconnect");

    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows = client.query(&format!("SELECT version FROM \"{schema}\".schema_migrations"), &[]).await.unwrap();
    let versions: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
    let subscriber = stores[0].upsert_subscriber("shared@example.com").await.unwrap();
    assert_eq!(restarted.get_subscriber(&subscriber.id).await.unwrap(), Some(subscriber));

    drop((stores, restarted));
    PostgresStore::drop_schema(&url, &schema).await.unwrap();
    let left =
        client.query("SELECT 1 FROM information_schema.schemata WHERE schema_name = $1", &[&schema]).await.unwrap();
    assert!(left.is_empty());
}

#[tokio::test]
async fn an_unreachable_server_is_reported_as_unavailable() {
    // Port 1 on loopback refuses connections; no server is needed.
    let result = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test?connect_timeout=5", 1).await;
    let error = result.err().expect("connecting to a closed port must fail");
    assert_eq!(error.code, ErrorCode::Unavailable, "{error}");
}
