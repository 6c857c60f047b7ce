//! `ferry audit verify`.

use super::*;

use ferry_control::audit::AuditHead;

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Check every entry of FILE: hash chain, sequence, and signatures by the
    /// key of CERT (the host that wrote it), and that it reaches its signed
    /// head (FILE.head, rewritten after every append), so a cut end shows
    /// too. Says where the log breaks.
    #[command(
        after_help = "Examples:\n  ferry audit verify /var/lib/ferry/audit.jsonl --cert /etc/ferry/pki/hosts/dst/cert.pem\n  \
                      ferry audit verify audit.jsonl --cert dst.pem --head /backup/audit.jsonl.head --expect 41:3f9c...\n\n\
                      A head kept apart (a copy of FILE.head on another disk, or SEQ:HASH from a receipt)\n\
                      also catches a log cut and then rewritten, or a head file put back from an older copy."
    )]
    Verify {
        /// The audit log.
        file: std::path::PathBuf,
        /// The certificate (PEM) of the host that signed it.
        #[arg(long)]
        cert: std::path::PathBuf,
        /// Check against this head file instead of FILE.head.
        #[arg(long, value_name = "FILE")]
        head: Option<std::path::PathBuf>,
        /// Also check that the log reaches this entry: SEQ:HASH (its
        /// sequence number and line hash, as this command prints the last).
        #[arg(long, value_name = "SEQ:HASH")]
        expect: Option<AuditHead>,
    },
}

impl AuditCmd {
    /// Runs the command.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        match self {
            AuditCmd::Verify {
                file,
                cert,
                head,
                expect,
            } => Ok(audit_verify(&file, &cert, head.as_deref(), expect.as_ref())?),
        }
    }
}

fn audit_verify(
    file: &std::path::Path,
    cert: &std::path::Path,
    head: Option<&std::path::Path>,
    expect: Option<&AuditHead>,
) -> Result<ExitCode, String> {
    let der = ferry_control::pki::cert_from_pem_file(cert).map_err(|e| e.to_string())?;
    match ferry_control::audit::verify_with_head(file, &der, head, expect) {
        Ok((n, last, heads)) => {
            let reached = match heads.len() {
                0 => " (no signed head to check against: a cut end would not show)".to_string(),
                _ => format!(
                    ", reaches its signed head{}",
                    heads.iter().map(|h| format!(" {}", h.seq)).collect::<String>()
                ),
            };
            println!(
                "{}: {n} entries, hash chain and signatures verified{reached}; last entry {}:{last}",
                file.display(),
                n.saturating_sub(1)
            );
            // A segment started after a damaged log names the sealed file:
            // it is evidence, and must still be as it was sealed.
            match ferry_control::audit::previous_segment(file).map_err(|e| e.to_string())? {
                None => Ok(ExitCode::SUCCESS),
                Some((s, Some(true))) => {
                    println!("previous segment {} (sealed: {}): intact", s.file, s.broken);
                    Ok(ExitCode::SUCCESS)
                }
                Some((s, Some(false))) => {
                    println!(
                        "previous segment {} was CHANGED after it was sealed (sealed SHA-256 {})",
                        s.file, s.sha256
                    );
                    Ok(ExitCode::FAILURE)
                }
                Some((s, None)) => {
                    println!(
                        "previous segment {} (sealed: {}) is not beside the log: it was moved or removed",
                        s.file, s.broken
                    );
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Err(e) => {
            println!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
