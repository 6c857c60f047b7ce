//! Convergence as a contract (issue 11), on real guests and real sockets:
//! a guest that writes faster than the link is given up on before any
//! pause (`abort`), slowed until it fits (`throttle`, synthetic and KVM),
//! or switched over past the target with every output saying so
//! (`force`); a bandwidth cap holds and can be changed mid-migration.
//!
//! The "link" is loopback under a bandwidth cap, so the tests do not depend
//! on how fast this machine's loopback is: a 40 MB/s cap against a guest
//! writing 100,000 pages/s into a 16 MiB hot set never converges unaided.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::demo::{self, DemoError, DemoOptions, GuestKind};
use ferry_engine::migrate::convergence::Converge;
use ferry_engine::migrate::MigrateError;
use ferry_engine::progress::{Hooks, Progress};

const CAP_BYTES_PER_S: u64 = 40_000_000;
const DIRTY_RATE: u64 = 100_000;

/// A synthetic guest writing faster than a 40 MB/s link carries.
fn heavy(converge: Converge) -> DemoOptions {
    let mut o = common::small(64 << 20, 2);
    o.hot_set_bytes = 16 << 20;
    o.dirty_rate_pages_per_s = DIRTY_RATE;
    o.migration.converge = converge;
    o.migration.downtime_ms_max = 50;
    o.migration.max_bandwidth = Some(CAP_BYTES_PER_S);
    o
}

/// A throttled migration switched over because the paused round was
/// expected to fit `target_ms`. The measured downtime is the machine's (a
/// loaded CI host can miss the target), so it is checked as a ratio to what
/// the unthrottled dirty set would have cost at the same cap, and a miss
/// must be reported, never quiet.
fn assert_throttled_switchover(r: &demo::DemoReport, target_ms: f64, cap_bytes_per_s: f64) {
    let c = &r.convergence;
    assert_eq!(c.outcome, "converged", "{c:?}");
    let expected_ms = c.expected_downtime_ms.expect("expected downtime");
    assert!(expected_ms <= target_ms, "switched over expecting {expected_ms} ms");
    assert_eq!(
        c.downtime_exceeded,
        r.downtime_ms > target_ms,
        "a miss must be reported: {c:?}"
    );
    let unthrottled_ms = r.round_detail[0].dirty_pages_after as f64 * 4096.0 / cap_bytes_per_s * 1e3;
    assert!(
        r.downtime_ms < unthrottled_ms / 2.0,
        "downtime {} ms against {unthrottled_ms} ms for the unthrottled dirty set",
        r.downtime_ms
    );
}

/// The tests here measure rates (the guest's writes against a capped link)
/// and decide from them: run one at a time, so that a sibling's guest and
/// workers do not change what another measures (a KVM guest slowed by its
/// siblings converged where it should not have, in CI).
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ALONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn failure(r: Result<demo::DemoReport, DemoError>) -> Box<demo::Failure> {
    match r {
        Err(DemoError::Failed(f)) => f,
        Err(e) => panic!("setup failed: {e}"),
        Ok(r) => panic!("migrated, but should not have: downtime {} ms", r.downtime_ms),
    }
}

#[test]
fn abort_gives_up_before_pausing_and_names_the_rates() {
    let _alone = alone();
    if !common::host_ready("abort_gives_up_before_pausing") {
        return;
    }
    let paused = Arc::new(Mutex::new(false));
    let mut o = heavy(Converge::Abort);
    let p = paused.clone();
    o.hooks = Hooks::new().on_progress(move |e| {
        if matches!(e, Progress::Paused { .. }) {
            *p.lock().unwrap() = true;
        }
    });
    let f = failure(demo::run(&o, |l| eprintln!("{l}")));
    let Some(MigrateError::WontConverge(n)) = &f.source_error else {
        panic!("expected won't converge, got {:?}", f.source_error);
    };
    assert!(!*paused.lock().unwrap(), "the guest was paused");
    assert!(f.source_guest_running && !f.destination_guest_ran, "{f}");
    // Never paused: the heartbeat never stood still for long (a paused
    // round of 16 MiB at 40 MB/s would stop it for ~400 ms).
    assert!(
        f.source_heartbeat_max_gap_ms < 100.0,
        "heartbeat gap {} ms",
        f.source_heartbeat_max_gap_ms
    );
    assert_eq!(f.source_throttle_after, 0.0);
    assert!(n.expected_downtime_ms > 50.0 && n.bandwidth_bytes_per_s > 0.0 && n.dirty_rate_pages_per_s > 0.0);
    // The link carried no more than the cap (and one batch per stream).
    assert!(
        n.bandwidth_bytes_per_s < CAP_BYTES_PER_S as f64 * 1.2,
        "{}",
        n.bandwidth_bytes_per_s
    );
    let text = f.source_error.as_ref().unwrap().to_string();
    for want in [
        "won't converge",
        "pages/s",
        "MB/s",
        "target of 50 ms",
        "--converge throttle",
        "keeps running",
    ] {
        assert!(text.contains(want), "{want:?} missing from: {text}");
    }
    // The destination was told why, not just cut off.
    let dst = f
        .destination_error
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(dst.contains("won't converge"), "destination: {dst}");
    // The record says so.
    assert_eq!(f.record.outcome, "aborted");
    let c = f.record.convergence.as_ref().expect("convergence in the record");
    assert_eq!(c.outcome, "aborted: won't converge");
    assert_eq!(c.converge, Converge::Abort);
    assert!(!f.record.rounds.is_empty());
    assert!(
        f.record.summary().contains("aborted: won't converge"),
        "{}",
        f.record.summary()
    );
}

#[test]
fn throttle_converges_within_the_target_and_the_destination_runs_unthrottled() {
    let _alone = alone();
    if !common::host_ready("throttle_converges_within_the_target") {
        return;
    }
    let throttles = Arc::new(Mutex::new(Vec::new()));
    let mut o = heavy(Converge::Throttle);
    let t = throttles.clone();
    o.hooks = Hooks::new().on_progress(move |e| {
        if let Progress::Throttled { throttle, .. } = e {
            t.lock().unwrap().push(*throttle);
        }
    });
    let r = demo::run(&o, |l| eprintln!("{l}")).expect("migration");
    assert!(r.verified, "not verified");
    assert_eq!(r.convergence.converge, Converge::Throttle);
    assert_eq!(r.convergence.outcome, "converged");
    assert_throttled_switchover(&r, 50.0, CAP_BYTES_PER_S as f64);
    assert!(r.convergence.throttle_max > 0.0, "a throttle was needed");
    // Raised in steps, never lowered; shown per round.
    let steps = throttles.lock().unwrap().clone();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last().copied(), Some(r.convergence.throttle_max));
    let live: Vec<f64> = r
        .round_detail
        .iter()
        .filter(|x| !x.is_final)
        .map(|x| x.throttle)
        .collect();
    assert_eq!(live.first(), Some(&0.0));
    assert!(live.windows(2).all(|w| w[0] <= w[1]), "{live:?}");
    // The destination's guest writes at its full configured rate.
    let rate = r.destination_write_rate_pages_per_s.expect("synthetic guest");
    assert!(rate > DIRTY_RATE as f64 * 0.7, "destination writes {rate} pages/s");
    assert!(r.record().summary().contains("throttle up to"));
}

#[test]
fn force_switches_over_and_every_output_says_the_target_was_exceeded() {
    let _alone = alone();
    if !common::host_ready("force_switches_over") {
        return;
    }
    let warned = Arc::new(Mutex::new(None));
    let mut o = heavy(Converge::Force);
    o.migration.max_rounds = 3;
    let w = warned.clone();
    o.hooks = Hooks::new().on_progress(move |e| {
        if let Progress::Paused { exceeds_target, .. } = e {
            *w.lock().unwrap() = Some(*exceeds_target);
        }
    });
    let mut lines = Vec::new();
    let r = demo::run(&o, |l| lines.push(l.to_string())).expect("migration");
    assert!(r.verified);
    assert_eq!(*warned.lock().unwrap(), Some(true), "the paused event says so");
    assert!(
        r.convergence.downtime_exceeded && r.downtime_ms > 50.0,
        "{} ms",
        r.downtime_ms
    );
    assert_eq!(r.convergence.outcome, "forced-past-target");
    assert!(r.convergence.expected_downtime_ms.is_some_and(|ms| ms > 50.0));
    assert!(lines.iter().any(|l| l.contains("EXCEEDED")), "{lines:#?}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["downtime_exceeded"], true);
    assert_eq!(json["converge"], "force");
    let rec = r.record();
    assert!(rec.convergence.as_ref().unwrap().downtime_exceeded);
    assert!(rec.summary().contains("TARGET EXCEEDED"), "{}", rec.summary());
}

#[test]
fn a_bandwidth_cap_holds_and_a_change_takes_effect_within_the_round() {
    let _alone = alone();
    if !common::host_ready("a_bandwidth_cap_holds") {
        return;
    }
    // An idle 64 MiB guest at 20 MB/s would take ~3.4 s for its first round;
    // half a second into it (by the migration's own clock, not counting the
    // setup before), the cap goes to 400 MB/s.
    let mut o = common::small(64 << 20, 2);
    o.dirty_rate_pages_per_s = 0;
    o.migration.max_bandwidth = Some(20_000_000);
    let (half_a_second_in, wait) = std::sync::mpsc::sync_channel::<()>(1);
    let hooks = Hooks::new().on_progress(move |e| {
        if matches!(e, Progress::Sending { round: 1, elapsed_ms, .. } if *elapsed_ms >= 500.0) {
            let _ = half_a_second_in.try_send(());
        }
    });
    o.hooks = hooks.clone();
    let raise = std::thread::spawn(move || {
        wait.recv_timeout(Duration::from_secs(30))
            .expect("round 1 reached half a second");
        hooks.set_max_bandwidth(Some(400_000_000), None).expect("a valid cap");
    });
    let t = Instant::now();
    let r = demo::run(&o, |l| eprintln!("{l}")).expect("migration");
    raise.join().unwrap();
    assert!(r.verified);
    let first = &r.round_detail[0];
    assert_eq!(
        first.bandwidth_cap_bytes_per_s,
        Some(20_000_000),
        "the cap when the round started"
    );
    assert!(
        first.duration_ms < 2_000.0,
        "the raised cap did not apply within the round: {} ms",
        first.duration_ms
    );
    assert!(
        first.duration_ms > 400.0,
        "the first cap did not hold: {} ms",
        first.duration_ms
    );
    assert_eq!(r.convergence.max_bandwidth_bytes_per_s, Some(400_000_000));
    eprintln!("whole demo {:?}", t.elapsed());

    // A steady cap: never above it by more than one batch per stream.
    let mut o = common::small(64 << 20, 2);
    o.dirty_rate_pages_per_s = 0;
    o.migration.max_bandwidth = Some(50_000_000);
    let r = demo::run(&o, |l| eprintln!("{l}")).expect("migration");
    let first = &r.round_detail[0];
    let rate = first.bytes_on_wire as f64 / (first.duration_ms / 1e3);
    let slack = 2.0 * (1 << 20) as f64 / (first.duration_ms / 1e3);
    assert!(rate <= 50e6 * 1.02 + slack, "{rate} B/s under a 50 MB/s cap");
}

#[test]
fn postcopy_is_refused_as_not_available_yet() {
    let _alone = alone();
    let mut o = common::small(64 << 20, 1);
    o.migration.converge = Converge::Postcopy;
    let e = o.migration.validate().unwrap_err();
    assert!(matches!(e, MigrateError::PostcopyUnavailable));
    assert!(e.to_string().contains("not available yet"), "{e}");
}

#[test]
fn kvm_guest_throttled_to_a_target_it_cannot_meet_unthrottled() {
    let _alone = alone();
    if !(common::host_ready("kvm_guest_throttled")
        && common::skip_unless("kvm_guest_throttled", &[("KVM", ferry_vmm::kvm::available())]))
    {
        return;
    }
    // The guest writes a 16 MiB hot set flat out; 10 ms is out of reach
    // unthrottled (on a shadow MMU too, where it writes slower: the cap
    // keeps the link slow).
    let kvm = |converge| {
        let mut o = common::small(64 << 20, 2);
        o.guest = GuestKind::Kvm;
        o.hot_set_bytes = 16 << 20;
        o.dirty_rate_pages_per_s = 1_000_000;
        o.migration.downtime_ms_max = 10;
        o.migration.max_bandwidth = Some(100_000_000);
        // Small batches: under a cap, a round pays for its last batch, and
        // 1 MiB at 100 MB/s alone is the whole target.
        o.migration.batch_bytes = 64 << 10;
        o.migration.converge = converge;
        o
    };
    let f = failure(demo::run(&kvm(Converge::Abort), |l| eprintln!("{l}")));
    assert!(matches!(f.source_error, Some(MigrateError::WontConverge(_))), "{f}");
    assert!(f.source_guest_running && f.source_memory_intact == Some(true), "{f}");
    let r = demo::run(&kvm(Converge::Throttle), |l| eprintln!("{l}")).expect("migration");
    assert!(r.verified, "not verified");
    assert!(r.convergence.throttle_max > 0.0);
    // The plan switched over because the paused round was expected to fit;
    // the measured downtime is the machine's (a loaded CI host can miss the
    // target), so it is checked as a ratio to what the unthrottled dirty
    // set would have cost at the same cap, and any miss must be reported.
    assert_throttled_switchover(&r, 10.0, 100e6);
    // The destination's guest went on (no throttle moves with the state).
    assert!(r.heartbeat_after > r.heartbeat_before);
}

#[test]
fn the_estimate_predicts_what_the_migration_then_does() {
    let _alone = alone();
    if !common::host_ready("the_estimate_predicts") {
        return;
    }
    let estimate = Some(demo::EstimateOptions {
        seconds: 1.0,
        bandwidth_bytes_per_s: None,
    });
    // The heavy writer under a 40 MB/s cap: predicted not to converge, and
    // it does not; with the needed throttle it would.
    let mut o = heavy(Converge::Abort);
    o.estimate = estimate;
    let f = failure(demo::run(&o, |l| eprintln!("{l}")));
    assert!(matches!(f.source_error, Some(MigrateError::WontConverge(_))));
    let p = f
        .record
        .convergence
        .as_ref()
        .and_then(|c| c.prediction.clone())
        .expect("the prediction is in the record");
    assert!(!p.converges, "{p:?}");
    assert!(p.throttle_needed.is_some_and(|t| t > 0.0), "{p:?}");
    // An idle guest: predicted to converge, and it does.
    let mut o = common::small(64 << 20, 2);
    o.dirty_rate_pages_per_s = 0;
    o.migration.max_bandwidth = Some(CAP_BYTES_PER_S);
    o.estimate = estimate;
    let r = demo::run(&o, |l| eprintln!("{l}")).expect("migration");
    let p = r.convergence.prediction.as_ref().expect("prediction");
    assert!(p.converges && r.verified && !r.convergence.downtime_exceeded, "{p:?}");
    assert_eq!(p.throttle_needed, Some(0.0));
    assert!(r.record().convergence.unwrap().prediction.is_some());
}
