//! Builds the kernel program from `reuseport-ebpf` and puts it in `OUT_DIR`, where
//! `kernel::PROGRAM` embeds it. No prebuilt object is ever committed.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("reuseport-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {root:?}"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "reuseport-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF program (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}
