//! Live migration of a real KVM guest (ferry's minimal VMM), end to end
//! through the demo's control and data planes: success, and a connection
//! cut at each phase before the commit point. Each cut must leave exactly
//! one running guest, the source's, with its memory intact, and a
//! destination that never entered the guest.
//!
//! Every test prints a SKIPPED line and passes where /dev/kvm, io_uring or
//! userfaultfd is missing.

mod common;

use std::time::Duration;

use common::{relay, Attack, Target};
use ferry::demo::{self, DemoError, DemoOptions, GuestKind};

fn kvm_ready(test: &str) -> bool {
    common::host_ready(test) && common::skip_unless(test, &[("KVM", ferry_vmm::kvm::available())])
}

fn kvm_small() -> DemoOptions {
    let mut o = common::small(64 << 20, 2);
    o.guest = GuestKind::Kvm;
    o.hot_set_bytes = 8 << 20;
    o.dirty_rate_pages_per_s = 20_000;
    o.migration.io_timeout = Duration::from_secs(3);
    o
}

#[test]
fn kvm_guest_migrates_live_and_goes_on_where_it_stopped() {
    if !kvm_ready("kvm_guest_migrates_live") {
        return;
    }
    // The guest stopping itself after a checksum (1 and 2 vCPUs), and its
    // vCPUs kicked out at whatever instruction they were at (the VMM then
    // checksums the frozen memory, and the check allows for the one write
    // the guest may finish after resuming).
    for (vcpus, self_stop) in [(1, true), (2, true), (1, false), (2, false)] {
        let mut o = kvm_small();
        o.vcpus = vcpus;
        o.guest_checksum_at_pause = self_stop;
        let r = demo::run(&o, |l| eprintln!("{l}")).expect("migration");
        assert_eq!(r.guest, "kvm");
        assert!(r.verified, "{vcpus} vCPUs, self stop {self_stop}: not verified: {r:?}");
        assert!(r.guest_resumed && r.source_stopped);
        if self_stop {
            assert_eq!(r.heartbeat_first_after, r.heartbeat_before + 1);
        } else {
            // A kick between counting a beat and reporting it: that beat is
            // reported first at the destination (the demo checks which).
            assert!(r.heartbeat_first_after == r.heartbeat_before + 1 || r.heartbeat_first_after == r.heartbeat_before);
        }
        assert!(r.heartbeat_after > r.heartbeat_before);
        assert!(r.guest_checksum_source.is_some());
        if self_stop {
            assert_eq!(r.guest_checksum_source, r.guest_checksum_destination);
        }
        assert!(
            r.guest_writes_during_migration > 0,
            "the guest did not write during the migration"
        );
        assert!(r.rounds >= 2, "expected pre-copy rounds under a writing guest");
        // Per vCPU: registers, sregs, FPU, XSAVE, MSRs, CPUID.
        assert!(r.vcpu_state_bytes > 4096 * vcpus as usize, "{}", r.vcpu_state_bytes);
    }
}

fn cut(name: &str, target: Target) {
    if !kvm_ready(name) {
        return;
    }
    let mut o = kvm_small();
    o.interpose = Some(relay(Some(target), 2));
    fails_safely(name, &o);
}

/// Runs a migration that must fail before its commit point; checks that
/// exactly one guest runs, the source's, with its memory intact, and that
/// the source said why. Returns the failure for more checks.
fn fails_safely(name: &str, o: &DemoOptions) -> Box<demo::Failure> {
    match demo::run(o, |_| {}) {
        Ok(r) => panic!(
            "{name}: the migration succeeded despite the fault (verified={})",
            r.verified
        ),
        Err(DemoError::Failed(f)) => {
            eprintln!("{name}: {f}");
            assert!(f.source_error.is_some(), "{name}: the source did not notice: {f}");
            assert!(f.source_guest_running, "{name}: the source guest is not running: {f}");
            assert!(
                !f.destination_guest_ran,
                "{name}: the destination entered the guest: {f}"
            );
            assert_eq!(f.source_memory_intact, Some(true), "{name}: {f}");
            f
        }
        Err(e) => panic!("{name}: setup failed: {e}"),
    }
}

#[test]
fn cut_in_the_first_round_leaves_the_guest_at_the_source() {
    cut(
        "cut_first_round",
        Target {
            attack: Attack::Cut,
            stream: 1,
            frame: 20,
        },
    );
}

#[test]
fn cut_in_a_later_round_leaves_the_guest_at_the_source() {
    cut(
        "cut_later_round",
        Target {
            attack: Attack::CutInRound,
            stream: 0,
            frame: 2,
        },
    );
}

#[test]
fn cut_in_the_final_round_leaves_the_guest_at_the_source() {
    cut(
        "cut_final_round",
        Target {
            attack: Attack::CutAtDeviceState,
            stream: 0,
            frame: 0,
        },
    );
}

#[test]
fn cut_before_the_destinations_acknowledgement_leaves_the_guest_at_the_source() {
    cut(
        "cut_before_ready",
        Target {
            attack: Attack::CutBeforeReady,
            stream: 0,
            frame: 0,
        },
    );
}

/// The switchover guard: a worker that panics after the source paused the
/// guest (an injected fault standing in for the nonce-reuse assert in
/// `seal` or an `expect` in the pipeline) unwinds past every error path;
/// the paused guest is a value whose drop resumes it, so the guest runs at
/// the source again with its memory intact, and the migration reports the
/// panic as an error instead of propagating it.
#[test]
fn a_worker_panic_after_the_pause_leaves_the_guest_running_at_the_source() {
    let name = "worker_panic_after_pause";
    if !kvm_ready(name) {
        return;
    }
    let mut o = kvm_small();
    o.hooks = ferry_engine::progress::Hooks::new().inject_panic_in_final_round(1);
    let f = fails_safely(name, &o);
    assert!(
        matches!(
            f.source_error,
            Some(ferry_engine::migrate::MigrateError::WorkerPanicked(1))
        ),
        "{name}: the source did not report the worker's panic: {f}"
    );
}
