//! `ferry demo`: a complete live migration on loopback in one process — a
//! source with a running guest, a destination, real TCP streams, real
//! io_uring, real dirty tracking — then a check that the destination's image
//! is exactly the source's.
//!
//! The data plane's keys come from the control plane, run for real on
//! loopback: lab PKI, authentication and authorization servers over mutual
//! TLS, a signed migration request admitted by the destination, keys
//! exported from that TLS session ([`crate::lab`]).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_control::handshake::{HandshakeError, Manifest, Offer};
use ferry_control::pki::{Identity, Role};
use ferry_engine::bitmap::AtomicBitmap;
use ferry_engine::crypto::{AeadBackend, SessionKeys};
use ferry_engine::dirty::{BitmapTracker, DirtyTracker, UffdWpTracker};
use ferry_engine::guest::GuestControl;
use ferry_engine::migrate::{migrate_destination, migrate_source, MigrateError, MigrationConfig, RoundStats};
use ferry_engine::pipeline::Integrity;
use ferry_engine::progress::Hooks;
use ferry_engine::transport::{accept_proven, connect_streams};
use ferry_engine::GuestMemory;
use ferry_vmm::alloc;
use ferry_vmm::kvm::{self, GuestProgram, KvmVm};
use ferry_vmm::workload::{self, SyntheticGuest, WorkloadConfig};
use serde::Serialize;

use crate::lab;

mod guests;
mod verify;

use self::guests::{resolve_guest, start_source, Dest, Source};
use self::verify::{verify_kvm, verify_synthetic};
pub use crate::estimate::EstimateOptions;

/// How long the destination's write rate is measured after the resume.
const WRITE_RATE_WINDOW: Duration = Duration::from_millis(300);

/// Which dirty tracker the source uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// userfaultfd write-protect + PAGEMAP_SCAN.
    Uffd,
    /// The guest marks an atomic bitmap itself.
    Bitmap,
}

impl std::str::FromStr for TrackerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uffd" | "uffd-wp" => Ok(TrackerKind::Uffd),
            "bitmap" => Ok(TrackerKind::Bitmap),
            o => Err(format!("unknown tracker {o:?}: use uffd or bitmap")),
        }
    }
}

/// Which guest the demo migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestKind {
    /// KVM where /dev/kvm works, else synthetic (and the report says why).
    Auto,
    /// A real KVM guest run by ferry's minimal VMM ([`ferry_vmm::kvm`]).
    Kvm,
    /// A thread writing guest memory directly ([`SyntheticGuest`]).
    Synthetic,
}

impl std::str::FromStr for GuestKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(GuestKind::Auto),
            "kvm" => Ok(GuestKind::Kvm),
            "synthetic" => Ok(GuestKind::Synthetic),
            o => Err(format!("unknown guest {o:?}: use kvm, synthetic or auto")),
        }
    }
}

/// Given the destination's address, returns the address the source should
/// connect to (tests put a relay, or an attacker, in between).
pub type Interpose = std::sync::Arc<dyn Fn(std::net::SocketAddr) -> std::net::SocketAddr + Send + Sync>;

impl DemoReport {
    /// The migration's record (see [`crate::record`]).
    pub fn record(&self) -> crate::record::Record {
        let mut r = crate::record::Record::new("demo-vm", "src", "dst", self.memory_bytes);
        r.outcome = if self.verified { "migrated" } else { "failed" }.into();
        if !self.verified {
            r.error = Some("migrated, but the demo's checks of the result failed".into());
        }
        r.migration_id = self.migration_id;
        r.total_ms = self.total_ms;
        r.handshake_ms = self.handshake_ms;
        r.downtime_ms = Some(self.downtime_ms);
        r.downtime_from_ms = Some(self.downtime_from_ms);
        r.steps = self.steps.clone();
        r.rounds = self.round_detail.clone();
        r.convergence = Some(self.convergence.clone());
        if self.integrity == Integrity::AeadSha256 {
            r.sha256 = Some(self.sha256.into());
        }
        r
    }
}

/// What the demo migrates and how.
#[derive(Clone)]
pub struct DemoOptions {
    /// Which guest runs.
    pub guest: GuestKind,
    /// vCPUs of a KVM guest.
    pub vcpus: u32,
    /// KVM guest: have the guest checksum its memory when paused (it then
    /// stops itself right after); otherwise its vCPUs are kicked out and the
    /// VMM computes the same checksum of the frozen memory.
    pub guest_checksum_at_pause: bool,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Hot set the guest keeps writing.
    pub hot_set_bytes: u64,
    /// Guest writes per second.
    pub dirty_rate_pages_per_s: u64,
    /// Fraction of all-zero pages.
    pub zero_fraction: f64,
    /// Dirty tracker.
    pub tracker: TrackerKind,
    /// Fault the destination's memory in before the transfer.
    pub prefault_destination: bool,
    /// Back both guests' memory with 2 MiB huge pages (hugetlb pool).
    pub huge_pages: bool,
    /// Engine settings.
    pub migration: MigrationConfig,
    /// Something between source and destination (tests only).
    pub interpose: Option<Interpose>,
    /// The source side's progress callback and cancel switch.
    pub hooks: Hooks,
    /// Measure the guest's dirty rate and predict pre-copy before migrating.
    pub estimate: Option<EstimateOptions>,
}

impl std::fmt::Debug for DemoOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoOptions")
            .field("memory_bytes", &self.memory_bytes)
            .field("migration", &self.migration)
            .field("interposed", &self.interpose.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            guest: GuestKind::Auto,
            vcpus: 1,
            guest_checksum_at_pause: true,
            memory_bytes: 1 << 30,
            hot_set_bytes: 64 << 20,
            dirty_rate_pages_per_s: 20_000,
            zero_fraction: 0.0,
            tracker: TrackerKind::Uffd,
            prefault_destination: true,
            huge_pages: false,
            migration: MigrationConfig::default(),
            interpose: None,
            hooks: Hooks::new(),
            estimate: None,
        }
    }
}

/// Everything the demo measured. Field names are the `--json` contract.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// The destination image equals the source's frozen image (after
    /// replaying the writes the guest made since it resumed), and the guest
    /// state moved intact.
    pub verified: bool,
    /// "kvm" or "synthetic".
    pub guest: &'static str,
    /// Why the demo ran the synthetic guest when asked for "auto".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_note: Option<String>,
    /// vCPUs (KVM guest; 0 for the synthetic guest).
    pub vcpus: u32,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Data streams.
    pub streams: u16,
    /// "aead+sha256" or "aead".
    pub integrity: Integrity,
    /// AES-GCM implementation.
    pub aead: AeadBackend,
    /// SHA-256 of the page digests: "ring" or "tape" (multi-buffer), as
    /// `--sha256` chose (`auto`: from this CPU's features); "none" in
    /// `aead` mode.
    pub sha256: &'static str,
    /// Dirty tracker used at the source.
    pub tracker: &'static str,
    /// Where the session keys came from.
    pub keys: &'static str,
    /// Authentication ticket + authorization ticket + request/accept, in ms.
    pub handshake_ms: f64,
    /// Every protocol step with its duration.
    pub steps: Vec<crate::lab::Step>,
    /// The migration id the authorization server assigned.
    pub migration_id: u64,
    /// Both audit logs (source domain, destination) verified after the run:
    /// hash chain and every signature.
    pub audit_verified: bool,
    /// Entries in the source domain's and the destination's audit logs.
    pub audit_entries: (usize, usize),
    /// The source's signed manifest was verified by the destination against
    /// its own transcript, and its signed receipt by the source.
    pub manifest_verified: bool,
    /// SHA-256 root over every stream's transcript of frame tags (hex).
    pub transcript_root: String,
    /// Rounds, the final (paused) one included.
    pub rounds: usize,
    /// Guest paused at the source until resumed at the destination: from
    /// asking the vCPUs to stop, through the final round and the device
    /// state, to the destination's vCPUs running.
    pub downtime_ms: f64,
    /// When the downtime began, in milliseconds since the transfer started.
    pub downtime_from_ms: f64,
    /// Of which stopping the guest (KVM: kicking every vCPU out of the guest
    /// until all are parked).
    pub guest_stop_ms: f64,
    /// From the first page sent until the destination confirmed the resume.
    pub total_ms: f64,
    /// Bytes written to the data streams.
    pub bytes_on_wire: u64,
    /// Pages sent over all rounds (zero pages included).
    pub pages_sent: u64,
    /// Zero pages among them (a header bit each, no page bytes).
    pub zero_pages: u64,
    /// Guest bytes moved per second of transfer (GB/s, 10^9).
    pub throughput_gbps: f64,
    /// Throughput of the first (full) round alone.
    pub first_round_gbps: f64,
    /// Pages written by the guest during the migration.
    pub guest_writes_during_migration: u64,
    /// The guest's heartbeat when paused at the source (KVM: the guest's own
    /// counter, beaten 1000 times a second; synthetic: its write counter).
    pub heartbeat_before: u64,
    /// The first heartbeat the KVM guest beat at the destination
    /// (`heartbeat_before + 1` when it went on where it stopped, or
    /// `heartbeat_before` itself if a kick stopped it between counting that
    /// beat and reporting it; 0 for the synthetic guest).
    pub heartbeat_first_after: u64,
    /// The heartbeat after running at the destination for a moment.
    pub heartbeat_after: u64,
    /// The KVM guest's checksum of its own memory, computed by the guest when
    /// paused at the source (hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_checksum_source: Option<String>,
    /// The same, computed by the guest as the first thing it did after it
    /// resumed at the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_checksum_destination: Option<String>,
    /// The guest ran at the destination after the switchover.
    pub guest_resumed: bool,
    /// The source guest stayed paused after the commit.
    pub source_stopped: bool,
    /// Device state bytes moved at the switchover.
    pub device_state_bytes: usize,
    /// Of which vCPU state (registers, system registers, FPU/XSAVE, MSRs,
    /// CPUID) of a KVM guest; 0 for the synthetic guest.
    pub vcpu_state_bytes: usize,
    /// Destination memory faulted in before the transfer ("warm") or not ("cold").
    pub destination_memory: &'static str,
    /// Both guests' memory pages: "4KiB", or "2MiB" (`--huge-pages`).
    pub page_backing: &'static str,
    /// Time to prefault the destination's memory, before the transfer.
    pub dest_prefault_ms: f64,
    /// Source pages that were holes (never written) before the migration and
    /// were allocated by it (reading a hole allocates it; ferry sends holes
    /// without reading them, so this is the guest's own writes only).
    pub source_holes_filled: u64,
    /// Peak heap the engine allocated, both sides together, beyond guest RAM.
    pub engine_heap_peak_bytes: u64,
    /// Synthetic guest: its write rate at the destination after the resume
    /// (unthrottled: the configured rate).
    pub destination_write_rate_pages_per_s: Option<f64>,
    /// The policy (`converge`), `outcome` (converged or
    /// forced-past-target), `downtime_target_ms`, `expected_downtime_ms`,
    /// `downtime_exceeded`, `throttle_max`, the caps in force at the end
    /// (`max_bandwidth_bytes_per_s`, `..._paused_...`) and the `prediction`
    /// of `--estimate-s`: the record's convergence block, at the top level
    /// of the JSON.
    #[serde(flatten)]
    pub convergence: crate::record::Convergence,
    /// Per-round detail.
    pub round_detail: Vec<RoundStats>,
}

/// A migration that did not complete, and where that left the guest.
#[derive(Debug)]
pub struct Failure {
    /// The source's error, if it failed.
    pub source_error: Option<MigrateError>,
    /// The destination's error, if it failed.
    pub destination_error: Option<MigrateError>,
    /// The guest runs at the source (and, with a dirty rate, keeps writing).
    pub source_guest_running: bool,
    /// The guest was ever started at the destination.
    pub destination_guest_ran: bool,
    /// KVM guest: its memory at the source checked out after the failure
    /// (the guest's own checksum equals the VMM's over the same bytes, and
    /// every page it did not write since its fill still holds the fill).
    pub source_memory_intact: Option<bool>,
    /// The source guest's throttle after the failure (0: none, as it must
    /// be).
    pub source_throttle_after: f64,
    /// The longest the source guest's heartbeat stood still while the
    /// migration ran (a guest that was never paused: a few milliseconds).
    pub source_heartbeat_max_gap_ms: f64,
    /// The record of the failed migration.
    pub record: crate::record::Record,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "migration failed")?;
        if let Some(e) = &self.source_error {
            write!(f, "; source: {e}")?;
        }
        if let Some(e) = &self.destination_error {
            write!(f, "; destination: {e}")?;
        }
        match (self.source_guest_running, self.destination_guest_ran) {
            (true, false) => write!(
                f,
                "; the guest keeps running at the source, the destination discarded its copy"
            )?,
            (s, d) => write!(f, "; guest running at source: {s}, started at destination: {d}")?,
        }
        match self.source_memory_intact {
            Some(true) => write!(f, "; its memory checked out intact"),
            Some(false) => write!(f, "; its memory did NOT check out"),
            None => Ok(()),
        }
    }
}

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setup failed.
    #[error("setup: {0}")]
    Setup(String),
    /// The migration failed.
    #[error("{0}")]
    Failed(Box<Failure>),
}

/// Runs the demo, reporting progress lines through `say`.
pub fn run(opts: &DemoOptions, mut say: impl FnMut(&str)) -> Result<DemoReport, DemoError> {
    let cfg = opts.migration.clone();
    let setup = |e: &dyn std::fmt::Display| DemoError::Setup(e.to_string());
    let t = Instant::now();
    let (kind, guest_note) = resolve_guest(opts)?;
    if opts.huge_pages && kind == GuestKind::Synthetic && opts.tracker == TrackerKind::Uffd {
        return Err(DemoError::Setup(
            "--huge-pages with the synthetic guest needs --tracker bitmap: userfaultfd write-protection \
             tracks whole 2 MiB pages (KVM's dirty log, for a KVM guest, still tracks 4 KiB)"
                .into(),
        ));
    }
    let backing = if opts.huge_pages {
        ferry_engine::memory::PageBacking::Huge2M
    } else {
        ferry_engine::memory::PageBacking::Small
    };
    let guest_memory = || {
        GuestMemory::with_layout_on(&[(ferry_engine::GuestAddress(0), opts.memory_bytes)], backing)
            .map_err(|e| setup(&e))
    };
    let src_mem = Arc::new(guest_memory()?);
    let (mut src_guest, mut tracker) = start_source(opts, kind, &src_mem, t, &mut say)?;
    let prediction = match opts.estimate {
        Some(est) => {
            let p = crate::estimate::run(&est, &cfg, tracker.as_mut(), src_guest.control(), &src_mem)
                .map_err(|e| setup(&e))?;
            say(&crate::estimate::prediction_line(&p));
            Some(p)
        }
        None => None,
    };
    let dst_mem = Arc::new(guest_memory()?);
    let t = Instant::now();
    if opts.prefault_destination {
        dst_mem.prefault().map_err(|e| setup(&e))?;
    }
    let dest_prefault_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut dst_guest = match kind {
        GuestKind::Kvm => {
            let mut vm = KvmVm::incoming(dst_mem.clone(), opts.vcpus).map_err(|e| setup(&e))?;
            // Verification: the guest's first act after it resumes is to
            // checksum its memory; it stops right after, for a byte compare.
            vm.checksum_at_resume = true;
            vm.park_after_resume_checksum = true;
            Dest::Kvm(vm)
        }
        _ => Dest::Synthetic(SyntheticGuest::incoming(dst_mem.clone())),
    };
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| setup(&e))?;
    let addr = listener.local_addr().map_err(|e| setup(&e))?;
    say(&format!(
        "destination: data streams on {addr}, memory {} ({:.0} ms)",
        if opts.prefault_destination {
            "prefaulted"
        } else {
            "cold"
        },
        dest_prefault_ms
    ));

    // Control plane: steps 1-7 of the paper, for real, on loopback.
    let mut lab = lab::Lab::start(lab::POLICY).map_err(|e| setup(&e))?;
    let (ticket, claims) = lab.tickets("operator", lab::VM, lab::DEST).map_err(|e| setup(&e))?;
    let daemon = lab
        .destination(lab::DEST, lab::POLICY, 1 << 40)
        .map_err(|e| setup(&e))?;
    let offer = Offer {
        vm: lab::VM.into(),
        memory_bytes: opts.memory_bytes,
        streams: cfg.streams,
        integrity: cfg.integrity,
        guest: src_guest.kind(),
        vcpus: src_guest.control().vcpus(),
    };
    let (mut src_admitted, mut dst_admitted) = lab
        .admit(&daemon, &ticket, &claims, offer, addr.port())
        .map_err(|e| setup(&e))?;
    for st in &lab.steps {
        say(&format!("control: {:<80} {:>7.2} ms", st.name, st.ms));
    }
    let handshake_ms: f64 = lab.steps.iter().skip(1).map(|s| s.ms).sum();
    say(&format!(
        "control: migration {:#x} of {:?} admitted; data keys exported from the TLS session (handshake {handshake_ms:.1} ms)",
        claims.migration_id, claims.vm
    ));
    let keys = SessionKeys::from_grant(src_admitted.key_grant());
    let dst_keys = SessionKeys::from_grant(dst_admitted.key_grant());
    if cfg.integrity == Integrity::AeadSha256 {
        let sha = ferry_engine::sha::select(cfg.sha256);
        say(&format!(
            "data: AES-256-GCM ({}) and a SHA-256 per page ({}{})",
            if cfg.aead == AeadBackend::Ring {
                "ring"
            } else {
                "RustCrypto"
            },
            match sha {
                ferry_engine::sha::Sha256Backend::Tape => "tape-sha256, multi-buffer per frame",
                ferry_engine::sha::Sha256Backend::Ring => "ring, page by page",
            },
            if cfg.sha256 == ferry_engine::sha::Sha256Choice::Auto {
                ", chosen for this CPU"
            } else {
                ""
            }
        ));
    }

    let holes = |m: &GuestMemory| -> Result<u64, DemoError> {
        let mut b = ferry_engine::bitmap::DirtyBitmap::new(m.pages());
        m.holes_into(&mut b).map_err(|e| setup(&e))?;
        Ok(b.count())
    };
    let holes_before = holes(&src_mem)?;
    let started_unix_ms = crate::record::unix_ms();
    let heap_base = alloc::current_bytes();
    alloc::reset_peak();
    let writes_at_start = src_guest.writes();
    let probe = src_guest.heartbeat_probe();
    let sampling = std::sync::atomic::AtomicBool::new(true);
    let (src_result, dst_result, source_heartbeat_max_gap_ms) = std::thread::scope(|s| {
        // The source guest's longest stall while the migration runs (a
        // paused guest's heartbeat stands still).
        let sampler = s.spawn(|| {
            let (mut last, mut since, mut worst) = (probe(), Instant::now(), Duration::ZERO);
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
                let hb = probe();
                if hb != last {
                    worst = worst.max(since.elapsed());
                    (last, since) = (hb, Instant::now());
                }
            }
            worst.max(since.elapsed()).as_secs_f64() * 1e3
        });
        let dst_cfg = cfg.clone();
        let dst_mem = &dst_mem;
        let dst_guest = &mut dst_guest;
        // The commit is recorded (fdatasync'd) before the guest resumes.
        let gate = dst_admitted.commit_gate();
        let dest = s.spawn(move || {
            // Both sides are in this process: the source cannot leave
            // without the demo ending.
            let conns = accept_proven(&listener, &dst_keys, dst_cfg.streams, dst_cfg.io_timeout, &|| false)?;
            migrate_destination(
                dst_mem,
                dst_guest.control(),
                conns,
                &dst_keys,
                &dst_cfg,
                &Hooks::new(),
                Some(gate),
            )
        });
        let target = opts.interpose.as_ref().map_or(addr, |f| f(addr));
        let src = connect_streams(target, cfg.streams, cfg.io_timeout)
            .map_err(MigrateError::from)
            .and_then(|conns| {
                migrate_source(
                    &src_mem,
                    tracker.as_mut(),
                    src_guest.control(),
                    conns,
                    &keys,
                    &cfg,
                    &opts.hooks,
                )
            });
        let dst = dest.join().unwrap_or(Err(MigrateError::WorkersGone));
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        (src, dst, sampler.join().unwrap_or(f64::INFINITY))
    });
    let engine_heap_peak_bytes = alloc::peak_bytes().saturating_sub(heap_base) as u64;
    drop(tracker);
    let caps = (opts.hooks.bandwidth_cap().live(), opts.hooks.bandwidth_cap().paused());
    let (src, dst) = match (src_result, dst_result) {
        (Ok(s), Ok(d)) => (s, d),
        (s, d) => {
            let source_memory_intact = match &mut src_guest {
                Source::Kvm(vm) => Some(vm.check_memory().is_ok_and(|c| c.ok())),
                Source::Synthetic(_) => None,
            };
            let mut record = crate::record::Record::new("demo-vm", "src", "dst", opts.memory_bytes);
            record.migration_id = claims.migration_id;
            record.handshake_ms = handshake_ms;
            record.steps = lab.steps.clone();
            let err = s.as_ref().err().or(d.as_ref().err());
            if let Some(e) = err {
                let mut c = crate::record::Convergence::of_failure(&cfg, e, caps);
                c.prediction = prediction.clone();
                record.convergence = Some(c);
                record.error = Some(e.to_string());
                record.outcome = match e {
                    MigrateError::WontConverge(n) => {
                        record.rounds = n.rounds.clone();
                        "aborted"
                    }
                    MigrateError::Cancelled => "cancelled",
                    MigrateError::InDoubt(_) => "in-doubt",
                    _ => "failed",
                }
                .into();
            }
            return Err(DemoError::Failed(Box::new(Failure {
                source_error: s.err(),
                destination_error: d.err(),
                source_guest_running: src_guest.keeps_running(opts.dirty_rate_pages_per_s),
                destination_guest_ran: dst_guest.ran(),
                source_memory_intact,
                source_throttle_after: src_guest.throttle(),
                source_heartbeat_max_gap_ms,
                record,
            })));
        }
    };

    let finished_unix_ms = crate::record::unix_ms();
    let source_holes_filled = holes_before.saturating_sub(holes(&src_mem)?);
    for r in &src.rounds {
        say(&format!(
            "round {:>2}{}: {:>8} pages ({:>7} zero) {:>10} on the wire in {:>8.1} ms = {:>5.2} GB/s; dirty after: {}",
            r.round,
            if r.is_final { " (final, guest paused)" } else { "" },
            r.pages,
            r.zero_pages,
            crate::size::human(r.bytes_on_wire),
            r.duration_ms,
            r.throughput_gbps,
            r.dirty_pages_after
        ));
    }
    let downtime_ms = dst.resumed_at.saturating_duration_since(src.paused_at).as_secs_f64() * 1e3;
    let total_ms = src
        .resumed_confirmed_at
        .saturating_duration_since(src.started_at)
        .as_secs_f64()
        * 1e3;
    let transfer_s = src.committed_at.saturating_duration_since(src.started_at).as_secs_f64();
    say(&format!(
        "switchover: guest paused at the source, final pages + {} B of device state sent, destination verified and READY, source COMMITTED, destination recorded the commit durably ({:.2} ms) and resumed: downtime {downtime_ms:.2} ms",
        src.device_state_bytes, dst.commit_record_ms
    ));
    let mut convergence = crate::record::Convergence::of_report(&src, downtime_ms, caps);
    convergence.prediction = prediction;
    say(convergence.line(Some(downtime_ms)).trim());
    if convergence.downtime_exceeded {
        say(&format!(
            "WARNING: the downtime target of {} ms was EXCEEDED: {downtime_ms:.2} ms ({:.1}x){}",
            src.downtime_target_ms,
            downtime_ms / src.downtime_target_ms.max(1) as f64,
            if src.forced_past_target {
                " -- policy force switched over knowing it would be"
            } else {
                ""
            }
        ));
    }

    // Before the verification, which pauses the destination's guest.
    let destination_write_rate_pages_per_s = dst_guest.write_rate(WRITE_RATE_WINDOW);
    let t = Instant::now();
    let v = match (&mut src_guest, &mut dst_guest) {
        (Source::Synthetic(sg), Dest::Synthetic(dg)) => {
            verify_synthetic(sg, dg, &src_mem, &dst_mem, opts.dirty_rate_pages_per_s)?
        }
        (Source::Kvm(sv), Dest::Kvm(dv)) => verify_kvm(sv, dv, &src_mem, &dst_mem, opts.hot_set_bytes)?,
        _ => return Err(DemoError::Setup("source and destination guests differ".into())),
    };
    let verified = v.verified;
    // Non-repudiation: the source signs what it sent; the destination checks
    // it against its own transcript and signs a receipt.
    let manifest = Manifest {
        migration_id: claims.migration_id,
        vm: claims.vm.clone(),
        memory_bytes: opts.memory_bytes,
        pages_sent: src.pages_sent,
        bytes_on_wire: src.bytes_on_wire,
        rounds: src.rounds.len() as u64,
        started_unix_ms,
        finished_unix_ms,
        downtime_us: u64::try_from(dst.resumed_at.saturating_duration_since(src.paused_at).as_micros())
            .unwrap_or(u64::MAX),
        transcript_root: ferry_control::hex(&src.transcript_root),
    };
    let ids = (
        Identity::load(lab.dir.path(), Role::Host, lab::SOURCE).map_err(|e| setup(&e))?,
        Identity::load(lab.dir.path(), Role::Host, lab::DEST).map_err(|e| setup(&e))?,
    );
    let (sent, received) = std::thread::scope(|s| {
        let d = s.spawn(|| dst_admitted.receive_manifest(&ids.1, &dst.transcript_root));
        let r = src_admitted.exchange_manifest(&ids.0, &manifest);
        (
            r,
            d.join()
                .unwrap_or(Err(HandshakeError::Refused(ferry_control::refusal::Refusal::Internal(
                    "the destination thread (it panicked)",
                )))),
        )
    });
    let manifest_verified = sent.is_ok() && received.is_ok();
    let receipt = match (&sent, &received) {
        (Ok(r), Ok(_)) => {
            serde_json::json!({"manifest_sha256": r.manifest_sha256, "transcript_matches": r.transcript_matches})
        }
        (a, b) => serde_json::json!({"error": format!("{:?} / {:?}", a.as_ref().err(), b.as_ref().err())}),
    };
    say(&format!(
        "manifest: signed by the source, {} by the destination against its own transcript (root {}), receipt signed",
        if manifest_verified { "VERIFIED" } else { "NOT verified" },
        &manifest.transcript_root[..16]
    ));
    let _ = daemon.record("receipt", receipt.clone());
    let outcome = serde_json::json!({"manifest": manifest, "receipt": receipt, "verified": verified});
    let audited = lab
        .src_audit
        .append("commit", outcome)
        .map_err(|e| e.to_string())
        .and_then(|()| lab.verify_audit(lab::DEST).map_err(|e| e.to_string()));
    let (audit_verified, audit_entries) = match audited {
        Ok(n) => (true, n),
        Err(e) => {
            say(&format!("audit: FAILED: {e}"));
            (false, (0, 0))
        }
    };
    say(&format!(
        "audit: source domain log {} entries, destination log {} entries: hash chains and signatures {}",
        audit_entries.0,
        audit_entries.1,
        if audit_verified { "verified" } else { "NOT verified" }
    ));
    say(&format!(
        "verify: {} ({:.0} ms)",
        v.summary,
        t.elapsed().as_secs_f64() * 1e3
    ));

    Ok(DemoReport {
        verified,
        guest: src_guest.kind().as_str(),
        guest_note,
        vcpus: if kind == GuestKind::Kvm { opts.vcpus } else { 0 },
        memory_bytes: opts.memory_bytes,
        streams: cfg.streams,
        integrity: cfg.integrity,
        aead: cfg.aead,
        tracker: src.tracker,
        sha256: if cfg.integrity == Integrity::AeadSha256 {
            src.sha256
        } else {
            "none"
        },
        keys: "control-plane: TLS 1.3 exporter of the admitted mutually authenticated session",
        handshake_ms,
        steps: lab.steps.clone(),
        migration_id: claims.migration_id,
        audit_verified,
        audit_entries,
        manifest_verified,
        transcript_root: manifest.transcript_root.clone(),
        rounds: src.rounds.len(),
        downtime_ms,
        downtime_from_ms: src.paused_after().as_secs_f64() * 1e3,
        guest_stop_ms: src_guest.control().stop_latency().as_secs_f64() * 1e3,
        total_ms,
        bytes_on_wire: src.bytes_on_wire,
        pages_sent: src.pages_sent,
        zero_pages: src.zero_pages,
        throughput_gbps: if transfer_s > 0.0 {
            (src.pages_sent * ferry_engine::memory::PAGE_SIZE_U64) as f64 / transfer_s / 1e9
        } else {
            0.0
        },
        first_round_gbps: src.rounds.first().map_or(0.0, |r| r.throughput_gbps),
        guest_writes_during_migration: v.writes_at_pause.saturating_sub(writes_at_start),
        heartbeat_before: v.heartbeat_before,
        heartbeat_first_after: v.heartbeat_first_after,
        heartbeat_after: v.heartbeat_after,
        guest_checksum_source: v.checksums.map(|c| format!("{:016x}", c.0)),
        guest_checksum_destination: v.checksums.map(|c| format!("{:016x}", c.1)),
        guest_resumed: v.guest_resumed,
        source_stopped: v.source_stopped,
        device_state_bytes: src.device_state_bytes,
        vcpu_state_bytes: if kind == GuestKind::Kvm {
            src.device_state_bytes
        } else {
            0
        },
        destination_memory: if opts.prefault_destination { "warm" } else { "cold" },
        page_backing: if opts.huge_pages { "2MiB" } else { "4KiB" },
        dest_prefault_ms,
        source_holes_filled,
        engine_heap_peak_bytes,
        destination_write_rate_pages_per_s,
        convergence,
        round_detail: src.rounds,
    })
}
