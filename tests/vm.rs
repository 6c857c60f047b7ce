//! Two `ferry vm` processes, as on two hosts: a source VMM running a real
//! KVM guest migrates it live to a destination VMM (`ferry vm --incoming`)
//! that receives it into a fresh VM, with the authentication and
//! authorization servers as processes too. Once on loopback, once across
//! two network namespaces joined by a veth pair.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::process::Command;
use std::time::Duration;

mod common;
use common::procs::{ready, s, Proc, SourceDomain};

/// Two network namespaces joined by a veth pair; removed on drop.
struct Netns {
    src: String,
    dst: String,
}

const SRC_IP: &str = "10.231.0.1";
const DST_IP: &str = "10.231.0.2";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let id = std::process::id();
        let n = Netns {
            src: format!("ferry-src-{id}"),
            dst: format!("ferry-dst-{id}"),
        };
        let (va, vb) = (format!("fsrc{id}"), format!("fdst{id}"));
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        ip(&["netns", "add", &n.src])?;
        ip(&["netns", "add", &n.dst])?;
        ip(&["link", "add", va, "type", "veth", "peer", "name", vb])?;
        ip(&["link", "set", va, "netns", &n.src])?;
        ip(&["link", "set", vb, "netns", &n.dst])?;
        for (ns, dev, addr) in [(&n.src, va, SRC_IP), (&n.dst, vb, DST_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        let _ = ip(&["netns", "del", &self.src]);
        let _ = ip(&["netns", "del", &self.dst]);
    }
}

/// Runs the whole two-host migration; `src_ns`/`dst_ns` put the processes in
/// network namespaces, `src_ip`/`dst_ip` are the addresses they listen on.
fn two_hosts(src_ns: Option<&str>, dst_ns: Option<&str>, src_ip: &str, dst_ip: &str) {
    let dom = SourceDomain::start(src_ns, src_ip);
    let on = |ip: &str| format!("{ip}:0");
    let (d, pki, policy) = (dom.dir.path(), &dom.pki, &dom.policy);
    let (authn_addr, authz_addr) = (&dom.authn_addr, &dom.authz_addr);
    let dst = Proc::start(
        dst_ns,
        &[
            "vm",
            "--incoming",
            "--verify",
            "--heartbeat-every-ms",
            "100",
            "--pki",
            s(pki),
            "--name",
            "dst",
            "--listen",
            &on(dst_ip),
            "--policy",
            s(policy),
            "--state-dir",
            s(&d.join("dst")),
        ],
    );
    let dst_addr = dst.listening().to_string();
    let src = Proc::start(
        src_ns,
        &[
            "vm",
            "--memory",
            "128MiB",
            "--hot-set",
            "16MiB",
            "--dirty-rate",
            "20000",
            "--verify",
            "--heartbeat-every-ms",
            "100",
            "--pki",
            s(pki),
            "--name",
            "src",
            "--authn",
            authn_addr,
            "--authz",
            authz_addr,
            "--migrate-to",
            &dst_addr,
            "--dest-host",
            "dst",
            "--migrate-after-s",
            "0.5",
            "--audit",
            s(&d.join("src-audit.jsonl")),
            "--io-timeout-s",
            "5",
        ],
    );
    let booted = src.wait_for("booted", Duration::from_secs(60));
    assert_eq!(booted["memory_bytes"], 128 << 20);
    // The guest runs at the source before the migration.
    let hb = src.wait_for("heartbeat", Duration::from_secs(10));
    assert!(hb["heartbeat"].as_u64().unwrap() > 0, "{hb}");
    let migrated = src.wait_for("migrated", Duration::from_secs(60));
    eprintln!("source: {migrated}");
    let received = dst.wait_for("received", Duration::from_secs(60));
    eprintln!("destination: {received}");
    assert_eq!(received["guest"], "kvm");
    assert_eq!(received["transcript_matches"], true);
    // The guest went on where it stopped, with the memory it had.
    let before = migrated["heartbeat_before"].as_u64().unwrap();
    assert_eq!(received["heartbeat_first_after"].as_u64(), Some(before + 1));
    assert!(migrated["guest_checksum"].is_string());
    assert_eq!(received["guest_checksum"], migrated["guest_checksum"]);
    // The source's VM never ran again after the commit; the process ends.
    assert_eq!(migrated["runs_after_commit"], 0);
    let mut src = src;
    assert!(src.child.wait().unwrap().success());
    // ... and the guest keeps running at the destination.
    let a = dst.wait_for("heartbeat", Duration::from_secs(5))["heartbeat"]
        .as_u64()
        .unwrap();
    let b = dst.wait_for("heartbeat", Duration::from_secs(5))["heartbeat"]
        .as_u64()
        .unwrap();
    assert!(b > a && a > before, "destination heartbeats {a}, {b} after {before}");
    // Both audit logs verify.
    for (log, host) in [(d.join("src-audit.jsonl"), "src"), (d.join("dst/audit.jsonl"), "dst")] {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([
                "audit",
                "verify",
                s(&log),
                "--cert",
                s(&pki.join(format!("hosts/{host}/cert.pem"))),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
    drop(dom);
}

#[test]
fn kvm_guest_moves_between_two_vmm_processes_on_loopback() {
    if !ready("kvm_guest_moves_between_two_vmm_processes_on_loopback") {
        return;
    }
    two_hosts(None, None, "127.0.0.1", "127.0.0.1");
}

#[test]
fn kvm_guest_moves_between_two_network_namespaces() {
    let test = "kvm_guest_moves_between_two_network_namespaces";
    if !ready(test) {
        return;
    }
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIPPED {test}: cannot make network namespaces here (needs root and iproute2): {why}");
            return;
        }
    };
    two_hosts(Some(&ns.src), Some(&ns.dst), SRC_IP, DST_IP);
}

#[test]
fn a_destination_killed_mid_migration_leaves_the_guest_running_at_the_source() {
    let test = "a_destination_killed_mid_migration";
    if !ready(test) {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let pki = &dom.pki;
    let (authn_addr, authz_addr) = (&dom.authn_addr, &dom.authz_addr);
    let mut dst = dom.incoming_vm(&[]);
    let dst_addr = dst.listening().to_string();
    // A guest that never converges (a 1 ms target under 50k writes/s), so
    // the migration is still in its rounds when the destination dies.
    let src = Proc::start(
        None,
        &[
            "vm",
            "--memory",
            "256MiB",
            "--hot-set",
            "64MiB",
            "--dirty-rate",
            "50000",
            "--downtime-ms-max",
            "1",
            "--heartbeat-every-ms",
            "100",
            "--pki",
            s(pki),
            "--name",
            "src",
            "--authn",
            authn_addr,
            "--authz",
            authz_addr,
            "--migrate-to",
            &dst_addr,
            "--dest-host",
            "dst",
            "--migrate-after-s",
            "0.2",
            "--io-timeout-s",
            "3",
        ],
    );
    src.wait_for("migrating", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(150));
    dst.child.kill().unwrap();
    let failed = src.wait_for("migration-failed", Duration::from_secs(30));
    eprintln!("source: {failed}");
    assert_eq!(failed["guest"], "running here");
    // The guest runs on at the source: its heartbeat moves, it is not paused.
    let a = src.wait_for("heartbeat", Duration::from_secs(5));
    let b = src.wait_for("heartbeat", Duration::from_secs(5));
    assert_eq!(b["paused"], false, "{b}");
    assert!(b["heartbeat"].as_u64() > a["heartbeat"].as_u64(), "{a} then {b}");
    assert!(
        b["writes"].as_u64() > a["writes"].as_u64(),
        "the guest stopped writing: {a} then {b}"
    );
}

/// A source `ferry vm` of `dom` with a small KVM guest that migrates to
/// `dest` after 0.2 s, with `extra` options.
fn source_vm(dom: &SourceDomain, dest: &str, extra: &[&str]) -> Proc {
    let migrate = [
        "--hot-set",
        "4MiB",
        "--dirty-rate",
        "1000",
        "--migrate-to",
        dest,
        "--dest-host",
        "dst",
        "--migrate-after-s",
        "0.2",
        "--io-timeout-s",
        "5",
    ];
    Proc::start(
        None,
        &dom.source_vm_args(&dom.authn_addr, &[&migrate[..], extra].concat()),
    )
}

#[test]
fn a_source_pinned_to_other_measurements_keeps_its_guest() {
    use ferry_control::handshake::Measurement;
    let test = "a_source_pinned_to_other_measurements_keeps_its_guest";
    if !ready(test) {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let dst = dom.incoming_vm(&[]);
    let l = dst.wait_for("listening", Duration::from_secs(20));
    let dest = l["addr"].as_str().unwrap().to_string();
    let theirs: Measurement = l["measurement"].as_str().unwrap().parse().unwrap();
    // The same binary with another configuration: the source refuses the
    // destination's signed Accept before a page moves, and keeps its guest.
    let other = Measurement {
        config_sha256: "0".repeat(64),
        ..theirs.clone()
    };
    let src = source_vm(&dom, &dest, &["--pin-measurement", &other.to_string()]);
    let failed = src.wait_for("migration-failed", Duration::from_secs(60));
    assert_eq!(failed["guest"], "running here", "{failed}");
    assert!(
        failed["reason"].as_str().unwrap().contains("not among the pinned"),
        "{failed}"
    );
    drop(src);
    // The destination saw the source go (its control connection closed)
    // and freed its one slot at once, not at its io timeout.
    let aborted = dst.wait_for("aborted", Duration::from_secs(5));
    assert!(
        aborted["reason"]
            .as_str()
            .unwrap()
            .contains("closed its control connection"),
        "{aborted}"
    );
    // Pinned to it (one of two): the guest moves.
    let (other, theirs) = (other.to_string(), theirs.to_string());
    let src = source_vm(
        &dom,
        &dest,
        &["--pin-measurement", &other, "--pin-measurement", &theirs],
    );
    src.wait_for("migrated", Duration::from_secs(60));
    dst.wait_for("received", Duration::from_secs(60));
}
