//! The round controller's decisions, table by table.
use super::*;

/// 4 KiB pages at 1 GB/s: 244_140 pages take 1 s.
fn r(pages_sent: u64, duration_ms: f64, dirty_pages_after: u64) -> RoundOutcome {
    RoundOutcome {
        pages_sent,
        duration_ms,
        dirty_pages_after,
    }
}

const LIMITS: Limits = Limits {
    downtime_ms_max: 50,
    max_rounds: 30,
    fixed_ms: 0.0,
    state_bytes: 0,
    paused_cap_bytes_per_s: None,
};

#[test]
fn bandwidth_comes_from_the_largest_round() {
    assert_eq!(bandwidth_bytes_per_s(&[]), None);
    assert_eq!(bandwidth_bytes_per_s(&[r(100, 0.0, 5)]), None);
    let bw = bandwidth_bytes_per_s(&[r(1000, 10.0, 100), r(100, 5.0, 10)]).unwrap();
    assert!((bw - 1000.0 * 4096.0 / 0.010).abs() < 1.0, "{bw}");
    // A later round at least as large replaces it.
    let bw = bandwidth_bytes_per_s(&[r(1000, 10.0, 100), r(1000, 20.0, 10)]).unwrap();
    assert!((bw - 1000.0 * 4096.0 / 0.020).abs() < 1.0, "{bw}");
}

#[test]
fn expected_downtime_is_what_is_left_over_the_bandwidth() {
    assert_eq!(expected_downtime_ms(&[], &LIMITS), f64::INFINITY);
    assert_eq!(expected_downtime_ms(&[r(10, 0.0, 10)], &LIMITS), f64::INFINITY);
    // 1000 pages in 10 ms; 100 left take 1 ms.
    let ms = expected_downtime_ms(&[r(1000, 10.0, 100)], &LIMITS);
    assert!((ms - 1.0).abs() < 1e-9, "{ms}");
    // A slower last round (small, latency-bound) sets the rate: 100
    // pages in 2 ms; and it shows a latency of 1 ms (2 ms minus the
    // 1 ms its pages take at the largest round's rate).
    let two = [r(1000, 10.0, 100), r(100, 2.0, 100)];
    assert!((round_latency_ms(&two) - 1.0).abs() < 1e-9);
    let ms = expected_downtime_ms(&two, &LIMITS);
    assert!((ms - 3.0).abs() < 1e-9, "{ms}");
    // Plus stopping the guest, and its state: 40960 B more take 0.1 ms.
    let with_fixed = Limits {
        fixed_ms: 0.5,
        state_bytes: 40_960,
        ..LIMITS
    };
    let ms = expected_downtime_ms(&[r(1000, 10.0, 100)], &with_fixed);
    assert!((ms - 1.6).abs() < 1e-9, "{ms}");
    // A paused-round cap below the measured bandwidth: 1000 pages *
    // 4096 B in 10 ms is 409.6 MB/s; capped at 40.96 MB/s, 100 pages
    // take 10 ms.
    let capped = Limits {
        paused_cap_bytes_per_s: Some(40.96e6),
        ..LIMITS
    };
    let ms = expected_downtime_ms(&[r(1000, 10.0, 100)], &capped);
    assert!((ms - 10.0).abs() < 1e-6, "{ms}");
}

#[test]
fn round_latency_is_the_smallest_later_rounds_residual() {
    assert_eq!(round_latency_ms(&[]), 0.0);
    assert_eq!(round_latency_ms(&[r(1000, 10.0, 100)]), 0.0);
    // 100 pages/ms. The smallest later round: 50 pages (0.5 ms) in 1 ms.
    let rounds = [r(1000, 10.0, 0), r(100, 1.5, 0), r(50, 1.0, 0), r(100, 4.0, 0)];
    assert!(
        (round_latency_ms(&rounds) - 0.5).abs() < 1e-9,
        "{}",
        round_latency_ms(&rounds)
    );
    // Of equals the latest; never negative.
    let rounds = [r(1000, 10.0, 0), r(50, 3.0, 0), r(50, 0.2, 0)];
    assert_eq!(round_latency_ms(&rounds), 0.0);
}

#[test]
fn decisions_by_table() {
    use Decision::{Another, Stop};
    use StopReason::{Converged, MaxRounds, Stalled};
    let cases: &[(&str, Vec<RoundOutcome>, Limits, Decision)] = &[
        (
            "idle guest: nothing left after the first round",
            vec![r(262_144, 1000.0, 0)],
            LIMITS,
            Stop(Converged),
        ),
        (
            "within the target, but another round halves it and saves over 1 ms",
            // 1 GB/s-ish: 262144 pages / 1 s; 5000 pages left ≈ 19 ms.
            vec![r(262_144, 1000.0, 5000)],
            LIMITS,
            Another,
        ),
        (
            "within the target and under 1 ms left: stop",
            vec![r(262_144, 1000.0, 200)],
            LIMITS,
            Stop(Converged),
        ),
        (
            "within the target, the round did not halve: stop",
            vec![r(262_144, 1000.0, 5000), r(5000, 30.0, 4000)],
            LIMITS,
            Stop(Converged),
        ),
        (
            "over the target: another round",
            vec![r(262_144, 1000.0, 100_000)],
            LIMITS,
            Another,
        ),
        (
            "over the target at the round limit: stop, max rounds",
            vec![r(262_144, 1000.0, 100_000), r(100_000, 400.0, 90_000)],
            Limits::new(50, 2),
            Stop(MaxRounds),
        ),
        (
            "over the target, four rounds before, the last two not shrunk by 5 %: stalled",
            vec![
                r(262_144, 1000.0, 150_000),
                r(150_000, 600.0, 120_000),
                r(120_000, 480.0, 100_000),
                r(100_000, 400.0, 99_000),
                r(99_000, 396.0, 98_000),
            ],
            LIMITS,
            Stop(Stalled),
        ),
        (
            "the same plateau with only three rounds before: not yet",
            vec![
                r(262_144, 1000.0, 120_000),
                r(120_000, 480.0, 100_000),
                r(100_000, 400.0, 99_000),
                r(99_000, 396.0, 98_000),
            ],
            LIMITS,
            Another,
        ),
        (
            "still shrinking by more than 5 % against one of the last two: not stalled",
            vec![
                r(262_144, 1000.0, 150_000),
                r(150_000, 600.0, 120_000),
                r(120_000, 480.0, 110_000),
                r(110_000, 440.0, 100_000),
                r(100_000, 400.0, 94_000),
            ],
            LIMITS,
            Another,
        ),
        (
            "no measurable duration yet: the downtime is unknown, keep going",
            vec![r(10, 0.0, 5)],
            LIMITS,
            Another,
        ),
    ];
    for (name, rounds, limits, want) in cases {
        assert_eq!(decide(rounds, *limits), *want, "{name}");
    }
}

#[test]
fn the_round_limit_wins_over_convergence_only_when_not_converged() {
    let limits = Limits::new(50, 1);
    assert_eq!(
        decide(&[r(262_144, 1000.0, 0)], limits),
        Decision::Stop(StopReason::Converged)
    );
    assert_eq!(
        decide(&[r(262_144, 1000.0, 100_000)], limits),
        Decision::Stop(StopReason::MaxRounds)
    );
}

fn policy(converge: Converge, can_throttle: bool, throttle: f64) -> Policy {
    Policy {
        converge,
        can_throttle,
        throttle,
        throttle_max: THROTTLE_CEILING,
        rounds_at_throttle: 2,
    }
}

/// Five rounds of a writer faster than the link: stalled.
fn stalled() -> Vec<RoundOutcome> {
    vec![
        r(262_144, 1000.0, 185_000),
        r(185_000, 700.0, 185_000),
        r(185_000, 700.0, 184_000),
        r(184_000, 700.0, 184_500),
        r(184_500, 700.0, 184_000),
    ]
}

/// What a KVM guest writing a 16 MiB hot set did in CI at 68 MB/s: the
/// last round, at the highest throttle, shrank from 13.4 to 7.7 MiB.
fn over_once_shrinking_a_little() -> Vec<RoundOutcome> {
    vec![r(65_536, 3962.0, 4096), r(4_120, 172.0, 4_096), r(3_430, 142.0, 1_970)]
}

#[test]
fn throttle_steps_go_up_to_the_ceiling_and_stop_at_the_operators_max() {
    let mut t = 0.0;
    let mut seen = Vec::new();
    while let Some(n) = next_throttle(t, THROTTLE_CEILING) {
        assert!(n > t, "{n} after {t}");
        seen.push(n);
        t = n;
    }
    assert_eq!(seen.first(), Some(&THROTTLE_INITIAL));
    assert_eq!(seen.last(), Some(&THROTTLE_CEILING));
    assert_eq!(seen.len(), 9, "{seen:?}");
    assert_eq!(next_throttle(0.0, 0.5), Some(0.2));
    assert_eq!(next_throttle(0.45, 0.5), Some(0.5));
    assert_eq!(next_throttle(0.5, 0.5), None);
    assert_eq!(next_throttle(0.0, 0.0), None);
}

#[test]
fn plans_by_policy() {
    use Converge::{Abort, Force, Throttle};
    let over_once = vec![r(262_144, 1000.0, 185_000), r(185_000, 700.0, 185_000)];
    let shrinking = vec![r(262_144, 1000.0, 185_000), r(185_000, 700.0, 90_000)];
    let converged = vec![r(262_144, 1000.0, 0)];
    let cases: &[(&str, &[RoundOutcome], Limits, Policy, Step)] = &[
        (
            "converged: switch over under every policy",
            &converged,
            LIMITS,
            policy(Abort, false, 0.0),
            Step::Switchover {
                why: StopReason::Converged,
                exceeded: false,
            },
        ),
        (
            "abort, stalled: give up",
            &stalled(),
            LIMITS,
            policy(Abort, true, 0.0),
            Step::GiveUp(GiveUp::Stalled),
        ),
        (
            "force, stalled: switch over and say the target is exceeded",
            &stalled(),
            LIMITS,
            policy(Force, false, 0.0),
            Step::Switchover {
                why: StopReason::Stalled,
                exceeded: true,
            },
        ),
        (
            "force at the round limit",
            &over_once,
            Limits::new(50, 2),
            policy(Force, false, 0.0),
            Step::Switchover {
                why: StopReason::MaxRounds,
                exceeded: true,
            },
        ),
        (
            "abort at the round limit",
            &over_once,
            Limits::new(50, 2),
            policy(Abort, false, 0.0),
            Step::GiveUp(GiveUp::MaxRounds),
        ),
        (
            "throttle: a round that did not halve raises the throttle at once",
            &over_once,
            LIMITS,
            policy(Throttle, true, 0.0),
            Step::Throttle(THROTTLE_INITIAL),
        ),
        (
            "throttle: a round that halved does not",
            &shrinking,
            LIMITS,
            policy(Throttle, true, 0.0),
            Step::Another,
        ),
        (
            "throttle: the next step after 0.2",
            &over_once,
            LIMITS,
            policy(Throttle, true, 0.2),
            Step::Throttle(0.2 + THROTTLE_STEP),
        ),
        (
            "throttle at its ceiling and stalled: give up",
            &stalled(),
            LIMITS,
            policy(Throttle, true, THROTTLE_CEILING),
            Step::GiveUp(GiveUp::ThrottleLimit),
        ),
        (
            "throttle at its ceiling since the round just judged, stalled: one more round",
            &stalled(),
            LIMITS,
            Policy {
                rounds_at_throttle: 1,
                ..policy(Throttle, true, THROTTLE_CEILING)
            },
            Step::Another,
        ),
        (
            "throttle at its ceiling, a round that shrank but did not halve: another round",
            &over_once_shrinking_a_little(),
            LIMITS,
            policy(Throttle, true, THROTTLE_CEILING),
            Step::Another,
        ),
        (
            "throttle, a guest that cannot be throttled: keep going until it stalls",
            &over_once,
            LIMITS,
            policy(Throttle, false, 0.0),
            Step::Another,
        ),
        (
            "throttle, a guest that cannot be throttled, stalled: say so",
            &stalled(),
            LIMITS,
            policy(Throttle, false, 0.0),
            Step::GiveUp(GiveUp::CannotThrottle),
        ),
        (
            "throttle at the round limit: give up (never pause over the target)",
            &over_once,
            Limits::new(50, 2),
            policy(Throttle, true, 0.5),
            Step::GiveUp(GiveUp::MaxRounds),
        ),
    ];
    for (name, rounds, limits, policy, want) in cases {
        assert_eq!(plan(rounds, *limits, *policy), *want, "{name}");
    }
}

#[test]
fn the_fixed_cost_alone_can_break_the_target() {
    // Nothing dirty, but stopping the guest and its state cost 60 ms
    // against a 50 ms target: not converged.
    let limits = Limits {
        fixed_ms: 60.0,
        ..LIMITS
    };
    assert_eq!(decide(&[r(262_144, 1000.0, 0)], limits), Decision::Another);
    // At the round limit, abort gives up rather than pause over it.
    let at_limit = Limits {
        max_rounds: 1,
        ..limits
    };
    assert_eq!(
        plan(&[r(262_144, 1000.0, 0)], at_limit, policy(Converge::Abort, false, 0.0)),
        Step::GiveUp(GiveUp::MaxRounds)
    );
}

#[test]
fn policies_parse_and_print() {
    for c in [Converge::Throttle, Converge::Postcopy, Converge::Abort, Converge::Force] {
        assert_eq!(c.as_str().parse::<Converge>(), Ok(c));
        assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{c}\""));
    }
    assert!("fast".parse::<Converge>().is_err());
    assert_eq!(Converge::default(), Converge::Abort);
}
