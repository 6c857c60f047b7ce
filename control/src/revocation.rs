//! Certificate revocation on every TLS connection, both sides, reloaded
//! without a restart.
//!
//! Two lists, both under the PKI folder:
//! - `ca/crl.pem`: an X.509 CRL signed by the CA (`ferry pki revoke`, which
//!   needs the CA key; copy the file to every host). rustls-webpki checks it
//!   on every handshake, as a server (the client's certificate) and as a
//!   client (the server's).
//! - `denied-fingerprints`: SHA-256 fingerprints (hex, one per line, `#`
//!   comments) refused whatever their CA says (`ferry pki deny`): for a host
//!   without the CA key, or a CA that issues no CRLs.
//!
//! A [`Revocation`] looks at both files' size and modification time at most
//! every [`RELOAD_EVERY`] when a handshake needs them and rebuilds its
//! verifiers when they changed, so a running daemon refuses a revoked
//! certificate within about a second of the file landing, no SIGHUP needed.
//! A list that fails to parse keeps the previous one in force (and says so):
//! a bad copy must not open the door.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

/// How often, at most, the lists are looked at for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// The CRL, relative to the PKI folder.
pub const CRL_FILE: &str = "ca/crl.pem";
/// The fingerprint deny list, relative to the PKI folder.
pub const DENY_FILE: &str = "denied-fingerprints";

/// A revocation list that cannot be read or used.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// A file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file that does not parse.
    #[error("{path}: {what}; fix or remove it (the previous list stays in force in a running daemon)")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// What the lists were when last loaded: (length, modification time) of each.
type Stamp = [Option<(u64, SystemTime)>; 2];

struct Loaded {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<dyn ServerCertVerifier>,
    denied: HashSet<String>,
    stamp: Stamp,
}

/// The trust of one PKI folder: its CA, its CRL and its deny list, kept
/// current.
pub struct Revocation {
    dir: PathBuf,
    roots: Arc<RootCertStore>,
    hints: Vec<DistinguishedName>,
    loaded: RwLock<Arc<Loaded>>,
    checked: Mutex<Instant>,
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn stamp_of(path: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the deny list at `path` (none: empty).
pub fn read_denied(path: &Path) -> Result<HashSet<String>, RevocationError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(source) => {
            return Err(RevocationError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut out = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let fp = line.split('#').next().unwrap_or_default().trim();
        if fp.is_empty() {
            continue;
        }
        if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RevocationError::Bad {
                path: path.to_path_buf(),
                what: format!("line {}: not a SHA-256 fingerprint (64 hex digits)", i + 1),
            });
        }
        out.insert(fp.to_ascii_lowercase());
    }
    Ok(out)
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, RevocationError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    CertificateRevocationListDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| RevocationError::Bad {
            path: path.to_path_buf(),
            what: format!("not a PEM CRL: {e}"),
        })
}

impl Revocation {
    /// The trust of the PKI folder `dir` with its CA `roots`; the lists
    /// must parse now.
    pub fn load(dir: &Path, roots: RootCertStore) -> Result<Arc<Revocation>, RevocationError> {
        let roots = Arc::new(roots);
        let loaded = Self::build(dir, &roots)?;
        let hints = loaded.client.root_hint_subjects().to_vec();
        Ok(Arc::new(Revocation {
            dir: dir.to_path_buf(),
            roots,
            hints,
            loaded: RwLock::new(Arc::new(loaded)),
            checked: Mutex::new(Instant::now()),
        }))
    }

    fn build(dir: &Path, roots: &Arc<RootCertStore>) -> Result<Loaded, RevocationError> {
        let (crl_path, deny_path) = (dir.join(CRL_FILE), dir.join(DENY_FILE));
        let stamp = [stamp_of(&crl_path), stamp_of(&deny_path)];
        let crls = read_crls(&crl_path)?;
        let denied = read_denied(&deny_path)?;
        let bad = |e: &dyn std::fmt::Display| RevocationError::Bad {
            path: crl_path.clone(),
            what: e.to_string(),
        };
        // The CRL is the CA's: only end-entity certificates are listed, and
        // a certificate it does not cover (another issuer) is not refused
        // for that.
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(crls.clone())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| bad(&e))?;
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| bad(&e))?;
        Ok(Loaded {
            client,
            server,
            denied,
            stamp,
        })
    }

    /// Reloads the lists if they changed since last looked at (at most
    /// every [`RELOAD_EVERY`]).
    fn refresh(&self) {
        {
            let mut checked = self.checked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if checked.elapsed() < RELOAD_EVERY {
                return;
            }
            *checked = Instant::now();
        }
        let now = [stamp_of(&self.dir.join(CRL_FILE)), stamp_of(&self.dir.join(DENY_FILE))];
        let old = self
            .loaded
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .stamp;
        if now == old {
            return;
        }
        match Self::build(&self.dir, &self.roots) {
            Ok(fresh) => {
                tracing::info!(dir = %self.dir.display(), denied = fresh.denied.len(), "revocation lists reloaded");
                *self.loaded.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
            }
            Err(e) => tracing::error!("revocation lists not reloaded, the previous ones stay in force: {e}"),
        }
    }

    /// The current verifiers and deny list (reloaded first if due).
    fn current(&self) -> Arc<Loaded> {
        self.refresh();
        self.loaded
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn denied(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let denied = &self.current().denied;
        if !denied.is_empty() && denied.contains(&crate::fingerprint(cert)) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(())
    }

    /// A verifier of clients' certificates for a server.
    pub fn client_verifier(self: &Arc<Self>) -> Arc<dyn ClientCertVerifier> {
        Arc::new(Clients(self.clone()))
    }

    /// A verifier of servers' certificates for a client.
    pub fn server_verifier(self: &Arc<Self>) -> Arc<dyn ServerCertVerifier> {
        Arc::new(Servers(self.clone()))
    }
}

#[derive(Debug)]
struct Clients(Arc<Revocation>);

impl ClientCertVerifier for Clients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.0.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .0
            .current()
            .client
            .verify_client_cert(end_entity, intermediates, now)?;
        self.0.denied(end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().client.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().client.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().client.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct Servers(Arc<Revocation>);

impl ServerCertVerifier for Servers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok =
            self.0
                .current()
                .server
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        self.0.denied(end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().server.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().server.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().server.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deny_list_takes_fingerprints_and_comments_and_refuses_anything_else() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(DENY_FILE);
        assert!(read_denied(&p).unwrap().is_empty(), "no file: nothing denied");
        let fp = "AB".repeat(32);
        std::fs::write(&p, format!("# stolen\n{fp}  # dst, 2026-12-03\n\n")).unwrap();
        let got = read_denied(&p).unwrap();
        assert_eq!(got.len(), 1);
        assert!(got.contains(&fp.to_ascii_lowercase()));
        std::fs::write(&p, "not-a-fingerprint\n").unwrap();
        assert!(matches!(read_denied(&p), Err(RevocationError::Bad { .. })));
    }

    #[test]
    fn a_broken_list_keeps_the_previous_one_in_force() {
        let d = tempfile::tempdir().unwrap();
        crate::pki::init(d.path(), &["h".into()]).unwrap();
        let roots = crate::pki::roots(d.path()).unwrap();
        let cert = crate::pki::cert_from_pem_file(&d.path().join("hosts/h/cert.pem")).unwrap();
        crate::pki::deny(d.path(), &d.path().join("hosts/h/cert.pem")).unwrap();
        let rev = Revocation::load(d.path(), roots).unwrap();
        assert!(rev.denied(&cert).is_err());
        // A damaged copy lands: not loadable, so the old list still holds.
        std::fs::write(d.path().join(DENY_FILE), "garbage\n").unwrap();
        *rev.checked.lock().unwrap() = Instant::now() - RELOAD_EVERY;
        assert!(rev.denied(&cert).is_err(), "a broken list opened the door");
    }
}
