//! `ferry vm`: ferry's minimal KVM VMM as a process, as on a real host.
//!
//! As a source, it boots the built-in guest program (which fills its memory,
//! writes a hot set and beats a heartbeat) and, with `--migrate-to`, migrates
//! it live after `--migrate-after-s`: tickets from the authentication and
//! authorization servers, admission by the destination, encrypted pre-copy
//! with KVM's dirty log, and the switchover. After the commit the VM never
//! runs here again and the process exits; on any failure before it, the
//! guest keeps running here.
//!
//! With `--api PATH` it serves the local API of [`crate::api`]: `ferry
//! migrate`, `ferry status` and `ferry cancel` drive it from outside. A
//! failed or cancelled migration leaves the guest running here, ready for
//! another attempt.
//!
//! With `--incoming`, it is the destination: a `ferry receive` daemon that
//! receives KVM guests into fresh VMs and runs them.
//!
//! Either way it prints one JSON event per line on stdout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use ferry_control::audit::AuditLog;
use ferry_control::pki::{Identity, Role};
use ferry_engine::migrate::estimate::Prediction;
use ferry_engine::migrate::{MigrationConfig, RoundStats};
use ferry_engine::progress::{Hooks, Progress};
use ferry_engine::GuestMemory;
use ferry_vmm::kvm::{self, GuestProgram, KvmVm, Monitor};

use crate::api::{self, ApiReply, Reply, Request};
use crate::daemon::event;
use crate::record::Record;
use crate::source::{self, Endpoints};

mod attempt;
mod doubt;
use attempt::{endpoints, migrate, source_audit, Failed};
use doubt::{Doubt, InDoubt};

/// What this host needs to migrate its guests anywhere.
#[derive(Debug, Clone)]
pub struct SourceHost {
    /// PKI folder (this host's key, the migration client's, the CA).
    pub pki: PathBuf,
    /// This host's name.
    pub host: String,
    /// The migration client (`clients/NAME`).
    pub client: String,
    /// Authentication server.
    pub authn: SocketAddr,
    /// Authorization server.
    pub authz: SocketAddr,
    /// Name on the authn/authz servers' certificates.
    pub servers_name: String,
    /// The source's audit log, if any.
    pub audit: Option<PathBuf>,
    /// Destination measurements to send guests to (empty: any); see
    /// [`source::Endpoints::pinned`].
    pub pinned: Vec<ferry_control::handshake::Measurement>,
    /// Engine settings.
    pub migration: MigrationConfig,
}

/// One migration: where to.
#[derive(Debug, Clone)]
pub struct MigrateTo {
    /// The destination's control address.
    pub dest: SocketAddr,
    /// The destination's host name.
    pub dest_host: String,
    /// This migration's settings over the host's.
    pub tuning: api::Tuning,
    /// Where to write the migration's record (`None`: the API client does).
    pub record: Option<PathBuf>,
}

/// Settings of `ferry vm` as a source.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest memory.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// What the guest program does.
    pub program: GuestProgram,
    /// The VM's id, as tickets and policies name it.
    pub vm_id: String,
    /// How often to print a heartbeat event.
    pub heartbeat_every: Duration,
    /// Stop after this long (default: run until killed or migrated).
    pub run_for: Option<Duration>,
    /// Have the guest checksum its memory when paused for the switchover.
    pub verify: bool,
    /// How this host migrates (needed for any migration).
    pub source: Option<SourceHost>,
    /// Migrate on its own after this long.
    pub migrate: Option<(MigrateTo, Duration)>,
    /// Serve the local API on this Unix socket.
    pub api: Option<PathBuf>,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// What the API sees of the VM.
#[derive(Debug, Default)]
struct Shared {
    /// running, migrating, committed, migrated, in-doubt.
    state: &'static str,
    /// The running migration's cancel switch.
    hooks: Option<Hooks>,
    /// Its latest progress event.
    progress: Option<Progress>,
    /// Why the last migration failed.
    last_error: Option<String>,
    /// Rounds of the running migration (for a failed one's record).
    rounds: Vec<RoundStats>,
    /// The last estimate and when it was made.
    prediction: Option<(Instant, Prediction)>,
    /// The migration in doubt (state "in-doubt"), for `resolve`.
    in_doubt: Option<InDoubt>,
}

/// Work for the main thread, which owns the VM.
enum Work {
    Migrate(Job),
    Estimate(EstimateJob),
    /// Ask the destination of the migration in doubt; answer on the sender.
    Resolve(Sender<Reply>),
}

/// An estimate: watch the guest's writes and predict pre-copy.
struct EstimateJob {
    seconds: f64,
    bandwidth: Option<u64>,
    tuning: api::Tuning,
    reply: Sender<Reply>,
}

/// How long an estimate is kept for the next migration's record.
const PREDICTION_KEPT: Duration = Duration::from_secs(600);

/// A migration for the main thread, which owns the VM.
struct Job {
    to: MigrateTo,
    /// Reply lines for an API client.
    events: Option<Sender<Reply>>,
    /// Told when the client has its last line.
    delivered: Option<Receiver<()>>,
}

/// Runs the source VMM.
pub fn run(o: &VmOptions) -> Result<(), String> {
    kvm::available().map_err(|why| format!("ferry vm needs KVM: {why}"))?;
    let mem = Arc::new(GuestMemory::new(o.memory_bytes).map_err(e)?);
    let t = Instant::now();
    let mut vm = KvmVm::boot(mem.clone(), o.vcpus, &o.program).map_err(e)?;
    vm.wait_filled(Duration::from_secs(600)).map_err(e)?;
    let mon = vm.monitor().ok_or("the VM has no vCPU")?;
    let shared = Arc::new(Mutex::new(Shared {
        state: "running",
        ..Shared::default()
    }));
    let (jobs_tx, jobs_rx) = bounded::<Work>(1);
    let metrics = crate::metrics::Metrics::new();
    let metrics_addr = match o.metrics {
        Some(a) => Some(metrics.serve(a).map_err(e)?.to_string()),
        None => None,
    };
    let _api = match &o.api {
        Some(path) => Some(api::serve(path, api_handler(o, &shared, &mon, &jobs_tx))?),
        None => None,
    };
    event(
        &serde_json::json!({"event": "booted", "vm": o.vm_id, "memory_bytes": o.memory_bytes, "vcpus": o.vcpus,
        "fill_ms": t.elapsed().as_secs_f64() * 1e3, "hot_set_bytes": o.program.hot_set_bytes,
        "writes_per_s": o.program.writes_per_s, "api": o.api, "metrics": metrics_addr}),
    );
    // Heartbeat events until the VM is gone.
    let stop = Arc::new(AtomicBool::new(false));
    let beats = {
        let (stop, mon, every) = (stop.clone(), mon.clone(), o.heartbeat_every);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(every);
                if !stop.load(Ordering::SeqCst) {
                    event(&serde_json::json!({"event": "heartbeat", "heartbeat": mon.heartbeat(),
                        "writes": mon.guest_writes(), "paused": mon.paused()}));
                }
            }
        })
    };
    if let Some((to, after)) = &o.migrate {
        let (jobs, to, after) = (jobs_tx.clone(), to.clone(), *after);
        std::thread::spawn(move || {
            std::thread::sleep(after);
            let _ = jobs.send(Work::Migrate(Job {
                to,
                events: None,
                delivered: None,
            }));
        });
    }
    let started = Instant::now();
    loop {
        let wait = o
            .run_for
            .map_or(Duration::from_secs(3600), |d| d.saturating_sub(started.elapsed()));
        match jobs_rx.recv_timeout(wait) {
            Ok(Work::Estimate(job)) => run_estimate(o, &mut vm, &mem, &shared, job),
            Ok(Work::Resolve(reply)) => {
                if doubt::run_resolve(o, &mut vm, &mon, &shared, &reply, &metrics) {
                    stop.store(true, Ordering::SeqCst);
                    let _ = beats.join();
                    return Ok(());
                }
            }
            Ok(Work::Migrate(job)) => {
                if run_job(o, &mut vm, &mem, &mon, &shared, job, &metrics) {
                    // The destination owns the guest now: this VM never runs again.
                    stop.store(true, Ordering::SeqCst);
                    let _ = beats.join();
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Timeout) if o.run_for.is_some_and(|d| started.elapsed() >= d) => break,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => unreachable!("main holds a sender"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    vm.shut_down();
    let _ = beats.join();
    event(&serde_json::json!({"event": "stopped", "heartbeat": mon.heartbeat()}));
    Ok(())
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Moves a running VM to `state` under the lock (of two clients asking at
/// once, one wins); otherwise the state it is in.
fn claim(shared: &Mutex<Shared>, state: &'static str) -> Result<(), &'static str> {
    let mut s = lock(shared);
    if s.state != "running" {
        return Err(s.state);
    }
    s.state = state;
    Ok(())
}

/// Runs an estimate on the main thread and answers it.
fn run_estimate(o: &VmOptions, vm: &mut KvmVm, mem: &GuestMemory, shared: &Arc<Mutex<Shared>>, job: EstimateJob) {
    let reply = match &o.source {
        None => Reply::error(
            "this VM was started without source settings: it cannot migrate, so there is nothing to estimate",
        ),
        Some(host) => {
            let mut cfg = host.migration.clone();
            job.tuning.apply(&mut cfg);
            let est = crate::estimate::EstimateOptions {
                seconds: job.seconds,
                bandwidth_bytes_per_s: job.bandwidth,
            };
            let mut tracker = vm.dirty_tracker();
            match crate::estimate::run(&est, &cfg, &mut tracker, vm, mem) {
                Ok(p) => {
                    event(&serde_json::json!({"event": "estimate", "line": crate::estimate::prediction_line(&p)}));
                    lock(shared).prediction = Some((Instant::now(), p.clone()));
                    Reply::Api(ApiReply::Estimate(Box::new(p)))
                }
                Err(e) => Reply::error(e.to_string()),
            }
        }
    };
    lock(shared).state = "running";
    let _ = job.reply.send_timeout(reply, Duration::from_secs(2));
}

fn api_handler(o: &VmOptions, shared: &Arc<Mutex<Shared>>, mon: &Monitor, jobs: &Sender<Work>) -> Arc<api::Handler> {
    let (shared, mon, jobs) = (shared.clone(), mon.clone(), jobs.clone());
    let (vm_id, memory_bytes, vcpus, can_migrate) = (o.vm_id.clone(), o.memory_bytes, o.vcpus, o.source.is_some());
    Arc::new(move |req, send| match req {
        // Replies are written with the lock released: a slow client must
        // not hold up the migration's progress callback, which takes it too.
        Request::Status => {
            let line = {
                let s = lock(&shared);
                Reply::Api(ApiReply::Status(Box::new(api::Status {
                    vm: vm_id.clone(),
                    state: s.state.into(),
                    memory_bytes,
                    vcpus,
                    heartbeat: mon.heartbeat(),
                    guest_writes: mon.guest_writes(),
                    paused: mon.paused(),
                    progress: s.progress.clone(),
                    last_error: s.last_error.clone(),
                })))
            };
            send(&line);
        }
        Request::Cancel => {
            let (hooks, state) = {
                let s = lock(&shared);
                (s.hooks.clone(), s.state)
            };
            match (hooks, state) {
                (Some(h), "migrating") => {
                    h.cancel();
                    send(&Reply::Api(ApiReply::Cancel {
                        cancelled: true,
                        note: "the migration stops before its commit point; the guest keeps running here".into(),
                    }));
                }
                (None, "migrating") => {
                    send(&Reply::error("the migration is starting: cancel again in a moment"));
                }
                (_, state) => {
                    send(&Reply::error(format!(
                        "nothing to cancel: the VM is {state}{}",
                        if state == "committed" || state == "migrated" {
                            " (past the commit point, the guest belongs to the destination)"
                        } else {
                            ""
                        }
                    )));
                }
            }
        }
        Request::Resolve => doubt::api_resolve(&shared, &jobs, send),
        Request::Estimate {
            seconds,
            bandwidth,
            downtime_ms_max,
            converge,
        } => {
            if !(0.2..=600.0).contains(&seconds) {
                send(&Reply::error("seconds must be 0.2..=600"));
                return;
            }
            if let Err(state) = claim(&shared, "estimating") {
                send(&Reply::error(format!(
                    "the VM is {state}: an estimate needs a running VM with no migration under way"
                )));
                return;
            }
            let (tx, rx) = bounded::<Reply>(1);
            let job = EstimateJob {
                seconds,
                bandwidth,
                tuning: api::Tuning {
                    downtime_ms_max,
                    converge,
                    ..api::Tuning::default()
                },
                reply: tx,
            };
            if jobs.try_send(Work::Estimate(job)).is_err() {
                lock(&shared).state = "running";
                send(&Reply::error("a migration is about to start: try again when it ends"));
                return;
            }
            match rx.recv_timeout(Duration::from_secs_f64(seconds + 30.0)) {
                Ok(line) => {
                    send(&line);
                }
                Err(_) => {
                    send(&Reply::error(
                        "the estimate did not finish (the VM's main thread is busy)",
                    ));
                }
            }
        }
        Request::SetBandwidth {
            max_bandwidth,
            max_bandwidth_paused,
        } => {
            if let Err(e) = [max_bandwidth, max_bandwidth_paused]
                .into_iter()
                .try_for_each(ferry_engine::pace::check_cap)
            {
                send(&Reply::error(e.to_string()));
                return;
            }
            let hooks = {
                let s = lock(&shared);
                (s.state == "migrating").then(|| s.hooks.clone()).flatten()
            };
            match hooks {
                Some(h) => {
                    if let Err(e) = h.set_max_bandwidth(max_bandwidth, max_bandwidth_paused.map(Some)) {
                        send(&Reply::error(e.to_string()));
                        return;
                    }
                    let cap = h.bandwidth_cap();
                    send(&Reply::Api(ApiReply::Bandwidth {
                        max_bandwidth_bytes_per_s: cap.live(),
                        max_bandwidth_paused_bytes_per_s: cap.paused(),
                    }));
                }
                None => {
                    send(&Reply::error(
                        "no migration is under way: give --max-bandwidth to `ferry migrate` instead",
                    ));
                }
            }
        }
        Request::Migrate {
            to,
            dest_host,
            downtime_ms_max,
            converge,
            max_bandwidth,
            max_bandwidth_paused,
            timeout_s,
        } => {
            if !can_migrate {
                send(&Reply::error(
                    "this VM was started without --pki, --name, --authn and --authz: it cannot migrate",
                ));
                return;
            }
            let (tx, rx) = bounded::<Reply>(1024);
            let (done_tx, done_rx) = bounded::<()>(1);
            let job = Job {
                to: MigrateTo {
                    dest: to,
                    dest_host,
                    tuning: api::Tuning {
                        downtime_ms_max,
                        converge,
                        max_bandwidth,
                        max_bandwidth_paused,
                        timeout_s,
                    },
                    record: None,
                },
                events: Some(tx),
                delivered: Some(done_rx),
            };
            if let Err(state) = claim(&shared, "migrating") {
                send(&Reply::error(format!(
                    "the VM is {state}: only a running VM with no migration under way can migrate"
                )));
                return;
            }
            if jobs.try_send(Work::Migrate(job)).is_err() {
                lock(&shared).state = "running";
                send(&Reply::error(
                    "a migration is about to start (--migrate-to): try again when it ends",
                ));
                return;
            }
            // Every line of the migration until its last; a client that
            // went away stops getting them but the migration goes on.
            let mut client = true;
            for line in rx {
                client = client && send(&line);
            }
            let _ = done_tx.send(());
        }
    })
}

/// Runs one migration on the main thread. True when the guest left.
fn run_job(
    o: &VmOptions,
    vm: &mut KvmVm,
    mem: &GuestMemory,
    mon: &Monitor,
    shared: &Arc<Mutex<Shared>>,
    job: Job,
    metrics: &crate::metrics::Metrics,
) -> bool {
    let say = |v: &Reply| {
        if let Some(tx) = &job.events {
            let _ = tx.try_send(v.clone());
        }
    };
    let Some(host) = &o.source else {
        lock(shared).state = "running";
        say(&Reply::error("this VM cannot migrate: no source settings"));
        return false;
    };
    let hooks = {
        let (shared, events) = (shared.clone(), job.events.clone());
        Hooks::new().on_progress(move |p| {
            {
                let mut s = lock(&shared);
                match p {
                    Progress::Round { stats, .. } => s.rounds.push(stats.clone()),
                    Progress::Committed { .. } => s.state = "committed",
                    _ => {}
                }
                s.progress = Some(p.clone());
            }
            if matches!(p, Progress::Round { .. } | Progress::Committed { .. }) {
                event(&serde_json::to_value(p).unwrap_or_default());
            }
            if let Some(tx) = &events {
                let _ = tx.try_send(Reply::Progress(p.clone()));
            }
        })
    };
    {
        let mut s = lock(shared);
        s.state = "migrating";
        s.hooks = Some(hooks.clone());
        s.progress = None;
        s.rounds.clear();
    }
    let mut record = Record::new(&o.vm_id, &host.host, &job.to.dest_host, o.memory_bytes);
    let active = metrics.active("source");
    active.inc();
    let begin = serde_json::json!({"event": "migrating", "vm": o.vm_id, "to": job.to.dest.to_string(),
        "dest_host": job.to.dest_host, "tracker": "kvm-dirty-log"});
    event(&begin);
    say(&Reply::Api(ApiReply::Accepted {
        vm: o.vm_id.clone(),
        to: job.to.dest.to_string(),
        dest_host: job.to.dest_host.clone(),
        tracker: "kvm-dirty-log".into(),
    }));
    vm.checksum_at_pause = o.verify;
    let result = migrate(vm, mem, host, &o.vm_id, &job.to, &hooks);
    let mut left = result.is_ok();
    let mut last = match result {
        Ok((mut line, done)) => {
            record.outcome = "migrated".into();
            record.total_ms = line.total_ms;
            record.downtime_ms = Some(line.downtime_ms);
            record.rounds = line.round_detail.clone();
            record.convergence = line.convergence.clone();
            if let Some(why) = &line.receipt_error {
                record.outcome = "migrated-without-receipt".into();
                record.error = Some(why.clone());
            }
            if let Some(done) = done {
                record.migration_id = done.migration_id;
                record.destination_audit_head = done.receipt.audit_head.as_ref().map(ToString::to_string);
                record.handshake_ms = done.steps.iter().take(3).map(|s| s.ms).sum();
                record.steps = done.steps;
                record.downtime_from_ms = Some(done.report.paused_after().as_secs_f64() * 1e3);
            }
            let runs = vm.runs();
            let runs_after = vm.shut_down();
            line.runs_after_commit = Some(runs_after - runs);
            lock(shared).state = "migrated";
            ApiReply::Migrated(line)
        }
        // In doubt, then the destination's signed answer: the guest runs
        // there, or was resumed here.
        Err(Failed {
            why,
            doubt: Some(Doubt::Resolved(r)),
            ..
        }) => {
            let (reply, gone) = doubt::settled(vm, mon, shared, &mut record, why, &r);
            left = gone;
            reply
        }
        Err(Failed { why, doubt, .. }) if mon.paused() => {
            // Past the commit point with no word from the destination: the
            // guest may be running there. It stays paused here.
            record.outcome = "in-doubt".into();
            record.error = Some(why.clone());
            if let Some(Doubt::Unresolved(id)) = doubt {
                record.migration_id = id;
            }
            let mut s = lock(shared);
            s.state = "in-doubt";
            s.in_doubt = Some(InDoubt {
                migration_id: record.migration_id,
                to: job.to.clone(),
                record: record.clone(),
            });
            drop(s);
            ApiReply::MigrationInDoubt(Box::new(api::Ended {
                reason: why,
                guest: "PAUSED here; the destination may be running it: `ferry resolve --api SOCK` asks it again, and resumes it here only on its signed \"discarded\"".into(),
                heartbeat: mon.heartbeat(),
                record_file: None,
                record: None,
            }))
        }
        Err(Failed {
            why,
            convergence,
            aborted,
            doubt: _,
        }) => {
            let cancelled = hooks.is_cancelled();
            record.outcome = if cancelled {
                "cancelled"
            } else if aborted {
                "aborted"
            } else {
                "failed"
            }
            .into();
            record.error = Some(why.clone());
            record.convergence = convergence.map(|c| *c);
            let mut s = lock(shared);
            s.state = "running";
            s.last_error = Some(why.clone());
            let ended = Box::new(api::Ended {
                reason: why,
                guest: "running here".into(),
                heartbeat: mon.heartbeat(),
                record_file: None,
                record: None,
            });
            if cancelled {
                ApiReply::MigrationCancelled(ended)
            } else {
                ApiReply::MigrationFailed(ended)
            }
        }
    };
    if record.rounds.is_empty() {
        record.rounds = std::mem::take(&mut lock(shared).rounds);
    }
    // The estimate made before this migration, next to what happened.
    let recent = lock(shared)
        .prediction
        .take()
        .filter(|(at, _)| at.elapsed() < PREDICTION_KEPT)
        .map(|(_, p)| p);
    if let (Some(c), Some(p)) = (record.convergence.as_mut(), recent) {
        c.prediction = Some(p);
    }
    lock(shared).hooks = None;
    active.dec();
    count(metrics, &record);
    if let Some(path) = &job.to.record {
        match record.write(path) {
            Ok(()) => set_record(&mut last, Some(path.display().to_string()), None),
            Err(why) => tracing::warn!("{why}"),
        }
    }
    event(&serde_json::to_value(Reply::Api(last.clone())).unwrap_or_default());
    if let Some(tx) = job.events {
        set_record(&mut last, None, Some(record));
        let _ = tx.send_timeout(Reply::Api(last), Duration::from_secs(2));
        drop(tx);
        if let Some(done) = job.delivered {
            let _ = done.recv_timeout(Duration::from_secs(5));
        }
    }
    left
}

/// Counts a migration that ended (in doubt included: a later resolve
/// counts its outcome again, as the record is rewritten).
fn count(m: &crate::metrics::Metrics, record: &Record) {
    m.ended("source", &record.outcome);
    m.sent_bytes.inc_by(record.rounds.iter().map(|r| r.bytes_on_wire).sum());
    if record.outcome.starts_with("migrated") {
        if let Some(d) = record.downtime_ms {
            m.downtime_seconds.observe(d / 1e3);
        }
        m.duration_seconds.observe(record.total_ms / 1e3);
        m.rounds.observe(record.rounds.len() as f64);
    }
    if let Some(c) = &record.convergence {
        m.throttle_ratio.set(c.throttle_max);
    }
}

/// Puts the record file and/or the record into a migration's last reply.
fn set_record(last: &mut ApiReply, file: Option<String>, record: Option<Record>) {
    let (f, r) = match last {
        ApiReply::Migrated(m) => (&mut m.record_file, &mut m.record),
        ApiReply::MigrationFailed(e) | ApiReply::MigrationCancelled(e) | ApiReply::MigrationInDoubt(e) => {
            (&mut e.record_file, &mut e.record)
        }
        ApiReply::MigrationResolved(r) => (&mut r.record_file, &mut r.record),
        _ => return,
    };
    if file.is_some() {
        *f = file;
    }
    if record.is_some() {
        *r = record;
    }
}
