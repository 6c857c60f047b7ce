//! The daemons as separate processes, as on real hosts: `ferry serve authn`,
//! `ferry serve authz` and `ferry receive`, with a source that embeds ferry
//! (this test) migrating a running guest to them; then the audit logs
//! checked with `ferry audit verify`, and the replay cache surviving a
//! daemon restart.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry::source::{self, Endpoints};
use ferry_engine::dirty::UffdWpTracker;
use ferry_engine::migrate::MigrationConfig;
use ferry_engine::progress::Hooks;
use ferry_engine::workload::{SyntheticGuest, WorkloadConfig};
use ferry_engine::GuestMemory;

/// A child process killed on drop, with its stdout event lines.
struct Daemon {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Daemon {
    fn start(args: &[&str]) -> (Daemon, SocketAddr) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            out: BufReader::new(child.stdout.take().unwrap()),
            child,
        };
        let first = d.next_event();
        assert_eq!(first["event"], "listening", "{first}");
        let addr = first["addr"].as_str().unwrap().parse().unwrap();
        (d, addr)
    }

    fn next_event(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not an event line ({e}): {line:?}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ferry_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn migrate_to_real_daemons_and_audit() {
    if let Err(why) = ferry_engine::probe::io_uring().and(ferry_engine::probe::uffd_wp()) {
        eprintln!("SKIPPED migrate_to_real_daemons_and_audit: {why}");
        return;
    }
    let dir = ferry::lab::LabDir::new().unwrap();
    let d = dir.path();
    let pki = d.join("pki");
    ferry_ok(&["pki", "init", "--out", s(&pki), "--hosts", "src,dst"]);
    let policy = d.join("policy.toml");
    std::fs::write(&policy, ferry::lab::POLICY).unwrap();
    let authz_audit = d.join("authz-audit.jsonl");
    let state = d.join("dst-state");
    let lo = "127.0.0.1:0";
    let (_authn, authn) = Daemon::start(&["serve", "authn", "--pki", s(&pki), "--name", "src", "--listen", lo]);
    let (_authz, authz) = Daemon::start(&[
        "serve",
        "authz",
        "--pki",
        s(&pki),
        "--name",
        "src",
        "--listen",
        lo,
        "--policy",
        s(&policy),
        "--audit",
        s(&authz_audit),
    ]);
    let recv_args = [
        "receive",
        "--pki",
        s(&pki),
        "--name",
        "dst",
        "--listen",
        lo,
        "--policy",
        s(&policy),
        "--state-dir",
        s(&state),
    ];
    let (mut recv, dest) = Daemon::start(&recv_args);

    // The source: a running guest, migrated by the library.
    let mem = Arc::new(GuestMemory::new(32 << 20).unwrap());
    let wl = WorkloadConfig {
        hot_set_bytes: 4 << 20,
        dirty_rate_pages_per_s: 20_000,
        ..WorkloadConfig::default()
    };
    let mut guest = SyntheticGuest::start(mem.clone(), wl, None);
    let mut tracker = UffdWpTracker::new(&mem).unwrap();
    let at = Endpoints {
        pki: &pki,
        host: "src",
        client: "operator",
        authn,
        authz,
        servers_name: "src",
        dest,
        dest_host: "dst",
        audit: None,
    };
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
    let ev = recv.next_event();
    assert_eq!(ev["event"], "received", "{ev}");
    assert_eq!(ev["vm"], "demo-vm");
    assert_eq!(ev["pages"], report.pages_sent);
    assert_eq!(ev["transcript_matches"], true);

    // A VM the policy does not allow: refused by the authorization server.
    drop(tracker);
    let mem2 = Arc::new(GuestMemory::new(8 << 20).unwrap());
    let mut g2 = SyntheticGuest::start(mem2.clone(), WorkloadConfig::default(), None);
    let mut t2 = UffdWpTracker::new(&mem2).unwrap();
    let e = source::migrate(&at, "prod-db", &mem2, &mut t2, &mut g2, &cfg, &Hooks::new()).unwrap_err();
    assert!(e.contains("authorization server refused"), "{e}");
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
    let (_recv2, _) = Daemon::start(&recv_args);
    let journal = std::fs::read_to_string(state.join("replay")).unwrap();
    assert_eq!(journal.lines().count(), 1, "the used nonce is on disk");
}
