//! Counting and timing, shared by every task of a run. Receivers record
//! into a [`Local`] (their own histogram for the current second) and fold
//! it into the shared state once per second, so a million deliveries a
//! second do not contend on one lock.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::result::{Percentiles, Second, Totals};

/// Latencies are recorded in microseconds, up to an hour, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("a histogram"))
}

#[derive(Default)]
struct Bucket {
    sent: u64,
    delivered: u64,
    errors: u64,
    connections: u64,
    latency: Option<Histogram<u64>>,
}

pub struct Recorder {
    start: Instant,
    total: Mutex<Histogram<u64>>,
    /// Scheduled send to the server's acknowledgement, for protocols that acknowledge.
    acknowledgement: Mutex<Histogram<u64>>,
    pub accepted: AtomicU64,
    seconds: Mutex<Vec<Bucket>>,
    pub sent: AtomicU64,
    pub expected: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    pub out_of_order: AtomicU64,
    pub errors: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connections_failed: AtomicU64,
    open: AtomicI64,
    peak: AtomicI64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            total: Mutex::new(histogram()),
            acknowledgement: Mutex::new(histogram()),
            accepted: AtomicU64::new(0),
            seconds: Mutex::new(Vec::new()),
            sent: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
            connections_failed: AtomicU64::new(0),
            open: AtomicI64::new(0),
            peak: AtomicI64::new(0),
        }
    }

    pub fn elapsed_seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn second_now(&self) -> usize {
        usize::try_from(self.start.elapsed().as_secs()).unwrap_or(usize::MAX)
    }

    fn with_bucket(&self, second: usize, update: impl FnOnce(&mut Bucket)) {
        let mut seconds = self.seconds.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if seconds.len() <= second {
            seconds.resize_with(second + 1, Bucket::default);
        }
        update(&mut seconds[second]);
    }

    /// Messages sent where sending is all there is to it (the relay; a
    /// request counted when answered): each of their receivers must get them.
    pub fn sent(&self, count: u64, receivers_each: u64) {
        self.sent.fetch_add(count, Ordering::Relaxed);
        self.expected.fetch_add(count * receivers_each, Ordering::Relaxed);
        self.with_bucket(self.second_now(), |bucket| bucket.sent += count);
    }

    /// A message was written to the server, which has yet to acknowledge it.
    pub fn attempted(&self, count: u64) {
        self.sent.fetch_add(count, Ordering::Relaxed);
        self.with_bucket(self.second_now(), |bucket| bucket.sent += count);
    }

    /// The server acknowledged a message (it is stored): from now on each of
    /// its receivers must get it.
    pub fn accepted(&self, receivers_each: u64, latency_micros: i64) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.expected.fetch_add(receivers_each, Ordering::Relaxed);
        let mut histogram = self.acknowledgement.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = histogram.record(u64::try_from(latency_micros).unwrap_or(0).max(1));
    }

    /// Scheduled send to acknowledgement.
    pub fn acknowledgement_percentiles(&self) -> Percentiles {
        percentiles(&self.acknowledgement.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.with_bucket(self.second_now(), |bucket| bucket.errors += 1);
    }

    pub fn connected(&self) {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
    }

    pub fn connection_failed(&self) {
        self.connections_failed.fetch_add(1, Ordering::Relaxed);
        self.error();
    }

    pub fn disconnected(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn open_connections(&self) -> u64 {
        u64::try_from(self.open.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Called once a second by the run: the open connections of that second.
    pub fn tick(&self) {
        let open = self.open_connections();
        let second = self.second_now().saturating_sub(1);
        self.with_bucket(second, |bucket| bucket.connections = open);
    }

    /// A recorder of one task's deliveries.
    pub fn local(&self) -> Local<'_> {
        Local { recorder: self, second: self.second_now(), latency: histogram(), delivered: 0 }
    }

    pub fn totals(&self) -> Totals {
        let expected = self.expected.load(Ordering::Relaxed);
        let delivered = self.delivered.load(Ordering::Relaxed);
        Totals {
            sent: self.sent.load(Ordering::Relaxed),
            expected_deliveries: expected,
            delivered,
            lost: expected.saturating_sub(delivered),
            duplicated: self.duplicated.load(Ordering::Relaxed),
            out_of_order: self.out_of_order.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            connections_opened: self.connections_opened.load(Ordering::Relaxed),
            connections_failed: self.connections_failed.load(Ordering::Relaxed),
            peak_connections: u64::try_from(self.peak.load(Ordering::Relaxed)).unwrap_or(0),
        }
    }

    pub fn percentiles(&self) -> Percentiles {
        percentiles(&self.total.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The latency percentiles of the last completed second (for the progress line).
    pub fn last_second(&self) -> Option<Second> {
        let second = self.second_now().checked_sub(1)?;
        self.timeline().into_iter().nth(second)
    }

    pub fn timeline(&self) -> Vec<Second> {
        let seconds = self.seconds.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        seconds
            .iter()
            .enumerate()
            .map(|(index, bucket)| {
                let latency = bucket.latency.as_ref().map(percentiles).unwrap_or_default();
                Second {
                    t: index as f64,
                    sent: bucket.sent,
                    delivered: bucket.delivered,
                    errors: bucket.errors,
                    connections: bucket.connections,
                    p50_ms: latency.p50,
                    p99_ms: latency.p99,
                    max_ms: latency.max,
                }
            })
            .collect()
    }
}

pub fn percentiles(histogram: &Histogram<u64>) -> Percentiles {
    if histogram.is_empty() {
        return Percentiles::default();
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    Percentiles {
        count: histogram.len(),
        mean: histogram.mean() / 1000.0,
        p50: ms(histogram.value_at_quantile(0.50)),
        p90: ms(histogram.value_at_quantile(0.90)),
        p99: ms(histogram.value_at_quantile(0.99)),
        p999: ms(histogram.value_at_quantile(0.999)),
        max: ms(histogram.max()),
    }
}

/// One task's deliveries of the current second.
pub struct Local<'a> {
    recorder: &'a Recorder,
    second: usize,
    latency: Histogram<u64>,
    delivered: u64,
}

impl Local<'_> {
    /// A first copy of a delivery, `latency_micros` after it was sent.
    pub fn delivered(&mut self, latency_micros: i64) {
        let second = self.recorder.second_now();
        if second != self.second {
            self.flush();
            self.second = second;
        }
        self.delivered += 1;
        let _ = self.latency.record(u64::try_from(latency_micros).unwrap_or(0).max(1));
    }

    pub fn flush(&mut self) {
        if self.delivered == 0 {
            return;
        }
        self.recorder.delivered.fetch_add(self.delivered, Ordering::Relaxed);
        let _ = self.recorder.total.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).add(&self.latency);
        let (delivered, latency) = (self.delivered, std::mem::replace(&mut self.latency, histogram()));
        self.recorder.with_bucket(self.second, |bucket| {
            bucket.delivered += delivered;
            match &mut bucket.latency {
                Some(existing) => {
                    let _ = existing.add(&latency);
                }
                None => bucket.latency = Some(latency),
            }
        });
        self.delivered = 0;
    }
}

impl Drop for Local<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// What one receiver saw of each sender: detects duplicates and late
/// (out-of-order) arrivals; the count of first copies is what was delivered.
#[derive(Default)]
pub struct OrderTracker {
    senders: HashMap<u32, SenderState>,
}

#[derive(Default)]
struct SenderState {
    next: u64,
    missing: BTreeSet<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    InOrder,
    /// First copy, but after a later message of the same sender.
    Late,
    Duplicate,
}

impl OrderTracker {
    pub fn observe(&mut self, sender: u32, seq: u64) -> Arrival {
        let state = self.senders.entry(sender).or_default();
        if seq == state.next {
            state.next += 1;
            Arrival::InOrder
        } else if seq > state.next {
            // Skipped ones may still come, late.
            state.missing.extend(state.next..seq);
            state.next = seq + 1;
            Arrival::InOrder
        } else if state.missing.remove(&seq) {
            Arrival::Late
        } else {
            Arrival::Duplicate
        }
    }
}

impl Recorder {
    /// Records an arrival seen by a tracker: counts duplicates and late ones,
    /// times first copies.
    pub fn arrival(&self, local: &mut Local<'_>, arrival: Arrival, latency_micros: i64) {
        match arrival {
            Arrival::Duplicate => {
                self.duplicated.fetch_add(1, Ordering::Relaxed);
            }
            Arrival::Late => {
                self.out_of_order.fetch_add(1, Ordering::Relaxed);
                local.delivered(latency_micros);
            }
            Arrival::InOrder => local.delivered(latency_micros),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracker_tells_in_order_late_and_duplicate_apart() {
        let mut tracker = OrderTracker::default();
        assert_eq!(tracker.observe(1, 0), Arrival::InOrder);
        assert_eq!(tracker.observe(1, 2), Arrival::InOrder);
        assert_eq!(tracker.observe(1, 1), Arrival::Late);
        assert_eq!(tracker.observe(1, 1), Arrival::Duplicate);
        assert_eq!(tracker.observe(1, 2), Arrival::Duplicate);
        assert_eq!(tracker.observe(2, 0), Arrival::InOrder, "senders are independent");
    }

    #[test]
    fn lost_is_expected_minus_delivered_and_percentiles_come_from_the_histogram() {
        let recorder = Recorder::new();
        recorder.sent(10, 3);
        {
            let mut local = recorder.local();
            for latency in 1..=28 {
                local.delivered(latency * 1000);
            }
        }
        let totals = recorder.totals();
        assert_eq!((totals.expected_deliveries, totals.delivered, totals.lost), (30, 28, 2));
        let percentiles = recorder.percentiles();
        assert_eq!(percentiles.count, 28);
        assert!((percentiles.max - 28.0).abs() < 0.1, "{percentiles:?}");
        assert!((percentiles.p50 - 14.0).abs() < 0.5, "{percentiles:?}");
    }
}
