//! Generates the Rust types and tonic stubs from `strobe.proto` with `protox`, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=strobe.proto");
    let descriptors = protox::compile(["strobe.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
