//! The `ferry` command: a thin layer over the `ferry` library, one module
//! per command (each `fn run(self) -> Result<ExitCode, CliError>`).
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use ferry::demo::{DemoOptions, GuestKind, TrackerKind};
use ferry::size::{human, parse_size};
use ferry_engine::bitmap::DirtyBitmap;
use ferry_engine::crypto::AeadBackend;
use ferry_engine::dirty::{DirtyTracker, UffdWpTracker};
use ferry_engine::migrate::MigrationConfig;
use ferry_engine::pipeline::Integrity;
use ferry_engine::sha::Sha256Choice;
use ferry_engine::GuestMemory;
use ferry_vmm::workload::{SyntheticGuest, WorkloadConfig};

mod audit;
mod common;
mod demo;
mod doctor;
mod error;
mod ops;
mod pki;
mod policy;
mod receive;
mod serve;
mod vm;
mod workload;

use self::audit::AuditCmd;
use self::common::ConvergeArgs;
use self::common::{parse_port_range, GuestShape, HostArgs, Sha256Arg};
use self::demo::DemoArgs;
use self::doctor::DoctorArgs;
use self::error::CliError;
use self::ops::{ApiArgs, EstimateArgs, MigrateArgs, ReportArgs, SetBandwidthArgs, MIGRATE_EXAMPLES};
use self::pki::PkiCmd;
use self::policy::PolicyCmd;
use self::receive::ReceiveArgs;
use self::serve::ServeCmd;
use self::vm::{VmArgs, VM_EXAMPLES};
use self::workload::WorkloadArgs;

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
    /// Check a policy file, or ask it which rule allows or denies a migration
    /// (`policy.example.toml` documents every rule and field).
    #[command(
        subcommand,
        after_help = "Examples:\n  ferry policy check /etc/ferry/policy.toml\n  ferry policy explain /etc/ferry/policy.toml --principal operator --vm web-1 --from src --to dst"
    )]
    Policy(PolicyCmd),
    /// Check this host against what ferry needs (io_uring, userfaultfd
    /// write-protect, KVM, limits, the clock; with options the PKI, ports,
    /// policy and state directory) and name the fix for each miss.
    #[command(
        after_help = "Examples:\n  ferry doctor\n  ferry doctor --pki /etc/ferry/pki --name dst --listen 0.0.0.0:7700 --policy /etc/ferry/incoming.toml --state-dir /var/lib/ferry\n\nExit status: 0 nothing failed (warnings allowed), 1 a check failed."
    )]
    Doctor(DoctorArgs),
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
    /// A migration in doubt (Commit sent, its confirmation lost): ask the
    /// destination again what became of it. On its signed "committed" the
    /// source VM shuts down; on "discarded" the guest resumes at the source;
    /// otherwise it stays paused. Exit 0 answered, 3 still in doubt.
    #[command(after_help = "Example:\n  ferry resolve --api /run/ferry/web-1.sock")]
    Resolve(ApiArgs),
    /// Change the bandwidth cap of the migration a VMM runs now (it takes
    /// effect from the next batch sent).
    SetBandwidth(SetBandwidthArgs),
    /// Watch a running VM's writes for a few seconds (nothing is sent) and
    /// predict whether pre-copy converges at a bandwidth and target, in how
    /// many rounds, or what throttle it would need. Exit 2: it would not.
    Estimate(EstimateArgs),
    /// Summarise a migration record and draw its timeline as SVG.
    #[command(
        after_help = "Examples:\n  ferry report run.json\n  ferry report /var/lib/ferry/runs/web-1-1700000000000.json --svg web-1.svg"
    )]
    Report(ReportArgs),
    /// Audit logs: verify a log's hash chain and signatures.
    #[command(
        subcommand,
        after_help = "Example:\n  ferry audit verify /var/lib/ferry/audit.jsonl --cert /etc/ferry/pki/hosts/dst/cert.pem"
    )]
    Audit(AuditCmd),
    /// Run the synthetic guest alone and print the dirty rate the tracker sees.
    #[command(after_help = "Example:\n  ferry workload --memory 1GiB --hot-set 64MiB --dirty-rate 20000 --seconds 3")]
    Workload(WorkloadArgs),
    /// Print shell completions for SHELL (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  ferry completions bash > /usr/share/bash-completion/completions/ferry\n  ferry completions zsh > /usr/share/zsh/vendor-completions/_ferry"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (ferry.1 and one per command, ferry-receive.1,
    /// ...) into DIR.
    #[command(after_help = "Example:\n  ferry man --out /usr/share/man/man1")]
    Man {
        /// The folder to write them to (made if missing).
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
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
        Cmd::Demo(a) => a.run(),
        Cmd::Workload(a) => a.run(),
        Cmd::Completions { shell } => {
            // Into a buffer first: the generator panics on a write error
            // (a closed pipe), this says it instead.
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "ferry",
                &mut script,
            );
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .map(|()| ExitCode::SUCCESS)
                .map_err(|e| CliError::Failed(format!("writing the completions: {e}")))
        }
        Cmd::Man { out } => std::fs::create_dir_all(&out)
            .and_then(|()| clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &out))
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| CliError::Failed(format!("writing man pages to {}: {e}", out.display()))),
        Cmd::Audit(a) => a.run(),
        Cmd::Migrate(a) => a.run(),
        Cmd::Status(a) => a.status(),
        Cmd::Cancel(a) => a.cancel(),
        Cmd::Resolve(a) => a.resolve(),
        Cmd::SetBandwidth(a) => a.run(),
        Cmd::Estimate(a) => a.run(),
        Cmd::Report(a) => a.run(),
        Cmd::Serve(a) => a.run(),
        Cmd::Vm(a) => a.run(),
        Cmd::Receive(a) => a.run(),
        Cmd::Pki(a) => a.run(),
        Cmd::Policy(a) => a.run(),
        Cmd::Doctor(a) => a.run(),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            error::report(&e);
            ExitCode::FAILURE
        }
    }
}
