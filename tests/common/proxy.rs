//! A small TCP fault proxy (tokio) between a client and a broker, for network faults
//! that Mosquitto cannot make: a half-open connection (traffic dropped in both
//! directions, nothing closed) and a broker the client cannot reach.
//!
//! Modes apply at once to every connection:
//! - [`ProxyMode::Forward`]: bytes go through.
//! - [`ProxyMode::Blackhole`]: bytes are read and dropped in both directions; neither
//!   side is closed. A connection that was blackholed stays dead for good (as a flow a
//!   firewall or NAT forgot), even after the mode returns to `Forward`; only new
//!   connections forward again.
//! - [`ProxyMode::Reject`]: new connections are accepted and closed at once (a broker
//!   that is not there); existing ones are left as they are.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Forward,
    Blackhole,
    Reject,
}

/// A running proxy on 127.0.0.1 (port 0); stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port and forwards to `127.0.0.1:upstream_port`.
    pub async fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, rx) = watch::channel(ProxyMode::Forward);
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let upstream: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                if *rx.borrow() == ProxyMode::Reject {
                    drop(client);
                    continue;
                }
                conns.spawn(pipe(client, upstream, rx.clone()));
            }
        });
        FaultProxy {
            addr,
            mode,
            accepted,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port())
    }

    pub fn set_mode(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    /// How many connections the proxy accepted so far (rejected ones included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every pipe.
        self.task.abort();
    }
}

/// Copies both ways until either side closes (then closes both), dropping the bytes
/// once the mode has been `Blackhole`.
async fn pipe(mut client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<ProxyMode>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut dead = false;
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_server = vec![0u8; 16 * 1024];
    loop {
        dead |= *mode.borrow_and_update() == ProxyMode::Blackhole;
        tokio::select! {
            n = client.read(&mut from_client) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    dead |= *mode.borrow() == ProxyMode::Blackhole;
                    if !dead && server.write_all(&from_client[..n]).await.is_err() {
                        return;
                    }
                }
            },
            n = server.read(&mut from_server) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    dead |= *mode.borrow() == ProxyMode::Blackhole;
                    if !dead && client.write_all(&from_server[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
