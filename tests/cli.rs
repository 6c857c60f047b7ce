//! The `ferry` binary, driven as a user would from a shell.

mod common;

use std::process::Command;

use ferry_control::audit::AuditLog;
use ferry_control::pki::{Identity, Role};

fn ferry(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        // Records of the demo runs go here, not into the host's state.
        .env("FERRY_STATE_DIR", env!("CARGO_TARGET_TMPDIR"))
        .output()
        .expect("run ferry")
}

#[test]
fn pki_init_then_audit_verify_finds_tampering() {
    let d = ferry::lab::LabDir::new().expect("temp dir");
    let pki = d.path().join("pki");
    let pki_s = pki.to_str().expect("utf-8 path");
    let out = ferry(&["pki", "init", "--out", pki_s, "--hosts", "src,dst"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Initialising again must not replace the CA.
    let again = ferry(&["pki", "init", "--out", pki_s, "--hosts", "src"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a PKI"));

    let log_path = d.path().join("audit.jsonl");
    let log = AuditLog::open(
        &log_path,
        "dst",
        Identity::load(&pki, Role::Host, "dst").expect("identity"),
    )
    .expect("log");
    for i in 0..3 {
        log.append("admit", serde_json::json!({ "i": i })).expect("append");
    }
    drop(log);
    let cert = pki.join("hosts/dst/cert.pem");
    let (log_s, cert_s) = (log_path.to_str().expect("utf-8"), cert.to_str().expect("utf-8"));
    let ok = ferry(&["audit", "verify", log_s, "--cert", cert_s]);
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("4 entries, hash chain and signatures verified"));

    let text = std::fs::read_to_string(&log_path).expect("read");
    std::fs::write(&log_path, text.replace("{\"i\":1}", "{\"i\":9}")).expect("write");
    let bad = ferry(&["audit", "verify", log_s, "--cert", cert_s]);
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stdout);
    assert!(
        said.contains("line 3") && said.contains("signature does not verify"),
        "{said}"
    );
}

#[test]
fn demo_json_reports_the_whole_protocol() {
    if !common::host_ready("demo_json_reports_the_whole_protocol") {
        return;
    }
    let out = ferry(&["demo", "--json", "--memory", "32MiB", "--hot-set", "4MiB"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "verified",
        "guest",
        "memory_bytes",
        "streams",
        "integrity",
        "rounds",
        "downtime_ms",
        "total_ms",
        "bytes_on_wire",
        "pages_sent",
        "zero_pages",
        "throughput_gbps",
        "handshake_ms",
        "steps",
        "audit_verified",
        "guest_resumed",
        "heartbeat_before",
        "heartbeat_after",
        "vcpu_state_bytes",
    ] {
        assert!(r.get(key).is_some(), "missing {key} in {r}");
    }
    assert_eq!(r["verified"], true);
    assert_eq!(r["audit_verified"], true);
    // The default guest is a real KVM guest where /dev/kvm works.
    let expected_guest = if ferry_vmm::kvm::available().is_ok() {
        "kvm"
    } else {
        eprintln!("NOTE: KVM missing here, the demo ran the synthetic guest");
        "synthetic"
    };
    assert_eq!(r["guest"], expected_guest, "{r}");
    assert_eq!(r["integrity"], "aead+sha256");
    assert_eq!(r["memory_bytes"], 32 << 20);
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 4, "pki, authn, authz, request: {steps:?}");
    assert!(r["handshake_ms"].as_f64().expect("number") > 0.0);
    assert_eq!(r["guest_resumed"], true);
    if expected_guest == "kvm" {
        let before = r["heartbeat_before"].as_u64().expect("number");
        assert_eq!(r["heartbeat_first_after"].as_u64(), Some(before + 1), "{r}");
        assert!(r["heartbeat_after"].as_u64().expect("number") > before);
        assert_eq!(r["guest_checksum_source"], r["guest_checksum_destination"]);
        assert!(r["vcpu_state_bytes"].as_u64().expect("number") > 4096);
    }
}

#[test]
fn demo_refuses_options_of_the_other_guest() {
    let out = ferry(&["demo", "--guest", "kvm", "--zero-fraction", "0.5"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--guest synthetic"), "{said}");
}

#[test]
fn every_command_explains_itself_with_examples() {
    for cmd in [
        &["demo"][..],
        &["pki"],
        &["pki", "init"],
        &["serve"],
        &["serve", "authn"],
        &["serve", "authz"],
        &["receive"],
        &["vm"],
        &["migrate"],
        &["status"],
        &["cancel"],
        &["report"],
        &["audit"],
        &["audit", "verify"],
        &["policy"],
        &["policy", "check"],
        &["policy", "explain"],
        &["resolve"],
        &["doctor"],
        &["completions"],
        &["man"],
        &["workload"],
        &[],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = ferry(&args);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ferry {args:?}");
        assert!(
            help.contains("Example"),
            "`ferry {}` has no examples:\n{help}",
            args.join(" ")
        );
    }
}

#[test]
fn the_example_config_file_names_only_real_options() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/ferry.example.toml");
    for cmd in [
        &["pki", "init"][..],
        &["serve", "authn"],
        &["serve", "authz"],
        &["receive"],
        &["vm"],
        &["migrate"],
        &["demo"],
    ] {
        // Every key becomes an option in front of `--help`: an unknown one
        // would be an error before the help.
        let mut args = vec!["--config", example];
        args.extend_from_slice(cmd);
        args.push("--help");
        let out = ferry(&args);
        assert!(
            out.status.success(),
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_command_line_overrides_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    // `workload` prints what it runs: the file's hot set, the command
    // line's memory.
    std::fs::write(
        &config,
        "[workload]\nmemory = \"64MiB\"\nhot-set = \"8MiB\"\nseconds = 1\ndirty-rate = 100\n",
    )
    .unwrap();
    let out = ferry(&["--config", config.to_str().unwrap(), "workload", "--memory", "32MiB"]);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("userfaultfd") {
            eprintln!("SKIPPED the_command_line_overrides_the_config_file: userfaultfd missing: {err}");
            return;
        }
        panic!("{text}{err}");
    }
    assert!(text.contains("32.0 MiB memory, 8.0 MiB hot set"), "{text}");
    let bad = ferry(&["--config", config.to_str().unwrap(), "workload", "--nonsense"]);
    assert!(!bad.status.success());
}

#[test]
fn a_bad_data_port_range_is_refused_with_the_reason() {
    let out = ferry(&[
        "receive",
        "--pki",
        "/nonexistent",
        "--name",
        "dst",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        "/nonexistent/policy.toml",
        "--state-dir",
        "/nonexistent",
        "--data-ports",
        "7729-7710",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the first port must not be above the last"), "{err}");
}

#[test]
fn policy_check_and_explain_name_the_deciding_rule_and_the_broken_line() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/policy.example.toml");
    let out = ferry(&["policy", "check", example]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("2 [[allow]] rule(s)") && text.contains("2 [[incoming]] rule(s)"),
        "{text}"
    );
    let ask = |at: &str| {
        ferry(&[
            "policy",
            "explain",
            example,
            "--principal",
            "night-batch",
            "--vm",
            "db-7",
            "--from",
            "rack1-a",
            "--to",
            "rack1-b",
            "--at",
            at,
        ])
    };
    let day = ask("12:00");
    let text = String::from_utf8_lossy(&day.stdout);
    assert_eq!(day.status.code(), Some(2), "{text}");
    assert!(text.contains("12:00 UTC is outside its window 22:00-02:00"), "{text}");
    assert!(text.contains("DENIED"), "{text}");
    let night = ask("23:30");
    let text = String::from_utf8_lossy(&night.stdout);
    assert!(night.status.success(), "{text}");
    assert!(text.contains("ALLOWED by [[allow]] #2"), "{text}");
    assert!(text.contains("ADMITTED by [[incoming]] #2"), "{text}");
    // A broken file: the error names the file, the line and the field.
    let dir = ferry::lab::LabDir::new().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[incoming]]\nfrom = [\"src\"]\nvms = [\"*\"]\nsurprise = 1\n").unwrap();
    let out = ferry(&["policy", "check", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.toml") && err.contains("line 4") && err.contains("surprise"),
        "{err}"
    );
}
