//! The simulator's transport: a CA and server certificate generated at start (rcgen), the
//! rustls server config, and an acceptor that can refuse or cut connections on demand.
//!
//! Every accepted connection gets a kill token, a child of the current "generation"
//! token. Cancelling it makes the socket fail every read and write and close with a
//! reset (zero linger), which wakes an idle keep-alive connection too. That is how the
//! `Down` fault cuts pooled connections and how `CommitThenDrop` loses an answer after
//! the create is committed. While the sim is down, the acceptor closes new sockets at
//! once, before the TLS handshake.

use std::future::{ready, Future, Ready};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum_server::accept::Accept;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{Shared, SimError};

/// The certificates the simulator serves with.
pub(crate) struct Certs {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
}

/// Generates a CA and a server certificate for `hostnames` signed by it.
pub(crate) fn generate(hostnames: &[String]) -> Result<Certs, SimError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let cert_err = |e: rcgen::Error| SimError::Certificate(e.to_string());

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pointgate simulator CA");
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "pointgate sim");
    ca_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let ca_key = KeyPair::generate().map_err(cert_err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(hostnames.to_vec()).map_err(cert_err)?;
    let cn = hostnames.first().map(String::as_str).unwrap_or("localhost");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;

    let chain = vec![
        cert.der().clone(),
        CertificateDer::from(ca_cert.der().to_vec()),
    ];
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SimError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| SimError::Tls(e.to_string()))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Certs {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
    })
}

/// The connection's kill switch: the middleware finds it by the peer address
/// (`ConnectInfo`), which the acceptor registers and the stream removes on drop.
#[derive(Clone)]
pub(crate) struct ConnKill {
    pub serial: u64,
    pub token: CancellationToken,
}

/// Wraps each accepted TCP socket (before TLS) so it can be refused or cut.
#[derive(Clone)]
pub(crate) struct SimAcceptor {
    pub shared: Arc<Shared>,
}

impl<S> Accept<TcpStream, S> for SimAcceptor {
    type Stream = KillableStream;
    type Service = S;
    type Future = Ready<io::Result<(KillableStream, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        if self.shared.world().is_down() {
            // A reset rather than a clean close: the client fails at once.
            let _ = stream.set_zero_linger();
            drop(stream);
            return ready(Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "simulator is down",
            )));
        }
        let peer = match stream.peer_addr() {
            Ok(peer) => peer,
            Err(e) => return ready(Err(e)),
        };
        let kill = self.shared.register_connection(peer);
        let stream = KillableStream {
            inner: stream,
            killed: Box::pin(kill.token.clone().cancelled_owned()),
            dead: false,
            peer,
            serial: kill.serial,
            shared: self.shared.clone(),
        };
        ready(Ok((stream, service)))
    }
}

/// A TCP stream that fails (and resets) once its kill token is cancelled.
pub(crate) struct KillableStream {
    inner: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    dead: bool,
    peer: SocketAddr,
    serial: u64,
    shared: Arc<Shared>,
}

impl Drop for KillableStream {
    fn drop(&mut self) {
        self.shared.forget_connection(self.peer, self.serial);
    }
}

impl KillableStream {
    /// Err once killed. Polling the kill future registers the waker, so a stream parked
    /// in a read wakes up when it is killed.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
            let _ = self.inner.set_zero_linger();
        }
        if self.dead {
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection cut by the simulator",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
