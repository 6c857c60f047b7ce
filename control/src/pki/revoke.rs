//! `ferry pki revoke` and `ferry pki deny`: the lists
//! [`crate::revocation`] enforces.

use std::path::Path;

use rcgen::{CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevokedCertParams, SerialNumber};
use serde::{Deserialize, Serialize};

use super::{ca_params, cert_from_pem_file, io, write_file, PkiError};

use crate::revocation::{CRL_FILE, DENY_FILE};

/// The CA's record of what it revoked (the CRL is rebuilt from it).
const REVOKED_FILE: &str = "ca/revoked.json";

/// How long a CRL is said to be current: the next one comes with the next
/// revocation (ferry does not fail open on an old CRL, nor closed).
const CRL_VALID_S: u64 = 365 * 86_400;

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// Its serial number (hex).
    pub serial: String,
    /// Its SHA-256 fingerprint (hex).
    pub fingerprint: String,
    /// The names it was for.
    pub names: Vec<String>,
    /// When it was revoked (Unix seconds).
    pub revoked_unix_s: u64,
}

/// Revokes the certificate at `cert`: adds it to the CA's list under
/// `dir` and rewrites `DIR/ca/crl.pem`, signed by the CA key (`ca/key.pem`
/// must be there). Returns every certificate revoked so far. Copy the CRL
/// to every host; running daemons pick it up within a second.
pub fn revoke(dir: &Path, cert: &Path) -> Result<Vec<Revoked>, PkiError> {
    let der = cert_from_pem_file(cert)?;
    let bad = |what: String| PkiError::Bad {
        path: cert.to_path_buf(),
        what,
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
    let serial = crate::hex(parsed.raw_serial());
    let list_path = dir.join(REVOKED_FILE);
    let mut list: Vec<Revoked> = match std::fs::read(&list_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| PkiError::Bad {
            path: list_path.clone(),
            what: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(&list_path)(e)),
    };
    let now = crate::now_unix_s();
    let at = |unix_s: u64| rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(unix_s);
    if !list.iter().any(|r| r.serial == serial) {
        list.push(Revoked {
            serial,
            fingerprint: crate::fingerprint(&der),
            names: super::cert_names(&der),
            revoked_unix_s: now,
        });
    }
    let ca_key_path = dir.join("ca/key.pem");
    let ca_pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let issuer = Issuer::new(ca_params()?, KeyPair::from_pem(&ca_pem)?);
    let revoked_certs = list
        .iter()
        .map(|r| {
            let bytes = (0..r.serial.len())
                .step_by(2)
                .filter_map(|i| u8::from_str_radix(r.serial.get(i..i + 2)?, 16).ok())
                .collect::<Vec<u8>>();
            RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: at(r.revoked_unix_s),
                reason_code: None,
                invalidity_date: None,
            }
        })
        .collect();
    let crl = CertificateRevocationListParams {
        this_update: at(now),
        next_update: at(now + CRL_VALID_S),
        // Increases with every CRL this CA signs.
        crl_number: SerialNumber::from(now),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    let json = serde_json::to_vec_pretty(&list).map_err(|e| io(&list_path)(e.into()))?;
    replace(&list_path, &json)?;
    replace(&dir.join(CRL_FILE), crl.pem()?.as_bytes())?;
    Ok(list)
}

/// Adds the fingerprint of the certificate at `cert` to `DIR/denied-fingerprints`
/// (no CA key needed); returns it.
pub fn deny(dir: &Path, cert: &Path) -> Result<String, PkiError> {
    let der = cert_from_pem_file(cert)?;
    let fp = crate::fingerprint(&der);
    let path = dir.join(DENY_FILE);
    let mut text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(&path)(e)),
    };
    if !text
        .lines()
        .any(|l| l.split('#').next().unwrap_or_default().trim() == fp)
    {
        let names = super::cert_names(&der).join(",");
        text.push_str(&format!("{fp}  # {names}, denied at {}\n", crate::now_unix_s()));
        replace(&path, text.as_bytes())?;
    }
    Ok(fp)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader sees the old or the new list, never half of one.
fn replace(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    write_file(&tmp, bytes, false)?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
