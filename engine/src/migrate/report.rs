//! What a migration did, as each side saw it.

use std::time::{Duration, Instant};

use super::convergence::{Converge, StopReason};

/// What one pre-copy round did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RoundStats {
    /// Round number (1-based); the last one is the final (paused) round.
    pub round: u32,
    /// Pages sent (zero pages included).
    pub pages: u64,
    /// All-zero pages among them.
    pub zero_pages: u64,
    /// Frames sent.
    pub frames: u64,
    /// Bytes written to the streams.
    pub bytes_on_wire: u64,
    /// From dispatch until every frame was acknowledged.
    pub duration_ms: f64,
    /// Pages found dirty when the round ended (what the next round sends).
    pub dirty_pages_after: u64,
    /// Guest bytes moved per second in this round.
    pub throughput_gbps: f64,
    /// Time to collect the dirty set after the round, in milliseconds.
    pub dirty_scan_ms: f64,
    /// Whether the guest was paused (the stop-and-copy round).
    pub is_final: bool,
    /// When the round started, in milliseconds since the migration started.
    pub started_ms: f64,
    /// Pages the guest dirtied per second during this round (pre-copy
    /// rounds: `dirty_pages_after` over the round's duration).
    pub dirty_rate_pages_per_s: f64,
    /// What the final round would take if it started now: the dirty bytes
    /// left over the best bandwidth seen so far, plus stopping the guest and
    /// its device state (pre-copy rounds).
    pub expected_downtime_ms: f64,
    /// Share of time taken from the guest during this round (0: none).
    #[serde(default)]
    pub throttle: f64,
    /// The bandwidth cap in force when the round started (bytes/s; none:
    /// unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_cap_bytes_per_s: Option<u64>,
    /// The stream's transcript (final round, per-stream reports only).
    #[serde(skip)]
    pub(super) transcript: Option<[u8; 32]>,
}

/// What the source saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceReport {
    /// Every round, the final one last.
    pub rounds: Vec<RoundStats>,
    /// Why the live rounds ended.
    pub precopy_stop: StopReason,
    /// The convergence policy in force.
    pub converge: Converge,
    /// The operator's downtime target.
    pub downtime_target_ms: u64,
    /// What the paused round was expected to take when pre-copy ended
    /// (pages left, device state and stopping the guest).
    pub expected_downtime_ms: f64,
    /// The expected downtime was over the target and the policy (`force`)
    /// switched over anyway.
    pub forced_past_target: bool,
    /// The highest throttle applied (0..1; 0: none).
    pub throttle_max: f64,
    /// Pages sent over all rounds.
    pub pages_sent: u64,
    /// Zero pages among them.
    pub zero_pages: u64,
    /// Bytes written to the data streams (frames, both kinds).
    pub bytes_on_wire: u64,
    /// Size of the device state sent.
    pub device_state_bytes: usize,
    /// Name of the dirty tracker.
    pub tracker: &'static str,
    /// The SHA-256 backend of the page digests ("ring" or "tape").
    pub sha256: &'static str,
    /// When the guest was paused at the source.
    #[serde(skip)]
    pub paused_at: Instant,
    /// When the destination's Ready arrived (the commit point).
    #[serde(skip)]
    pub committed_at: Instant,
    /// When the destination confirmed the guest runs.
    #[serde(skip)]
    pub resumed_confirmed_at: Instant,
    /// When the migration started.
    #[serde(skip)]
    pub started_at: Instant,
    /// SHA-256 root over every stream's transcript of what was sent.
    #[serde(skip)]
    pub transcript_root: [u8; 32],
}

impl SourceReport {
    /// Guest downtime as the source sees it: from the pause until the
    /// destination confirmed the guest runs.
    pub fn downtime(&self) -> Duration {
        self.resumed_confirmed_at.saturating_duration_since(self.paused_at)
    }
    /// From the start until the destination confirmed the guest runs.
    pub fn total(&self) -> Duration {
        self.resumed_confirmed_at.saturating_duration_since(self.started_at)
    }
    /// When the guest was paused, counted from the start.
    pub fn paused_after(&self) -> Duration {
        self.paused_at.saturating_duration_since(self.started_at)
    }
    /// Whether `downtime_ms` (as the caller measured it) broke the target.
    pub fn downtime_exceeded(&self, downtime_ms: f64) -> bool {
        downtime_ms > self.downtime_target_ms as f64
    }
}

/// What the destination saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DestReport {
    /// Frames received on all streams.
    pub frames: u64,
    /// Pages written (zero pages included).
    pub pages: u64,
    /// Bytes read from the data streams.
    pub bytes_received: u64,
    /// When the guest was resumed here.
    #[serde(skip)]
    pub resumed_at: Instant,
    /// SHA-256 root over every stream's transcript of what was received.
    #[serde(skip)]
    pub transcript_root: [u8; 32],
    /// How long recording the commit durably took (inside the downtime;
    /// zero without a decision record).
    pub commit_record_ms: f64,
}

/// Guest bytes per second in GB/s.
pub(super) fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}
