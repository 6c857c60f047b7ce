//! The operator's commands against a running VMM: `ferry migrate` (with a
//! live progress bar on a terminal, one line per round on a pipe, JSON
//! lines with `--json`), `ferry status`, `ferry cancel`, and `ferry report`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::api::{self, ApiReply, Ended, Reply, Request};
use crate::record::{self, Record};
use crate::size::human;
use ferry_engine::progress::Progress;

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
    /// This migration's settings over the VMM's.
    pub tuning: api::Tuning,
    /// Where the record goes (default: under the state directory).
    pub record: Option<PathBuf>,
    /// Longest silence from the VMM.
    pub idle_timeout: Duration,
}

/// A reply as its JSON line (for `--json`).
fn json_line(v: &Reply) -> String {
    serde_json::to_string(v).unwrap_or_default()
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
/// guest runs at the source), 3 (in doubt) or 4 (migrated, but without the
/// destination's signed receipt).
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
    let req = o.tuning.request(o.to, o.dest_host.clone());
    let mut last: Option<ApiReply> = None;
    // Bandwidth and dirty rate of the last finished round, for the ETA.
    let (mut bw_bytes_per_s, mut dirty_rate, mut expected_ms) = (0.0f64, 0.0f64, 0.0f64);
    // The previous `sending` event's bytes and time, for the live rate.
    let mut prev: Option<(u64, f64)> = None;
    api::call(&o.api, &req, o.idle_timeout, |v| {
        if o.json {
            println!("{}", json_line(&v));
        }
        if v.ends_migration() {
            if let Reply::Api(a) = v {
                last = Some(a);
            }
            return false;
        }
        match v {
            Reply::Api(ApiReply::Accepted { vm, to, dest_host, .. }) => show.line(&format!(
                "migrating {vm} to {dest_host} ({to}): tickets, admission, then pre-copy"
            )),
            Reply::Progress(Progress::Sending {
                round,
                pages_sent,
                pages_in_round,
                bytes_on_wire,
                elapsed_ms,
            }) => {
                if let Some((b0, t0)) = prev {
                    if elapsed_ms > t0 && bytes_on_wire >= b0 {
                        bw_bytes_per_s = (bytes_on_wire - b0) as f64 / ((elapsed_ms - t0) / 1e3);
                    }
                }
                prev = Some((bytes_on_wire, elapsed_ms));
                if let Show::Bar(b) = &show {
                    let (sent, total) = (pages_sent, pages_in_round.max(1));
                    b.set_prefix(format!("round {round}"));
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
                        human(bytes_on_wire),
                        human(left),
                        dirty_rate,
                        expected_ms
                    ));
                }
            }
            Reply::Progress(Progress::Round { stats: r, .. }) => {
                bw_bytes_per_s = r.throughput_gbps * 1e9;
                if !r.is_final {
                    dirty_rate = r.dirty_rate_pages_per_s;
                    expected_ms = r.expected_downtime_ms;
                }
                if let Show::Bar(b) = &show {
                    // The round is done: a full bar, then what is left.
                    b.set_position(b.length().unwrap_or(0));
                    b.set_message(format!(
                        "{} dirty left | {:.2} GB/s | dirty {:.0} pages/s | downtime ~{:.1} ms{}",
                        human(r.dirty_pages_after * PAGE),
                        bw_bytes_per_s / 1e9,
                        dirty_rate,
                        expected_ms,
                        crate::size::throttle_note(" | throttle ", r.throttle)
                    ));
                }
                show.line(&format!(
                    "round {}{}: {} in {:.0} ms ({:.2} GB/s), {} dirty after ({:.0} pages/s), expected downtime {:.1} ms{}",
                    r.round,
                    if r.is_final { " (final, guest paused)" } else { "" },
                    human(r.bytes_on_wire),
                    r.duration_ms,
                    r.throughput_gbps,
                    human(r.dirty_pages_after * PAGE),
                    r.dirty_rate_pages_per_s,
                    r.expected_downtime_ms,
                    crate::size::throttle_note(", throttle ", r.throttle)
                ));
            }
            Reply::Progress(Progress::Paused {
                pages,
                expected_downtime_ms,
                downtime_target_ms,
                exceeds_target,
                ..
            }) => {
                if let Show::Bar(b) = &show {
                    b.set_prefix("final");
                    b.set_message("guest paused: the last dirty pages and the vCPU state");
                }
                show.line(&format!(
                    "switchover: guest paused, final round of {pages} pages, expected downtime {expected_downtime_ms:.1} ms (target {downtime_target_ms} ms)"
                ));
                if exceeds_target {
                    show.line(&format!(
                        "WARNING: --converge force: switching over although the downtime is expected to EXCEED the target by {:.1} ms",
                        expected_downtime_ms - downtime_target_ms as f64
                    ));
                }
            }
            Reply::Progress(Progress::Throttled { round, throttle }) => show.line(&format!(
                "after round {round}: the guest is throttled to {:.0} % of its time so that pre-copy converges",
                (1.0 - throttle) * 100.0
            )),
            Reply::Progress(Progress::Committed { .. }) => {
                show.line("commit point passed: the guest now belongs to the destination")
            }
            Reply::Progress(Progress::Resumed { .. }) => show.line("the destination runs the guest"),
            _ => {}
        }
        true
    })?;
    if let Show::Bar(b) = &show {
        b.finish_and_clear();
    }
    let Some(last) = last else {
        return Err("the VMM closed the connection before the migration ended: check `ferry status`".into());
    };
    let (record, vm) = match &last {
        ApiReply::Error { error } => return Err(format!("the VMM refused: {error}")),
        ApiReply::Migrated(m) => (m.record.clone(), m.vm.clone()),
        ApiReply::MigrationFailed(e) | ApiReply::MigrationCancelled(e) | ApiReply::MigrationInDoubt(e) => (
            e.record.clone(),
            e.record.as_ref().map(|r| r.vm.clone()).unwrap_or_default(),
        ),
        ApiReply::MigrationResolved(r) => (
            r.record.clone(),
            r.record.as_ref().map(|r| r.vm.clone()).unwrap_or_default(),
        ),
        other => {
            return Err(format!(
                "the VMM ended the migration with an unexpected reply: {other:?}"
            ))
        }
    };
    let mut recorded = None;
    if let Some(r) = record {
        let path = o.record.clone().unwrap_or_else(|| record::default_path(&r.vm));
        match r.write(&path) {
            Ok(()) => recorded = Some(path),
            Err(why) => eprintln!("ferry: warning: {why}"),
        }
    }
    let rec_note = recorded.map_or(String::new(), |p| format!("; record: {}", p.display()));
    let ended = |what: &str, e: &Ended| format!("{what}: {}; the guest runs at the source{rec_note}", e.reason);
    let (text, code) = match &last {
        ApiReply::Migrated(m) if m.receipt_error.is_some() => (
            format!(
                "MIGRATED WITHOUT A RECEIPT: {vm} runs at {}, but the signed manifest and receipt exchange failed ({}): this migration has no non-repudiation record{rec_note}",
                o.dest_host,
                m.receipt_error.as_deref().unwrap_or_default()
            ),
            ExitCode::from(4),
        ),
        ApiReply::Migrated(m) => (
            format!(
                "migrated {vm} to {}: {} rounds, {} on the wire, downtime {:.2} ms, total {:.0} ms{}{rec_note}",
                o.dest_host,
                m.rounds,
                human(m.bytes_on_wire),
                m.downtime_ms,
                m.total_ms,
                m.convergence.as_ref().map_or(String::new(), |c| {
                    let mut t = format!(
                        "; target {} ms, expected {:.2} ms",
                        c.downtime_target_ms,
                        c.expected_downtime_ms.unwrap_or(f64::NAN)
                    );
                    t += &crate::size::throttle_note(", throttled up to ", c.throttle_max);
                    if c.downtime_exceeded {
                        t += &format!(
                            " -- DOWNTIME TARGET EXCEEDED by {:.2} ms (policy {})",
                            m.downtime_ms - c.downtime_target_ms as f64,
                            c.converge
                        );
                    }
                    t
                })
            ),
            ExitCode::SUCCESS,
        ),
        ApiReply::MigrationInDoubt(e) => (
            format!("IN DOUBT: {} ({}){rec_note}", e.reason, e.guest),
            ExitCode::from(3),
        ),
        ApiReply::MigrationResolved(r) => resolved_text(r, &vm, &o.dest_host, &rec_note),
        ApiReply::MigrationCancelled(e) => (ended("cancelled", e), ExitCode::FAILURE),
        ApiReply::MigrationFailed(e) => (ended("failed", e), ExitCode::FAILURE),
        _ => unreachable!("the other replies returned above"),
    };
    if o.json {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
    Ok(code)
}

fn one(path: &Path, req: &Request) -> Result<Reply, String> {
    one_within(path, req, Duration::from_secs(10))
}

/// The VMM's one reply to `req`, waiting up to `idle` for it.
fn one_within(path: &Path, req: &Request, idle: Duration) -> Result<Reply, String> {
    let mut got = None;
    api::call(path, req, idle, |v| {
        got = Some(v);
        false
    })?;
    got.ok_or_else(|| "the VMM closed the connection without a reply".into())
}

/// `ferry status`.
pub fn status(path: &Path, json: bool) -> Result<ExitCode, String> {
    let v = one(path, &Request::Status)?;
    if json {
        println!("{}", json_line(&v));
        return Ok(ExitCode::SUCCESS);
    }
    let st = match v {
        Reply::Api(ApiReply::Status(st)) => st,
        Reply::Api(ApiReply::Error { error }) => return Err(error),
        other => return Err(format!("the VMM answered status with {other:?}")),
    };
    let mut line = format!(
        "{}: {}, {} guest memory, {} vCPU(s), heartbeat {}{}",
        st.vm,
        st.state,
        human(st.memory_bytes),
        st.vcpus,
        st.heartbeat,
        if st.paused { " (paused)" } else { "" }
    );
    match &st.progress {
        Some(Progress::Sending {
            round,
            pages_sent,
            pages_in_round,
            ..
        }) => line += &format!("; round {round}: {pages_sent} of {pages_in_round} pages sent"),
        Some(Progress::Round { stats, .. }) => {
            line += &format!(
                "; round {} done, {} pages dirty after",
                stats.round, stats.dirty_pages_after
            )
        }
        Some(Progress::Paused { .. }) => line += "; last: paused",
        Some(Progress::Throttled { throttle, .. }) => line += &format!("; guest throttled {:.0} %", throttle * 100.0),
        Some(Progress::Committed { .. }) => line += "; last: committed",
        Some(Progress::Resumed { .. }) => line += "; last: resumed",
        Some(Progress::Receiving { .. }) => line += "; last: receiving",
        None => {}
    }
    if let Some(e) = &st.last_error {
        line += &format!("; last migration failed: {e}");
    }
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

/// `ferry cancel`.
pub fn cancel(path: &Path, json: bool) -> Result<ExitCode, String> {
    let v = one(path, &Request::Cancel)?;
    if json {
        println!("{}", json_line(&v));
    }
    match v {
        Reply::Api(ApiReply::Cancel { note, .. }) => {
            if !json {
                println!("cancel requested: {note}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Reply::Api(ApiReply::Error { error }) => Err(error),
        other => Err(format!("the VMM answered cancel with {other:?}")),
    }
}

/// What a migration that went in doubt and was then answered says, and its
/// exit status: 4 (migrated, no receipt) on "committed", 1 (the guest runs
/// at the source) on "discarded".
fn resolved_text(r: &api::Resolved, vm: &str, dest_host: &str, rec_note: &str) -> (String, ExitCode) {
    match r.answer {
        ferry_control::handshake::Answer::Committed => (
            format!(
                "MIGRATED, CONFIRMED LATE: {vm} runs at {dest_host}: {}; no manifest or receipt was exchanged{rec_note}",
                r.reason
            ),
            ExitCode::from(4),
        ),
        _ => (
            format!("failed: {}; the guest: {}{rec_note}", r.reason, r.guest),
            ExitCode::FAILURE,
        ),
    }
}

/// How long `ferry resolve` waits for the VMM (which asks the destination once).
const RESOLVE_IDLE: Duration = Duration::from_secs(130);

/// `ferry resolve`: the VMM asks the destination of its migration in doubt
/// what became of it and acts on the signed answer. Exit 0 when answered
/// (the text says where the guest runs), 3 when still in doubt.
pub fn resolve(path: &Path, json: bool) -> Result<ExitCode, String> {
    let v = one_within(path, &Request::Resolve, RESOLVE_IDLE)?;
    if json {
        println!("{}", json_line(&v));
    }
    let (text, code) = match &v {
        Reply::Api(ApiReply::MigrationResolved(r)) => (
            format!(
                "resolved: migration {:x}: the destination answered, signed, {}; the guest {}",
                r.migration_id,
                r.answer.as_str(),
                r.guest
            ),
            ExitCode::SUCCESS,
        ),
        Reply::Api(ApiReply::MigrationInDoubt(e)) => {
            (format!("IN DOUBT: {} ({})", e.reason, e.guest), ExitCode::from(3))
        }
        Reply::Api(ApiReply::Error { error }) => return Err(error.clone()),
        other => return Err(format!("the VMM answered resolve with {other:?}")),
    };
    if json {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
    Ok(code)
}

/// `ferry estimate`: the VMM watches its guest's writes (nothing is sent)
/// and predicts pre-copy. Exit 0 when it would converge under the policy,
/// 2 when it would not.
pub fn estimate(path: &Path, req: &Request, seconds: f64, json: bool) -> Result<ExitCode, String> {
    let v = one_within(path, req, Duration::from_secs_f64(seconds + 40.0))?;
    if json {
        println!("{}", json_line(&v));
    }
    match v {
        Reply::Api(ApiReply::Estimate(p)) => {
            if !json {
                println!("{}", crate::estimate::prediction_line(&p));
            }
            Ok(if p.converges {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Reply::Api(ApiReply::Error { error }) => Err(error),
        other => Err(format!("the VMM answered estimate with {other:?}")),
    }
}

/// `ferry set-bandwidth`: changes the running migration's caps.
pub fn set_bandwidth(path: &Path, live: Option<u64>, paused: Option<u64>, json: bool) -> Result<ExitCode, String> {
    let v = one(
        path,
        &Request::SetBandwidth {
            max_bandwidth: live,
            max_bandwidth_paused: paused,
        },
    )?;
    if json {
        println!("{}", json_line(&v));
    }
    match v {
        Reply::Api(ApiReply::Bandwidth {
            max_bandwidth_bytes_per_s,
            max_bandwidth_paused_bytes_per_s,
        }) => {
            if !json {
                let show = |c: Option<u64>| c.map_or("unlimited".to_string(), crate::size::human_rate);
                println!(
                    "bandwidth cap now {} (paused round {}); the next batch obeys it",
                    show(max_bandwidth_bytes_per_s),
                    show(max_bandwidth_paused_bytes_per_s)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Reply::Api(ApiReply::Error { error }) => Err(error),
        other => Err(format!("the VMM answered set-bandwidth with {other:?}")),
    }
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
