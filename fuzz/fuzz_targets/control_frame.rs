//! The agent's reading of untrusted control-socket bytes, exactly as `agent::server::serve`
//! runs it: `frame::take_frame` on a stream arriving in pieces, then `Request::decode` on
//! each body.
//!
//! Input: the first byte sets the size of each read (1 to 256 bytes), so frames cut across
//! reads are covered; the rest is the byte stream a client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reuseport_agent::{
    frame::{self, FrameError},
    protocol::{MAX_FRAME, Request},
};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let mut buf = Vec::new();
    let mut consumed = 0;
    for piece in stream.chunks(usize::from(cut) + 1) {
        buf.extend_from_slice(piece);
        loop {
            match frame::take_frame(&mut buf) {
                Ok(Some(body)) => {
                    let end = consumed + 4 + body.len();
                    assert_eq!(
                        &stream[consumed + 4..end],
                        &body[..],
                        "a frame's body should be the bytes after its length, in order"
                    );
                    consumed = end;
                    check_body(&body);
                }
                Ok(None) => break,
                // The agent answers and closes the connection: nothing more is read.
                Err(FrameError::TooLarge { len }) => {
                    assert!(len > MAX_FRAME, "a length of {len} should be accepted");
                    return;
                }
                Err(e) => panic!("take_frame has no I/O and should fail only on length: {e}"),
            }
        }
    }
    assert_eq!(
        consumed + buf.len(),
        stream.len(),
        "every byte should be in a frame or still buffered"
    );
    if let Some(header) = buf.first_chunk::<4>() {
        let len = u32::from_be_bytes(*header) as usize;
        assert!(
            buf.len() < 4 + len,
            "a complete frame of {len} bytes was left in the buffer"
        );
    }
});

fn check_body(body: &[u8]) {
    assert!(body.len() <= MAX_FRAME, "frame over the limit was accepted");
    let req = match Request::decode(body) {
        Ok(req) => req,
        Err(e) => {
            // The agent sends this back: building it must not fail either.
            let _ = (e.kind(), e.to_string());
            return;
        }
    };
    // Whatever the agent accepts, our own clients can send: encoding it and decoding it
    // again gives the same request.
    let mut framed = match frame::encode(&req) {
        Ok(framed) => framed,
        // An address written without "tcp://" gains it: a body at the limit may outgrow it.
        Err(FrameError::TooLarge { .. }) if body.len() > MAX_FRAME - 16 => return,
        Err(e) => panic!("an accepted request should encode: {e} ({req:?})"),
    };
    let again = frame::take_frame(&mut framed)
        .expect("our own frame should be in bounds")
        .expect("our own frame should be complete");
    assert!(framed.is_empty(), "encode should produce exactly one frame");
    let decoded = Request::decode(&again)
        .unwrap_or_else(|e| panic!("re-encoded request should decode: {e} ({req:?})"));
    assert_eq!(decoded, req, "request should survive encode/decode");
}
