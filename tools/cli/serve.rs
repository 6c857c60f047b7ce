//! `ferry serve authn|authz`: the source domain's ticket servers.

use super::*;

#[derive(Subcommand)]
pub(crate) enum ServeCmd {
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

impl ServeCmd {
    /// Runs the command.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        match self {
            ServeCmd::Authn { host, ttl_s } => {
                ferry::daemon::serve_authn(&host.pki, &host.name, host.listen, host.metrics, ttl_s)?
            }
            ServeCmd::Authz {
                host,
                policy,
                audit,
                ttl_s,
            } => ferry::daemon::serve_authz(&host.pki, &host.name, host.listen, host.metrics, &policy, &audit, ttl_s)?,
        }
        Ok(ExitCode::SUCCESS)
    }
}
