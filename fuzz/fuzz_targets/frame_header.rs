//! The data plane's frame header decoder: never panics, and what it accepts
//! is within the limits and re-encodes to the same bytes.
#![no_main]

use ferry_engine::wire::{FrameHeader, HEADER_LEN, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = <[u8; HEADER_LEN]>::try_from(data) {
        if let Ok(h) = FrameHeader::decode(&b) {
            assert!(h.frame_len() <= MAX_FRAME);
            assert_eq!(h.encode(), b);
        }
    }
});
