//! The control channel: TLS 1.3 only, mutual authentication only (rustls
//! with the ring provider), carrying length-prefixed JSON messages with a
//! size limit and timeouts on every read and write.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::pki::Identity;

/// Largest control message accepted (checked before allocating).
pub const MAX_MESSAGE: usize = 64 << 10;

/// Control channel errors.
#[derive(Debug, Error)]
pub enum TlsError {
    /// TLS configuration failed (bad key or roots).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The handshake or the connection failed (includes certificate
    /// verification failures, with rustls's reason).
    #[error("control channel: {0}")]
    Io(#[from] std::io::Error),
    /// A message that is not valid JSON of the expected shape, or too large.
    #[error("malformed control message: {0}")]
    Malformed(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side: TLS 1.3, a client certificate chaining to `roots` required.
pub fn server_config(id: &Identity, roots: RootCertStore) -> Result<Arc<ServerConfig>, TlsError> {
    let p = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), p.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert().clone()], id.private_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Client side: TLS 1.3, server verified against `roots`, our certificate presented.
pub fn client_config(id: &Identity, roots: RootCertStore) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![id.cert().clone()], id.private_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

enum Inner {
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
}

/// An established, mutually authenticated control channel.
pub struct Channel {
    inner: Inner,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channel")
    }
}

impl Channel {
    /// Connects to `addr` and verifies that the server's certificate is for
    /// `server_name` and chains to the configured roots.
    pub fn connect(
        addr: SocketAddr,
        server_name: &str,
        cfg: Arc<ClientConfig>,
        timeout: Duration,
    ) -> Result<Channel, TlsError> {
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| TlsError::Config(e.to_string()))?;
        let conn = ClientConnection::new(cfg, name).map_err(|e| TlsError::Config(e.to_string()))?;
        let sock = TcpStream::connect_timeout(&addr, timeout)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        sock.set_nodelay(true)?;
        let mut s = StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Channel {
            inner: Inner::Client(Box::new(s)),
        })
    }

    /// Completes the server side of the handshake on an accepted socket.
    pub fn accept(sock: TcpStream, cfg: Arc<ServerConfig>, timeout: Duration) -> Result<Channel, TlsError> {
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        sock.set_nodelay(true)?;
        let conn = ServerConnection::new(cfg).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut s = StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Channel {
            inner: Inner::Server(Box::new(s)),
        })
    }

    /// The peer's end-entity certificate (always present: mutual TLS only).
    pub fn peer_cert(&self) -> Option<&[u8]> {
        let certs = match &self.inner {
            Inner::Client(s) => s.conn.peer_certificates(),
            Inner::Server(s) => s.conn.peer_certificates(),
        };
        certs.and_then(|c| c.first()).map(|c| c.as_ref())
    }

    /// 32 bytes from the TLS exporter (RFC 8446 section 7.5).
    pub fn export(&self, label: &[u8], context: &[u8]) -> Result<[u8; 32], TlsError> {
        let mut out = [0u8; 32];
        let r = match &self.inner {
            Inner::Client(s) => s.conn.export_keying_material(&mut out, label, Some(context)),
            Inner::Server(s) => s.conn.export_keying_material(&mut out, label, Some(context)),
        };
        r.map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(out)
    }

    fn io(&mut self) -> &mut dyn ReadWrite {
        match &mut self.inner {
            Inner::Client(s) => s.as_mut(),
            Inner::Server(s) => s.as_mut(),
        }
    }

    /// Sends one message.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), TlsError> {
        let body = serde_json::to_vec(msg).map_err(|e| TlsError::Malformed(e.to_string()))?;
        if body.len() > MAX_MESSAGE {
            return Err(TlsError::Malformed(format!(
                "message of {} bytes exceeds {MAX_MESSAGE}",
                body.len()
            )));
        }
        let len = u32::try_from(body.len()).map_err(|_| TlsError::Malformed("too large".into()))?;
        let io = self.io();
        io.write_all(&len.to_be_bytes())?;
        io.write_all(&body)?;
        io.flush()?;
        Ok(())
    }

    /// Receives one message, refusing anything over [`MAX_MESSAGE`].
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<T, TlsError> {
        let io = self.io();
        let mut len = [0u8; 4];
        io.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_MESSAGE {
            return Err(TlsError::Malformed(format!(
                "message of {len} bytes exceeds {MAX_MESSAGE}"
            )));
        }
        let mut body = vec![0u8; len];
        io.read_exact(&mut body)?;
        serde_json::from_slice(&body).map_err(|e| TlsError::Malformed(e.to_string()))
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
