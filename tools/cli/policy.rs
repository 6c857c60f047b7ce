//! `ferry policy check` and `ferry policy explain`: a policy file
//! (`policy.example.toml` documents every rule and field) checked, and
//! asked about one migration.

use super::*;

use ferry_control::policy::{Outcome, Policy, RuleCheck};

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// Parse FILE as the authorization server and a destination would, and
    /// say how many rules of each kind it holds and which can never match.
    #[command(after_help = "Example:\n  ferry policy check /etc/ferry/policy.toml")]
    Check {
        /// The policy file.
        file: std::path::PathBuf,
    },
    /// Say which rule of FILE allows or denies one migration, and why every
    /// other rule does not apply: the [[allow]] rules for PRINCIPAL moving VM
    /// from FROM to TO (with --principal and --to), the [[incoming]] rules
    /// for VM arriving from FROM. Exit 0 when allowed, 2 when denied.
    #[command(
        after_help = "Examples:\n  ferry policy explain policy.toml --principal operator --vm web-1 --from src --to dst\n  \
                      ferry policy explain policy.toml --principal night-batch --vm db-7 --from rack1-a --to rack1-b --at 23:30\n  \
                      ferry policy explain incoming.toml --vm web-1 --from src"
    )]
    Explain {
        /// The policy file.
        file: std::path::PathBuf,
        /// The migration client asking (the [[allow]] rules; needs --to).
        #[arg(long, requires = "to")]
        principal: Option<String>,
        /// The VM id.
        #[arg(long)]
        vm: String,
        /// The source host.
        #[arg(long)]
        from: String,
        /// The destination host (the [[allow]] rules).
        #[arg(long, requires = "principal")]
        to: Option<String>,
        /// When, for rules with a window: HH:MM (UTC) or Unix seconds
        /// (default: now).
        #[arg(long, value_name = "HH:MM|UNIX_S", value_parser = parse_at)]
        at: Option<u64>,
    },
}

/// `--at`: HH:MM UTC (as seconds into a day) or Unix seconds.
fn parse_at(s: &str) -> Result<u64, String> {
    if let Some((h, m)) = s.split_once(':') {
        let (h, m): (u64, u64) = (
            h.parse().map_err(|_| format!("{s:?}: hours must be 0-23"))?,
            m.parse().map_err(|_| format!("{s:?}: minutes must be 0-59"))?,
        );
        if h > 23 || m > 59 {
            return Err(format!("{s:?} is not a time of day: use HH:MM, 00:00 to 23:59"));
        }
        return Ok(h * 3600 + m * 60);
    }
    s.parse()
        .map_err(|_| format!("{s:?}: give HH:MM (UTC) or Unix seconds"))
}

impl PolicyCmd {
    /// Runs the command.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        match self {
            PolicyCmd::Check { file } => {
                let p = Policy::load(&file).map_err(|e| e.to_string())?;
                println!(
                    "{}: valid: {} [[allow]] rule(s) (for the authorization server), {} [[incoming]] rule(s) (for a destination)",
                    file.display(),
                    p.allow.len(),
                    p.incoming.len()
                );
                for w in p.warnings() {
                    println!("warning: {w}");
                }
                if p.allow.is_empty() && p.incoming.is_empty() {
                    println!("warning: no rules: this policy denies every migration");
                }
                Ok(ExitCode::SUCCESS)
            }
            PolicyCmd::Explain {
                file,
                principal,
                vm,
                from,
                to,
                at,
            } => {
                let p = Policy::load(&file).map_err(|e| e.to_string())?;
                let now = at.unwrap_or_else(ferry_control::now_unix_s);
                let mut allowed = true;
                if let (Some(principal), Some(to)) = (&principal, &to) {
                    println!("as the authorization server: may {principal:?} move {vm:?} from {from:?} to {to:?}?");
                    let checks = p.explain_allow(principal, &vm, &from, to, now);
                    allowed &= verdict("allow", &checks, "ALLOWED", "DENIED");
                }
                println!("as the destination: does it admit {vm:?} from {from:?}?");
                let checks = p.explain_incoming(&from, &vm);
                allowed &= verdict("incoming", &checks, "ADMITTED", "REFUSED");
                Ok(if allowed { ExitCode::SUCCESS } else { ExitCode::from(2) })
            }
        }
    }
}

/// Prints each rule's verdict and the section's; true when a rule matched.
fn verdict(section: &str, checks: &[RuleCheck], yes: &str, no: &str) -> bool {
    for c in checks {
        println!("  {c}");
    }
    match checks.iter().find(|c| c.outcome == Outcome::Matches) {
        Some(c) => {
            println!(
                "  => {yes} by [[{section}]] #{} (the first rule that matches decides)",
                c.index
            );
            true
        }
        None if checks.is_empty() => {
            println!("  => {no}: there are no [[{section}]] rules (nothing is allowed unless a rule allows it)");
            false
        }
        None => {
            println!("  => {no}: no [[{section}]] rule matches (nothing is allowed unless a rule allows it)");
            false
        }
    }
}
