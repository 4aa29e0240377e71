//! [`NetNs`]: a second network namespace next to the test's own, for tests about groups
//! that share ip:port in different namespaces.

use std::{fs::File, os::unix::fs::MetadataExt};

use nix::sched::{CloneFlags, setns, unshare};

use super::namespaces::bring_lo_up;

/// Inode of the calling thread's network namespace (what the agent shows after `@`).
/// NB: `/proc/thread-self`, not `/proc/self`: [`TestEnv`](super::TestEnv) moves only the
/// test's thread into its namespace, `/proc/self` names the process's main thread.
pub fn current_netns_inode() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net")
        .expect("stat /proc/thread-self/ns/net")
        .ino()
}

/// A network namespace with `lo` up, kept alive by a descriptor. Code runs in it through
/// [`run`](Self::run), on a thread of its own; the caller's thread never changes namespace.
pub struct NetNs {
    fd: File,
    inode: u64,
}

impl NetNs {
    /// A fresh namespace, created by a helper thread (`unshare` moves only that thread).
    pub fn new() -> Self {
        std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) on a helper thread");
            bring_lo_up().expect("bring lo up in the second network namespace");
            let fd = File::open("/proc/thread-self/ns/net").expect("open the new namespace");
            let inode = fd.metadata().expect("stat the new namespace").ino();
            Self { fd, inode }
        })
        .join()
        .expect("helper thread creating a network namespace")
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The descriptor that holds the namespace (for `setns` in a child process).
    pub fn file(&self) -> &File {
        &self.fd
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates live here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&self.fd, CloneFlags::CLONE_NEWNET).expect("setns into the namespace");
                f()
            })
            .join()
            .expect("thread running in the second network namespace")
        })
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}
