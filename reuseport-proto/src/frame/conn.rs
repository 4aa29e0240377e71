//! The async face of the framing: a control connection on a tokio `UnixStream`.

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
};

use serde::{Serialize, de::DeserializeOwned};
use tokio::{io::Interest, net::UnixStream};

use super::{Frame, FrameError, Inbox, encode, scm};
use crate::message::{MAX_FRAME, MAX_MESSAGE};

/// A control connection, either side.
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

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `msg` as one message, with `fd` attached if given.
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
        let mut sent = 0;
        // NB: the descriptor must travel with the first byte of the frame, so only the first
        // sendmsg carries it; a short write continues without it.
        while sent < bytes.len() {
            self.stream.writable().await?;
            let res = self.stream.try_io(Interest::WRITABLE, || {
                let fd = if sent == 0 { fd } else { None };
                scm::send(self.stream.as_fd(), &bytes[sent..], fd)
            });
            match res {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Next message, or `None` when the peer closed the connection between messages.
    pub async fn recv(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some(frame) = self.inbox.take()? {
                return Ok(Some(frame));
            }
            if self.read_more().await? == 0 {
                return self.inbox.closed();
            }
        }
    }

    /// Receives and decodes the next message; `None` on a clean close.
    pub async fn recv_msg<T: DeserializeOwned>(
        &mut self,
    ) -> Result<Option<(T, Vec<std::os::fd::OwnedFd>)>, FrameError> {
        match self.recv().await? {
            None => Ok(None),
            Some(frame) => Ok(Some((frame.decode()?, frame.fds))),
        }
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        loop {
            self.stream.readable().await?;
            let res = self
                .stream
                .try_io(Interest::READABLE, || scm::recv(&self.stream, &mut chunk));
            match res {
                Ok((n, fds)) => {
                    self.inbox.add(&chunk[..n], fds);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;
    use crate::frame::MAX_FDS;

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
