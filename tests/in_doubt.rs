//! A lost Commit or a lost Resumed, on real processes: a `ferry vm` source,
//! a `ferry vm --incoming` destination, and a frame-aware relay between them
//! that drops the one frame. Before the decision record and the resolve
//! exchange, the guest ran nowhere (lost Commit: the destination discarded,
//! the source stayed paused for good). Now the source asks the destination,
//! over a fresh mutually authenticated channel, what became of the
//! migration, and exactly one copy runs.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::procs::{ferry, ready, text, Proc, SourceDomain};
use common::{control_relay, spawn_relay, Attack, Target};

/// A destination `ferry vm --incoming` whose data port is fixed, with both
/// its control and data ports reached through relays on 127.0.0.2 (the
/// data relay attacking `attack`); returns the destination, the address
/// the source migrates to, and the switch that lets new control
/// connections (a resolve) through.
fn relayed_destination(dom: &SourceDomain, attack: Attack) -> (Proc, SocketAddr, Arc<AtomicBool>) {
    // The relay's port (unique among tests running at once) is the
    // destination's data port too, on the other address.
    let relay_ip = "127.0.0.2";
    let data = TcpListener::bind((relay_ip, 0)).unwrap();
    let data_port = data.local_addr().unwrap().port();
    let range = format!("{data_port}-{data_port}");
    let dst = dom.incoming_vm(&["--data-ports", &range, "--io-timeout-s", "3"]);
    let control = dst.listening();
    let target = Target {
        attack,
        stream: 0,
        frame: 0,
    };
    spawn_relay(data, SocketAddr::new(control.ip(), data_port), Some(target), 1);
    let front = TcpListener::bind((relay_ip, 0)).unwrap();
    let to = front.local_addr().unwrap();
    let open = Arc::new(AtomicBool::new(true));
    control_relay(front, control, open.clone());
    (dst, to, open)
}

/// A source `ferry vm` with a small KVM guest, one stream, its API on
/// `api`, migrating to `to` after 0.2 s.
fn source(dom: &SourceDomain, to: &str, api: &str) -> Proc {
    let audit = dom.dir.path().join("src-audit.jsonl");
    let extra = [
        "--hot-set",
        "4MiB",
        "--dirty-rate",
        "1000",
        "--streams",
        "1",
        "--heartbeat-every-ms",
        "100",
        "--api",
        api,
        "--audit",
        common::procs::s(&audit),
        "--migrate-to",
        to,
        "--dest-host",
        "dst",
        "--migrate-after-s",
        "0.2",
        "--io-timeout-s",
        "3",
        "--metrics",
        "0",
    ];
    Proc::start(None, &dom.source_vm_args(&dom.authn_addr, &extra))
}

/// The guest runs at the source: two heartbeat events later, it is not
/// paused and its counter moved.
fn runs_at_source(src: &Proc) {
    let a = src.wait_for("heartbeat", Duration::from_secs(5));
    let _ = src.wait_for("heartbeat", Duration::from_secs(5));
    let b = src.wait_for("heartbeat", Duration::from_secs(5));
    assert_eq!(b["paused"], false, "{b}");
    assert!(b["heartbeat"].as_u64() > a["heartbeat"].as_u64(), "{a} then {b}");
}

/// The text of GET /metrics at `addr`.
fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The destination's audit entries named `event`.
fn audited(dom: &SourceDomain, event: &str) -> Vec<serde_json::Value> {
    let log = dom.dir.path().join("dst/audit.jsonl");
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == event)
        .collect()
}

#[test]
fn a_lost_commit_is_answered_discarded_and_the_guest_resumes_at_the_source() {
    let test = "a_lost_commit_is_answered_discarded";
    if !ready(test) {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let (dst, to, _open) = relayed_destination(&dom, Attack::DropCommit);
    let api = dom.dir.path().join("src.sock");
    let src = source(&dom, &to.to_string(), common::procs::s(&api));
    let booted = src.wait_for("booted", Duration::from_secs(60));
    let metrics: std::net::SocketAddr = booted["metrics"].as_str().unwrap().parse().unwrap();
    let resolved = src.wait_for("migration-resolved", Duration::from_secs(90));
    eprintln!("source: {resolved}");
    assert_eq!(resolved["answer"], "discarded", "{resolved}");
    assert!(
        resolved["guest"].as_str().unwrap().starts_with("running here"),
        "{resolved}"
    );
    runs_at_source(&src);
    // The destination never ran it, and said so (signed, audited).
    let aborted = dst.wait_for("aborted", Duration::from_secs(20));
    let id = aborted["migration_id"].as_u64().unwrap();
    assert_eq!(resolved["migration_id"].as_u64(), Some(id));
    let answers = audited(&dom, "resolve");
    assert!(
        answers
            .iter()
            .any(|a| a["detail"]["migration_id"].as_u64() == Some(id) && a["detail"]["answer"] == "discarded"),
        "{answers:?}"
    );
    let decisions = std::fs::read_to_string(dom.dir.path().join("dst/decisions")).unwrap();
    assert!(decisions.contains(&format!("discarded {id:x}\n")), "{decisions}");
    assert!(!decisions.contains(&format!("committed {id:x}\n")), "{decisions}");
    // The source kept the destination's signed answer.
    let src_log = std::fs::read_to_string(dom.dir.path().join("src-audit.jsonl")).unwrap();
    assert!(src_log.contains("\"resolved\""), "{src_log}");
    // The VM is running and can migrate again.
    let st = ferry(&["status", "--api", common::procs::s(&api), "--json"]);
    assert!(text(&st).contains("\"state\":\"running\""), "{}", text(&st));
    // Its metrics say what happened (resolved on its own: discarded, once)
    // and the bytes it sent.
    let scraped = scrape(metrics);
    assert!(!scraped.contains("outcome=\"in-doubt\""), "{scraped}");
    for want in [
        "ferry_migrations_total{role=\"source\",outcome=\"discarded\"} 1",
        "ferry_migrations_active{role=\"source\"} 0",
    ] {
        assert!(scraped.contains(want), "{want} not in\n{scraped}");
    }
    let sent = scraped
        .lines()
        .find_map(|l| l.strip_prefix("ferry_migration_sent_bytes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap();
    // ... as many as the migration's record says it wrote.
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(resolved["record_file"].as_str().unwrap()).unwrap()).unwrap();
    let recorded: u64 = record["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["bytes_on_wire"].as_u64().unwrap())
        .sum();
    assert_eq!(sent, recorded as f64, "metrics against the record");
    assert!(recorded > 32 << 20, "{recorded} bytes for a 64 MiB guest");
}

#[test]
fn a_lost_commit_with_the_destination_unreachable_stays_in_doubt_until_ferry_resolve() {
    let test = "a_lost_commit_with_the_destination_unreachable";
    if !ready(test) {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let (_dst, to, open) = relayed_destination(&dom, Attack::DropCommit);
    // The destination's port is cut off for new connections: the source's
    // own attempts to ask fail.
    open.store(false, Ordering::SeqCst);
    let api = dom.dir.path().join("src.sock");
    let api_s = common::procs::s(&api);
    let src = source(&dom, &to.to_string(), api_s);
    let doubt = src.wait_for("migration-in-doubt", Duration::from_secs(90));
    eprintln!("source: {doubt}");
    assert!(doubt["reason"].as_str().unwrap().contains("ferry resolve"), "{doubt}");
    // Paused, and nothing else is allowed on it meanwhile.
    let hb = src.wait_for("heartbeat", Duration::from_secs(5));
    assert_eq!(hb["paused"], true, "{hb}");
    let m = ferry(&["migrate", "--api", api_s, "--to", &to.to_string(), "--dest-host", "dst"]);
    assert!(!m.status.success() && text(&m).contains("in-doubt"), "{}", text(&m));
    let c = ferry(&["cancel", "--api", api_s]);
    assert!(!c.status.success() && text(&c).contains("in-doubt"), "{}", text(&c));
    // Still unreachable: still in doubt (exit 3), still paused.
    let r = ferry(&["resolve", "--api", api_s]);
    assert_eq!(r.status.code(), Some(3), "{}", text(&r));
    // Reachable again: the signed "discarded" resumes it here.
    open.store(true, Ordering::SeqCst);
    let r = ferry(&["resolve", "--api", api_s]);
    assert!(r.status.success(), "{}", text(&r));
    assert!(text(&r).contains("discarded"), "{}", text(&r));
    runs_at_source(&src);
    // Nothing left to resolve.
    let again = ferry(&["resolve", "--api", api_s]);
    assert!(
        !again.status.success() && text(&again).contains("nothing is in doubt"),
        "{}",
        text(&again)
    );
}

#[test]
fn a_lost_resumed_is_answered_committed_and_the_source_releases_the_guest() {
    let test = "a_lost_resumed_is_answered_committed";
    if !ready(test) {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let (dst, to, _open) = relayed_destination(&dom, Attack::DropResumed);
    let api = dom.dir.path().join("src.sock");
    let mut src = source(&dom, &to.to_string(), common::procs::s(&api));
    let resolved = src.wait_for("migration-resolved", Duration::from_secs(90));
    eprintln!("source: {resolved}");
    assert_eq!(resolved["answer"], "committed", "{resolved}");
    // The source VM is gone for good; the destination runs the guest.
    let status = src.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let received = dst.wait_for("received", Duration::from_secs(30));
    assert_eq!(received["migration_id"], resolved["migration_id"], "{received}");
    let a = dst.wait_for("heartbeat", Duration::from_secs(5));
    let b = dst.wait_for("heartbeat", Duration::from_secs(5));
    assert!(b["heartbeat"].as_u64() > a["heartbeat"].as_u64(), "{a} then {b}");
    let id = resolved["migration_id"].as_u64().unwrap();
    let decisions = std::fs::read_to_string(dom.dir.path().join("dst/decisions")).unwrap();
    assert!(decisions.contains(&format!("committed {id:x}\n")), "{decisions}");
}
