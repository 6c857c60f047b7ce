//! `ferry demo`: a whole secure live migration on loopback, verified.

use super::*;

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Print one JSON object instead of progress lines.
    #[arg(long)]
    json: bool,
    /// Write the migration's record here (default: STATE_DIR/runs/demo-vm-TIME.json;
    /// see `ferry report`).
    #[arg(long, value_name = "FILE")]
    record: Option<std::path::PathBuf>,
    /// Guest to migrate: kvm (a real KVM guest run by ferry's minimal VMM),
    /// synthetic (a thread writing guest memory), or auto: kvm where
    /// /dev/kvm works, unless --tracker or --zero-fraction ask for the
    /// synthetic guest.
    #[arg(long, default_value = "auto")]
    guest: GuestKind,
    /// vCPUs of the KVM guest (1..=16).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    vcpus: u32,
    /// KVM guest: stop its vCPUs with a kick instead of letting the guest
    /// checksum its memory and stop itself (the VMM then computes that
    /// checksum of the frozen memory; the destination's guest still computes
    /// its own).
    #[arg(long)]
    kick_pause: bool,
    #[command(flatten)]
    shape: GuestShape,
    /// Data streams (TCP connections, one pinned worker each).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    streams: u16,
    /// Page integrity: aead+sha256 (AES-256-GCM plus a SHA-256 per page) or aead.
    #[arg(long, default_value = "aead+sha256")]
    integrity: Integrity,
    /// AES-GCM implementation: ring, or rustcrypto (needs --features rustcrypto-aead).
    #[arg(long, default_value = "ring")]
    aead: AeadBackend,
    #[command(flatten)]
    sha: Sha256Arg,
    /// Downtime target in milliseconds: pre-copy stops when the rest fits.
    #[arg(long, default_value_t = 50)]
    downtime_ms_max: u64,
    /// Pre-copy rounds at most before the final one.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    #[command(flatten)]
    converge: ConvergeArgs,
    /// First watch the guest's writes for this many seconds (nothing is
    /// sent) and predict pre-copy; the record then holds the prediction
    /// next to what happened.
    #[arg(long, value_name = "SECONDS")]
    estimate_s: Option<f64>,
    /// The bandwidth the estimate assumes (default: --max-bandwidth).
    #[arg(long, value_name = "RATE", value_parser = ferry::size::parse_rate)]
    estimate_bandwidth: Option<u64>,
    /// Dirty tracker of the synthetic guest: uffd (write-protect +
    /// PAGEMAP_SCAN, the default) or bitmap (guest-marked). A KVM guest is
    /// always tracked by KVM's dirty log.
    #[arg(long)]
    tracker: Option<TrackerKind>,
    /// Pages per frame (1..=64).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=64))]
    chunk_pages: u32,
    /// Do not fault the destination's memory in before the transfer.
    #[arg(long)]
    cold_destination: bool,
    /// Back both guests' memory with 2 MiB huge pages from the hugetlb pool
    /// (reserve them first: sysctl vm.nr_hugepages=N, 512 per GiB per
    /// guest). KVM's dirty log still tracks 4 KiB pages; a synthetic guest
    /// needs --tracker bitmap (write-protection would track 2 MiB pages).
    #[arg(long)]
    huge_pages: bool,
    /// Seconds without network progress before the migration aborts.
    #[arg(long, default_value_t = 10)]
    io_timeout_s: u64,
}

impl DemoArgs {
    /// Runs the command.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        let a = self;
        let synthetic_only = a.tracker.is_some() || a.shape.zero_fraction > 0.0;
        let guest = match a.guest {
            GuestKind::Auto if synthetic_only => GuestKind::Synthetic,
            GuestKind::Kvm if synthetic_only => {
                return Err(
                    "--tracker and --zero-fraction apply to the synthetic guest (a KVM guest fills all its memory and is tracked by KVM's dirty log); use --guest synthetic"
                        .into(),
                )
            }
            g => g,
        };
        let mut migration = MigrationConfig {
            streams: a.streams,
            integrity: a.integrity,
            aead: a.aead,
            sha256: a.sha.sha256,
            chunk_pages: a.chunk_pages,
            downtime_ms_max: a.downtime_ms_max,
            max_rounds: a.max_rounds,
            io_timeout: Duration::from_secs(a.io_timeout_s.max(1)),
            ..MigrationConfig::default()
        };
        a.converge.apply(&mut migration);
        migration.validate().map_err(|e| e.to_string())?;
        let opts = DemoOptions {
            guest,
            vcpus: a.vcpus,
            guest_checksum_at_pause: !a.kick_pause,
            memory_bytes: a.shape.memory,
            hot_set_bytes: a.shape.hot_set,
            dirty_rate_pages_per_s: a.shape.dirty_rate,
            zero_fraction: a.shape.zero_fraction,
            tracker: a.tracker.unwrap_or(TrackerKind::Uffd),
            prefault_destination: !a.cold_destination,
            huge_pages: a.huge_pages,
            migration,
            interpose: None,
            hooks: ferry_engine::progress::Hooks::new(),
            estimate: a.estimate_s.map(|seconds| ferry::demo::EstimateOptions {
                seconds,
                bandwidth_bytes_per_s: a.estimate_bandwidth,
            }),
        };
        if a.shape.memory == 0 || !a.shape.memory.is_multiple_of(4096) {
            return Err(format!("--memory must be a positive multiple of 4 KiB, got {}", a.shape.memory).into());
        }
        let json = a.json;
        let record_path = a.record.unwrap_or_else(|| ferry::record::default_path("demo-vm"));
        let report = match ferry::demo::run(&opts, |line| {
            if !json {
                println!("{line}");
            }
        }) {
            Ok(r) => r,
            Err(ferry::demo::DemoError::Failed(f)) => {
                // The failed migration's record, and in JSON what happened.
                let recorded = f.record.write(&record_path);
                if json {
                    let v = serde_json::json!({
                        "verified": false,
                        "outcome": f.record.outcome,
                        "error": f.record.error,
                        "convergence": f.record.convergence,
                        "source_guest_running": f.source_guest_running,
                        "destination_guest_ran": f.destination_guest_ran,
                        "source_throttle_after": f.source_throttle_after,
                        "source_heartbeat_max_gap_ms": f.source_heartbeat_max_gap_ms,
                        "rounds": f.record.rounds.len(),
                        "round_detail": f.record.rounds,
                    });
                    println!("{}", serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?);
                }
                match &recorded {
                    Ok(()) => eprintln!("record: {}", record_path.display()),
                    Err(why) => eprintln!("record: not written: {why}"),
                }
                return Err(f.to_string().into());
            }
            Err(e) => return Err(e.to_string().into()),
        };
        let recorded = report.record().write(&record_path);
        if json {
            println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
            match &recorded {
                Ok(()) => eprintln!("record: {}", record_path.display()),
                Err(why) => eprintln!("record: not written: {why}"),
            }
        } else {
            match &recorded {
                Ok(()) => println!(
                    "record: {} (draw it: ferry report {} --svg demo.svg)",
                    record_path.display(),
                    record_path.display()
                ),
                Err(why) => println!("record: not written: {why}"),
            }
            println!(
                "done: {} moved in {:.0} ms ({:.2} GB/s, {} rounds, {} on the wire, {} zero pages), downtime {:.2} ms (target {} ms{}), engine heap peak {}, verified: {}",
                human(report.memory_bytes),
                report.total_ms,
                report.throughput_gbps,
                report.rounds,
                human(report.bytes_on_wire),
                report.zero_pages,
                report.downtime_ms,
                report.convergence.downtime_target_ms,
                if report.convergence.downtime_exceeded {
                    ", EXCEEDED"
                } else {
                    ""
                },
                human(report.engine_heap_peak_bytes),
                if report.verified { "yes" } else { "NO" }
            );
        }
        Ok(if report.verified {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}
