//! The cluster under failure, as separate OS processes on loopback: three
//! registry voters, two routing nodes, two bots nodes and two gateways, on
//! PostgreSQL and a Redis server of the test's own (tests/common/cluster.rs).
//! Runs when `BESEDA_TEST_PG_URL` is set; CI sets it, and then these must pass.
//!
//! Each test starts its own cluster, is bounded by timeouts and kills
//! everything it started. They run one at a time: nine processes each on
//! a two-core machine are plenty.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, GATEWAY_LEASE_SECONDS, postgres_url};
use common::processing::Processing;
use common::*;
use serde_json::{Value, json};

static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest any single failure scenario may take before the test fails.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts a cluster (one at a time, skipped without PostgreSQL) and runs
/// `scenario` on it within [`SCENARIO_TIMEOUT`]; the cluster is torn down
/// when the scenario ends, or fails.
async fn with_cluster<Scenario, Run>(scenario: Scenario)
where
    Scenario: FnOnce(Cluster) -> Run,
    Run: std::future::Future<Output = ()>,
{
    let Some(url) = postgres_url() else { return };
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    tokio::time::timeout(SCENARIO_TIMEOUT, async { scenario(Cluster::start(&url).await).await })
        .await
        .expect("the scenario finished in time");
}

fn seq_of(event: &Value) -> u64 {
    event["seq"].as_str().and_then(|seq| seq.parse().ok()).unwrap_or_else(|| panic!("no seq in {event}"))
}

/// Reads conversation events until one with `text` arrives; returns every
/// message text seen on the way, checking seqs are contiguous from `after`.
async fn events_until(client: &mut Client, after: &mut u64, text: &str) -> Vec<String> {
    let mut texts = Vec::new();
    loop {
        let event = client.next_event().await;
        let seq = seq_of(&event);
        assert_eq!(seq, *after + 1, "events must arrive once each, in order, with no gap: {event}");
        *after = seq;
        if let Some(created) = event.get("messageCreated") {
            let body = created["text"].as_str().unwrap_or_default().to_owned();
            let done = body == text;
            texts.push(body);
            if done {
                return texts;
            }
        }
    }
}

/// A team of three users on the cluster's gateways and their group.
struct Scene {
    application: Application,
    conversation_id: String,
    ids: BTreeMap<&'static str, String>,
}

async fn scene(cluster: &Cluster) -> Scene {
    let first = cluster.gateway(0);
    let application = first.register("owner@example.com", "Cluster").await;
    let mut ids = BTreeMap::new();
    for (infobase_id, name) in [("a1", "Alice"), ("b1", "Bob"), ("c1", "Carol"), ("d1", "Dave")] {
        let (id, _) = user(&first, &application, infobase_id, name).await;
        ids.insert(name, id);
    }
    let members: Vec<&str> = ids.values().map(String::as_str).collect();
    let conversation_id = group(&first, &application, "Team", &members).await;
    Scene { application, conversation_id, ids }
}

impl Scene {
    async fn connect(&self, cluster: &Cluster, gateway: usize, infobase_id: &str, name: &str) -> Client {
        Client::connect_url(&cluster.gateways[gateway].ws_url(), &self.application.token(infobase_id, name)).await
    }

    async fn subscribe(&self, client: &mut Client, after_seq: u64) -> Value {
        let mut subscribe = json!({"subscribe": {"conversation": {"id": self.conversation_id}}});
        if after_seq > 0 {
            subscribe["subscribe"]["afterSeq"] = json!(after_seq.to_string());
        }
        let answer = client.request(subscribe).await;
        assert!(answer.get("subscribed").is_some(), "{answer}");
        answer
    }

    async fn send(&self, client: &mut Client, text: &str) -> Value {
        let answer = client
            .request(json!({"sendMessage": {
                "conversation": {"id": self.conversation_id}, "text": text, "clientMessageId": text
            }}))
            .await;
        assert_eq!(answer["message"]["text"], text, "not acknowledged: {answer}");
        answer
    }

    /// Every message text of the conversation, from the system of record.
    async fn stored_texts(&self, gateway: &TestServer) -> Vec<String> {
        let path = format!("/api/v1/conversations/{}/messages/search", self.conversation_id);
        let mut texts = Vec::new();
        let mut filter = json!({"count": 250});
        loop {
            let page = gateway.ok("POST", &path, &self.application.privileged(), Some(filter.clone())).await;
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                return texts;
            }
            texts.extend(messages.iter().map(|message| message["text"].as_str().unwrap_or_default().to_owned()));
            filter["after"] = messages.last().unwrap()["id"].clone();
        }
    }
}

async fn presence_of(client: &mut Client, user_id: &str) -> bool {
    let watched = client.request(json!({"watchPresence": {"userIds": [user_id]}})).await;
    let users = watched["presence"]["users"].as_array().unwrap_or_else(|| panic!("{watched}")).clone();
    users.iter().any(|entry| entry["userId"] == user_id && entry["online"] == true)
}

/// Waits for a presence push saying `user_id` is `online` (earlier pushes
/// about them, e.g. the one from their connecting, are passed over).
async fn await_presence(client: &mut Client, user_id: &str, online: bool) {
    loop {
        let id = user_id.to_owned();
        let event = client
            .next_matching(move |push| {
                push.get("userEvent")
                    .and_then(|event| event.get("presence"))
                    .filter(|presence| presence["userId"] == id.as_str())
                    .cloned()
            })
            .await;
        if (event["online"] == true) == online {
            return;
        }
    }
}

/// Each role's /metrics after two messages between users on different
/// gateways: what an operator's dashboard would show.
async fn metrics_tell_what_happened(cluster: &Cluster) {
    let metric = |metrics: &BTreeMap<String, f64>, name: &str| {
        *metrics.get(name).unwrap_or_else(|| panic!("no {name} in /metrics: {:?}", metrics.keys()))
    };
    let mut gateways = Vec::new();
    for gateway in &cluster.gateways {
        gateways.push(gateway.metrics().await);
    }
    // Alice and Carol on the first gateway, Bob on the second.
    assert_eq!(metric(&gateways[0], "beseda_ws_connections"), 2.0);
    assert_eq!(metric(&gateways[1], "beseda_ws_connections"), 1.0);
    for (gateway, metrics) in gateways.iter().enumerate() {
        assert_eq!(metric(metrics, "beseda_messages_received_total"), 1.0, "gateway {gateway} took one send");
        assert!(metric(metrics, "beseda_fanout_latency_seconds_count") >= 1.0, "gateway {gateway} pushed live");
        assert!(metric(metrics, "beseda_bus_received_total") >= 1.0, "gateway {gateway} heard Redis");
        assert!(metric(metrics, "beseda_bus_channels") >= 1.0, "gateway {gateway} subscribed to channels");
    }
    let mut stored = 0.0;
    for routing in &cluster.routing {
        let metrics = routing.metrics().await;
        stored += metrics.get("beseda_messages_stored_total").copied().unwrap_or(0.0);
        if metrics.contains_key("beseda_messages_stored_total") {
            assert!(metrics.contains_key("beseda_bus_publish_queue_depth"), "{:?}", metrics.keys());
        }
    }
    assert_eq!(stored, 2.0, "the routing nodes stored two messages between them");
    let leader = cluster.registry_leader().await.expect("a registry leader");
    for (index, voter) in cluster.registry.iter().enumerate() {
        // A follower applies the connections' entry after the leader committed it, and a voter
        // publishes its gauges at most every 100 ms: read until it shows them (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let metrics = loop {
            let metrics = voter.metrics().await;
            let at_least_one = |name: &str| metrics.get(name).is_some_and(|value| *value >= 1.0);
            let caught_up = at_least_one("beseda_registry_connections") && at_least_one("beseda_raft_commit_index");
            if caught_up || tokio::time::Instant::now() >= deadline {
                break metrics;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(metric(&metrics, "beseda_raft_is_leader"), if index == leader { 1.0 } else { 0.0 });
        assert!(metric(&metrics, "beseda_raft_term") >= 1.0);
        assert!(metric(&metrics, "beseda_raft_commit_index") >= 1.0, "voter {index} saw commits");
        assert!(metric(&metrics, "beseda_registry_connections") >= 1.0, "voter {index} holds the connections");
    }
    for bots in &cluster.bots {
        assert!(bots.metrics().await.contains_key("beseda_bots_relay_batch"), "the relay reports its batches");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_gateways_chat_and_a_killed_or_stopped_gateway_loses_nothing() {
    with_cluster(|mut cluster| async move {
        let scene = scene(&cluster).await;
        let carol_id = scene.ids["Carol"].clone();

        // Alice and Carol on gateway 1, Bob on gateway 2.
        let mut alice = scene.connect(&cluster, 0, "a1", "Alice").await;
        let carol = scene.connect(&cluster, 0, "c1", "Carol").await;
        let mut bob = scene.connect(&cluster, 1, "b1", "Bob").await;
        // Presence is cluster-wide: Bob's gateway learns Carol is online from the registry.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !presence_of(&mut bob, &carol_id).await {
            assert!(Instant::now() < deadline, "Carol never showed online to a user of the other gateway");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        scene.subscribe(&mut alice, 0).await;
        scene.subscribe(&mut bob, 0).await;
        let (mut alice_seq, mut bob_seq) = (0, 0);
        scene.send(&mut alice, "hello from gateway 1").await;
        assert_eq!(events_until(&mut bob, &mut bob_seq, "hello from gateway 1").await.len(), 1);
        scene.send(&mut bob, "hello from gateway 2").await;
        let seen = events_until(&mut alice, &mut alice_seq, "hello from gateway 2").await;
        assert_eq!(seen, vec!["hello from gateway 1", "hello from gateway 2"]);
        metrics_tell_what_happened(&cluster).await;

        // kill -9 gateway 1: Alice's socket dies; Bob keeps writing.
        cluster.gateways[0].kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alice.next_frame_within(Duration::from_secs(5)).await.is_some() {
            assert!(Instant::now() < deadline, "the socket must close");
        }
        drop(carol);
        for index in 1..=5 {
            scene.send(&mut bob, &format!("while Alice was away {index}")).await;
        }
        // Alice reconnects to the other gateway and resumes by seq: exactly what she missed.
        let mut alice = scene.connect(&cluster, 1, "a1", "Alice").await;
        scene.subscribe(&mut alice, alice_seq).await;
        let missed = events_until(&mut alice, &mut alice_seq, "while Alice was away 5").await;
        assert_eq!(missed, (1..=5).map(|index| format!("while Alice was away {index}")).collect::<Vec<_>>());
        // Carol's gateway died with her connection: once its lease lapses the
        // registry drops it, and Bob is told she went offline.
        let started = Instant::now();
        await_presence(&mut bob, &carol_id, false).await;
        eprintln!(
            "a killed gateway's users went offline {:?} after the kill was noticed (lease {GATEWAY_LEASE_SECONDS} s)",
            started.elapsed()
        );

        // Graceful stop of gateway 2 (SIGTERM) with gateway 1 back: clients
        // are told to reconnect elsewhere, the process drains and exits 0.
        cluster.gateways[0].restart().await;
        let (status, took) = cluster.gateways[1].terminate().await;
        assert!(status.success(), "a gateway stops cleanly on SIGTERM: {status:?}");
        eprintln!("gateway 2 drained and exited {took:?} after SIGTERM");
        for client in [&mut alice, &mut bob] {
            let reconnect = client.next_matching(|push| push.get("reconnect").cloned()).await;
            assert!(reconnect["reason"].as_str().unwrap_or_default().contains("shutting down"), "{reconnect}");
        }
        // Both come back through gateway 1 and nothing in between was missed.
        let mut alice = scene.connect(&cluster, 0, "a1", "Alice").await;
        let mut bob = scene.connect(&cluster, 0, "b1", "Bob").await;
        scene.subscribe(&mut alice, alice_seq).await;
        scene.subscribe(&mut bob, bob_seq).await;
        scene.send(&mut alice, "after the restart").await;
        let bob_saw = events_until(&mut bob, &mut bob_seq, "after the restart").await;
        assert_eq!(bob_saw.last().unwrap(), "after the restart");
        assert_eq!(bob_saw.len(), 7, "Bob sees his own six messages, then Alice's: {bob_saw:?}");
        events_until(&mut alice, &mut alice_seq, "after the restart").await;
        assert_eq!(scene.stored_texts(&cluster.gateway(0)).await.len(), 8);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_registry_leader_is_replaced_and_messaging_goes_on() {
    with_cluster(|mut cluster| async move {
        let scene = scene(&cluster).await;
        let dave_id = scene.ids["Dave"].clone();
        let mut alice = scene.connect(&cluster, 0, "a1", "Alice").await;
        let mut bob = scene.connect(&cluster, 1, "b1", "Bob").await;
        scene.subscribe(&mut bob, 0).await;
        assert!(!presence_of(&mut bob, &dave_id).await);

        let mut leader = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while leader.is_none() {
            assert!(Instant::now() < deadline, "no registry leader was elected");
            leader = cluster.registry_leader().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let leader = leader.unwrap();

        // Messages flow before, during and after the election.
        scene.send(&mut alice, "before").await;
        cluster.registry[leader].kill();
        let killed = Instant::now();
        // Dave connects right away: recording his connection needs a leader.
        let _dave = scene.connect(&cluster, 0, "d1", "Dave").await;
        for index in 1..=20 {
            scene.send(&mut alice, &format!("during {index}")).await;
        }
        let mut bob_seq = 0;
        let seen = events_until(&mut bob, &mut bob_seq, "during 20").await;
        assert_eq!(seen.len(), 21, "{seen:?}");
        // Dave shows online once a new leader took the write.
        await_presence(&mut bob, &dave_id, true).await;
        eprintln!(
            "registry leader killed: a new connection was recorded (presence visible on the other gateway) {:?} later",
            killed.elapsed()
        );
        let new_leader = cluster.registry_leader().await.expect("a new leader");
        assert_ne!(new_leader, leader);

        // The internal gRPC ports answer only callers with the cluster token.
        let voter = cluster.registry[new_leader].grpc_url();
        let refused = beseda_registry::admin::status(&voter, None).await.unwrap_err().to_string();
        assert!(refused.contains("cluster token"), "{refused}");
        let wrong = beseda_registry::admin::status(&voter, Some("not-the-token")).await.unwrap_err().to_string();
        assert!(wrong.contains("does not match"), "{wrong}");
        let status = beseda_registry::admin::status(&voter, Some("cluster-test-secret")).await.unwrap();
        assert_eq!(status.role, "leader");
        assert_eq!(status.gateways.len(), 2, "both gateways hold leases: {status:?}");
        let routing = beseda_routing::remote::RemoteRouting::connect_one(&cluster.routing[0].grpc_url()).await.unwrap();
        let anonymous = beseda_proto::v1::routing_server::Routing::get_server_info(
            &routing,
            tonic::Request::new(beseda_proto::v1::Empty {}),
        )
        .await
        .unwrap_err();
        assert_eq!(anonymous.code(), tonic::Code::Unauthenticated, "{anonymous:?}");

        // The old leader restarts from its disk and rejoins as a follower.
        cluster.registry[leader].restart().await;
        scene.send(&mut alice, "after").await;
        assert_eq!(events_until(&mut bob, &mut bob_seq, "after").await, vec!["after"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_no_acknowledged_message() {
    with_cluster(|mut cluster| async move {
        let scene = scene(&cluster).await;
        let mut alice = scene.connect(&cluster, 0, "a1", "Alice").await;
        let mut bob = scene.connect(&cluster, 1, "b1", "Bob").await;
        scene.subscribe(&mut bob, 0).await;
        let mut bob_seq = 0;
        scene.send(&mut alice, "before").await;
        assert_eq!(events_until(&mut bob, &mut bob_seq, "before").await, vec!["before"]);

        cluster.redis.kill();
        // Sends are acknowledged: the system of record is PostgreSQL, and
        // the bus is only how gateways hear about commits.
        for index in 1..=10 {
            scene.send(&mut alice, &format!("while Redis was down {index}")).await;
        }
        cluster.redis.restart();
        // Bob's gateway resubscribes and resyncs from PostgreSQL by seq:
        // every message once, in order, with no gap.
        let seen = events_until(&mut bob, &mut bob_seq, "while Redis was down 10").await;
        assert_eq!(seen, (1..=10).map(|index| format!("while Redis was down {index}")).collect::<Vec<_>>());
        scene.send(&mut alice, "after").await;
        assert_eq!(events_until(&mut bob, &mut bob_seq, "after").await, vec!["after"]);
        // And nothing more: a duplicate would show up as a seq already seen.
        if let Some(extra) = bob.next_frame_within(Duration::from_millis(500)).await {
            assert!(extra.get("event").is_none(), "no event may arrive twice: {extra}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_node_killed_mid_burst_stores_every_acknowledged_message_once() {
    with_cluster(|mut cluster| async move {
        let scene = scene(&cluster).await;
        let gateways = [cluster.gateway(0), cluster.gateway(1)];
        let path = format!("/api/v1/conversations/{}/messages", scene.conversation_id);
        let senders: Vec<_> = [("a1", "Alice"), ("b1", "Bob")]
            .into_iter()
            .enumerate()
            .map(|(index, (infobase_id, name))| {
                let gateway = TestServer::remote(&gateways[index].base_url, gateways[index].outbox.clone());
                let auth = scene.application.user(infobase_id, name);
                let path = path.clone();
                tokio::spawn(async move {
                    // Each message is retried with its clientMessageId until
                    // acknowledged, as a client should after an error.
                    let mut acknowledged = Vec::new();
                    let mut retries = 0;
                    for sequence in 0..150 {
                        let text = format!("{name} {sequence}");
                        let body = json!({"text": text, "clientMessageId": text});
                        let mut attempts = 0;
                        loop {
                            let (status, answer) = gateway.call("POST", &path, &auth, Some(body.clone())).await;
                            if status == 200 {
                                assert_eq!(answer["text"], text.as_str());
                                acknowledged.push(text);
                                break;
                            }
                            attempts += 1;
                            retries += 1;
                            assert!(attempts < 50, "{text} never acknowledged: {status} {answer}");
                            assert_eq!(
                                answer["error"]["code"], "unavailable",
                                "only unavailability is expected: {answer}"
                            );
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    (acknowledged, retries)
                })
            })
            .collect();
        // Kill one routing node while both senders are in full flow.
        tokio::time::sleep(Duration::from_millis(600)).await;
        cluster.routing[0].kill();
        let mut acknowledged = Vec::new();
        for sender in senders {
            let (texts, retries) = sender.await.unwrap();
            eprintln!("a sender retried {retries} times while a routing node was down");
            acknowledged.extend(texts);
        }
        assert_eq!(acknowledged.len(), 300);
        let stored = scene.stored_texts(&cluster.gateway(0)).await;
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for text in &stored {
            *counts.entry(text.as_str()).or_default() += 1;
        }
        for text in &acknowledged {
            assert_eq!(counts.get(text.as_str()), Some(&1), "{text} must be stored exactly once");
        }
        assert_eq!(stored.len(), acknowledged.len(), "nothing unacknowledged or duplicated is stored");
        // The surviving routing node serves everything now.
        let health = cluster.gateways[0].health().await;
        assert_eq!(health["components"]["routing"]["ok"], true, "{health}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_answers_through_a_gateway_while_bots_run_in_their_own_process() {
    with_cluster(|cluster| async move {
        let scene = scene(&cluster).await;
        let gateway = cluster.gateway(1);
        // The echo bot's application server holds its processing connection
        // through gateway 1; the gateway forwards it to the bots node.
        let settings = beseda_echo_bot::Settings {
            server_url: cluster.gateways[0].base_url(),
            application_id: scene.application.id.clone(),
            application_key: scene.application.key.clone(),
            renew: Duration::from_secs(60),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let bot = tokio::spawn(beseda_echo_bot::run(settings, async move {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(20);
        let bot_user_id = loop {
            let bots = gateway.ok("GET", "/api/v1/bots", &scene.application.privileged(), None).await;
            if let Some(bot) = bots["bots"].as_array().and_then(|bots| bots.first()) {
                break bot["userId"].as_str().unwrap().to_owned();
            }
            assert!(Instant::now() < deadline, "the predefined bot was not created through the gateway");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let conversation_id = one_on_one(&gateway, &scene.application, &scene.ids["Alice"], &bot_user_id).await;
        let alice = scene.application.user("a1", "Alice");
        let path = format!("/api/v1/conversations/{conversation_id}/messages");
        for round in 1..=3 {
            let sent = Instant::now();
            gateway.ok("POST", &path, &alice, Some(json!({"text": format!("ping {round}")}))).await;
            let expected = format!("echo\n>ping {round}");
            loop {
                let page = gateway.ok("POST", &format!("{path}/search"), &alice, Some(json!({}))).await;
                let messages = page["messages"].as_array().cloned().unwrap_or_default();
                if messages.iter().any(|message| message["text"] == expected.as_str()) {
                    assert_eq!(messages.len(), round * 2, "one answer per message: {messages:?}");
                    break;
                }
                assert!(sent.elapsed() < Duration::from_secs(20), "the echo bot did not answer {round}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            eprintln!(
                "echo bot round {round}: answered {:?} after the send (bots in their own process)",
                sent.elapsed()
            );
        }
        let _ = stop.send(());
        bot.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_processing_connection_per_application_holds_across_gateways_and_bots_nodes() {
    with_cluster(|cluster| async move {
        let scene = scene(&cluster).await;
        let (first_gateway, second_gateway) = (cluster.gateway(0), cluster.gateway(1));
        // The application's connection through gateway 1 ...
        let mut older = Processing::connect(&first_gateway, &scene.application, json!([{"botType": "Echo"}])).await;
        let bot_user_id = older.bot_user("Echo");
        // ... is superseded by a newer one through gateway 2: both gateways
        // send one application's processing connections to the same bots node.
        let mut newer = Processing::connect(&second_gateway, &scene.application, json!([{"botType": "Echo"}])).await;
        let closed = older.closed().await;
        assert_eq!(closed["code"], "lease_superseded", "{closed}");
        // The newer connection gets the events, whichever bots node relayed them.
        let conversation_id = one_on_one(&second_gateway, &scene.application, &scene.ids["Alice"], &bot_user_id).await;
        let alice = scene.application.user("a1", "Alice");
        let path = format!("/api/v1/conversations/{conversation_id}/messages");
        for round in 1..=3 {
            let text = format!("to the bot {round}");
            first_gateway.ok("POST", &path, &alice, Some(json!({"text": text}))).await;
            let event = newer.next_message_event().await;
            assert_eq!(event["message"]["text"], text.as_str());
            newer.ack(&event).await;
        }
        // Once more through the same gateway, which would pick the other bots
        // node if it balanced processing connections round-robin.
        let _newest = Processing::connect(&second_gateway, &scene.application, json!([{"botType": "Echo"}])).await;
        let closed = newer.closed().await;
        assert_eq!(closed["code"], "lease_superseded", "{closed}");
    })
    .await;
}

/// The next push about the scene's conversation: an event or the end of the subscription.
async fn next_about_conversation(client: &mut Client, conversation_id: &str) -> Value {
    let id = conversation_id.to_owned();
    client
        .next_matching(move |push| {
            let event = push.get("event").filter(|event| event["conversationId"] == id.as_str());
            let ended = push.get("subscriptionEnded").filter(|ended| ended["conversationId"] == id.as_str());
            event.or(ended).map(|_| push.clone())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_stops_receiving_on_every_gateway() {
    with_cluster(|cluster| async move {
        let scene = scene(&cluster).await;
        let conversation = scene.conversation_id.clone();
        // Bob on each gateway; Carol and Dave stay members and witness the
        // messages after the removal on both gateways.
        let mut alice = scene.connect(&cluster, 0, "a1", "Alice").await;
        let mut bob_first = scene.connect(&cluster, 0, "b1", "Bob").await;
        let mut bob_second = scene.connect(&cluster, 1, "b1", "Bob").await;
        let mut carol = scene.connect(&cluster, 0, "c1", "Carol").await;
        let mut dave = scene.connect(&cluster, 1, "d1", "Dave").await;
        for client in [&mut alice, &mut bob_first, &mut bob_second, &mut carol, &mut dave] {
            scene.subscribe(client, 0).await;
        }
        scene.send(&mut alice, "before").await;
        for bob in [&mut bob_first, &mut bob_second] {
            let before = next_about_conversation(bob, &conversation).await;
            assert_eq!(before["event"]["messageCreated"]["text"], "before", "{before}");
        }

        cluster
            .gateway(1)
            .ok(
                "PATCH",
                &format!("/api/v1/conversations/{conversation}"),
                &scene.application.privileged(),
                Some(json!({"removeMemberIds": [scene.ids["Bob"]]})),
            )
            .await;
        for text in ["after 1", "after 2"] {
            scene.send(&mut alice, text).await;
        }
        for bob in [&mut bob_first, &mut bob_second] {
            let change = next_about_conversation(bob, &conversation).await;
            assert!(change["event"].get("conversationChanged").is_some(), "{change}");
            let ended = next_about_conversation(bob, &conversation).await;
            assert_eq!(ended["subscriptionEnded"]["reason"], "SUBSCRIPTION_END_REASON_REMOVED", "{ended}");
            let last_seq: u64 = ended["subscriptionEnded"]["lastSeq"].as_str().unwrap().parse().unwrap();
            assert_eq!(last_seq, seq_of(&change["event"]), "{ended}");
        }
        // Both gateways delivered everything after the removal to the members...
        let (mut carol_seq, mut dave_seq) = (0, 0);
        events_until(&mut carol, &mut carol_seq, "after 2").await;
        events_until(&mut dave, &mut dave_seq, "after 2").await;
        // ...and nothing of it to Bob.
        for bob in [&mut bob_first, &mut bob_second] {
            while let Some(frame) = bob.next_frame_within(Duration::from_millis(300)).await {
                let about = frame.get("event").map(|event| &event["conversationId"]);
                assert_ne!(about, Some(&json!(conversation)), "nothing after the removal: {frame}");
            }
        }
    })
    .await;
}
