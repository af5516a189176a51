//! How fast the system of record accepts messages: `append_message` (the
//! whole transaction: seq, message, event, one notification) with 1 and with
//! 64 concurrent writers, and with one writer to a group of 500 members (499
//! notified), on the embedded SQLite store (durable:
//! `synchronous = FULL`, group commit) and, when `BESEDA_TEST_PG_URL` is set,
//! on PostgreSQL.
//!
//! cargo bench -p beseda-store --bench append

use std::sync::Arc;

use beseda_core::model::*;
use beseda_store::{NewMessage, Store};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

struct Fixture {
    store: Arc<dyn Store>,
    application_id: String,
    conversation_id: String,
    author_id: String,
    /// Everyone but the author: whom routing notifies.
    reader_ids: Vec<String>,
}

/// An application with a group of `members` users (at least 2).
async fn fixture(store: Arc<dyn Store>, members: usize) -> Fixture {
    let subscriber = store.upsert_subscriber(&format!("{}@bench.example", new_id())).await.unwrap();
    let application = Application {
        id: new_id(),
        subscriber_id: subscriber.id,
        name: "Bench".into(),
        key: Some("key".into()),
        state: ApplicationState::Registered,
        created_at: now_micros(),
    };
    store.insert_application(&application).await.unwrap();
    let author = User::new(UserKind::Regular, "Author");
    store.insert_user(&application.id, &author).await.unwrap();
    let mut reader_ids = Vec::with_capacity(members - 1);
    for index in 1..members {
        let reader = User::new(UserKind::Regular, format!("Reader {index}"));
        store.insert_user(&application.id, &reader).await.unwrap();
        reader_ids.push(reader.id);
    }
    let mut member_ids = reader_ids.clone();
    member_ids.push(author.id.clone());
    member_ids.sort();
    let conversation = Conversation {
        id: new_id(),
        key: None,
        title: "Bench".into(),
        displayed: true,
        read_only: false,
        group: true,
        context: None,
        member_ids,
        all_application_users: false,
        integration_id: String::new(),
        created_at: now_micros(),
        last_message_at: None,
        last_seq: 0,
    };
    store.insert_conversation(&application.id, &conversation).await.unwrap();
    Fixture {
        store,
        application_id: application.id,
        conversation_id: conversation.id,
        author_id: author.id,
        reader_ids,
    }
}

async fn append_concurrently(fixture: &Arc<Fixture>, writers: usize) {
    let mut tasks = Vec::with_capacity(writers);
    for _ in 0..writers {
        let fixture = fixture.clone();
        tasks.push(tokio::spawn(async move {
            let message = Message {
                id: new_id(),
                conversation_id: fixture.conversation_id.clone(),
                seq: 0,
                author_id: fixture.author_id.clone(),
                date: now_micros(),
                text: "a benchmark message of ordinary length, about sixty characters".into(),
                text_format: TextFormat::Plain,
                data: None,
                recipient_ids: Vec::new(),
                buttons: None,
                client_message_id: Some(new_id()),
                edited_at: None,
                deleted: false,
            };
            let new_message = NewMessage { message, notify_user_ids: fixture.reader_ids.clone() };
            fixture.store.append_message(&fixture.application_id, &new_message).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

fn bench_store(criterion: &mut Criterion, name: &str, runtime: &tokio::runtime::Runtime, store: Arc<dyn Store>) {
    let pair = Arc::new(runtime.block_on(fixture(store.clone(), 2)));
    let mut group = criterion.benchmark_group(format!("append_message/{name}"));
    group.sample_size(20);
    for writers in [1usize, 64] {
        group.throughput(Throughput::Elements(writers as u64));
        group.bench_with_input(BenchmarkId::new("writers", writers), &writers, |bencher, &writers| {
            bencher.to_async(runtime).iter(|| append_concurrently(&pair, writers));
        });
    }
    // What an audience costs: one writer, 499 notified members.
    let group_of_500 = Arc::new(runtime.block_on(fixture(store, 500)));
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("members", 500), |bencher| {
        bencher.to_async(runtime).iter(|| append_concurrently(&group_of_500, 1));
    });
    group.finish();
}

fn append(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let directory = tempfile::tempdir().unwrap();
    let sqlite = beseda_store::sqlite::SqliteStore::open(&directory.path().join("bench.db")).unwrap();
    bench_store(criterion, "sqlite", &runtime, Arc::new(sqlite));
    if let Ok(url) = std::env::var("BESEDA_TEST_PG_URL") {
        let schema = format!("bench_{}", new_id().replace('-', "_"));
        let postgres = runtime
            .block_on(beseda_store::postgres::PostgresStore::connect_in_schema(&url, &schema, 16))
            .expect("postgres is reachable");
        bench_store(criterion, "postgres", &runtime, Arc::new(postgres));
        runtime.block_on(beseda_store::postgres::PostgresStore::drop_schema(&url, &schema)).unwrap();
    }
}

criterion_group!(benches, append);
criterion_main!(benches);
