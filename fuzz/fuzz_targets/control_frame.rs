//! The agent's reading of untrusted control-socket bytes, exactly as the agent's `server::serve`
//! runs it: `frame::take_frame` (one request: at most MAX_FRAME bytes in one or more frames)
//! on a stream arriving in pieces, then `Request::decode` on each body.
//!
//! Input: the first byte sets the size of each read (1 to 256 bytes), so frames cut across
//! reads are covered; the rest is the byte stream a client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reuseport_proto::{
    MAX_FRAME, MAX_MESSAGE, Request,
    frame::{self, FrameError},
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
            let before = buf.len();
            match frame::take_frame(&mut buf) {
                Ok(Some(body)) => {
                    let taken = before - buf.len();
                    // One frame, or several (MORE set on all but the last): 4 bytes of
                    // length each, the rest is the body, in order.
                    assert!(taken >= 4 + body.len(), "a message takes its bytes and lengths");
                    assert_eq!((taken - body.len()) % 4, 0, "4 bytes of length per frame");
                    consumed += taken;
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
        "every byte should be in a message or still buffered"
    );
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
    let mut framed = frame::encode(&req)
        .unwrap_or_else(|e| panic!("an accepted request should encode: {e} ({req:?})"));
    // NB: an address written without "tcp://" gains it, so a body at the limit may outgrow
    // one frame: read it back as a client reads a reply.
    let again = frame::take_message(&mut framed, MAX_MESSAGE)
        .expect("our own message should be in bounds")
        .expect("our own message should be complete");
    assert!(framed.is_empty(), "encode should produce exactly one message");
    let decoded = Request::decode(&again)
        .unwrap_or_else(|e| panic!("re-encoded request should decode: {e} ({req:?})"));
    assert_eq!(decoded, req, "request should survive encode/decode");
}
