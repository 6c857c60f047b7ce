//! Before migrating: how fast does the guest dirty its memory, and would
//! pre-copy converge at a given bandwidth and downtime target?
//!
//! [`measure`] runs the guest's dirty tracker for a few seconds without
//! sending anything and records how many distinct pages were dirtied since
//! the start after each slice: the guest's dirty curve (it flattens at the
//! working set). [`predict`] then replays pre-copy on paper: round 1 sends
//! all memory at the bandwidth, each later round sends what the curve says
//! was dirtied during the previous one (a throttled guest moves along the
//! curve at `1 - throttle` of real time), and the same [`plan`] the
//! controller uses decides after every simulated round. So the prediction
//! and the migration disagree only where the guest or the link change.

use std::time::{Duration, Instant};

use super::convergence::{plan, Converge, GiveUp, Limits, Policy, RoundOutcome, Step, THROTTLE_CEILING};
use super::MigrationConfig;
use crate::bitmap::DirtyBitmap;
use crate::dirty::{DirtyError, DirtyTracker};
use crate::guest::GuestControl;
use crate::memory::PAGE_SIZE_U64;

/// One point of a dirty curve.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DirtySample {
    /// Milliseconds since the measurement started.
    pub after_ms: f64,
    /// Distinct pages dirtied since it started.
    pub distinct_pages: u64,
}

/// What [`measure`] saw.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DirtyCurve {
    /// Guest pages.
    pub memory_pages: u64,
    /// The points, oldest first.
    pub samples: Vec<DirtySample>,
}

impl DirtyCurve {
    /// Distinct pages dirtied in a window of `ms` (interpolated between the
    /// samples; beyond the last, extended along the last slope; never more
    /// than the guest has).
    pub fn distinct_in(&self, ms: f64) -> f64 {
        let mut prev = DirtySample {
            after_ms: 0.0,
            distinct_pages: 0,
        };
        for s in &self.samples {
            if ms <= s.after_ms {
                let span = s.after_ms - prev.after_ms;
                let frac = if span > 0.0 { (ms - prev.after_ms) / span } else { 1.0 };
                let p = prev.distinct_pages as f64;
                return p + (s.distinct_pages as f64 - p) * frac.clamp(0.0, 1.0);
            }
            prev = *s;
        }
        // Beyond the window: the last slope, which flattens once the
        // working set is covered.
        let n = self.samples.len();
        let slope = match (n.checked_sub(2).map(|i| self.samples[i]), self.samples.last()) {
            (Some(a), Some(b)) if b.after_ms > a.after_ms => {
                (b.distinct_pages as f64 - a.distinct_pages as f64) / (b.after_ms - a.after_ms)
            }
            (None, Some(b)) if b.after_ms > 0.0 => b.distinct_pages as f64 / b.after_ms,
            _ => 0.0,
        };
        (prev.distinct_pages as f64 + slope * (ms - prev.after_ms)).min(self.memory_pages as f64)
    }

    /// Pages per second over the first sample (the rate before the
    /// working set starts to repeat).
    pub fn initial_rate_pages_per_s(&self) -> f64 {
        self.samples
            .first()
            .filter(|s| s.after_ms > 0.0)
            .map_or(0.0, |s| s.distinct_pages as f64 / (s.after_ms / 1e3))
    }

    /// Distinct pages over the whole measurement.
    pub fn working_set_pages(&self) -> u64 {
        self.samples.last().map_or(0, |s| s.distinct_pages)
    }
}

/// Runs `tracker` for `duration`, sampling every `slice`, without sending
/// anything; `stop` ends it early. The tracker is stopped again after.
pub fn measure(
    tracker: &mut dyn DirtyTracker,
    memory_pages: u64,
    duration: Duration,
    slice: Duration,
    stop: impl Fn() -> bool,
) -> Result<DirtyCurve, DirtyError> {
    tracker.start()?;
    let t0 = Instant::now();
    let mut seen = DirtyBitmap::new(memory_pages);
    let mut samples = Vec::new();
    let r = (|| {
        while t0.elapsed() < duration && !stop() {
            std::thread::sleep(slice.min(duration.saturating_sub(t0.elapsed())));
            tracker.collect(&mut seen)?;
            samples.push(DirtySample {
                after_ms: t0.elapsed().as_secs_f64() * 1e3,
                distinct_pages: seen.count(),
            });
        }
        Ok(())
    })();
    let stopped = tracker.stop();
    r?;
    stopped?;
    Ok(DirtyCurve { memory_pages, samples })
}

/// How often [`estimate`] samples the dirty set.
pub const ESTIMATE_SLICE: Duration = Duration::from_millis(100);

/// Watches `guest`'s writes through `tracker` for `duration` (nothing is
/// sent) and predicts pre-copy under `cfg` at `bandwidth_bytes_per_s`, with
/// the limits and policy a migration under `cfg` would apply.
pub fn estimate(
    tracker: &mut dyn DirtyTracker,
    guest: &dyn GuestControl,
    memory_pages: u64,
    cfg: &MigrationConfig,
    bandwidth_bytes_per_s: u64,
    duration: Duration,
) -> Result<Prediction, DirtyError> {
    let curve = measure(tracker, memory_pages, duration, ESTIMATE_SLICE, || false)?;
    let limits = Limits::of(cfg, guest, cfg.max_bandwidth_paused.or(cfg.max_bandwidth));
    Ok(predict(
        &curve,
        bandwidth_bytes_per_s as f64,
        limits,
        Policy::of(cfg, guest, 0.0, 0),
    ))
}

/// What pre-copy would do.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prediction {
    /// Under the policy, the rest would fit the target.
    pub converges: bool,
    /// Why it would give up, if it would.
    pub give_up: Option<GiveUp>,
    /// Under `force`: it would switch over past the target.
    pub forced_past_target: bool,
    /// Live rounds before the switchover (or the give-up).
    pub rounds: u32,
    /// Until the switchover (or the give-up), in seconds.
    pub total_s: f64,
    /// What the paused round would take.
    pub expected_downtime_ms: f64,
    /// The throttle the policy would reach (0: none).
    pub throttle: f64,
    /// The smallest throttle step with which pre-copy converges without
    /// any policy help (`None`: not even the ceiling).
    pub throttle_needed: Option<f64>,
    /// The bandwidth assumed, bytes/s.
    pub bandwidth_bytes_per_s: f64,
    /// The guest's dirty rate before its working set repeats, pages/s.
    pub dirty_rate_pages_per_s: f64,
    /// Distinct pages dirtied over the measurement.
    pub working_set_pages: u64,
    /// The downtime target.
    pub downtime_target_ms: u64,
    /// The policy.
    pub converge: Converge,
}

struct Simulated {
    step: Step,
    rounds: u32,
    total_ms: f64,
    expected_ms: f64,
    throttle: f64,
}

fn simulate(curve: &DirtyCurve, bw: f64, limits: Limits, mut policy: Policy) -> Simulated {
    let mut outcomes = Vec::new();
    let mut pages = curve.memory_pages;
    let mut total_ms = 0.0;
    loop {
        let duration_ms = pages as f64 * PAGE_SIZE_U64 as f64 / bw * 1e3;
        total_ms += duration_ms;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let dirty = curve.distinct_in(duration_ms * (1.0 - policy.throttle)).round() as u64;
        outcomes.push(RoundOutcome {
            pages_sent: pages,
            duration_ms,
            dirty_pages_after: dirty,
        });
        policy.rounds_at_throttle = policy.rounds_at_throttle.saturating_add(1);
        let step = plan(&outcomes, limits, policy);
        let rounds = u32::try_from(outcomes.len()).unwrap_or(u32::MAX);
        match step {
            Step::Another => {}
            Step::Throttle(t) => {
                policy.throttle = t;
                policy.rounds_at_throttle = 0;
            }
            Step::Switchover { .. } | Step::GiveUp(_) => {
                return Simulated {
                    step,
                    rounds,
                    total_ms,
                    expected_ms: super::convergence::expected_downtime_ms(&outcomes, &limits),
                    throttle: policy.throttle,
                };
            }
        }
        pages = dirty;
        // `plan` stops at the round limit; this is only a backstop.
        if outcomes.len() > 10_000 {
            return Simulated {
                step: Step::GiveUp(GiveUp::MaxRounds),
                rounds,
                total_ms,
                expected_ms: f64::INFINITY,
                throttle: policy.throttle,
            };
        }
    }
}

/// Predicts pre-copy of a guest with `curve` at `bandwidth_bytes_per_s`
/// under `limits` and `policy` (its `throttle` is where it starts: 0).
pub fn predict(curve: &DirtyCurve, bandwidth_bytes_per_s: f64, limits: Limits, policy: Policy) -> Prediction {
    let bw = bandwidth_bytes_per_s.max(1.0);
    let sim = simulate(curve, bw, limits, policy);
    // The smallest fixed throttle that converges with no policy help.
    let steps = std::iter::successors(Some(0.0), |t| super::convergence::next_throttle(*t, THROTTLE_CEILING));
    let throttle_needed = steps.into_iter().find(|t| {
        let fixed = Policy {
            converge: Converge::Abort,
            can_throttle: false,
            throttle: *t,
            throttle_max: *t,
            rounds_at_throttle: u32::MAX,
        };
        matches!(
            simulate(curve, bw, limits, fixed).step,
            Step::Switchover { exceeded: false, .. }
        )
    });
    let (converges, give_up, forced) = match sim.step {
        Step::Switchover { exceeded, .. } => (!exceeded, None, exceeded),
        Step::GiveUp(g) => (false, Some(g), false),
        Step::Another | Step::Throttle(_) => (false, None, false),
    };
    Prediction {
        converges,
        give_up,
        forced_past_target: forced,
        rounds: sim.rounds,
        total_s: sim.total_ms / 1e3,
        expected_downtime_ms: sim.expected_ms,
        throttle: sim.throttle,
        throttle_needed,
        bandwidth_bytes_per_s: bw,
        dirty_rate_pages_per_s: curve.initial_rate_pages_per_s(),
        working_set_pages: curve.working_set_pages(),
        downtime_target_ms: limits.downtime_ms_max,
        converge: policy.converge,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest writing `rate` pages/s at random into `hot` pages, sampled
    /// every 100 ms for 2 s.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn curve(rate: f64, hot: f64, memory_pages: u64) -> DirtyCurve {
        DirtyCurve {
            memory_pages,
            samples: (1..=20)
                .map(|i| {
                    let t = f64::from(i) * 100.0;
                    DirtySample {
                        after_ms: t,
                        distinct_pages: (hot * (1.0 - (-rate * t / 1e3 / hot).exp())).round() as u64,
                    }
                })
                .collect(),
        }
    }

    fn policy(converge: Converge) -> Policy {
        Policy {
            converge,
            can_throttle: true,
            throttle: 0.0,
            throttle_max: THROTTLE_CEILING,
            rounds_at_throttle: 0,
        }
    }

    #[test]
    fn the_curve_interpolates_and_extends_along_its_last_slope() {
        let c = DirtyCurve {
            memory_pages: 1000,
            samples: vec![
                DirtySample {
                    after_ms: 100.0,
                    distinct_pages: 100,
                },
                DirtySample {
                    after_ms: 200.0,
                    distinct_pages: 150,
                },
            ],
        };
        assert_eq!(c.distinct_in(50.0), 50.0);
        assert_eq!(c.distinct_in(150.0), 125.0);
        assert_eq!(c.distinct_in(400.0), 250.0);
        assert_eq!(c.distinct_in(1e9), 1000.0, "never more than the guest has");
        assert_eq!(c.initial_rate_pages_per_s(), 1000.0);
        assert_eq!(c.working_set_pages(), 150);
    }

    #[test]
    fn an_idle_guest_converges_after_one_round() {
        let idle = DirtyCurve {
            memory_pages: 262_144,
            samples: vec![DirtySample {
                after_ms: 1000.0,
                distinct_pages: 0,
            }],
        };
        let p = predict(&idle, 1e9, Limits::new(50, 30), policy(Converge::Abort));
        assert!(p.converges && p.rounds == 1, "{p:?}");
        assert_eq!(p.throttle_needed, Some(0.0));
    }

    #[test]
    fn a_heavy_writer_does_not_converge_unless_throttled() {
        // 1 GiB, 100,000 pages/s into a 768 MiB hot set, 0.9 GB/s.
        let heavy = curve(400_000.0, 196_608.0, 262_144);
        let abort = predict(&heavy, 0.9e9, Limits::new(50, 30), policy(Converge::Abort));
        assert!(!abort.converges, "{abort:?}");
        assert_eq!(abort.give_up, Some(GiveUp::Stalled));
        let throttle = predict(&heavy, 0.9e9, Limits::new(50, 30), policy(Converge::Throttle));
        assert!(throttle.converges && throttle.throttle > 0.0, "{throttle:?}");
        assert!(throttle.expected_downtime_ms <= 50.0);
        let needed = abort.throttle_needed.expect("some throttle converges");
        assert!(needed > 0.0 && needed <= THROTTLE_CEILING, "{needed}");
        let force = predict(&heavy, 0.9e9, Limits::new(50, 30), policy(Converge::Force));
        assert!(!force.converges && force.forced_past_target, "{force:?}");
    }
}
