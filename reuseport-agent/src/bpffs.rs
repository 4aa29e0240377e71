//! The agent's bpffs directory: on a BPF filesystem, the agent's alone, and never a path
//! that follows a symbolic link.
//!
//! Whoever can write under the directory can plant a symbolic link named after a future
//! group's pin directory (removal and adoption would follow it into another group's pins) or
//! hold its lock (the agent could not start again). So bpffs is mounted mode 0700 when the
//! agent mounts it, the directory is created (or made) 0700 and refused when another user
//! owns it, and pin directories are opened with `O_NOFOLLOW` and emptied
//! through their descriptor ([`remove_pins`]).

use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::Path,
};

use anyhow::{Context as _, bail};
use nix::{
    dir::Dir,
    fcntl::OFlag,
    mount::{MsFlags, mount},
    sys::{
        stat::Mode,
        statfs::{BPF_FS_MAGIC, statfs},
    },
    unistd::{UnlinkatFlags, unlinkat},
};

/// Creates `dir` and makes sure it lives on bpffs, mounting bpffs at `/sys/fs/bpf` (or at
/// `dir` itself if that is not below `/sys/fs/bpf`) when nothing is mounted yet.
pub fn ensure(dir: &Path) -> anyhow::Result<()> {
    let bpf_root = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpf_root) && !is_bpffs(bpf_root) && bpf_root.is_dir() {
        mount_bpffs(bpf_root)?;
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
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
    check_private(dir)
}

/// Refuses a directory that is a symbolic link or belongs to another user; makes one that
/// others may enter private.
fn check_private(dir: &Path) -> anyhow::Result<()> {
    let meta = fs::symlink_metadata(dir)
        .with_context(|| format!("checking the bpffs directory {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.file_type().is_symlink() {
        bail!(
            "refusing the bpffs directory {}: it is a symbolic link; pass --bpffs with a real \
             directory",
            dir.display()
        );
    }
    if meta.uid() != me {
        bail!(
            "refusing the bpffs directory {}: it belongs to uid {}, not to the agent's uid {me}; \
             remove it or pass --bpffs DIR",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        // NB: an older agent created it 0755; the agent's own directory is made private
        // rather than refused.
        tracing::warn!(
            dir = %dir.display(), mode = format!("{:o}", meta.mode() & 0o7777),
            "the bpffs directory let other users in; making it 0700"
        );
        fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("making the bpffs directory {} private", dir.display()))?;
    }
    Ok(())
}

fn is_bpffs(dir: &Path) -> bool {
    statfs(dir).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

fn mount_bpffs(at: &Path) -> anyhow::Result<()> {
    tracing::info!(path = %at.display(), "mounting bpffs (mode 0700)");
    mount(
        Some("bpf"),
        at,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .with_context(|| {
        format!(
            "mounting bpffs at {} (needs root; or pass --bpffs DIR on a mounted bpffs)",
            at.display()
        )
    })
}

/// Takes the bpffs directory for this agent alone (held until the returned lock drops):
/// two agents adopting and rewriting the same pins would undo each other's flips.
pub fn lock(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    let fd = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening the bpffs directory {}", dir.display()))?;
    let file = fs::File::from(fd);
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another reuseport-agent already manages {} ({e}): stop it, or pass --bpffs DIR",
            dir.display()
        )
    })
}

/// Whether `path` is a directory itself, not a symbolic link to one.
pub fn is_real_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir())
}

/// Removes the pins in the pin directory `dir`, and the directory. A symbolic link there is
/// removed itself, never followed: the directory is opened with `O_NOFOLLOW` and emptied
/// through its descriptor.
pub fn remove_pins(dir: &Path) {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match Dir::open(dir, flags, Mode::empty()) {
        Ok(mut d) => {
            let names: Vec<std::ffi::CString> = d
                .iter()
                .flatten()
                .map(|e| e.file_name().to_owned())
                .filter(|n| n.to_bytes() != b"." && n.to_bytes() != b"..")
                .collect();
            for name in names {
                let _ = unlinkat(&d, name.as_c_str(), UnlinkatFlags::NoRemoveDir);
            }
            let _ = fs::remove_dir(dir);
        }
        Err(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR) => {
            tracing::warn!(path = %dir.display(), "a pin directory was a link or a file: removed, not followed");
            let _ = fs::remove_file(dir);
        }
        Err(_) => {}
    }
}
