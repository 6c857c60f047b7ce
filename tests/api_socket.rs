//! Attacks on the VMM's API socket path (issue 14, item 11), against a real
//! `ferry vm` process: a regular file at `--api PATH` is not deleted (this
//! failed before: the VMM removed it), and under a umask that restricts
//! nothing the socket ends up 0600 with nothing left beside it. That the
//! socket is never reachable with looser permissions holds by construction
//! (bound in a private 0700 directory, made 0600, then linked into place);
//! a test cannot catch the old microsecond window between bind and chmod.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

mod common;
use common::procs::{ferry, ready, text, Proc, SourceDomain};

/// `ferry vm` as a source that could migrate (its API needs that), with
/// `--api` at `api`.
fn vm_args<'a>(dom: &'a SourceDomain, api: &'a str) -> Vec<&'a str> {
    dom.source_vm_args(&dom.authn_addr, &["--api", api])
}

#[test]
fn an_api_path_holding_a_regular_file_is_refused_and_the_file_kept() {
    let test = "an_api_path_holding_a_regular_file";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("important.conf");
    std::fs::write(&victim, "keep me\n").unwrap();
    let dom = SourceDomain::start(None, "127.0.0.1");
    let mut args = vm_args(&dom, victim.to_str().unwrap());
    args.extend(["--run-for-s", "1"]);
    let o = ferry(&args);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("is not a socket"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me\n");
}

#[test]
fn the_api_socket_is_private_from_the_start_under_a_permissive_umask() {
    let test = "the_api_socket_is_private_from_the_start";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("vm.sock");
    // The child inherits a umask that restricts nothing. (Process-wide:
    // the other test here may create its file meanwhile; it only reads it.)
    // SAFETY: umask(2) has no memory-safety preconditions.
    let old = unsafe { libc::umask(0o000) };
    let dom = SourceDomain::start(None, "127.0.0.1");
    let vm = Proc::start(None, &vm_args(&dom, api.to_str().unwrap()));
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    vm.wait_for("booted", Duration::from_secs(60));
    let meta = std::fs::symlink_metadata(&api).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Nothing of the private directory is left beside it.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["vm.sock".to_string()], "{names:?}");
    let st = ferry(&["status", "--api", api.to_str().unwrap(), "--json"]);
    assert!(st.status.success(), "{}", text(&st));
}
