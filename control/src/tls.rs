//! The control channel: TLS 1.3 only, mutual authentication only (rustls
//! with the ring provider), carrying length-prefixed JSON messages with a
//! size limit, a timeout on every read and write, and a deadline on every
//! exchange: a peer that sends a byte just before each read would time out
//! still cannot hold a connection (and the admission slot behind it) longer
//! than [`EXCHANGE_TIMEOUTS`] timeouts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    Malformed(crate::peer::PeerText),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Server side: TLS 1.3, a client certificate chaining to `roots` required.
pub fn server_config(id: &Identity, roots: RootCertStore) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(config_error)?;
    server_with(id, verifier)
}

/// [`server_config`] for the PKI folder `pki`: its CA, and its CRL and
/// deny list, reloaded as they change ([`crate::revocation`]).
pub fn server_config_for(id: &Identity, pki: &std::path::Path) -> Result<Arc<ServerConfig>, TlsError> {
    server_with(id, revocation(pki)?.client_verifier())
}

fn server_with(
    id: &Identity,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert().clone()], id.private_key())
        .map_err(config_error)?;
    Ok(Arc::new(cfg))
}

/// Client side: TLS 1.3, server verified against `roots`, our certificate presented.
pub fn client_config(id: &Identity, roots: RootCertStore) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(config_error)?;
    client_with(id, verifier)
}

/// [`client_config`] for the PKI folder `pki`, with its revocation lists.
pub fn client_config_for(id: &Identity, pki: &std::path::Path) -> Result<Arc<ClientConfig>, TlsError> {
    client_with(id, revocation(pki)?.server_verifier())
}

fn client_with(
    id: &Identity,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        // Not dangerous: every verifier passed here is rustls-webpki's (the
        // CA, and for the PKI folder its CRL, then its deny list).
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert().clone()], id.private_key())
        .map_err(config_error)?;
    Ok(Arc::new(cfg))
}

fn revocation(pki: &std::path::Path) -> Result<Arc<crate::revocation::Revocation>, TlsError> {
    let roots = crate::pki::roots(pki).map_err(config_error)?;
    crate::revocation::Revocation::load(pki, roots).map_err(config_error)
}

/// An exchange on the channel — the TLS handshake with the request and its
/// reply, or the manifest and its receipt — may take at most this many
/// per-operation timeouts in all.
pub const EXCHANGE_TIMEOUTS: u32 = 3;

/// A TCP socket whose every read and write waits at most `per_op`, and not
/// past `deadline`.
struct Sock {
    tcp: TcpStream,
    per_op: Duration,
    deadline: Instant,
}

impl Sock {
    fn arm(&self) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the exchange did not finish within {:?} (the peer is too slow, or is holding the connection)",
                    self.per_op * EXCHANGE_TIMEOUTS
                ),
            ));
        }
        let t = self.per_op.min(left);
        self.tcp.set_read_timeout(Some(t))?;
        self.tcp.set_write_timeout(Some(t))
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.tcp.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

enum Inner {
    Client(Box<StreamOwned<ClientConnection, Sock>>),
    Server(Box<StreamOwned<ServerConnection, Sock>>),
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
        Self::connect_observed(addr, server_name, cfg, timeout, &|_| {})
    }

    /// [`Channel::connect`], showing `on_connect` the socket before the
    /// handshake (to close it from another thread: a cancel).
    pub fn connect_observed(
        addr: SocketAddr,
        server_name: &str,
        cfg: Arc<ClientConfig>,
        timeout: Duration,
        on_connect: &dyn Fn(&TcpStream),
    ) -> Result<Channel, TlsError> {
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| TlsError::Config(e.to_string()))?;
        let conn = ClientConnection::new(cfg, name).map_err(|e| TlsError::Config(e.to_string()))?;
        let deadline = Instant::now() + timeout * EXCHANGE_TIMEOUTS;
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        on_connect(&tcp);
        tcp.set_nodelay(true)?;
        let sock = Sock {
            tcp,
            per_op: timeout,
            deadline,
        };
        let mut s = StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Channel {
            inner: Inner::Client(Box::new(s)),
        })
    }

    /// Completes the server side of the handshake on an accepted socket.
    /// The first exchange (handshake, request, reply) must end within
    /// [`EXCHANGE_TIMEOUTS`] × `timeout` of this call.
    pub fn accept(tcp: TcpStream, cfg: Arc<ServerConfig>, timeout: Duration) -> Result<Channel, TlsError> {
        let deadline = Instant::now() + timeout * EXCHANGE_TIMEOUTS;
        tcp.set_nodelay(true)?;
        let conn = ServerConnection::new(cfg).map_err(|e| TlsError::Config(e.to_string()))?;
        let sock = Sock {
            tcp,
            per_op: timeout,
            deadline,
        };
        let mut s = StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Channel {
            inner: Inner::Server(Box::new(s)),
        })
    }

    /// Starts another exchange: it gets [`EXCHANGE_TIMEOUTS`] timeouts from
    /// now (the connection may have been idle since the last one).
    pub fn begin_exchange(&mut self) {
        let sock = match &mut self.inner {
            Inner::Client(s) => &mut s.sock,
            Inner::Server(s) => &mut s.sock,
        };
        sock.deadline = Instant::now() + sock.per_op * EXCHANGE_TIMEOUTS;
    }

    /// Whether the peer has closed the connection (or it broke), without
    /// reading or waiting: for a side that expects nothing on this channel
    /// for a while and must not hold resources for a peer that left.
    pub fn peer_closed(&self) -> bool {
        let tcp = match &self.inner {
            Inner::Client(s) => &s.sock.tcp,
            Inner::Server(s) => &s.sock.tcp,
        };
        if tcp.set_nonblocking(true).is_err() {
            return true;
        }
        let mut b = [0u8; 1];
        let closed = match tcp.peek(&mut b) {
            Ok(0) => true,
            // Bytes waiting (an alert, or an early next message): the peer
            // is there; whoever reads next finds out what it said.
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        };
        closed || tcp.set_nonblocking(false).is_err()
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
        let body = serde_json::to_vec(msg).map_err(|e| TlsError::Malformed(e.to_string().into()))?;
        if body.len() > MAX_MESSAGE {
            return Err(TlsError::Malformed(
                format!("message of {} bytes exceeds {MAX_MESSAGE}", body.len()).into(),
            ));
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
            return Err(TlsError::Malformed(
                format!("message of {len} bytes exceeds {MAX_MESSAGE}").into(),
            ));
        }
        let mut body = vec![0u8; len];
        io.read_exact(&mut body)?;
        serde_json::from_slice(&body).map_err(|e| TlsError::Malformed(e.to_string().into()))
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
