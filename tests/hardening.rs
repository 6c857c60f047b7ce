//! Attacks on the daemons' audit logs and names (issue 14, items 1 and 12),
//! each against real `ferry serve authz` and `ferry receive` processes over
//! mutual TLS on loopback, by a host holding a certificate from the CA but no
//! ticket: oversized peer strings must not make a log its own verifier
//! rejects (which used to stop the daemon from restarting); a damaged log
//! is sealed and a new segment starts; VM ids and host names outside the
//! documented set are refused before they reach a policy, a log or a file.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use ferry_control::handshake::{MigrationRequest, Offer, RequestReply};
use ferry_control::pki::{self, Identity, Role};
use ferry_control::servers::{self, ServerReply, ServerRequest};
use ferry_control::ticket::SignedTicket;
use ferry_control::tls::{self, Channel};

mod common;
use common::procs::{ferry, s, text, Proc};

const WAIT: Duration = Duration::from_secs(5);

/// A lab PKI (hosts src and dst) and policy in a fresh directory.
fn lab() -> ferry::lab::LabDir {
    let dir = ferry::lab::LabDir::new().unwrap();
    let o = ferry(&["pki", "init", "--out", s(&dir.path().join("pki")), "--hosts", "src,dst"]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::write(dir.path().join("policy.toml"), ferry::lab::POLICY).unwrap();
    dir
}

fn authz(d: &Path) -> Proc {
    Proc::start(None, &strs(&authz_args(d)))
}

/// Borrowed arguments for `Proc::start` and `ferry`.
fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn authz_args(d: &Path) -> Vec<String> {
    let (pki, policy, audit) = (d.join("pki"), d.join("policy.toml"), d.join("authz.jsonl"));
    let a = [
        "--pki",
        s(&pki),
        "--name",
        "src",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        s(&policy),
    ];
    [&["serve", "authz"][..], &a, &["--audit", s(&audit)]]
        .concat()
        .into_iter()
        .map(String::from)
        .collect()
}

fn receive(d: &Path) -> Proc {
    Proc::start(None, &strs(&receive_args(d)))
}

fn receive_args(d: &Path) -> Vec<String> {
    let (pki, policy, state) = (d.join("pki"), d.join("policy.toml"), d.join("dst-state"));
    let a = [
        "--pki",
        s(&pki),
        "--name",
        "dst",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        s(&policy),
    ];
    [&["receive"][..], &a, &["--state-dir", s(&state)]]
        .concat()
        .into_iter()
        .map(String::from)
        .collect()
}

/// The mutual-TLS client config of host `src`.
fn client(d: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    let pki = d.join("pki");
    let id = Identity::load(&pki, Role::Host, "src").unwrap();
    tls::client_config(&id, pki::roots(&pki).unwrap()).unwrap()
}

fn bogus_ticket(kind: &str) -> SignedTicket {
    SignedTicket {
        kind: kind.into(),
        body: "e30".into(),
        sig: "AAAA".into(),
    }
}

/// Asks the authorization server for a ticket for `vm` to `dest_host`.
fn ask_authz(d: &Path, at: std::net::SocketAddr, vm: &str, dest_host: &str) -> ferry_control::refusal::WireRefusal {
    let req = ServerRequest::Authz {
        authn: bogus_ticket("authn"),
        vm: vm.into(),
        dest_host: dest_host.into(),
    };
    match servers::ask(at, "src", client(d), &req, WAIT).unwrap() {
        ServerReply::Deny(w) => w,
        ServerReply::Ticket { .. } => panic!("a ticket for {vm:?}"),
    }
}

fn verify(log: &Path, cert: &Path) -> String {
    let o = ferry(&["audit", "verify", s(log), "--cert", s(cert)]);
    assert!(o.status.success(), "{}: {}", log.display(), text(&o));
    text(&o)
}

#[test]
fn an_oversized_authz_request_leaves_a_log_that_verifies_and_a_daemon_that_restarts() {
    let lab = lab();
    let d = lab.path();
    let server = authz(d);
    let at = server.listening();
    // The attack as found: a 40,000-character VM id, a 25,000-character
    // destination, and no valid ticket.
    let w = ask_authz(d, at, &"v".repeat(40_000), &"d".repeat(25_000));
    assert_eq!(w.code, "bad_name", "{w}");
    assert!(
        w.reason.len() < 1024,
        "the refusal repeats the peer's text: {} bytes",
        w.reason.len()
    );
    // And a ticket whose kind is 30,000 quotes, with a valid name.
    let w = ask_authz(d, at, "demo-vm", "dst");
    assert_eq!(w.code, "bad_ticket", "{w}");
    let req = ServerRequest::Authz {
        authn: bogus_ticket(&"\"".repeat(30_000)),
        vm: "demo-vm".into(),
        dest_host: "dst".into(),
    };
    let ServerReply::Deny(w) = servers::ask(at, "src", client(d), &req, WAIT).unwrap() else {
        panic!("a ticket for a forged one");
    };
    assert!(w.reason.len() < 1024, "{} bytes", w.reason.len());
    drop(server);

    let log = d.join("authz.jsonl");
    let out = verify(&log, &d.join("pki/hosts/src/cert.pem"));
    assert!(out.contains("4 entries"), "open + three denies: {out}");
    // The daemon starts again on its log, and answers.
    let again = authz(d);
    let w = ask_authz(d, again.listening(), "demo-vm", "dst");
    assert_eq!(w.code, "bad_ticket", "{w}");
    assert!(std::fs::read_dir(d)
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().contains("damaged")));
}

#[test]
fn an_oversized_ticket_kind_at_the_destination_leaves_a_log_that_verifies() {
    let lab = lab();
    let d = lab.path();
    let recv = receive(d);
    let at = recv.listening();
    let req = MigrationRequest {
        ticket: bogus_ticket(&"\"".repeat(30_000)),
        offer: Offer {
            vm: "demo-vm".into(),
            memory_bytes: 32 << 20,
            streams: 1,
            ..Offer::default()
        },
        sig: "AAAA".into(),
    };
    let mut ch = Channel::connect(at, "dst", client(d), WAIT).unwrap();
    ch.send(&req).unwrap();
    match ch.recv::<RequestReply>().unwrap() {
        RequestReply::Deny(w) => {
            assert_eq!(w.code, "bad_ticket", "{w}");
            assert!(w.reason.len() < 1024, "{} bytes", w.reason.len());
        }
        other => panic!("admitted a forged ticket: {other:?}"),
    }
    drop(ch);
    drop(recv);
    let log = d.join("dst-state/audit.jsonl");
    verify(&log, &d.join("pki/hosts/dst/cert.pem"));
    receive(d).listening();
}

#[test]
fn a_damaged_audit_log_is_sealed_and_the_daemon_starts_a_linked_segment() {
    let lab = lab();
    let d = lab.path();
    let server = authz(d);
    ask_authz(d, server.listening(), "demo-vm", "dst");
    drop(server);
    let log = d.join("authz.jsonl");
    let cert = d.join("pki/hosts/src/cert.pem");
    // An edit of the deny entry.
    let good = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, good.replace("demo-vm", "other-vm")).unwrap();
    assert!(!ferry(&["audit", "verify", s(&log), "--cert", s(&cert)])
        .status
        .success());

    let again = authz(d);
    let w = ask_authz(d, again.listening(), "demo-vm", "dst");
    assert_eq!(w.code, "bad_ticket", "the restarted server answers: {w}");
    drop(again);
    // The damaged log is kept aside, read-only, as it was found; the new
    // segment verifies and names it.
    let aside: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.to_string_lossy().contains("authz.jsonl.damaged-") && p.extension() != Some(std::ffi::OsStr::new("head"))
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read_to_string(&aside[0]).unwrap(),
        good.replace("demo-vm", "other-vm")
    );
    let out = verify(&log, &cert);
    assert!(out.contains("2 entries"), "open + deny: {out}");
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&log).unwrap().lines().next().unwrap()).unwrap();
    let prev = &first["detail"]["previous_segment"];
    assert_eq!(
        prev["file"].as_str().unwrap(),
        aside[0].file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(prev["entries_verified"], 1, "{prev}");
    assert!(prev["broken"].as_str().unwrap().contains("line 2"), "{prev}");
    assert!(out.contains("previous segment") && out.contains("intact"), "{out}");
    // The sealed file is evidence: a change to it shows.
    std::fs::write(&aside[0], "rewritten\n").unwrap();
    let o = ferry(&["audit", "verify", s(&log), "--cert", s(&cert)]);
    assert!(
        !o.status.success() && text(&o).contains("CHANGED after it was sealed"),
        "{}",
        text(&o)
    );
}

#[test]
fn vm_ids_that_could_forge_a_log_line_or_escape_a_glob_are_refused_at_authz() {
    let lab = lab();
    let d = lab.path();
    let server = authz(d);
    let at = server.listening();
    for vm in [
        "demo-vm\n{\"seq\":9,\"event\":\"allow\"}",
        "demo-/../etc",
        "demo-..",
        "demo-\u{202e}mv-omed",
        "demo-\u{1b}[2J",
    ] {
        let w = ask_authz(d, at, vm, "dst");
        assert_eq!(w.code, "bad_name", "{vm:?}: {w}");
        assert!(!w.reason.contains('\n') && !w.reason.contains('\u{202e}') && !w.reason.contains('\u{1b}'));
    }
    let w = ask_authz(d, at, "demo-vm", "dst\nx");
    assert_eq!(w.code, "bad_name", "{w}");
    drop(server);
    let log = d.join("authz.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 7, "one line per decision, none forged");
    verify(&log, &d.join("pki/hosts/src/cert.pem"));
}

#[test]
fn a_second_daemon_on_the_same_state_dir_or_audit_log_refuses_to_start() {
    let dir = lab();
    let d = dir.path();
    // A second destination on one state directory would admit a ticket the
    // first has spent (its replay cache is read only at start) and fork the
    // audit chain; a second authz server on one audit file, the same.
    let first = receive(d);
    first.listening();
    let o = ferry(&strs(&receive_args(d)));
    let why = text(&o);
    assert!(
        !o.status.success(),
        "a second destination started on the same state dir: {why}"
    );
    assert!(
        why.contains("replay cache") && why.contains(&format!("in use by process {}", first.child.id())),
        "{why}"
    );
    let authz1 = authz(d);
    let at = authz1.listening();
    let o = ferry(&strs(&authz_args(d)));
    let why = text(&o);
    assert!(
        !o.status.success(),
        "a second authz server started on the same audit log: {why}"
    );
    assert!(
        why.contains("audit log") && why.contains(&format!("in use by process {}", authz1.child.id())),
        "{why}"
    );
    // The first ones still serve, and their logs are whole.
    let w = ask_authz(d, at, "demo-vm", "dst");
    assert_eq!(w.code, "bad_ticket", "{w:?}");
    assert!(verify(&d.join("authz.jsonl"), &d.join("pki/hosts/src/cert.pem")).contains("verified"));
    // Once the first destination is gone, its state directory is free.
    drop(first);
    receive(d).listening();
}

#[test]
fn cutting_the_end_of_an_audit_log_is_caught_and_the_daemon_does_not_append_after_it() {
    for cut in [1usize, 3] {
        let lab = lab();
        let d = lab.path();
        let server = authz(d);
        let at = server.listening();
        for _ in 0..4 {
            ask_authz(d, at, "demo-vm", "dst");
        }
        drop(server);
        let log = d.join("authz.jsonl");
        let cert = d.join("pki/hosts/src/cert.pem");
        let whole = verify(&log, &cert);
        assert!(
            whole.contains("5 entries") && whole.contains("reaches its signed head"),
            "{whole}"
        );
        // The last `cut` entries deleted: still a valid chain, but short of
        // its signed head.
        let full = std::fs::read_to_string(&log).unwrap();
        let kept: String = full.lines().take(5 - cut).map(|l| format!("{l}\n")).collect();
        std::fs::write(&log, &kept).unwrap();
        let o = ferry(&["audit", "verify", s(&log), "--cert", s(&cert)]);
        assert!(!o.status.success(), "cut {cut}: {}", text(&o));
        assert!(text(&o).contains("entries were removed from its end"), "{}", text(&o));
        // The server refuses to start on it (and so appends nothing).
        let o = ferry(&strs(&authz_args(d)));
        assert!(!o.status.success(), "cut {cut}: the daemon started on a cut log");
        assert!(text(&o).contains("entries were removed"), "{}", text(&o));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), kept, "something was appended");
    }
}
