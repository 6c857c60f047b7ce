//! The control-plane attack tests' helpers: an offer, one admission
//! attempt on real sockets, and checks that a refusal was audited.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::time::Duration;

use ferry::lab::{Lab, DEST, POLICY, SOURCE, VM};
use ferry_control::handshake::{self, Destination, DestinationSession, HandshakeError, Offer, SourceSession};
use ferry_control::pki::{self, Identity, Role};
use ferry_control::refusal::Refusal;
use ferry_control::ticket::{AuthzClaims, SignedTicket};
use ferry_control::tls;

pub fn offer(vm: &str) -> Offer {
    Offer {
        vm: vm.into(),
        memory_bytes: 1 << 30,
        streams: 2,
        integrity: ferry_control::modes::Integrity::AeadSha256,
        guest: ferry_control::modes::GuestKind::Synthetic,
        vcpus: 1,
    }
}

/// Runs the request from `source` (trusting `roots_dir`'s CA) against `dest`;
/// returns (source result, destination result).
pub fn attempt(
    lab: &Lab,
    dest: &Destination,
    source: &Identity,
    roots_dir: &std::path::Path,
    ticket: &SignedTicket,
    claims: &AuthzClaims,
    offer: Offer,
) -> (
    Result<SourceSession, HandshakeError>,
    Result<DestinationSession, HandshakeError>,
) {
    attempt_on(lab, dest, source, roots_dir, ticket, claims, offer, 9)
}

/// [`attempt`], announcing `data_port` for the data streams.
#[allow(clippy::too_many_arguments)]
pub fn attempt_on(
    lab: &Lab,
    dest: &Destination,
    source: &Identity,
    roots_dir: &std::path::Path,
    ticket: &SignedTicket,
    claims: &AuthzClaims,
    offer: Offer,
    data_port: u16,
) -> (
    Result<SourceSession, HandshakeError>,
    Result<DestinationSession, HandshakeError>,
) {
    attempt_listening(lab, dest, source, roots_dir, ticket, claims, offer, move || {
        Ok((data_port, ()))
    })
}

/// [`attempt`], the destination opening its data listener with `listen`
/// once every check has passed.
#[allow(clippy::too_many_arguments)]
pub fn attempt_listening(
    lab: &Lab,
    dest: &Destination,
    source: &Identity,
    roots_dir: &std::path::Path,
    ticket: &SignedTicket,
    claims: &AuthzClaims,
    offer: Offer,
    listen: impl FnOnce() -> Result<(u16, ()), Refusal> + Send,
) -> (
    Result<SourceSession, HandshakeError>,
    Result<DestinationSession, HandshakeError>,
) {
    let _ = lab;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = tls::client_config(source, pki::roots(roots_dir).unwrap()).unwrap();
    std::thread::scope(|s| {
        let d = s.spawn(|| {
            let (sock, _) = listener.accept().unwrap();
            dest.admit_listening(sock, listen).map(|(a, ())| a)
        });
        let c = handshake::request(
            addr,
            &claims.dest_host,
            source,
            cfg,
            ticket,
            claims,
            offer,
            &[],
            Duration::from_secs(3),
        );
        (c, d.join().unwrap())
    })
}

pub fn setup() -> (Lab, Destination, SignedTicket, AuthzClaims, Identity) {
    let mut lab = Lab::start(POLICY).unwrap();
    let (t, c) = lab.tickets("operator", VM, DEST).unwrap();
    let dest = lab.destination(DEST, POLICY, 1 << 40).unwrap();
    let src = Identity::load(lab.dir.path(), Role::Host, SOURCE).unwrap();
    (lab, dest, t, c, src)
}

/// The destination's audit log's last entry: an audited refusal naming why.
pub fn last_audit(lab: &Lab) -> serde_json::Value {
    let text = std::fs::read_to_string(lab.dir.path().join(format!("audit-{DEST}.jsonl"))).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

pub fn refused_and_audited(
    lab: &Lab,
    r: &(
        Result<SourceSession, HandshakeError>,
        Result<DestinationSession, HandshakeError>,
    ),
    want: &str,
) {
    refused(r, want);
    let e = last_audit(lab);
    assert_eq!(e["event"], "refuse", "{e}");
    assert!(!e["detail"]["reason"].as_str().unwrap_or_default().is_empty(), "{e}");
    let dst = Identity::load(lab.dir.path(), Role::Host, DEST).unwrap();
    ferry_control::audit::verify_file(&lab.dir.path().join(format!("audit-{DEST}.jsonl")), dst.cert()).unwrap();
}

/// A refusal before the peer authenticated (its certificate did not
/// verify): not audited on its own but counted, and summarised in the
/// destination's log when it stops (or before its next audited event).
pub fn refused_and_counted(
    lab: &Lab,
    dest: Destination,
    r: &(
        Result<SourceSession, HandshakeError>,
        Result<DestinationSession, HandshakeError>,
    ),
    want: &str,
) {
    refused(r, want);
    drop(dest);
    let e = last_audit(lab);
    assert_eq!(e["event"], "unauthenticated", "{e}");
    assert_eq!(e["detail"]["count"], 1, "{e}");
    assert_eq!(e["detail"]["by_class"]["rejected"], 1, "{e}");
    assert!(e["detail"]["last_reason"].as_str().unwrap().contains(want), "{e}");
    let dst = Identity::load(lab.dir.path(), Role::Host, DEST).unwrap();
    ferry_control::audit::verify_file(&lab.dir.path().join(format!("audit-{DEST}.jsonl")), dst.cert()).unwrap();
}

pub fn refused(
    r: &(
        Result<SourceSession, HandshakeError>,
        Result<DestinationSession, HandshakeError>,
    ),
    want: &str,
) {
    let (c, d) = r;
    assert!(c.is_err() && d.is_err(), "admitted despite the attack");
    let text = format!(
        "source: {}; destination: {}",
        c.as_ref().err().map(ToString::to_string).unwrap_or_default(),
        d.as_ref().err().map(ToString::to_string).unwrap_or_default()
    );
    assert!(text.contains(want), "expected {want:?} in: {text}");
}
