//! Signed tickets: the authentication server's and the authorization
//! server's. A ticket is JSON claims, signed with the issuing server's
//! Ed25519 key (ring), carried as base64url body + signature. Verification
//! checks the size, the signature, the kind, the audience and the validity
//! window before the claims are used.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest encoded ticket body accepted, checked before decoding.
pub const MAX_TICKET_BODY: usize = 4096;
/// Clock skew tolerated between hosts, in seconds.
pub const SKEW_S: u64 = 30;

/// A signed ticket as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTicket {
    /// "authn" or "authz".
    pub kind: String,
    /// base64url of the JSON claims.
    pub body: String,
    /// base64url of the Ed25519 signature over `kind || 0 || body`.
    pub sig: String,
}

/// What the authentication server vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthnClaims {
    /// The client's name (from its certificate).
    pub client: String,
    /// SHA-256 of the client's certificate: the ticket is only good when
    /// presented over a TLS session authenticated by that certificate.
    pub client_fp: String,
    /// Fresh nonce.
    pub nonce: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Audience: the authorization server.
    pub aud: String,
}

/// What the authorization server allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzClaims {
    /// Who asked (from the authentication ticket).
    pub principal: String,
    /// The VM to migrate.
    pub vm: String,
    /// The source host's name.
    pub source_host: String,
    /// SHA-256 of the source host's certificate.
    pub source_fp: String,
    /// The destination host's name (its certificate must be for this name).
    pub dest_host: String,
    /// The migration this ticket is for.
    pub migration_id: u64,
    /// Single-use nonce.
    pub nonce: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds), at most 5 minutes after `iat`.
    pub exp: u64,
}

/// Why a ticket was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TicketError {
    /// Larger than [`MAX_TICKET_BODY`].
    #[error("ticket too large ({0} bytes)")]
    TooLarge(usize),
    /// Not base64url or not JSON of the right shape.
    #[error("malformed ticket: {0}")]
    Malformed(crate::peer::PeerText),
    /// The kind is not the one expected.
    #[error("ticket of kind {got:?} where {want:?} was expected")]
    WrongKind {
        /// Expected kind.
        want: String,
        /// Kind presented.
        got: crate::peer::PeerText,
    },
    /// The signature does not verify under the trusted key.
    #[error("ticket signature does not verify under the trusted {0} key (forged or from another domain)")]
    BadSignature(String),
    /// Past its expiry.
    #[error("ticket expired at {exp} (now {now})")]
    Expired {
        /// Expiry.
        exp: u64,
        /// Now.
        now: u64,
    },
    /// Issued in the future (beyond the tolerated skew).
    #[error("ticket issued in the future ({iat}, now {now})")]
    NotYetValid {
        /// Issued at.
        iat: u64,
        /// Now.
        now: u64,
    },
}

fn signed_message(kind: &str, body: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(kind.len() + 1 + body.len());
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(body.as_bytes());
    m
}

/// Signs `claims` as a ticket of `kind`.
pub fn sign<T: Serialize>(kind: &str, claims: &T, key: &Ed25519KeyPair) -> SignedTicket {
    let json = serde_json::to_vec(claims).expect("claims serialise");
    let body = B64.encode(json);
    let sig = key.sign(&signed_message(kind, &body));
    SignedTicket {
        kind: kind.into(),
        body,
        sig: B64.encode(sig.as_ref()),
    }
}

/// Verifies a ticket of `kind` under `public_key` and returns its claims
/// (validity is checked by the caller with [`check_time`], which knows `iat`/`exp`).
pub fn verify<T: DeserializeOwned>(t: &SignedTicket, kind: &str, public_key: &[u8]) -> Result<T, TicketError> {
    if t.body.len() > MAX_TICKET_BODY || t.sig.len() > 200 {
        return Err(TicketError::TooLarge(t.body.len() + t.sig.len()));
    }
    if t.kind != kind {
        return Err(TicketError::WrongKind {
            want: kind.into(),
            got: t.kind.as_str().into(),
        });
    }
    let sig = B64
        .decode(&t.sig)
        .map_err(|e| TicketError::Malformed(e.to_string().into()))?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&signed_message(kind, &t.body), &sig)
        .map_err(|_| TicketError::BadSignature(kind.into()))?;
    let json = B64
        .decode(&t.body)
        .map_err(|e| TicketError::Malformed(e.to_string().into()))?;
    serde_json::from_slice(&json).map_err(|e| TicketError::Malformed(e.to_string().into()))
}

/// Claims with a validity window.
pub trait Validity {
    /// Issued at (Unix seconds).
    fn iat(&self) -> u64;
    /// Expires at (Unix seconds).
    fn exp(&self) -> u64;
}

impl Validity for AuthnClaims {
    fn iat(&self) -> u64 {
        self.iat
    }
    fn exp(&self) -> u64 {
        self.exp
    }
}

impl Validity for AuthzClaims {
    fn iat(&self) -> u64 {
        self.iat
    }
    fn exp(&self) -> u64 {
        self.exp
    }
}

/// A ticket's claims whose signature and validity window were both
/// checked: only [`verify_at`] makes one.
#[derive(Debug, Clone)]
pub struct Verified<T>(T);

impl<T> Verified<T> {
    /// The claims.
    pub fn into_claims(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// [`verify`] and [`check_time`] in one call: the signature under
/// `public_key`, the kind, and the validity window at `now`.
pub fn verify_at<T: DeserializeOwned + Validity>(
    t: &SignedTicket,
    kind: &str,
    public_key: &[u8],
    now: u64,
) -> Result<Verified<T>, TicketError> {
    let claims: T = verify(t, kind, public_key)?;
    check_time(claims.iat(), claims.exp(), now)?;
    Ok(Verified(claims))
}

/// Checks a validity window against `now`, with [`SKEW_S`] of tolerance.
pub fn check_time(iat: u64, exp: u64, now: u64) -> Result<(), TicketError> {
    if iat > now + SKEW_S {
        return Err(TicketError::NotYetValid { iat, now });
    }
    if now > exp {
        return Err(TicketError::Expired { exp, now });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ring::signature::KeyPair;

    use super::*;

    fn key() -> Ed25519KeyPair {
        let pk8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap()
    }

    fn claims() -> AuthnClaims {
        AuthnClaims {
            client: "operator".into(),
            client_fp: "ab".into(),
            nonce: "00".into(),
            iat: 100,
            exp: 160,
            aud: "ferry-authz".into(),
        }
    }

    #[test]
    fn sign_verify_and_every_forgery_fails() {
        let k = key();
        let t = sign("authn", &claims(), &k);
        let got: AuthnClaims = verify(&t, "authn", k.public_key().as_ref()).unwrap();
        assert_eq!(got, claims());
        // Another key.
        let other = key();
        assert_eq!(
            verify::<AuthnClaims>(&t, "authn", other.public_key().as_ref()),
            Err(TicketError::BadSignature("authn".into()))
        );
        // A changed body (claims rewritten, same signature).
        let mut forged = t.clone();
        let mut c = claims();
        c.client = "root".into();
        forged.body = B64.encode(serde_json::to_vec(&c).unwrap());
        assert!(matches!(
            verify::<AuthnClaims>(&forged, "authn", k.public_key().as_ref()),
            Err(TicketError::BadSignature(_))
        ));
        // An authn ticket passed off as an authz ticket.
        let mut relabelled = t.clone();
        relabelled.kind = "authz".into();
        assert!(matches!(
            verify::<AuthnClaims>(&relabelled, "authz", k.public_key().as_ref()),
            Err(TicketError::BadSignature(_))
        ));
        assert!(matches!(
            verify::<AuthnClaims>(&t, "authz", k.public_key().as_ref()),
            Err(TicketError::WrongKind { .. })
        ));
        // Garbage and oversize.
        let garbage = SignedTicket {
            kind: "authn".into(),
            body: "!!".into(),
            sig: "??".into(),
        };
        assert!(verify::<AuthnClaims>(&garbage, "authn", k.public_key().as_ref()).is_err());
        let big = SignedTicket {
            kind: "authn".into(),
            body: "a".repeat(MAX_TICKET_BODY + 1),
            sig: String::new(),
        };
        assert!(matches!(
            verify::<AuthnClaims>(&big, "authn", k.public_key().as_ref()),
            Err(TicketError::TooLarge(_))
        ));
    }

    #[test]
    fn validity_window() {
        assert!(check_time(100, 160, 130).is_ok());
        assert!(matches!(check_time(100, 160, 161), Err(TicketError::Expired { .. })));
        assert!(matches!(
            check_time(500, 560, 100),
            Err(TicketError::NotYetValid { .. })
        ));
    }
}
