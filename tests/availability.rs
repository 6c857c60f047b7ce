//! Availability attacks on a destination, on real sockets: connections that
//! never authenticate must not take what an admitted migration needs (its
//! data port, its data streams), and an offer the destination cannot run is
//! refused before it is accepted, leaving the ticket usable.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferry::lab::VM;
use ferry_control::handshake::HandshakeError;
use ferry_control::modes::GuestKind;
use ferry_control::refusal::{Blame, Refusal};

mod common;
use common::control::*;
use common::procs::{free_ports, migrate_one, s, SourceDomain};

#[test]
fn slow_handshakes_do_not_take_the_data_ports() {
    if !common::host_ready("slow_handshakes_do_not_take_the_data_ports") {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let first = free_ports(4);
    let range = format!("{first}-{}", first + 3);
    let recv = dom.receive(&["--data-ports", &range]);
    let dest = recv.listening();
    // As many connections as there are data ports, each stuck before its
    // TLS handshake (they stay open for the whole test).
    let silent: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(dest).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let m = migrate_one(&dom, dest).unwrap();
    assert!(m.receipt.transcript_matches);
    let ev = recv.wait_for("received", Duration::from_secs(10));
    assert_eq!(ev["vm"], "demo-vm");
    drop(silent);
}

/// Connects to `port` over and over until `stop`: every other connection
/// answers the destination's nonce with junk of the right length, the
/// others stay silent (up to 32 held). Counts the nonces it read, which is
/// how often the destination took one of its connections for a proof.
fn pester(port: u16, stop: &AtomicBool, nonces: &AtomicU64) {
    let mut held = std::collections::VecDeque::new();
    let mut junk = true;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
            continue; // not listening yet (or any more)
        };
        if junk {
            c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let mut nonce = [0u8; 32];
            if c.read_exact(&mut nonce).is_ok() {
                nonces.fetch_add(1, Ordering::Relaxed);
                let _ = c.write_all(&[0x5a; 34]);
            }
        } else {
            held.push_back(c);
            if held.len() > 32 {
                held.pop_front();
            }
        }
        junk = !junk;
    }
}

#[test]
fn junk_data_connections_do_not_abort_an_admitted_migration() {
    if !common::host_ready("junk_data_connections_do_not_abort_an_admitted_migration") {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let port = free_ports(1);
    let recv = dom.receive(&["--data-ports", &format!("{port}-{port}")]);
    let dest = recv.listening();
    let (stop, nonces) = (AtomicBool::new(false), AtomicU64::new(0));
    std::thread::scope(|sc| {
        let attackers: Vec<_> = (0..2).map(|_| sc.spawn(|| pester(port, &stop, &nonces))).collect();
        // The attackers must land at least once while streams are being
        // proven; each migration, attacked or not, must go through.
        for attempt in 1..=5 {
            let m = migrate_one(&dom, dest).unwrap_or_else(|e| panic!("migration {attempt} under junk: {e}"));
            assert!(m.receipt.transcript_matches);
            recv.wait_for("received", Duration::from_secs(10));
            if nonces.load(Ordering::Relaxed) > 0 {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for a in attackers {
            a.join().unwrap();
        }
    });
    assert!(
        nonces.load(Ordering::Relaxed) > 0,
        "the junk connections never reached the data listener: the attack did not happen"
    );
}

#[test]
fn a_data_port_that_cannot_be_opened_is_a_busy_refusal_and_spends_no_ticket() {
    let (lab, dest, t, c, src) = setup();
    let r = attempt_listening(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM), || {
        Err(Refusal::NoDataPort {
            first: 7000,
            last: 7003,
        })
    });
    refused_and_audited(&lab, &r, "every data port 7000-7003 is in use");
    match &r.0 {
        Err(HandshakeError::Denied(w)) => {
            assert_eq!(w.code, "no_data_port");
            assert_eq!(w.blame, Some(Blame::Busy), "a retry may pass");
        }
        other => panic!("the source did not receive a typed refusal: {other:?}"),
    }
    // Nothing was held: the same ticket is admitted now.
    let (s, d) = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, offer(VM));
    assert!(s.is_ok() && d.is_ok(), "{:?} {:?}", s.err(), d.err());
}

#[test]
fn offers_that_cannot_run_are_refused_before_accept_and_spend_no_ticket() {
    let (lab, dest, t, c, src) = setup();
    let kvm = |vcpus| {
        let mut o = offer(VM);
        o.guest = GuestKind::Kvm;
        o.vcpus = vcpus;
        o
    };
    let mut zero = offer(VM);
    zero.memory_bytes = 0;
    let mut ragged = offer(VM);
    ragged.memory_bytes = (1 << 20) + 1;
    for (o, why) in [
        (zero, "guest memory of 0 bytes"),
        (ragged, "not a whole number of 4 KiB pages"),
        (kvm(0), "a KVM guest with no vCPU"),
        (kvm(100_000), "more vCPUs than KVM runs"),
    ] {
        let r = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, o);
        refused_and_audited(&lab, &r, why);
        match &r.0 {
            Err(HandshakeError::Denied(w)) => assert_eq!(w.code, "unrunnable"),
            other => panic!("the source did not receive a typed refusal: {other:?}"),
        }
    }
    // None of them spent the ticket's nonce.
    let (s, d) = attempt(&lab, &dest, &src, lab.dir.path(), &t, &c, kvm(2));
    assert!(s.is_ok() && d.is_ok(), "{:?} {:?}", s.err(), d.err());
}

/// `MemAvailable` of this host now, in bytes.
fn mem_available_bytes() -> u64 {
    ferry::host::HostMemory::read().unwrap().available_bytes
}

#[test]
fn an_offer_larger_than_the_hosts_memory_is_refused_by_default() {
    if !common::host_ready("an_offer_larger_than_the_hosts_memory_is_refused_by_default") {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let before = mem_available_bytes();
    let recv = dom.receive(&[]);
    let l = recv.wait_for("listening", Duration::from_secs(20));
    let dest: SocketAddr = l["addr"].as_str().unwrap().parse().unwrap();
    let cap = l["max_memory_bytes"].as_u64().unwrap();
    assert_eq!(l["max_memory_from"], "host", "{l}");
    // The default follows the host, not a fixed figure: below what was
    // available when the daemon started (with the host's reserve kept).
    let after = mem_available_bytes();
    assert!(cap < before.max(after), "cap {cap} B, available {before}..{after} B");
    // A source claiming a guest one page larger than the cap is refused
    // before anything is accepted or prefaulted.
    let mut big = offer(VM);
    big.memory_bytes = (cap / 4096 + 1) * 4096;
    match dom.request(dest, big, &[]) {
        Err(HandshakeError::Denied(w)) => assert_eq!(w.code, "no_memory", "{w:?}"),
        other => panic!("an offer above the host's memory was not refused: {:?}", other.err()),
    }
    // A guest that fits still moves.
    let m = migrate_one(&dom, dest).unwrap();
    assert!(m.receipt.transcript_matches);
}

#[test]
fn a_junk_tls_flood_is_one_audit_summary_not_an_entry_per_connection() {
    if !common::host_ready("a_junk_tls_flood_is_one_audit_summary_not_an_entry_per_connection") {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let recv = dom.receive(&[]);
    let dest = recv.listening();
    // 200 connections that never authenticate: half send junk where a TLS
    // ClientHello belongs, half close at once. Each waits for the daemon to
    // close it, so all were handled before the migration below.
    const FLOOD: u64 = 200;
    for i in 0..FLOOD {
        let mut c = TcpStream::connect(dest).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if i % 2 == 0 {
            let _ = c.write_all(&[0x5a; 64]);
        } else {
            let _ = c.shutdown(std::net::Shutdown::Write);
        }
        let _ = c.read_to_end(&mut Vec::new());
    }
    std::thread::sleep(Duration::from_millis(200));
    // A real migration is audited entry by entry, after the flood's summary.
    migrate_one(&dom, dest).unwrap();
    recv.wait_for("received", Duration::from_secs(10));
    let log = dom.receive_audit_path();
    let entries = dom.receive_audit();
    let summaries: Vec<&serde_json::Value> = entries.iter().filter(|e| e["event"] == "unauthenticated").collect();
    let counted: u64 = summaries.iter().map(|e| e["detail"]["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, FLOOD, "{summaries:?}");
    assert_eq!(summaries[0]["detail"]["peers"]["127.0.0.1"], FLOOD);
    assert!(
        entries.iter().all(|e| e["detail"]["code"] != "tls"),
        "an unauthenticated failure was audited on its own"
    );
    // open, the summary, admit, received (and nothing per connection).
    assert!(entries.len() < 8, "{} entries: {entries:?}", entries.len());
    let admit = entries.iter().position(|e| e["event"] == "admit").unwrap();
    let first = entries.iter().position(|e| e["event"] == "unauthenticated").unwrap();
    assert!(first < admit, "the summary comes before the next audited event");
    let o = common::procs::ferry(&[
        "audit",
        "verify",
        s(&log),
        "--cert",
        s(&dom.pki.join("hosts/dst/cert.pem")),
    ]);
    assert!(o.status.success(), "{}", common::procs::text(&o));
}

/// A TCP connection to `to` from the loopback address `from`.
fn connect_from(from: std::net::Ipv4Addr, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// Whether the daemon closed `c` at once (rather than holding it in a
/// handshake, waiting for a ClientHello).
fn closed_at_once(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    match c.read(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[test]
fn slow_handshakes_from_many_addresses_do_not_starve_a_newcomer() {
    if !common::host_ready("slow_handshakes_from_many_addresses_do_not_starve_a_newcomer") {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let recv = dom.receive(&[]);
    let dest = recv.listening();
    // 32 addresses × 8 silent handshakes: every one of the destination's
    // 256 handshake slots, each address at its own cap.
    let attackers: Vec<std::net::Ipv4Addr> = (2..34).map(|i| std::net::Ipv4Addr::new(127, 0, 0, i)).collect();
    let mut held: Vec<TcpStream> = Vec::new();
    for &a in &attackers {
        held.extend((0..8).map(|_| connect_from(a, dest)));
    }
    std::thread::sleep(Duration::from_millis(300));
    // One more from an attacker is over its own cap: closed at once.
    let mut extra = connect_from(attackers[0], dest);
    assert!(closed_at_once(&mut extra), "a peer got a ninth handshake slot");
    // The authorization server caps each peer too: eight silent
    // connections from one address, and the ninth is closed at once.
    let authz: SocketAddr = dom.authz_addr.parse().unwrap();
    let silent: Vec<TcpStream> = (0..8).map(|_| connect_from(attackers[0], authz)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut ninth = connect_from(attackers[0], authz);
    assert!(
        closed_at_once(&mut ninth),
        "the authz server gave one peer a ninth connection"
    );
    // A migration from another address goes through both (it takes the
    // oldest slot of a peer holding the most).
    let m = migrate_one(&dom, dest).unwrap();
    assert!(m.receipt.transcript_matches);
    recv.wait_for("received", Duration::from_secs(10));
    // The connection closed unheard is in the audit log's summary.
    let summary = dom
        .receive_audit()
        .into_iter()
        .find(|e| e["event"] == "unauthenticated")
        .unwrap();
    assert!(
        summary["detail"]["by_class"]["crowded"].as_u64() >= Some(1),
        "{summary}"
    );
    drop((held, silent));
}

#[test]
fn a_receipt_anchors_the_destinations_audit_log_against_a_cut_and_a_deleted_head() {
    if !common::host_ready("a_receipt_anchors_the_destinations_audit_log_against_a_cut_and_a_deleted_head") {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let mut recv = dom.receive(&[]);
    let dest = recv.listening();
    let m = migrate_one(&dom, dest).unwrap();
    recv.wait_for("received", Duration::from_secs(10));
    let head = m
        .receipt
        .audit_head
        .clone()
        .expect("the receipt names the destination's audit head");
    recv.child.kill().unwrap();
    recv.child.wait().unwrap();
    let log = dom.receive_audit_path();
    let cert = dom.pki.join("hosts/dst/cert.pem");
    let expect = head.to_string();
    let verify = |extra: &[&str]| {
        let mut args = vec!["audit", "verify", s(&log), "--cert", s(&cert)];
        args.extend_from_slice(extra);
        common::procs::ferry(&args)
    };
    assert!(verify(&["--expect", &expect]).status.success());
    // Whoever cuts the log back to before the admission and deletes its
    // head file too leaves a valid chain; the receipt the source keeps
    // still shows the cut.
    let text = std::fs::read_to_string(&log).unwrap();
    let kept: String = text
        .lines()
        .take(usize::try_from(head.seq).unwrap())
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&log, kept).unwrap();
    std::fs::remove_file(ferry_control::audit::head_path(&log)).unwrap();
    assert!(verify(&[]).status.success(), "the chain alone cannot show a cut end");
    let o = verify(&["--expect", &expect]);
    assert!(!o.status.success());
    assert!(
        common::procs::text(&o).contains("entries were removed"),
        "{}",
        common::procs::text(&o)
    );
}
