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
//! With `--incoming`, it is the destination: a `ferry receive` daemon that
//! receives KVM guests into fresh VMs and runs them.
//!
//! Either way it prints one JSON event per line on stdout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_control::audit::AuditLog;
use ferry_control::pki::{Identity, Role};
use ferry_engine::kvm::{self, GuestProgram, KvmVm};
use ferry_engine::migrate::MigrationConfig;
use ferry_engine::GuestMemory;

use crate::daemon::event;
use crate::source::{self, Endpoints};

/// Where and how the source migrates its guest.
#[derive(Debug, Clone)]
pub struct MigrateTo {
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
    /// The destination's control address.
    pub dest: SocketAddr,
    /// The destination's host name.
    pub dest_host: String,
    /// The VM's id (what the tickets and policies name).
    pub vm_id: String,
    /// How long the guest runs before the migration starts.
    pub after: Duration,
    /// The source's audit log, if any.
    pub audit: Option<PathBuf>,
    /// Engine settings.
    pub migration: MigrationConfig,
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
    /// How often to print a heartbeat event.
    pub heartbeat_every: Duration,
    /// Stop after this long (default: run until killed or migrated).
    pub run_for: Option<Duration>,
    /// Have the guest checksum its memory when paused for the switchover.
    pub verify: bool,
    /// Migrate it.
    pub migrate: Option<MigrateTo>,
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// Runs the source VMM.
pub fn run(o: &VmOptions) -> Result<(), String> {
    kvm::available().map_err(|why| format!("ferry vm needs KVM: {why}"))?;
    let mem = Arc::new(GuestMemory::new(o.memory_bytes).map_err(e)?);
    let t = Instant::now();
    let mut vm = KvmVm::boot(mem.clone(), o.vcpus, &o.program).map_err(e)?;
    vm.wait_filled(Duration::from_secs(600)).map_err(e)?;
    let mon = vm.monitor().ok_or("the VM has no vCPU")?;
    event(
        &serde_json::json!({"event": "booted", "memory_bytes": o.memory_bytes, "vcpus": o.vcpus,
        "fill_ms": t.elapsed().as_secs_f64() * 1e3, "hot_set_bytes": o.program.hot_set_bytes,
        "writes_per_s": o.program.writes_per_s}),
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
    let started = Instant::now();
    if let Some(m) = &o.migrate {
        std::thread::sleep(m.after);
        vm.checksum_at_pause = o.verify;
        match migrate(&mut vm, &mem, m) {
            Ok(line) => {
                // The destination owns the guest now: this VM never runs again.
                let runs = vm.runs();
                let runs_after = vm.shut_down();
                stop.store(true, Ordering::SeqCst);
                let _ = beats.join();
                let mut line = line;
                line["runs_after_commit"] = serde_json::json!(runs_after - runs);
                event(&line);
                return Ok(());
            }
            Err(why) if mon.paused() => {
                // Past the commit point with no word from the destination:
                // the guest may be running there. It stays paused here.
                event(&serde_json::json!({"event": "migration-in-doubt", "reason": why,
                    "guest": "paused here; the destination may be running it: check it before resuming anything",
                    "heartbeat": mon.heartbeat()}));
            }
            Err(why) => {
                event(&serde_json::json!({"event": "migration-failed", "reason": why,
                    "guest": "running here", "heartbeat": mon.heartbeat()}));
            }
        }
    }
    match o.run_for {
        Some(d) => std::thread::sleep(d.saturating_sub(started.elapsed())),
        None => loop {
            std::thread::park();
        },
    }
    stop.store(true, Ordering::SeqCst);
    vm.shut_down();
    let _ = beats.join();
    event(&serde_json::json!({"event": "stopped", "heartbeat": mon.heartbeat()}));
    Ok(())
}

fn migrate(vm: &mut KvmVm, mem: &GuestMemory, m: &MigrateTo) -> Result<serde_json::Value, String> {
    let audit = match &m.audit {
        Some(path) => {
            let id = Identity::load(&m.pki, Role::Host, &m.host).map_err(e)?;
            Some(AuditLog::open(path, &format!("source {}", m.host), id).map_err(e)?)
        }
        None => None,
    };
    let at = Endpoints {
        pki: &m.pki,
        host: &m.host,
        client: &m.client,
        authn: m.authn,
        authz: m.authz,
        servers_name: &m.servers_name,
        dest: m.dest,
        dest_host: &m.dest_host,
        audit: audit.as_ref(),
    };
    let mut tracker = vm.dirty_tracker();
    event(
        &serde_json::json!({"event": "migrating", "vm": m.vm_id, "to": m.dest.to_string(),
        "dest_host": m.dest_host, "tracker": ferry_engine::dirty::DirtyTracker::name(&tracker)}),
    );
    let (report, receipt) = source::migrate(&at, &m.vm_id, mem, &mut tracker, vm, &m.migration)?;
    let downtime = report.resumed_confirmed_at.saturating_duration_since(report.paused_at);
    Ok(
        serde_json::json!({"event": "migrated", "vm": m.vm_id, "rounds": report.rounds.len(),
        "pages_sent": report.pages_sent, "bytes_on_wire": report.bytes_on_wire,
        "downtime_ms": downtime.as_secs_f64() * 1e3,
        "total_ms": report.resumed_confirmed_at.saturating_duration_since(report.started_at).as_secs_f64() * 1e3,
        "vcpu_state_bytes": report.device_state_bytes,
        "heartbeat_before": vm.heartbeat_at_pause(),
        "guest_checksum": vm.checksum_at_pause_value().map(|c| format!("{c:016x}")),
        "transcript_matches": receipt.transcript_matches,
        "round_detail": report.rounds}),
    )
}
