//! The daemons as separate processes, as on real hosts: `ferry serve authn`,
//! `ferry serve authz` and `ferry receive`, with a source that embeds ferry
//! (this test) migrating a running guest to them; then the audit logs
//! checked with `ferry audit verify`, and the replay cache surviving a
//! daemon restart.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ferry::source;
use ferry_engine::dirty::UffdWpTracker;
use ferry_engine::migrate::MigrationConfig;
use ferry_engine::progress::Hooks;
use ferry_engine::GuestMemory;
use ferry_vmm::workload::{SyntheticGuest, WorkloadConfig};

mod common;
use common::procs::{s, Proc, SourceDomain};

fn ferry_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn migrate_to_real_daemons_and_audit() {
    if !common::host_ready("migrate_to_real_daemons_and_audit") {
        return;
    }
    // A lab PKI and policy, and the source domain's authn and authz servers.
    let dom = SourceDomain::start(None, "127.0.0.1");
    let (d, pki, policy) = (dom.dir.path(), &dom.pki, &dom.policy);
    let authz_audit = d.join("authz.jsonl");
    let state = d.join("dst-state");
    let recv_args = [
        "receive",
        "--pki",
        s(pki),
        "--name",
        "dst",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        s(policy),
        "--state-dir",
        s(&state),
    ];
    let recv = Proc::start(None, &recv_args);
    let dest = recv.listening();

    // The source: a running guest, migrated by the library.
    let mem = Arc::new(GuestMemory::new(32 << 20).unwrap());
    let wl = WorkloadConfig {
        hot_set_bytes: 4 << 20,
        dirty_rate_pages_per_s: 20_000,
        ..WorkloadConfig::default()
    };
    let mut guest = SyntheticGuest::start(mem.clone(), wl, None);
    let mut tracker = UffdWpTracker::new(&mem).unwrap();
    let at = dom.endpoints(dest);
    let cfg = MigrationConfig {
        io_timeout: Duration::from_secs(5),
        ..MigrationConfig::default()
    };
    let source::Migrated { report, receipt, .. } =
        source::migrate(&at, "demo-vm", &mem, &mut tracker, &mut guest, &cfg, &Hooks::new()).unwrap();
    assert!(receipt.transcript_matches);
    assert!(
        !guest.is_running(),
        "the source guest must stay paused after the commit"
    );
    let ev = recv.wait_for("received", Duration::from_secs(10));
    assert_eq!(ev["vm"], "demo-vm");
    assert_eq!(ev["pages"], report.pages_sent);
    assert_eq!(ev["transcript_matches"], true);

    // A VM the policy does not allow: refused by the authorization server.
    drop(tracker);
    let mem2 = Arc::new(GuestMemory::new(8 << 20).unwrap());
    let mut g2 = SyntheticGuest::start(mem2.clone(), WorkloadConfig::default(), None);
    let mut t2 = UffdWpTracker::new(&mem2).unwrap();
    let e = source::migrate(&at, "prod-db", &mem2, &mut t2, &mut g2, &cfg, &Hooks::new()).unwrap_err();
    // Typed: which server refused, with its code and whose fault it is.
    match &e {
        source::SourceError::Refused { what, refusal } => {
            assert_eq!(*what, "authorization");
            assert_eq!(refusal.code, "policy", "{e}");
            assert_eq!(refusal.blame, Some(ferry_control::refusal::Blame::Peer));
        }
        other => panic!("expected the authorization server's refusal, got {other}"),
    }
    assert!(e.to_string().contains("the authorization server refused"), "{e}");
    assert!(g2.is_running());
    drop((g2, t2));

    // Both audit logs verify with `ferry audit verify`.
    let out = ferry_ok(&[
        "audit",
        "verify",
        s(&authz_audit),
        "--cert",
        s(&pki.join("hosts/src/cert.pem")),
    ]);
    assert!(out.contains("3 entries"), "open + allow + deny: {out}");
    let out = ferry_ok(&[
        "audit",
        "verify",
        s(&state.join("audit.jsonl")),
        "--cert",
        s(&pki.join("hosts/dst/cert.pem")),
    ]);
    assert!(out.contains("3 entries"), "open + admit + received: {out}");

    // The used ticket nonce is on disk and survives a daemon restart (a
    // replay against a restarted destination: tests/control.rs).
    drop(recv);
    let recv2 = Proc::start(None, &recv_args);
    recv2.listening();
    let journal = std::fs::read_to_string(state.join("replay")).unwrap();
    assert_eq!(journal.lines().count(), 1, "the used nonce is on disk");
}

/// CPU time (user + system) of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A ticket server that runs out of descriptors used to retry `accept` in
/// a tight loop (the connection stays queued, so every retry fails at
/// once): a full core burnt until the shortage ended. It backs off now, and
/// serves again when descriptors are free.
#[test]
fn a_server_out_of_descriptors_backs_off_instead_of_spinning() {
    let name = "a_server_out_of_descriptors_backs_off_instead_of_spinning";
    if !common::skip_unless(name, &[("prlimit (util-linux)", common::program("prlimit"))]) {
        return;
    }
    let dir = ferry::lab::LabDir::new().unwrap();
    let pki = dir.path().join("pki");
    ferry_ok(&["pki", "init", "--out", s(&pki), "--hosts", "src,dst"]);
    let mut p = Proc::start(
        None,
        &[
            "serve",
            "authn",
            "--pki",
            s(&pki),
            "--name",
            "src",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let addr = p.listening();
    let pid = p.child.id();
    // The limit: exactly the descriptors open now, so the next accept fails
    // with EMFILE (fds are allocated lowest first; allow for a gap or two by
    // queueing several connections).
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let set = |soft: usize| {
        let ok = Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
            .status()
            .unwrap();
        assert!(ok.success(), "prlimit failed");
    };
    set(open);
    let clients: Vec<_> = (0..8).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(1500));
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop uses ~150 ticks (100 per second of a core).
    assert!(
        used < 40,
        "the server used {used} ticks in 1.5 s while out of descriptors: it spins"
    );
    // Descriptors back: the server is alive and accepts again.
    set(1024);
    drop(clients);
    let again = std::net::TcpStream::connect(addr);
    assert!(again.is_ok(), "the server stopped listening: {again:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(p.child.try_wait().unwrap().is_none(), "the server exited");
}
