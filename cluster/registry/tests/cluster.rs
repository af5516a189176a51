//! The cluster registry over real loopback gRPC: registry nodes and
//! gateway clients in this process, data in temporary directories.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use beseda_proto::v1 as wire;
use beseda_proto::v1::registry_api_client::RegistryApiClient;
use beseda_proto::v1::registry_raft_client::RegistryRaftClient;
use beseda_registry::{
    ClientConfig, LEADER_ADDRESS_METADATA, LEADER_ID_METADATA, PresenceChange, RaftRegistryClient, Registry, admin,
};
use support::{ONE_CLUSTER_AT_A_TIME, TestCluster, eventually, user};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::Code;

const LEADER_WAIT: Duration = Duration::from_secs(10);
const CATCH_UP: Duration = Duration::from_secs(15);

/// Every test finishes (or fails) within this bound.
async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(120), test).await.expect("the test finished within its bound");
}

fn client(cluster: &TestCluster, gateway: &str) -> Arc<RaftRegistryClient> {
    RaftRegistryClient::start(cluster.urls(), gateway.into(), ClientConfig::default()).expect("start a registry client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_storm_lands_in_few_raft_entries_with_the_right_presence() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    bounded(async {
        let cluster = TestCluster::start(3, 5_000).await;
        let leader = cluster.wait_for_leader(LEADER_WAIT).await;
        let status = cluster.status(leader).await;
        assert_eq!(status.members.iter().filter(|member| member.voter).count(), 3);
        assert_eq!(status.leader_address.as_deref(), Some(cluster.nodes[&leader].url().as_str()));

        let gateway_a = client(&cluster, "gateway-a");
        assert_eq!(gateway_a.kind(), "raft");
        // The first write also registers the gateway's session.
        assert_eq!(gateway_a.connected(&user("warm-up"), "gateway-a").await.unwrap(), PresenceChange::CameOnline);
        let before = cluster.status(leader).await.last_log_index.unwrap();

        let mut storm = JoinSet::new();
        for connection in 0..1_000 {
            let gateway_a = gateway_a.clone();
            storm.spawn(async move {
                let user = user(&format!("user-{}", connection % 500));
                let change = gateway_a.connected(&user, "gateway-a").await.expect("connection recorded");
                (user.user_id, change)
            });
        }
        let mut came_online: HashMap<String, usize> = HashMap::new();
        let mut unchanged = 0;
        while let Some(joined) = storm.join_next().await {
            match joined.unwrap() {
                (user_id, PresenceChange::CameOnline) => *came_online.entry(user_id).or_default() += 1,
                (_, PresenceChange::Unchanged) => unchanged += 1,
                (user_id, PresenceChange::WentOffline) => panic!("{user_id} went offline on a connection"),
            }
        }
        assert_eq!(came_online.len(), 500, "every user came online");
        assert!(came_online.values().all(|times| *times == 1), "each user came online exactly once");
        assert_eq!(unchanged, 500);

        let entries = cluster.status(leader).await.last_log_index.unwrap() - before;
        eprintln!("1,000 concurrent connections were written in {entries} Raft entries");
        assert!(entries < 50, "1,000 connections took {entries} Raft entries");

        assert!(gateway_a.is_online(&user("user-7")).await.unwrap());
        assert_eq!(gateway_a.connection_count().await.unwrap(), 1_001);
        let gateway_b = client(&cluster, "gateway-b");
        assert_eq!(gateway_b.connected(&user("user-7"), "gateway-b").await.unwrap(), PresenceChange::Unchanged);
        assert_eq!(gateway_b.nodes_of(&user("user-7")).await.unwrap(), vec!["gateway-a", "gateway-b"]);
        assert_eq!(gateway_a.disconnected(&user("user-7"), "gateway-a").await.unwrap(), PresenceChange::Unchanged);
        assert_eq!(gateway_a.disconnected(&user("user-7"), "gateway-a").await.unwrap(), PresenceChange::Unchanged);
        assert_eq!(gateway_b.disconnected(&user("user-7"), "gateway-b").await.unwrap(), PresenceChange::WentOffline);
        assert!(!gateway_b.is_online(&user("user-7")).await.unwrap());
        // A disconnect without a connection changes nothing.
        assert_eq!(gateway_b.disconnected(&user("user-7"), "gateway-b").await.unwrap(), PresenceChange::Unchanged);
        assert!(gateway_a.connected(&user("x"), "someone-else").await.is_err(), "a client writes for its own gateway");

        // Every replica applied the same state.
        eventually(CATCH_UP, "all replicas hold 999 connections", || async {
            let mut all = true;
            for id in cluster.nodes.keys() {
                all &= cluster.status(*id).await.connection_count == 999;
            }
            all
        })
        .await;
        drop((gateway_a, gateway_b));
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_of_answers_many_users_in_one_read_like_is_online_does_one_by_one() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    bounded(async {
        let cluster = TestCluster::start(3, 5_000).await;
        let leader = cluster.wait_for_leader(LEADER_WAIT).await;
        let gateway_a = client(&cluster, "gateway-a");
        let gateway_b = client(&cluster, "gateway-b");
        gateway_a.connected(&user("alice"), "gateway-a").await.unwrap();
        gateway_b.connected(&user("bob"), "gateway-b").await.unwrap();
        gateway_a.connected(&user("carol"), "gateway-a").await.unwrap();
        gateway_a.disconnected(&user("carol"), "gateway-a").await.unwrap();
        // As many users as one presence watch may name, in any order, with
        // repeats and users never seen.
        let mut users: Vec<_> = (0..996).map(|index| user(&format!("nobody-{index}"))).collect();
        users.extend(["bob", "carol", "alice", "bob"].map(user));
        users.rotate_right(500);

        let together = gateway_a.online_of(&users).await.unwrap();
        let mut one_by_one = Vec::new();
        for user in &users {
            one_by_one.push(gateway_b.is_online(user).await.unwrap());
        }
        assert_eq!(together, one_by_one);
        assert_eq!(together.iter().filter(|online| **online).count(), 3, "alice and bob (twice)");
        assert_eq!(gateway_a.online_of(&[]).await.unwrap(), Vec::<bool>::new());

        // Over the wire: one query, one answer per user in order.
        let mut api = RegistryApiClient::connect(cluster.nodes[&leader].url()).await.unwrap();
        let query = wire::RegistryQueryRequest {
            query: Some(wire::registry_query_request::Query::OnlineOf(wire::RegistryUserKeyList {
                users: ["alice", "carol", "bob"]
                    .map(|name| wire::RegistryUserKey { application_id: "app".into(), user_id: name.into() })
                    .to_vec(),
            })),
        };
        let answer = api.query(query).await.unwrap().into_inner();
        assert!(answer.read_index > 0);
        assert_eq!(
            answer.answer,
            Some(wire::registry_query_response::Answer::OnlineOf(wire::RegistryOnlineList {
                online: vec![true, false, true]
            }))
        );
        drop((gateway_a, gateway_b));
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_keeps_working_when_the_leader_dies() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    bounded(async {
        let mut cluster = TestCluster::start(3, 5_000).await;
        let old_leader = cluster.wait_for_leader(LEADER_WAIT).await;
        let gateway = client(&cluster, "gateway-a");
        assert_eq!(gateway.connected(&user("alice"), "gateway-a").await.unwrap(), PresenceChange::CameOnline);

        let killed_at = Instant::now();
        cluster.stop(old_leader).await;
        let change = gateway.connected(&user("bob"), "gateway-a").await.expect("a write after the failover");
        let gap = killed_at.elapsed();
        eprintln!("leader failover: the first write succeeded {gap:?} after the leader was killed");
        assert_eq!(change, PresenceChange::CameOnline);

        let new_leader = cluster.wait_for_leader(LEADER_WAIT).await;
        assert_ne!(new_leader, old_leader);
        assert!(gateway.is_online(&user("alice")).await.unwrap(), "presence survived the failover");
        assert_eq!(gateway.connection_count().await.unwrap(), 2);

        // The old leader comes back as a follower and catches up.
        cluster.restart(old_leader).await;
        eventually(CATCH_UP, "the old leader follows and holds both connections", || async {
            let status = cluster.status(old_leader).await;
            status.role == "follower" && status.connection_count == 2
        })
        .await;
        drop(gateway);
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_restarts_from_its_data_dir_and_catches_up() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    bounded(async {
        // Snapshots every 10 entries, so the restart loads a snapshot and
        // replays the log after it.
        let mut cluster = TestCluster::start(3, 10).await;
        let leader = cluster.wait_for_leader(LEADER_WAIT).await;
        let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
        let gateway = client(&cluster, "gateway-a");
        for index in 0..15 {
            gateway.connected(&user(&format!("early-{index}")), "gateway-a").await.unwrap();
        }
        eventually(CATCH_UP, "the follower applied the early connections", || async {
            cluster.status(follower).await.connection_count == 15
        })
        .await;
        let applied_before_stop = cluster.status(follower).await.applied_index;
        cluster.stop(follower).await;

        for index in 0..20 {
            gateway.connected(&user(&format!("late-{index}")), "gateway-a").await.unwrap();
        }
        let data_dir = cluster.nodes[&follower].data_dir.clone();
        assert!(data_dir.join("raft.db").exists());
        assert!(data_dir.join("snapshots").join("current.json").exists(), "the follower wrote a snapshot");

        cluster.restart(follower).await;
        let recovered = cluster.status(follower).await;
        assert!(
            recovered.applied_index >= applied_before_stop,
            "recovered from disk at {:?}, had applied {:?}",
            recovered.applied_index,
            applied_before_stop
        );
        assert!(recovered.connection_count >= 15, "the restarted node recovered its state from disk");
        eventually(CATCH_UP, "the restarted follower caught up", || async {
            let leader_status = cluster.status(leader).await;
            let status = cluster.status(follower).await;
            status.connection_count == 35 && status.applied_index >= leader_status.commit_index
        })
        .await;
        drop(gateway);
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_heartbeats_stop_is_expired() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    bounded(async {
        let cluster = TestCluster::start(3, 5_000).await;
        let leader = cluster.wait_for_leader(LEADER_WAIT).await;
        let short_lease = ClientConfig {
            heartbeat_interval: Duration::from_millis(300),
            lease: Duration::from_secs(1),
            ..ClientConfig::default()
        };
        let doomed = RaftRegistryClient::start(cluster.urls(), "gateway-doomed".into(), short_lease).unwrap();
        let survivor = client(&cluster, "gateway-survivor");
        doomed.connected(&user("alice"), "gateway-doomed").await.unwrap();
        doomed.connected(&user("carol"), "gateway-doomed").await.unwrap();
        survivor.connected(&user("carol"), "gateway-survivor").await.unwrap();
        // Heartbeats keep the lease alive well past one lease.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(survivor.is_online(&user("alice")).await.unwrap(), "a heartbeating gateway is kept");
        assert!(cluster.expired.lock().unwrap().is_empty());

        drop(doomed);
        eventually(Duration::from_secs(10), "on_expired hears that alice went offline", || async {
            cluster.expired.lock().unwrap().iter().any(|(_, user)| user.user_id == "alice")
        })
        .await;
        let expired = cluster.expired.lock().unwrap().clone();
        assert!(expired.iter().all(|(reporter, _)| *reporter == leader), "only the leader reports: {expired:?}");
        assert!(!expired.iter().any(|(_, user)| user.user_id == "carol"), "carol is still on the survivor");
        assert!(!survivor.is_online(&user("alice")).await.unwrap());
        assert_eq!(survivor.nodes_of(&user("carol")).await.unwrap(), vec!["gateway-survivor"]);
        let gateways: Vec<String> =
            cluster.status(leader).await.gateways.into_iter().map(|lease| lease.gateway).collect();
        assert_eq!(gateways, vec!["gateway-survivor"]);
        drop(survivor);
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_the_registry_forgot_resyncs_its_connections() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    bounded(async {
        let cluster = TestCluster::start(3, 5_000).await;
        cluster.wait_for_leader(LEADER_WAIT).await;
        let forgotten = client(&cluster, "gateway-a");
        let mut resync_changes = forgotten.resync_changes();
        let operator = client(&cluster, "gateway-b");
        forgotten.connected(&user("alice"), "gateway-a").await.unwrap();
        forgotten.connected(&user("alice"), "gateway-a").await.unwrap();
        forgotten.connected(&user("bob"), "gateway-a").await.unwrap();

        // Another party purges gateway-a while it keeps running.
        operator.node_stopping("gateway-a").await.unwrap();
        assert!(!operator.is_online(&user("alice")).await.unwrap());
        assert_eq!(operator.connection_count().await.unwrap(), 0);
        let expired: Vec<String> =
            cluster.expired.lock().unwrap().iter().map(|(_, user)| user.user_id.clone()).collect();
        assert_eq!(expired, vec!["alice", "bob"], "the deregistration announced who went offline");

        // gateway-a's next write is refused as unknown; it resyncs, then
        // the write lands.
        assert_eq!(forgotten.connected(&user("dave"), "gateway-a").await.unwrap(), PresenceChange::CameOnline);
        assert!(operator.is_online(&user("alice")).await.unwrap());
        assert_eq!(operator.connection_count().await.unwrap(), 4);
        let restored = tokio::time::timeout(Duration::from_secs(5), resync_changes.recv()).await.unwrap().unwrap();
        assert_eq!(
            restored,
            vec![(user("alice"), PresenceChange::CameOnline), (user("bob"), PresenceChange::CameOnline)]
        );

        // Its own graceful stop deregisters it for good.
        forgotten.node_stopping("gateway-a").await.unwrap();
        assert_eq!(operator.connection_count().await.unwrap(), 0);
        assert_eq!(forgotten.disconnected(&user("dave"), "gateway-a").await.unwrap(), PresenceChange::Unchanged);
        assert!(forgotten.connected(&user("erin"), "gateway-a").await.is_err(), "a stopping gateway takes no one in");
        drop((forgotten, operator));
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_catches_up_from_a_snapshot_and_the_cluster_grows_to_five_voters() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    bounded(async {
        let mut cluster = TestCluster::start(3, 20).await;
        let leader = cluster.wait_for_leader(LEADER_WAIT).await;
        let gateway = client(&cluster, "gateway-a");
        for index in 0..60 {
            gateway.connected(&user(&format!("user-{index}")), "gateway-a").await.unwrap();
        }
        eventually(CATCH_UP, "the leader built a snapshot and purged the log behind it", || async {
            let status = cluster.status(leader).await;
            status.snapshot_index.is_some() && status.purged_index.is_some()
        })
        .await;

        let learner_url = cluster.start_extra_node(4).await;
        let waiting = cluster.status(4).await;
        assert_eq!(waiting.applied_index, None, "a node outside the initial voters starts empty");
        // Asked through any node: a follower's refusal points to the leader.
        let entry_point = cluster.nodes[&(leader % 3 + 1)].url();
        let grown = admin::add_learner(&entry_point, None, 4, &learner_url).await.expect("add learner 4");
        assert!(grown.members.iter().any(|member| member.id == 4 && !member.voter), "{grown:?}");
        eventually(CATCH_UP, "learner 4 caught up from the snapshot", || async {
            let status = cluster.status(4).await;
            status.role == "learner" && status.connection_count == 60 && status.snapshot_index.is_some()
        })
        .await;

        let fifth_url = cluster.start_extra_node(5).await;
        admin::add_learner(&entry_point, None, 5, &fifth_url).await.expect("add learner 5");
        let changed = admin::change_membership(&entry_point, None, vec![1, 2, 3, 4, 5])
            .await
            .unwrap_or_else(|error| panic!("change membership: {error:#}"));
        assert_eq!(changed.members.iter().filter(|member| member.voter).count(), 5, "{changed:?}");
        assert!(!changed.joint_consensus);

        let leader = cluster.wait_for_leader(LEADER_WAIT).await;
        assert_eq!(gateway.connected(&user("after-growth"), "gateway-a").await.unwrap(), PresenceChange::CameOnline);
        eventually(CATCH_UP, "all five voters hold 61 connections", || async {
            let mut all = true;
            for id in 1..=5 {
                let status = cluster.status(id).await;
                all &= status.connection_count == 61 && (status.role == "leader" || status.role == "follower");
            }
            all
        })
        .await;
        let status = admin::status(&cluster.nodes[&4].url(), None).await.unwrap();
        assert_eq!(status.node_id, leader);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["role"], "leader");
        assert_eq!(json["members"].as_array().unwrap().len(), 5);
        drop(gateway);
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_reads_and_writes_with_a_leader_hint() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    bounded(async {
        let cluster = TestCluster::start(3, 5_000).await;
        let leader = cluster.wait_for_leader(LEADER_WAIT).await;
        let leader_url = cluster.nodes[&leader].url();
        let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
        let follower_url = cluster.nodes[&follower].url();
        let mut follower_api = RegistryApiClient::connect(follower_url.clone()).await.unwrap();

        let query = wire::RegistryQueryRequest {
            query: Some(wire::registry_query_request::Query::IsOnline(wire::RegistryUserKey {
                application_id: "app".into(),
                user_id: "alice".into(),
            })),
        };
        let refused = follower_api.query(query.clone()).await.expect_err("a follower never answers a read");
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert_eq!(refused.metadata().get(LEADER_ADDRESS_METADATA).unwrap().to_str().unwrap(), leader_url);
        assert_eq!(refused.metadata().get(LEADER_ID_METADATA).unwrap().to_str().unwrap(), leader.to_string());

        let deregister = wire::RegistryApplyRequest {
            command: Some(wire::registry_apply_request::Command::Deregister(wire::RegistryDeregister {
                gateway: "gateway-a".into(),
            })),
        };
        let refused = follower_api.apply(deregister).await.expect_err("a follower never applies");
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert_eq!(refused.metadata().get(LEADER_ADDRESS_METADATA).unwrap().to_str().unwrap(), leader_url);

        let own = follower_api.status(wire::RegistryStatusRequest {}).await.unwrap().into_inner();
        assert_eq!((own.role.as_str(), own.leader_id), ("follower", Some(leader)));
        assert_eq!(admin::status(&follower_url, None).await.unwrap().node_id, leader, "status is routed to the leader");

        // Requests that do not decode are refused, not panicked on.
        let empty = follower_api.apply(wire::RegistryApplyRequest { command: None }).await.unwrap_err();
        assert_eq!(empty.code(), Code::InvalidArgument);
        let mut follower_raft = RegistryRaftClient::connect(follower_url.clone()).await.unwrap();
        let garbage =
            follower_raft.append_entries(wire::RegistryRaftPayload { json: b"{not json".to_vec() }).await.unwrap_err();
        assert_eq!(garbage.code(), Code::InvalidArgument);
        assert!(garbage.message().contains("AppendEntries"), "{}", garbage.message());

        // A client that knows only the follower finds the leader.
        let gateway =
            RaftRegistryClient::start(vec![follower_url], "gateway-a".into(), ClientConfig::default()).unwrap();
        assert_eq!(gateway.connected(&user("alice"), "gateway-a").await.unwrap(), PresenceChange::CameOnline);
        assert!(gateway.is_online(&user("alice")).await.unwrap());
        drop(gateway);
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lowest_peer_founds_the_cluster() {
    // A voter added later (scaling 3 to 5, with every pod given the new peer
    // list) starts with an empty log; it must wait to be added rather than
    // found a cluster of its own with itself among the voters.
    bounded(async {
        let directory = tempfile::tempdir().unwrap();
        let unreachable = |port: u16| format!("http://127.0.0.1:{port}");
        let peers: std::collections::BTreeMap<u64, String> =
            (1..=5).map(|id| (id, unreachable(1 + id as u16))).collect();
        let mut config = beseda_registry::RegistryNodeConfig::new(4, directory.path(), peers);
        config.heartbeat_interval = Duration::from_millis(50);
        config.election_timeout = Duration::from_millis(200);
        let latecomer = beseda_registry::RegistryNode::start(config, Arc::new(|_| {})).await.unwrap();
        // Several election timeouts pass: an initialized node would have become a candidate.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!latecomer.raft().is_initialized().await.unwrap(), "a latecomer must not initialize a cluster");
        let status = latecomer.status().await;
        assert_eq!(status.term, 0, "no election was held: {status:?}");
        assert!(status.members.is_empty(), "no membership of its own: {status:?}");
        latecomer.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_neither_answers_nor_commits_and_the_majority_goes_on() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    bounded(async {
        let cluster = TestCluster::start_partitionable(3).await;
        let network = cluster.network.as_ref().expect("relays between the nodes");
        let old_leader = cluster.wait_for_leader(LEADER_WAIT).await;
        let old_term = cluster.status(old_leader).await.term;
        // A gateway on the majority's side of the cut: it knows the nodes by
        // their relays, as they know each other.
        let gateway = RaftRegistryClient::start(
            cluster.peers.values().cloned().collect(),
            "gateway-a".into(),
            ClientConfig::default(),
        )
        .unwrap();
        assert_eq!(gateway.connected(&user("alice"), "gateway-a").await.unwrap(), PresenceChange::CameOnline);

        let cut_at = Instant::now();
        network.isolate(old_leader);
        let majority: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != old_leader).collect();
        let deadline = Instant::now() + LEADER_WAIT;
        let new_leader = loop {
            if let Some(leader) = agreed_leader_after(&cluster, &majority, old_term).await {
                break leader;
            }
            assert!(Instant::now() < deadline, "the majority elected no leader within {LEADER_WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!("partition: the majority elected node {new_leader} {:?} after the cut", cut_at.elapsed());

        let change = gateway.connected(&user("bob"), "gateway-a").await.expect("the majority takes writes");
        assert_eq!(change, PresenceChange::CameOnline);
        eprintln!("partition: the first write after the cut succeeded {:?} after it", cut_at.elapsed());

        // A client on the old leader's side: the old leader still believes it
        // leads (nobody told it otherwise), but a linearizable read needs a
        // quorum to confirm that, so it answers nothing rather than the
        // stale "bob is offline".
        let cut_off = cluster.nodes[&old_leader].node().raft().metrics().borrow().clone();
        eprintln!(
            "partition: the cut-off leader still says {:?}, quorum last acknowledged {:?} ms ago",
            cut_off.state, cut_off.millis_since_quorum_ack
        );
        // What `beseda_raft_leader_quorum_ack_age_seconds` shows operators:
        // no majority has answered it since the cut, which is older than
        // the election the majority had to wait for.
        if cut_off.state == openraft::ServerState::Leader {
            let age = Duration::from_millis(cut_off.millis_since_quorum_ack.expect("a leader tracks its quorum"));
            assert!(age >= support::ELECTION_TIMEOUT, "quorum acknowledged {age:?} ago");
        }
        let old_leader_url = cluster.nodes[&old_leader].url();
        let mut minority = RegistryApiClient::connect(old_leader_url).await.unwrap();
        let is_bob_online = wire::RegistryQueryRequest {
            query: Some(wire::registry_query_request::Query::IsOnline(wire::RegistryUserKey {
                application_id: "app".into(),
                user_id: "bob".into(),
            })),
        };
        let refused = tokio::time::timeout(Duration::from_secs(10), minority.query(is_bob_online))
            .await
            .expect("the cut-off leader answers within 10 s")
            .expect_err("a cut-off leader never answers a read");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("quorum"), "{}", refused.message());

        // A write to the cut-off leader is never acknowledged, and never
        // takes effect: once the cut heals, the new leader's log replaces it.
        let carol = wire::RegistryApplyRequest {
            command: Some(wire::registry_apply_request::Command::Batch(wire::RegistryBatch {
                gateway: "gateway-z".into(),
                session: 1,
                sequence: 1,
                lease_ms: 60_000,
                deltas: vec![wire::RegistryDelta {
                    user: Some(wire::RegistryUserKey { application_id: "app".into(), user_id: "carol".into() }),
                    kind: wire::RegistryDeltaKind::Connected as i32,
                }],
            })),
        };
        let write = tokio::spawn(async move { minority.apply(carol).await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!write.is_finished(), "a cut-off leader answered a write it cannot commit: {:?}", write.await);

        network.heal();
        let healed_at = Instant::now();
        eventually(CATCH_UP, "the old leader follows the new one and holds alice and bob", || async {
            let status = cluster.status(old_leader).await;
            status.role == "follower" && status.leader_id == Some(new_leader) && status.connection_count == 2
        })
        .await;
        eprintln!("partition: the old leader followed {:?} after the cut healed", healed_at.elapsed());
        let refused = tokio::time::timeout(Duration::from_secs(10), write)
            .await
            .expect("the pending write is answered once the old leader steps down")
            .unwrap()
            .expect_err("the write of a deposed leader is refused");
        assert_eq!(refused.code(), Code::FailedPrecondition, "told to go to the new leader: {refused:?}");
        assert!(gateway.is_online(&user("bob")).await.unwrap());
        assert!(!gateway.is_online(&user("carol")).await.unwrap(), "the unacknowledged write took effect");
        assert_eq!(gateway.connection_count().await.unwrap(), 2);
        drop(gateway);
        cluster.shutdown().await;
    })
    .await;
}

/// The leader every node of `nodes` names, if one of them leads in a term
/// after `term`.
async fn agreed_leader_after(cluster: &TestCluster, nodes: &[u64], term: u64) -> Option<u64> {
    let mut statuses = Vec::new();
    for id in nodes {
        statuses.push(cluster.status(*id).await);
    }
    let leader = statuses.iter().find(|status| status.role == "leader" && status.term > term)?.node_id;
    statuses.iter().all(|status| status.leader_id == Some(leader)).then_some(leader)
}
