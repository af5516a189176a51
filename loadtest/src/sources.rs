//! Where connections come from and go to. One source address has about
//! 28,000 ephemeral ports towards one target address; spreading sources
//! over 127.0.0.x (all of 127.0.0.0/8 is loopback on Linux) and targets
//! over a list of gateways lifts that limit. The file-descriptor limit is
//! raised to the hard limit at start.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;

/// Round-robin over (source address, target) pairs.
pub struct Endpoints {
    sources: Vec<IpAddr>,
    targets: Vec<Target>,
    next: AtomicUsize,
}

/// One gateway: its HTTP base URL, WebSocket URL and socket address.
#[derive(Clone, Debug)]
pub struct Target {
    pub base_url: String,
    pub ws_url: String,
    pub address: SocketAddr,
}

impl Target {
    /// From `http://host:port` (a path, if any, is ignored).
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let url = url.trim_end_matches('/');
        let rest =
            url.strip_prefix("http://").with_context(|| format!("target {url:?}: give an http://host:port URL"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let address = std::net::ToSocketAddrs::to_socket_addrs(authority)
            .with_context(|| format!("target {url:?} does not resolve"))?
            .next()
            .with_context(|| format!("target {url:?} has no address"))?;
        Ok(Target { base_url: format!("http://{authority}"), ws_url: format!("ws://{authority}/ws"), address })
    }
}

impl Endpoints {
    /// `source_count` addresses 127.0.0.1, 127.0.0.2, ... (only for
    /// loopback targets; other targets use the system's choice).
    pub fn new(targets: Vec<Target>, source_count: usize) -> Endpoints {
        let loopback = targets.iter().all(|target| target.address.ip().is_loopback());
        let sources = if loopback && source_count > 1 {
            (0..source_count)
                .map(|index| {
                    let index = u32::try_from(index).unwrap_or(0);
                    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + index))
                })
                .collect()
        } else {
            Vec::new()
        };
        Endpoints { sources, targets, next: AtomicUsize::new(0) }
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The next (source, target) pair.
    pub fn pick(&self) -> (Option<IpAddr>, &Target) {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        let target = &self.targets[index % self.targets.len()];
        let source =
            (!self.sources.is_empty()).then(|| self.sources[(index / self.targets.len()) % self.sources.len()]);
        (source, target)
    }
}

/// Raises the soft file-descriptor limit to the hard one; returns it.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "cannot raise the file-descriptor limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024)
        }
    }
}
