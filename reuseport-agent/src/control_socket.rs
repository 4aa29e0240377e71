//! The control socket's file: created mode 0660 with the control group, replacing a stale
//! socket of a dead agent but never a live agent's, and never following a symbolic link.

use std::{
    io,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::{FileTypeExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use nix::{
    fcntl::{AT_FDCWD, AtFlags, OFlag, open},
    sys::stat::{FchmodatFlags, Mode, SFlag, fchmodat, fstat, umask},
    unistd::{Gid, fchownat},
};
use tokio::net::UnixListener;

use super::access::ControlGroup;

/// Mode of the control socket: root and the control group may connect.
const SOCKET_MODE: u32 = 0o660;

/// The bound control socket file, remembered so that only this very file is removed at exit.
pub struct ControlSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl ControlSocket {
    pub fn bind(path: &Path, group: Option<&ControlGroup>) -> anyhow::Result<(Self, UnixListener)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("creating the control socket directory {}", dir.display())
            })?;
            warn_if_shared(dir);
        }
        clear_stale(path)?;
        let listener = {
            // NB: umask is process-wide; this runs at start, before anything else creates
            // files. 0600 at creation, so nobody but root can connect until the group is set.
            let old = umask(Mode::from_bits_truncate(0o177));
            let bound = std::os::unix::net::UnixListener::bind(path);
            umask(old);
            bound.with_context(|| format!("binding the control socket {}", path.display()))?
        };
        if let Some(group) = group {
            fchownat(
                AT_FDCWD,
                path,
                None,
                Some(Gid::from_raw(group.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .with_context(|| format!("giving {} to the control group {group}", path.display()))?;
        }
        fchmodat(
            AT_FDCWD,
            path,
            Mode::from_bits_truncate(SOCKET_MODE),
            FchmodatFlags::NoFollowSymlink,
        )
        .with_context(|| format!("setting the mode of {} to 0660", path.display()))?;
        let meta = std::fs::symlink_metadata(path)
            .with_context(|| format!("checking the control socket {}", path.display()))?;
        if !meta.file_type().is_socket() {
            bail!(
                "{} was replaced while the agent bound it: check who else writes to {}",
                path.display(),
                path.parent().unwrap_or(Path::new("/")).display()
            );
        }
        listener
            .set_nonblocking(true)
            .context("making the control socket non-blocking")?;
        let listener =
            UnixListener::from_std(listener).context("registering the control socket")?;
        Ok((
            Self {
                path: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
            listener,
        ))
    }

    /// Removes the socket file if it is still the one this agent bound.
    pub fn remove(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && meta.dev() == self.dev
            && meta.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A directory other users may write to lets them replace the socket file between the
/// agent's checks (and after): say so, once, at start.
fn warn_if_shared(dir: &Path) {
    if let Ok(meta) = std::fs::metadata(dir)
        && (meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0)
    {
        tracing::warn!(
            dir = %dir.display(),
            owner = meta.uid(),
            mode = format!("{:o}", meta.mode() & 0o7777),
            "the control socket's directory is writable by others than the agent's user: they \
             could replace the socket; prefer a directory like /run/reuseport"
        );
    }
}

/// Refuses a symbolic link or another kind of file at `path`, refuses a live agent's socket,
/// and removes a stale one.
fn clear_stale(path: &Path) -> anyhow::Result<()> {
    // NB: O_PATH | O_NOFOLLOW opens a symbolic link itself instead of its target, and the
    // probe below connects through this descriptor: a link swapped in after the check is
    // never followed.
    let fd = match open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    let st = fstat(&fd).with_context(|| format!("checking {}", path.display()))?;
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFSOCK => {}
        SFlag::S_IFLNK => {
            let target =
                std::fs::read_link(path).map_or_else(|_| "?".into(), |t| t.display().to_string());
            bail!(
                "refusing the control socket path {}: it is a symbolic link (to {target}); \
                 remove it or pass --control PATH",
                path.display()
            );
        }
        _ => bail!(
            "{} exists and is not a socket: remove it or pass --control PATH",
            path.display()
        ),
    }
    match probe(&fd) {
        Ok(()) => bail!(
            "another reuseport-agent is already listening on {} (stop it, or pass --control PATH)",
            path.display()
        ),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            super::fault::hold("control.stale-found");
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale control socket {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot tell whether an agent listens on {}: remove it if none does",
                path.display()
            )
        }),
    }
}

/// Connects to the socket file held by `fd` (through /proc/self/fd, which resolves to that
/// very inode).
fn probe(fd: &OwnedFd) -> io::Result<()> {
    let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
    std::os::unix::net::UnixStream::connect(via).map(drop)
}
