//! The data plane's frame reassembly (`ferry_engine::migrate::inbox`): a
//! valid stream of sealed frames, altered at one byte and cut into pieces
//! the input chooses, or plain garbage. Never panics; what reaches the
//! handler is in sequence and is exactly what was sealed.
#![no_main]

use std::sync::OnceLock;

use ferry_engine::crypto::{AeadBackend, Direction, Sealer, SessionKeys, StreamCrypto};
use ferry_engine::migrate::inbox::Inbox;
use ferry_engine::pipeline::{self, StreamHeader};
use ferry_engine::wire::{Kind, MigrationId, StreamId, HEADER_LEN, MAX_REASON, TAG_LEN};
use libfuzzer_sys::fuzz_target;

const MIG: MigrationId = MigrationId(42);

fn keys() -> &'static SessionKeys {
    static K: OnceLock<SessionKeys> = OnceLock::new();
    K.get_or_init(|| SessionKeys::test_only_unauthenticated(MIG).expect("keys"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut sent = Vec::new();
    let stream = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut tx = Sealer::new(keys(), Direction::ToSource, StreamId(0), AeadBackend::Ring);
        let hdr = StreamHeader { migration: MIG, stream: StreamId(0) };
        let mut out = Vec::new();
        for i in 0..usize::from(mode >> 5) + 1 {
            let p: Vec<u8> = rest.iter().take(i * 13 % 200).copied().collect();
            pipeline::encode_control(Kind::Abort, 0, hdr, 0, &p, &mut tx, &mut out);
            sent.push(p);
        }
        if let (Some(&at), Some(&xor)) = (rest.first(), rest.get(1)) {
            if mode & 2 != 0 {
                let i = usize::from(at) * 7 % out.len();
                out[i] ^= xor.max(1);
            }
        }
        out
    };
    let rx = StreamCrypto::new(keys(), Direction::ToSource, StreamId(0), AeadBackend::Ring);
    let mut inbox = Inbox::new(rx, 0, MIG, HEADER_LEN + MAX_REASON + TAG_LEN, 0);
    let mut got: Vec<Vec<u8>> = Vec::new();
    let piece = usize::from(rest.get(2).copied().unwrap_or(1)).max(1);
    for chunk in stream.chunks(piece) {
        let r = inbox.feed(chunk, |h, plain| {
            assert_eq!(h.seq.0, got.len() as u64);
            got.push(plain.to_vec());
            Ok(true)
        });
        if r.is_err() {
            break;
        }
    }
    if mode & 1 == 1 {
        assert!(got.len() <= sent.len());
        assert_eq!(&got[..], &sent[..got.len()], "an altered frame reached the handler");
    } else {
        // Garbage cannot carry a valid tag.
        assert!(got.is_empty());
    }
});
