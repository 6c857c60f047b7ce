//! When pre-copy stops: a pure decision over the rounds so far.
//!
//! After each live round the controller asks [`decide`] whether to run
//! another. The input is what the rounds did (pages sent, how long, what was
//! dirty after) and the configuration; the output is another round, or stop
//! and why. Nothing here reads a clock or touches the guest, so every branch
//! is tested below by table.

use crate::memory::PAGE_SIZE_U64;

/// A round that leaves at least `STALL_KEEP_NUM / STALL_KEEP_DEN` (95 %) of
/// the dirty pages of each of the [`STALL_WINDOW`] rounds before it has made
/// no progress: the guest dirties as fast as the link sends.
pub const STALL_KEEP_NUM: u64 = 19;
/// See [`STALL_KEEP_NUM`].
pub const STALL_KEEP_DEN: u64 = 20;
/// Rounds compared to declare a stall.
pub const STALL_WINDOW: usize = 2;
/// Rounds that must precede the one being judged before a stall may be
/// declared (the first rounds shrink the dirty set in big steps; a short
/// plateau among them is no stall).
pub const STALL_MIN_ROUNDS: usize = 4;
/// Within the downtime target, one more live round is still worth running
/// while the last round left at most `1 / WORTHWHILE_SHRINK` of the pages it
/// sent dirty (it halved what the paused round must send) ...
pub const WORTHWHILE_SHRINK: u64 = 2;
/// ... and the paused round would still take longer than this.
pub const WORTHWHILE_MS: f64 = 1.0;

/// What one finished live round did, as the decision needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundOutcome {
    /// Pages the round sent.
    pub pages_sent: u64,
    /// From dispatch until every frame was acknowledged.
    pub duration_ms: f64,
    /// Pages dirty when the round ended (what the next round sends).
    pub dirty_pages_after: u64,
}

/// The limits the decision applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// The operator's downtime target.
    pub downtime_ms_max: u64,
    /// Live rounds at most.
    pub max_rounds: u32,
}

/// Why pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// What is left fits in the downtime target, and another live round
    /// would not shrink it enough to be worth it.
    Converged,
    /// The configured number of live rounds ran.
    MaxRounds,
    /// The dirty set stopped shrinking (see [`STALL_KEEP_NUM`]).
    Stalled,
}

impl StopReason {
    /// For logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Converged => "converged",
            StopReason::MaxRounds => "max_rounds",
            StopReason::Stalled => "stalled",
        }
    }
}

/// The decision after a live round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Run another live round.
    Another,
    /// Pause the guest and send the rest.
    Stop(StopReason),
}

/// The link's rate in guest bytes per second, taken from the largest round
/// so far (later rounds are small and dominated by latency); `None` before
/// any round with a measurable duration.
pub fn bandwidth_bytes_per_s(rounds: &[RoundOutcome]) -> Option<f64> {
    let mut best: Option<(u64, f64)> = None;
    for r in rounds {
        if r.duration_ms > 0.0 && best.map_or(true, |(pages, _)| r.pages_sent >= pages) {
            best = Some((
                r.pages_sent,
                r.pages_sent as f64 * PAGE_SIZE_U64 as f64 / (r.duration_ms / 1e3),
            ));
        }
    }
    best.map(|(_, bw)| bw)
}

/// What the paused round would take if it started after the last round:
/// the dirty bytes left over the bandwidth; infinite while the bandwidth is
/// unknown.
pub fn expected_downtime_ms(rounds: &[RoundOutcome]) -> f64 {
    let Some(last) = rounds.last() else {
        return f64::INFINITY;
    };
    match bandwidth_bytes_per_s(rounds) {
        Some(bw) if bw > 0.0 => last.dirty_pages_after as f64 * PAGE_SIZE_U64 as f64 / bw * 1e3,
        _ => f64::INFINITY,
    }
}

/// Whether to run another live round after `rounds` (oldest first, the
/// round just finished last; never empty when called).
pub fn decide(rounds: &[RoundOutcome], limits: Limits) -> Decision {
    let Some((last, before)) = rounds.split_last() else {
        return Decision::Another;
    };
    let expected_ms = expected_downtime_ms(rounds);
    let within_target = expected_ms <= limits.downtime_ms_max as f64;
    let worth_another = last.dirty_pages_after * WORTHWHILE_SHRINK <= last.pages_sent && expected_ms > WORTHWHILE_MS;
    if within_target && !worth_another {
        return Decision::Stop(StopReason::Converged);
    }
    if u32::try_from(rounds.len()).unwrap_or(u32::MAX) >= limits.max_rounds {
        return Decision::Stop(StopReason::MaxRounds);
    }
    let stalled = before.len() >= STALL_MIN_ROUNDS
        && before[before.len() - STALL_WINDOW..]
            .iter()
            .all(|r| last.dirty_pages_after * STALL_KEEP_DEN >= r.dirty_pages_after * STALL_KEEP_NUM);
    if stalled {
        return Decision::Stop(StopReason::Stalled);
    }
    Decision::Another
}

#[cfg(test)]
mod tests {
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
        assert_eq!(expected_downtime_ms(&[]), f64::INFINITY);
        assert_eq!(expected_downtime_ms(&[r(10, 0.0, 10)]), f64::INFINITY);
        // 1000 pages in 10 ms; 100 left take 1 ms.
        let ms = expected_downtime_ms(&[r(1000, 10.0, 100)]);
        assert!((ms - 1.0).abs() < 1e-9, "{ms}");
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
                Limits {
                    downtime_ms_max: 50,
                    max_rounds: 2,
                },
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
        let limits = Limits {
            downtime_ms_max: 50,
            max_rounds: 1,
        };
        assert_eq!(
            decide(&[r(262_144, 1000.0, 0)], limits),
            Decision::Stop(StopReason::Converged)
        );
        assert_eq!(
            decide(&[r(262_144, 1000.0, 100_000)], limits),
            Decision::Stop(StopReason::MaxRounds)
        );
    }
}
