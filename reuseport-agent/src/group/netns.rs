//! Which network namespace descriptors a group keeps: only one that is not the agent's own.

use std::{io, os::fd::OwnedFd};

pub(super) const OWN_NETNS: &str = "/proc/self/ns/net";

pub(super) fn own_netns() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    static OWN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(ino) = OWN.get() {
        return Ok(*ino);
    }
    let ino = std::fs::metadata(OWN_NETNS)?.ino();
    Ok(*OWN.get_or_init(|| ino))
}

/// A copy of `netns` if it is not the agent's own namespace: a group in the agent's own
/// keeps no descriptor of it (one per group counts at thousands of groups, see
/// `admission`'s descriptor budget) and opens the agent's when a wake-up needs it.
pub(super) fn foreign_netns(netns: &OwnedFd) -> Option<OwnedFd> {
    let ino = nix::sys::stat::fstat(netns).ok()?.st_ino;
    if own_netns().is_ok_and(|own| own == ino) {
        None
    } else {
        netns.try_clone().ok()
    }
}
