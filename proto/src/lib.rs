//! Generated protobuf types for Beseda's public API, client protocol and
//! internal gRPC services. Everything on the wire is defined in `beseda/v1/`;
//! conversions to domain types live in the services, never here.

/// `beseda.v1`: messages, the `Routing` service and canonical JSON (serde).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/beseda.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/beseda.v1.serde.rs"));
}

mod timestamp;

/// Every `google.protobuf.Timestamp` field of the generated types is this
/// type (see `build.rs`): the same binary encoding, canonical JSON text.
pub use timestamp::Timestamp;

/// The encoded `FileDescriptorSet` of every Beseda proto, used to publish the
/// OpenAPI document's schemas from the same source as the code.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/beseda_descriptor.bin"));

/// The client protocol versions this build speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
pub const MAX_PROTOCOL_VERSION: u32 = 1;

/// The gRPC metadata key carrying the cluster's shared secret on every
/// internal call between Beseda processes (`cluster.token`).
pub const CLUSTER_TOKEN_METADATA: &str = "x-beseda-cluster-token";

/// The largest message on internal gRPC, both ways: a page of 250 messages,
/// each with its 100 KB of data and 4,000 characters, fits several times
/// over (tonic's own default, 4 MB, would not hold one such page).
pub const INTERNAL_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Adds the cluster token, when one is configured, to every outgoing call
/// of a client built `with_interceptor`.
#[derive(Clone, Debug, Default)]
pub struct ClusterToken(Option<tonic::metadata::AsciiMetadataValue>);

impl ClusterToken {
    /// A token that is not valid in an HTTP header cannot be sent; it is
    /// refused here rather than silently dropped.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token {
            None => Ok(ClusterToken(None)),
            Some(token) => token
                .parse()
                .map(|value| ClusterToken(Some(value)))
                .map_err(|_| "the cluster token must be printable ASCII (it travels in a gRPC header)".to_owned()),
        }
    }
}

impl tonic::service::Interceptor for ClusterToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert(CLUSTER_TOKEN_METADATA, token.clone());
        }
        Ok(request)
    }
}
