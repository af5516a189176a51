//! Network partitions between registry nodes in one test process.
//!
//! Every node is known to the others (its address in the Raft membership)
//! by a TCP relay in front of its real listener, and its own Raft
//! connections leave from a loopback address of its own (127.0.0.10 + id),
//! so the relay can tell who is calling. Isolating a node closes every
//! relayed connection from or to it and refuses new ones, as a cut cable
//! would; the test itself still reaches each node directly at its real
//! address, as a client on that side of the cut.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const FIRST_SOURCE_OCTET: u8 = 10;

/// The loopback address node `id`'s outgoing Raft connections leave from.
pub fn source_address(id: u64) -> IpAddr {
    let octet = u8::try_from(id).ok().and_then(|id| id.checked_add(FIRST_SOURCE_OCTET)).expect("a small node id");
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet))
}

/// The node a connection came from, if it came from a node at all.
fn node_of(peer: SocketAddr) -> Option<u64> {
    match peer.ip() {
        IpAddr::V4(ip) if ip.octets()[..3] == [127, 0, 0] && ip.octets()[3] > FIRST_SOURCE_OCTET => {
            Some(u64::from(ip.octets()[3] - FIRST_SOURCE_OCTET))
        }
        _ => None,
    }
}

pub struct Network {
    isolated: watch::Sender<BTreeSet<u64>>,
    relays: Vec<JoinHandle<()>>,
}

impl Network {
    /// Starts one relay per node: `targets` maps a node id to its real
    /// listening address. Returns the network and the URL each node is to
    /// be known by.
    pub async fn start(targets: &BTreeMap<u64, SocketAddr>) -> (Network, BTreeMap<u64, String>) {
        let (isolated, _) = watch::channel(BTreeSet::new());
        let mut relays = Vec::new();
        let mut urls = BTreeMap::new();
        for (&id, &target) in targets {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a relay port");
            urls.insert(id, format!("http://{}", listener.local_addr().unwrap()));
            relays.push(tokio::spawn(relay(listener, id, target, isolated.subscribe())));
        }
        (Network { isolated, relays }, urls)
    }

    /// Cuts `id` off from every other node.
    pub fn isolate(&self, id: u64) {
        self.isolated.send_modify(|isolated| {
            isolated.insert(id);
        });
    }

    /// Joins every node again.
    pub fn heal(&self) {
        self.isolated.send_modify(BTreeSet::clear);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for relay in &self.relays {
            relay.abort();
        }
    }
}

async fn relay(listener: TcpListener, target_id: u64, target: SocketAddr, isolated: watch::Receiver<BTreeSet<u64>>) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((mut inbound, peer)) = listener.accept().await {
        let source = node_of(peer);
        let cut = move |isolated: &BTreeSet<u64>| {
            isolated.contains(&target_id) || source.is_some_and(|source| isolated.contains(&source))
        };
        if cut(&isolated.borrow()) {
            continue; // dropping `inbound` closes it: the caller sees the connection fail
        }
        let mut isolated = isolated.clone();
        connections.spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else { return };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = isolated.wait_for(|isolated| cut(isolated)) => {}
            }
        });
        while connections.try_join_next().is_some() {}
    }
}
