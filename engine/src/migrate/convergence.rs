//! When pre-copy stops, and what to do when it cannot converge: pure
//! decisions over the rounds so far.
//!
//! After each live round the controller asks [`plan`] what next. [`decide`]
//! says whether the rest fits the downtime target (stop), is worth another
//! round, or has stopped shrinking; [`plan`] applies the operator's
//! [`Converge`] policy on top: switch over, throttle the guest harder,
//! give up before pausing, or (`force`) pause anyway and say by how much
//! the target is exceeded. The guest is never paused with an expected
//! paused round over the target unless the policy is `force`. Nothing here
//! reads a clock or touches the guest, so every branch is tested below by
//! table.

use super::MigrationConfig;
use crate::guest::GuestControl;
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

/// Pre-copy ends only when the expected paused round fits in this share of
/// the target: the rest covers what the estimate cannot see (pages written
/// between the last scan and the pause, the commit's round trips).
pub const TARGET_HEADROOM: f64 = 0.9;
/// Under `throttle`, a round "does not shrink" while what it left dirty is
/// more than `1 / THROTTLE_SHRINK` of what it sent (the next round would not
/// be at most half as long; QEMU's auto-converge uses the same ratio).
pub const THROTTLE_SHRINK: u64 = 2;

/// The first throttle [`plan`] asks for (share of time taken from the guest).
pub const THROTTLE_INITIAL: f64 = 0.2;
/// Each further step adds this much ...
pub const THROTTLE_STEP: f64 = 0.1;
/// ... up to this (the guest keeps 1 % of its time: it still runs, its
/// timers and watchdogs still fire).
pub const THROTTLE_CEILING: f64 = 0.99;

/// What to do when pre-copy cannot fit the rest in the downtime target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Converge {
    /// Slow the guest down in steps until the rest fits; give up (before
    /// pausing) if even the highest throttle does not make it fit.
    Throttle,
    /// Switch to post-copy (not available yet: refused by the configuration
    /// check).
    Postcopy,
    /// Give up before pausing, with the measured dirty rate and bandwidth.
    /// The default: the only policy with no effect on the guest (it never
    /// stops longer than promised and is never slowed unless asked).
    #[default]
    Abort,
    /// Switch over anyway at the round limit or a stall, and report by how
    /// much the downtime target was exceeded.
    Force,
}

impl Converge {
    /// For logs, reports and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Converge::Throttle => "throttle",
            Converge::Postcopy => "postcopy",
            Converge::Abort => "abort",
            Converge::Force => "force",
        }
    }
}

impl std::fmt::Display for Converge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown convergence policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown convergence policy {0:?}: use throttle, postcopy, abort or force")]
pub struct UnknownConverge(pub String);

impl std::str::FromStr for Converge {
    type Err = UnknownConverge;
    fn from_str(s: &str) -> Result<Converge, UnknownConverge> {
        match s {
            "throttle" => Ok(Converge::Throttle),
            "postcopy" => Ok(Converge::Postcopy),
            "abort" => Ok(Converge::Abort),
            "force" => Ok(Converge::Force),
            other => Err(UnknownConverge(other.into())),
        }
    }
}

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
    /// What the paused round costs besides sending, in milliseconds:
    /// stopping the guest.
    pub fixed_ms: f64,
    /// Bytes the paused round sends besides its pages: the device state.
    pub state_bytes: u64,
    /// The bandwidth cap in force for the paused round, if any (bytes/s).
    pub paused_cap_bytes_per_s: Option<f64>,
}

impl Limits {
    /// The limits `cfg` sets for `guest` (its device state, its last stop
    /// time), with `paused_cap` the paused round's bandwidth cap in force.
    pub fn of(cfg: &MigrationConfig, guest: &dyn GuestControl, paused_cap: Option<u64>) -> Limits {
        Limits {
            downtime_ms_max: cfg.downtime_ms_max,
            max_rounds: cfg.max_rounds,
            fixed_ms: guest.stop_latency().as_secs_f64() * 1e3,
            state_bytes: guest.device_state_bytes_hint() as u64,
            paused_cap_bytes_per_s: paused_cap.map(|c| c as f64),
        }
    }

    /// Only a target and a round limit (no fixed cost, no cap).
    pub fn new(downtime_ms_max: u64, max_rounds: u32) -> Limits {
        Limits {
            downtime_ms_max,
            max_rounds,
            fixed_ms: 0.0,
            state_bytes: 0,
            paused_cap_bytes_per_s: None,
        }
    }
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
        if r.duration_ms > 0.0 && best.is_none_or(|(pages, _)| r.pages_sent >= pages) {
            best = Some((
                r.pages_sent,
                r.pages_sent as f64 * PAGE_SIZE_U64 as f64 / (r.duration_ms / 1e3),
            ));
        }
    }
    best.map(|(_, bw)| bw)
}

/// The rate a paused round of about the last round's size gets: the lower
/// of the largest round's and the last round's (a small round runs slower
/// than a large one: latency weighs more).
fn paused_round_bandwidth(rounds: &[RoundOutcome]) -> Option<f64> {
    let best = bandwidth_bytes_per_s(rounds)?;
    let last = rounds
        .last()
        .filter(|r| r.duration_ms > 0.0 && r.pages_sent > 0)
        .map(|r| r.pages_sent as f64 * PAGE_SIZE_U64 as f64 / (r.duration_ms / 1e3));
    Some(last.map_or(best, |l| l.min(best)))
}

/// What a round costs besides moving its bytes (dispatch, the last
/// acknowledgement's round trip, a paced batch), in milliseconds: the
/// smallest round after the first (the latest of equals) is the one most
/// like a paused round of few pages; its duration minus its bytes over the
/// largest round's bandwidth (never negative). The paused round pays it
/// too, however few pages it sends. 0 until there are two rounds.
pub fn round_latency_ms(rounds: &[RoundOutcome]) -> f64 {
    let Some(bw) = bandwidth_bytes_per_s(rounds).filter(|b| *b > 0.0) else {
        return 0.0;
    };
    let smallest = rounds.iter().skip(1).rev().min_by_key(|r| r.pages_sent);
    smallest.map_or(0.0, |r| {
        (r.duration_ms - r.pages_sent as f64 * PAGE_SIZE_U64 as f64 / bw * 1e3).max(0.0)
    })
}

/// What the paused round would take if it started after the last round:
/// the dirty bytes left over the bandwidth (the lower of the largest and the
/// last round's, or the paused round's cap if lower still), with the device state, plus the time to stop the
/// guest; infinite while the bandwidth is unknown.
pub fn expected_downtime_ms(rounds: &[RoundOutcome], limits: &Limits) -> f64 {
    let Some(last) = rounds.last() else {
        return f64::INFINITY;
    };
    let bw = paused_round_bandwidth(rounds).map(|bw| limits.paused_cap_bytes_per_s.map_or(bw, |cap| bw.min(cap)));
    match bw {
        Some(bw) if bw > 0.0 => {
            (last.dirty_pages_after as f64 * PAGE_SIZE_U64 as f64 + limits.state_bytes as f64) / bw * 1e3
                + round_latency_ms(rounds)
                + limits.fixed_ms
        }
        _ => f64::INFINITY,
    }
}

/// Whether to run another live round after `rounds` (oldest first, the
/// round just finished last; never empty when called).
pub fn decide(rounds: &[RoundOutcome], limits: Limits) -> Decision {
    let Some((last, before)) = rounds.split_last() else {
        return Decision::Another;
    };
    let expected_ms = expected_downtime_ms(rounds, &limits);
    let within_target = expected_ms <= limits.downtime_ms_max as f64 * TARGET_HEADROOM;
    // Only the pages' share of the paused round can shrink with another round.
    let pages_ms = expected_ms - limits.fixed_ms - round_latency_ms(rounds);
    let worth_another = last.dirty_pages_after * WORTHWHILE_SHRINK <= last.pages_sent && pages_ms > WORTHWHILE_MS;
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

/// How the policy may act on the guest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// What to do when pre-copy does not converge.
    pub converge: Converge,
    /// Whether the guest can be throttled.
    pub can_throttle: bool,
    /// The throttle in force now (0: none).
    pub throttle: f64,
    /// The highest throttle the operator allows (at most [`THROTTLE_CEILING`]).
    pub throttle_max: f64,
    /// Live rounds finished under `throttle`. A throttle set just before a
    /// round acts only partway through it, so the highest one is judged
    /// after a whole round of its own.
    pub rounds_at_throttle: u32,
}

impl Policy {
    /// `cfg`'s policy for `guest`, with `throttle` in force for
    /// `rounds_at_throttle` rounds.
    pub fn of(cfg: &MigrationConfig, guest: &dyn GuestControl, throttle: f64, rounds_at_throttle: u32) -> Policy {
        Policy {
            converge: cfg.converge,
            can_throttle: guest.can_throttle(),
            throttle,
            throttle_max: cfg.throttle_max,
            rounds_at_throttle,
        }
    }
}

/// Why pre-copy gave up without pausing the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GiveUp {
    /// The dirty set stopped shrinking.
    Stalled,
    /// The configured number of live rounds ran.
    MaxRounds,
    /// The highest allowed throttle did not make the rest fit.
    ThrottleLimit,
    /// The guest cannot be throttled (its [`crate::guest::GuestControl`]
    /// does not implement it).
    CannotThrottle,
}

impl GiveUp {
    /// For logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUp::Stalled => "the dirty set stopped shrinking",
            GiveUp::MaxRounds => "the round limit was reached",
            GiveUp::ThrottleLimit => "even the highest allowed throttle did not make it fit",
            GiveUp::CannotThrottle => "the guest cannot be throttled",
        }
    }
}

/// What the controller does after a live round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// Run another live round as things are.
    Another,
    /// Set the guest's throttle to this, then run another live round.
    Throttle(f64),
    /// Pause the guest and send the rest. `exceeded`: the expected paused
    /// round is over the target (only under [`Converge::Force`]).
    Switchover {
        /// Why pre-copy ended.
        why: StopReason,
        /// The downtime target will be exceeded.
        exceeded: bool,
    },
    /// End the migration before pausing: the guest keeps running.
    GiveUp(GiveUp),
}

/// The next throttle after `now`, or `None` at `max`.
pub fn next_throttle(now: f64, max: f64) -> Option<f64> {
    let max = max.min(THROTTLE_CEILING);
    if now >= max {
        return None;
    }
    let next = if now <= 0.0 {
        THROTTLE_INITIAL
    } else if now + THROTTLE_STEP > 0.9 + 1e-9 {
        THROTTLE_CEILING
    } else {
        now + THROTTLE_STEP
    };
    Some(next.min(max))
}

/// What to do after `rounds` (oldest first, the round just finished last)
/// under `policy`: [`decide`], then the policy when it does not converge.
/// Under `throttle`, the throttle goes up one step after every round that
/// did not shrink (see [`THROTTLE_SHRINK`]) while the rest does not fit,
/// and never down.
pub fn plan(rounds: &[RoundOutcome], limits: Limits, policy: Policy) -> Step {
    let raise = || {
        if !policy.can_throttle {
            return Step::GiveUp(GiveUp::CannotThrottle);
        }
        match next_throttle(policy.throttle, policy.throttle_max) {
            Some(t) => Step::Throttle(t),
            // The highest throttle was set just before the round judged: one
            // more round (still bounded by the round limit) first.
            None if policy.throttle > 0.0 && policy.rounds_at_throttle < 2 => Step::Another,
            None => Step::GiveUp(GiveUp::ThrottleLimit),
        }
    };
    match decide(rounds, limits) {
        Decision::Stop(StopReason::Converged) => Step::Switchover {
            why: StopReason::Converged,
            exceeded: false,
        },
        Decision::Stop(why) => match policy.converge {
            Converge::Force => Step::Switchover { why, exceeded: true },
            Converge::Throttle if why == StopReason::Stalled => raise(),
            _ => Step::GiveUp(match why {
                StopReason::MaxRounds => GiveUp::MaxRounds,
                _ => GiveUp::Stalled,
            }),
        },
        Decision::Another => {
            let over = expected_downtime_ms(rounds, &limits) > limits.downtime_ms_max as f64;
            let not_shrinking = rounds
                .last()
                .is_some_and(|last| last.dirty_pages_after * THROTTLE_SHRINK > last.pages_sent);
            // At the highest allowed throttle a round that still shrinks
            // (if not by half) gets another round: only a stall there, or
            // the round limit, gives up.
            let can_raise = next_throttle(policy.throttle, policy.throttle_max).is_some();
            if policy.converge == Converge::Throttle && policy.can_throttle && over && not_shrinking && can_raise {
                raise()
            } else {
                Step::Another
            }
        }
    }
}

#[cfg(test)]
mod tests;
