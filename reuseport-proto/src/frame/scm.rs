//! One `sendmsg` / `recvmsg` on a control connection, with descriptors as `SCM_RIGHTS`:
//! the system calls under both faces of the framing.

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

use super::MAX_FDS;

/// One `sendmsg` of `bytes`, with `fd` attached; the bytes it took.
///
/// NB: `MSG_NOSIGNAL`: a peer that went away is an `EPIPE`, not a SIGPIPE that kills the
/// sender.
pub(super) fn send(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    if !fds.is_empty() {
        let pushed = control.push(SendAncillaryMessage::ScmRights(&fds));
        debug_assert!(pushed, "room for one descriptor");
    }
    Ok(sendmsg(
        socket,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// One `recvmsg` into `chunk`: the bytes read and every descriptor that came with them.
///
/// NB: room for [`MAX_FDS`] descriptors only: the kernel installs as many as fit and sets
/// `MSG_CTRUNC` for the rest (which it closes itself). The ones it did install are ours
/// whether or not the message was truncated, so they are all taken (and closed when
/// dropped); a parser that gives up on `MSG_CTRUNC` would leak them into the agent.
pub(super) fn recv(socket: impl AsFd, chunk: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(chunk)];
    let msg = recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    Ok((msg.bytes, fds))
}
