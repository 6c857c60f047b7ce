//! The operator's commands against a running VMM: `ferry migrate` (with a
//! live progress bar on a terminal, one line per round on a pipe, JSON
//! lines with `--json`), `ferry status`, `ferry cancel`, and `ferry report`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::api::{self, Request};
use crate::record::{self, Record};
use crate::size::human;

/// `ferry migrate`.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The VMM's API socket.
    pub api: PathBuf,
    /// JSON lines instead of progress.
    pub json: bool,
    /// Destination control address.
    pub to: std::net::SocketAddr,
    /// Destination host name.
    pub dest_host: String,
    /// Downtime target, if not the VMM's.
    pub downtime_ms_max: Option<u64>,
    /// Where the record goes (default: under the state directory).
    pub record: Option<PathBuf>,
    /// Longest silence from the VMM.
    pub idle_timeout: Duration,
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}
fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}
fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

const PAGE: u64 = ferry_engine::memory::PAGE_SIZE_U64;

/// How the progress is shown.
enum Show {
    Bar(ProgressBar),
    Lines,
    Json,
}

impl Show {
    fn line(&self, text: &str) {
        match self {
            Show::Bar(b) => b.println(text),
            Show::Lines => println!("{text}"),
            Show::Json => {}
        }
    }
}

/// Runs `ferry migrate`: asks the VMM to migrate, shows the progress,
/// writes the record, and exits 0 (migrated), 1 (failed or cancelled: the
/// guest runs at the source) or 3 (in doubt).
pub fn migrate(o: &MigrateOptions) -> Result<ExitCode, String> {
    let show = if o.json {
        Show::Json
    } else if std::io::stdout().is_terminal() {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:>8} [{bar:24}] {percent:>3}% {wide_msg}")
                .map_err(|e| e.to_string())?
                .progress_chars("=> "),
        );
        bar.set_prefix("starting");
        bar.set_message("asking for tickets and admission");
        bar.enable_steady_tick(Duration::from_millis(100));
        Show::Bar(bar)
    } else {
        Show::Lines
    };
    let req = Request::Migrate {
        to: o.to,
        dest_host: o.dest_host.clone(),
        downtime_ms_max: o.downtime_ms_max,
    };
    let mut last: Option<Value> = None;
    // Bandwidth and dirty rate of the last finished round, for the ETA.
    let (mut bw_bytes_per_s, mut dirty_rate, mut expected_ms) = (0.0f64, 0.0f64, 0.0f64);
    // The previous `sending` event's bytes and time, for the live rate.
    let mut prev: Option<(u64, f64)> = None;
    api::call(&o.api, &req, o.idle_timeout, |v| {
        if o.json {
            println!("{v}");
        }
        let ev = s(&v, "event").to_string();
        match ev.as_str() {
            "accepted" => show.line(&format!(
                "migrating {} to {} ({}): tickets, admission, then pre-copy",
                s(&v, "vm"),
                s(&v, "dest_host"),
                s(&v, "to")
            )),
            "sending" => {
                let (bytes, at_ms) = (u(&v, "bytes_on_wire"), f(&v, "elapsed_ms"));
                if let Some((b0, t0)) = prev {
                    if at_ms > t0 && bytes >= b0 {
                        bw_bytes_per_s = (bytes - b0) as f64 / ((at_ms - t0) / 1e3);
                    }
                }
                prev = Some((bytes, at_ms));
                if let Show::Bar(b) = &show {
                    let (sent, total) = (u(&v, "pages_sent"), u(&v, "pages_in_round").max(1));
                    b.set_prefix(format!("round {}", u(&v, "round")));
                    b.set_length(total * PAGE);
                    b.set_position(sent.min(total) * PAGE);
                    let left = (total - sent.min(total)) * PAGE;
                    let eta = if bw_bytes_per_s > 0.0 {
                        format!("{:.1} s", left as f64 / bw_bytes_per_s)
                    } else {
                        "-".into()
                    };
                    // Most telling first: a narrow terminal cuts the end.
                    b.set_message(format!(
                        "ETA {eta} | {:.2} GB/s | {} sent | {} left | dirty {:.0} pages/s | downtime ~{:.1} ms",
                        bw_bytes_per_s / 1e9,
                        human(bytes),
                        human(left),
                        dirty_rate,
                        expected_ms
                    ));
                }
            }
            "round" => {
                bw_bytes_per_s = f(&v, "throughput_gbps") * 1e9;
                if !v.get("is_final").and_then(Value::as_bool).unwrap_or(false) {
                    dirty_rate = f(&v, "dirty_rate_pages_per_s");
                    expected_ms = f(&v, "expected_downtime_ms");
                }
                let final_round = v.get("is_final").and_then(Value::as_bool).unwrap_or(false);
                if let Show::Bar(b) = &show {
                    // The round is done: a full bar, then what is left.
                    b.set_position(b.length().unwrap_or(0));
                    b.set_message(format!(
                        "{} dirty left | {:.2} GB/s | dirty {:.0} pages/s | downtime ~{:.1} ms",
                        human(u(&v, "dirty_pages_after") * PAGE),
                        bw_bytes_per_s / 1e9,
                        dirty_rate,
                        expected_ms
                    ));
                }
                show.line(&format!(
                    "round {}{}: {} in {:.0} ms ({:.2} GB/s), {} dirty after ({:.0} pages/s), expected downtime {:.1} ms",
                    u(&v, "round"),
                    if final_round { " (final, guest paused)" } else { "" },
                    human(u(&v, "bytes_on_wire")),
                    f(&v, "duration_ms"),
                    f(&v, "throughput_gbps"),
                    human(u(&v, "dirty_pages_after") * PAGE),
                    f(&v, "dirty_rate_pages_per_s"),
                    f(&v, "expected_downtime_ms")
                ));
            }
            "paused" => {
                if let Show::Bar(b) = &show {
                    b.set_prefix("final");
                    b.set_message("guest paused: the last dirty pages and the vCPU state");
                }
                show.line(&format!(
                    "switchover: guest paused, final round of {} pages",
                    u(&v, "pages")
                ));
            }
            "committed" => show.line("commit point passed: the guest now belongs to the destination"),
            "resumed" => show.line("the destination runs the guest"),
            _ => {}
        }
        let end = matches!(
            ev.as_str(),
            "migrated" | "migration-failed" | "migration-cancelled" | "migration-in-doubt" | "error"
        );
        if end {
            last = Some(v);
        }
        !end
    })?;
    if let Show::Bar(b) = &show {
        b.finish_and_clear();
    }
    let Some(last) = last else {
        return Err("the VMM closed the connection before the migration ended: check `ferry status`".into());
    };
    if s(&last, "event") == "error" {
        return Err(format!("the VMM refused: {}", s(&last, "error")));
    }
    let mut recorded = None;
    if let Some(rec) = last.get("record") {
        let path = o.record.clone().unwrap_or_else(|| record::default_path(s(rec, "vm")));
        let r: Record =
            serde_json::from_value(rec.clone()).map_err(|e| format!("the VMM's record is malformed: {e}"))?;
        match r.write(&path) {
            Ok(()) => recorded = Some(path),
            Err(why) => eprintln!("ferry: warning: {why}"),
        }
    }
    let rec_note = recorded.map_or(String::new(), |p| format!("; record: {}", p.display()));
    let (text, code) = match s(&last, "event") {
        "migrated" => (
            format!(
                "migrated {} to {}: {} rounds, {} on the wire, downtime {:.2} ms, total {:.0} ms{rec_note}",
                s(&last, "vm"),
                o.dest_host,
                u(&last, "rounds"),
                human(u(&last, "bytes_on_wire")),
                f(&last, "downtime_ms"),
                f(&last, "total_ms")
            ),
            ExitCode::SUCCESS,
        ),
        "migration-in-doubt" => (
            format!("IN DOUBT: {} ({}){rec_note}", s(&last, "reason"), s(&last, "guest")),
            ExitCode::from(3),
        ),
        other => (
            format!(
                "{}: {}; the guest runs at the source{rec_note}",
                if other == "migration-cancelled" {
                    "cancelled"
                } else {
                    "failed"
                },
                s(&last, "reason")
            ),
            ExitCode::FAILURE,
        ),
    };
    if o.json {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
    Ok(code)
}

fn one(path: &Path, req: &Request) -> Result<Value, String> {
    let mut got = None;
    api::call(path, req, Duration::from_secs(10), |v| {
        got = Some(v);
        false
    })?;
    got.ok_or_else(|| "the VMM closed the connection without a reply".into())
}

/// `ferry status`.
pub fn status(path: &Path, json: bool) -> Result<ExitCode, String> {
    let v = one(path, &Request::Status)?;
    if json {
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    if s(&v, "event") == "error" {
        return Err(s(&v, "error").to_string());
    }
    let mut line = format!(
        "{}: {}, {} guest memory, {} vCPU(s), heartbeat {}{}",
        s(&v, "vm"),
        s(&v, "state"),
        human(u(&v, "memory_bytes")),
        u(&v, "vcpus"),
        u(&v, "heartbeat"),
        if v.get("paused").and_then(Value::as_bool).unwrap_or(false) {
            " (paused)"
        } else {
            ""
        }
    );
    if let Some(p) = v.get("progress").filter(|p| !p.is_null()) {
        match s(p, "event") {
            "sending" => {
                line += &format!(
                    "; round {}: {} of {} pages sent",
                    u(p, "round"),
                    u(p, "pages_sent"),
                    u(p, "pages_in_round")
                );
            }
            "round" => {
                line += &format!(
                    "; round {} done, {} pages dirty after",
                    u(p, "round"),
                    u(p, "dirty_pages_after")
                )
            }
            other => line += &format!("; last: {other}"),
        }
    }
    if let Some(e) = v.get("last_error").and_then(Value::as_str) {
        line += &format!("; last migration failed: {e}");
    }
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

/// `ferry cancel`.
pub fn cancel(path: &Path, json: bool) -> Result<ExitCode, String> {
    let v = one(path, &Request::Cancel)?;
    if json {
        println!("{v}");
    }
    if s(&v, "event") == "error" {
        return Err(s(&v, "error").to_string());
    }
    if !json {
        println!("cancel requested: {}", s(&v, "note"));
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry report`.
pub fn report(path: &Path, svg: Option<&Path>) -> Result<ExitCode, String> {
    let r = Record::read(path)?;
    print!("{}", r.summary());
    if let Some(out) = svg {
        record::draw_svg(&r, out)?;
        println!("timeline: {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}
