//! `server_pid`: which process a launcher may name as the server behind the socket it
//! registers. Only itself or one of its descendants: `status` shows that pid as the
//! socket's, and a registering process must not be able to put any process's pid there.
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
                 (pid {peer}) nor one of its descendants: a launcher names the server it \
                 started, as its own pid namespace numbers it"
            ),
        )
    })
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
