//! ferry-control: the thin control plane of ferry.
//!
//! It implements the design of *Secure Live Virtual Machine Migration in
//! Cloud Computing* (section V), steps 1-7:
//! X.509 host certificates ([`pki`]); an authentication server that checks
//! the migration client's certificate and issues an authentication ticket,
//! and an authorization server that checks that ticket against a policy and
//! issues an authorization ticket ([`servers`], [`ticket`], [`policy`]); a
//! migration request carrying the source's certificate (mutual TLS 1.3) and
//! the ticket, checked by the destination, which answers with its own
//! certificate and a signed platform measurement ([`handshake`]); and session
//! keys exported from that TLS session (ephemeral ECDHE: the paper's ECDH) for
//! the data plane.
//!
//! Nothing here touches guest memory: the engine's data-plane keys are
//! built from a [`handshake::KeyGrant`], obtainable only from a
//! [`handshake::Admitted`], which only a passed admission produces (the
//! engine depends on this crate for that one type).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accept;
pub mod audit;
pub mod decision;
pub mod handshake;
pub mod lock;
pub mod manifest;
pub mod measurement;
pub mod modes;
pub mod peer;
pub mod pending;
pub mod pki;
pub mod policy;
pub mod refusal;
pub mod replay;
pub mod revocation;
pub mod serve;
pub mod servers;
pub mod ticket;
pub mod tls;
pub mod unauth;

use ring::rand::SecureRandom;

/// Seconds since the Unix epoch.
pub fn now_unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 fingerprint of a DER certificate, in hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// `n` random bytes from the OS, in hex.
pub(crate) fn random_hex(n: usize) -> Result<String, ring::error::Unspecified> {
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new().fill(&mut b)?;
    Ok(hex(&b))
}

/// A random u64 from the OS.
pub(crate) fn random_u64() -> Result<u64, ring::error::Unspecified> {
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
