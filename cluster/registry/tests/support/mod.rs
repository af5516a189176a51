//! A registry cluster in the test process: each node serves its gRPC routes
//! on its own loopback listener, keeps its data in a temporary directory,
//! and can be stopped and restarted (or cut off, see [`partition`]).

pub mod partition;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beseda_registry::{ClusterStatus, RegistryNode, RegistryNodeConfig, UserKey};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;

/// Cluster tests run one at a time: on two cores, several clusters electing
/// leaders with 300 ms timeouts at once would disturb each other.
pub static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub const HEARTBEAT: Duration = Duration::from_millis(50);
pub const ELECTION_TIMEOUT: Duration = Duration::from_millis(300);
pub const GATEWAY_LEASE: Duration = Duration::from_secs(1);

/// Users the leader's `on_expired` reported, with the reporting node.
pub type ExpiredLog = Arc<Mutex<Vec<(u64, UserKey)>>>;

struct RunningNode {
    node: RegistryNode,
    stop_server: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

pub struct TestNode {
    pub address: SocketAddr,
    pub data_dir: PathBuf,
    running: Option<RunningNode>,
}

impl TestNode {
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn node(&self) -> &RegistryNode {
        &self.running.as_ref().expect("the node is running").node
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }
}

pub struct TestCluster {
    data: tempfile::TempDir,
    /// The initial voters, as every node's config names them.
    pub peers: BTreeMap<u64, String>,
    pub nodes: BTreeMap<u64, TestNode>,
    pub expired: ExpiredLog,
    snapshot_every_entries: u64,
    /// The relays between the nodes, when the test cuts the network.
    pub network: Option<partition::Network>,
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port")
}

impl TestCluster {
    /// Starts `voters` nodes (ids 1..=voters) that form one cluster.
    pub async fn start(voters: u64, snapshot_every_entries: u64) -> TestCluster {
        TestCluster::start_with(voters, snapshot_every_entries, false).await
    }

    /// Starts `voters` nodes that reach each other only through the relays
    /// of `network`, which can cut any of them off.
    pub async fn start_partitionable(voters: u64) -> TestCluster {
        TestCluster::start_with(voters, 5_000, true).await
    }

    async fn start_with(voters: u64, snapshot_every_entries: u64, partitionable: bool) -> TestCluster {
        let data = tempfile::tempdir().expect("temporary directory");
        let mut listeners = BTreeMap::new();
        for id in 1..=voters {
            listeners.insert(id, bind().await);
        }
        let addresses: BTreeMap<u64, SocketAddr> =
            listeners.iter().map(|(id, listener)| (*id, listener.local_addr().unwrap())).collect();
        let (network, peers) = if partitionable {
            let (network, relay_urls) = partition::Network::start(&addresses).await;
            (Some(network), relay_urls)
        } else {
            (None, addresses.iter().map(|(id, address)| (*id, format!("http://{address}"))).collect())
        };
        let mut cluster = TestCluster {
            peers,
            nodes: BTreeMap::new(),
            expired: ExpiredLog::default(),
            snapshot_every_entries,
            data,
            network,
        };
        for (id, listener) in listeners {
            cluster.launch(id, listener).await;
        }
        cluster
    }

    fn config(&self, id: u64, data_dir: PathBuf) -> RegistryNodeConfig {
        let mut config = RegistryNodeConfig::new(id, data_dir, self.peers.clone());
        config.heartbeat_interval = HEARTBEAT;
        config.election_timeout = ELECTION_TIMEOUT;
        config.gateway_lease = GATEWAY_LEASE;
        config.snapshot_every_entries = self.snapshot_every_entries;
        if self.network.is_some() {
            config.peer_source_address = Some(partition::source_address(id));
        }
        config
    }

    async fn launch(&mut self, id: u64, listener: TcpListener) {
        let address = listener.local_addr().unwrap();
        let data_dir = self.data.path().join(format!("node-{id}"));
        let expired = self.expired.clone();
        let on_expired = Arc::new(move |users: Vec<UserKey>| {
            expired.lock().unwrap().extend(users.into_iter().map(|user| (id, user)));
        });
        let node =
            RegistryNode::start(self.config(id, data_dir.clone()), on_expired).await.expect("start a registry node");
        let routes = node.routes();
        let (stop_server, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                eprintln!("registry node {id}: server failed: {error}");
            }
        });
        self.nodes.insert(id, TestNode { address, data_dir, running: Some(RunningNode { node, stop_server, server }) });
    }

    /// Starts a node that is not among the initial voters: it waits, empty,
    /// until the leader adds it.
    pub async fn start_extra_node(&mut self, id: u64) -> String {
        let listener = bind().await;
        self.launch(id, listener).await;
        self.nodes[&id].url()
    }

    /// Shuts down the node's Raft member and its gRPC server, as a crash
    /// would stop both (the data directory stays).
    pub async fn stop(&mut self, id: u64) {
        let running = self.nodes.get_mut(&id).and_then(|node| node.running.take()).expect("the node is running");
        running.node.shutdown().await.expect("shut the registry node down");
        let _ = running.stop_server.send(());
        let mut server = running.server;
        if tokio::time::timeout(Duration::from_secs(5), &mut server).await.is_err() {
            server.abort();
        }
    }

    /// Starts a stopped node again on the same address and data directory.
    pub async fn restart(&mut self, id: u64) {
        let address = self.nodes[&id].address;
        let listener = TcpListener::bind(address).await.expect("bind the node's address again");
        self.launch(id, listener).await;
    }

    pub fn running(&self) -> impl Iterator<Item = (&u64, &TestNode)> {
        self.nodes.iter().filter(|(_, node)| node.is_running())
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.values().map(TestNode::url).collect()
    }

    pub async fn status(&self, id: u64) -> ClusterStatus {
        self.nodes[&id].node().status().await
    }

    /// Waits until every running voter names the same leader, itself
    /// running and leading; returns its id.
    pub async fn wait_for_leader(&self, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let mut leaders = Vec::new();
            let mut leading = None;
            for (id, node) in self.running() {
                let status = node.node().status().await;
                if status.role == "leader" {
                    leading = Some(*id);
                }
                if status.members.iter().any(|member| member.id == *id && member.voter) {
                    leaders.push(status.leader_id);
                }
            }
            if let Some(leader) = leading
                && leaders.iter().all(|named| *named == Some(leader))
            {
                return leader;
            }
            assert!(Instant::now() < deadline, "no leader agreed on within {within:?}: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.running().map(|(id, _)| *id).collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after
/// `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn user(name: &str) -> UserKey {
    UserKey { application_id: "app".into(), user_id: name.into() }
}
