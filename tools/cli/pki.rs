//! `ferry pki init`.

use super::*;

#[derive(Subcommand)]
pub(crate) enum PkiCmd {
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

impl PkiCmd {
    /// Runs the command.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        match self {
            PkiCmd::Init { out, hosts } => {
                ferry_control::pki::init(&out, &hosts)?;
                println!(
                    "PKI created in {}: CA, hosts {}, client operator, authn and authz keys",
                    out.display(),
                    hosts.join(", ")
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}
