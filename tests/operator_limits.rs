//! The convergence controls as an operator uses them, every command a
//! separate process against a real KVM guest: `ferry estimate` on a guest
//! that would not converge (exit 2, with the throttle it would need), then
//! `ferry migrate --converge throttle --max-bandwidth 20MB/s` with the cap
//! raised to 100 MB/s mid-migration by `ferry set-bandwidth`, and the record holding
//! the estimate next to what happened.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::procs::{ferry, ready, s, text, Proc, SourceDomain};

#[test]
fn an_operator_estimates_throttles_and_changes_the_cap_mid_migration() {
    let test = "an_operator_estimates_throttles_and_changes_the_cap_mid_migration";
    if !ready(test) {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let d = dom.dir.path();
    let dst = dom.incoming_vm(&[]);
    let dst_addr = dst.listening().to_string();
    let api = d.join("vm.sock");
    let (authn, authz) = (dom.authn_addr.to_string(), dom.authz_addr.to_string());
    // The guest writes a 16 MiB hot set at 300k pages/s: every round
    // finds it all dirty until the throttle is high (at 99 % it writes
    // 3k pages/s).
    let src = Proc::start(
        None,
        &[
            "vm",
            "--memory",
            "256MiB",
            "--hot-set",
            "16MiB",
            "--dirty-rate",
            "300000",
            "--pki",
            s(&dom.pki),
            "--name",
            "src",
            "--authn",
            &authn,
            "--authz",
            &authz,
            "--api",
            s(&api),
            "--downtime-ms-max",
            "20",
            "--io-timeout-s",
            "5",
        ],
    );
    src.wait_for("booted", Duration::from_secs(60));
    let api = s(&api);

    // 1. At 50 MB/s a 20 ms target is out of reach: exit 2, and the
    // throttle it would need.
    let o = ferry(&[
        "estimate",
        "--api",
        api,
        "--seconds",
        "1",
        "--bandwidth",
        "50MB/s",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(p["event"], "estimate", "{p}");
    assert_eq!(p["converges"], false, "{p}");
    assert!(p["dirty_rate_pages_per_s"].as_f64().unwrap() > 0.0, "{p}");
    let o = ferry(&["estimate", "--api", api, "--seconds", "0.5"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("bandwidth"), "no bandwidth known: {}", text(&o));
    // A cap too low to keep the peer's timeouts quiet is refused.
    let o = ferry(&["set-bandwidth", "--api", api, "--max-bandwidth", "100kB/s"]);
    assert!(!o.status.success() && text(&o).contains("at least"), "{}", text(&o));
    // Nothing to set while no migration runs.
    let o = ferry(&["set-bandwidth", "--api", api, "--max-bandwidth", "1GB/s"]);
    assert!(
        !o.status.success() && text(&o).contains("no migration is under way"),
        "{}",
        text(&o)
    );

    // 2. Throttled, starting at 20 MB/s (256 MiB would take 13 s), raised to
    // 100 MB/s 1.5 s in (still too slow for the hot set unthrottled).
    let record = d.join("run.json");
    let mig = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "migrate",
            "--api",
            api,
            "--to",
            &dst_addr,
            "--dest-host",
            "dst",
            "--converge",
            "throttle",
            "--max-bandwidth",
            "20MB/s",
            "--record",
            s(&record),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let o = ferry(&["set-bandwidth", "--api", api, "--max-bandwidth", "100MB/s"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("100.00 MB/s"), "{}", text(&o));
    let out = mig.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{lines}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the raised cap applied: {:?}",
        t.elapsed()
    );
    assert!(lines.contains("throttled"), "{lines}");
    let last = lines.lines().last().unwrap();
    assert!(last.contains("target 20 ms"), "{last}");

    // 3. The record: the estimate next to what happened.
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    let c = &r["convergence"];
    assert_eq!(c["converge"], "throttle", "{c}");
    assert_eq!(c["outcome"], "converged", "{c}");
    // The controller paused the guest only when the rest fitted the
    // target. Whether the measured pause then kept it depends on how busy
    // this host's two cores are (the estimate does not see the
    // destination's resume), so that is no assertion here; but what the
    // record says about it must be true, and said everywhere.
    let expected = c["expected_downtime_ms"].as_f64().unwrap();
    assert!(expected <= 20.0 * 0.9, "paused over the target: {c}");
    let downtime = r["downtime_ms"].as_f64().unwrap();
    let exceeded = downtime > 20.0;
    assert_eq!(c["downtime_exceeded"], exceeded, "{downtime} ms: {c}");
    assert_eq!(last.contains("EXCEEDED"), exceeded, "{downtime} ms: {last}");
    assert!(c["throttle_max"].as_f64().unwrap() > 0.0, "{c}");
    assert_eq!(c["max_bandwidth_bytes_per_s"], 100_000_000u64, "{c}");
    assert_eq!(
        c["prediction"]["converges"], false,
        "the estimate, made under abort: {c}"
    );
    assert_eq!(r["rounds"][0]["bandwidth_cap_bytes_per_s"], 20_000_000u64);
    let rep = ferry(&["report", s(&record)]);
    assert!(text(&rep).contains("convergence: policy throttle"), "{}", text(&rep));
}
