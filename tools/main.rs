//! The `ferry` command.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use ferry::demo::{self, DemoOptions, GuestKind, TrackerKind};
use ferry::size::{human, parse_size};
use ferry_engine::bitmap::DirtyBitmap;
use ferry_engine::crypto::AeadBackend;
use ferry_engine::dirty::{DirtyTracker, UffdWpTracker};
use ferry_engine::migrate::MigrationConfig;
use ferry_engine::pipeline::Integrity;
use ferry_engine::GuestMemory;
use ferry_vmm::workload::{SyntheticGuest, WorkloadConfig};

/// Counts heap bytes so the demo can report what the engine really used.
#[global_allocator]
static ALLOC: ferry_vmm::alloc::CountingAlloc = ferry_vmm::alloc::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Secure live VM migration",
    long_about = None,
    args_override_self = true,
    after_help = TOP_EXAMPLES
)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// A TOML file with options per command (`[vm]`, `[receive]`,
    /// `[serve.authz]`, ...; keys are the long option names); options on
    /// the command line override it; FERRY_CONFIG=FILE does the same. See
    /// ferry.example.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

const TOP_EXAMPLES: &str = "Examples:
  ferry demo                                   # a whole secure live migration on loopback
  ferry pki init --out /etc/ferry/pki --hosts src,dst
  ferry --config /etc/ferry/ferry.toml vm      # a VMM with its options from a file
  ferry migrate --api /run/ferry/web-1.sock --to 10.0.0.2:7700 --dest-host dst
  ferry report /var/lib/ferry/runs/web-1-1700000000000.json --svg web-1.svg";

#[derive(Subcommand)]
enum Cmd {
    /// Migrate a running guest from a source to a destination on loopback,
    /// in this process, and verify the result.
    #[command(
        after_help = "Examples:\n  ferry demo\n  ferry demo --json --memory 1GiB --dirty-rate 0\n  ferry demo --guest kvm --vcpus 2 --hot-set 64MiB --dirty-rate 20000\n  ferry demo --guest synthetic --streams 1 --integrity aead --zero-fraction 0.5"
    )]
    Demo(DemoArgs),
    /// Make a lab PKI: a CA, host certificates, authn/authz server keys, an operator credential.
    #[command(
        subcommand,
        after_help = "Example:\n  ferry pki init --out /etc/ferry/pki --hosts src,dst"
    )]
    Pki(PkiCmd),
    /// Run a control-plane server: the authentication or the authorization server.
    #[command(
        subcommand,
        after_help = "Examples:\n  ferry serve authn --pki /etc/ferry/pki --name src --listen 0.0.0.0:7701\n  ferry serve authz --pki /etc/ferry/pki --name src --listen 0.0.0.0:7702 --policy policy.toml --audit authz.jsonl"
    )]
    Serve(ServeCmd),
    /// Run the destination daemon: admit and receive migrations.
    #[command(
        after_help = "Example:\n  ferry receive --pki /etc/ferry/pki --name dst --listen 0.0.0.0:7700 --policy /etc/ferry/incoming.toml --state-dir /var/lib/ferry"
    )]
    Receive(ReceiveArgs),
    /// Run a KVM guest in ferry's minimal VMM, and migrate it live (source),
    /// or receive one (--incoming, destination).
    #[command(after_help = VM_EXAMPLES)]
    Vm(Box<VmArgs>),
    /// Ask a running `ferry vm` (its --api socket) to migrate its guest, and
    /// show the progress.
    #[command(after_help = MIGRATE_EXAMPLES)]
    Migrate(MigrateArgs),
    /// Show a running `ferry vm`'s state and its migration's progress.
    #[command(
        after_help = "Examples:\n  ferry status --api /run/ferry/web-1.sock\n  ferry status --api /run/ferry/web-1.sock --json"
    )]
    Status(ApiArgs),
    /// Cancel a running migration before its commit point; the guest keeps
    /// running at the source.
    #[command(after_help = "Example:\n  ferry cancel --api /run/ferry/web-1.sock")]
    Cancel(ApiArgs),
    /// Summarise a migration record and draw its timeline as SVG.
    #[command(
        after_help = "Examples:\n  ferry report run.json\n  ferry report /var/lib/ferry/runs/web-1-1700000000000.json --svg web-1.svg"
    )]
    Report {
        /// The record (`ferry migrate --record`, `ferry demo --record`).
        record: std::path::PathBuf,
        /// Draw bytes per round, dirty rate, bandwidth and the downtime window here.
        #[arg(long, value_name = "OUT.svg")]
        svg: Option<std::path::PathBuf>,
    },
    /// Audit logs: verify a log's hash chain and signatures.
    #[command(
        subcommand,
        after_help = "Example:\n  ferry audit verify /var/lib/ferry/audit.jsonl --cert /etc/ferry/pki/hosts/dst/cert.pem"
    )]
    Audit(AuditCmd),
    /// Run the synthetic guest alone and print the dirty rate the tracker sees.
    #[command(after_help = "Example:\n  ferry workload --memory 1GiB --hot-set 64MiB --dirty-rate 20000 --seconds 3")]
    Workload(WorkloadArgs),
}

const MIGRATE_EXAMPLES: &str = "Examples:
  # live progress on a terminal, one line per round on a pipe
  ferry migrate --api /run/ferry/web-1.sock --to 10.0.0.2:7700 --dest-host dst

  # every event as a JSON line, the record in a chosen file
  ferry migrate --api /run/ferry/web-1.sock --to 10.0.0.2:7700 --dest-host dst --json --record web-1.json

Exit status: 0 migrated; 1 failed or cancelled (the guest runs at the source);
3 in doubt (commit sent, no confirmation: check the destination first).
The migration runs in the VMM: stopping `ferry migrate` does not stop it;
`ferry cancel` does (before the commit point).";

/// Which VMM to talk to.
#[derive(Args)]
struct ApiArgs {
    /// The VMM's API socket (`ferry vm --api PATH`).
    #[arg(long, value_name = "PATH")]
    api: std::path::PathBuf,
    /// Print the VMM's JSON reply as is.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The destination daemon's control address (`ferry vm --incoming` or `ferry receive`).
    #[arg(long)]
    to: std::net::SocketAddr,
    /// The destination's host name: its certificate must be for it.
    #[arg(long)]
    dest_host: String,
    /// Downtime target in milliseconds (default: the VMM's).
    #[arg(long)]
    downtime_ms_max: Option<u64>,
    /// Write the migration's record here (default: STATE_DIR/runs/VM-TIME.json,
    /// STATE_DIR being $FERRY_STATE_DIR, /var/lib/ferry for root, or ~/.local/state/ferry).
    #[arg(long, value_name = "FILE")]
    record: Option<std::path::PathBuf>,
    /// Give up waiting for the VMM after this many silent seconds.
    #[arg(long, default_value_t = 120)]
    idle_timeout_s: u64,
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create DIR/ca, DIR/hosts/NAME (one per host), DIR/clients/operator and
    /// DIR/servers/{authn,authz}; private keys are mode 0600.
    #[command(after_help = "Example:\n  ferry pki init --out /etc/ferry/pki --hosts src,dst")]
    Init {
        /// Folder to create the PKI in.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Host names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
    },
}

/// Who a daemon is and where it listens.
#[derive(Args)]
struct HostArgs {
    /// PKI folder (see `ferry pki init`).
    #[arg(long)]
    pki: std::path::PathBuf,
    /// This host's name: its certificate `hosts/NAME` serves TLS.
    #[arg(long)]
    name: String,
    /// Address to listen on.
    #[arg(long)]
    listen: std::net::SocketAddr,
}

#[derive(Subcommand)]
enum ServeCmd {
    /// Issue authentication tickets to clients with a certificate from the CA.
    #[command(after_help = "Example:\n  ferry serve authn --pki /etc/ferry/pki --name src --listen 0.0.0.0:7701")]
    Authn {
        #[command(flatten)]
        host: HostArgs,
        /// Ticket lifetime in seconds.
        #[arg(long, default_value_t = 60)]
        ttl_s: u64,
    },
    /// Issue authorization tickets under a policy, auditing every decision.
    #[command(
        after_help = "Example:\n  ferry serve authz --pki /etc/ferry/pki --name src --listen 0.0.0.0:7702 --policy policy.toml --audit /var/lib/ferry/authz-audit.jsonl"
    )]
    Authz {
        #[command(flatten)]
        host: HostArgs,
        /// Policy file (TOML, `[[allow]]` rules).
        #[arg(long)]
        policy: std::path::PathBuf,
        /// Audit log file.
        #[arg(long)]
        audit: std::path::PathBuf,
        /// Ticket lifetime in seconds (at most 300).
        #[arg(long, default_value_t = 300)]
        ttl_s: u64,
    },
}

const VM_EXAMPLES: &str = "Examples:
  # a 1 GiB guest writing 20000 pages/s into a 64 MiB hot set, until killed
  ferry vm --memory 1GiB --hot-set 64MiB --dirty-rate 20000

  # destination host: receive a guest into a fresh VM and run it
  ferry vm --incoming --pki /etc/ferry/pki --name dst --listen 0.0.0.0:7700 \\
      --policy /etc/ferry/incoming.toml --state-dir /var/lib/ferry

  # source host: run a guest, migrate it to dst after 5 s
  ferry vm --memory 1GiB --pki /etc/ferry/pki --name src --authn 10.0.0.1:7701 --authz 10.0.0.1:7702 \\
      --migrate-to 10.0.0.2:7700 --dest-host dst --vm-id web-1 --migrate-after-s 5

  # source host: run a guest and wait for `ferry migrate --api /run/ferry/web-1.sock ...`
  ferry vm --memory 1GiB --pki /etc/ferry/pki --name src --authn 10.0.0.1:7701 --authz 10.0.0.1:7702 \\
      --vm-id web-1 --api /run/ferry/web-1.sock";

#[derive(Args)]
struct VmArgs {
    /// Guest memory (a multiple of 2 MiB, at least 4 MiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    memory: u64,
    /// vCPUs (1..=16). vCPU 0 runs the workload, the others beat a heartbeat.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    vcpus: u32,
    /// Hot set the guest keeps writing.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    hot_set: u64,
    /// Guest writes per second (one page each; 0 = idle guest).
    #[arg(long, default_value_t = 20_000)]
    dirty_rate: u64,
    /// Print a heartbeat event this often (ms).
    #[arg(long, default_value_t = 1000)]
    heartbeat_every_ms: u64,
    /// Stop after this many seconds (default: until killed, or migrated).
    #[arg(long)]
    run_for_s: Option<f64>,
    /// Have the guest checksum its own memory at the switchover (source:
    /// when paused; destination: first thing after it resumes).
    #[arg(long)]
    verify: bool,
    /// Destination mode: receive a guest into a fresh VM (needs --listen,
    /// --policy, --state-dir, --pki, --name).
    #[arg(long)]
    incoming: bool,
    /// Destination: control address to listen on.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Destination: incoming policy (TOML, `[[incoming]]` rules).
    #[arg(long)]
    policy: Option<std::path::PathBuf>,
    /// Destination: folder for the replay cache and the audit log.
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
    /// Destination: ports for the data streams, FIRST-LAST (default: ephemeral).
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_port_range)]
    data_ports: Option<(u16, u16)>,
    /// PKI folder (see `ferry pki init`).
    #[arg(long)]
    pki: Option<std::path::PathBuf>,
    /// This host's name (its certificate `hosts/NAME`).
    #[arg(long)]
    name: Option<String>,
    /// Source: migrate to the destination daemon at this address.
    #[arg(long)]
    migrate_to: Option<std::net::SocketAddr>,
    /// Source: the destination's host name (its certificate must be for it).
    #[arg(long)]
    dest_host: Option<String>,
    /// Source: the authentication server.
    #[arg(long)]
    authn: Option<std::net::SocketAddr>,
    /// Source: the authorization server.
    #[arg(long)]
    authz: Option<std::net::SocketAddr>,
    /// Source: the name on the authn/authz servers' certificates (default: --name).
    #[arg(long)]
    servers_name: Option<String>,
    /// Source: the migration client credential (`clients/NAME`).
    #[arg(long, default_value = "operator")]
    client: String,
    /// Source: the VM's id, as tickets and policies name it.
    #[arg(long, default_value = "demo-vm")]
    vm_id: String,
    /// Source: seconds the guest runs before the migration starts.
    #[arg(long, default_value_t = 1.0)]
    migrate_after_s: f64,
    /// Source: audit log file for this host's side of the migration.
    #[arg(long)]
    audit: Option<std::path::PathBuf>,
    /// Source: serve the local API (JSON lines: migrate, status, cancel) on
    /// this Unix socket, for `ferry migrate`, `ferry status` and `ferry cancel`.
    #[arg(long, value_name = "PATH")]
    api: Option<std::path::PathBuf>,
    /// Source: with --migrate-to, write the migration's record here
    /// (default: STATE_DIR/runs/VM-TIME.json).
    #[arg(long, value_name = "FILE")]
    record: Option<std::path::PathBuf>,
    /// Data streams.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    streams: u16,
    /// Page integrity: aead+sha256 or aead.
    #[arg(long, default_value = "aead+sha256")]
    integrity: Integrity,
    /// Downtime target in milliseconds.
    #[arg(long, default_value_t = 50)]
    downtime_ms_max: u64,
    /// Seconds without network progress before a migration aborts.
    #[arg(long, default_value_t = 10)]
    io_timeout_s: u64,
}

#[derive(Args)]
struct ReceiveArgs {
    #[command(flatten)]
    host: HostArgs,
    /// Incoming policy (TOML, `[[incoming]]` rules).
    #[arg(long)]
    policy: std::path::PathBuf,
    /// Folder for the replay cache and the audit log.
    #[arg(long)]
    state_dir: std::path::PathBuf,
    /// Most guest memory committed to incoming migrations at once.
    #[arg(long, default_value = "64GiB", value_parser = parse_size)]
    max_memory: u64,
    /// Most incoming migrations at once.
    #[arg(long, default_value_t = 4)]
    max_concurrent: usize,
    /// Ports for the data streams, FIRST-LAST (one per migration at a time;
    /// default: an ephemeral port). For firewalls.
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_port_range)]
    data_ports: Option<(u16, u16)>,
    /// Seconds without network progress before a migration aborts.
    #[arg(long, default_value_t = 10)]
    io_timeout_s: u64,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check every entry of FILE: hash chain, sequence, and signatures by the
    /// key of CERT (the host that wrote it). Says where the log breaks.
    #[command(
        after_help = "Example:\n  ferry audit verify /var/lib/ferry/audit.jsonl --cert /etc/ferry/pki/hosts/dst/cert.pem"
    )]
    Verify {
        /// The audit log.
        file: std::path::PathBuf,
        /// The certificate (PEM) of the host that signed it.
        #[arg(long)]
        cert: std::path::PathBuf,
    },
}

#[derive(Args)]
struct DemoArgs {
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
    /// Guest memory size (e.g. 1GiB, 256MiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    memory: u64,
    /// Hot set the guest keeps writing.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    hot_set: u64,
    /// Guest writes per second (pages/s; 0 = idle guest).
    #[arg(long, default_value_t = 20_000)]
    dirty_rate: u64,
    /// Fraction of all-zero pages in the synthetic guest's memory (0..1).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    zero_fraction: f64,
    /// Data streams (TCP connections, one pinned worker each).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    streams: u16,
    /// Page integrity: aead+sha256 (AES-256-GCM plus a SHA-256 per page) or aead.
    #[arg(long, default_value = "aead+sha256")]
    integrity: Integrity,
    /// AES-GCM implementation: ring, or rustcrypto (needs --features rustcrypto-aead).
    #[arg(long, default_value = "ring")]
    aead: AeadBackend,
    /// Downtime target in milliseconds: pre-copy stops when the rest fits.
    #[arg(long, default_value_t = 50)]
    downtime_ms_max: u64,
    /// Pre-copy rounds at most before the final one.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
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
    /// Seconds without network progress before the migration aborts.
    #[arg(long, default_value_t = 10)]
    io_timeout_s: u64,
}

#[derive(Args)]
struct WorkloadArgs {
    /// Guest memory size.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    memory: u64,
    /// Hot set size.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    hot_set: u64,
    /// Writes per second (pages/s).
    #[arg(long, default_value_t = 20_000)]
    dirty_rate: u64,
    /// Fraction of all-zero pages.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    zero_fraction: f64,
    /// How long to run.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (a, b) = (port(a)?, port(b)?);
    if a > b {
        return Err(format!("{s:?}: the first port must not be above the last"));
    }
    Ok((a, b))
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

fn main() -> ExitCode {
    let args = match ferry::config::args_with_config(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ferry: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.cmd {
        Cmd::Demo(a) => run_demo(a),
        Cmd::Workload(a) => run_workload(a),
        Cmd::Audit(AuditCmd::Verify { file, cert }) => audit_verify(&file, &cert),
        Cmd::Migrate(a) => ferry::ops::migrate(&ferry::ops::MigrateOptions {
            api: a.api.api,
            json: a.api.json,
            to: a.to,
            dest_host: a.dest_host,
            downtime_ms_max: a.downtime_ms_max,
            record: a.record,
            idle_timeout: Duration::from_secs(a.idle_timeout_s.max(1)),
        }),
        Cmd::Status(a) => ferry::ops::status(&a.api, a.json),
        Cmd::Cancel(a) => ferry::ops::cancel(&a.api, a.json),
        Cmd::Report { record, svg } => ferry::ops::report(&record, svg.as_deref()),
        Cmd::Serve(ServeCmd::Authn { host, ttl_s }) => {
            ferry::daemon::serve_authn(&host.pki, &host.name, host.listen, ttl_s).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Serve(ServeCmd::Authz {
            host,
            policy,
            audit,
            ttl_s,
        }) => ferry::daemon::serve_authz(&host.pki, &host.name, host.listen, &policy, &audit, ttl_s)
            .map(|()| ExitCode::SUCCESS),
        Cmd::Vm(a) => run_vm(*a),
        Cmd::Receive(a) => ferry::daemon::receive(&ferry::daemon::ReceiveOptions {
            pki: a.host.pki,
            name: a.host.name,
            listen: a.host.listen,
            policy: a.policy,
            state_dir: a.state_dir,
            max_memory_bytes: a.max_memory,
            max_concurrent: a.max_concurrent,
            io_timeout: Duration::from_secs(a.io_timeout_s.max(1)),
            guests: ferry::daemon::local_guests(),
            verify_guest: false,
            heartbeat_events: None,
            data_ports: a.data_ports,
        })
        .map(|()| ExitCode::SUCCESS),
        Cmd::Pki(PkiCmd::Init { out, hosts }) => ferry_control::pki::init(&out, &hosts)
            .map(|()| {
                println!(
                    "PKI created in {}: CA, hosts {}, client operator, authn and authz keys",
                    out.display(),
                    hosts.join(", ")
                );
                ExitCode::SUCCESS
            })
            .map_err(|e| e.to_string()),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_demo(a: DemoArgs) -> Result<ExitCode, String> {
    let synthetic_only = a.tracker.is_some() || a.zero_fraction > 0.0;
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
    let opts = DemoOptions {
        guest,
        vcpus: a.vcpus,
        guest_checksum_at_pause: !a.kick_pause,
        memory_bytes: a.memory,
        hot_set_bytes: a.hot_set,
        dirty_rate_pages_per_s: a.dirty_rate,
        zero_fraction: a.zero_fraction,
        tracker: a.tracker.unwrap_or(TrackerKind::Uffd),
        prefault_destination: !a.cold_destination,
        migration: MigrationConfig {
            streams: a.streams,
            integrity: a.integrity,
            aead: a.aead,
            chunk_pages: a.chunk_pages,
            downtime_ms_max: a.downtime_ms_max,
            max_rounds: a.max_rounds,
            io_timeout: Duration::from_secs(a.io_timeout_s.max(1)),
            ..MigrationConfig::default()
        },
        interpose: None,
        hooks: ferry_engine::progress::Hooks::new(),
    };
    if a.memory == 0 || a.memory % 4096 != 0 {
        return Err(format!(
            "--memory must be a positive multiple of 4 KiB, got {}",
            a.memory
        ));
    }
    let json = a.json;
    let report = demo::run(&opts, |line| {
        if !json {
            println!("{line}");
        }
    })
    .map_err(|e| e.to_string())?;
    let record_path = a.record.unwrap_or_else(|| ferry::record::default_path("demo-vm"));
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
            "done: {} moved in {:.0} ms ({:.2} GB/s, {} rounds, {} on the wire, {} zero pages), downtime {:.2} ms, engine heap peak {}, verified: {}",
            human(report.memory_bytes),
            report.total_ms,
            report.throughput_gbps,
            report.rounds,
            human(report.bytes_on_wire),
            report.zero_pages,
            report.downtime_ms,
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

fn run_vm(a: VmArgs) -> Result<ExitCode, String> {
    let need = |what: &str, v: bool| if v { Ok(()) } else { Err(format!("ferry vm: {what}")) };
    let io_timeout = Duration::from_secs(a.io_timeout_s.max(1));
    if a.incoming {
        let (Some(pki), Some(name), Some(listen), Some(policy), Some(state_dir)) =
            (a.pki, a.name, a.listen, a.policy, a.state_dir)
        else {
            return Err("ferry vm --incoming needs --pki, --name, --listen, --policy and --state-dir".into());
        };
        need(
            "--migrate-to is for the source, not with --incoming",
            a.migrate_to.is_none(),
        )?;
        ferry_vmm::kvm::available().map_err(|why| format!("ferry vm needs KVM: {why}"))?;
        return ferry::daemon::receive(&ferry::daemon::ReceiveOptions {
            pki,
            name,
            listen,
            policy,
            state_dir,
            max_memory_bytes: a.memory.max(64 << 30),
            max_concurrent: 1,
            io_timeout,
            guests: vec![ferry_control::modes::GuestKind::Kvm],
            verify_guest: a.verify,
            heartbeat_events: Some(Duration::from_millis(a.heartbeat_every_ms.max(10))),
            data_ports: a.data_ports,
        })
        .map(|()| ExitCode::SUCCESS);
    }
    let source = match (a.pki, a.name, a.authn, a.authz) {
        (Some(pki), Some(host), Some(authn), Some(authz)) => Some(ferry::vm::SourceHost {
            servers_name: a.servers_name.unwrap_or_else(|| host.clone()),
            pki,
            host,
            client: a.client,
            authn,
            authz,
            audit: a.audit,
            migration: MigrationConfig {
                streams: a.streams,
                integrity: a.integrity,
                downtime_ms_max: a.downtime_ms_max,
                io_timeout,
                ..MigrationConfig::default()
            },
        }),
        (None, None, None, None) => None,
        _ => return Err("a source that migrates needs all of --pki, --name, --authn and --authz".into()),
    };
    let migrate = match a.migrate_to {
        None => None,
        Some(dest) => {
            let (Some(_), Some(dest_host)) = (&source, a.dest_host) else {
                return Err("ferry vm --migrate-to needs --pki, --name, --dest-host, --authn and --authz".into());
            };
            let record = a.record.unwrap_or_else(|| ferry::record::default_path(&a.vm_id));
            Some((
                ferry::vm::MigrateTo {
                    dest,
                    dest_host,
                    downtime_ms_max: None,
                    record: Some(record),
                },
                Duration::from_secs_f64(a.migrate_after_s.clamp(0.0, 86_400.0)),
            ))
        }
    };
    need(
        "--api serves a source VM's API (migrate, status, cancel); it needs --pki, --name, --authn and --authz to migrate",
        a.api.is_none() || source.is_some(),
    )?;
    ferry::vm::run(&ferry::vm::VmOptions {
        memory_bytes: a.memory,
        vcpus: a.vcpus,
        program: ferry_vmm::kvm::GuestProgram {
            hot_set_bytes: a.hot_set,
            writes_per_s: a.dirty_rate,
            ..Default::default()
        },
        vm_id: a.vm_id,
        heartbeat_every: Duration::from_millis(a.heartbeat_every_ms.max(10)),
        run_for: a.run_for_s.map(|s| Duration::from_secs_f64(s.clamp(0.0, 1e9))),
        verify: a.verify,
        source,
        migrate,
        api: a.api,
    })
    .map(|()| ExitCode::SUCCESS)
}

fn audit_verify(file: &std::path::Path, cert: &std::path::Path) -> Result<ExitCode, String> {
    let der = ferry_control::pki::cert_from_pem_file(cert).map_err(|e| e.to_string())?;
    match ferry_control::audit::verify_file(file, &der) {
        Ok((n, last)) => {
            println!(
                "{}: {n} entries, hash chain and signatures verified (last entry hash {last})",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run_workload(a: WorkloadArgs) -> Result<ExitCode, String> {
    let mem = Arc::new(GuestMemory::new(a.memory).map_err(|e| e.to_string())?);
    let cfg = WorkloadConfig {
        hot_set_bytes: a.hot_set.min(a.memory),
        dirty_rate_pages_per_s: a.dirty_rate,
        zero_fraction: a.zero_fraction,
        ..WorkloadConfig::default()
    };
    let mut tracker = UffdWpTracker::new(&mem).map_err(|e| e.to_string())?;
    let guest = SyntheticGuest::start(mem.clone(), cfg, None);
    tracker.start().map_err(|e| e.to_string())?;
    println!(
        "synthetic guest: {} memory, {} hot set, target {} pages/s",
        human(a.memory),
        human(cfg.hot_set_bytes),
        a.dirty_rate
    );
    for s in 1..=a.seconds {
        let t = Instant::now();
        let before = guest.heartbeat();
        std::thread::sleep(Duration::from_secs(1));
        let mut dirty = DirtyBitmap::new(mem.pages());
        let scan = Instant::now();
        tracker.collect(&mut dirty).map_err(|e| e.to_string())?;
        println!(
            "second {s}: {} writes, {} distinct dirty pages seen by uffd-wp (scan {:.2} ms), over {:.2} s",
            guest.heartbeat() - before,
            dirty.count(),
            scan.elapsed().as_secs_f64() * 1e3,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}
