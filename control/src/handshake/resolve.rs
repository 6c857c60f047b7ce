//! Ending "in doubt": what became of a migration whose Commit the source
//! sent but whose confirmation never came.
//!
//! ```text
//! source host (TLS client, host cert)                destination daemon (same port)
//!   TLS 1.3, both certificates verified against the CA
//!   ResolveRequest { resolve: migration id, challenge } ──▶
//!       the asker's certificate must be the migration's source (its
//!       ticket's); undecided → decided "discarded" now (durably)
//!   ◀── Resolution { migration id, answer, sig over (id, answer, challenge) }
//!   source: the signature is the destination certificate's; only a
//!   signed "discarded" lets it resume its paused copy
//! ```
//! The request shares the destination's port with the migration request:
//! the first message is either one (see [`super::Destination::admit_listening`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::SecureRandom;
use rustls::ClientConfig;
use serde::{Deserialize, Serialize};

use super::HandshakeError;
use crate::decision::Decision;
use crate::refusal::{Refusal, WireRefusal};
use crate::tls::Channel;

/// A source's question about migration `resolve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// The migration id.
    pub resolve: u64,
    /// base64url random bytes the answer's signature covers (freshness: an
    /// old answer cannot be replayed to a later question).
    pub challenge: String,
}

/// What the destination says about a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// The guest runs at the destination: the source releases its copy.
    Committed,
    /// The guest never ran there and never will: the source resumes it.
    Discarded,
    /// The destination has no record of it (another host, or a state
    /// directory lost): nothing can be concluded, the source's copy stays
    /// paused.
    Unknown,
}

impl From<Option<Decision>> for Answer {
    fn from(d: Option<Decision>) -> Answer {
        match d {
            Some(Decision::Committed) => Answer::Committed,
            Some(Decision::Discarded) => Answer::Discarded,
            None => Answer::Unknown,
        }
    }
}

impl Answer {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Answer::Committed => "committed",
            Answer::Discarded => "discarded",
            Answer::Unknown => "unknown",
        }
    }
}

/// The destination's reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ResolveReply {
    /// The answer, signed.
    Resolved(Resolution),
    /// Refused (not the migration's source, or the record failed).
    Deny(WireRefusal),
}

/// A signed answer: evidence the source keeps (its record and audit log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// The migration.
    pub migration_id: u64,
    /// What became of it.
    pub answer: Answer,
    /// The challenge it answers.
    pub challenge: String,
    /// base64url ECDSA signature by the destination host key over
    /// [`resolution_message`].
    pub sig: String,
}

/// What a resolution's signature covers.
pub fn resolution_message(migration_id: u64, answer: Answer, challenge: &str) -> Vec<u8> {
    let mut m = b"ferry-resolution-v1\n".to_vec();
    m.extend_from_slice(&migration_id.to_be_bytes());
    m.extend_from_slice(answer.as_str().as_bytes());
    m.push(b'\n');
    m.extend_from_slice(challenge.as_bytes());
    m
}

/// Bytes of a resolve challenge.
const CHALLENGE_BYTES: usize = 32;

/// Asks the destination at `addr` (whose certificate must be for
/// `dest_host`) what became of migration `migration_id`, as the source
/// host of `cfg` (its certificate must be the one the migration's ticket
/// named). The answer's signature is checked against the destination's
/// certificate.
pub fn resolve(
    addr: SocketAddr,
    dest_host: &str,
    cfg: Arc<ClientConfig>,
    migration_id: u64,
    timeout: Duration,
) -> Result<Resolution, HandshakeError> {
    let mut challenge = [0u8; CHALLENGE_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut challenge)
        .map_err(|_| Refusal::Internal("the random generator"))?;
    let challenge = B64.encode(challenge);
    let mut ch = Channel::connect(addr, dest_host, cfg, timeout)?;
    ch.send(&ResolveRequest {
        resolve: migration_id,
        challenge: challenge.clone(),
    })?;
    match ch.recv::<ResolveReply>()? {
        ResolveReply::Deny(r) => Err(HandshakeError::Denied(r)),
        ResolveReply::Resolved(r) => {
            if r.migration_id != migration_id || r.challenge != challenge {
                return Err(Refusal::Mismatch("the resolution answers another question").into());
            }
            let peer = ch.peer_cert().ok_or(Refusal::NoPeerCertificate)?;
            let sig = B64
                .decode(&r.sig)
                .map_err(|_| Refusal::BadPeerSignature { what: "resolution" })?;
            if !crate::pki::verify_by_cert(peer, &resolution_message(r.migration_id, r.answer, &r.challenge), &sig) {
                return Err(Refusal::BadPeerSignature { what: "resolution" }.into());
            }
            Ok(r)
        }
    }
}

impl super::Destination {
    /// Answers a [`ResolveRequest`] from the peer with certificate `peer`
    /// on `ch`: its answer, or the refusal.
    pub(super) fn answer_resolve(
        &self,
        ch: &mut Channel,
        peer: &[u8],
        req: &ResolveRequest,
    ) -> Result<Answer, HandshakeError> {
        let r = self.decide_for(peer, req.resolve);
        match r {
            Ok(answer) => {
                let sig = self
                    .identity
                    .sign(&resolution_message(req.resolve, answer, &req.challenge))
                    .map_err(|_| Refusal::Internal("signing the resolution"))?;
                ch.send(&ResolveReply::Resolved(Resolution {
                    migration_id: req.resolve,
                    answer,
                    challenge: req.challenge.clone(),
                    sig: B64.encode(sig),
                }))?;
                tracing::info!(
                    migration = req.resolve,
                    answer = answer.as_str(),
                    "destination: resolve answered"
                );
                Ok(answer)
            }
            Err(refusal) => {
                let _ = ch.send(&ResolveReply::Deny(refusal.to_wire()));
                Err(refusal.into())
            }
        }
    }

    /// The answer about `id` for the peer `peer`: an undecided migration
    /// is discarded now.
    fn decide_for(&self, peer: &[u8], id: u64) -> Result<Answer, Refusal> {
        let Some(known) = self.decisions.lookup(id) else {
            return Ok(Answer::Unknown);
        };
        if crate::fingerprint(peer) != known.source_fp {
            return Err(Refusal::NotYourMigration(id));
        }
        Ok(self
            .decisions
            .decide(id, Decision::Discarded)
            .map_err(Refusal::Decision)?
            .into())
    }
}
