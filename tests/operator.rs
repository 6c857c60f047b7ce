//! The CLI driven as an operator would, every command a separate process:
//! `ferry pki init`, `ferry serve authn|authz`, a destination `ferry vm
//! --incoming`, a source `ferry vm --api` configured by a TOML file (one
//! option overridden on its command line), then `ferry migrate` cancelled by
//! `ferry cancel` (the guest keeps running at the source), `ferry migrate`
//! again on a terminal (a pty from `script`) with `ferry status` during the
//! run, and `ferry audit verify` and `ferry report --svg` after.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::procs::{ferry, ready, s, text, Proc, SourceDomain};

fn status(api: &str) -> serde_json::Value {
    let o = ferry(&["status", "--api", api, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn an_operator_migrates_cancels_and_reports_with_the_cli() {
    let test = "an_operator_migrates_cancels_and_reports_with_the_cli";
    if !ready(test) {
        return;
    }
    // `script` gives `ferry migrate` a terminal.
    if !common::skip_unless(test, &[("script (util-linux)", common::program("script"))]) {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let d = dom.dir.path();
    // As behind a firewall: data streams only on these ports.
    let dst = dom.incoming_vm(&["--data-ports", "47100-47199"]);
    let dst_addr = dst.listening().to_string();

    // The source VMM's settings live in a config file, as on a host; the
    // command line overrides one of them (the file's 64 MiB guest would
    // migrate too fast to cancel).
    let api = d.join("vm.sock");
    let config = d.join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[vm]\nmemory = \"64MiB\"\nhot-set = \"16MiB\"\ndirty_rate = 20000\nheartbeat-every-ms = 100\n\
             pki = {:?}\nname = \"src\"\nauthn = {:?}\nauthz = {:?}\napi = {:?}\naudit = {:?}\nio-timeout-s = 5\n",
            s(&dom.pki),
            dom.authn_addr,
            dom.authz_addr,
            s(&api),
            s(&d.join("src-audit.jsonl")),
        ),
    )
    .unwrap();
    let src = Proc::start(None, &["--config", s(&config), "vm", "--memory", "512MiB"]);
    let booted = src.wait_for("booted", Duration::from_secs(60));
    assert_eq!(
        booted["memory_bytes"],
        512u64 << 20,
        "the command line overrides the file"
    );
    let api = s(&api);
    let st = status(api);
    assert_eq!(st["state"], "running", "{st}");

    // Run 1: cancelled while the first round is under way. On a pipe,
    // `ferry migrate` prints plain lines.
    let mut mig = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "migrate",
            "--api",
            api,
            "--to",
            &dst_addr,
            "--dest-host",
            "dst",
            "--record",
            s(&d.join("run1.json")),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(mig.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("migrating demo-vm to dst"), "{first}");
    // The first round of 512 MiB takes most of a second on loopback.
    std::thread::sleep(Duration::from_millis(250));
    let c = ferry(&["cancel", "--api", api]);
    assert!(c.status.success(), "{}", text(&c));
    let rest: Vec<String> = out.lines().map(Result::unwrap).collect();
    let code = mig.wait().unwrap();
    assert_eq!(code.code(), Some(1), "{rest:?}");
    let last = rest.last().unwrap();
    assert!(last.starts_with("cancelled: "), "{rest:?}");
    assert!(last.contains("the guest runs at the source"), "{last}");
    // The guest still runs at the source and the VMM takes another migration.
    let a = status(api);
    std::thread::sleep(Duration::from_millis(300));
    let b = status(api);
    assert_eq!(b["state"], "running", "{b}");
    assert_eq!(b["paused"], false, "{b}");
    assert!(
        b["heartbeat"].as_u64() > a["heartbeat"].as_u64(),
        "heartbeat {a} then {b}"
    );
    let run1: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("run1.json")).unwrap()).unwrap();
    assert_eq!(run1["outcome"], "cancelled", "{run1}");

    // Run 2: on a terminal, with `ferry status` while it runs.
    let record = d.join("run2.json");
    let typescript = d.join("typescript");
    let cmdline = format!(
        "{} migrate --api {api} --to {dst_addr} --dest-host dst --record {}",
        env!("CARGO_BIN_EXE_ferry"),
        s(&record)
    );
    let mut pty = Command::new("script")
        .args(["-qfec", &cmdline, s(&typescript)])
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let st = status(api);
        if st["state"] == "migrating" && st["progress"].is_object() || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(seen["state"], "migrating", "{seen}");
    // One migration at a time: a second request is refused, the first goes on.
    let second = ferry(&["migrate", "--api", api, "--to", &dst_addr, "--dest-host", "dst"]);
    assert_eq!(second.status.code(), Some(1));
    assert!(text(&second).contains("the VM is migrating"), "{}", text(&second));
    assert!(
        pty.wait().unwrap().success(),
        "{}",
        std::fs::read_to_string(&typescript).unwrap()
    );
    let screen = std::fs::read_to_string(&typescript).unwrap();
    // The bar rendered (a carriage return redraws it) and the run ends in a
    // clean summary line.
    assert!(
        screen.contains("] ") && screen.contains('%') && screen.contains("ETA"),
        "{screen}"
    );
    assert!(screen.contains('\r'), "{screen}");
    eprintln!("{screen}");
    // (`script` ends its typescript with a line of its own.)
    let summary = screen
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with("Script done"))
        .unwrap();
    assert!(summary.contains("migrated demo-vm to dst: "), "{summary:?}");
    assert!(summary.contains("downtime"), "{summary:?}");
    let migrated = src.wait_for("migrated", Duration::from_secs(30));
    assert_eq!(migrated["runs_after_commit"], 0);
    let received = dst.wait_for("received", Duration::from_secs(30));
    assert_eq!(received["transcript_matches"], true);

    // After: both audit logs verify, and the record draws.
    for (log, host) in [(d.join("src-audit.jsonl"), "src"), (d.join("dst/audit.jsonl"), "dst")] {
        let o = ferry(&[
            "audit",
            "verify",
            s(&log),
            "--cert",
            s(&dom.pki.join(format!("hosts/{host}/cert.pem"))),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let svg = d.join("run2.svg");
    let o = ferry(&["report", s(&record), "--svg", s(&svg)]);
    assert!(o.status.success(), "{}", text(&o));
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(summary.contains("migrated"), "{summary}");
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let rounds = rec["rounds"].as_array().unwrap().len();
    assert!(rounds >= 2, "{rec}");
    // authn ticket, authz ticket, request and admission, manifest and receipt.
    assert_eq!(rec["steps"].as_array().unwrap().len(), 4, "{rec}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg"));
    // A bar per round in the bytes panel and in the timeline, plus the
    // downtime band.
    assert!(svg.matches("<rect").count() > 2 * rounds, "{svg}");
    assert!(svg.contains("downtime"));
}

#[test]
fn a_cancel_ends_a_migration_stuck_on_a_slow_ticket_server() {
    let test = "a_cancel_ends_a_migration_stuck_on_a_slow_ticket_server";
    if !ready(test) {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let d = dom.dir.path();
    // A slow fake authentication server: it answers the ClientHello with
    // the start of a 16 KiB TLS record, then one byte every 2 s, so no
    // single read times out and only the exchange's deadline (three 5 s
    // timeouts) would end the wait.
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = fake.local_addr().unwrap().to_string();
    let (tx, connected) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Write;
        let Ok((mut sock, _)) = fake.accept() else { return };
        let _ = tx.send(());
        let _ = sock.write_all(&[0x16, 0x03, 0x03, 0x40, 0x00]);
        while sock.write_all(&[0]).is_ok() {
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    let api = d.join("vm.sock");
    let src = Proc::start(None, &dom.source_vm_args(&fake_addr, &["--api", s(&api)]));
    src.wait_for("booted", Duration::from_secs(60));
    let api = s(&api);
    let mut mig = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["migrate", "--api", api, "--to", "127.0.0.1:9", "--dest-host", "dst"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    connected.recv_timeout(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(status(api)["state"], "migrating");
    let asked = Instant::now();
    let c = ferry(&["cancel", "--api", api]);
    assert!(c.status.success(), "{}", text(&c));
    let out: Vec<String> = BufReader::new(mig.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .collect();
    assert_eq!(mig.wait().unwrap().code(), Some(1), "{out:?}");
    // The cancel closed the socket the source waited on: it did not sit
    // out the slow server's deadline (15 s).
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the cancel took {:?}",
        asked.elapsed()
    );
    let last = out.last().unwrap();
    assert!(last.starts_with("cancelled: "), "{out:?}");
    let st = status(api);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["paused"], false, "{st}");
}
