//! Generates the tonic clients and servers for every `.proto` under `proto/switchboard/`
//! and writes one descriptor set (with source info, so reflection shows the comments).

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.as_path();
    let mut protos = Vec::new();
    collect_protos(&root.join("switchboard"), &mut protos)?;
    protos.sort();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("switchboard_descriptor.bin"))
        // RPCs a later milestone implements answer UNIMPLEMENTED instead of failing to build.
        .generate_default_stubs(true)
        // Clients are built from a `Channel`; the generated `connect` constructor would clash
        // with the `PresenceService.Connect` RPC.
        .build_transport(false)
        // 512-byte initial codec buffers instead of 8 KiB (two per stream): a presence replica
        // holding 50,000 Connect streams stays near 0.5 GiB instead of over 1 GiB.
        .codec_path("crate::codec::CompactCodec")
        .compile_protos(&protos, &[root.to_path_buf()])?;
    println!(
        "cargo:rerun-if-changed={}",
        root.join("switchboard").display()
    );
    Ok(())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            println!("cargo:rerun-if-changed={}", path.display());
            out.push(path);
        }
    }
    Ok(())
}
