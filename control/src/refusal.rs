//! Why a server or a destination refuses: one enum for every refusal of
//! the control plane, each saying whose fault it is, carried on the wire as
//! a stable code plus the text.
//!
//! [`Blame::Peer`]: the request (its ticket, certificate, signature, offer)
//! is wrong or not allowed — the peer's operator must fix it.
//! [`Blame::Busy`]: nothing is wrong, the refusing side is full — retry.
//! [`Blame::Local`]: the refusing side cannot decide (no key configured, the
//! audit log failing) — its own operator must fix it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::modes::GuestKind;
use crate::peer::{NameError, PeerText};
use crate::policy::PolicyDenial;
use crate::ticket::TicketError;

/// Whose fault a refusal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blame {
    /// The request is wrong or not allowed.
    Peer,
    /// The refusing side is at a limit; the same request may pass later.
    Busy,
    /// The refusing side cannot decide until its operator acts.
    Local,
}

/// A refusal.
#[derive(Debug, Error)]
pub enum Refusal {
    /// A ticket that does not verify, is malformed, expired or not yet valid.
    #[error("{what} ticket: {source}")]
    Ticket {
        /// "authentication" or "authorization".
        what: &'static str,
        /// Why.
        #[source]
        source: TicketError,
    },
    /// An authorization ticket valid for longer than servers issue.
    #[error("authorization ticket lives longer than {max_s} s")]
    TicketTooLong {
        /// The longest lifetime issued.
        max_s: u64,
    },
    /// An authentication ticket for another audience.
    #[error("authentication ticket is for {audience:?}, not this server")]
    WrongAudience {
        /// Its audience.
        audience: PeerText,
    },
    /// A ticket presented by a host other than the one it names.
    #[error("{what} ticket presented by a client other than the one it names")]
    WrongPresenter {
        /// "authentication" or "authorization".
        what: &'static str,
    },
    /// The source's certificate is not the one the authorization ticket
    /// names.
    #[error("the source's certificate is not the one named in the ticket")]
    NotTicketSource,
    /// A ticket for another destination.
    #[error("ticket is for destination {ticket:?}, this is {this:?}")]
    WrongDestination {
        /// The ticket's destination.
        ticket: PeerText,
        /// This destination.
        this: String,
    },
    /// The request offers a VM other than the ticket's.
    #[error("ticket is for VM {ticket:?}, the request offers {offered:?}")]
    WrongVm {
        /// The ticket's VM.
        ticket: PeerText,
        /// The offered VM.
        offered: PeerText,
    },
    /// The request's signature does not verify.
    #[error("request signature does not verify under the source's certificate")]
    BadSignature,
    /// The policy does not allow it.
    #[error(transparent)]
    Policy(#[from] PolicyDenial),
    /// More streams than accepted.
    #[error("{offered} streams offered, at most {max} accepted")]
    TooManyStreams {
        /// Offered.
        offered: u16,
        /// Accepted at most.
        max: u16,
    },
    /// A guest kind this destination does not run.
    #[error("this destination runs {} guests, the request offers a {offered} guest", kinds(.runs))]
    UnsupportedGuest {
        /// Offered.
        offered: GuestKind,
        /// What runs here.
        runs: Vec<GuestKind>,
    },
    /// The ticket's nonce was used before (a replay), or the replay cache
    /// cannot say.
    #[error(transparent)]
    Replay(crate::replay::ReplayError),
    /// The request could not be read.
    #[error("malformed request: {0}")]
    Malformed(PeerText),
    /// A VM id or host name outside the accepted set.
    #[error(transparent)]
    BadName(#[from] NameError),
    /// A request the server does not serve.
    #[error("this is {0}")]
    WrongServer(&'static str),
    /// Too many migrations in progress.
    #[error("busy: {max} migrations already incoming")]
    Busy {
        /// The limit.
        max: usize,
    },
    /// Every data port of the configured range is in use.
    #[error("every data port {first}-{last} is in use by other migrations")]
    NoDataPort {
        /// First port of the range.
        first: u16,
        /// Last port of the range.
        last: u16,
    },
    /// An offer no guest can be made of.
    #[error("the offer cannot run: {what} ({value})")]
    Unrunnable {
        /// What is wrong with it.
        what: &'static str,
        /// The value offered.
        value: u64,
    },
    /// Not enough memory left for the guest.
    #[error("not enough memory: {offered} bytes offered, {committed} of {max} committed")]
    NoMemory {
        /// Offered.
        offered: u64,
        /// Committed to other migrations.
        committed: u64,
        /// The limit.
        max: u64,
    },
    /// The caller's ticket names another destination than the one it asks.
    #[error("the ticket is for destination {ticket:?}, not {asked:?}")]
    TicketNotForDestination {
        /// The ticket's destination.
        ticket: PeerText,
        /// The destination asked.
        asked: PeerText,
    },
    /// The peer's answer is for another migration or manifest.
    #[error("{0}")]
    Mismatch(&'static str),
    /// A signature by the peer's certificate that does not verify.
    #[error("the {what} is not signed by the peer's certificate")]
    BadPeerSignature {
        /// What was signed.
        what: &'static str,
    },
    /// No certificate from the peer (cannot happen with mutual TLS).
    #[error("no peer certificate")]
    NoPeerCertificate,
    /// The destination's measurement is not among the pinned ones.
    #[error("destination measurement {binary_sha256} / {config_sha256} is not among the pinned ones")]
    Unpinned {
        /// Its binary's SHA-256.
        binary_sha256: String,
        /// Its configuration's SHA-256.
        config_sha256: String,
    },
    /// The two transcripts of the transfer differ.
    #[error("{0}")]
    TranscriptMismatch(&'static str),
    /// No authorization key is configured.
    #[error("this destination has no authorization server key configured, so it accepts no ticket")]
    NoAuthzKey,
    /// The decision could not be recorded, so it is a refusal.
    #[error("cannot record the decision, so it is a refusal: {0}")]
    Audit(#[source] crate::audit::AuditError),
    /// A host asked about a migration another source sent.
    #[error("migration {0:x} was not sent by this host's certificate: only its source may ask what became of it")]
    NotYourMigration(u64),
    /// The destination's decision record failed, so nothing is admitted or
    /// answered on it.
    #[error("cannot record or read the migration's decision: {0}")]
    Decision(#[source] crate::decision::DecisionError),
    /// The refusing side's own signing or random generator failed.
    #[error("{0} failed on this host")]
    Internal(&'static str),
}

fn kinds(runs: &[GuestKind]) -> String {
    runs.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(" and ")
}

impl Refusal {
    /// Whose fault it is.
    pub fn blame(&self) -> Blame {
        match self {
            Refusal::Busy { .. } | Refusal::NoMemory { .. } | Refusal::NoDataPort { .. } => Blame::Busy,
            Refusal::NoAuthzKey
            | Refusal::Audit(_)
            | Refusal::Decision(_)
            | Refusal::Internal(_)
            | Refusal::TicketNotForDestination { .. } => Blame::Local,
            _ => Blame::Peer,
        }
    }

    /// The stable code carried on the wire and in audit records.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Ticket { .. } => "bad_ticket",
            Refusal::TicketTooLong { .. } => "ticket_too_long",
            Refusal::WrongAudience { .. } => "wrong_audience",
            Refusal::WrongPresenter { .. } => "wrong_presenter",
            Refusal::NotTicketSource => "not_ticket_source",
            Refusal::WrongDestination { .. } => "wrong_destination",
            Refusal::WrongVm { .. } => "wrong_vm",
            Refusal::BadSignature => "bad_signature",
            Refusal::Policy(_) => "policy",
            Refusal::TooManyStreams { .. } => "too_many_streams",
            Refusal::UnsupportedGuest { .. } => "unsupported_guest",
            Refusal::Replay(_) => "replay",
            Refusal::Malformed(_) => "malformed",
            Refusal::BadName(_) => "bad_name",
            Refusal::WrongServer(_) => "wrong_server",
            Refusal::Busy { .. } => "busy",
            Refusal::NoMemory { .. } => "no_memory",
            Refusal::NoDataPort { .. } => "no_data_port",
            Refusal::Unrunnable { .. } => "unrunnable",
            Refusal::TicketNotForDestination { .. } => "ticket_not_for_destination",
            Refusal::Mismatch(_) => "mismatch",
            Refusal::BadPeerSignature { .. } => "bad_peer_signature",
            Refusal::NoPeerCertificate => "no_peer_certificate",
            Refusal::Unpinned { .. } => "unpinned",
            Refusal::TranscriptMismatch(_) => "transcript_mismatch",
            Refusal::NoAuthzKey => "no_authz_key",
            Refusal::Audit(_) => "audit",
            Refusal::NotYourMigration(_) => "not_your_migration",
            Refusal::Decision(_) => "decision",
            Refusal::Internal(_) => "internal",
        }
    }

    /// The refusal as sent to the peer.
    pub fn to_wire(&self) -> WireRefusal {
        WireRefusal {
            code: self.code().into(),
            blame: Some(self.blame()),
            reason: self.to_string(),
        }
    }
}

/// A refusal as it travels: the code, whose fault, and the text. Peers of
/// an older build send the text alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
#[error("{reason} [{code}]")]
pub struct WireRefusal {
    /// [`Refusal::code`]; empty from an older peer.
    #[serde(default)]
    pub code: String,
    /// [`Refusal::blame`]; absent from an older peer.
    #[serde(default)]
    pub blame: Option<Blame>,
    /// The text.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_blame_and_text() {
        let r = Refusal::Busy { max: 4 };
        assert_eq!(r.blame(), Blame::Busy);
        assert_eq!(r.code(), "busy");
        let w = r.to_wire();
        assert_eq!(w.reason, "busy: 4 migrations already incoming");
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<WireRefusal>(&json).unwrap(), w);
        // An older peer's refusal: text only.
        let old: WireRefusal = serde_json::from_str(r#"{"reason":"no"}"#).unwrap();
        assert_eq!((old.code.as_str(), old.blame), ("", None));
        assert_eq!(Refusal::NoAuthzKey.blame(), Blame::Local);
        assert_eq!(Refusal::BadSignature.blame(), Blame::Peer);
        let g = Refusal::UnsupportedGuest {
            offered: GuestKind::Kvm,
            runs: vec![GuestKind::Synthetic],
        };
        assert_eq!(
            g.to_string(),
            "this destination runs synthetic guests, the request offers a kvm guest"
        );
    }
}
