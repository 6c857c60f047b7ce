//! After the transfer: the source's signed manifest of what it sent, and
//! the destination's signed receipt saying whether it received the same
//! (the paper's non-repudiation of the source).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::handshake::{DestinationSession, HandshakeError, SourceSession};
use crate::pki::Identity;
use crate::refusal::Refusal;

/// JSON bytes signed by a host key, carried as they were signed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedBlob {
    /// "manifest" or "receipt".
    pub kind: String,
    /// base64url of the JSON that was signed.
    pub body: String,
    /// base64url ECDSA P-256 signature over `kind || 0 || body`.
    pub sig: String,
}

fn blob_message(kind: &str, body: &str) -> Vec<u8> {
    let mut m = kind.as_bytes().to_vec();
    m.push(0);
    m.extend_from_slice(body.as_bytes());
    m
}

fn sign_blob<T: Serialize>(kind: &str, value: &T, id: &Identity) -> Result<SignedBlob, HandshakeError> {
    let body = B64.encode(serde_json::to_vec(value).expect("serialises"));
    let sig = id
        .sign(&blob_message(kind, &body))
        .map_err(|_| Refusal::Internal("signing"))?;
    Ok(SignedBlob {
        kind: kind.into(),
        body,
        sig: B64.encode(sig),
    })
}

fn open_blob<T: serde::de::DeserializeOwned>(b: &SignedBlob, kind: &'static str, cert: &[u8]) -> Result<T, Refusal> {
    if b.kind != kind || b.body.len() > crate::tls::MAX_MESSAGE {
        return Err(Refusal::Malformed(format!("expected a {kind}").into()));
    }
    let bad_sig = || Refusal::BadPeerSignature { what: kind };
    let sig = B64.decode(&b.sig).map_err(|_| bad_sig())?;
    if !crate::pki::verify_by_cert(cert, &blob_message(kind, &b.body), &sig) {
        return Err(bad_sig());
    }
    let json = B64
        .decode(&b.body)
        .map_err(|_| Refusal::Malformed(format!("the {kind}'s body is not base64url").into()))?;
    serde_json::from_slice(&json).map_err(|e| Refusal::Malformed(format!("malformed {kind}: {e}").into()))
}

/// What the source says it sent, signed with its host key (non-repudiation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Migration id.
    pub migration_id: u64,
    /// VM id.
    pub vm: String,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Pages sent over all rounds.
    pub pages_sent: u64,
    /// Bytes written to the data streams.
    pub bytes_on_wire: u64,
    /// Rounds, the final one included.
    pub rounds: u64,
    /// Start and end of the transfer (Unix milliseconds).
    pub started_unix_ms: u64,
    /// End of the transfer.
    pub finished_unix_ms: u64,
    /// Guest downtime in microseconds.
    pub downtime_us: u64,
    /// SHA-256 root (hex) over every stream's transcript: each frame's
    /// sequence, kind and AES-GCM tag and, in `aead+sha256` mode, each chunk's
    /// digest (SHA-256 over the chunk's per-page SHA-256 digests).
    pub transcript_root: String,
}

/// The destination's signed acknowledgement of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Migration id.
    pub migration_id: u64,
    /// SHA-256 (hex) of the manifest body as signed by the source.
    pub manifest_sha256: String,
    /// Whether the destination's own transcript root equals the manifest's.
    pub transcript_matches: bool,
    /// When (Unix seconds).
    pub time: u64,
    /// How far the destination's audit log went when it signed this (its
    /// last entry): kept by the source, it lets anyone check later that
    /// the destination's log was not cut back
    /// (`ferry audit verify --expect SEQ:HASH`).
    #[serde(default)]
    pub audit_head: Option<crate::audit::AuditHead>,
}

impl SourceSession {
    /// Signs and sends `manifest`; returns the destination's
    /// verified receipt (an error if it does not confirm the transcript).
    pub fn exchange_manifest(&mut self, source: &Identity, manifest: &Manifest) -> Result<Receipt, HandshakeError> {
        let blob = sign_blob("manifest", manifest, source)?;
        self.channel_mut().begin_exchange();
        let manifest_sha256 = crate::hex(ring::digest::digest(&ring::digest::SHA256, blob.body.as_bytes()).as_ref());
        self.channel_mut().send(&blob)?;
        let reply: SignedBlob = self.channel_mut().recv()?;
        let peer = self.channel_mut().peer_cert().ok_or(Refusal::NoPeerCertificate)?;
        let receipt: Receipt = open_blob(&reply, "receipt", peer)?;
        if receipt.migration_id != manifest.migration_id || receipt.manifest_sha256 != manifest_sha256 {
            return Err(Refusal::Mismatch("the receipt is for another manifest").into());
        }
        if !receipt.transcript_matches {
            return Err(Refusal::TranscriptMismatch(
                "the destination's transcript of the transfer differs from the manifest",
            )
            .into());
        }
        Ok(receipt)
    }
}

impl DestinationSession {
    /// Receives the source's manifest, checks its signature
    /// (the source's certificate), its migration id and its transcript root
    /// against `own_root`, and answers with a signed receipt.
    pub fn receive_manifest(
        &mut self,
        dest: &Identity,
        own_root: &[u8; 32],
    ) -> Result<(Manifest, Receipt), HandshakeError> {
        self.channel_mut().begin_exchange();
        let blob: SignedBlob = self.channel_mut().recv()?;
        let peer = self
            .channel_mut()
            .peer_cert()
            .ok_or(Refusal::NoPeerCertificate)?
            .to_vec();
        let manifest: Manifest = open_blob(&blob, "manifest", &peer)?;
        if manifest.migration_id != self.claims().migration_id || manifest.vm != self.claims().vm {
            return Err(Refusal::Mismatch("the manifest is for another migration").into());
        }
        let receipt = Receipt {
            migration_id: manifest.migration_id,
            manifest_sha256: crate::hex(ring::digest::digest(&ring::digest::SHA256, blob.body.as_bytes()).as_ref()),
            transcript_matches: manifest.transcript_root == crate::hex(own_root),
            time: crate::now_unix_s(),
            audit_head: self.audit.as_ref().and_then(|log| log.head()),
        };
        self.channel_mut().send(&sign_blob("receipt", &receipt, dest)?)?;
        if !receipt.transcript_matches {
            return Err(Refusal::TranscriptMismatch(
                "the manifest's transcript root differs from what this destination received",
            )
            .into());
        }
        Ok((manifest, receipt))
    }
}
