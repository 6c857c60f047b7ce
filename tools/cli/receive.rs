//! `ferry receive`: the destination daemon.

use super::*;

#[derive(Args)]
pub(crate) struct ReceiveArgs {
    #[command(flatten)]
    host: HostArgs,
    /// Incoming policy (TOML, `[[incoming]]` rules).
    #[arg(long)]
    policy: std::path::PathBuf,
    /// Folder for the replay cache and the audit log.
    #[arg(long)]
    state_dir: std::path::PathBuf,
    /// Most guest memory committed to incoming migrations at once (default:
    /// the host's available memory at start, less an eighth for the host).
    /// An offer that would not fit is refused before it is accepted.
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
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
    #[command(flatten)]
    sha: Sha256Arg,
}

impl ReceiveArgs {
    /// Runs the command.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        let a = self;
        a.sha.select();
        ferry::daemon::receive(&ferry::daemon::ReceiveOptions {
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
            metrics: a.host.metrics,
        })?;
        Ok(ExitCode::SUCCESS)
    }
}
