//! Private namespaces for the commands that run an agent (the demo, the benchmarks): a network
//! namespace of their own (ports never collide with the host's or another run's) and a mount
//! namespace with a fresh bpffs (nothing they pin outlives them, and whatever an earlier run
//! or a real agent left in the host's `/sys/fs/bpf` can neither disturb nor help them).

use std::{io, os::unix::process::CommandExt as _, process::Command};

/// Moves the calling thread (and everything it starts later) into new network and mount
/// namespaces: `lo` up, every mount private, a new bpffs at `/sys/fs/bpf` (mode 0700).
///
/// NB: `unshare(CLONE_NEWNS)` affects only the calling thread (it implies `CLONE_FS`), so
/// callers run the whole stack on a thread of its own and the rest of xtask stays outside.
pub fn enter_private() -> io::Result<()> {
    // SAFETY: plain syscall; affects only this thread and what it starts later.
    if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // NB: `/` is usually a shared mount: without making it private, the bpffs mounted below
    // would propagate to the host.
    mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(
        Some(c"bpf"),
        c"/sys/fs/bpf",
        Some(c"bpf"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(c"mode=0700"),
    )
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("mounting a private bpffs at /sys/fs/bpf: {e}"),
        )
    })?;
    lo_up()
}

fn mount(
    source: Option<&std::ffi::CStr>,
    target: &std::ffi::CStr,
    fstype: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    data: Option<&std::ffi::CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&std::ffi::CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null.
    let res = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    if res != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lo_up() -> io::Result<()> {
    // SAFETY: a throwaway socket for the interface ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; the name fits with its NUL.
    let res = unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    res
}

/// Makes the command's process get SIGKILL when the thread that starts it exits: an xtask run
/// that is killed leaves no agent or server of its own behind.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}
