//! Host tools the VM runner needs, installed on first use: a fresh CI machine has none of
//! them, and nothing left on a machine by hand survives to the next one.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

use super::cmd::{output_of, run_quiet};
use crate::packages::{self, on_path};

/// (program looked for, Debian package that provides it).
/// NB: `lz4`/`zstd` only speed boots up (decompressed kernel); without them the bzImage boots.
const HOST_TOOLS: &[packages::Tool] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("lz4", "lz4"),
    ("zstd", "zstd"),
];

/// The busybox binary put into the guest: it must be static, so not whatever `busybox` is
/// first on PATH.
pub const BUSYBOX: &str = "/bin/busybox";

pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

pub fn ensure_host_tools() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = HOST_TOOLS
        .iter()
        .filter(|(program, _)| !on_path(program) || (*program == "busybox" && !is_static_busybox()))
        .map(|&(_, package)| package)
        .collect();
    missing.dedup();
    packages::install("vm", &missing)
}

/// busybox-static is the package that ships a static `/bin/busybox`; the dynamic `busybox`
/// package would install one that cannot run in an initramfs without libc.
fn is_static_busybox() -> bool {
    Path::new(BUSYBOX).is_file()
        && output_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", "busybox-static"]))
            .is_ok_and(|s| s.contains("install ok installed"))
}

pub fn ensure_musl_target() -> anyhow::Result<()> {
    let installed = output_of(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("listing installed rustup targets")?;
    if installed.lines().any(|t| t.trim() == MUSL_TARGET) {
        return Ok(());
    }
    eprintln!("vm: rustup target add {MUSL_TARGET}");
    run_quiet(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
        .with_context(|| format!("adding the {MUSL_TARGET} target"))
}
