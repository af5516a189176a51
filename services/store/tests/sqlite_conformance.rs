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

/// Rows in every table of the database file, summed: what one operation adds.
fn total_rows(path: &std::path::Path) -> i64 {
    let connection = rusqlite::Connection::open(path).unwrap();
    let tables: Vec<String> = connection
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    tables
        .iter()
        .map(|table| connection.query_row(&format!("SELECT COUNT(*) FROM \"{table}\""), [], |row| row.get::<_, i64>(0)))
        .sum::<rusqlite::Result<i64>>()
        .unwrap()
}

/// Issue 11: a message to a 500-member group notifies 499 members and adds
/// the same three rows (message, event, outbox) as one to a pair; the
/// members' counts come from the conversation's counter and their read marks.
#[tokio::test]
async fn a_message_to_a_large_group_adds_as_many_rows_as_one_to_a_pair() {
    use beseda_core::model::*;
    use beseda_store::NewMessage;

    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("beseda.db");
    let store = SqliteStore::open(&path).unwrap();
    let subscriber = store.upsert_subscriber("rows@example.com").await.unwrap();
    let application = Application {
        id: new_id(),
        subscriber_id: subscriber.id,
        name: "Rows".into(),
        key: None,
        state: ApplicationState::Registered,
        created_at: now_micros(),
    };
    store.insert_application(&application).await.unwrap();
    let app = application.id.as_str();
    let group = |id: &str, size: usize| Conversation {
        id: id.to_owned(),
        key: None,
        title: String::new(),
        displayed: true,
        read_only: false,
        group: true,
        context: None,
        member_ids: (0..size).map(|index| format!("u{index:03}")).collect(),
        all_application_users: false,
        integration_id: String::new(),
        created_at: 1_000,
        last_message_at: None,
        last_seq: 0,
    };
    let message = |conversation_id: &str| Message {
        id: new_id(),
        conversation_id: conversation_id.to_owned(),
        seq: 0,
        author_id: "u000".into(),
        date: 2_000,
        text: "hello".into(),
        text_format: TextFormat::Plain,
        data: None,
        recipient_ids: Vec::new(),
        buttons: None,
        client_message_id: None,
        edited_at: None,
        deleted: false,
    };
    let mut added = Vec::new();
    for (id, size) in [("pair", 2), ("large", 500)] {
        let conversation = group(id, size);
        store.insert_conversation(app, &conversation).await.unwrap();
        let notify_user_ids = conversation.member_ids[1..].to_vec();
        let before = total_rows(&path);
        let outcome = store.append_message(app, &NewMessage { message: message(id), notify_user_ids }).await.unwrap();
        added.push(total_rows(&path) - before);
        assert_eq!(outcome.unread.len(), size - 1);
        assert!(outcome.unread.iter().all(|unread| unread.unread_in_conversation == 1));
    }
    assert_eq!(added, [3, 3], "rows added per message: pair, 500 members");
    assert_eq!(store.unread_counts(app, "u499").await.unwrap(), vec![("large".to_owned(), 1)]);
    assert_eq!(store.unread_counts(app, "u001").await.unwrap(), vec![("large".to_owned(), 1), ("pair".to_owned(), 1)]);
}
