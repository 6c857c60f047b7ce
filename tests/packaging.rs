//! The install pieces `scripts/package-deb.sh` puts in the Debian package:
//! the systemd units verify (`systemd-analyze verify`, against the man
//! pages `ferry man` writes), `ferry man` and `ferry completions` produce
//! what the package lists, and every other asset it lists exists. (The
//! script itself, a release build plus cargo-deb, is too slow for the
//! suite: run it to build the package.)
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::process::Command;

mod common;
use common::procs::{ferry, s, text};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn the_package_lists_only_files_that_exist_or_that_ferry_generates() {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(format!("{ROOT}/Cargo.toml")).unwrap()).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets = deb["assets"].as_array().unwrap();
    let dir = ferry::lab::LabDir::new().unwrap();
    let man = dir.path().join("man");
    let out = ferry(&["man", "--out", s(&man)]);
    assert!(out.status.success(), "{}", text(&out));
    for page in [
        "ferry.1",
        "ferry-receive.1",
        "ferry-serve-authn.1",
        "ferry-serve-authz.1",
        "ferry-doctor.1",
    ] {
        assert!(std::fs::metadata(man.join(page)).unwrap().len() > 200, "{page}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = ferry(&["completions", shell]);
        assert!(
            out.status.success() && out.stdout.len() > 1000,
            "{shell}: {}",
            text(&out)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("resolve"), "{shell}");
    }
    for a in assets {
        let src = a[0].as_str().unwrap();
        if src.starts_with("target/") {
            // Built by the script (the binary, the man pages, the completions).
            assert!(
                src == "target/release/ferry" || src.starts_with("target/package-assets/"),
                "{src}"
            );
            continue;
        }
        assert!(
            std::path::Path::new(ROOT).join(src).exists(),
            "the package lists {src}, which is missing"
        );
    }
    for unit in deb["systemd-units"].as_array().unwrap() {
        let name = unit["unit-name"].as_str().unwrap();
        let path = format!("{ROOT}/packaging/systemd/{name}.service");
        assert!(std::path::Path::new(&path).exists(), "{path}");
    }
}

#[test]
fn the_systemd_units_verify_and_are_hardened() {
    let units: Vec<_> = std::fs::read_dir(format!("{ROOT}/packaging/systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(units.len(), 3, "{units:?}");
    for u in &units {
        let text = std::fs::read_to_string(u).unwrap();
        for want in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=\n",
            "User=ferry",
        ] {
            assert!(text.contains(want), "{} lacks {want:?}", u.display());
        }
    }
    if !common::skip_unless(
        "the_systemd_units_verify",
        &[("systemd-analyze", common::program("systemd-analyze"))],
    ) {
        return;
    }
    // As installed: the binary where the units expect it, their man pages.
    let dir = ferry::lab::LabDir::new().unwrap();
    let man1 = dir.path().join("man/man1");
    assert!(ferry(&["man", "--out", s(&man1)]).status.success());
    let mut checked = Vec::new();
    for u in &units {
        let text = std::fs::read_to_string(u)
            .unwrap()
            .replace("/usr/bin/ferry", env!("CARGO_BIN_EXE_ferry"));
        let to = dir.path().join(u.file_name().unwrap());
        std::fs::write(&to, text).unwrap();
        checked.push(to);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&checked)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(out.stderr.is_empty(), "systemd-analyze warned: {}", text(&out));
}
