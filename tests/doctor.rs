//! `ferry doctor` on this machine: it passes as the machine is, and fails,
//! naming the fix, when a prerequisite is broken on purpose (a port taken,
//! a key made world readable, an expired certificate, a broken policy).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::os::unix::fs::PermissionsExt;

mod common;
use common::procs::{ferry, s, text};

/// `ferry doctor --json` with `args`: its exit success and its checks.
fn doctor(args: &[&str]) -> (bool, Vec<serde_json::Value>) {
    let mut all = vec!["doctor", "--json"];
    all.extend_from_slice(args);
    let out = ferry(&all);
    let checks = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out.status.success(), checks)
}

fn named<'a>(checks: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {checks:?}"))
}

#[test]
fn doctor_passes_here_and_names_the_fix_for_each_broken_prerequisite() {
    let dir = ferry::lab::LabDir::new().unwrap();
    let pki = dir.path().join("pki");
    let ok = ferry(&["pki", "init", "--out", s(&pki), "--hosts", "src,dst"]);
    assert!(ok.status.success(), "{}", text(&ok));
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/policy.example.toml");
    let state = dir.path().join("state");
    let args = [
        "--pki",
        s(&pki),
        "--name",
        "dst",
        "--listen",
        &addr,
        "--policy",
        policy,
        "--state-dir",
        s(&state),
    ];
    // As this machine is: every check passes where the host has what
    // ferry needs (the probes the other tests SKIP on).
    let host_ok = common::skip_unless(
        "doctor_passes_here (the host-feature checks)",
        &[
            ("io_uring", ferry_engine::probe::io_uring()),
            ("userfaultfd write-protect", ferry_engine::probe::uffd_wp()),
            ("KVM", ferry_vmm::kvm::available()),
        ],
    );
    let (passed, checks) = doctor(&args);
    let failed: Vec<_> = checks.iter().filter(|c| c["status"] == "fail").collect();
    if host_ok {
        assert!(passed && failed.is_empty(), "{failed:?}");
    }
    // Whatever the host, the configuration given is sound.
    for name in ["CA certificate", "host dst key", "policy", "state directory"] {
        assert_eq!(named(&checks, name)["status"], "pass", "{name}");
    }
    assert_eq!(named(&checks, "host dst certificate")["status"], "pass");
    assert!(named(&checks, "host dst certificate")["detail"]
        .as_str()
        .unwrap()
        .contains("day(s) left"));

    // A port taken.
    let held = std::net::TcpListener::bind(&addr).unwrap();
    let (passed, checks) = doctor(&args);
    let c = named(&checks, &format!("listen {addr}"));
    assert!(!passed && c["status"] == "fail", "{c}");
    assert!(c["fix"].as_str().unwrap().contains("ss -ltnp"), "{c}");
    drop(held);

    // A key anyone on the host can read.
    let key = pki.join("hosts/dst/key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (passed, checks) = doctor(&args);
    let c = named(&checks, "host dst key");
    assert!(!passed && c["status"] == "fail", "{c}");
    assert_eq!(c["fix"], format!("chmod 600 {}", key.display()), "{c}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // An expired certificate.
    let now = i64::try_from(ferry_control::now_unix_s()).unwrap();
    let expired = ferry_control::pki::Validity {
        not_before_s: now - 3 * 86_400,
        not_after_s: now - 86_400,
    };
    ferry_control::pki::issue(&pki, "dst", ferry_control::pki::Role::Host, expired).unwrap();
    let (passed, checks) = doctor(&args);
    let c = named(&checks, "host dst certificate");
    assert!(!passed && c["status"] == "fail", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("EXPIRED"), "{c}");
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("ferry pki renew --pki {} --host dst", pki.display())),
        "{c}"
    );

    // A policy that does not parse, and the plain-text output.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[incoming]]\nfrom = 3\n").unwrap();
    let out = ferry(&["doctor", "--policy", s(&bad)]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("FAIL  policy") && t.contains("fix: fix the file"), "{t}");
}
