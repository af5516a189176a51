//! Compiles `beseda/v1/*.proto` with protox (pure Rust, so no `protoc` is needed
//! on the build machine), then generates prost messages, tonic services and
//! pbjson serde impls for the canonical JSON mapping.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "beseda/v1/types.proto",
        "beseda/v1/routing.proto",
        "beseda/v1/client.proto",
        "beseda/v1/bots.proto",
        "beseda/v1/registry.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("beseda_descriptor.bin");
    std::fs::write(&descriptor_path, descriptors.encode_to_vec())?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // Exact paths win over the prefix above: timestamps get our own type,
        // whose JSON ends in `Z` as proto3 requires (src/timestamp.rs).
        .extern_path(".google.protobuf.Timestamp", "crate::Timestamp")
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_fds(descriptors)?;

    pbjson_build::Builder::new().register_descriptors(&std::fs::read(&descriptor_path)?)?.build(&[".beseda"])?;
    Ok(())
}
