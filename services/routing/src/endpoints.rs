//! Client side of the cluster's internal gRPC: a pool of channels to every
//! instance of a service, found by resolving the configured URLs' host names.
//!
//! Why not one `Channel` per URL: in Kubernetes a routing Service name
//! resolves (headless) to every pod, and HTTP/2 keeps one long-lived
//! connection, so a single channel would pin a gateway to one routing pod
//! for its lifetime. Why not tonic's `balance_channel`: tower's balancer drops
//! an endpoint for good after one failed readiness check and offers no way
//! to tell "the request never left" from "the request was sent and the
//! connection died", which decides whether a call may be retried elsewhere.
//!
//! So: one lazily connected channel per resolved address, round-robin per
//! call, re-resolved every `refresh` (new pods join, deleted ones leave),
//! and a call that could not be *sent* (connection refused, no route) is
//! tried on the next address. A call that was sent is never repeated here:
//! the caller decides (messages carry a `clientMessageId` for that).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use beseda_core::Error;
use beseda_proto::{CLUSTER_TOKEN_METADATA, ClusterToken};
use tokio::sync::RwLock;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// A channel to one instance that adds the cluster token to every call.
/// Cheap to clone; any generated client wraps it (`RoutingClient::new`).
pub type ClusterChannel = InterceptedService<Channel, ClusterToken>;

/// Timeout of establishing one connection to an instance.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What every internal client needs to know.
#[derive(Clone, Debug)]
pub struct ClusterClientConfig {
    /// The shared secret services present to each other (optional).
    pub token: Option<String>,
    /// How often host names are resolved again.
    pub refresh: Duration,
    /// Timeout of one call, connection included.
    pub request_timeout: Duration,
}

impl Default for ClusterClientConfig {
    fn default() -> Self {
        ClusterClientConfig { token: None, refresh: Duration::from_secs(10), request_timeout: Duration::from_secs(30) }
    }
}

/// A configured endpoint URL split into what resolution needs.
#[derive(Clone, Debug)]
struct Target {
    scheme: String,
    host: String,
    port: u16,
}

impl Target {
    fn parse(url: &str, what: &str) -> Result<Target, Error> {
        let invalid = |reason: &str| {
            Error::invalid(
                what,
                format!(
                    "`{url}` is not a valid gRPC endpoint ({reason}); write it as http://host:port, e.g. http://beseda-routing:9087"
                ),
            )
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| invalid("no scheme"))?;
        if scheme != "http" && scheme != "https" {
            return Err(invalid("the scheme must be http or https"));
        }
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
        let port = port.parse::<u16>().map_err(|_| invalid("the port is not a number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        Ok(Target { scheme: scheme.to_owned(), host: host.to_owned(), port })
    }

    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let mut addresses: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port)).await?.collect();
        addresses.sort();
        addresses.dedup();
        Ok(addresses)
    }
}

struct Member {
    address: SocketAddr,
    channel: ClusterChannel,
}

/// Channels to every instance of one service, one per instance, shared by
/// all the clients of that service in this process.
pub struct EndpointPool {
    service: &'static str,
    members: RwLock<Vec<Member>>,
    next: AtomicUsize,
    config: ClusterClientConfig,
    /// `config.token`, parsed once into header form.
    token: ClusterToken,
}

impl EndpointPool {
    /// Resolves `urls` now (an unresolvable name is an error at start, so a
    /// typo is caught by the operator rather than by the first client) and
    /// again every `config.refresh`.
    pub async fn start(
        service: &'static str,
        urls: &[String],
        config: ClusterClientConfig,
    ) -> Result<Arc<Self>, Error> {
        let setting = format!("cluster.{service}_endpoints");
        if urls.is_empty() {
            return Err(Error::invalid(&setting, format!("no {service} endpoint is configured")));
        }
        let targets = urls.iter().map(|url| Target::parse(url, &setting)).collect::<Result<Vec<_>, _>>()?;
        let token =
            ClusterToken::new(config.token.as_deref()).map_err(|reason| Error::invalid("cluster.token", reason))?;
        let pool = Arc::new(EndpointPool {
            service,
            members: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            config,
            token,
        });
        let resolved = pool.refresh(&targets).await;
        if resolved == 0 {
            return Err(Error::invalid(
                &setting,
                format!(
                    "none of {urls:?} resolves to an address; check the host names (DNS) and that the {service} instances exist"
                ),
            ));
        }
        let weak = Arc::downgrade(&pool);
        let refresh = pool.config.refresh;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(refresh);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.refresh(&targets).await;
            }
        });
        Ok(pool)
    }

    /// Re-resolves every target; keeps the channels of addresses that stay.
    async fn refresh(&self, targets: &[Target]) -> usize {
        let mut wanted: Vec<(SocketAddr, &Target)> = Vec::new();
        for target in targets {
            match target.resolve().await {
                Ok(addresses) => wanted.extend(addresses.into_iter().map(|address| (address, target))),
                Err(error) => {
                    tracing::warn!(service = self.service, host = %target.host, %error, "cannot resolve an endpoint")
                }
            }
        }
        if wanted.is_empty() {
            // Keep what we had: a DNS hiccup must not empty the pool.
            return self.members.read().await.len();
        }
        let mut members = self.members.write().await;
        let mut next_members = Vec::with_capacity(wanted.len());
        for (address, target) in wanted {
            if let Some(position) = members.iter().position(|member| member.address == address) {
                next_members.push(members.swap_remove(position));
                continue;
            }
            let url = format!("{}://{address}", target.scheme);
            let Ok(endpoint) = Endpoint::from_shared(url) else { continue };
            let endpoint = endpoint
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(self.config.request_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            tracing::info!(service = self.service, %address, "instance joined the pool");
            let channel = InterceptedService::new(endpoint.connect_lazy(), self.token.clone());
            next_members.push(Member { address, channel });
        }
        for gone in members.iter() {
            tracing::info!(service = self.service, address = %gone.address, "instance left the pool");
        }
        *members = next_members;
        members.len()
    }

    /// Calls `call` on one instance after another, starting at the next in
    /// round-robin order, until one takes the request. Only calls that never
    /// reached an instance are moved on; any answer (errors included) is final.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(ClusterChannel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut tried = 0;
        loop {
            // One channel cloned per attempt, not the whole pool per call.
            let picked = {
                let members = self.members.read().await;
                let count = members.len();
                members
                    .get((start + tried) % count.max(1))
                    .map(|member| (member.address, member.channel.clone(), count))
            };
            let Some((address, channel, count)) = picked else {
                return Err(Status::unavailable(format!(
                    "no {} instance is known; check cluster endpoints",
                    self.service
                )));
            };
            match call(channel).await {
                Err(status) if never_sent(&status) => {
                    tracing::debug!(service = self.service, %address, %status, "instance unreachable; trying the next");
                    metrics::counter!("beseda_cluster_failovers_total", "service" => self.service).increment(1);
                    tried += 1;
                    if tried >= count {
                        return Err(Status::unavailable(format!(
                            "no {} instance could be reached ({tried} tried; last: {}); retry shortly",
                            self.service,
                            status.message()
                        )));
                    }
                }
                Err(status) if lost_in_flight(&status) => {
                    metrics::counter!("beseda_cluster_calls_lost_total", "service" => self.service).increment(1);
                    return Err(Status::unavailable(format!(
                        "the {} instance at {address} was lost during the call ({}); it may or may not have taken effect: retry it (messages with the same clientMessageId are stored once)",
                        self.service,
                        status.message()
                    )));
                }
                answer => return answer,
            }
        }
    }

    /// The instance that owns `key` by rendezvous hashing: every caller with
    /// the same pool picks the same instance for a key, and when an instance
    /// joins or leaves only the keys it owns (or takes) move. Used where all
    /// of one tenant's streams must meet on one instance (bot processing
    /// connections, whose "one per application" rule is kept per instance).
    pub async fn channel_for_key(&self, key: &str) -> Option<ClusterChannel> {
        let members = self.members.read().await;
        members.iter().max_by_key(|member| rendezvous_weight(key, &member.address)).map(|member| member.channel.clone())
    }
}

/// A stable weight of (key, instance): FNV-1a, so that every process of the
/// cluster computes the same value (std's hasher is randomly seeded).
fn rendezvous_weight(key: &str, address: &SocketAddr) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes().chain([0]).chain(address.to_string().bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly for similar inputs; a final avalanche evens
    // out the choice between instances.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// True when the request cannot have reached the instance: the connection
/// was never established.
fn never_sent(status: &Status) -> bool {
    if status.code() != Code::Unavailable {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::HostUnreachable
            )
        {
            return true;
        }
        // tonic reports a failed connect as "tcp connect error" or a connect
        // timeout; both mean nothing was written.
        let text = error.to_string();
        if text.contains("tcp connect error") || text.contains("connect timed out") {
            return true;
        }
        source = error.source();
    }
    false
}

/// True when the connection failed after the request was sent: a status
/// made by the transport (it has an error source), not by the instance.
fn lost_in_flight(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// Server side: checks the cluster token on every internal call.
#[derive(Clone)]
pub struct TokenCheck {
    token: Option<Arc<str>>,
}

impl TokenCheck {
    pub fn new(token: Option<&str>) -> Self {
        TokenCheck { token: token.map(Arc::from) }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let Some(expected) = &self.token else { return Ok(request) };
        let presented = request.metadata().get(CLUSTER_TOKEN_METADATA).and_then(|value| value.to_str().ok());
        match presented {
            Some(presented) if subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), expected.as_bytes()).into() => {
                Ok(request)
            }
            Some(_) => Err(Status::unauthenticated(
                "the cluster token does not match; every service of one cluster needs the same cluster.token",
            )),
            None => Err(Status::unauthenticated(
                "this internal gRPC port requires the cluster token (cluster.token / BESEDA_CLUSTER_TOKEN)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_are_checked() {
        assert!(Target::parse("http://routing:9087", "x").is_ok());
        assert!(Target::parse("http://[::1]:9087", "x").is_ok());
        for bad in ["routing:9087", "ftp://routing:9087", "http://routing", "http://routing:port", "http://:9087"] {
            let error = Target::parse(bad, "cluster.routing_endpoints").unwrap_err();
            assert_eq!(error.field.as_deref(), Some("cluster.routing_endpoints"), "{bad}");
        }
    }

    #[test]
    fn keys_stick_to_one_instance_and_spread_over_all() {
        let addresses: Vec<SocketAddr> = (1..=3).map(|port| SocketAddr::from(([10, 0, 0, port as u8], 9087))).collect();
        let owner = |key: &str, members: &[SocketAddr]| {
            *members.iter().max_by_key(|address| rendezvous_weight(key, address)).unwrap()
        };
        let mut owned = std::collections::HashMap::new();
        for index in 0..3000 {
            let key = format!("application-{index}");
            *owned.entry(owner(&key, &addresses)).or_insert(0) += 1;
            // Removing an instance that does not own the key never moves it.
            let removed = addresses[index % addresses.len()];
            if removed != owner(&key, &addresses) {
                let survivors: Vec<SocketAddr> =
                    addresses.iter().copied().filter(|address| *address != removed).collect();
                assert_eq!(owner(&key, &survivors), owner(&key, &addresses), "{key}");
            }
        }
        assert_eq!(owned.len(), 3);
        for count in owned.values() {
            assert!((800..=1200).contains(count), "keys spread evenly: {owned:?}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_moves_on_and_a_refusal_does_not() {
        // Nothing listens on the first address; the second answers every call
        // with an error of its own, which must not be retried elsewhere.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let pool =
            EndpointPool::start("routing", &[format!("http://{dead}")], ClusterClientConfig::default()).await.unwrap();
        let status = pool
            .call(|channel| async move {
                let mut client = beseda_proto::v1::routing_client::RoutingClient::new(channel);
                client.get_server_info(beseda_proto::v1::Empty {}).await
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("no routing instance could be reached"), "{}", status.message());
    }
}
