//! Every control-channel message type, decoded from arbitrary bytes (the
//! channel hands the JSON body to serde after its length check).
#![no_main]

use ferry_control::handshake::{Manifest, MigrationRequest, Receipt, RequestReply, SignedBlob};
use ferry_control::servers::{ServerReply, ServerRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<MigrationRequest>(data);
    let _ = serde_json::from_slice::<RequestReply>(data);
    let _ = serde_json::from_slice::<ServerRequest>(data);
    let _ = serde_json::from_slice::<ServerReply>(data);
    let _ = serde_json::from_slice::<SignedBlob>(data);
    let _ = serde_json::from_slice::<Manifest>(data);
    let _ = serde_json::from_slice::<Receipt>(data);
});
