//! Generates the prost messages and tonic services from `proto/`.
//!
//! protoc comes from `protoc-bin-vendored`, so a fresh machine builds with no system
//! package; a `PROTOC` in the environment still wins, as prost-build documents.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    // The gateway's zero-copy views: text fields as slices of the request buffer.
    config.bytes([".edgewise.v1.internal"]);
    tonic_prost_build::configure()
        .codec_path("crate::codec::CompactCodec")
        .file_descriptor_set_path(
            std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("edgewise_descriptor.bin"),
        )
        .compile_with_config(
            config,
            &[
                "proto/edgewise/v1/fleet.proto",
                "proto/edgewise/agent/v1/router.proto",
                "proto/edgewise/v1/internal/telemetry_view.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
