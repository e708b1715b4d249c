//! The embedded MQTT broker of `pointgate demo` (rumqttd, in-process, loopback only).
//!
//! It owns one rumqttd router and two plain-TCP listeners on 127.0.0.1, each on a port
//! chosen free at start: an MQTT 5 listener (what the agent uses, [`EmbeddedBroker::url`])
//! and an MQTT 3.1.1 listener ([`EmbeddedBroker::url_v4`]). Both listeners share the
//! router, so a 3.1.1 client and an MQTT 5 client see each other's messages.
//!
//! Invariants and limits:
//! - [`EmbeddedBroker::start`] returns only once both listeners answer an MQTT CONNECT
//!   with a successful CONNACK, so a client that connects right after never races it.
//! - Loopback only, anonymous, no TLS, no persistence: a demo broker, never a store's one.
//! - rumqttd has no stop method. The router and listener threads live until the process
//!   exits; dropping an `EmbeddedBroker` does not stop them. `pointgate demo` exits anyway.
//! - rumqttd logs through `tracing` under the target `rumqttd`, and reports ordinary peer
//!   disconnects at error level: the demo's subscriber should filter it (`rumqttd=off`).
//! - What its MQTT 5 listener does with rumqttc 0.25 clients is pinned by
//!   `tests/embedded_broker.rs`: QoS 1 with PUBACK, publish properties (response topic,
//!   correlation data, expiry, content type, user properties), persistent sessions with
//!   `session_present`, queued messages, retained messages, manual acks with redelivery
//!   after a reconnect. It differs from Mosquitto in three ways the demo must tolerate:
//!   acknowledgements are honoured in order only (an out-of-order PUBACK leaves the message
//!   to be redelivered), a redelivery does not set DUP, and a session with expiry 0 is
//!   kept anyway. Each errs towards a duplicate delivery, never a loss.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};

/// How long `start` waits for the listeners to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times `start` picks new ports when a listener could not bind (another
/// process took a port between our probe and rumqttd's bind).
const START_ATTEMPTS: usize = 3;
/// Largest MQTT packet the demo broker accepts (bytes). Station commands are far smaller;
/// the contract caps them below this.
const MAX_PAYLOAD_SIZE: usize = 256 * 1024;

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no free port on 127.0.0.1 for the embedded broker")]
    NoFreePort(#[source] std::io::Error),
    #[error("could not start the embedded broker's thread")]
    Spawn(#[source] std::io::Error),
    #[error("the embedded broker's {protocol} listener on {addr} failed: {reason}")]
    Listener {
        protocol: &'static str,
        addr: SocketAddr,
        reason: String,
    },
    #[error(
        "the embedded broker's {protocol} listener on {addr} did not answer within {waited:?}"
    )]
    NotReady {
        protocol: &'static str,
        addr: SocketAddr,
        waited: Duration,
    },
}

/// A running in-process MQTT broker on loopback. See the module documentation: it cannot
/// be stopped, it runs until the process exits.
#[derive(Debug)]
pub struct EmbeddedBroker {
    v5: SocketAddr,
    v4: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts the router and both listeners and waits (blocking, at most about 10 s)
    /// until both answer MQTT. Call it from a blocking context (or `spawn_blocking`).
    pub fn start() -> Result<EmbeddedBroker, BrokerError> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once() {
                Ok(broker) => return Ok(broker),
                // Only a failed bind is worth a new pair of ports; the failed attempt's
                // router thread stays idle until the process exits (rumqttd cannot stop it).
                Err(err @ BrokerError::Listener { .. }) => {
                    tracing::warn!(error = %err, "embedded broker listener failed, retrying on new ports");
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_error.unwrap_or(BrokerError::NotReady {
            protocol: "MQTT 5",
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            waited: READY_TIMEOUT,
        }))
    }

    fn start_once() -> Result<EmbeddedBroker, BrokerError> {
        let v5 = free_loopback_addr()?;
        let v4 = free_loopback_addr()?;

        let router_tx = Router::new(0, router_config()).spawn();
        let mut server_v5 = Server::new(
            server_settings("pointgate-demo-v5", v5),
            router_tx.clone(),
            V5,
        );
        let mut server_v4 = Server::new(server_settings("pointgate-demo-v4", v4), router_tx, V4);

        // A server only returns when it fails (its bind, mostly); report which one.
        let (failed_tx, failed_rx) = mpsc::channel::<(&'static str, SocketAddr, String)>();
        thread::Builder::new()
            .name("demo-broker".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = failed_tx.send(("runtime", v5, err.to_string()));
                        return;
                    }
                };
                runtime.block_on(async {
                    let failed = tokio::select! {
                        result = server_v5.start(LinkType::Remote) => ("MQTT 5", v5, result),
                        result = server_v4.start(LinkType::Remote) => ("MQTT 3.1.1", v4, result),
                    };
                    let (protocol, addr, result) = failed;
                    let reason = match result {
                        Ok(()) => "stopped".to_owned(),
                        Err(err) => err.to_string(),
                    };
                    tracing::error!(protocol, %addr, %reason, "embedded broker listener stopped");
                    let _ = failed_tx.send((protocol, addr, reason));
                });
            })
            .map_err(BrokerError::Spawn)?;

        let deadline = Instant::now() + READY_TIMEOUT;
        wait_ready("MQTT 5", v5, Probe::V5, deadline, &failed_rx)?;
        wait_ready("MQTT 3.1.1", v4, Probe::V4, deadline, &failed_rx)?;
        tracing::debug!(v5 = %v5, v4 = %v4, "embedded broker ready");
        Ok(EmbeddedBroker { v5, v4 })
    }

    /// The MQTT 5 listener, as a URL: `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.v5)
    }

    /// The MQTT 3.1.1 listener, as a URL: `mqtt://127.0.0.1:PORT`.
    pub fn url_v4(&self) -> String {
        format!("mqtt://{}", self.v4)
    }

    /// The MQTT 5 listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.v5
    }

    /// The MQTT 3.1.1 listener's address.
    pub fn addr_v4(&self) -> SocketAddr {
        self.v4
    }
}

fn router_config() -> RouterConfig {
    RouterConfig {
        max_connections: 1_000,
        max_outgoing_packet_count: 200,
        // In-memory commit log per topic filter: 10 segments of 1 MiB.
        max_segment_size: 1024 * 1024,
        max_segment_count: 10,
        ..RouterConfig::default()
    }
}

fn server_settings(name: &str, listen: SocketAddr) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD_SIZE,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// A loopback address whose port was free a moment ago (the OS picked it for port 0).
fn free_loopback_addr() -> Result<SocketAddr, BrokerError> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .map_err(BrokerError::NoFreePort)?;
    listener.local_addr().map_err(BrokerError::NoFreePort)
}

#[derive(Clone, Copy)]
enum Probe {
    V4,
    V5,
}

/// Polls `addr` with an MQTT CONNECT until it answers CONNACK (success), the server
/// thread reports a failure, or `deadline` passes. Backoff grows from 2 ms to 50 ms.
fn wait_ready(
    protocol: &'static str,
    addr: SocketAddr,
    probe: Probe,
    deadline: Instant,
    failed: &mpsc::Receiver<(&'static str, SocketAddr, String)>,
) -> Result<(), BrokerError> {
    let mut backoff = Duration::from_millis(2);
    loop {
        if let Ok((protocol, addr, reason)) = failed.try_recv() {
            return Err(BrokerError::Listener {
                protocol,
                addr,
                reason,
            });
        }
        if mqtt_handshake(addr, probe).is_ok() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(BrokerError::NotReady {
                protocol,
                addr,
                waited: READY_TIMEOUT,
            });
        }
        thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}

/// One MQTT CONNECT / CONNACK / DISCONNECT exchange with clean start: proves that an MQTT
/// server of the right protocol level listens at `addr`, and leaves no session behind.
fn mqtt_handshake(addr: SocketAddr, probe: Probe) -> std::io::Result<()> {
    const CLIENT_ID: &[u8] = b"pointgate-probe";
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.set_write_timeout(Some(Duration::from_millis(500)))?;

    let mut variable = vec![0, 4, b'M', b'Q', b'T', b'T'];
    match probe {
        // Level 4, clean session, keep-alive 10 s.
        Probe::V4 => variable.extend_from_slice(&[4, 0x02, 0, 10]),
        // Level 5, clean start, keep-alive 10 s, no properties.
        Probe::V5 => variable.extend_from_slice(&[5, 0x02, 0, 10, 0]),
    }
    // The id is 15 bytes: its length fits the low byte.
    variable.extend_from_slice(&[0, CLIENT_ID.len() as u8]);
    variable.extend_from_slice(CLIENT_ID);
    // Under 128 bytes: a one-byte remaining length.
    let mut packet = vec![0x10, variable.len() as u8];
    packet.extend_from_slice(&variable);
    stream.write_all(&packet)?;

    // CONNACK: type 0x20, remaining length, flags, return/reason code 0 = success.
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a successful CONNACK",
        ));
    }
    stream.write_all(&[0xE0, 0x00])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_serves_both_protocol_levels_on_distinct_loopback_ports() {
        let broker = EmbeddedBroker::start().expect("broker starts");
        assert!(broker.addr().ip().is_loopback());
        assert_ne!(broker.addr().port(), broker.addr_v4().port());
        assert_eq!(
            broker.url(),
            format!("mqtt://127.0.0.1:{}", broker.addr().port())
        );
        assert!(mqtt_handshake(broker.addr(), Probe::V5).is_ok());
        assert!(mqtt_handshake(broker.addr_v4(), Probe::V4).is_ok());
    }

    #[test]
    fn handshake_fails_where_nothing_listens() {
        // Negative control for the readiness probe: a port we hold but never accept on.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        assert!(mqtt_handshake(addr, Probe::V5).is_err());
    }
}
