//! `ferry receive --metrics`: scraped over HTTP during and after a real
//! migration, parsed by the Python `prometheus_client` package's OpenMetrics
//! parser (tests/requirements.txt; `.ci/run` installs it), its counters
//! checked against what the daemon reported of the migration.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::procs::{migrate_one_with, s, Proc, SourceDomain};

/// Every sample of an OpenMetrics text, as the real parser reads it:
/// (name, labels, value).
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;

fn parser_ready(test: &str) -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output();
    let ok = probe.as_ref().is_ok_and(|o| o.status.success());
    common::skip_unless(
        test,
        &[(
            "the Python prometheus_client parser (pip install -r tests/requirements.txt)",
            if ok {
                Ok(())
            } else {
                Err("python3 cannot import prometheus_client".into())
            },
        )],
    )
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("application/openmetrics-text"),
        "{head}"
    );
    body.to_string()
}

type Samples = Vec<(String, serde_json::Map<String, serde_json::Value>, f64)>;

fn parse(text: &str) -> Samples {
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<(String, serde_json::Map<String, serde_json::Value>, f64)>>(&out.stdout).unwrap()
}

/// The value of sample `name` whose labels include `labels` (0 if absent).
fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).and_then(|x| x.as_str()) == Some(*v))
        })
        .map_or(0.0, |s| s.2)
}

#[test]
fn a_scraped_destination_counts_the_migration_it_received() {
    let test = "a_scraped_destination_counts_the_migration";
    if !(common::host_ready(test) && parser_ready(test)) {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let dst = dom.receive(&["--metrics", "0"]);
    let listening = dst.wait_for("listening", Duration::from_secs(20));
    let control: SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
    let metrics: SocketAddr = listening["metrics"].as_str().unwrap().parse().unwrap();
    assert!(metrics.ip().is_loopback(), "a bare port binds loopback: {metrics}");

    // Before: every series is there, nothing counted yet.
    let before = parse(&scrape(metrics));
    assert!(before.iter().any(|s| s.0 == "ferry_replay_cache_entries"), "{before:?}");
    assert_eq!(value(&before, "ferry_migration_received_bytes_total", &[]), 0.0);

    // During: a migration held to 4 MB/s (8 MiB: about two seconds; its
    // hot set fits a 2 s target at that rate).
    let watching = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            let s = parse(&scrape(metrics));
            if value(&s, "ferry_migrations_active", &[("role", "destination")]) == 1.0 {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    });
    migrate_one_with(&dom, control, |cfg| {
        cfg.max_bandwidth = Some(4_000_000);
        cfg.downtime_ms_max = 2_000;
    })
    .expect("migrated");
    let during = watching.join().unwrap().expect("a scrape while the migration ran");
    assert_eq!(value(&during, "ferry_admissions_total", &[("result", "admit")]), 1.0);

    // After: the counters say what the daemon said of the migration.
    let received = dst.wait_for("received", Duration::from_secs(30));
    let after = parse(&scrape(metrics));
    assert_eq!(
        value(
            &after,
            "ferry_migrations_total",
            &[("role", "destination"), ("outcome", "received")]
        ),
        1.0
    );
    assert_eq!(
        value(&after, "ferry_migration_received_bytes_total", &[]),
        received["bytes_received"].as_u64().unwrap() as f64
    );
    assert!(value(&after, "ferry_migration_received_bytes_total", &[]) > f64::from(8u32 << 20));
    assert_eq!(
        value(&after, "ferry_migrations_active", &[("role", "destination")]),
        0.0
    );
    assert_eq!(value(&after, "ferry_handshake_duration_seconds_count", &[]), 1.0);
    assert_eq!(value(&after, "ferry_replay_cache_entries", &[]), 1.0);
}

#[test]
fn a_scraped_ticket_server_counts_tickets_issued_and_denied() {
    use ferry_control::pki::{self, Identity, Role};
    let test = "a_scraped_ticket_server_counts_tickets";
    if !parser_ready(test) {
        return;
    }
    let dom = SourceDomain::start(None, "127.0.0.1");
    let authn = Proc::start(
        None,
        &[
            "serve",
            "authn",
            "--pki",
            s(&dom.pki),
            "--name",
            "src",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "0",
        ],
    );
    let listening = authn.wait_for("listening", Duration::from_secs(20));
    let addr: SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
    let metrics: SocketAddr = listening["metrics"].as_str().unwrap().parse().unwrap();
    // One ticket for the operator; one request for the wrong server kind.
    let client = Identity::load(&dom.pki, Role::Client, "operator").unwrap();
    let cfg = ferry_control::tls::client_config(&client, pki::roots(&dom.pki).unwrap()).unwrap();
    ferry::source::authn_ticket(cfg.clone(), addr, "src").unwrap();
    let wrong = ferry::source::authz_ticket(
        cfg,
        addr,
        "src",
        ferry_control::ticket::SignedTicket {
            kind: "authn".into(),
            body: String::new(),
            sig: String::new(),
        },
        "web-1",
        "dst",
    );
    assert!(wrong.is_err());
    let after = parse(&scrape(metrics));
    assert_eq!(
        value(
            &after,
            "ferry_tickets_total",
            &[("server", "authn"), ("result", "issued")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "ferry_tickets_total",
            &[("server", "authn"), ("result", "denied"), ("code", "wrong_server")]
        ),
        1.0
    );
}
