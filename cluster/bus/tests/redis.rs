//! The Redis bus against real Redis servers. Each test starts its own
//! `redis-server` on a free loopback port (never the shared one on 6379, so
//! tests can kill and restart it) and stops it when done.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use beseda_bus::{Bus, Received, RedisBus, RedisBusConfig, Subscription, Topic};
use beseda_proto::v1::{BusEvent, ConversationEvent, bus_event};
use beseda_testkit::{RedisProcess, Relay};
use tokio::time::{Instant, sleep, timeout};

const REDIS_CLI: &str = "/usr/bin/redis-cli";
/// The longest any single expected thing (an event, a reconnection) may take.
const STEP: Duration = Duration::from_secs(15);
/// How long a subscriber must stay quiet to count as having received nothing.
const QUIET: Duration = Duration::from_millis(500);

/// Every `PUBLISH` is refused (NOPERM) until [`allow_publishing`]: given at
/// the server's start, so no publish can slip through before a test is ready.
const REFUSE_PUBLISH: [&str; 8] = ["--user", "default", "on", "nopass", "~*", "&*", "+@all", "-publish"];

async fn client_connection(server: &RedisProcess) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(server.url()).expect("the test Redis URL");
    client.get_multiplexed_async_connection().await.expect("connect to the test Redis")
}

async fn allow_publishing(server: &RedisProcess) {
    let mut connection = client_connection(server).await;
    redis::cmd("ACL")
        .arg(&["SETUSER", "default", "+publish"])
        .query_async::<()>(&mut connection)
        .await
        .expect("ACL SETUSER");
}

/// How many connections are subscribed to `channel`.
async fn subscriber_count(server: &RedisProcess, channel: &str) -> u64 {
    let mut connection = client_connection(server).await;
    let (name, count): (String, u64) =
        redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut connection).await.expect("PUBSUB NUMSUB");
    assert_eq!(name, channel);
    count
}

fn config() -> RedisBusConfig {
    // Short backoff: a restarted Redis is found again within a fraction of a second.
    RedisBusConfig {
        channel_prefix: "test".into(),
        reconnect_backoff_max: Duration::from_millis(200),
        ..RedisBusConfig::default()
    }
}

async fn connect(server: &RedisProcess) -> Arc<RedisBus> {
    RedisBus::connect(&server.url(), config()).await.expect("connect the bus")
}

fn conversation(application_id: &str, conversation_id: &str) -> Topic {
    Topic::Conversation { application_id: application_id.into(), conversation_id: conversation_id.into() }
}

fn event(seq: u64) -> BusEvent {
    BusEvent {
        application_id: "app".into(),
        kind: Some(bus_event::Kind::ConversationEvent(ConversationEvent {
            conversation_id: "c1".into(),
            seq,
            ..Default::default()
        })),
        ..Default::default()
    }
}

async fn next(subscription: &mut Subscription) -> Received {
    timeout(STEP, subscription.recv()).await.expect("nothing received in time").expect("the bus closed")
}

/// The sequence number of the next item, which must be an event.
async fn next_seq(subscription: &mut Subscription) -> u64 {
    match next(subscription).await {
        Received::Event(event) => match &event.kind {
            Some(bus_event::Kind::ConversationEvent(event)) => event.seq,
            other => panic!("unexpected event {other:?}"),
        },
        Received::Lagged(missed) => panic!("unexpected lag of {missed}"),
    }
}

async fn assert_quiet(subscription: &mut Subscription, what: &str) {
    if let Ok(received) = timeout(QUIET, subscription.recv()).await {
        panic!("{what} should receive nothing, got {received:?}");
    }
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + STEP;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn events_reach_the_subscribers_of_other_gateways_in_order_and_nobody_else() {
    let server = RedisProcess::start();
    let routing = connect(&server).await;
    let (gateway_a, gateway_b) = (connect(&server).await, connect(&server).await);
    assert!(routing.is_connected() && gateway_a.is_connected() && gateway_b.is_connected());
    assert!(routing.describe().contains(", connected,"), "{}", routing.describe());

    let topic = conversation("app", "c1");
    let mut on_a = gateway_a.subscribe(&topic).await;
    let mut on_b = gateway_b.subscribe(&topic).await;
    let mut other_conversation = gateway_b.subscribe(&conversation("app", "c2")).await;
    let mut other_application = gateway_b.subscribe(&conversation("other-app", "c1")).await;
    let mut user_with_same_id =
        gateway_a.subscribe(&Topic::User { application_id: "app".into(), user_id: "c1".into() }).await;

    for seq in 1..=200 {
        routing.publish(&topic, event(seq)).await;
    }
    for seq in 1..=200 {
        assert_eq!(next_seq(&mut on_a).await, seq);
        assert_eq!(next_seq(&mut on_b).await, seq);
    }
    assert_quiet(&mut other_conversation, "another conversation").await;
    assert_quiet(&mut other_application, "the same conversation id in another application").await;
    assert_quiet(&mut user_with_same_id, "a user topic with the same id").await;

    // The other topics work too: they were quiet for the right reason.
    routing.publish(&conversation("other-app", "c1"), event(7)).await;
    assert_eq!(next_seq(&mut other_application).await, 7);
    assert_quiet(&mut on_a, "the first application's conversation").await;
}

#[tokio::test]
async fn the_last_local_subscription_leaving_unsubscribes_the_channel() {
    let server = RedisProcess::start();
    let routing = connect(&server).await;
    let gateway = connect(&server).await;
    let topic = conversation("app", "c1");
    let channel = gateway.channel(&topic);
    assert_eq!(channel, "test:app:c:c1");
    assert_eq!(subscriber_count(&server, &channel).await, 0);

    let first = gateway.subscribe(&topic).await;
    let mut second = gateway.subscribe(&topic).await;
    // One Redis subscription per gateway, however many local subscribers.
    assert_eq!(subscriber_count(&server, &channel).await, 1);

    drop(first);
    sleep(QUIET).await;
    assert_eq!(subscriber_count(&server, &channel).await, 1, "a subscriber is left");
    routing.publish(&topic, event(1)).await;
    assert_eq!(next_seq(&mut second).await, 1);

    drop(second);
    let deadline = Instant::now() + STEP;
    while subscriber_count(&server, &channel).await != 0 {
        assert!(Instant::now() < deadline, "the channel was not unsubscribed");
        sleep(Duration::from_millis(20)).await;
    }

    // Subscribing again after that works like the first time.
    let mut again = gateway.subscribe(&topic).await;
    assert_eq!(subscriber_count(&server, &channel).await, 1);
    routing.publish(&topic, event(2)).await;
    assert_eq!(next_seq(&mut again).await, 2);
}

#[tokio::test]
async fn a_malformed_message_is_skipped_and_later_events_still_arrive() {
    let server = RedisProcess::start();
    let routing = connect(&server).await;
    let gateway = connect(&server).await;
    let topic = conversation("app", "c1");
    let mut subscription = gateway.subscribe(&topic).await;

    let output = tokio::process::Command::new(REDIS_CLI)
        .args(["-p", &server.port().to_string(), "PUBLISH", &gateway.channel(&topic), "this is not protobuf"])
        .output()
        .await
        .expect("run redis-cli");
    assert!(output.status.success(), "redis-cli failed: {output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1", "the gateway should have received it");

    routing.publish(&topic, event(1)).await;
    routing.publish(&topic, event(2)).await;
    assert_eq!(next_seq(&mut subscription).await, 1);
    assert_eq!(next_seq(&mut subscription).await, 2);
    assert!(gateway.is_connected(), "a bad message must not cost the connection");
}

#[tokio::test]
async fn after_a_redis_restart_subscribers_are_told_to_resync_and_receive_again() {
    let mut server = RedisProcess::start();
    let routing = connect(&server).await;
    let gateway = connect(&server).await;
    let topic = conversation("app", "c1");
    let mut subscription = gateway.subscribe(&topic).await;
    routing.publish(&topic, event(1)).await;
    assert_eq!(next_seq(&mut subscription).await, 1);

    server.kill();
    wait_until("the gateway notices Redis is gone", || !gateway.is_connected()).await;
    for seq in 2..=4 {
        timeout(Duration::from_secs(2), routing.publish(&topic, event(seq)))
            .await
            .expect("publishing must not block while Redis is down");
    }
    wait_until("the publisher notices Redis is gone", || !routing.is_connected()).await;

    // Publishing stays refused until the gateway has subscribed again, so
    // the events the publisher keeps retrying are bound to reach it.
    server.restart_with(&REFUSE_PUBLISH);
    match next(&mut subscription).await {
        Received::Lagged(missed) => assert_eq!(missed, 1),
        Received::Event(event) => panic!("expected a resync before any event, got {event:?}"),
    }
    wait_until("the gateway is connected again", || gateway.is_connected()).await;
    assert_quiet(&mut subscription, "a gateway while publishing is refused").await;

    allow_publishing(&server).await;
    wait_until("the publisher is connected again", || routing.is_connected()).await;
    routing.publish(&topic, event(5)).await;
    // At-least-once: a resent pipeline may repeat events (receivers drop
    // them by sequence number), but none is lost or reordered.
    let mut distinct = Vec::new();
    while distinct.last() != Some(&5) {
        let seq = next_seq(&mut subscription).await;
        if !distinct.contains(&seq) {
            distinct.push(seq);
        }
    }
    assert_eq!(distinct, [2, 3, 4, 5]);
}

#[tokio::test]
async fn a_bus_started_while_redis_is_down_connects_later_and_resyncs_its_early_subscribers() {
    let mut server = RedisProcess::not_started();
    let url = server.url();
    let started = Instant::now();
    let gateway = RedisBus::connect(&url, config()).await.expect("an unreachable Redis is not an error");
    assert!(!gateway.is_connected());
    assert!(gateway.describe().contains("disconnected"), "{}", gateway.describe());

    let topic = conversation("app", "c1");
    let mut subscription = timeout(Duration::from_secs(5), gateway.subscribe(&topic))
        .await
        .expect("subscribing must not wait for Redis for long");
    assert!(started.elapsed() < Duration::from_secs(10));

    server.restart();
    match next(&mut subscription).await {
        Received::Lagged(missed) => assert_eq!(missed, 1),
        Received::Event(event) => panic!("expected a resync first, got {event:?}"),
    }
    wait_until("the gateway is connected", || gateway.is_connected()).await;

    let routing = connect(&server).await;
    routing.publish(&topic, event(1)).await;
    assert_eq!(next_seq(&mut subscription).await, 1);
}

// The default single-threaded runtime is deliberate: the subscriber task
// yields to the reader at least every 128 messages (Tokio's cooperative
// budget), so a reader that keeps up never overflows the topic's 1024-event
// buffer however busy the machine's cores are.
#[tokio::test]
async fn a_burst_of_ten_thousand_events_arrives_complete_and_in_order() {
    const BURST: u64 = 10_000;
    let server = RedisProcess::start();
    let routing = connect(&server).await;
    let gateway = connect(&server).await;
    let topic = conversation("app", "c1");
    let mut subscription = gateway.subscribe(&topic).await;

    let reader = tokio::spawn(async move {
        for seq in 1..=BURST {
            assert_eq!(next_seq(&mut subscription).await, seq);
        }
    });
    timeout(Duration::from_secs(30), async {
        for seq in 1..=BURST {
            routing.publish(&topic, event(seq)).await;
        }
    })
    .await
    .expect("the burst was not accepted in time");
    timeout(Duration::from_secs(60), reader).await.expect("the burst did not arrive in time").expect("reader failed");
}

#[tokio::test]
async fn invalid_urls_and_configurations_fail_at_once() {
    let error = RedisBus::connect("not a url", RedisBusConfig::default()).await.err().expect("an invalid URL fails");
    assert!(format!("{error:#}").contains("invalid Redis URL"), "{error:#}");
    let error = RedisBus::connect("redis://:secret@127.0.0.1:1/x", RedisBusConfig::default())
        .await
        .err()
        .expect("an invalid database fails");
    assert!(!format!("{error:#}").contains("secret"), "the password leaked: {error:#}");
    let empty_queue = RedisBusConfig { publish_queue: 0, ..RedisBusConfig::default() };
    assert!(RedisBus::connect("redis://127.0.0.1:1", empty_queue).await.is_err());
}

/// A relay in front of `server`, whose connections can be made to die
/// silently.
async fn relay_to(server: &RedisProcess) -> (Relay, String) {
    let relay = Relay::start(Ipv4Addr::LOCALHOST.into(), (Ipv4Addr::LOCALHOST, server.port()).into()).await;
    let url = format!("redis://{}", relay.address());
    (relay, url)
}

/// Timings short enough that a silently dead connection is noticed within
/// a second.
fn quick_liveness() -> RedisBusConfig {
    RedisBusConfig {
        ping_interval: Duration::from_millis(200),
        command_timeout: Duration::from_millis(500),
        ..config()
    }
}

#[tokio::test]
async fn a_subscription_that_dies_silently_is_noticed_and_its_subscribers_told_to_resync() {
    let server = RedisProcess::start();
    let (relay, relay_url) = relay_to(&server).await;
    let routing = connect(&server).await;
    let gateway = RedisBus::connect(&relay_url, quick_liveness()).await.unwrap();
    let topic = conversation("app", "c1");
    let mut subscription = gateway.subscribe(&topic).await;
    routing.publish(&topic, event(1)).await;
    assert_eq!(next_seq(&mut subscription).await, 1);

    relay.freeze();
    let frozen_at = Instant::now();
    // Published into the silence: Redis hands it to a connection that no
    // longer delivers. The gateway must find out by itself.
    routing.publish(&topic, event(2)).await;
    match next(&mut subscription).await {
        Received::Lagged(missed) => assert_eq!(missed, 1),
        Received::Event(event) => panic!("a frozen connection delivered {event:?}"),
    }
    eprintln!("a silently dead subscription was replaced {:?} after it froze", frozen_at.elapsed());
    wait_until("the gateway is connected again", || gateway.is_connected()).await;
    routing.publish(&topic, event(3)).await;
    assert_eq!(next_seq(&mut subscription).await, 3, "live events flow on the new connection");
}

#[tokio::test]
async fn events_published_into_a_silently_dead_connection_are_sent_again() {
    let server = RedisProcess::start();
    let (relay, relay_url) = relay_to(&server).await;
    let routing = RedisBus::connect(&relay_url, quick_liveness()).await.unwrap();
    let gateway = connect(&server).await;
    let topic = conversation("app", "c1");
    let mut subscription = gateway.subscribe(&topic).await;
    routing.publish(&topic, event(1)).await;
    assert_eq!(next_seq(&mut subscription).await, 1);

    relay.freeze();
    let frozen_at = Instant::now();
    for seq in 2..=20 {
        timeout(Duration::from_secs(2), routing.publish(&topic, event(seq)))
            .await
            .expect("publishing must not block on a dead connection");
    }
    // Nothing reached Redis through the frozen connection, so after the
    // publisher gives up on it and reconnects, each event arrives once.
    let received: Vec<u64> = {
        let mut received = Vec::new();
        while received.len() < 19 {
            received.push(next_seq(&mut subscription).await);
        }
        received
    };
    assert_eq!(received, (2..=20).collect::<Vec<u64>>());
    eprintln!("events published into a silently dead connection arrived {:?} after it froze", frozen_at.elapsed());
    assert_quiet(&mut subscription, "a gateway after the last event").await;
}
