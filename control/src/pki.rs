//! A lab PKI (`ferry pki init`): a CA, a certificate and key per host, the
//! signing keys of the authentication and authorization servers, and an
//! operator client credential. Real deployments bring their own CA: every
//! loader takes paths in this layout, which an operator can populate from
//! any CA.
//!
//! ```text
//! DIR/ca/cert.pem  DIR/ca/key.pem
//! DIR/hosts/NAME/cert.pem  DIR/hosts/NAME/key.pem        (server + client auth)
//! DIR/clients/NAME/cert.pem  DIR/clients/NAME/key.pem    (client auth)
//! DIR/servers/authn/signing.pk8  DIR/servers/authn/verify.hex   (Ed25519)
//! DIR/servers/authz/signing.pk8  DIR/servers/authz/verify.hex
//! ```
//! Private keys are written with mode 0600.

mod revoke;
pub use revoke::{deny, revoke, Revoked};

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::RootCertStore;
use thiserror::Error;

/// Errors of the PKI.
#[derive(Debug, Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A PEM or key file is malformed.
    #[error("{path}: {what}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The folder already holds a PKI.
    #[error("{0} already holds a PKI (ca/cert.pem exists); choose a new folder or remove it first")]
    Exists(PathBuf),
    /// A name that cannot be a host name.
    #[error("invalid name {0:?}: use letters, digits, '-' and '.'")]
    BadName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), PkiError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.into()))
    }
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, "ferry lab CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// How long host and client certificates are valid by default: short
/// enough that a leaked key does not stay useful for long (renew with
/// `ferry pki renew`; revoke with `ferry pki revoke`).
pub const DEFAULT_VALID_DAYS: i64 = 90;

/// What kind of leaf certificate to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A hypervisor host: TLS server and client.
    Host,
    /// A migration client (operator): TLS client only.
    Client,
}

impl Role {
    /// Its folder under a PKI directory: `hosts` or `clients`.
    pub fn folder(self) -> &'static str {
        match self {
            Role::Host => "hosts",
            Role::Client => "clients",
        }
    }
}

/// Validity of an issued certificate, in Unix seconds (tests issue expired ones).
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Not before.
    pub not_before_s: i64,
    /// Not after.
    pub not_after_s: i64,
}

impl Validity {
    /// From an hour ago for `days` days.
    pub fn days(days: i64) -> Validity {
        let now = i64::try_from(crate::now_unix_s()).unwrap_or(i64::MAX);
        Validity {
            not_before_s: now - 3600,
            not_after_s: now + days * 86_400,
        }
    }
}

/// Creates a CA, host certificates for `hosts`, the authn/authz signing
/// keys and an `operator` client credential under `out`.
pub fn init(out: &Path, hosts: &[String]) -> Result<(), PkiError> {
    for h in hosts {
        check_name(h)?;
    }
    if out.join("ca/cert.pem").exists() {
        // A new CA would silently invalidate every certificate of the old one.
        return Err(PkiError::Exists(out.to_path_buf()));
    }
    let ca_key = KeyPair::generate()?;
    let ca = ca_params()?.self_signed(&ca_key)?;
    write_file(&out.join("ca/cert.pem"), ca.pem().as_bytes(), false)?;
    write_file(&out.join("ca/key.pem"), ca_key.serialize_pem().as_bytes(), true)?;
    for h in hosts {
        issue(out, h, Role::Host, Validity::days(DEFAULT_VALID_DAYS))?;
    }
    issue(out, "operator", Role::Client, Validity::days(DEFAULT_VALID_DAYS))?;
    for server in ["authn", "authz"] {
        let rng = ring::rand::SystemRandom::new();
        let pk8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| PkiError::Bad {
            path: out.join("servers").join(server),
            what: "key generation failed".into(),
        })?;
        let kp = Ed25519KeyPair::from_pkcs8(pk8.as_ref()).map_err(|_| PkiError::Bad {
            path: out.join("servers").join(server),
            what: "generated key does not load".into(),
        })?;
        let dir = out.join("servers").join(server);
        write_file(&dir.join("signing.pk8"), pk8.as_ref(), true)?;
        write_file(
            &dir.join("verify.hex"),
            crate::hex(kp.public_key().as_ref()).as_bytes(),
            false,
        )?;
    }
    Ok(())
}

/// Issues (or re-issues) a certificate for `name` signed by the CA under `dir`.
pub fn issue(dir: &Path, name: &str, role: Role, validity: Validity) -> Result<(), PkiError> {
    check_name(name)?;
    let ca_key_path = dir.join("ca/key.pem");
    let ca_pem = fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_pem)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut p = CertificateParams::new(vec![name.to_string()])?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = match role {
        Role::Host => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    p.not_before =
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(validity.not_before_s.unsigned_abs());
    p.not_after =
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(validity.not_after_s.unsigned_abs());
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    let d = dir.join(role.folder()).join(name);
    write_file(&d.join("cert.pem"), cert.pem().as_bytes(), false)?;
    write_file(&d.join("key.pem"), key.serialize_pem().as_bytes(), true)?;
    Ok(())
}

/// The roots to trust: the CA certificate under `dir`.
pub fn roots(dir: &Path) -> Result<RootCertStore, PkiError> {
    let path = dir.join("ca/cert.pem");
    let ca = CertificateDer::from_pem_file(&path).map_err(|e| PkiError::Bad {
        path: path.clone(),
        what: e.to_string(),
    })?;
    let mut store = RootCertStore::empty();
    store.add(ca).map_err(|e| PkiError::Bad {
        path,
        what: e.to_string(),
    })?;
    Ok(store)
}

/// A host's or client's certificate and key.
pub struct Identity {
    name: String,
    cert: CertificateDer<'static>,
    pkcs8: Vec<u8>,
    signer: EcdsaKeyPair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads `DIR/hosts/NAME` or `DIR/clients/NAME`.
    pub fn load(dir: &Path, role: Role, name: &str) -> Result<Identity, PkiError> {
        let d = dir.join(role.folder()).join(name);
        Self::from_files(name, &d.join("cert.pem"), &d.join("key.pem"))
    }

    /// Loads a certificate and its PKCS#8 ECDSA P-256 key from PEM files.
    pub fn from_files(name: &str, cert: &Path, key: &Path) -> Result<Identity, PkiError> {
        let bad = |path: &Path, what: String| PkiError::Bad {
            path: path.to_path_buf(),
            what,
        };
        let c = CertificateDer::from_pem_file(cert).map_err(|e| bad(cert, e.to_string()))?;
        let k = PrivatePkcs8KeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
        let pkcs8 = k.secret_pkcs8_der().to_vec();
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &pkcs8,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| bad(key, format!("not an ECDSA P-256 PKCS#8 key: {e}")))?;
        Ok(Identity {
            name: name.into(),
            cert: c,
            pkcs8,
            signer,
        })
    }

    /// The name this identity was loaded as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The certificate, DER.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The private key for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }

    /// SHA-256 fingerprint of the certificate (hex).
    pub fn fingerprint(&self) -> String {
        crate::fingerprint(&self.cert)
    }

    /// Signs `msg` with the certificate's key (ECDSA P-256, ASN.1 DER).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, PkiError> {
        self.signer
            .sign(&ring::rand::SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| PkiError::Bad {
                path: PathBuf::from(&self.name),
                what: "signing failed".into(),
            })
    }
}

/// Reads a PEM certificate (DER returned).
pub fn cert_from_pem_file(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_file(path).map_err(|e| PkiError::Bad {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

/// Verifies an ECDSA P-256 signature made by the key of certificate `cert_der`.
pub fn verify_by_cert(cert_der: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let der = CertificateDer::from(cert_der);
    match webpki::EndEntityCert::try_from(&der) {
        Ok(ee) => ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, msg, sig).is_ok(),
        Err(_) => false,
    }
}

/// A certificate's validity (not before, not after), Unix seconds, read with
/// x509-parser; `None` if it does not parse.
pub fn cert_validity(cert_der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The names a certificate is for (DNS SANs, else its CN), read with x509-parser.
pub fn cert_names(cert_der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(n) => Some((*n).to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(String::from)),
        );
    }
    names
}

/// Loads a server's Ed25519 signing key (`DIR/servers/NAME/signing.pk8`).
pub fn signing_key(dir: &Path, server: &str) -> Result<Ed25519KeyPair, PkiError> {
    let path = dir.join("servers").join(server).join("signing.pk8");
    let pk8 = fs::read(&path).map_err(io(&path))?;
    Ed25519KeyPair::from_pkcs8(&pk8).map_err(|e| PkiError::Bad {
        path,
        what: format!("not an Ed25519 PKCS#8 key: {e}"),
    })
}

/// Loads a server's Ed25519 verification key (`DIR/servers/NAME/verify.hex`).
pub fn verify_key(dir: &Path, server: &str) -> Result<Vec<u8>, PkiError> {
    let path = dir.join("servers").join(server).join("verify.hex");
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let t = text.trim();
    let bytes: Option<Vec<u8>> = (0..t.len())
        .step_by(2)
        .map(|i| t.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    match bytes {
        Some(b) if b.len() == 32 => Ok(b),
        _ => Err(PkiError::Bad {
            path,
            what: "expected 64 hex digits (an Ed25519 public key)".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn init_makes_loadable_credentials_with_private_keys_0600() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &["src".into(), "dst".into()]).unwrap();
        for (role, name) in [(Role::Host, "src"), (Role::Host, "dst"), (Role::Client, "operator")] {
            let id = Identity::load(d.path(), role, name).unwrap();
            assert_eq!(cert_names(id.cert()), vec![name.to_string()]);
            let sig = id.sign(b"hello").unwrap();
            assert!(verify_by_cert(id.cert(), b"hello", &sig));
            assert!(!verify_by_cert(id.cert(), b"hellO", &sig));
            let folder = if role == Role::Host { "hosts" } else { "clients" };
            let mode = fs::metadata(d.path().join(folder).join(name).join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(roots(d.path()).unwrap().len(), 1);
        signing_key(d.path(), "authn").unwrap();
        assert_eq!(verify_key(d.path(), "authz").unwrap().len(), 32);
        let mode = fs::metadata(d.path().join("servers/authz/signing.pk8"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            matches!(init(d.path(), &["x".into()]), Err(PkiError::Exists(_))),
            "re-init refused"
        );
        let e = tempfile::tempdir().unwrap();
        assert!(matches!(
            init(e.path(), &["bad name".into()]),
            Err(PkiError::BadName(_))
        ));
    }
}
