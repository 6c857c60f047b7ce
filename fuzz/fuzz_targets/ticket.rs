//! Ticket verification on arbitrary input: never panics, never accepts a
//! ticket not signed by the key (the key here signs nothing the fuzzer sees).
#![no_main]

use ferry_control::ticket::{self, AuthnClaims, AuthzClaims, SignedTicket};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [7u8; 32];

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = serde_json::from_slice::<SignedTicket>(data) {
        assert!(ticket::verify::<AuthzClaims>(&t, "authz", &KEY).is_err());
        assert!(ticket::verify::<AuthnClaims>(&t, "authn", &KEY).is_err());
    }
});
