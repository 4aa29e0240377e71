//! Waiting for the launchers' children.
//!
//! A process whose parent dies is handed to the nearest child subreaper, or to PID 1 of its
//! pid namespace; that process must wait for it, or it stays a zombie for good. `exec` and
//! `supervise` are exactly that when they run as a container's PID 1 (`docker run … reuseportctl
//! exec …`) or as a subreaper: the workers their servers fork and orphan end up with them.
//! So in those two cases they reap every child that exits, keeping the statuses of the
//! children they track (their servers); otherwise they wait for their servers alone, and
//! leave other children to whoever started them.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use nix::{
    errno::Errno,
    sys::wait::{WaitPidFlag, WaitStatus, waitpid},
    unistd::Pid,
};

use super::launch;

/// Waits for the servers of a launcher, and for orphans when it is their reaper.
pub struct Reaper {
    /// PID 1 of a pid namespace, or a child subreaper: every child is ours to reap.
    all: bool,
    tracked: HashSet<Pid>,
    /// Tracked children reaped while reaping every child, not asked about yet.
    exited: HashMap<Pid, WaitStatus>,
}

impl Reaper {
    /// A reaper for this process: of every child if it is PID 1 or a child subreaper.
    pub fn new() -> Self {
        let init = nix::unistd::getpid() == Pid::from_raw(1);
        let subreaper = nix::sys::prctl::get_child_subreaper().unwrap_or(false);
        Self {
            all: init || subreaper,
            tracked: HashSet::new(),
            exited: HashMap::new(),
        }
    }

    /// Keeps the status of `pid` (a server) when it exits, for [`Self::try_reap`].
    pub fn track(&mut self, pid: Pid) {
        self.tracked.insert(pid);
    }

    /// The wait status of the tracked child `pid` if it has exited (it is reaped then, and
    /// no longer tracked); `None` while it runs. Reaps every other child that exited too
    /// when [`Self::reaps_all`].
    pub fn try_reap(&mut self, pid: Pid) -> anyhow::Result<Option<WaitStatus>> {
        let status = if self.all {
            self.reap_all()?;
            self.exited.remove(&pid)
        } else {
            launch::try_reap(pid)?
        };
        if status.is_some() {
            self.tracked.remove(&pid);
        }
        Ok(status)
    }

    fn reap_all(&mut self) -> anyhow::Result<()> {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, ..))) => {
                    if self.tracked.contains(&pid) {
                        self.exited.insert(pid, status);
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e).context("cannot wait for children"),
            }
        }
    }
}

// NB: no unit test here: reaping every child of the test process would take the statuses of
// children other tests wait for. `tests/src/tests/reaping.rs` runs the launchers as
// subreapers instead.
