//! The command line's error, printed with its causes.

use std::error::Error as _;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// A library call that reports its failure as text.
    #[error("{0}")]
    Failed(String),
    /// Making the lab PKI.
    #[error(transparent)]
    Pki(#[from] ferry_control::pki::PkiError),
}

impl From<&str> for CliError {
    fn from(s: &str) -> CliError {
        CliError::Failed(s.into())
    }
}

impl From<String> for CliError {
    fn from(s: String) -> CliError {
        CliError::Failed(s)
    }
}

/// Prints `e` and each cause its text does not already include.
pub(crate) fn report(e: &CliError) {
    let mut text = e.to_string();
    eprintln!("ferry: error: {text}");
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            eprintln!("  caused by: {t}");
            text = t;
        }
        cause = c.source();
    }
}
