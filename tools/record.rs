//! The record of one migration (`--record FILE`) and its picture
//! (`ferry report RUN.json --svg OUT.svg`).
//!
//! A record is one JSON object: who moved what where, the outcome, the
//! control plane's timed steps, every round (bytes, pages, dirty rate,
//! bandwidth, start and duration) and the downtime window. `ferry migrate`,
//! `ferry vm --migrate-to` and `ferry demo` write one.

use std::path::{Path, PathBuf};

use ferry_engine::migrate::convergence::Converge;
use ferry_engine::migrate::estimate::Prediction;
use ferry_engine::migrate::{MigrateError, MigrationConfig, RoundStats, SourceReport};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::lab::Step;

const ORANGE: RGBColor = RGBColor(230, 140, 0);
/// The bottom of the bytes panel's log scale (1 KiB).
const FLOOR_MIB: f64 = 1.0 / 1024.0;

/// What a record file says it is.
pub const KIND: &str = "ferry-migration-record";

/// One migration, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Always [`KIND`].
    pub kind: String,
    /// Format version (1).
    pub version: u32,
    /// The VM's id.
    pub vm: String,
    /// The source host.
    pub source_host: String,
    /// The destination host.
    pub dest_host: String,
    /// The authorization ticket's migration id (0 if none was issued).
    pub migration_id: u64,
    /// `migrated`, `failed`, `cancelled` or `in-doubt`.
    pub outcome: String,
    /// Why it did not migrate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it started (Unix milliseconds).
    pub started_unix_ms: u64,
    /// Guest memory.
    pub memory_bytes: u64,
    /// From the engine's start to the destination's confirmation.
    pub total_ms: f64,
    /// The control-plane steps before the transfer, summed.
    pub handshake_ms: f64,
    /// The destination's audit head named in its receipt (SEQ:HASH): check
    /// its log still reaches it with `ferry audit verify --expect`.
    #[serde(default)]
    pub destination_audit_head: Option<String>,
    /// Guest downtime (paused at the source until running at the destination).
    #[serde(default)]
    pub downtime_ms: Option<f64>,
    /// When the downtime began, in milliseconds since the engine started.
    #[serde(default)]
    pub downtime_from_ms: Option<f64>,
    /// Control-plane steps.
    pub steps: Vec<Step>,
    /// Every round, the final one last.
    pub rounds: Vec<RoundStats>,
    /// The downtime promise and what came of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence: Option<Convergence>,
    /// The source's SHA-256 backend for page digests ("ring" or "tape";
    /// none without page digests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// The downtime target, the policy that kept it, and what happened.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Convergence {
    /// The policy: throttle, abort, force (postcopy is refused).
    pub converge: Converge,
    /// converged, forced-past-target, aborted: won't converge, timed-out,
    /// or another failure.
    pub outcome: String,
    /// The operator's target.
    pub downtime_target_ms: u64,
    /// What the paused round was expected to take when pre-copy ended.
    #[serde(default)]
    pub expected_downtime_ms: Option<f64>,
    /// The measured downtime was over the target.
    pub downtime_exceeded: bool,
    /// The highest throttle applied (0..1).
    pub throttle_max: f64,
    /// The live rounds' bandwidth cap, bytes/s (none: unlimited).
    #[serde(default)]
    pub max_bandwidth_bytes_per_s: Option<u64>,
    /// The paused round's cap.
    #[serde(default)]
    pub max_bandwidth_paused_bytes_per_s: Option<u64>,
    /// The estimate made before the migration (`ferry estimate`), if one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Prediction>,
}

impl Convergence {
    /// A completed migration's: `downtime_ms` as the caller measured it;
    /// `caps` the caps in force at the end.
    pub fn of_report(rep: &SourceReport, downtime_ms: f64, caps: (Option<u64>, Option<u64>)) -> Convergence {
        let exceeded = rep.downtime_exceeded(downtime_ms);
        Convergence {
            converge: rep.converge,
            outcome: if rep.forced_past_target {
                "forced-past-target"
            } else {
                "converged"
            }
            .into(),
            downtime_target_ms: rep.downtime_target_ms,
            expected_downtime_ms: Some(rep.expected_downtime_ms),
            downtime_exceeded: exceeded,
            throttle_max: rep.throttle_max,
            max_bandwidth_bytes_per_s: caps.0,
            max_bandwidth_paused_bytes_per_s: caps.1,
            prediction: None,
        }
    }

    /// A migration that failed with `err` under `cfg`.
    pub fn of_failure(cfg: &MigrationConfig, err: &MigrateError, caps: (Option<u64>, Option<u64>)) -> Convergence {
        let (outcome, expected, throttle) = match err {
            MigrateError::WontConverge(n) => ("aborted: won't converge", Some(n.expected_downtime_ms), n.throttle),
            MigrateError::TimedOut(_) => ("timed-out", None, 0.0),
            MigrateError::Cancelled => ("cancelled", None, 0.0),
            _ => ("failed", None, 0.0),
        };
        Convergence {
            converge: cfg.converge,
            outcome: outcome.into(),
            downtime_target_ms: cfg.downtime_ms_max,
            expected_downtime_ms: expected,
            downtime_exceeded: false,
            throttle_max: throttle,
            max_bandwidth_bytes_per_s: caps.0,
            max_bandwidth_paused_bytes_per_s: caps.1,
            prediction: None,
        }
    }

    /// One line for a terminal.
    pub fn line(&self, downtime_ms: Option<f64>) -> String {
        let mut l = format!(
            "  convergence: policy {}, {}; downtime target {} ms, expected {}, actual {}",
            self.converge,
            self.outcome,
            self.downtime_target_ms,
            self.expected_downtime_ms.map_or("-".into(), |d| format!("{d:.2} ms")),
            downtime_ms.map_or("-".into(), |d| format!("{d:.2} ms")),
        );
        if self.downtime_exceeded {
            l += &format!(
                " -- TARGET EXCEEDED by {:.2} ms",
                downtime_ms.unwrap_or(0.0) - self.downtime_target_ms as f64
            );
        }
        l += &crate::size::throttle_note("; throttle up to ", self.throttle_max);
        if let Some(c) = self.max_bandwidth_bytes_per_s {
            l += &format!("; cap {}", crate::size::human_rate(c));
        }
        if let Some(c) = self.max_bandwidth_paused_bytes_per_s {
            l += &format!(" (paused round {})", crate::size::human_rate(c));
        }
        l + "\n"
    }
}

impl Record {
    /// An empty record of a migration of `vm` starting now.
    pub fn new(vm: &str, source_host: &str, dest_host: &str, memory_bytes: u64) -> Record {
        Record {
            kind: KIND.into(),
            version: 1,
            vm: vm.into(),
            source_host: source_host.into(),
            dest_host: dest_host.into(),
            migration_id: 0,
            outcome: "failed".into(),
            error: None,
            started_unix_ms: unix_ms(),
            memory_bytes,
            total_ms: 0.0,
            handshake_ms: 0.0,
            destination_audit_head: None,
            downtime_ms: None,
            downtime_from_ms: None,
            steps: Vec::new(),
            rounds: Vec::new(),
            convergence: None,
            sha256: None,
        }
    }

    /// Writes the record as pretty JSON (creating the folder).
    pub fn write(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write the record {}: {e}", path.display()))
    }

    /// Reads a record written by [`Record::write`].
    pub fn read(path: &Path) -> Result<Record, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let r: Record = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a ferry migration record: {e}", path.display()))?;
        if r.kind != KIND {
            return Err(format!("{} is a {:?}, not a {KIND}", path.display(), r.kind));
        }
        Ok(r)
    }

    /// A few lines for a terminal.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} {} -> {}: {}{}\n",
            self.vm,
            self.source_host,
            self.dest_host,
            self.outcome,
            self.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
        );
        out += &format!(
            "  handshake {:.1} ms, transfer {:.0} ms, downtime {}\n",
            self.handshake_ms,
            self.total_ms,
            self.downtime_ms.map_or("-".into(), |d| format!("{d:.2} ms"))
        );
        if let Some(c) = &self.convergence {
            out += &c.line(self.downtime_ms);
        }
        for r in &self.rounds {
            out += &format!(
                "  round {:>2}{} {:>8.1} MiB in {:>7.1} ms  {:>6.2} GB/s  dirty after {:>7} pages ({:.0} pages/s){}\n",
                r.round,
                if r.is_final { "*" } else { " " },
                r.bytes_on_wire as f64 / f64::from(1u32 << 20),
                r.duration_ms,
                r.throughput_gbps,
                r.dirty_pages_after,
                r.dirty_rate_pages_per_s,
                crate::size::throttle_note("  throttle ", r.throttle)
            );
        }
        out
    }
}

/// `t` in Unix milliseconds.
pub fn unix_ms_at(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    unix_ms_at(std::time::SystemTime::now())
}

/// The state directory: `$FERRY_STATE_DIR`, else /var/lib/ferry for root,
/// else `$HOME/.local/state/ferry`.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_STATE_DIR") {
        return PathBuf::from(d);
    }
    let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    match (root, std::env::var_os("HOME")) {
        (Ok(false), Some(home)) => PathBuf::from(home).join(".local/state/ferry"),
        _ => PathBuf::from("/var/lib/ferry"),
    }
}

/// Where a record goes when no `--record` is given.
pub fn default_path(vm: &str) -> PathBuf {
    let safe: String = vm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    state_dir().join("runs").join(format!("{safe}-{}.json", unix_ms()))
}

fn plot_err(e: impl std::fmt::Display) -> String {
    format!("drawing the report: {e}")
}

/// Draws the record's timeline as SVG: bytes per round, dirty rate and
/// bandwidth per round, and each round on a time axis with the downtime
/// window.
pub fn draw_svg(r: &Record, out: &Path) -> Result<(), String> {
    if r.rounds.is_empty() {
        return Err("the record has no rounds to draw (the migration failed before its first round)".into());
    }
    let root = SVGBackend::new(out, (960, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let title = format!(
        "ferry: {} {} -> {} ({}), downtime {}{}",
        r.vm,
        r.source_host,
        r.dest_host,
        r.outcome,
        r.downtime_ms.map_or("-".into(), |d| format!("{d:.2} ms")),
        r.convergence.as_ref().map_or(String::new(), |c| format!(
            " (target {} ms{})",
            c.downtime_target_ms,
            if c.downtime_exceeded { ", EXCEEDED" } else { "" }
        ))
    );
    let root = root.titled(&title, ("sans-serif", 20)).map_err(plot_err)?;
    let panels = root.split_evenly((3, 1));
    let n = u32::try_from(r.rounds.len()).unwrap_or(u32::MAX);
    let rounds = 0u32..n + 1;

    // 1. Bytes per round.
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let top = r.rounds.iter().map(|x| mib(x.bytes_on_wire)).fold(1.0, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&panels[0])
        .caption(
            "bytes on the wire per round (MiB, log scale; red: the paused round)",
            ("sans-serif", 15),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        // Log scale: the first round is often a thousand times the last.
        .build_cartesian_2d(rounds.clone().into_segmented(), (FLOOR_MIB..top).log_scale())
        .map_err(plot_err)?;
    c.configure_mesh()
        .x_desc("round")
        .y_desc("MiB")
        .draw()
        .map_err(plot_err)?;
    for x in &r.rounds {
        let color = if x.is_final { RED } else { BLUE };
        c.draw_series(std::iter::once(Rectangle::new(
            [
                (SegmentValue::Exact(x.round), mib(x.bytes_on_wire).max(FLOOR_MIB)),
                (SegmentValue::Exact(x.round + 1), FLOOR_MIB),
            ],
            color.mix(0.6).filled(),
        )))
        .map_err(plot_err)?;
    }

    // 2. Dirty rate and bandwidth per pre-copy round.
    let live: Vec<&RoundStats> = r.rounds.iter().filter(|x| !x.is_final).collect();
    let top_rate = live.iter().map(|x| x.dirty_rate_pages_per_s).fold(1.0, f64::max) * 1.1;
    let top_bw = r.rounds.iter().map(|x| x.throughput_gbps).fold(0.1, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&panels[1])
        .caption(
            "dirty rate (pages/s, orange), bandwidth (GB/s, green), throttle (purple, 0-100 % of the left axis) per round",
            ("sans-serif", 15),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(1f64..f64::from(n.max(2)), 0.0..top_rate)
        .map_err(plot_err)?
        .set_secondary_coord(1f64..f64::from(n.max(2)), 0.0..top_bw);
    c.configure_mesh()
        .x_desc("round")
        .y_desc("pages/s")
        .draw()
        .map_err(plot_err)?;
    c.configure_secondary_axes().y_desc("GB/s").draw().map_err(plot_err)?;
    c.draw_series(LineSeries::new(
        live.iter().map(|x| (f64::from(x.round), x.dirty_rate_pages_per_s)),
        ORANGE.stroke_width(2),
    ))
    .map_err(plot_err)?;
    c.draw_series(
        live.iter()
            .map(|x| Circle::new((f64::from(x.round), x.dirty_rate_pages_per_s), 4, ORANGE.filled())),
    )
    .map_err(plot_err)?;
    c.draw_secondary_series(LineSeries::new(
        r.rounds.iter().map(|x| (f64::from(x.round), x.throughput_gbps)),
        GREEN.stroke_width(2),
    ))
    .map_err(plot_err)?;
    if live.iter().any(|x| x.throttle > 0.0) {
        c.draw_series(LineSeries::new(
            live.iter().map(|x| (f64::from(x.round), x.throttle * top_rate / 1.1)),
            MAGENTA.stroke_width(2),
        ))
        .map_err(plot_err)?;
    }

    // 3. Timeline: each round as a bar over time, the downtime window in red.
    let end = r
        .rounds
        .iter()
        .map(|x| x.started_ms + x.duration_ms)
        .fold(r.total_ms, f64::max)
        .max(1.0);
    let mut c = ChartBuilder::on(&panels[2])
        .caption(
            "timeline (ms since the transfer started; red band: downtime)",
            ("sans-serif", 15),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end * 1.02, 0.0..f64::from(n) + 1.0)
        .map_err(plot_err)?;
    c.configure_mesh()
        .x_desc("ms")
        .y_desc("round")
        .draw()
        .map_err(plot_err)?;
    if let (Some(from), Some(d)) = (r.downtime_from_ms, r.downtime_ms) {
        // At least a pixel wide: a downtime of a millisecond in a
        // two-second migration would not show otherwise.
        let w = d.max(end / 480.0);
        c.draw_series(std::iter::once(Rectangle::new(
            [(from, 0.0), (from + w, f64::from(n) + 1.0)],
            RED.mix(0.35).filled(),
        )))
        .map_err(plot_err)?;
    }
    for x in &r.rounds {
        let y = f64::from(x.round);
        let color = if x.is_final { RED } else { BLUE };
        c.draw_series(std::iter::once(Rectangle::new(
            [
                (x.started_ms, y - 0.35),
                (x.started_ms + x.duration_ms.max(end / 960.0), y + 0.35),
            ],
            color.filled(),
        )))
        .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut r = Record::new("vm-1", "src", "dst", 1 << 30);
        r.outcome = "migrated".into();
        r.total_ms = 900.0;
        r.downtime_ms = Some(1.5);
        r.downtime_from_ms = Some(880.0);
        for i in 1..=3u32 {
            let mut x = RoundStats::default();
            x.round = i;
            x.pages = 1000 / u64::from(i);
            x.bytes_on_wire = (1 << 22) / u64::from(i);
            x.duration_ms = 300.0 / f64::from(i);
            x.started_ms = f64::from(i - 1) * 310.0;
            x.dirty_rate_pages_per_s = 2000.0;
            x.throughput_gbps = 1.0;
            x.is_final = i == 3;
            r.rounds.push(x);
        }
        r
    }

    #[test]
    fn a_record_reads_back_and_refuses_other_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("runs/r.json");
        sample().write(&p).unwrap();
        let back = Record::read(&p).unwrap();
        assert_eq!(back.rounds.len(), 3);
        assert_eq!(back.downtime_ms, Some(1.5));
        assert!(back.summary().contains("round  3*"));
        std::fs::write(&p, r#"{"kind":"something-else"}"#).unwrap();
        assert!(Record::read(&p).unwrap_err().contains("not a ferry migration record"));
    }

    #[test]
    fn the_svg_shows_every_round_and_the_downtime() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.svg");
        draw_svg(&sample(), &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("downtime 1.50 ms"));
        // Three byte bars, three timeline bars and the downtime band, at least.
        assert!(svg.matches("<rect").count() >= 7, "{svg}");
        assert!(svg.contains("<polyline"), "the dirty-rate and bandwidth lines");
        let mut empty = sample();
        empty.rounds.clear();
        assert!(draw_svg(&empty, &out).unwrap_err().contains("no rounds"));
    }
}
