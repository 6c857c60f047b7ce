//! `ferry pki init`, `revoke` and `deny`.

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
    /// Revoke a certificate: add it to the CA's CRL (DIR/ca/crl.pem, signed
    /// with DIR/ca/key.pem). Every daemon and source using DIR refuses it
    /// within a second, without a restart; copy ca/crl.pem to the other hosts.
    #[command(after_help = "Examples:\n  ferry pki revoke --pki /etc/ferry/pki --host dst\n  \
                            ferry pki revoke --pki /etc/ferry/pki --cert stolen.pem")]
    Revoke {
        /// The PKI folder (with the CA key).
        #[arg(long)]
        pki: std::path::PathBuf,
        #[command(flatten)]
        which: WhichCert,
    },
    /// Issue a host's or client's certificate anew (a new key too), valid
    /// for --days from now; the host's daemons present it from their next
    /// start. Revoke the old one if its key may have leaked.
    #[command(after_help = "Example:\n  ferry pki renew --pki /etc/ferry/pki --host dst --days 90")]
    Renew {
        /// The PKI folder (with the CA key).
        #[arg(long)]
        pki: std::path::PathBuf,
        /// The host to renew.
        #[arg(
            long,
            value_name = "NAME",
            conflicts_with = "client",
            required_unless_present = "client"
        )]
        host: Option<String>,
        /// The client to renew.
        #[arg(long, value_name = "NAME")]
        client: Option<String>,
        /// Days the new certificate is valid.
        #[arg(long, default_value_t = ferry_control::pki::DEFAULT_VALID_DAYS, value_parser = clap::value_parser!(i64).range(1..=3650))]
        days: i64,
    },
    /// Refuse a certificate by its fingerprint (DIR/denied-fingerprints), CA
    /// or not: for hosts without the CA key, or a CA that issues no CRLs.
    /// Running daemons pick it up within a second.
    #[command(after_help = "Example:\n  ferry pki deny --pki /etc/ferry/pki --cert stolen.pem")]
    Deny {
        /// The PKI folder.
        #[arg(long)]
        pki: std::path::PathBuf,
        #[command(flatten)]
        which: WhichCert,
    },
}

/// A certificate: a host's or a client's under the PKI folder, or a file.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct WhichCert {
    /// The host certificate PKI/hosts/NAME/cert.pem.
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// The client certificate PKI/clients/NAME/cert.pem.
    #[arg(long, value_name = "NAME")]
    client: Option<String>,
    /// A certificate file (PEM).
    #[arg(long, value_name = "FILE")]
    cert: Option<std::path::PathBuf>,
}

impl WhichCert {
    fn path(&self, pki: &std::path::Path) -> std::path::PathBuf {
        match (&self.host, &self.client, &self.cert) {
            (Some(h), _, _) => pki.join("hosts").join(h).join("cert.pem"),
            (_, Some(c), _) => pki.join("clients").join(c).join("cert.pem"),
            (_, _, Some(f)) => f.clone(),
            (None, None, None) => std::path::PathBuf::new(),
        }
    }
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
            PkiCmd::Revoke { pki, which } => {
                let cert = which.path(&pki);
                let list = ferry_control::pki::revoke(&pki, &cert)?;
                println!(
                    "revoked {}; {} now lists {} certificate(s): copy it to every host",
                    cert.display(),
                    pki.join(ferry_control::revocation::CRL_FILE).display(),
                    list.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            PkiCmd::Renew {
                pki,
                host,
                client,
                days,
            } => {
                let (name, role) = match (host, client) {
                    (Some(h), _) => (h, ferry_control::pki::Role::Host),
                    (None, Some(c)) => (c, ferry_control::pki::Role::Client),
                    (None, None) => return Err("ferry pki renew needs --host NAME or --client NAME".into()),
                };
                ferry_control::pki::issue(&pki, &name, role, ferry_control::pki::Validity::days(days))?;
                println!(
                    "renewed {name}: valid for {days} days from now, with a new key; restart its daemons to present it"
                );
                Ok(ExitCode::SUCCESS)
            }
            PkiCmd::Deny { pki, which } => {
                let cert = which.path(&pki);
                let fp = ferry_control::pki::deny(&pki, &cert)?;
                println!(
                    "denied {} (SHA-256 {fp}) in {}",
                    cert.display(),
                    pki.join(ferry_control::revocation::DENY_FILE).display()
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}
