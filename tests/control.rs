//! Attacks on the control plane, on real sockets with real certificates:
//! each must fail closed (no admission, so no data-plane keys exist and not
//! a page moves) with an error that says what was wrong.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::lab::{self, Lab, DEST, POLICY, SOURCE, VM};
use ferry_control::handshake::{self, HandshakeError};
use ferry_control::pki::{self, Identity, Role, Validity};
use ferry_control::ticket::{self, AuthzClaims, SignedTicket};
use ferry_control::tls;

mod common;
use common::control::*;

#[test]
fn the_honest_path_is_admitted_with_matching_keys() {
    let (lab, dest, t, c, src) = setup();
    let (s, d) = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_eq!(s.claims().migration_id, d.claims().migration_id);
    // Both sides derived the same keys: a data connection proves itself.
    let (mut a, mut b) = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    };
    let sk = ferry_engine::crypto::SessionKeys::from_grant(s.key_grant());
    let t = std::thread::spawn(move || ferry_engine::transport::prove_stream(&mut a, &sk, 1, Duration::from_secs(2)));
    assert_eq!(
        ferry_engine::transport::verify_stream(
            &mut b,
            &ferry_engine::crypto::SessionKeys::from_grant(d.key_grant()),
            Duration::from_secs(2)
        )
        .unwrap(),
        1
    );
    t.join().unwrap().unwrap();
}

#[test]
fn source_certificate_from_another_ca_is_refused() {
    let (lab, dest, t, c, _) = setup();
    let other = lab::LabDir::new().unwrap();
    pki::init(other.path(), &[SOURCE.into()]).unwrap();
    let impostor = Identity::load(other.path(), Role::Host, SOURCE).unwrap();
    // The impostor trusts the real CA (to reach the destination at all).
    let r = attempt(&lab, &dest, &impostor, lab.dir.path(), &t, &c, offer(VM));
    refused_and_counted(&lab, dest, &r, "control channel");
}

#[test]
fn destination_certificate_from_another_ca_is_refused_by_the_source() {
    let (lab, _, t, c, src) = setup();
    let other = lab::LabDir::new().unwrap();
    pki::init(other.path(), &[DEST.into()]).unwrap();
    // A rogue destination with a valid-looking certificate for "dst" from another CA.
    let rogue_id = Identity::load(other.path(), Role::Host, DEST).unwrap();
    let rogue = tls::server_config(&rogue_id, pki::roots(lab.dir.path()).unwrap()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        tls::Channel::accept(sock, rogue, Duration::from_secs(3)).map(|_| ())
    });
    let cfg = tls::client_config(&src, pki::roots(lab.dir.path()).unwrap()).unwrap();
    let r = handshake::request(addr, DEST, &src, cfg, &t, &c, offer(VM), &[], Duration::from_secs(3));
    handshake::audit_request(&lab.src_audit, &c, &r).unwrap();
    let e = r.expect_err("the source must refuse a destination certificate from another CA");
    let log = std::fs::read_to_string(lab.dir.path().join(lab::SOURCE_AUDIT)).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "request-refused", "{last}");
    assert!(e.to_string().contains("control channel"), "{e}");
    let _ = srv.join();
}

#[test]
fn expired_source_certificate_is_refused() {
    let (lab, dest, t, c, _) = setup();
    let now = i64::try_from(ferry_control::now_unix_s()).unwrap();
    pki::issue(
        lab.dir.path(),
        SOURCE,
        Role::Host,
        Validity {
            not_before_s: now - 10 * 86_400,
            not_after_s: now - 86_400,
        },
    )
    .unwrap();
    let expired = Identity::load(lab.dir.path(), Role::Host, SOURCE).unwrap();
    let r = attempt(&lab, &dest, &expired, lab.dir.path(), &t, &c, offer(VM));
    refused_and_counted(&lab, dest, &r, "control channel");
}

#[test]
fn valid_certificate_of_another_host_is_not_the_tickets() {
    let (lab, dest, t, c, _) = setup();
    pki::issue(lab.dir.path(), "evil", Role::Host, Validity::days(1)).unwrap();
    let evil = Identity::load(lab.dir.path(), Role::Host, "evil").unwrap();
    let r = attempt(&lab, &dest, &evil, lab.dir.path(), &t, &c, offer(VM));
    refused_and_audited(&lab, &r, "not the one named in the ticket");
}

#[test]
fn no_client_certificate_is_refused() {
    let (lab, dest, _, _, _) = setup();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let d = s.spawn(|| dest.admit(listener.accept().unwrap().0, 9));
        // A TLS client that presents no certificate at all.
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(pki::roots(lab.dir.path()).unwrap())
            .with_no_client_auth();
        let r = tls::Channel::connect(addr, DEST, Arc::new(cfg), Duration::from_secs(3)).and_then(|mut ch| {
            ch.send(&"hello")?;
            ch.recv::<serde_json::Value>()
        });
        assert!(r.is_err(), "a client without a certificate got an answer");
        let e = d.join().unwrap().expect_err("admitted without a client certificate");
        assert!(e.to_string().contains("control channel"), "{e}");
    });
}

#[test]
fn forged_ticket_signature_is_refused() {
    let (lab, dest, mut t, c, src) = setup();
    // Rewrite the claims (another VM) and keep the old signature.
    let mut forged = c.clone();
    forged.vm = "demo-other".into();
    use base64::Engine;
    t.body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
    let r = attempt(&lab, &dest, &src, lab.dir.path(), &t, &forged, offer("demo-other"));
    refused_and_audited(&lab, &r, "signature does not verify");
}

/// A ticket signed with the lab's real authz key but with chosen claims.
fn mint(lab: &Lab, f: impl FnOnce(&mut AuthzClaims), base: &AuthzClaims) -> (SignedTicket, AuthzClaims) {
    let mut c = base.clone();
    f(&mut c);
    let key = pki::signing_key(lab.dir.path(), "authz").unwrap();
    (ticket::sign("authz", &c, &key), c)
}

#[test]
fn expired_ticket_is_refused() {
    let (lab, dest, _, c, src) = setup();
    let (t, c) = mint(
        &lab,
        |c| {
            c.iat -= 600;
            c.exp = c.iat + 60;
            c.nonce = "expired".into();
        },
        &c,
    );
    let r = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    refused_and_audited(&lab, &r, "expired");
}

#[test]
fn ticket_for_another_vm_is_refused() {
    let (lab, dest, t, c, src) = setup();
    let r = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer("demo-other"));
    refused_and_audited(&lab, &r, "ticket is for VM");
}

#[test]
fn ticket_for_another_destination_is_refused() {
    let (lab, dest, _, c, src) = setup();
    pki::issue(lab.dir.path(), "dst2", Role::Host, Validity::days(1)).unwrap();
    // The ticket names dst2; the source connects to dst (whose certificate is
    // for dst): the source itself refuses, before a byte is sent.
    let (t, c2) = mint(&lab, |c| c.dest_host = "dst2".into(), &c);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = tls::client_config(&src, pki::roots(lab.dir.path()).unwrap()).unwrap();
    let r = handshake::request(
        listener.local_addr().unwrap(),
        DEST,
        &src,
        cfg,
        &t,
        &c2,
        offer(VM),
        &[],
        Duration::from_secs(3),
    );
    assert!(r
        .expect_err("must refuse")
        .to_string()
        .contains("ticket is for destination"));
    // And a destination refuses a ticket that names another host.
    let (s, d) = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    let _ = s;
    let e = d.expect_err("destination must refuse");
    assert!(e.to_string().contains("ticket is for destination"), "{e}");
}

#[test]
fn replayed_ticket_is_refused_also_after_a_destination_restart() {
    let (lab, dest, t, c, src) = setup();
    let first = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    assert!(first.0.is_ok() && first.1.is_ok());
    drop(first);
    let again = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    refused_and_audited(&lab, &again, "already used");
    // Restart: a new daemon over the same replay file.
    drop(dest);
    let restarted = lab.destination(DEST, POLICY, 1 << 40).unwrap();
    let after = attempt(&lab, &restarted, &src, lab.dir.path(), &t, &c, offer(VM));
    refused(&after, "already used");
}

#[test]
fn source_policy_denies() {
    let mut lab = Lab::start(POLICY).unwrap();
    let e = lab
        .tickets("operator", "prod-db", DEST)
        .expect_err("policy allows only demo-*");
    assert!(e.to_string().contains("no rule allows"), "{e}");
}

#[test]
fn destination_incoming_policy_denies() {
    let (lab, _, t, c, src) = setup();
    let closed = "[[incoming]]\nfrom = [\"someone-else\"]\nvms = [\"*\"]\n";
    let dest = lab.destination(DEST, closed, 1 << 40).unwrap();
    let r = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    refused_and_audited(&lab, &r, "incoming policy does not admit");
}

#[test]
fn admission_limits_refuse_what_does_not_fit() {
    let (mut lab, first, t, c, src) = setup();
    // Each destination below is a restart of "dst" with other limits: one
    // at a time (a second one on the same replay cache would not start).
    drop(first);
    // Memory: 1 GiB offered, 512 MiB allowed.
    let small = lab.destination(DEST, POLICY, 512 << 20).unwrap();
    let r = attempt(&lab, &small, &src, lab.dir.path(), &t, &c, offer(VM));
    refused(&r, "not enough memory");
    drop(small);
    // Concurrency: four admitted and still held, the fifth is refused.
    let dest = lab.destination(DEST, POLICY, 1 << 40).unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        let (t, c) = lab.tickets("operator", VM, DEST).unwrap();
        let (s, d) = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
        held.push((s.unwrap(), d.unwrap()));
    }
    let (t, c) = lab.tickets("operator", VM, DEST).unwrap();
    let r = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    refused_and_audited(&lab, &r, "busy");
    // Releasing one frees its slot.
    held.pop();
    let (t, c) = lab.tickets("operator", VM, DEST).unwrap();
    let (s, d) = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    assert!(s.is_ok() && d.is_ok());
    drop((held, s, d, dest));
    // A received guest that runs on keeps its memory reserved, but not its
    // concurrency slot.
    let tight = lab.destination(DEST, POLICY, (1 << 30) + (512 << 20)).unwrap();
    let (t1, c1) = lab.tickets("operator", VM, DEST).unwrap();
    let (_, d1) = attempt(&lab, &tight, &src, lab.dir.path(), &t1, &c1, offer(VM));
    let resident = d1.unwrap().into_memory_reservation();
    let (t2, c2) = lab.tickets("operator", VM, DEST).unwrap();
    let r = attempt(&lab, &tight, &src, lab.dir.path(), &t2, &c2, offer(VM));
    refused(&r, "not enough memory");
    drop(resident);
    let (t3, c3) = lab.tickets("operator", VM, DEST).unwrap();
    let (s3, d3) = attempt(&lab, &tight, &src, lab.dir.path(), &t3, &c3, offer(VM));
    assert!(s3.is_ok() && d3.is_ok(), "the memory came back when the guest went");
}

#[test]
fn garbage_and_truncated_control_messages_are_refused() {
    let (lab, dest, _, _, src) = setup();
    // Not TLS at all.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let d = s.spawn(|| dest.admit(listener.accept().unwrap().0, 9));
        let mut raw = TcpStream::connect(addr).unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n garbage garbage").unwrap();
        let e = d.join().unwrap().expect_err("garbage admitted");
        assert!(e.to_string().contains("control channel"), "{e}");
    });
    // Valid TLS, then a message that is not a request, then a truncated one.
    for bad in [
        &b"\x00\x00\x00\x05hello"[..],
        &b"\x00\x00\x10\x00{\"ticket\":"[..],
        &b"\xff\xff\xff\xff"[..],
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = tls::client_config(&src, pki::roots(lab.dir.path()).unwrap()).unwrap();
        std::thread::scope(|s| {
            let d = s.spawn(|| dest.admit(listener.accept().unwrap().0, 9));
            let sock = TcpStream::connect(addr).unwrap();
            let conn = rustls::ClientConnection::new(cfg, DEST.try_into().unwrap()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let _ = tls.write_all(bad);
            let _ = tls.flush();
            drop(tls); // truncation: close mid-message
            let e = d.join().unwrap().expect_err("a bad message was admitted");
            let text = e.to_string();
            assert!(
                text.contains("malformed") || text.contains("control channel") || text.contains("refused"),
                "{text}"
            );
        });
    }
}

#[test]
fn a_flood_of_bogus_handshakes_does_not_stop_a_legitimate_migration() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let (mut lab, dest, _, _, src) = setup();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(AtomicUsize::new(0));
    let a2 = admitted.clone();
    let daemon = handshake::serve_destination(
        listener,
        Arc::new(dest),
        handshake::ServeLimits::default(),
        Arc::new(move |_, _| {
            a2.fetch_add(1, Ordering::SeqCst);
        }),
        stop.clone(),
    )
    .unwrap();
    // 1000 bogus handshakes from another address (127.0.0.2): half connect
    // and stay silent (each would hold a handshake until its timeout), half
    // send junk. They are held open until the end.
    let mut flood = Vec::new();
    for i in 0..1000 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&"127.0.0.2:0".parse::<std::net::SocketAddr>().unwrap().into())
            .unwrap();
        if s.connect(&addr.into()).is_ok() {
            let mut t: TcpStream = s.into();
            if i % 2 == 1 {
                let _ = t.write_all(b"\x16\x03\x01\x00\x05junk");
            }
            flood.push(t);
        }
    }
    assert!(flood.len() > 900, "only {} flood connections opened", flood.len());
    // Meanwhile, a legitimate migration from 127.0.0.1.
    let (t, c) = lab.tickets("operator", VM, DEST).unwrap();
    let cfg = tls::client_config(&src, pki::roots(lab.dir.path()).unwrap()).unwrap();
    let start = Instant::now();
    let r = handshake::request(addr, DEST, &src, cfg, &t, &c, offer(VM), &[], Duration::from_secs(10));
    let took = start.elapsed();
    r.expect("the legitimate migration must be admitted during the flood");
    eprintln!("legitimate admission during a flood of 1000 bogus handshakes took {took:?}");
    // Issue #3: within 1 s under the flood (a functional bound; the figure is in PERF.md).
    assert!(took < Duration::from_secs(1), "admission took {took:?} under the flood");
    let deadline = Instant::now() + Duration::from_secs(5);
    while admitted.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 1);
    // The flood was refused at once, not queued: beyond the per-peer cap of
    // pending handshakes, the daemon closed the connections it accepted.
    std::thread::sleep(Duration::from_millis(300));
    let mut closed = 0;
    for t in &mut flood {
        t.set_nonblocking(true).unwrap();
        let mut b = [0u8; 64];
        match std::io::Read::read(t, &mut b) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    let limits = handshake::ServeLimits::default();
    assert!(
        closed >= flood.len() - limits.pending.per_peer - 8,
        "only {closed} of {} flood connections were refused at once",
        flood.len()
    );
    eprintln!("{closed} of {} flood connections refused at once", flood.len());
    drop(flood);
    stop.store(true, Ordering::SeqCst);
    daemon.join().unwrap();
}

#[test]
fn an_unpinned_destination_measurement_is_refused_by_the_source() {
    let (mut lab, dest, t, c, src) = setup();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = tls::client_config(&src, pki::roots(lab.dir.path()).unwrap()).unwrap();
    let pinned = [handshake::Measurement {
        binary_sha256: "00".repeat(32),
        config_sha256: "00".repeat(32),
    }];
    std::thread::scope(|s| {
        let d = s.spawn(|| dest.admit(listener.accept().unwrap().0, 9));
        let r = handshake::request(
            addr,
            DEST,
            &src,
            cfg.clone(),
            &t,
            &c,
            offer(VM),
            &pinned,
            Duration::from_secs(3),
        );
        let e = r.expect_err("the source must refuse a destination it cannot attest");
        assert!(e.to_string().contains("not among the pinned ones"), "{e}");
        let _ = d.join();
    });
    // Pinning the destination's real measurement is accepted.
    let (t2, c2) = lab.tickets("operator", VM, DEST).unwrap();
    let good = handshake::Measurement::of_self(POLICY.as_bytes()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let d = s.spawn(|| dest.admit(listener.accept().unwrap().0, 9));
        let r = handshake::request(
            addr,
            DEST,
            &src,
            cfg,
            &t2,
            &c2,
            offer(VM),
            &[good],
            Duration::from_secs(3),
        );
        assert!(r.is_ok(), "{:?}", r.err());
        assert!(d.join().unwrap().is_ok());
    });
}

fn manifest(c: &AuthzClaims, root: &[u8; 32]) -> handshake::Manifest {
    handshake::Manifest {
        migration_id: c.migration_id,
        vm: c.vm.clone(),
        memory_bytes: 1 << 30,
        pages_sent: 262_144,
        bytes_on_wire: 1 << 30,
        rounds: 3,
        started_unix_ms: 1,
        finished_unix_ms: 2,
        downtime_us: 1500,
        transcript_root: ferry_control::hex(root),
    }
}

#[test]
fn a_manifest_that_differs_from_what_was_received_gets_no_clean_receipt() {
    let (lab, dest, t, c, src) = setup();
    let (s, d) = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    let (mut s, mut d) = (s.unwrap(), d.unwrap());
    let dst_id = Identity::load(lab.dir.path(), Role::Host, DEST).unwrap();
    let received = [7u8; 32];
    let claimed = [8u8; 32];
    let m = manifest(&c, &claimed);
    std::thread::scope(|sc| {
        let h = sc.spawn(|| d.receive_manifest(&dst_id, &received));
        let e = s
            .exchange_manifest(&src, &m)
            .expect_err("a mismatching manifest must not be confirmed");
        assert!(e.to_string().contains("transcript"), "{e}");
        let e = h.join().unwrap().expect_err("the destination must refuse it");
        assert!(e.to_string().contains("transcript root differs"), "{e}");
    });
}

#[test]
fn a_manifest_signed_by_another_key_is_refused() {
    let (lab, dest, t, c, src) = setup();
    let (s, d) = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    let (mut s, mut d) = (s.unwrap(), d.unwrap());
    pki::issue(lab.dir.path(), "evil", Role::Host, Validity::days(1)).unwrap();
    let evil = Identity::load(lab.dir.path(), Role::Host, "evil").unwrap();
    let dst_id = Identity::load(lab.dir.path(), Role::Host, DEST).unwrap();
    let root = [1u8; 32];
    let m = manifest(&c, &root);
    std::thread::scope(|sc| {
        let h = sc.spawn(|| d.receive_manifest(&dst_id, &root));
        let _ = s.exchange_manifest(&evil, &m);
        let e = h
            .join()
            .unwrap()
            .expect_err("a manifest not signed by the source must be refused");
        assert!(e.to_string().contains("not signed by the peer's certificate"), "{e}");
    });
}

#[test]
fn a_guest_kind_the_destination_cannot_run_is_refused_at_admission() {
    let (lab, _, t, c, src) = setup();
    let dest = lab
        .destination_with(DEST, POLICY, 1 << 40, |c| {
            c.guests = vec![ferry_control::modes::GuestKind::Synthetic];
        })
        .unwrap();
    let mut o = offer(VM);
    o.guest = ferry_control::modes::GuestKind::Kvm;
    let r = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, o);
    refused_and_audited(
        &lab,
        &r,
        "this destination runs synthetic guests, the request offers a kvm guest",
    );
    // Typed on both sides: the destination's refusal, and its code and
    // blame as the source receives them.
    assert!(
        matches!(
            &r.1,
            Err(HandshakeError::Refused(
                ferry_control::refusal::Refusal::UnsupportedGuest { .. }
            ))
        ),
        "{:?}",
        r.1
    );
    match &r.0 {
        Err(HandshakeError::Denied(w)) => {
            assert_eq!(w.code, "unsupported_guest");
            assert_eq!(w.blame, Some(ferry_control::refusal::Blame::Peer));
        }
        other => panic!("the source did not receive a typed refusal: {other:?}"),
    }
}

#[test]
fn the_engine_refuses_a_configuration_other_than_the_admitted_offer() {
    let (lab, dest, t, c, src) = setup();
    let (s, d) = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    let (s, d) = (s.unwrap(), d.unwrap());
    let mem = ferry_engine::GuestMemory::new(1 << 22).unwrap();
    // The admitted offer says 2 streams and aead+sha256.
    let one_stream = ferry_engine::migrate::MigrationConfig {
        streams: 1,
        ..Default::default()
    };
    let no_digests = ferry_engine::migrate::MigrationConfig {
        integrity: ferry_engine::pipeline::Integrity::Aead,
        ..Default::default()
    };
    let data = TcpListener::bind("127.0.0.1:0").unwrap();
    let hooks = ferry_engine::progress::Hooks::new();
    let mut guest =
        ferry_vmm::workload::SyntheticGuest::incoming(Arc::new(ferry_engine::GuestMemory::new(1 << 22).unwrap()));
    for cfg in [&one_stream, &no_digests] {
        let e = ferry_engine::session::run_destination(&mem, &mut guest, &d, &data, cfg, &hooks).unwrap_err();
        assert!(
            e.to_string()
                .contains("the admitted offer has 2 streams and aead+sha256"),
            "{e}"
        );
        let mut tracker =
            ferry_engine::dirty::BitmapTracker::new(Arc::new(ferry_engine::bitmap::AtomicBitmap::new(mem.pages())));
        let ip = "127.0.0.1".parse().unwrap();
        let e = ferry_engine::session::run_source(&mem, &mut tracker, &mut guest, &s, ip, cfg, &hooks).unwrap_err();
        assert!(e.to_string().contains("the admitted offer"), "{e}");
    }
}

/// A peer that sends one byte of a TLS record just before each read would
/// time out used to hold its handshake — and its admission slot — without
/// end (the channel had per-read timeouts only). Each exchange has a
/// deadline now: the daemon closes the connection then, and the slot is
/// free for the next handshake from that peer.
#[test]
fn a_slow_drip_handshake_is_cut_at_the_deadline_and_frees_its_slot() {
    use std::sync::atomic::AtomicBool;
    let (lab, _, _, _, _) = setup();
    let per_op = Duration::from_millis(400);
    let dest = lab
        .destination_with(DEST, POLICY, 1 << 40, |c| c.io_timeout = per_op)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let limits = handshake::ServeLimits {
        pending: ferry_control::pending::PendingLimits {
            per_peer: 1,
            total: 256,
        },
        ..handshake::ServeLimits::default()
    };
    let daemon =
        handshake::serve_destination(listener, Arc::new(dest), limits, Arc::new(|_, _| {}), stop.clone()).unwrap();
    // Whether the daemon took a new connection from this peer into a
    // handshake (it then waits for a ClientHello) or closed it at once
    // (every slot of this peer is taken).
    let admitted_to_handshake = || {
        let mut t = TcpStream::connect(addr).unwrap();
        t.set_read_timeout(Some(Duration::from_millis(250))).unwrap();
        let mut b = [0u8; 1];
        matches!(std::io::Read::read(&mut t, &mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
    };
    let started = Instant::now();
    let mut drip = TcpStream::connect(addr).unwrap();
    // A TLS handshake record header announcing 512 bytes, then one byte per
    // 250 ms (each read of the daemon gets a byte within its 400 ms).
    drip.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !admitted_to_handshake(),
        "the dripping peer does not hold its only slot"
    );
    let deadline = per_op * ferry_control::tls::EXCHANGE_TIMEOUTS;
    let cut = loop {
        std::thread::sleep(Duration::from_millis(250));
        if drip.write_all(&[0x01]).is_err() || started.elapsed() > deadline * 4 {
            break started.elapsed();
        }
        // A closed connection shows on the read side first.
        drip.set_nonblocking(true).unwrap();
        let mut b = [0u8; 16];
        let closed = matches!(std::io::Read::read(&mut drip, &mut b), Ok(0))
            || matches!(std::io::Read::read(&mut drip, &mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        drip.set_nonblocking(false).unwrap();
        if closed {
            break started.elapsed();
        }
    };
    eprintln!("slow drip cut after {cut:?} (deadline {deadline:?})");
    assert!(cut >= deadline, "cut before the deadline: {cut:?}");
    assert!(
        cut < deadline + Duration::from_secs(1),
        "the drip held its slot past the deadline: {cut:?}"
    );
    // The slot is free again, once the refusal is audited (a signed,
    // fsync'd entry: slow on a loaded host, so polled up to 3 s).
    let freed = (0..30).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        admitted_to_handshake()
    });
    assert!(freed, "the slot was not freed after the deadline");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    daemon.join().unwrap();
}

#[test]
fn a_destination_without_authorization_keys_says_so() {
    let (lab, _, t, c, src) = setup();
    let dest = lab
        .destination_with(DEST, POLICY, 1 << 40, |c| c.authz_keys.clear())
        .unwrap();
    let r = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    refused_and_audited(&lab, &r, "no authorization server key configured");
}

/// The source gave the guest up and the destination runs it; then the
/// manifest never comes (the source's control channel dies). The
/// destination used to drop the running guest with its error — a VM lost
/// everywhere. It keeps it now, and says the receipt is missing.
#[test]
fn a_guest_received_without_its_receipt_keeps_running() {
    if ferry_engine::probe::io_uring()
        .and(ferry_engine::probe::uffd_wp())
        .is_err()
    {
        eprintln!("SKIPPED a_guest_received_without_its_receipt_keeps_running: io_uring or userfaultfd missing");
        return;
    }
    let (lab, dest, t, c, src) = setup();
    let data = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = data.local_addr().unwrap().port();
    let mut o = offer(VM);
    o.memory_bytes = 8 << 20;
    let (s, d) = attempt_on(&lab, &dest, &src, lab.dir.path(), &t, &c, o, port);
    let (s, d) = (s.unwrap(), d.unwrap());
    let me = Identity::load(lab.dir.path(), Role::Host, DEST).unwrap();
    let mem = Arc::new(ferry_engine::GuestMemory::new(8 << 20).unwrap());
    ferry_vmm::workload::fill(&mem, 1, 0.0);
    let cfg = ferry_engine::migrate::MigrationConfig {
        io_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let received = std::thread::scope(|sc| {
        let dst = sc.spawn(|| {
            ferry::destination::receive(d, &data, &me, Duration::from_secs(3), |_, m| {
                Ok(ferry_vmm::workload::SyntheticGuest::incoming(m))
            })
        });
        let mut guest = ferry_vmm::workload::SyntheticGuest::start(
            mem.clone(),
            ferry_vmm::workload::WorkloadConfig::default(),
            None,
        );
        let mut tracker = ferry_engine::dirty::UffdWpTracker::new(&mem).unwrap();
        let ip = "127.0.0.1".parse().unwrap();
        ferry_engine::session::run_source(&mem, &mut tracker, &mut guest, &s, ip, &cfg, &Default::default())
            .expect("the data plane completes");
        // The source dies before its manifest.
        drop(s);
        dst.join().unwrap()
    });
    let r = received.expect("the guest was received: it runs here");
    assert!(r.receipt.is_err(), "a receipt without a manifest");
    assert!(r.guest.is_running(), "the received guest does not run");
    assert_eq!(r.memory.digest(), mem.digest(), "the received memory differs");
}
