//! The publishing side: one ordered queue, drained by one task that
//! pipelines `PUBLISH`es on one connection, so events reach Redis in the
//! order routing published them, and a failed pipeline is resent whole
//! before anything newer.

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, RedisResult};
use tokio::sync::mpsc;

use super::{Backoff, CONNECT_TIMEOUT, Health, Timings};

/// `PUBLISH`es sent in one pipeline: enough to keep a burst to one round trip
/// per thousand events, few enough that a resent pipeline duplicates little.
const EVENTS_PER_PIPELINE: usize = 1_024;

/// One encoded event on its way to Redis.
pub(super) struct Outgoing {
    pub(super) channel: String,
    pub(super) payload: Vec<u8>,
}

/// Runs until the bus is dropped and the queue is drained (or, if Redis is
/// unreachable then, until the next failed attempt: nobody in this process
/// waits for those events any more, and storage has them).
pub(super) async fn run(client: Client, mut queue: mpsc::Receiver<Outgoing>, health: Arc<Health>, timings: Timings) {
    let mut backoff = Backoff::new(timings.backoff_max);
    let mut connection: Option<MultiplexedConnection> = None;
    let mut connected_before = false;
    // Taken from the queue but not yet confirmed by Redis; always sent again
    // before anything newer, which keeps the order across failures.
    let mut unsent: Vec<Outgoing> = Vec::with_capacity(EVENTS_PER_PIPELINE);
    loop {
        let Some(live) = connection.as_mut() else {
            match connect(&client, timings.command_timeout).await {
                Ok(opened) => {
                    connection = Some(opened);
                    health.set_publisher_connected(true);
                    if connected_before {
                        metrics::counter!("beseda_bus_reconnects_total", "connection" => "publisher").increment(1);
                        tracing::info!(resending = unsent.len(), "Redis publishing connection restored");
                    }
                    connected_before = true;
                }
                Err(error) => {
                    if give_up_when_abandoned(&queue, &unsent) {
                        return;
                    }
                    tracing::warn!(%error, unsent = unsent.len(), "cannot connect to Redis to publish; retrying");
                    tokio::time::sleep(backoff.next_pause()).await;
                }
            }
            continue;
        };

        if unsent.is_empty() {
            let Some(first) = queue.recv().await else {
                return;
            };
            unsent.push(first);
            while unsent.len() < EVENTS_PER_PIPELINE {
                match queue.try_recv() {
                    Ok(next) => unsent.push(next),
                    Err(_) => break,
                }
            }
            metrics::gauge!("beseda_bus_publish_queue_depth").set(queue.len() as f64);
        }

        match publish(live, &unsent).await {
            Ok(()) => {
                metrics::counter!("beseda_bus_published_total").increment(unsent.len() as u64);
                unsent.clear();
                backoff.reset();
            }
            Err(error) => {
                metrics::counter!("beseda_bus_publish_errors_total").increment(1);
                connection = None;
                health.set_publisher_connected(false);
                if give_up_when_abandoned(&queue, &unsent) {
                    return;
                }
                tracing::warn!(%error, unsent = unsent.len(), "publishing to Redis failed; resending after reconnecting");
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }
    }
}

async fn connect(client: &Client, command_timeout: Duration) -> RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(command_timeout));
    client.get_multiplexed_async_connection_with_config(&config).await
}

async fn publish(connection: &mut MultiplexedConnection, events: &[Outgoing]) -> RedisResult<()> {
    let mut pipeline = ::redis::pipe();
    for event in events {
        pipeline.cmd("PUBLISH").arg(&event.channel).arg(&event.payload).ignore();
    }
    pipeline.query_async(connection).await
}

/// Whether to stop retrying: the bus was dropped, so Redis being unreachable
/// would otherwise keep this task (and its connection attempts) alive forever.
fn give_up_when_abandoned(queue: &mpsc::Receiver<Outgoing>, unsent: &[Outgoing]) -> bool {
    if !queue.is_closed() {
        return false;
    }
    let dropped = unsent.len() + queue.len();
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "the Redis bus was dropped while Redis was unreachable; unsent events are left to storage"
        );
    }
    true
}
