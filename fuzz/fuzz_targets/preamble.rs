//! The data connection's preamble check (`ferry_engine::transport::check_proof`):
//! any answer to any nonce. Never panics, and passes only the one answer
//! the session's key makes for that nonce and stream.
#![no_main]

use std::sync::OnceLock;

use ferry_engine::crypto::SessionKeys;
use ferry_engine::transport::{check_proof, proof, NONCE_LEN};
use ferry_engine::wire::MigrationId;
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static SessionKeys {
    static K: OnceLock<SessionKeys> = OnceLock::new();
    K.get_or_init(|| SessionKeys::test_only_unauthenticated(MigrationId(9)).expect("keys"))
}

fuzz_target!(|data: &[u8]| {
    let mut nonce = [0u8; NONCE_LEN];
    let n = data.len().min(NONCE_LEN);
    nonce[..n].copy_from_slice(&data[..n]);
    let answer = &data[n..];
    if let Ok(stream) = check_proof(keys(), &nonce, answer) {
        assert_eq!(answer, &proof(keys(), &nonce, stream)[..]);
    }
    let good = proof(keys(), &nonce, 3);
    assert_eq!(check_proof(keys(), &nonce, &good).ok(), Some(3));
});
