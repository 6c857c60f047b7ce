//! `estimate` in the demo: watch the source guest's writes (nothing is
//! sent) and predict pre-copy before migrating.

use super::*;
/// `estimate`'s settings.
#[derive(Debug, Clone, Copy)]
pub struct EstimateOptions {
    /// How long to watch the guest.
    pub seconds: f64,
    /// The bandwidth to predict for (bytes/s; default: the cap).
    pub bandwidth_bytes_per_s: Option<u64>,
}

/// Watches the guest's writes for a few seconds (nothing is sent) and
/// predicts pre-copy under `cfg` at the given bandwidth.
pub fn estimate(
    est: &EstimateOptions,
    cfg: &MigrationConfig,
    tracker: &mut dyn DirtyTracker,
    guest: &mut dyn GuestControl,
    mem: &GuestMemory,
    say: &mut dyn FnMut(&str),
) -> Result<Prediction, DemoError> {
    let bw = est.bandwidth_bytes_per_s.or(cfg.max_bandwidth).ok_or_else(|| {
        DemoError::Setup(
            "an estimate needs the link's bandwidth (ferry cannot know it without sending): give --estimate-bandwidth or --max-bandwidth"
                .into(),
        )
    })?;
    let curve = measure(
        tracker,
        mem.pages(),
        Duration::from_secs_f64(est.seconds.clamp(0.2, 600.0)),
        ESTIMATE_SLICE,
        || false,
    )
    .map_err(|e| DemoError::Setup(format!("measuring the dirty rate: {e}")))?;
    let limits = Limits {
        state_bytes: guest.device_state_bytes_hint() as u64,
        paused_cap_bytes_per_s: cfg.max_bandwidth_paused.or(cfg.max_bandwidth).map(|c| c as f64),
        ..Limits::new(cfg.downtime_ms_max, cfg.max_rounds)
    };
    let policy = Policy {
        converge: cfg.converge,
        can_throttle: guest.can_throttle(),
        throttle: 0.0,
        throttle_max: cfg.throttle_max,
    };
    let p = predict(&curve, bw as f64, limits, policy);
    say(&prediction_line(&p));
    Ok(p)
}

/// How often `estimate` samples the dirty set.
const ESTIMATE_SLICE: Duration = Duration::from_millis(100);

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
