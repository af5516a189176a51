//! Raft traffic between registry nodes over gRPC (`beseda.v1.RegistryRaft`).
//!
//! Each openraft message travels as serde_json inside a bytes field: the
//! types are serde already, and the proto then never changes when openraft
//! does. The sending side is openraft's [`RaftNetworkFactory`]; the receiving
//! side is [`RaftRpcService`], served by the embedding process.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use beseda_proto::ClusterToken;
use beseda_proto::v1::RegistryRaftPayload;
use beseda_proto::v1::registry_raft_client::RegistryRaftClient;
use beseda_proto::v1::registry_raft_server::RegistryRaft as RegistryRaftRpc;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, RPCTypes};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use crate::raft_types::{RegistryRaft, RegistryTypeConfig};

/// The largest gRPC message registry nodes exchange: an AppendEntries of up
/// to `max_payload_entries` batches, or one snapshot chunk, as JSON.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Opens lazy gRPC channels to the other registry nodes.
pub(crate) struct GrpcNetworkFactory {
    pub node_id: u64,
    /// Bounds establishing a connection, so that an unreachable peer costs
    /// at most this much per attempt.
    pub connect_timeout: Duration,
    /// Upper bound of any one Raft RPC (openraft passes a shorter per-call
    /// deadline, which is sent as the gRPC timeout).
    pub request_timeout: Duration,
    /// Presented to the peers (`cluster.token`).
    pub token: ClusterToken,
    /// The local address connections leave from (`None`: the OS chooses).
    pub source_address: Option<IpAddr>,
}

/// A Raft client that presents the cluster token.
pub(crate) type RaftClient = RegistryRaftClient<InterceptedService<Channel, ClusterToken>>;

impl RaftNetworkFactory<RegistryTypeConfig> for GrpcNetworkFactory {
    type Network = GrpcPeer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GrpcPeer {
        let client = Endpoint::from_shared(node.addr.clone())
            .map(|endpoint| {
                let endpoint = endpoint
                    .connect_timeout(self.connect_timeout)
                    .timeout(self.request_timeout)
                    .local_address(self.source_address);
                RegistryRaftClient::with_interceptor(endpoint.connect_lazy(), self.token.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
            })
            .map_err(|error| format!("`{}` is not a valid gRPC URL for registry node {target}: {error}", node.addr));
        GrpcPeer { node_id: self.node_id, target, target_node: node.clone(), client }
    }
}

/// The connection to one peer.
pub(crate) struct GrpcPeer {
    node_id: u64,
    target: u64,
    target_node: BasicNode,
    client: Result<RaftClient, String>,
}

/// A transport failure, as the error type openraft's network errors wrap.
#[derive(Debug)]
struct TransportError(String);

impl fmt::Display for TransportError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for TransportError {}

enum CallFailure {
    /// The peer could not be reached: openraft backs off before retrying.
    Unreachable(String),
    TimedOut,
    /// Anything else, retried at once.
    Network(String),
}

impl GrpcPeer {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        rpc: RPCTypes,
        message: &Req,
        deadline: Duration,
    ) -> Result<Resp, CallFailure> {
        let mut client = self.client.clone().map_err(CallFailure::Unreachable)?;
        let json = serde_json::to_vec(message)
            .map_err(|error| CallFailure::Network(format!("cannot encode the {rpc} request: {error}")))?;
        let mut request = Request::new(RegistryRaftPayload { json });
        request.set_timeout(deadline);
        let answered = match rpc {
            RPCTypes::AppendEntries => client.append_entries(request).await,
            RPCTypes::Vote => client.vote(request).await,
            RPCTypes::InstallSnapshot => client.install_snapshot(request).await,
        };
        let payload = answered
            .map_err(|status| match status.code() {
                Code::DeadlineExceeded | Code::Cancelled => CallFailure::TimedOut,
                Code::Unavailable => CallFailure::Unreachable(format!(
                    "registry node {} at {} is unreachable: {}",
                    self.target,
                    self.target_node.addr,
                    status.message()
                )),
                _ => CallFailure::Network(format!(
                    "{rpc} to registry node {} failed: {:?} {}",
                    self.target,
                    status.code(),
                    status.message()
                )),
            })?
            .into_inner();
        serde_json::from_slice(&payload.json).map_err(|error| {
            CallFailure::Network(format!("registry node {} answered {rpc} with invalid JSON: {error}", self.target))
        })
    }

    /// Sends `message` and turns the peer's `Result` into openraft's error.
    async fn exchange<Req, Resp, E>(
        &mut self,
        rpc: RPCTypes,
        message: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let deadline = option.hard_ttl();
        match self.call::<Req, Result<Resp, RaftError<u64, E>>>(rpc, message, deadline).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(remote)) => {
                Err(RPCError::RemoteError(RemoteError::new_with_node(self.target, self.target_node.clone(), remote)))
            }
            Err(CallFailure::Unreachable(message)) => {
                Err(RPCError::Unreachable(Unreachable::new(&TransportError(message))))
            }
            Err(CallFailure::TimedOut) => Err(RPCError::Timeout(Timeout {
                action: rpc,
                id: self.node_id,
                target: self.target,
                timeout: deadline,
            })),
            Err(CallFailure::Network(message)) => Err(RPCError::Network(NetworkError::new(&TransportError(message)))),
        }
    }
}

impl RaftNetwork<RegistryTypeConfig> for GrpcPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<RegistryTypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.exchange(RPCTypes::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<RegistryTypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        self.exchange(RPCTypes::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.exchange(RPCTypes::Vote, &rpc, &option).await
    }
}

/// Serves `beseda.v1.RegistryRaft`: hands the messages of the other nodes to
/// the local Raft member.
#[derive(Clone)]
pub(crate) struct RaftRpcService {
    pub raft: RegistryRaft,
}

fn decode<T: DeserializeOwned>(request: Request<RegistryRaftPayload>, rpc: &str) -> Result<T, Status> {
    serde_json::from_slice(&request.into_inner().json).map_err(|error| {
        Status::invalid_argument(format!("the {rpc} payload is not a valid openraft message: {error}"))
    })
}

fn encode<T: Serialize>(result: &T, rpc: &str) -> Result<Response<RegistryRaftPayload>, Status> {
    serde_json::to_vec(result)
        .map(|json| Response::new(RegistryRaftPayload { json }))
        .map_err(|error| Status::internal(format!("cannot encode the {rpc} answer: {error}")))
}

#[tonic::async_trait]
impl RegistryRaftRpc for RaftRpcService {
    async fn append_entries(
        &self,
        request: Request<RegistryRaftPayload>,
    ) -> Result<Response<RegistryRaftPayload>, Status> {
        let rpc: AppendEntriesRequest<RegistryTypeConfig> = decode(request, "AppendEntries")?;
        encode(&self.raft.append_entries(rpc).await, "AppendEntries")
    }

    async fn vote(&self, request: Request<RegistryRaftPayload>) -> Result<Response<RegistryRaftPayload>, Status> {
        let rpc: VoteRequest<u64> = decode(request, "Vote")?;
        encode(&self.raft.vote(rpc).await, "Vote")
    }

    async fn install_snapshot(
        &self,
        request: Request<RegistryRaftPayload>,
    ) -> Result<Response<RegistryRaftPayload>, Status> {
        let rpc: InstallSnapshotRequest<RegistryTypeConfig> = decode(request, "InstallSnapshot")?;
        encode(&self.raft.install_snapshot(rpc).await, "InstallSnapshot")
    }
}
