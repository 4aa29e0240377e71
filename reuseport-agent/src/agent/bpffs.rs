//! Making sure the pin directory is on a BPF filesystem.

use std::{fs, path::Path};

use anyhow::{Context as _, bail};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// Creates `dir` and makes sure it lives on bpffs, mounting bpffs at `/sys/fs/bpf` (or at
/// `dir` itself if that is not below `/sys/fs/bpf`) when nothing is mounted yet.
pub fn ensure(dir: &Path) -> anyhow::Result<()> {
    let bpf_root = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpf_root) && !is_bpffs(bpf_root) && bpf_root.is_dir() {
        mount_bpffs(bpf_root)?;
    }
    fs::create_dir_all(dir)
        .with_context(|| format!("creating the bpffs directory {}", dir.display()))?;
    if !is_bpffs(dir) {
        mount_bpffs(dir)?;
    }
    if !is_bpffs(dir) {
        bail!(
            "{} is not on a BPF filesystem and mounting one failed",
            dir.display()
        );
    }
    Ok(())
}

fn is_bpffs(dir: &Path) -> bool {
    statfs(dir).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

fn mount_bpffs(at: &Path) -> anyhow::Result<()> {
    tracing::info!(path = %at.display(), "mounting bpffs");
    mount(Some("bpf"), at, Some("bpf"), MsFlags::empty(), None::<&str>).with_context(|| {
        format!(
            "mounting bpffs at {} (needs root; or pass --bpffs DIR on a mounted bpffs)",
            at.display()
        )
    })
}

/// Takes the bpffs directory for this agent alone (held until the returned lock drops):
/// two agents adopting and rewriting the same pins would undo each other's flips.
pub fn lock(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    let file = fs::File::open(dir)
        .with_context(|| format!("opening the bpffs directory {}", dir.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another reuseport-agent already manages {} ({e}): stop it, or pass --bpffs DIR",
            dir.display()
        )
    })
}
