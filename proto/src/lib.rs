//! Generated protobuf types for Beseda's public API, client protocol and
//! internal gRPC services. Everything on the wire is defined in `beseda/v1/`;
//! conversions to domain types live in the services, never here.

/// `beseda.v1`: messages, the `Routing` service and canonical JSON (serde).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/beseda.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/beseda.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of every Beseda proto, used to publish the
/// OpenAPI document's schemas from the same source as the code.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/beseda_descriptor.bin"));

/// The client protocol versions this build speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
pub const MAX_PROTOCOL_VERSION: u32 = 1;
