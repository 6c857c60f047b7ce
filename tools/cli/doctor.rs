//! `ferry doctor`: this host against what ferry needs.

use super::*;

use ferry::doctor::{self, DoctorOptions, Status};

/// `ferry doctor`'s arguments.
#[derive(Args)]
pub(crate) struct DoctorArgs {
    /// Also check this PKI folder: the CA certificate, and every host and
    /// client credential in it (or only --name's): not expired (days left),
    /// keys readable by their owner only.
    #[arg(long)]
    pki: Option<std::path::PathBuf>,
    /// With --pki: only this host's credential.
    #[arg(long, requires = "pki")]
    name: Option<String>,
    /// An address a daemon will listen on: it must be free (repeatable).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<std::net::SocketAddr>,
    /// A policy file that must parse.
    #[arg(long)]
    policy: Option<std::path::PathBuf>,
    /// A state directory that must be writable.
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
    /// One JSON object per check (name, status, detail, fix), one per line.
    #[arg(long)]
    json: bool,
}

impl DoctorArgs {
    /// Runs the command: exit 0 when nothing failed (warnings allowed), 1
    /// otherwise.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        let checks = doctor::run(&DoctorOptions {
            pki: self.pki,
            name: self.name,
            listen: self.listen,
            policy: self.policy,
            state_dir: self.state_dir,
        });
        for c in &checks {
            if self.json {
                println!("{}", serde_json::to_string(c).map_err(|e| e.to_string())?);
                continue;
            }
            let tag = match c.status {
                Status::Pass => "pass",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{tag}  {}: {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("      fix: {fix}");
            }
        }
        let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
        let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
        let summary = format!("{} check(s): {failed} failed, {warned} warning(s)", checks.len());
        if self.json {
            eprintln!("{summary}");
        } else {
            println!("{summary}");
        }
        Ok(if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}
