//! The relay: moves committed events from the store's outbox into the
//! queues of the bots and subscriptions that should receive them. Each
//! batch is one transaction (enqueue + delete from the outbox), so an event
//! is relayed exactly once whatever crashes in between.

use std::collections::{HashMap, HashSet};

use beseda_core::Result;
use beseda_core::bots::ConsumerKind;
use tokio::sync::watch;

use crate::BotsService;
use crate::policy::{Consumers, deliveries_for};

/// Outbox rows relayed per transaction.
const BATCH: u32 = 500;

pub async fn run(service: BotsService, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let relayed = match relay_batch(&service).await {
            Ok(relayed) => relayed,
            Err(error) => {
                tracing::error!(%error, "the relay failed; retrying");
                0
            }
        };
        if relayed == BATCH as usize {
            continue;
        }
        tokio::select! {
            _ = service.relay_wakeup.notified() => {}
            _ = tokio::time::sleep(service.config.poll_interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Relays one batch; returns how many outbox rows it took.
pub async fn relay_batch(service: &BotsService) -> Result<usize> {
    let store = service.store.as_ref();
    let batch = store.outbox_batch(BATCH).await?;
    // Rows taken from the outbox in the last batch; a full batch means a backlog.
    metrics::gauge!("beseda_bots_relay_batch").set(batch.len() as f64);
    if batch.is_empty() {
        return Ok(0);
    }
    let mut consumers: HashMap<String, Consumers> = HashMap::new();
    // Per application, so that one tenant's cached conversation can never
    // answer for another's.
    let mut conversations: HashMap<String, HashMap<_, _>> = HashMap::new();
    let mut deliveries = Vec::new();
    let mut bot_applications = HashSet::new();
    let mut outbound = false;
    for entry in &batch {
        if !consumers.contains_key(&entry.application_id) {
            consumers.insert(entry.application_id.clone(), Consumers::load(store, &entry.application_id).await?);
        }
        let Some(application_consumers) = consumers.get(&entry.application_id) else { continue };
        let cache = conversations.entry(entry.application_id.clone()).or_default();
        let made = deliveries_for(store, &entry.application_id, application_consumers, cache, &entry.event).await?;
        for delivery in made {
            match delivery.consumer_kind {
                ConsumerKind::Bot => {
                    bot_applications.insert(entry.application_id.clone());
                }
                ConsumerKind::Subscription => outbound = true,
            }
            deliveries.push((entry.application_id.clone(), delivery));
        }
    }
    let ids: Vec<i64> = batch.iter().map(|entry| entry.id).collect();
    store.relay_outbox(&ids, &deliveries).await?;
    metrics::counter!("beseda_relayed_events_total").increment(batch.len() as u64);
    for application_id in &bot_applications {
        service.processing.wake(application_id);
    }
    if outbound {
        service.outbound_wakeup.notify_one();
    }
    let applications: HashSet<String> = deliveries.iter().map(|(application_id, _)| application_id.clone()).collect();
    if !applications.is_empty() {
        // Nobody listening (one process) is fine.
        let _ = service.relayed.send(applications.into_iter().collect());
    }
    Ok(batch.len())
}
