//! The station link: the one task that owns the MQTT connection (rumqttc, MQTT 5).
//!
//! - Commands arrive on `P/station/+/cmd` with QoS 1 and **manual acks**: a command is
//!   PUBACKed only after the engine answers that it is stored or refused, so a command
//!   the agent did not store is redelivered by the broker (persistent session:
//!   `clean_start = false` and a session expiry).
//! - Events come from the engine's outbox. Each QoS 1 publish is tagged with its outbox
//!   id; rumqttc reports the packet id it chose (`Outgoing::Publish(pkid)`) in the order
//!   publishes were queued, so a FIFO of tags maps pkids to outbox ids, and a PUBACK
//!   tells the engine to drop the event from the outbox. rumqttc's own retransmission is
//!   disabled (its pending list is cleared on every connection loss): after every
//!   reconnect the engine resends its whole outbox instead, which also covers restarts.
//!   The FIFO, the connected flag and the pending list change only under one mutex, and
//!   publishes use `try_publish` (never awaited under the lock), so the mapping cannot
//!   skew and the polling task never blocks on its own request channel.
//! - rumqttc has no reconnect backoff: this task adds exponential backoff with jitter.
//! - A half-open connection is found by rumqttc's keep-alive (a PINGREQ every keep-alive
//!   whatever the traffic; no PINGRESP by the next one: an error), so within two
//!   keep-alive periods; a `poll` that makes no progress for two keep-alives (a write
//!   stuck on a dead socket, a hung connect) is cut off too. Either way the connection
//!   is dropped and the link reconnects with backoff.
//! - The last will sets `agent/status` to offline (retained); a clean stop publishes the
//!   same before disconnecting.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::domain::outcome::Address;
use crate::engine::port::{CommandProps, Dest, EngineHandle, LinkPublish, ToEngine, ToLink};
use crate::mqtt::{self, keep_alive, stall_limit};
use crate::station::topics::Topics;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("mqtt.url `{0}`: {1}")]
    Url(String, String),
    #[error("mqtt TLS: {0}")]
    Tls(String),
}

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub url: String,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: Duration,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub topics: Topics,
}

/// The retained payload of `agent/status` when the agent is gone.
pub fn offline_status() -> Vec<u8> {
    br#"{"v":1,"state":"offline"}"#.to_vec()
}

#[derive(Default)]
struct Shared {
    connected: bool,
    /// Set on connect, cleared when the engine's `Resync` marker arrives: until then
    /// events are dropped here, since the resync resends the whole outbox.
    awaiting_resync: bool,
    /// Outbox ids (or `None` for retained status) of publishes queued to rumqttc and not
    /// yet given a packet id, in order.
    fifo: VecDeque<Option<u64>>,
    /// Packet id → outbox id, for publishes awaiting their PUBACK.
    inflight: HashMap<u16, Option<u64>>,
}

fn options(cfg: &LinkConfig) -> Result<MqttOptions, LinkError> {
    let (host, port, tls) =
        mqtt::broker_address(&cfg.url).map_err(|e| LinkError::Url(cfg.url.clone(), e))?;
    let mut o = MqttOptions::new(cfg.client_id.clone(), host, port);
    o.set_keep_alive(keep_alive(cfg.keep_alive));
    o.set_clean_start(false);
    // Keep the session (and the commands queued in it) for a week of absence.
    o.set_session_expiry_interval(Some(7 * 24 * 3600));
    o.set_manual_acks(true);
    // Small latency-bound packets (PUBACKs, events): Nagle's algorithm would hold each one
    // behind the previous write's ACK (40 ms of delayed ACK; docs/performance.md).
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    o.set_max_packet_size(Some(256 * 1024));
    // rumqttc keeps one slot per possible packet id up to this limit (u16::MAX by
    // default: 14 MiB at start). The broker's Receive Maximum lowers it further
    // (Mosquitto's default is 20); queued events wait in the outbox meanwhile.
    o.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    o.set_last_will(LastWill::new(
        cfg.topics.status(),
        offline_status(),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    if let Some(u) = &cfg.username {
        o.set_credentials(u.clone(), cfg.password.clone().unwrap_or_default());
    }
    if tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(
                mqtt::tls_config(
                    cfg.ca_file.as_deref(),
                    cfg.cert_file.as_deref(),
                    cfg.key_file.as_deref(),
                )
                .map_err(|e| LinkError::Tls(e.0))?,
            )),
        ));
    }
    Ok(o)
}

/// At most this many QoS 1 publishes wait for their PUBACK at once.
const OUTGOING_INFLIGHT: u16 = 256;

/// Run the link until `shutdown`; then publish `offline` and disconnect.
pub async fn run(
    cfg: LinkConfig,
    engine: EngineHandle,
    from_engine: mpsc::UnboundedReceiver<ToLink>,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    let opts = options(&cfg)?;
    let (client, eventloop) = AsyncClient::new(opts, 4096);
    let shared = Arc::new(Mutex::new(Shared::default()));
    let publisher = tokio::spawn(publisher(
        client.clone(),
        shared.clone(),
        cfg.topics.clone(),
        from_engine,
        shutdown.clone(),
    ));
    poll_loop(cfg, client, eventloop, shared, engine, shutdown).await;
    let _ = publisher.await;
    Ok(())
}

/// Lock the shared state. A poisoned lock means a panic elsewhere, which aborts the
/// process (panic = abort), so the inner value is always consistent.
fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

async fn publisher(
    client: AsyncClient,
    shared: Arc<Mutex<Shared>>,
    topics: Topics,
    mut rx: mpsc::UnboundedReceiver<ToLink>,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = shutdown.cancelled() => None,
        };
        let Some(msg) = msg else { return };
        match msg {
            ToLink::Resync => {
                let mut s = lock(&shared);
                if s.connected {
                    s.awaiting_resync = false;
                }
            }
            ToLink::Publish(p) => {
                let mut p = Some(p);
                while let Some(item) = p.take() {
                    match try_send(&client, &shared, &topics, item) {
                        Ok(()) => {}
                        Err(back) => {
                            // rumqttc's request queue is full: let it drain.
                            p = Some(back);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            if shutdown.is_cancelled() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The topic of a publish: the link owns topic rendering (the engine speaks of stations,
/// Response Topics, the status and terminals).
pub fn topic_of(topics: &Topics, dest: &Dest) -> String {
    match dest {
        Dest::Event(Address::Station(station)) => topics.events(station),
        Dest::Event(Address::Reply(topic) | Address::Topic(topic)) => topic.clone(),
        Dest::Status => topics.status(),
        Dest::Terminal(terminal) => topics.terminal_state(terminal),
    }
}

/// Queue one publish to rumqttc, tagging it in the FIFO, atomically with respect to
/// connection changes. Returns the item when rumqttc's queue is full.
fn try_send(
    client: &AsyncClient,
    shared: &Mutex<Shared>,
    topics: &Topics,
    p: LinkPublish,
) -> Result<(), LinkPublish> {
    let mut s = lock(shared);
    if !s.connected || s.awaiting_resync {
        // Dropped: the outbox keeps events; status is republished after the resync.
        return Ok(());
    }
    let props = p.correlation.as_ref().map(|c| PublishProperties {
        correlation_data: Some(c.clone().into()),
        ..Default::default()
    });
    let topic = topic_of(topics, &p.dest);
    let res = match props {
        Some(props) => client.try_publish_with_properties(
            topic,
            QoS::AtLeastOnce,
            p.retain,
            p.payload.clone(),
            props,
        ),
        None => client.try_publish(topic, QoS::AtLeastOnce, p.retain, p.payload.clone()),
    };
    match res {
        Ok(()) => {
            s.fifo.push_back(p.outbox_id);
            Ok(())
        }
        Err(rumqttc::v5::ClientError::TryRequest(_)) => Err(p),
        Err(e) => {
            tracing::warn!(error = %e, "publish not queued");
            Ok(())
        }
    }
}

/// Acknowledge commands in the order they arrived, each once the engine has stored or
/// refused it. A command the engine could not store is not acknowledged: the broker
/// redelivers it. (MQTT expects PUBACKs in order; some brokers drop a client otherwise.)
async fn acker(
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<(rumqttc::v5::mqttbytes::v5::Publish, oneshot::Receiver<()>)>,
) {
    while let Some((publish, stored)) = rx.recv().await {
        if stored.await.is_ok() {
            if let Err(e) = client.ack(&publish).await {
                tracing::warn!(error = %e, "could not acknowledge a command");
            }
        }
    }
}

async fn poll_loop(
    cfg: LinkConfig,
    client: AsyncClient,
    mut eventloop: EventLoop,
    shared: Arc<Mutex<Shared>>,
    engine: EngineHandle,
    shutdown: CancellationToken,
) {
    let mut attempts: u32 = 0;
    let (acks, ack_rx) = mpsc::unbounded_channel();
    tokio::spawn(acker(client.clone(), ack_rx));
    let stall_limit = stall_limit(cfg.keep_alive);
    loop {
        let ev = tokio::select! {
            ev = tokio::time::timeout(stall_limit, eventloop.poll()) => match ev {
                Ok(ev) => ev.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "no progress for {} ms: the connection is taken as dead",
                    stall_limit.as_millis()
                )),
            },
            _ = shutdown.cancelled() => break,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                attempts = 0;
                let session_present = ack.session_present;
                {
                    let mut s = lock(&shared);
                    s.connected = true;
                    s.awaiting_resync = true;
                    s.fifo.clear();
                    s.inflight.clear();
                }
                tracing::info!(url = %cfg.url, session_present, "connected to the broker");
                if let Err(e) = client.try_subscribe(cfg.topics.command_filter(), QoS::AtLeastOnce)
                {
                    tracing::error!(error = %e, "could not subscribe to commands");
                }
                let engine = engine.clone();
                tokio::spawn(async move {
                    engine.send(ToEngine::Connected { session_present }).await;
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic).to_string();
                let Some(station) = cfg.topics.station_of_command(&topic) else {
                    let _ = client.try_ack(&p);
                    continue;
                };
                let props = p.properties.as_ref();
                let response_topic = props.and_then(|x| x.response_topic.clone());
                let props = CommandProps {
                    response_topic_allowed: response_topic
                        .as_ref()
                        .is_some_and(|t| cfg.topics.is_station_topic(&station, t)),
                    response_topic,
                    correlation: props
                        .and_then(|x| x.correlation_data.as_ref().map(|c| c.to_vec())),
                    message_expiry_s: props.and_then(|x| x.message_expiry_interval),
                };
                let (done, stored) = oneshot::channel();
                let payload = p.payload.to_vec();
                // Handed to the engine in arrival order; acknowledged in the same order.
                if acks.send((p, stored)).is_err() {
                    break;
                }
                if !engine
                    .send(ToEngine::Command {
                        station,
                        payload,
                        props,
                        done,
                    })
                    .await
                {
                    break;
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut s = lock(&shared);
                if let Some(tag) = s.fifo.pop_front() {
                    s.inflight.insert(pkid, tag);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let tag = lock(&shared).inflight.remove(&ack.pkid);
                if let Some(Some(outbox_id)) = tag {
                    let engine = engine.clone();
                    tokio::spawn(async move {
                        engine.send(ToEngine::Published { outbox_id }).await;
                    });
                }
            }
            Ok(_) => {}
            Err(e) => {
                let was_connected = {
                    let mut s = lock(&shared);
                    let was = s.connected;
                    s.connected = false;
                    s.awaiting_resync = false;
                    s.fifo.clear();
                    s.inflight.clear();
                    // Our outbox, not rumqttc, republishes after reconnect; commands
                    // are redelivered by the broker.
                    eventloop.clean();
                    eventloop.pending.clear();
                    was
                };
                attempts = attempts.saturating_add(1);
                let delay = mqtt::reconnect_delay_ms(attempts, fastrand::f64());
                if was_connected {
                    tracing::warn!(url = %cfg.url, error = %e, retry_in_ms = delay, "broker connection lost");
                } else {
                    // A refused login, a TLS failure (unknown CA, no or bad client
                    // certificate) or an unreachable broker: say which, every attempt.
                    tracing::error!(url = %cfg.url, error = %e, retry_in_ms = delay, "could not connect to the broker");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    // Clean stop: say offline (retained), then disconnect.
    let connected = lock(&shared).connected;
    if connected {
        let _ = client.try_publish(
            cfg.topics.status(),
            QoS::AtLeastOnce,
            true,
            offline_status(),
        );
        let _ = client.try_disconnect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::MIN_KEEP_ALIVE;

    fn cfg(url: &str, keep_alive: Duration) -> LinkConfig {
        LinkConfig {
            url: url.into(),
            client_id: "pointgate-test".into(),
            username: None,
            password: None,
            keep_alive,
            ca_file: None,
            cert_file: None,
            key_file: None,
            topics: Topics::new("pointgate/test"),
        }
    }

    #[test]
    fn a_keep_alive_below_rumqttc_s_minimum_is_raised_not_a_panic() {
        let o = options(&cfg("mqtt://127.0.0.1:1883", Duration::from_secs(1))).expect("options");
        assert_eq!(o.keep_alive(), MIN_KEEP_ALIVE);
        let o = options(&cfg("mqtt://127.0.0.1:1883", Duration::from_secs(10))).expect("options");
        assert_eq!(o.keep_alive(), Duration::from_secs(10));
    }

    #[test]
    fn a_stalled_poll_is_cut_after_two_keep_alives() {
        assert_eq!(
            stall_limit(Duration::from_secs(10)),
            Duration::from_secs(20)
        );
        assert_eq!(stall_limit(Duration::from_secs(1)), Duration::from_secs(10));
    }

    #[test]
    fn urls_choose_tls_by_scheme_and_refuse_others() {
        assert!(options(&cfg("mqtts://localhost:8883", Duration::from_secs(10))).is_ok());
        assert!(matches!(
            options(&cfg("http://localhost", Duration::from_secs(10))),
            Err(LinkError::Url(..))
        ));
    }
}
