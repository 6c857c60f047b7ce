//! Revocation (issue 14, item 6), on real processes: a stolen copy of a
//! host's key and certificate is cut off by `ferry pki revoke` (the CA's
//! CRL) or `ferry pki deny` (a fingerprint list), on both sides of the
//! mutual TLS, while the daemons keep running: no restart, no new CA.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

mod common;
use common::procs::{ferry, migrate_one, s, text, SourceDomain};

/// Runs `ferry pki VERB --pki PKI WHICH...` and checks it worked.
fn pki(dom: &SourceDomain, verb: &str, which: &[&str]) {
    let o = ferry(&[&["pki", verb, "--pki", s(&dom.pki)][..], which].concat());
    assert!(o.status.success(), "{}", text(&o));
}

/// The migration is refused in the TLS handshake, for a revoked
/// certificate; the source keeps its guest (checked by `migrate_one`).
fn refused_as_revoked(dom: &SourceDomain, dest: std::net::SocketAddr) {
    // A running daemon looks at the lists at most once a second.
    std::thread::sleep(Duration::from_millis(1200));
    let e = migrate_one(dom, dest).unwrap_err();
    let why = format!("{e:?}").to_ascii_lowercase();
    assert!(why.contains("revoked"), "{why}");
}

#[test]
fn a_revoked_source_certificate_is_refused_by_a_running_destination() {
    if !common::host_ready("a_revoked_source_certificate_is_refused_by_a_running_destination") {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let mut recv = dom.receive(&[]);
    let dest = recv.listening();
    assert!(migrate_one(&dom, dest).unwrap().receipt.transcript_matches);
    pki(&dom, "revoke", &["--host", "src"]);
    refused_as_revoked(&dom, dest);
    // The same daemon did it, never restarted.
    assert!(recv.child.try_wait().unwrap().is_none(), "the destination exited");
}

#[test]
fn a_revoked_destination_certificate_is_refused_by_the_source() {
    if !common::host_ready("a_revoked_destination_certificate_is_refused_by_the_source") {
        return;
    }
    // The stolen key and certificate of "dst" still serve, but the source
    // no longer sends it a guest.
    let dom = SourceDomain::start(None, "127.0.0.1");
    let recv = dom.receive(&[]);
    let dest = recv.listening();
    pki(&dom, "revoke", &["--host", "dst"]);
    refused_as_revoked(&dom, dest);
}

#[test]
fn a_denied_fingerprint_is_refused_without_the_ca_key() {
    if !common::host_ready("a_denied_fingerprint_is_refused_without_the_ca_key") {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let recv = dom.receive(&[]);
    let dest = recv.listening();
    std::fs::remove_file(dom.pki.join("ca/key.pem")).unwrap();
    // Revoking needs the CA key; denying does not.
    let o = ferry(&["pki", "revoke", "--pki", s(&dom.pki), "--host", "dst"]);
    assert!(!o.status.success(), "{}", text(&o));
    pki(&dom, "deny", &["--host", "dst"]);
    refused_as_revoked(&dom, dest);
}
