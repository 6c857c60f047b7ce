//! `ferry audit verify`.

use super::*;

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
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

impl AuditCmd {
    /// Runs the command.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        match self {
            AuditCmd::Verify { file, cert } => Ok(audit_verify(&file, &cert)?),
        }
    }
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
