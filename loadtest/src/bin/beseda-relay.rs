//! `beseda-relay`: the machine's ceiling for WebSocket fan-out.
//!
//! A minimal WebSocket server that does one thing: every Text or Binary frame it receives is sent
//! to every connected connection, the sender included. It has no protocol, no authentication, no
//! persistence, no ordering beyond "per sender, in order" and no flow control; it is **not a
//! product** and nothing should depend on it. It exists so that the load generator's fan-out
//! scenario can be run against it and every Beseda figure in `docs/BENCHMARKS.md` can be stated as
//! a fraction of what a WebSocket server can reach on the same machine at all (the "ceiling").
//!
//! It is built to be fast, so that the ceiling is honest:
//!
//! - a tokio multi-threaded runtime (`--threads`, default one worker per core) and
//!   tokio-tungstenite for the handshake and the framing;
//! - each connection has a reader task and a writer task joined by a bounded queue
//!   (`--queue`); a received frame is shared (reference counted, never copied or re-encoded per
//!   receiver) and offered to every queue with `try_send`: a full queue drops the frame for that
//!   connection and counts it, so memory stays bounded when a client cannot keep up;
//! - the writer drains everything queued for its connection, encodes all of it into its write
//!   buffer and flushes once: one write for many frames is what makes millions of deliveries per
//!   second possible;
//! - the registry of connections is sharded (`--shards`), each shard a read-mostly lock over a
//!   slot list; a broadcasting reader starts at a different shard per connection, so readers on
//!   different threads do not all hit the same lock at the same time;
//! - frames that are already waiting in a reader's buffer are broadcast together (up to
//!   `--batch`), so under overload the per-delivery cost shrinks instead of growing.
//!
//! Every second one line goes to stderr (connections, frames received/s, deliveries/s, dropped/s,
//! frames per flush); on exit (`--duration-seconds`, SIGINT or SIGTERM) the totals, including the
//! best second. A "delivery" is one frame written and flushed to one connection's socket; a "drop"
//! is one frame not queued for one connection because its queue was full.
//!
//! Example: `beseda-relay --listen 127.0.0.1:9100 --listen 127.0.0.1:9101 --duration-seconds 60`,
//! then point the load generator's fan-out scenario at `ws://127.0.0.1:9100/` (and `:9101`).

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Poll, ready};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Bare WebSocket fan-out relay: the machine's ceiling for fan-out (not a product).
///
/// Every Text or Binary frame received on any connection is sent to every connection, the sender
/// included. Run the load generator's fan-out scenario against it to measure what a WebSocket
/// server can reach on this machine at all; see docs/BENCHMARKS.md.
///
/// Prints one line a second to stderr (connections, frames received/s, deliveries/s, dropped/s,
/// frames per flush) and the totals on exit (--duration-seconds, SIGINT or SIGTERM). A delivery is
/// one frame written and flushed to one connection; a drop is one frame not queued for one
/// connection because its queue was full (the relay does no flow control).
#[derive(Debug, Parser)]
#[command(name = "beseda-relay", version)]
struct Args {
    /// Address to listen on; repeat the flag to listen on several addresses/ports so that clients
    /// can spread over them (one client address reaches one server address/port through at most
    /// the ~28k ephemeral ports of the default range). Port 0 picks a free port (see --port-file).
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:9100")]
    listen: Vec<SocketAddr>,

    /// Tokio worker threads. Default: the number of cores.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Capacity of each connection's outgoing queue, in broadcasts (one broadcast is one frame, or
    /// up to --batch frames that arrived together from one sender). A frame offered to a full
    /// queue is dropped for that connection and counted.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    queue: usize,

    /// Most frames one reader broadcasts together when several are already waiting in its buffer
    /// (1 disables batching). Memory per connection is bounded by queue x batch frames.
    #[arg(long, value_name = "N", default_value_t = 64)]
    batch: usize,

    /// Shards of the connection registry. More shards: less contention between broadcasting
    /// readers and connecting/disconnecting clients.
    #[arg(long, value_name = "N", default_value_t = 64)]
    shards: usize,

    /// Per-connection read buffer in bytes (tungstenite allocates and zero-fills it eagerly: keep
    /// it small when there are many connections).
    #[arg(long, value_name = "BYTES", default_value_t = 8 * 1024)]
    read_buffer: usize,

    /// Per-connection write buffer target in bytes: frames are encoded into it and written out
    /// when it is this full, or at the flush after each drained queue.
    #[arg(long, value_name = "BYTES", default_value_t = 128 * 1024)]
    write_buffer: usize,

    /// Largest accepted incoming message in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    max_message: usize,

    /// Listen backlog of each listener (capped by the kernel's net.core.somaxconn).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    backlog: u32,

    /// Exit by itself after this many seconds (bounded runs). Default: run until SIGINT/SIGTERM.
    #[arg(long, value_name = "N")]
    duration_seconds: Option<u64>,

    /// Once every listener is bound, write the bound addresses there, one per line (written to a
    /// temporary file and renamed, so a reader never sees a partial file). Use with port 0.
    #[arg(long, value_name = "PATH")]
    port_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.queue > 0, "--queue must be at least 1");
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    anyhow::ensure!(args.shards > 0, "--shards must be at least 1");
    anyhow::ensure!(args.read_buffer > 0, "--read-buffer must be at least 1");

    raise_fd_limit();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    eprintln!(
        "beseda-relay: {threads} worker threads, queue {}, batch {}, {} shards",
        args.queue, args.batch, args.shards
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("relay")
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = runtime.block_on(run(args));
    // Connections still open are simply dropped: the process is going away.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

/// Raises the soft limit on open files to the hard limit and prints the result.
fn raise_fd_limit() {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, hard)) => {
            let now = if soft < hard {
                match rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard) {
                    Ok(()) => hard,
                    Err(e) => {
                        eprintln!("beseda-relay: cannot raise the open-file limit from {soft} to {hard}: {e}");
                        soft
                    }
                }
            } else {
                soft
            };
            eprintln!("beseda-relay: open-file limit {now} (was {soft}, hard {hard})");
        }
        Err(e) => eprintln!("beseda-relay: cannot read the open-file limit: {e}"),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut listeners = Vec::with_capacity(args.listen.len());
    for addr in &args.listen {
        let listener = bind(*addr, args.backlog).with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!("beseda-relay: listening on ws://{local}/");
        listeners.push((listener, local));
    }
    if let Some(path) = &args.port_file {
        let addrs: Vec<SocketAddr> = listeners.iter().map(|(_, a)| *a).collect();
        write_port_file(path, &addrs).with_context(|| format!("writing {}", path.display()))?;
    }

    let relay = Arc::new(Relay {
        registry: Registry::new(args.shards),
        stats: Stats::default(),
        queue: args.queue,
        batch: args.batch,
        config: WebSocketConfig::default()
            .read_buffer_size(args.read_buffer)
            .write_buffer_size(args.write_buffer)
            .max_write_buffer_size(usize::MAX)
            .max_message_size(Some(args.max_message))
            .max_frame_size(Some(args.max_message)),
        next_id: AtomicU64::new(0),
    });
    for (listener, local) in listeners {
        tokio::spawn(accept_loop(listener, local, relay.clone()));
    }
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (relay, stop) = (relay.clone(), stop.clone());
        std::thread::Builder::new()
            .name("relay-report".into())
            .spawn(move || report_every_second(relay, started, stop))
            .context("starting the report thread")?;
    }

    let deadline = async {
        match args.duration_seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    let why = tokio::select! {
        () = deadline => "duration reached",
        () = shutdown_signal() => "signal",
    };
    stop.store(true, Ordering::Relaxed);
    print_totals(&relay, started.elapsed(), why);
    Ok(())
}

fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

fn write_port_file(path: &Path, addrs: &[SocketAddr]) -> io::Result<()> {
    let mut text = String::new();
    for a in addrs {
        text.push_str(&a.to_string());
        text.push('\n');
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Shared state of the relay.
struct Relay {
    registry: Registry,
    stats: Stats,
    queue: usize,
    batch: usize,
    config: WebSocketConfig,
    next_id: AtomicU64,
}

/// What a reader hands to every connection's writer: one frame, or several that arrived together.
/// Cloning either is a reference-count increment; the payload is never copied per receiver.
#[derive(Clone)]
enum Item {
    One(Message),
    Many(Arc<[Message]>),
}

impl Item {
    fn frames(&self) -> u64 {
        match self {
            Item::One(_) => 1,
            Item::Many(m) => m.len() as u64,
        }
    }
}

type Tx = mpsc::Sender<Item>;

/// Connections' queue senders, sharded by connection id. Broadcasting takes read locks only;
/// connecting and disconnecting take the write lock of one shard.
struct Registry {
    shards: Box<[Shard]>,
}

#[repr(align(128))]
struct Shard(RwLock<Slots>);

/// A slab: a slot list with a free list, O(1) insert and remove, cheap iteration.
#[derive(Default)]
struct Slots {
    entries: Vec<Option<Tx>>,
    free: Vec<usize>,
}

/// Where a connection sits in the registry.
#[derive(Clone, Copy)]
struct Slot {
    shard: usize,
    index: usize,
}

impl Registry {
    fn new(shards: usize) -> Self {
        Registry { shards: (0..shards).map(|_| Shard(RwLock::new(Slots::default()))).collect() }
    }

    fn insert(&self, id: u64, tx: Tx) -> Slot {
        let shard = (id % self.shards.len() as u64) as usize;
        let mut slots = self.shards[shard].0.write().unwrap_or_else(|e| e.into_inner());
        let index = match slots.free.pop() {
            Some(i) => {
                slots.entries[i] = Some(tx);
                i
            }
            None => {
                slots.entries.push(Some(tx));
                slots.entries.len() - 1
            }
        };
        Slot { shard, index }
    }

    fn remove(&self, slot: Slot) {
        let mut slots = self.shards[slot.shard].0.write().unwrap_or_else(|e| e.into_inner());
        if slots.entries[slot.index].take().is_some() {
            slots.free.push(slot.index);
        }
    }

    /// Offers `item` to every connection, starting at shard `start`. Returns (queued, dropped) in
    /// frames.
    fn broadcast(&self, item: &Item, start: usize) -> (u64, u64) {
        let frames = item.frames();
        let n = self.shards.len();
        let (mut queued, mut dropped) = (0u64, 0u64);
        for k in 0..n {
            let slots = self.shards[(start + k) % n].0.read().unwrap_or_else(|e| e.into_inner());
            for tx in slots.entries.iter().flatten() {
                match tx.try_send(item.clone()) {
                    Ok(()) => queued += frames,
                    Err(mpsc::error::TrySendError::Full(_)) => dropped += frames,
                    // The writer is gone (its socket failed); the reader will unregister soon.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        (queued, dropped)
    }
}

/// A counter split over cache lines, indexed by connection id, so that tasks on different threads
/// rarely write the same line.
struct Striped([Padded; STRIPES]);

const STRIPES: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

impl Default for Striped {
    fn default() -> Self {
        Striped(std::array::from_fn(|_| Padded::default()))
    }
}

impl Striped {
    fn add(&self, id: u64, n: u64) {
        if n > 0 {
            self.0[(id % STRIPES as u64) as usize].0.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn sum(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Ordering::Relaxed)).sum()
    }
}

#[derive(Default)]
struct Stats {
    /// Frames received (Text and Binary).
    received: Striped,
    /// Frames written and flushed to a connection.
    delivered: Striped,
    /// Frames not queued for a connection because its queue was full.
    dropped: Striped,
    /// Flushes by writers: `delivered / flushes` is how many frames one write carried on average.
    flushes: Striped,
    /// Connections currently registered.
    connections: Padded,
    /// Highest value `connections` reached.
    peak_connections: Padded,
    /// TCP connections accepted.
    accepted: Padded,
    /// WebSocket handshakes that failed or timed out.
    handshake_failures: Padded,
    /// Highest deliveries in one reporting second.
    best_second: Padded,
}

async fn accept_loop(listener: TcpListener, local: SocketAddr, relay: Arc<Relay>) {
    let mut last_error: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                relay.stats.accepted.0.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection(stream, relay.clone()));
            }
            Err(e) => {
                // Typically EMFILE/ENFILE: report at most once a second, back off a little.
                if last_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    eprintln!("beseda-relay: accept on {local}: {e}");
                    last_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One connection: registers its queue, performs the handshake, spawns the writer and then is the
/// reader until the connection ends.
async fn connection(stream: TcpStream, relay: Arc<Relay>) {
    let _ = stream.set_nodelay(true);
    let id = relay.next_id.fetch_add(1, Ordering::Relaxed);

    // Register before the handshake completes: once a client has seen the handshake response it is
    // guaranteed to receive every frame broadcast afterwards (frames arriving meanwhile wait in
    // its queue).
    let (tx, rx) = mpsc::channel(relay.queue);
    let slot = relay.registry.insert(id, tx);
    let now = relay.stats.connections.0.fetch_add(1, Ordering::Relaxed) + 1;
    relay.stats.peak_connections.0.fetch_max(now, Ordering::Relaxed);

    let handshake = tokio_tungstenite::accept_async_with_config(stream, Some(relay.config));
    match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Ok(Ok(ws)) => {
            let ws = Arc::new(Mutex::new(ws));
            tokio::spawn(write_loop(ws.clone(), rx, id, relay.clone()));
            read_loop(&ws, id, &relay).await;
            relay.registry.remove(slot);
            // The registry held the only sender: the writer drains what is left, closes the
            // socket and ends by itself. Do not wait for it.
        }
        Ok(Err(_)) | Err(_) => {
            relay.stats.handshake_failures.0.fetch_add(1, Ordering::Relaxed);
            relay.registry.remove(slot);
        }
    }
    relay.stats.connections.0.fetch_sub(1, Ordering::Relaxed);
}

/// The connection, shared by its reader and writer task. It is locked only inside a poll (never
/// across an await), so the two tasks never wait for each other for long; tokio-tungstenite keeps
/// separate read and write wakers. Unlike `StreamExt::split`, which takes its lock for every frame
/// fed, the writer takes this lock once per drained queue.
type Ws = Mutex<WebSocketStream<TcpStream>>;

fn lock(ws: &Ws) -> MutexGuard<'_, WebSocketStream<TcpStream>> {
    ws.lock().unwrap_or_else(|e| e.into_inner())
}

async fn next_message(ws: &Ws) -> Option<Result<Message, WsError>> {
    poll_fn(|cx| lock(ws).poll_next_unpin(cx)).await
}

/// Reads frames and broadcasts every Text and Binary one. Frames that are already decoded or
/// buffered when one arrives are broadcast with it, up to `relay.batch`.
async fn read_loop(ws: &Ws, id: u64, relay: &Relay) {
    let start = (id % relay.registry.shards.len() as u64) as usize;
    let mut batch: Vec<Message> = Vec::with_capacity(relay.batch.min(64));
    let mut open = true;
    while open {
        match next_message(ws).await {
            Some(Ok(m)) => open = take(m, &mut batch),
            _ => break,
        }
        // Whatever is ready without waiting goes into the same broadcast.
        while open && batch.len() < relay.batch {
            match next_message(ws).now_or_never() {
                None => break,
                Some(Some(Ok(m))) => open = take(m, &mut batch),
                Some(_) => open = false,
            }
        }
        let item = match batch.len() {
            0 => continue,
            1 => Item::One(batch.pop().expect("one frame")),
            _ => Item::Many(batch.drain(..).collect()),
        };
        let (_queued, dropped) = relay.registry.broadcast(&item, start);
        relay.stats.received.add(id, item.frames());
        relay.stats.dropped.add(id, dropped);
    }
}

/// Adds a data frame to the batch; returns false when the peer started closing. Pings are answered
/// by tungstenite itself; pongs are ignored.
fn take(m: Message, batch: &mut Vec<Message>) -> bool {
    match m {
        Message::Text(_) | Message::Binary(_) => {
            batch.push(m);
            true
        }
        Message::Close(_) => false,
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => true,
    }
}

/// Drains the connection's queue: encodes every queued frame into the write buffer, then flushes
/// once.
async fn write_loop(ws: Arc<Ws>, mut rx: mpsc::Receiver<Item>, id: u64, relay: Arc<Relay>) {
    let limit = relay.queue;
    let mut items: Vec<Item> = Vec::with_capacity(limit.min(1024));
    loop {
        if rx.recv_many(&mut items, limit).await == 0 {
            break;
        }
        let mut drained = items.drain(..);
        // The batch being fed and the position of its next frame.
        let mut batch: Option<(Arc<[Message]>, usize)> = None;
        let mut frames = 0u64;
        let written = poll_fn(|cx| {
            let mut ws = lock(&ws);
            loop {
                // Pending only when the write buffer is full and the socket takes no more; nothing
                // has been taken from the queue yet at that point.
                ready!(ws.poll_ready_unpin(cx))?;
                let next = match batch.take() {
                    Some((ms, i)) => {
                        let m = ms[i].clone();
                        if i + 1 < ms.len() {
                            batch = Some((ms, i + 1));
                        }
                        m
                    }
                    None => match drained.next() {
                        Some(Item::One(m)) => m,
                        Some(Item::Many(ms)) => {
                            batch = Some((ms, 0));
                            continue;
                        }
                        None => break,
                    },
                };
                ws.start_send_unpin(next)?;
                frames += 1;
            }
            Poll::Ready(ready!(ws.poll_flush_unpin(cx)))
        })
        .await;
        drop(drained);
        if written.is_err() {
            break;
        }
        relay.stats.delivered.add(id, frames);
        relay.stats.flushes.add(id, 1);
    }
    // Either the reader ended (queue closed: send the close frame / finish the peer's close) or
    // the socket failed. Dropping the receiver makes further offers fail as "closed".
    drop(rx);
    let _ = tokio::time::timeout(Duration::from_secs(2), poll_fn(|cx| lock(&ws).poll_close_unpin(cx))).await;
}

struct Snapshot {
    received: u64,
    delivered: u64,
    dropped: u64,
    flushes: u64,
}

impl Snapshot {
    fn take(stats: &Stats) -> Self {
        Snapshot {
            received: stats.received.sum(),
            delivered: stats.delivered.sum(),
            dropped: stats.dropped.sum(),
            flushes: stats.flushes.sum(),
        }
    }
}

/// Prints one line a second until `stop` is set. A plain thread, so that a saturated runtime
/// cannot delay or swallow the lines.
fn report_every_second(relay: Arc<Relay>, started: Instant, stop: Arc<AtomicBool>) {
    let mut last = Snapshot::take(&relay.stats);
    let mut last_at = Instant::now();
    for second in 1u64.. {
        let due = started + Duration::from_secs(second);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let now = Snapshot::take(&relay.stats);
        let at = Instant::now();
        let dt = at.duration_since(last_at).as_secs_f64().max(1e-9);
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
        let flushes = now.flushes.saturating_sub(last.flushes);
        let per_flush =
            if flushes == 0 { 0.0 } else { now.delivered.saturating_sub(last.delivered) as f64 / flushes as f64 };
        eprintln!(
            "beseda-relay: t={second:>4}s connections={} received/s={:.0} deliveries/s={:.0} dropped/s={:.0} \
             frames/flush={per_flush:.1}",
            relay.stats.connections.0.load(Ordering::Relaxed),
            rate(now.received, last.received),
            rate(now.delivered, last.delivered),
            rate(now.dropped, last.dropped),
        );
        relay.stats.best_second.0.fetch_max(rate(now.delivered, last.delivered) as u64, Ordering::Relaxed);
        last = now;
        last_at = at;
    }
}

fn print_totals(relay: &Relay, elapsed: Duration, why: &str) {
    let s = &relay.stats;
    let total = Snapshot::take(s);
    let secs = elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "beseda-relay: totals ({why}) after {secs:.1}s: received={} delivered={} dropped={} frames/flush={:.1} \
         (mean received/s={:.0} deliveries/s={:.0}; best second deliveries/s={}) connections={} \
         peak_connections={} accepted={} handshake_failures={}",
        total.received,
        total.delivered,
        total.dropped,
        if total.flushes == 0 { 0.0 } else { total.delivered as f64 / total.flushes as f64 },
        total.received as f64 / secs,
        total.delivered as f64 / secs,
        s.best_second.0.load(Ordering::Relaxed),
        s.connections.0.load(Ordering::Relaxed),
        s.peak_connections.0.load(Ordering::Relaxed),
        s.accepted.0.load(Ordering::Relaxed),
        s.handshake_failures.0.load(Ordering::Relaxed),
    );
}
