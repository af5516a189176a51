//! The pub/sub side: one dedicated connection, the channels subscribed on
//! it, and the delivery of incoming messages to the local topics.
//!
//! Everything that touches Redis subscription state happens in this one
//! task, so a topic's first subscriber and its last one leaving can never
//! reorder their `SUBSCRIBE` and `UNSUBSCRIBE`: the task decides from the
//! current local state, not from the order the requests arrived in.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{PubSubSink, PubSubStream};
use ::redis::{Client, Msg, Value};
use anyhow::{Context as _, anyhow};
use beseda_proto::v1::BusEvent;
use futures_util::StreamExt as _;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, timeout};

use super::{Backoff, CHANNELS_PER_COMMAND, CONNECT_TIMEOUT, Shared, Timings};
use crate::SharedEvent;

/// Subscription commands in flight at once while resubscribing: pipelining
/// them turns a few hundred round trips into a few dozen.
const COMMANDS_IN_FLIGHT: usize = 8;

/// Runs until the bus is dropped (which aborts it).
pub(super) async fn run(
    shared: Arc<Shared>,
    client: Client,
    mut requests: mpsc::UnboundedReceiver<String>,
    timings: Timings,
) {
    let mut backoff = Backoff::new(timings.backoff_max);
    // Channels whose local use changed and that Redis has not been told about.
    let mut pending = HashSet::new();
    let mut connected_before = false;
    loop {
        let (sink, stream) = match connect(&client).await {
            Ok(pubsub) => pubsub,
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "cannot open the Redis pub/sub connection; retrying");
                wait_collecting(backoff.next_pause(), &mut requests, &mut pending).await;
                continue;
            }
        };
        let mut connection = Connection { sink, subscribed: HashSet::new(), timings };

        // A new connection starts with nothing subscribed: subscribe every
        // topic that still has local subscribers, then (in `confirm`) tell the
        // ones that may have missed events to resync.
        collect_ready(&mut requests, &mut pending);
        for channel in pending.drain() {
            shared.keep_if_used(&channel);
        }
        let wanted: Vec<String> = shared.topics.iter().map(|local| local.key().clone()).collect();
        let resubscribed = wanted.len();
        if let Err(error) = connection.subscribe(&shared, wanted).await {
            tracing::warn!(
                error = format!("{error:#}"),
                "cannot subscribe on the new Redis pub/sub connection; retrying"
            );
            shared.unconfirm_all();
            wait_collecting(backoff.next_pause(), &mut requests, &mut pending).await;
            continue;
        }
        shared.health.set_subscriber_connected(true);
        if connected_before {
            metrics::counter!("beseda_bus_reconnects_total", "connection" => "subscriber").increment(1);
            tracing::info!(
                channels = resubscribed,
                "Redis pub/sub connection restored; subscribers resync from storage"
            );
        }
        connected_before = true;
        backoff.reset();

        let lost = connection.serve(&shared, stream, &mut requests, &mut pending).await;
        shared.health.set_subscriber_connected(false);
        metrics::gauge!("beseda_bus_channels").set(0.0);
        shared.unconfirm_all();
        tracing::warn!(error = format!("{lost:#}"), "Redis pub/sub connection lost; reconnecting");
        wait_collecting(backoff.next_pause(), &mut requests, &mut pending).await;
    }
}

async fn connect(client: &Client) -> anyhow::Result<(PubSubSink, PubSubStream)> {
    let pubsub = timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| anyhow!("no connection within {CONNECT_TIMEOUT:?}"))??;
    Ok(pubsub.split())
}

/// Sleeps for `pause` while still taking requests, so a long outage with
/// subscription churn leaves a deduplicated set rather than a growing queue.
async fn wait_collecting(
    pause: Duration,
    requests: &mut mpsc::UnboundedReceiver<String>,
    pending: &mut HashSet<String>,
) {
    let pause = sleep(pause);
    tokio::pin!(pause);
    loop {
        tokio::select! {
            () = &mut pause => return,
            Some(channel) = requests.recv() => {
                pending.insert(channel);
            }
        }
    }
}

/// Takes every request already queued, without waiting.
fn collect_ready(requests: &mut mpsc::UnboundedReceiver<String>, pending: &mut HashSet<String>) {
    while let Ok(channel) = requests.try_recv() {
        pending.insert(channel);
    }
}

/// A live pub/sub connection and what Redis confirmed on it.
struct Connection {
    sink: PubSubSink,
    subscribed: HashSet<String>,
    timings: Timings,
}

impl Connection {
    /// Delivers messages and applies subscription changes until the
    /// connection fails; returns why it did.
    async fn serve(
        &mut self,
        shared: &Shared,
        mut stream: PubSubStream,
        requests: &mut mpsc::UnboundedReceiver<String>,
        pending: &mut HashSet<String>,
    ) -> anyhow::Error {
        let Timings { ping_interval, command_timeout, .. } = self.timings;
        let mut ping = interval_at(Instant::now() + ping_interval, ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => deliver(shared, &message),
                    None => return anyhow!("the connection was closed"),
                },
                Some(channel) = requests.recv() => {
                    // Everything that queued up while the last command was in
                    // flight goes into the next one: this is the batching.
                    pending.insert(channel);
                    collect_ready(requests, pending);
                    if let Err(error) = self.reconcile(shared, pending).await {
                        return error;
                    }
                }
                _ = ping.tick() => {
                    match timeout(command_timeout, self.sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => return anyhow::Error::new(error).context("PING failed"),
                        Err(_) => return anyhow!("no PING reply within {command_timeout:?}"),
                    }
                }
            }
        }
    }

    /// Brings Redis in line with the local use of each pending channel.
    async fn reconcile(&mut self, shared: &Shared, pending: &mut HashSet<String>) -> anyhow::Result<()> {
        let mut to_subscribe = Vec::new();
        let mut to_unsubscribe = Vec::new();
        for channel in pending.drain() {
            match (shared.keep_if_used(&channel), self.subscribed.contains(&channel)) {
                (true, false) => to_subscribe.push(channel),
                (false, true) => to_unsubscribe.push(channel),
                // A topic that was dropped and subscribed again before Redis
                // was told: the channel never stopped being subscribed.
                (true, true) => shared.confirm(&channel),
                (false, false) => {}
            }
        }
        self.subscribe(shared, to_subscribe).await?;
        self.unsubscribe(to_unsubscribe).await
    }

    async fn subscribe(&mut self, shared: &Shared, channels: Vec<String>) -> anyhow::Result<()> {
        // Batches are owned (not borrowed chunks) so the futures are plainly
        // `Send`, which spawning the task requires.
        let mut batches = Vec::with_capacity(channels.len().div_ceil(CHANNELS_PER_COMMAND));
        let mut channels = channels.into_iter().peekable();
        while channels.peek().is_some() {
            batches.push(channels.by_ref().take(CHANNELS_PER_COMMAND).collect::<Vec<String>>());
        }
        let command_timeout = self.timings.command_timeout;
        let commands = batches.into_iter().map(|batch| {
            let mut sink = self.sink.clone();
            async move {
                timeout(command_timeout, sink.subscribe(&batch))
                    .await
                    .map_err(|_| anyhow!("no SUBSCRIBE confirmation within {command_timeout:?}"))?
                    .context("SUBSCRIBE failed")?;
                anyhow::Ok(batch)
            }
        });
        let mut confirmations = futures_util::stream::iter(commands).buffered(COMMANDS_IN_FLIGHT);
        while let Some(confirmed) = confirmations.next().await {
            for channel in confirmed? {
                shared.confirm(&channel);
                self.subscribed.insert(channel);
            }
            metrics::gauge!("beseda_bus_channels").set(self.subscribed.len() as f64);
        }
        Ok(())
    }

    async fn unsubscribe(&mut self, channels: Vec<String>) -> anyhow::Result<()> {
        let command_timeout = self.timings.command_timeout;
        for batch in channels.chunks(CHANNELS_PER_COMMAND) {
            timeout(command_timeout, self.sink.unsubscribe(batch))
                .await
                .map_err(|_| anyhow!("no UNSUBSCRIBE confirmation within {command_timeout:?}"))?
                .context("UNSUBSCRIBE failed")?;
            for channel in batch {
                self.subscribed.remove(channel);
            }
            metrics::gauge!("beseda_bus_channels").set(self.subscribed.len() as f64);
        }
        Ok(())
    }
}

/// Hands one message to its topic's local subscribers. Whatever arrives is
/// untrusted: anything that is not a `BusEvent` is counted and skipped.
fn deliver(shared: &Shared, message: &Msg) {
    let channel = message.get_channel_name();
    // Messages can still arrive for a channel whose last local subscriber
    // just left (the UNSUBSCRIBE is on its way).
    let Some(local) = shared.topics.get(channel) else {
        return;
    };
    let payload = message.get_payload_bytes();
    match BusEvent::decode(payload) {
        Ok(event) => {
            metrics::counter!("beseda_bus_received_total").increment(1);
            // Fails only when nobody receives any more.
            let _ = local.sender.send(Arc::new(SharedEvent::new(event)));
        }
        Err(error) => {
            metrics::counter!("beseda_bus_decode_errors_total").increment(1);
            tracing::warn!(channel, bytes = payload.len(), %error, "skipping a bus message that is not a BusEvent");
        }
    }
}
