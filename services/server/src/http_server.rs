//! The public HTTP listener: the axum router on hyper's HTTP/1 connections,
//! with the protections `axum::serve` does not have.
//!
//! - A connection must deliver each request's header within
//!   `header_read_timeout` (the first one counted from the accept, later
//!   ones from their first byte), and may wait idle between requests for
//!   `keep_alive_timeout`; then it is closed. Without these a client that
//!   never finished its request line kept its connection, and its file
//!   descriptor, forever.
//! - At most `max_connections` are open at once (WebSocket connections
//!   included: the place travels with the socket through the upgrade). One
//!   over the cap is answered `503` with a JSON error and `Retry-After`,
//!   then closed, so the descriptors of the connections being served are
//!   never all taken.
//! - An accept error such as EMFILE is logged and retried after a pause,
//!   never the end of the server.
//! - The soft open-files limit is raised to the hard one at start.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

/// The settings of the listener.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub max_connections: usize,
}

/// Descriptors kept free for everything but client connections: the
/// database, Redis, gRPC, the registry, log and data files.
const RESERVED_DESCRIPTORS: u64 = 128;

/// Refusals being written at once; beyond this a connection over the cap
/// is closed without an answer.
const MAX_REFUSALS: usize = 256;

/// How long a refusal may take to write.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the deadlines of a waiting connection are looked at again (a
/// request's first byte can move its deadline earlier).
const DEADLINE_RECHECK: Duration = Duration::from_secs(1);

/// Raises the soft limit of open files to the hard one (logged) and
/// returns the soft limit in force. Distributions commonly start services
/// at 1,024, which a few hundred idle clients exhaust.
pub fn raise_open_files_limit() -> Option<u64> {
    let (soft, hard) = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open files limit");
            return None;
        }
    };
    if soft >= hard {
        tracing::info!(limit = soft, "the open files limit is already the hard limit");
        return Some(soft);
    }
    match rlimit::increase_nofile_limit(hard) {
        Ok(raised) => {
            tracing::info!(from = soft, to = raised, "raised the soft open files limit to the hard limit");
            Some(raised)
        }
        Err(error) => {
            tracing::warn!(%error, limit = soft, "cannot raise the open files limit");
            Some(soft)
        }
    }
}

/// The connection cap in force: the setting, lowered to what the open
/// files limit leaves for client connections.
pub fn effective_max_connections(configured: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else { return configured };
    let available = usize::try_from(open_files.saturating_sub(RESERVED_DESCRIPTORS).max(1)).unwrap_or(usize::MAX);
    if available < configured {
        tracing::warn!(
            configured,
            open_files,
            in_force = available,
            "server.max_connections is above what the open files limit allows; raise the hard limit (ulimit -Hn, LimitNOFILE) to use it"
        );
        return available;
    }
    configured
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets every
/// connection finish its request (WebSocket connections close themselves
/// on the same signal) and returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let max_connections = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let places = Arc::new(Semaphore::new(max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let (stopping_sender, stopping) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) if is_per_connection(&error) => continue,
            Err(error) => {
                // Out of descriptors or memory: the connections being served
                // go on, and accepting resumes when some have closed.
                if last_accept_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(%error, "cannot accept connections; retrying");
                    last_accept_warning = Some(Instant::now());
                }
                metrics::counter!("beseda_http_accept_errors_total").increment(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match places.clone().try_acquire_owned() {
            Ok(place) => {
                tokio::spawn(serve_connection(stream, place, router.clone(), limits, stopping.clone()));
            }
            Err(_) => {
                metrics::counter!("beseda_http_connections_refused_total").increment(1);
                if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream, max_connections).await;
                        drop(refusal);
                    });
                }
            }
        }
    }
    drop(listener);
    let _ = stopping_sender.send(true);
    // Every connection holds a place until its socket closes.
    let _ = places.acquire_many(max_connections as u32).await;
    Ok(())
}

/// Errors about one connection that went away before it was accepted.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// The answer to a connection over the cap.
async fn refuse(mut stream: TcpStream, max_connections: usize) {
    let body = serde_json::json!({
        "error": {
            "code": "unavailable",
            "message": format!(
                "the server has {max_connections} connections open, the most it accepts; retry in a second"
            ),
        }
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nx-beseda-error-code: unavailable\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// What a connection is doing, for its deadlines.
struct Activity {
    accepted: Instant,
    /// Requests answered so far.
    answered: u64,
    /// Requests being answered.
    in_flight: usize,
    /// Since when the connection waits for its next request (the end of
    /// the last answer, or the last byte written of it).
    idle_since: Instant,
    /// When the first byte of the next request arrived.
    request_started: Option<Instant>,
}

type SharedActivity = Arc<Mutex<Activity>>;

fn lock(activity: &SharedActivity) -> std::sync::MutexGuard<'_, Activity> {
    activity.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Activity {
    /// When the connection must be closed if nothing changes; `None` while
    /// a request is being answered.
    fn deadline(&self, limits: &HttpLimits) -> Option<Instant> {
        if self.in_flight > 0 {
            return None;
        }
        if self.answered == 0 {
            return Some(self.accepted + limits.header_read_timeout);
        }
        Some(match self.request_started {
            Some(started) => started + limits.header_read_timeout,
            None => self.idle_since + limits.keep_alive_timeout,
        })
    }
}

/// The socket, watched for the first byte of each request, holding the
/// connection's place until it is dropped (after a WebSocket upgrade too).
struct Watched {
    stream: TcpStream,
    activity: SharedActivity,
    _place: OwnedSemaphorePermit,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            let mut activity = lock(&self.activity);
            if activity.in_flight == 0 && activity.request_started.is_none() {
                activity.request_started = Some(Instant::now());
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            // A long answer still being written is not idleness.
            let mut activity = lock(&self.activity);
            if activity.in_flight == 0 {
                activity.idle_since = Instant::now();
            }
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

async fn serve_connection(
    stream: TcpStream,
    place: OwnedSemaphorePermit,
    router: axum::Router,
    limits: HttpLimits,
    mut stopping: watch::Receiver<bool>,
) {
    let now = Instant::now();
    let activity = Arc::new(Mutex::new(Activity {
        accepted: now,
        answered: 0,
        in_flight: 0,
        idle_since: now,
        request_started: None,
    }));
    let io = TokioIo::new(Watched { stream, activity: activity.clone(), _place: place });
    let router = TowerToHyperService::new(router);
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            lock(&activity).in_flight += 1;
            let answer = hyper::service::Service::call(&router, request);
            let activity = activity.clone();
            async move {
                let response = answer.await;
                let mut activity = lock(&activity);
                activity.in_flight = activity.in_flight.saturating_sub(1);
                activity.answered += 1;
                activity.idle_since = Instant::now();
                activity.request_started = None;
                response
            }
        })
    };
    let connection = hyper::server::conn::http1::Builder::new().serve_connection(io, service).with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    loop {
        let deadline = lock(&activity).deadline(&limits);
        let wake = deadline.map(|deadline| deadline.min(Instant::now() + DEADLINE_RECHECK));
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, "http connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                if lock(&activity).deadline(&limits).is_some_and(|deadline| deadline <= Instant::now()) {
                    metrics::counter!("beseda_http_connections_timed_out_total").increment(1);
                    return;
                }
            }
            changed = stopping.changed(), if !closing => {
                if changed.is_err() || *stopping.borrow() {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HttpLimits = HttpLimits {
        header_read_timeout: Duration::from_secs(10),
        keep_alive_timeout: Duration::from_secs(60),
        max_connections: 100,
    };

    #[test]
    fn deadlines_follow_what_the_connection_is_doing() {
        let accepted = Instant::now();
        let mut activity =
            Activity { accepted, answered: 0, in_flight: 0, idle_since: accepted, request_started: None };
        assert_eq!(activity.deadline(&LIMITS), Some(accepted + LIMITS.header_read_timeout), "the first request");
        activity.in_flight = 1;
        assert_eq!(activity.deadline(&LIMITS), None, "a request being answered");
        let answered = accepted + Duration::from_secs(3);
        activity.in_flight = 0;
        activity.answered = 1;
        activity.idle_since = answered;
        assert_eq!(activity.deadline(&LIMITS), Some(answered + LIMITS.keep_alive_timeout), "keep-alive");
        let started = answered + Duration::from_secs(20);
        activity.request_started = Some(started);
        assert_eq!(activity.deadline(&LIMITS), Some(started + LIMITS.header_read_timeout), "the next header");
    }

    #[test]
    fn the_cap_leaves_descriptors_for_everything_else() {
        assert_eq!(effective_max_connections(10_000, None), 10_000);
        assert_eq!(effective_max_connections(10_000, Some(1_024)), 1_024 - RESERVED_DESCRIPTORS as usize);
        assert_eq!(effective_max_connections(500, Some(1_048_576)), 500);
    }
}
