//! Who may do what on the control socket. The whole rule lives here:
//!
//! - `status`: anyone who can connect (the socket is mode 0660: root and the control group).
//! - `register`: the caller must own the socket it passes (or be root), and the socket's owner
//!   must be the group's owner: the kernel keeps one owner uid per reuseport group, so a socket
//!   of another uid is in another kernel group that the group's program never sees.
//! - `activate` / `drain`: root, the uid that owns the group, or a member of the control group
//!   (`--control-group`, primary or supplementary group of the caller).
//!
//! Credentials come from the kernel (SO_PEERCRED, SO_PEERGROUPS), taken when the client
//! connected, never from the request.

use std::os::fd::{AsRawFd, RawFd};

use nix::unistd::{Gid, Group};
use tokio::net::UnixStream;

use crate::{agent::Peer, registry::Refusal};
use reuseport_proto::{addr::GroupKey, message::ErrorKind};

/// The group whose members may activate and drain every group (`--control-group`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlGroup {
    pub gid: u32,
    /// As given, or as `/etc/group` names it; for messages.
    pub name: String,
}

impl ControlGroup {
    /// A group name from the group database, or a numeric gid (which need not be listed).
    pub fn resolve(spec: &str) -> Result<Self, String> {
        if let Ok(gid) = spec.parse::<u32>() {
            let name = Group::from_gid(Gid::from_raw(gid))
                .ok()
                .flatten()
                .map_or_else(|| gid.to_string(), |g| g.name);
            return Ok(Self { gid, name });
        }
        match Group::from_name(spec) {
            Ok(Some(g)) => Ok(Self {
                gid: g.gid.as_raw(),
                name: g.name,
            }),
            Ok(None) => Err(format!(
                "control group {spec:?} does not exist: pass an existing group name or a numeric gid"
            )),
            Err(e) => Err(format!("looking up the control group {spec:?}: {e}")),
        }
    }
}

impl std::fmt::Display for ControlGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name == self.gid.to_string() {
            write!(f, "gid {}", self.gid)
        } else {
            write!(f, "{} (gid {})", self.name, self.gid)
        }
    }
}

/// The access rule with the agent's configuration.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    control_group: Option<ControlGroup>,
}

impl Policy {
    pub fn new(control_group: Option<ControlGroup>) -> Self {
        Self { control_group }
    }

    /// The kernel's credentials of the process on the other end of `stream`.
    pub fn peer(&self, stream: &UnixStream) -> std::io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let in_control_group = match &self.control_group {
            None => false,
            Some(cg) => cred.gid() == cg.gid || peer_groups(stream.as_raw_fd())?.contains(&cg.gid),
        };
        Ok(Peer {
            pid: cred.pid().unwrap_or(0),
            uid: cred.uid(),
            in_control_group,
        })
    }

    /// `register`: the caller owns the socket (or is root).
    pub fn may_register(&self, peer: &Peer, socket_uid: u32) -> Result<(), Refusal> {
        if peer.uid == 0 || peer.uid == socket_uid {
            return Ok(());
        }
        Err(denied(format!(
            "the socket belongs to uid {socket_uid}, the caller is uid {}; register it as its \
             owner or as root",
            peer.uid
        )))
    }

    /// `register` into an existing group: the socket's owner is the group's owner. Applies
    /// to root too: the kernel would put the socket in a different reuseport group.
    pub fn may_join(
        &self,
        group: &GroupKey,
        owner_uid: u32,
        socket_uid: u32,
    ) -> Result<(), Refusal> {
        if socket_uid == owner_uid {
            return Ok(());
        }
        Err(denied(format!(
            "group {group} belongs to uid {owner_uid} and the socket to uid {socket_uid}: the \
             kernel keeps one owner uid per reuseport group, so only sockets of uid {owner_uid} \
             can join it"
        )))
    }

    /// `activate` / `drain` (`what`) of a group owned by `owner_uid`.
    pub fn may_change(
        &self,
        peer: &Peer,
        group: &GroupKey,
        owner_uid: u32,
        what: &str,
    ) -> Result<(), Refusal> {
        if peer.uid == 0 || peer.uid == owner_uid || peer.in_control_group {
            return Ok(());
        }
        let who = match &self.control_group {
            Some(cg) => {
                format!("root, its owner uid {owner_uid} or members of the control group {cg}")
            }
            None => format!(
                "root or its owner uid {owner_uid} (start the agent with --control-group to let \
                 a group of operators do it)"
            ),
        };
        Err(denied(format!(
            "{what} of group {group} may be done only by {who}; the caller is uid {}",
            peer.uid
        )))
    }
}

fn denied(reason: String) -> Refusal {
    Refusal::new(
        ErrorKind::PermissionDenied,
        format!("permission denied: {reason}"),
    )
}

/// The supplementary groups of the peer (SO_PEERGROUPS, Linux 4.13+), as they were when it
/// connected.
fn peer_groups(fd: RawFd) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes we own; the kernel writes at most that much.
        let res = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size_of::<libc::gid_t>();
        if res == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        // NB: ERANGE reports the size needed in `len`.
        if err.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> GroupKey {
        GroupKey {
            addr: "127.0.0.1:80".parse().unwrap(),
            netns: 1,
        }
    }

    fn peer(uid: u32, in_control_group: bool) -> Peer {
        Peer {
            pid: 1,
            uid,
            in_control_group,
        }
    }

    fn ops() -> Policy {
        Policy::new(Some(ControlGroup {
            gid: 500,
            name: "ops".into(),
        }))
    }

    #[test]
    fn root_owner_and_control_group_may_change_others_may_not() {
        let p = ops();
        assert!(
            p.may_change(&peer(0, false), &key(), 1000, "activate")
                .is_ok()
        );
        assert!(
            p.may_change(&peer(1000, false), &key(), 1000, "activate")
                .is_ok()
        );
        assert!(
            p.may_change(&peer(2000, true), &key(), 1000, "activate")
                .is_ok()
        );
        let e = p
            .may_change(&peer(2000, false), &key(), 1000, "drain")
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied);
        assert!(
            e.message.starts_with("permission denied: drain of group"),
            "{e}"
        );
        assert!(
            e.message.contains("ops (gid 500)") && e.message.contains("uid 2000"),
            "{e}"
        );
        let e = Policy::default()
            .may_change(&peer(2000, false), &key(), 0, "activate")
            .unwrap_err();
        assert!(e.message.contains("--control-group"), "{e}");
    }

    #[test]
    fn register_needs_the_socket_and_the_group_owner() {
        let p = Policy::default();
        assert!(p.may_register(&peer(1000, false), 1000).is_ok());
        assert!(p.may_register(&peer(0, false), 1000).is_ok());
        assert!(p.may_register(&peer(1000, true), 0).is_err());
        assert!(p.may_join(&key(), 1000, 1000).is_ok());
        let e = p.may_join(&key(), 0, 1000).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied);
        assert!(
            e.message.contains("one owner uid per reuseport group"),
            "{e}"
        );
    }

    #[test]
    fn numeric_control_group_needs_no_database_entry() {
        let cg = ControlGroup::resolve("4000000000").unwrap();
        assert_eq!(cg.gid, 4_000_000_000);
        assert_eq!(cg.to_string(), "gid 4000000000");
        assert_eq!(ControlGroup::resolve("root").unwrap().gid, 0);
        assert!(
            ControlGroup::resolve("no-such-group-xyzzy")
                .unwrap_err()
                .contains("does not exist")
        );
    }
}
