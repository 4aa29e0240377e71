//! `server_pid`: which process a launcher may name as the server behind the socket it
//! registers. Itself or one of its descendants; or, for `reuseportctl register --pid` (a
//! running server adopted from outside), a process that holds the very socket and that the
//! registrant may trace (root, or the process's owner: what `pidfd_getfd` itself demands).
//! `status` shows that pid as the socket's, and a registering process must not be able to
//! put any other process's pid there.
//!
//! The launcher names the pid as it sees it, in its own pid namespace (a launcher in a
//! container); the agent finds the descendant with that pid there (`NSpid` in
//! `/proc/PID/status`) and keeps the pid as the agent sees it, like `SO_PEERCRED`'s.

use super::registry::Refusal;
use reuseport_proto::message::ErrorKind;

/// How far up the parent chain a descendant may be: a launcher's server and its workers are
/// a few levels down, never this many.
const MAX_DEPTH: usize = 64;

/// What the agent reads of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    pub ppid: i32,
    /// Its pid in each pid namespace from the agent's down to its own (`NSpid`).
    pub nspid: Vec<i32>,
}

/// The processes as the agent sees them.
pub trait Procs {
    fn get(&self, pid: i32) -> Option<Proc>;
    fn pids(&self) -> Vec<i32>;
}

/// `/proc` of the agent's pid namespace.
pub struct ProcFs;

impl Procs for ProcFs {
    fn get(&self, pid: i32) -> Option<Proc> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let ppid = field("PPid:")?.parse().ok()?;
        // NB: no NSpid line before Linux 4.1: no nested namespace is visible then.
        let nspid = match field("NSpid:") {
            Some(list) => list
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
            None => vec![pid],
        };
        Some(Proc { ppid, nspid })
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_dir("/proc")
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The pid (as the agent sees it) of the process that `peer`, the registering process, calls
/// `claimed`, if that is `peer` itself or one of its descendants.
pub fn server_pid(peer: i32, claimed: i32, procs: &impl Procs) -> Result<i32, Refusal> {
    find(peer, claimed, procs).ok_or_else(|| {
        Refusal::new(
            ErrorKind::PermissionDenied,
            format!(
                "permission denied: server_pid {claimed} is neither the registering process \
                 (pid {peer}) nor one of its descendants, nor a process that holds this socket \
                 and that the registrant owns: a launcher names the server it started, as its \
                 own pid namespace numbers it"
            ),
        )
    })
}

/// `claimed`, as the agent numbers pids, if it holds the socket whose inode is `socket_ino`
/// among its descriptors and `peer_uid` is root or its owner (real uid): the registrant took
/// the socket from it. Read from `/proc`.
pub fn holder_pid(peer_uid: u32, claimed: i32, socket_ino: u64) -> Option<i32> {
    if claimed <= 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{claimed}/status")).ok()?;
    let owner: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    if peer_uid != 0 && peer_uid != owner {
        return None;
    }
    let wanted = format!("socket:[{socket_ino}]");
    let fds = std::fs::read_dir(format!("/proc/{claimed}/fd")).ok()?;
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str()))
        .then_some(claimed)
}

fn find(peer: i32, claimed: i32, procs: &impl Procs) -> Option<i32> {
    if peer <= 0 || claimed <= 0 {
        return None;
    }
    let me = procs.get(peer)?;
    // The index of the peer's own pid namespace in a descendant's NSpid.
    let level = me.nspid.len().checked_sub(1)?;
    if me.nspid[level] == claimed {
        return Some(peer);
    }
    let descends = |pid: i32| {
        let mut at = pid;
        for _ in 0..MAX_DEPTH {
            let Some(p) = procs.get(at) else { return false };
            if p.ppid == peer {
                return true;
            }
            if p.ppid <= 1 {
                return false;
            }
            at = p.ppid;
        }
        false
    };
    let in_peers_namespace =
        |pid: i32| procs.get(pid).and_then(|p| p.nspid.get(level).copied()) == Some(claimed);
    if level == 0 {
        // The peer numbers pids as the agent does: `claimed` is the pid.
        return (in_peers_namespace(claimed) && descends(claimed)).then_some(claimed);
    }
    procs
        .pids()
        .into_iter()
        .find(|pid| in_peers_namespace(*pid) && descends(*pid))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        io::{BufRead as _, BufReader},
        process::{Command, Stdio},
    };

    use super::*;

    #[test]
    fn a_holder_of_the_socket_is_found_for_root_and_its_owner_only() {
        use std::os::{fd::AsFd as _, unix::fs::MetadataExt as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = nix::sys::stat::fstat(listener.as_fd()).unwrap().st_ino;
        let me = std::process::id() as i32;
        let owner = std::fs::metadata(format!("/proc/{me}")).unwrap().uid();
        assert_eq!(holder_pid(0, me, ino), Some(me), "root");
        assert_eq!(holder_pid(owner, me, ino), Some(me), "its owner");
        assert_eq!(holder_pid(owner + 4242, me, ino), None, "another user");
        assert_eq!(
            holder_pid(0, me, ino + 1_000_000_000),
            None,
            "a socket it does not hold"
        );
        assert_eq!(holder_pid(0, 0, ino), None);
    }

    #[test]
    fn a_child_and_a_grandchild_are_found_an_unrelated_process_is_not() {
        // sh starts a background sleep (a grandchild of this process) and prints its pid.
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run sh");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the grandchild's pid");
        let grandchild: i32 = line.trim().parse().expect("a pid");
        let me = std::process::id() as i32;
        let sh = child.id() as i32;
        assert_eq!(server_pid(me, me, &ProcFs), Ok(me), "the process itself");
        assert_eq!(server_pid(me, sh, &ProcFs), Ok(sh), "a child");
        assert_eq!(
            server_pid(me, grandchild, &ProcFs),
            Ok(grandchild),
            "a grandchild"
        );
        let e = server_pid(me, 1, &ProcFs).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied);
        assert!(e.message.contains("server_pid 1 is neither"), "{e}");
        assert!(
            server_pid(sh, me, &ProcFs).is_err(),
            "a parent is not a descendant"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(grandchild),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
    }

    /// A table of processes, as a launcher in a container and its server would look.
    struct Table(HashMap<i32, Proc>);

    impl Procs for Table {
        fn get(&self, pid: i32) -> Option<Proc> {
            self.0.get(&pid).cloned()
        }
        fn pids(&self) -> Vec<i32> {
            self.0.keys().copied().collect()
        }
    }

    #[test]
    fn a_launcher_in_a_container_names_its_server_by_its_own_pids() {
        let p = |ppid, nspid: &[i32]| Proc {
            ppid,
            nspid: nspid.to_vec(),
        };
        let procs = Table(HashMap::from([
            (900, p(1, &[900])),
            // The container's init and the launcher, pid 7 inside.
            (1000, p(900, &[1000, 1])),
            (1007, p(1000, &[1007, 7])),
            // Its server, pid 8 inside; and another container's pid 8.
            (1008, p(1007, &[1008, 8])),
            (2008, p(900, &[2008, 8])),
        ]));
        assert_eq!(
            server_pid(1007, 8, &procs),
            Ok(1008),
            "its server, translated"
        );
        assert_eq!(server_pid(1007, 7, &procs), Ok(1007), "itself");
        assert!(
            server_pid(1007, 1, &procs).is_err(),
            "its container's init is not its descendant"
        );
        assert_eq!(
            server_pid(1000, 8, &procs),
            Ok(1008),
            "a grandchild, not another container's pid 8"
        );
        assert!(
            server_pid(900, 8, &procs).is_err(),
            "no descendant of the agent's namespace has pid 8 there"
        );
    }
}
