//! The blocking face of the framing: a control connection on a std `UnixStream`, for tools
//! and tests that have no async runtime (xtask, the fuzz targets' round trips, scripts in
//! Rust). Same wire format, same limits, same descriptor handling as [`super::Conn`].

use std::{
    io,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
};

use serde::{Serialize, de::DeserializeOwned};

use super::{Frame, FrameError, Inbox, encode, scm};
use crate::message::{MAX_FRAME, MAX_MESSAGE};

/// A control connection, either side. Read and write time-outs are the stream's own
/// (`UnixStream::set_read_timeout`): a read that times out is a [`FrameError::Io`] of kind
/// `WouldBlock`.
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    inbox: Inbox,
}

impl Conn {
    /// A client's connection: it reads replies of up to [`MAX_MESSAGE`] bytes.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            inbox: Inbox::new(MAX_MESSAGE),
        }
    }

    /// The agent's side of a connection: a request is at most [`MAX_FRAME`] bytes.
    pub fn for_requests(stream: UnixStream) -> Self {
        Self {
            stream,
            inbox: Inbox::new(MAX_FRAME),
        }
    }

    /// Connects to the control socket at `path` as a client.
    pub fn connect(path: impl AsRef<std::path::Path>) -> io::Result<Self> {
        UnixStream::connect(path).map(Self::new)
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `msg` as one message, with `fd` attached if given.
    pub fn send<T: Serialize>(
        &self,
        msg: &T,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), FrameError> {
        let out = encode(msg)?;
        Ok(self.send_raw(&out, fd)?)
    }

    /// Sends bytes as they are (tests use it to send malformed frames).
    pub fn send_raw(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut sent = 0;
        // NB: the descriptor travels with the first byte of the frame only (see Conn).
        while sent < bytes.len() {
            let fd = if sent == 0 { fd } else { None };
            match scm::send(self.stream.as_fd(), &bytes[sent..], fd) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Next message, or `None` when the peer closed the connection between messages.
    pub fn recv(&mut self) -> Result<Option<Frame>, FrameError> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(frame) = self.inbox.take()? {
                return Ok(Some(frame));
            }
            match scm::recv(&self.stream, &mut chunk) {
                Ok((0, _)) => return self.inbox.closed(),
                Ok((n, fds)) => self.inbox.add(&chunk[..n], fds),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives and decodes the next message; `None` on a clean close.
    pub fn recv_msg<T: DeserializeOwned>(
        &mut self,
    ) -> Result<Option<(T, Vec<OwnedFd>)>, FrameError> {
        match self.recv()? {
            None => Ok(None),
            Some(frame) => Ok(Some((frame.decode()?, frame.fds))),
        }
    }

    /// Sends `request` and reads the next message as its answer; `None` if the peer closed
    /// the connection instead.
    pub fn round_trip<Q: Serialize, A: DeserializeOwned>(
        &mut self,
        request: &Q,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Option<A>, FrameError> {
        self.send(request, fd)?;
        Ok(self.recv_msg()?.map(|(answer, _fds)| answer))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;
    use crate::frame::MAX_FDS;

    #[test]
    fn messages_cross_in_order_with_their_descriptor() {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let (sender, mut receiver) = (Conn::new(a), Conn::new(b));
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let big = "y".repeat(2 * MAX_FRAME);
        let writer = std::thread::spawn(move || {
            sender.send(&"first", Some(null.as_fd())).expect("send");
            sender
                .send(&big, None)
                .expect("send a message of several frames");
            drop(sender);
        });
        let (first, fds) = receiver.recv_msg::<String>().unwrap().expect("first");
        assert_eq!((first.as_str(), fds.len()), ("first", 1));
        let (second, fds) = receiver.recv_msg::<String>().unwrap().expect("second");
        assert_eq!(second.len(), 2 * MAX_FRAME, "a reply may span frames");
        assert!(
            fds.is_empty(),
            "the descriptor came with the first message only"
        );
        assert!(
            receiver.recv().unwrap().is_none(),
            "a close between messages is a clean end"
        );
        writer.join().unwrap();
    }

    #[test]
    fn a_close_inside_a_message_is_an_error_and_descriptors_are_capped() {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let (sender, mut receiver) = (Conn::new(a), Conn::for_requests(b));
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let frame = encode(&"cut short").expect("encode");
        for byte in &frame[..frame.len() - 1] {
            sender
                .send_raw(std::slice::from_ref(byte), Some(null.as_fd()))
                .expect("send");
        }
        drop(sender);
        assert!(matches!(receiver.recv(), Err(FrameError::Truncated)));
        assert!(receiver.inbox.fds.len() <= MAX_FDS);
        let (a, b) = UnixStream::pair().expect("socket pair");
        let mut receiver = Conn::for_requests(b);
        Conn::new(a)
            .send_raw(&((MAX_FRAME + 1) as u32).to_be_bytes(), None)
            .unwrap();
        assert!(
            matches!(receiver.recv(), Err(FrameError::TooLarge { .. })),
            "a length over MAX_FRAME is refused before its body"
        );
    }
}
