//! Generates the Rust types and tonic stubs from `strobe.proto` with `protox`, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=strobe.proto");
    let descriptors = protox::compile(["strobe.proto"], ["."])?;
    // Histogram bytes stay slices of the received buffer: checked and merged without a copy.
    tonic_prost_build::configure()
        .bytes(".strobe.v1.Histogram.hdr_v2")
        // Prost's codec, but a snapshot is decoded into a vector of series sized up front (`src/codec.rs`).
        .codec_path("crate::codec::StrobeCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
