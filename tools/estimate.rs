//! `estimate` for the front ends (`ferry estimate`, `ferry demo
//! --estimate-s`): the bandwidth to assume, the engine's estimate, and its
//! prediction in a line for people.

use std::time::Duration;

use ferry_engine::dirty::{DirtyError, DirtyTracker};
use ferry_engine::guest::GuestControl;
use ferry_engine::migrate::convergence::GiveUp;
use ferry_engine::migrate::estimate::Prediction;
use ferry_engine::migrate::MigrationConfig;
use ferry_engine::GuestMemory;

/// `estimate`'s settings.
#[derive(Debug, Clone, Copy)]
pub struct EstimateOptions {
    /// How long to watch the guest (0.2..=600 s).
    pub seconds: f64,
    /// The bandwidth to predict for (bytes/s; default: the cap).
    pub bandwidth_bytes_per_s: Option<u64>,
}

/// Why no prediction was made.
#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    /// Neither a bandwidth nor a cap was given.
    #[error("an estimate needs the link's bandwidth (ferry cannot know it without sending): give --bandwidth (ferry estimate), --estimate-bandwidth (ferry demo) or a --max-bandwidth")]
    NoBandwidth,
    /// The dirty tracker failed.
    #[error("measuring the dirty rate: {0}")]
    Measure(#[from] DirtyError),
}

/// Watches the guest's writes (nothing is sent) and predicts pre-copy under
/// `cfg` at the given bandwidth, or the cap.
pub fn run(
    est: &EstimateOptions,
    cfg: &MigrationConfig,
    tracker: &mut dyn DirtyTracker,
    guest: &dyn GuestControl,
    mem: &GuestMemory,
) -> Result<Prediction, EstimateError> {
    let bw = est
        .bandwidth_bytes_per_s
        .or(cfg.max_bandwidth)
        .ok_or(EstimateError::NoBandwidth)?;
    let duration = Duration::from_secs_f64(est.seconds.clamp(0.2, 600.0));
    Ok(ferry_engine::migrate::estimate::estimate(
        tracker,
        guest,
        mem.pages(),
        cfg,
        bw,
        duration,
    )?)
}

/// A prediction for people.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn prediction_line(p: &Prediction) -> String {
    let verdict = if p.converges {
        format!(
            "converges in {} rounds, {:.1} s, downtime ~{:.1} ms",
            p.rounds, p.total_s, p.expected_downtime_ms
        )
    } else if p.forced_past_target {
        format!(
            "does not converge: policy force would switch over after {} rounds with ~{:.0} ms of downtime",
            p.rounds, p.expected_downtime_ms
        )
    } else {
        format!(
            "does NOT converge ({}): the paused round would take ~{:.0} ms",
            p.give_up.map_or("?", GiveUp::as_str),
            p.expected_downtime_ms
        )
    };
    let needed = match p.throttle_needed {
        Some(t) if t > 0.0 => format!("; it would need a throttle of {:.0} %", t * 100.0),
        Some(_) => String::new(),
        None => "; not even the highest throttle would make it fit".into(),
    };
    format!(
        "estimate: the guest dirties {:.0} pages/s (working set {} pages seen); at {} with a {} ms target, policy {}: {verdict}{}{needed}",
        p.dirty_rate_pages_per_s,
        p.working_set_pages,
        crate::size::human_rate(p.bandwidth_bytes_per_s as u64),
        p.downtime_target_ms,
        p.converge,
        if p.throttle > 0.0 {
            format!(" (throttled {:.0} %)", p.throttle * 100.0)
        } else {
            String::new()
        }
    )
}
