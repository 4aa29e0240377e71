//! Length-prefixed JSON frames over a Unix stream socket, with file descriptors passed as
//! `SCM_RIGHTS` (the wire format is described in `docs/protocol.md`).
//!
//! The codec ([`encode`], [`take_message`]) has no I/O. Two faces put it on a socket: the
//! async [`Conn`] (feature `tokio`), which the agent and the client library use, and the
//! blocking [`blocking::Conn`] for tools and tests without a runtime.

pub mod blocking;
#[cfg(feature = "tokio")]
mod conn;
mod scm;

use std::{collections::VecDeque, io, os::fd::OwnedFd};

use serde::{Serialize, de::DeserializeOwned};

#[cfg(feature = "tokio")]
pub use self::conn::Conn;
use crate::message::{MAX_FRAME, MAX_MESSAGE};

/// Most descriptors accepted with one frame; more are closed on arrival.
pub const MAX_FDS: usize = 4;

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
    encode_body(&serde_json::to_vec(msg)?)
}

/// `body` framed as [`encode`] frames JSON, whatever it holds (tests send bodies that are
/// not requests on purpose).
pub fn encode_body(body: &[u8]) -> Result<Vec<u8>, FrameError> {
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

/// What a connection has received and not yet handed out: bytes of incomplete frames and
/// the descriptors that came with them. Both faces of the framing read through it.
#[derive(Debug)]
struct Inbox {
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// Largest message accepted: [`MAX_MESSAGE`] from the agent, [`MAX_FRAME`] from a
    /// client.
    max_message: usize,
}

impl Inbox {
    fn new(max_message: usize) -> Self {
        Self {
            buf: Vec::new(),
            fds: VecDeque::new(),
            max_message,
        }
    }

    /// The next whole message, if it has arrived.
    fn take(&mut self) -> Result<Option<Frame>, FrameError> {
        Ok(
            take_message(&mut self.buf, self.max_message)?.map(|body| Frame {
                body,
                fds: self.fds.drain(..).collect(),
            }),
        )
    }

    /// Adds what one read brought.
    fn add(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        // NB: a peer can attach descriptors to every piece of a frame, sent a byte at a
        // time, and they would all be held until the frame completes. No request uses more
        // than MAX_FDS: the rest are closed here.
        let room = MAX_FDS.saturating_sub(self.fds.len());
        self.fds.extend(fds.into_iter().take(room));
        self.buf.extend_from_slice(bytes);
    }

    /// The peer closed the connection: clean between messages, an error inside one.
    fn closed(&self) -> Result<Option<Frame>, FrameError> {
        if self.buf.is_empty() {
            Ok(None)
        } else {
            Err(FrameError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
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
}
