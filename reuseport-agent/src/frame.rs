//! Length-prefixed JSON frames over a Unix stream socket, with file descriptors passed as
//! `SCM_RIGHTS` (the wire format is described in `docs/protocol.md`).

use std::{
    collections::VecDeque,
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd},
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde::{Serialize, de::DeserializeOwned};
use tokio::{io::Interest, net::UnixStream};

use crate::protocol::{MAX_FRAME, MAX_MESSAGE};

/// Most descriptors accepted with one frame; more are closed on arrival.
const MAX_FDS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("control connection: {0}")]
    Io(#[from] io::Error),
    #[error(
        "message of {len} bytes is larger than the limit ({MAX_FRAME} bytes a frame; \
         {MAX_FRAME} bytes a request, {MAX_MESSAGE} a reply)"
    )]
    TooLarge { len: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// One received frame and the descriptors that arrived with it.
#[derive(Debug)]
pub struct Frame {
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Frame {
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

/// Bit 31 of a frame's length word: more frames of the same message follow. The other 31
/// bits are the frame's length, at most [`MAX_FRAME`].
pub const MORE: u32 = 1 << 31;

/// `msg` as one message: its JSON in frames of at most [`MAX_FRAME`] bytes, each a length
/// (4 bytes, big-endian, [`MORE`] set on every frame but the last) and its part of the JSON.
/// A message larger than [`MAX_MESSAGE`] is refused.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_MESSAGE {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let mut out = Vec::with_capacity(body.len() + 4 * (1 + body.len() / MAX_FRAME));
    let mut parts = body.chunks(MAX_FRAME).peekable();
    if parts.peek().is_none() {
        out.extend_from_slice(&0u32.to_be_bytes());
    }
    while let Some(part) = parts.next() {
        let more = if parts.peek().is_some() { MORE } else { 0 };
        out.extend_from_slice(&(part.len() as u32 | more).to_be_bytes());
        out.extend_from_slice(part);
    }
    Ok(out)
}

/// Takes the first message's body off the front of `buf` once all of its frames have
/// arrived; `None` while more bytes are needed. A frame length over [`MAX_FRAME`], or a
/// message growing past `max_message`, is refused as soon as the length word that says so
/// is in, so a peer cannot make us buffer more than that.
///
/// NB: this is the whole parser of bytes from untrusted peers; it has no I/O so that the
/// fuzz target `control_frame` runs exactly this code.
pub fn take_message(buf: &mut Vec<u8>, max_message: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut at = 0;
    let mut total = 0;
    loop {
        let Some(header) = buf.get(at..).and_then(<[u8]>::first_chunk::<4>) else {
            return Ok(None);
        };
        let word = u32::from_be_bytes(*header);
        let len = (word & !MORE) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge { len });
        }
        total += len;
        if total > max_message {
            return Err(FrameError::TooLarge { len: total });
        }
        if buf.len() < at + 4 + len {
            return Ok(None);
        }
        at += 4 + len;
        if word & MORE == 0 {
            break;
        }
    }
    let mut body = Vec::with_capacity(total);
    let mut rest = &buf[..at];
    while let Some((header, tail)) = rest.split_first_chunk::<4>() {
        let len = (u32::from_be_bytes(*header) & !MORE) as usize;
        body.extend_from_slice(&tail[..len]);
        rest = &tail[len..];
    }
    buf.drain(..at);
    Ok(Some(body))
}

/// [`take_message`] for a single frame's worth: what the agent accepts as a request.
pub fn take_frame(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, FrameError> {
    take_message(buf, MAX_FRAME)
}

/// A control connection, either side.
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// Largest message accepted: [`MAX_MESSAGE`] from the agent, [`MAX_FRAME`] from a
    /// client (see [`Conn::for_requests`]).
    max_message: usize,
}

impl Conn {
    /// A client's connection: it reads replies of up to [`MAX_MESSAGE`] bytes.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
            max_message: MAX_MESSAGE,
        }
    }

    /// The agent's side of a connection: a request is at most [`MAX_FRAME`] bytes.
    pub fn for_requests(stream: UnixStream) -> Self {
        Self {
            max_message: MAX_FRAME,
            ..Self::new(stream)
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `msg` as one frame, with `fd` attached if given.
    pub async fn send<T: Serialize>(
        &self,
        msg: &T,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), FrameError> {
        let out = encode(msg)?;
        Ok(self.send_raw(&out, fd).await?)
    }

    /// Sends bytes as they are (tests use it to send malformed frames).
    pub async fn send_raw(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let raw = self.stream.as_raw_fd();
        let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        let mut sent = 0;
        // NB: the descriptor must travel with the first byte of the frame, so only the first
        // sendmsg carries it; a short write continues without it.
        while sent < bytes.len() {
            self.stream.writable().await?;
            let res = self.stream.try_io(Interest::WRITABLE, || {
                let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
                    &[ControlMessage::ScmRights(&fds)]
                } else {
                    &[]
                };
                sendmsg::<()>(
                    raw,
                    &[IoSlice::new(&bytes[sent..])],
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match res {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Next frame, or `None` when the peer closed the connection between frames.
    pub async fn recv(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some(body) = take_message(&mut self.buf, self.max_message)? {
                let fds = self.fds.drain(..).collect();
                return Ok(Some(Frame { body, fds }));
            }
            if self.read_more().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// Receives and decodes the next frame; `None` on a clean close.
    pub async fn recv_msg<T: DeserializeOwned>(
        &mut self,
    ) -> Result<Option<(T, Vec<OwnedFd>)>, FrameError> {
        match self.recv().await? {
            None => Ok(None),
            Some(frame) => Ok(Some((frame.decode()?, frame.fds))),
        }
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        loop {
            self.stream.readable().await?;
            let res = self.stream.try_io(Interest::READABLE, || {
                recv_with_fds(&self.stream, &mut chunk)
            });
            match res {
                Ok((n, fds)) => {
                    // NB: a peer can attach descriptors to every piece of a frame, sent a byte
                    // at a time, and they would all be held until the frame completes. No
                    // request uses more than MAX_FDS: the rest are closed here.
                    let room = MAX_FDS.saturating_sub(self.fds.len());
                    self.fds.extend(fds.into_iter().take(room));
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// One `recvmsg` into `chunk`: the bytes read and every descriptor that came with them.
///
/// NB: room for [`MAX_FDS`] descriptors only: the kernel installs as many as fit and sets
/// `MSG_CTRUNC` for the rest (which it closes itself). The ones it did install are ours
/// whether or not the message was truncated, so they are all taken (and closed when
/// dropped); a parser that gives up on `MSG_CTRUNC` would leak them into the agent.
fn recv_with_fds(stream: &UnixStream, chunk: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(chunk)];
    let msg = recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[test]
    fn a_message_larger_than_a_frame_spans_frames() {
        let big = "x".repeat(3 * MAX_FRAME);
        let mut wire = encode(&big).expect("encode");
        let frames = wire.len().div_ceil(MAX_FRAME + 4);
        assert_eq!(
            frames, 4,
            "3 frames' worth of JSON plus its quotes: 4 frames"
        );
        let mut copy = wire.clone();
        // A request may not be that large.
        assert!(matches!(
            take_frame(&mut copy),
            Err(FrameError::TooLarge { .. })
        ));
        // Cut anywhere, it stays incomplete until its last byte.
        let mut partial = wire[..wire.len() - 1].to_vec();
        assert!(take_message(&mut partial, MAX_MESSAGE).unwrap().is_none());
        wire.extend_from_slice(&encode(&"next").unwrap());
        let body = take_message(&mut wire, MAX_MESSAGE)
            .unwrap()
            .expect("whole message");
        assert_eq!(serde_json::from_slice::<String>(&body).unwrap(), big);
        let next = take_message(&mut wire, MAX_MESSAGE)
            .unwrap()
            .expect("next message");
        assert_eq!(next, br#""next""#);
        assert!(wire.is_empty());
    }

    #[tokio::test]
    async fn a_frame_holds_at_most_max_fds_descriptors() {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let (sender, mut receiver) = (Conn::new(a), Conn::new(b));
        let frame = encode(&"a request cut into one-byte pieces").expect("encode");
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        // Each piece carries a descriptor, so each arrives as its own recvmsg.
        for byte in &frame {
            sender
                .send_raw(std::slice::from_ref(byte), Some(null.as_fd()))
                .await
                .expect("send");
        }
        let got = receiver.recv().await.expect("recv").expect("a frame");
        assert_eq!(got.body, frame[4..], "the body should arrive whole");
        assert_eq!(
            got.fds.len(),
            MAX_FDS,
            "descriptors beyond MAX_FDS should be closed on arrival, not held ({} pieces sent one each)",
            frame.len()
        );
    }
}
