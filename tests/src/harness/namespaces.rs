//! The private namespaces every test runs in: its own network namespace (ports never
//! collide, nothing reaches the host's interfaces) and its own mount namespace with a fresh
//! bpffs at `/sys/fs/bpf` (a test never sees, adopts or deletes the pins of a real agent or
//! of an earlier run, and whether the host has bpffs mounted makes no difference).

use std::{io, path::Path};

use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
};

/// Where the bpffs of a test's mount namespace is mounted: the agent's default parent, so the
/// agent's own "is this bpffs?" checks run exactly as on a host.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Moves the calling thread into new network and mount namespaces: `lo` up, every mount
/// private (nothing mounted here propagates back to the host), and a new bpffs at
/// [`BPFFS_ROOT`], mode 0700. Threads and processes the caller creates afterwards inherit
/// both; when the last of them exits the bpffs and everything pinned in it are gone.
///
/// NB: `unshare(CLONE_NEWNS)` works for one thread of a multi-threaded process (it implies
/// `CLONE_FS`, which gives the thread its own root and cwd), which is what lets each test
/// thread have its own.
pub fn enter_private_namespaces() -> io::Result<()> {
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)?;
    // NB: without this, a mount below a shared mount point (systemd makes `/` shared)
    // would propagate to the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    let root = Path::new(BPFFS_ROOT);
    if !root.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{BPFFS_ROOT} does not exist: the kernel has no BPF syscall (CONFIG_BPF_SYSCALL)"
            ),
        ));
    }
    mount(
        Some("bpf"),
        root,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )?;
    bring_lo_up()
}

/// `ip link set lo up`, with the ioctl `ip` would use, in the calling thread's namespace.
pub(super) fn bring_lo_up() -> io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq we own; the fd is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut res = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr);
        if res == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            res = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if res < 0 { Err(err) } else { Ok(()) }
    }
}

/// The child of `parent` that is PID 1 of a pid namespace of its own (a container's init, as
/// `unshare --pid --fork` or systemd-nspawn start it), by its host pid.
pub(super) fn pid1_child_of(parent: u32) -> Option<nix::unistd::Pid> {
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children.split_whitespace().find_map(|pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
        let ids: Vec<&str> = nspid.split_whitespace().collect();
        if ids.len() >= 2 && ids.last() == Some(&"1") {
            pid.parse().ok().map(nix::unistd::Pid::from_raw)
        } else {
            None
        }
    })
}
