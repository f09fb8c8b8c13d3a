//! The agent's request framing and decoding: never panics; a frame is never
//! longer than the limit; a decoded request re-encodes to one frame that
//! decodes to the same request.
#![no_main]

use flock_proto::rpc::{self, Request};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    while let Ok(frame) = rpc::read_frame(&mut input, LIMIT) {
        assert!(frame.len() <= LIMIT);
        assert!(!frame.contains(&b'\n'));
        if let Ok(request) = serde_json::from_slice::<Request>(&frame) {
            let encoded = rpc::encode(&request);
            let mut reread = &encoded[..];
            let frame = rpc::read_frame(&mut reread, usize::MAX - 1).expect("one frame");
            assert!(reread.is_empty(), "exactly one frame");
            let again: Request = serde_json::from_slice(&frame).expect("decodes");
            assert_eq!(request, again);
        }
    }
});
