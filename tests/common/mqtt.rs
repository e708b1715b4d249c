//! Test stations: MQTT clients (rumqttc) whose event loop runs in a spawned tokio task,
//! so the test body only sends requests and waits for what arrives.
//!
//! [`MqttStation`] speaks MQTT 5 (what pointgate and real stations use), [`MqttStation311`]
//! MQTT 3.1.1. Both reconnect by themselves after a broker restart (backoff 20 ms to
//! 500 ms), record what the link went through in [`LinkStatus`], and hand every received
//! message to the test as a [`Msg`]. Publishes wait for the PUBACK unless told not to.
//! They need a tokio runtime (`#[tokio::test]`); dropping a station aborts its task, which
//! closes the connection without DISCONNECT (a crash, as the broker sees it).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    Packet as Packet5, PubAckReason, Publish as Publish5, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};
use rumqttc::{AsyncClient as Client4, Event as Event4, MqttOptions as Options4, Outgoing};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long connect, subscribe and publish wait for the broker's answer.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Session expiry asked for by persistent MQTT 5 stations (seconds). Without one, an MQTT 5
/// session ends with the connection whatever `clean_start` says.
pub const PERSISTENT_SESSION_EXPIRY: u32 = 3600;
/// Largest packet the stations accept or send.
const MAX_PACKET: u32 = 1024 * 1024;

/// One message a station received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    /// MQTT 5 only (None / empty for 3.1.1).
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
    raw: Raw,
}

#[derive(Debug, Clone)]
enum Raw {
    V5(Publish5),
    V4(rumqttc::Publish),
}

impl Msg {
    /// The payload as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The payload parsed as JSON; panics with the payload if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "payload on {} is not JSON ({e}): {}",
                self.topic,
                self.text()
            )
        })
    }

    fn from_v5(publish: Publish5) -> Msg {
        let props = publish.properties.clone().unwrap_or_default();
        Msg {
            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
            payload: publish.payload.to_vec(),
            qos: publish.qos as u8,
            retain: publish.retain,
            dup: publish.dup,
            pkid: publish.pkid,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data.map(|b| b.to_vec()),
            message_expiry: props.message_expiry_interval,
            content_type: props.content_type,
            user_properties: props.user_properties,
            raw: Raw::V5(publish),
        }
    }

    fn from_v4(publish: rumqttc::Publish) -> Msg {
        Msg {
            topic: publish.topic.clone(),
            payload: publish.payload.to_vec(),
            qos: publish.qos as u8,
            retain: publish.retain,
            dup: publish.dup,
            pkid: publish.pkid,
            response_topic: None,
            correlation_data: None,
            message_expiry: None,
            content_type: None,
            user_properties: Vec::new(),
            raw: Raw::V4(publish),
        }
    }
}

/// What a station's link went through so far.
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    /// Connected now (a CONNACK came, no error since).
    pub connected: bool,
    /// How many successful CONNACKs (1 after the first connect; +1 per reconnect).
    pub connacks: u32,
    /// `session_present` of the last CONNACK.
    pub session_present: Option<bool>,
    /// The last connection error, as text.
    pub last_error: Option<String>,
    /// How many connection errors.
    pub errors: u32,
}

/// How a station connects.
#[derive(Clone)]
pub struct StationOpts {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// MQTT 5 clean start / MQTT 3.1.1 clean session.
    pub clean_start: bool,
    /// MQTT 5 session expiry interval (s). [`StationOpts::new`] sets
    /// [`PERSISTENT_SESSION_EXPIRY`] when `clean_start` is false.
    pub session_expiry: Option<u32>,
    /// Acknowledge received QoS 1 messages only through [`MqttStation::ack`].
    pub manual_acks: bool,
    pub credentials: Option<(String, String)>,
    pub keep_alive: Duration,
    /// TLS and such; None is plain TCP.
    pub transport: Option<rumqttc::Transport>,
}

impl StationOpts {
    pub fn new(port: u16, client_id: &str, clean_start: bool) -> StationOpts {
        StationOpts {
            host: "127.0.0.1".to_owned(),
            port,
            client_id: client_id.to_owned(),
            clean_start,
            session_expiry: (!clean_start).then_some(PERSISTENT_SESSION_EXPIRY),
            manual_acks: false,
            credentials: None,
            keep_alive: Duration::from_secs(30),
            transport: None,
        }
    }

    pub fn credentials(mut self, username: &str, password: &str) -> Self {
        self.credentials = Some((username.to_owned(), password.to_owned()));
        self
    }

    pub fn manual_acks(mut self) -> Self {
        self.manual_acks = true;
        self
    }

    pub fn host(mut self, host: &str) -> Self {
        self.host = host.to_owned();
        self
    }

    pub fn transport(mut self, transport: rumqttc::Transport) -> Self {
        self.transport = Some(transport);
        self
    }

    fn v5(&self) -> Options5 {
        let mut options = Options5::new(&self.client_id, &self.host, self.port);
        options
            .set_clean_start(self.clean_start)
            .set_session_expiry_interval(self.session_expiry)
            .set_manual_acks(self.manual_acks)
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(Some(MAX_PACKET));
        if let Some((user, pass)) = &self.credentials {
            options.set_credentials(user, pass);
        }
        if let Some(transport) = &self.transport {
            options.set_transport(transport.clone());
        }
        options
    }

    fn v4(&self) -> Options4 {
        let mut options = Options4::new(&self.client_id, &self.host, self.port);
        options
            .set_clean_session(self.clean_start)
            .set_manual_acks(self.manual_acks)
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(MAX_PACKET as usize, MAX_PACKET as usize);
        if let Some((user, pass)) = &self.credentials {
            options.set_credentials(user, pass);
        }
        if let Some(transport) = &self.transport {
            options.set_transport(transport.clone());
        }
        options
    }
}

/// Options for one MQTT 5 publish.
#[derive(Debug, Clone)]
pub struct PubOpts {
    pub qos: u8,
    pub retain: bool,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

impl Default for PubOpts {
    fn default() -> Self {
        PubOpts {
            qos: 1,
            retain: false,
            response_topic: None,
            correlation_data: None,
            message_expiry: None,
            content_type: None,
            user_properties: Vec::new(),
        }
    }
}

/// What the event-loop task tells the station besides messages.
#[derive(Debug)]
enum LinkEvent {
    /// A publish left with this packet id (0 for QoS 0).
    PublishSent(u16),
    /// PUBACK for this packet id; `Err` holds a failure reason.
    PubAck(u16, Result<(), String>),
    /// SUBACK for this packet id; `Err` holds the first failure reason.
    SubAck(u16, Result<(), String>),
    /// Our PUBACK for this packet id left (manual acks).
    PubAckSent(u16),
}

/// The inbox shared by both protocol versions: messages, acks, status.
struct Inbox {
    messages: mpsc::UnboundedReceiver<Msg>,
    acks: mpsc::UnboundedReceiver<LinkEvent>,
    status: Arc<Mutex<LinkStatus>>,
    seen: Vec<Msg>,
    name: String,
}

/// The event-loop task's side of the inbox.
#[derive(Clone)]
struct Outbox {
    messages: mpsc::UnboundedSender<Msg>,
    acks: mpsc::UnboundedSender<LinkEvent>,
    status: Arc<Mutex<LinkStatus>>,
}

impl Outbox {
    fn status(&self, f: impl FnOnce(&mut LinkStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut status);
    }
}

fn inbox(name: &str) -> (Inbox, Outbox) {
    let (msg_tx, msg_rx) = mpsc::unbounded_channel();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let status = Arc::new(Mutex::new(LinkStatus::default()));
    (
        Inbox {
            messages: msg_rx,
            acks: ack_rx,
            status: status.clone(),
            seen: Vec::new(),
            name: name.to_owned(),
        },
        Outbox {
            messages: msg_tx,
            acks: ack_tx,
            status,
        },
    )
}

/// Reconnect backoff of the stations: 20 ms doubling to 500 ms, reset by a CONNACK.
fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(Duration::from_millis(500))
}
const FIRST_BACKOFF: Duration = Duration::from_millis(20);

impl Inbox {
    fn status(&self) -> LinkStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for the first CONNACK or the first error, whichever comes first.
    async fn first_connect(&self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        let mut backoff = Duration::from_millis(1);
        loop {
            let status = self.status();
            if status.connacks > 0 {
                return Ok(());
            }
            if let Some(error) = status.last_error {
                return Err(error);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("no CONNACK within {ACK_TIMEOUT:?}"));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(20));
        }
    }

    async fn next_message(&mut self, timeout: Duration) -> Option<Msg> {
        let msg = tokio::time::timeout(timeout, self.messages.recv())
            .await
            .ok()??;
        self.seen.push(msg.clone());
        Some(msg)
    }

    async fn wait_for(&mut self, mut pred: impl FnMut(&Msg) -> bool, timeout: Duration) -> Msg {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_message(left).await {
                Some(msg) if pred(&msg) => return msg,
                Some(_) => continue,
                None => panic!(
                    "{}: no matching message within {timeout:?}; link {:?}; saw {:#?}",
                    self.name,
                    self.status(),
                    self.seen
                ),
            }
        }
    }

    async fn next_ack(&mut self, what: &str) -> LinkEvent {
        match tokio::time::timeout(ACK_TIMEOUT, self.acks.recv()).await {
            Ok(Some(ack)) => ack,
            Ok(None) => panic!("{}: event loop ended while waiting for {what}", self.name),
            Err(_) => panic!(
                "{}: no {what} within {ACK_TIMEOUT:?}; link {:?}",
                self.name,
                self.status()
            ),
        }
    }

    fn drain_acks(&mut self) {
        while self.acks.try_recv().is_ok() {}
    }

    /// After a QoS 1 publish request: waits for its packet id, then for that PUBACK.
    async fn wait_puback(&mut self) -> Result<(), String> {
        let pkid = loop {
            if let LinkEvent::PublishSent(pkid) = self.next_ack("the publish to leave").await {
                break pkid;
            }
        };
        loop {
            if let LinkEvent::PubAck(id, result) = self.next_ack("PUBACK").await {
                if id == pkid {
                    return result;
                }
            }
        }
    }

    async fn wait_suback(&mut self) -> Result<(), String> {
        loop {
            if let LinkEvent::SubAck(_, result) = self.next_ack("SUBACK").await {
                return result;
            }
        }
    }

    /// After an ack request: waits until our PUBACK for `pkid` was written.
    async fn wait_ack_sent(&mut self, pkid: u16) {
        loop {
            if let LinkEvent::PubAckSent(id) = self.next_ack("our PUBACK to leave").await {
                if id == pkid {
                    return;
                }
            }
        }
    }

    fn drain(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Ok(msg) = self.messages.try_recv() {
            self.seen.push(msg.clone());
            out.push(msg);
        }
        out
    }
}

fn qos5(qos: u8) -> QoS5 {
    match qos {
        0 => QoS5::AtMostOnce,
        1 => QoS5::AtLeastOnce,
        _ => QoS5::ExactlyOnce,
    }
}

fn qos4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

/// An MQTT 5 test station.
pub struct MqttStation {
    client: Client5,
    inbox: Inbox,
    task: JoinHandle<()>,
}

impl MqttStation {
    /// Connects to 127.0.0.1:`port` and waits for the CONNACK; panics if refused.
    /// `clean_start: false` also asks for a session expiry of [`PERSISTENT_SESSION_EXPIRY`].
    pub async fn connect(port: u16, client_id: &str, clean_start: bool) -> MqttStation {
        MqttStation::connect_with(StationOpts::new(port, client_id, clean_start)).await
    }

    pub async fn connect_with(opts: StationOpts) -> MqttStation {
        let id = opts.client_id.clone();
        MqttStation::try_connect_with(opts)
            .await
            .unwrap_or_else(|e| panic!("station {id}: connect failed: {e}"))
    }

    /// Connects; `Err` holds the first connection error (refused, unreachable, TLS...).
    pub async fn try_connect_with(opts: StationOpts) -> Result<MqttStation, String> {
        let (client, mut eventloop) = Client5::new(opts.v5(), 64);
        let (inbox, outbox) = inbox(&opts.client_id);
        let task = tokio::spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            loop {
                match eventloop.poll().await {
                    Ok(Event5::Incoming(Packet5::ConnAck(ack))) => {
                        backoff = FIRST_BACKOFF;
                        outbox.status(|s| {
                            s.connected = true;
                            s.connacks += 1;
                            s.session_present = Some(ack.session_present);
                        });
                    }
                    Ok(Event5::Incoming(Packet5::Publish(publish))) => {
                        let _ = outbox.messages.send(Msg::from_v5(publish));
                    }
                    Ok(Event5::Incoming(Packet5::PubAck(ack))) => {
                        let result = match ack.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                            other => Err(format!("{other:?}")),
                        };
                        let _ = outbox.acks.send(LinkEvent::PubAck(ack.pkid, result));
                    }
                    Ok(Event5::Incoming(Packet5::SubAck(ack))) => {
                        let result = ack
                            .return_codes
                            .iter()
                            .find(|code| !matches!(code, SubscribeReasonCode::Success(_)))
                            .map_or(Ok(()), |code| Err(format!("{code:?}")));
                        let _ = outbox.acks.send(LinkEvent::SubAck(ack.pkid, result));
                    }
                    Ok(Event5::Outgoing(Outgoing::Publish(pkid))) => {
                        let _ = outbox.acks.send(LinkEvent::PublishSent(pkid));
                    }
                    Ok(Event5::Outgoing(Outgoing::PubAck(pkid))) => {
                        let _ = outbox.acks.send(LinkEvent::PubAckSent(pkid));
                    }
                    Ok(Event5::Outgoing(Outgoing::Disconnect)) => {
                        outbox.status(|s| s.connected = false);
                        return;
                    }
                    Ok(_) => {}
                    Err(err) => {
                        outbox.status(|s| {
                            s.connected = false;
                            s.errors += 1;
                            s.last_error = Some(err.to_string());
                        });
                        tokio::time::sleep(backoff).await;
                        backoff = next_backoff(backoff);
                    }
                }
            }
        });
        let station = MqttStation {
            client,
            inbox,
            task,
        };
        station.inbox.first_connect().await?;
        Ok(station)
    }

    /// Subscribes (QoS 1) and waits for the SUBACK; panics if refused.
    pub async fn subscribe(&mut self, topic: &str) {
        if let Err(reason) = self.try_subscribe(topic).await {
            panic!("{}: subscribe {topic} refused: {reason}", self.inbox.name);
        }
    }

    /// Subscribes (QoS 1); `Err` holds the SUBACK's failure reason.
    pub async fn try_subscribe(&mut self, topic: &str) -> Result<(), String> {
        self.inbox.drain_acks();
        self.client
            .subscribe(topic, QoS5::AtLeastOnce)
            .await
            .expect("the event loop takes requests");
        self.inbox.wait_suback().await
    }

    /// Publishes QoS 1 and waits for the PUBACK; panics if the broker refuses it.
    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.publish_opts(topic, payload, PubOpts::default()).await;
    }

    /// Publishes QoS 1 with a response topic, correlation data and an optional message
    /// expiry (s), and waits for the PUBACK; panics if the broker refuses it.
    pub async fn publish_with_props(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        response_topic: &str,
        correlation_data: &[u8],
        message_expiry: Option<u32>,
    ) {
        let opts = PubOpts {
            response_topic: Some(response_topic.to_owned()),
            correlation_data: Some(correlation_data.to_vec()),
            message_expiry,
            ..PubOpts::default()
        };
        self.publish_opts(topic, payload, opts).await;
    }

    /// Publishes with `opts`; for QoS 1 waits for the PUBACK and panics if refused.
    pub async fn publish_opts(&mut self, topic: &str, payload: impl Into<Vec<u8>>, opts: PubOpts) {
        if let Err(reason) = self.try_publish_opts(topic, payload, opts).await {
            panic!("{}: publish to {topic} refused: {reason}", self.inbox.name);
        }
    }

    /// Publishes with `opts`; for QoS 1 waits for the PUBACK and returns its failure
    /// reason as `Err` (e.g. `NotAuthorized` under an ACL).
    pub async fn try_publish_opts(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        opts: PubOpts,
    ) -> Result<(), String> {
        self.inbox.drain_acks();
        self.publish_nowait(topic, payload, opts.clone()).await;
        if opts.qos == 0 {
            return Ok(());
        }
        self.inbox.wait_puback().await
    }

    /// Queues a publish with the event loop and returns at once (no PUBACK wait): for
    /// publishing while the broker is down.
    pub async fn publish_nowait(&self, topic: &str, payload: impl Into<Vec<u8>>, opts: PubOpts) {
        let properties = PublishProperties {
            response_topic: opts.response_topic,
            correlation_data: opts.correlation_data.map(Into::into),
            message_expiry_interval: opts.message_expiry,
            content_type: opts.content_type,
            user_properties: opts.user_properties,
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(
                topic,
                qos5(opts.qos),
                opts.retain,
                payload.into(),
                properties,
            )
            .await
            .expect("the event loop takes requests");
    }

    /// Acknowledges a message received with manual acks, and waits until the PUBACK left.
    pub async fn ack(&mut self, msg: &Msg) {
        let Raw::V5(publish) = &msg.raw else {
            panic!("an MQTT 3.1.1 message given to an MQTT 5 station");
        };
        self.inbox.drain_acks();
        self.client
            .ack(publish)
            .await
            .expect("the event loop takes requests");
        self.inbox.wait_ack_sent(publish.pkid).await;
    }

    /// The next message, or None after `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Option<Msg> {
        self.inbox.next_message(timeout).await
    }

    /// The first message for which `pred` holds; panics after `timeout` with all it saw.
    pub async fn wait_for(&mut self, pred: impl FnMut(&Msg) -> bool, timeout: Duration) -> Msg {
        self.inbox.wait_for(pred, timeout).await
    }

    /// Messages already received and not yet taken, without waiting.
    pub fn drain(&mut self) -> Vec<Msg> {
        self.inbox.drain()
    }

    /// Every message returned so far.
    pub fn seen(&self) -> &[Msg] {
        &self.inbox.seen
    }

    pub fn status(&self) -> LinkStatus {
        self.inbox.status()
    }

    /// Waits until the station has had `n` successful CONNACKs (reconnects after a broker
    /// restart); panics after `timeout`.
    pub async fn wait_connacks(&self, n: u32, timeout: Duration) -> LinkStatus {
        let inbox = &self.inbox;
        if !super::util::wait_until_async(timeout, || inbox.status().connacks >= n).await {
            panic!(
                "{}: not {n} CONNACKs within {timeout:?}: {:?}",
                inbox.name,
                inbox.status()
            );
        }
        inbox.status()
    }

    /// The underlying client, for anything the helpers do not cover.
    pub fn client(&self) -> &Client5 {
        &self.client
    }

    /// Sends DISCONNECT (normal, no will) and waits for the event loop to end.
    pub async fn disconnect(self) {
        let mut this = self;
        this.client
            .disconnect()
            .await
            .expect("the event loop takes requests");
        let _ = tokio::time::timeout(ACK_TIMEOUT, &mut this.task).await;
    }
}

impl Drop for MqttStation {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An MQTT 3.1.1 test station: as [`MqttStation`], without properties.
pub struct MqttStation311 {
    client: Client4,
    inbox: Inbox,
    task: JoinHandle<()>,
}

impl MqttStation311 {
    /// Connects to 127.0.0.1:`port` (clean session as given) and waits for the CONNACK.
    pub async fn connect(port: u16, client_id: &str, clean_session: bool) -> MqttStation311 {
        MqttStation311::connect_with(StationOpts::new(port, client_id, clean_session)).await
    }

    pub async fn connect_with(opts: StationOpts) -> MqttStation311 {
        let id = opts.client_id.clone();
        MqttStation311::try_connect_with(opts)
            .await
            .unwrap_or_else(|e| panic!("station {id}: connect failed: {e}"))
    }

    /// Connects; `Err` holds the first connection error.
    pub async fn try_connect_with(opts: StationOpts) -> Result<MqttStation311, String> {
        use rumqttc::{Packet, SubscribeReasonCode as Code4};
        let (client, mut eventloop) = Client4::new(opts.v4(), 64);
        let (inbox, outbox) = inbox(&opts.client_id);
        let task = tokio::spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            loop {
                match eventloop.poll().await {
                    Ok(Event4::Incoming(Packet::ConnAck(ack))) => {
                        backoff = FIRST_BACKOFF;
                        outbox.status(|s| {
                            s.connected = true;
                            s.connacks += 1;
                            s.session_present = Some(ack.session_present);
                        });
                    }
                    Ok(Event4::Incoming(Packet::Publish(publish))) => {
                        let _ = outbox.messages.send(Msg::from_v4(publish));
                    }
                    Ok(Event4::Incoming(Packet::PubAck(ack))) => {
                        let _ = outbox.acks.send(LinkEvent::PubAck(ack.pkid, Ok(())));
                    }
                    Ok(Event4::Incoming(Packet::SubAck(ack))) => {
                        let result = ack
                            .return_codes
                            .iter()
                            .find(|code| matches!(code, Code4::Failure))
                            .map_or(Ok(()), |code| Err(format!("{code:?}")));
                        let _ = outbox.acks.send(LinkEvent::SubAck(ack.pkid, result));
                    }
                    Ok(Event4::Outgoing(Outgoing::Publish(pkid))) => {
                        let _ = outbox.acks.send(LinkEvent::PublishSent(pkid));
                    }
                    Ok(Event4::Outgoing(Outgoing::PubAck(pkid))) => {
                        let _ = outbox.acks.send(LinkEvent::PubAckSent(pkid));
                    }
                    Ok(Event4::Outgoing(Outgoing::Disconnect)) => {
                        outbox.status(|s| s.connected = false);
                        return;
                    }
                    Ok(_) => {}
                    Err(err) => {
                        outbox.status(|s| {
                            s.connected = false;
                            s.errors += 1;
                            s.last_error = Some(err.to_string());
                        });
                        tokio::time::sleep(backoff).await;
                        backoff = next_backoff(backoff);
                    }
                }
            }
        });
        let station = MqttStation311 {
            client,
            inbox,
            task,
        };
        station.inbox.first_connect().await?;
        Ok(station)
    }

    /// Subscribes (QoS 1) and waits for the SUBACK; panics if refused.
    pub async fn subscribe(&mut self, topic: &str) {
        if let Err(reason) = self.try_subscribe(topic).await {
            panic!("{}: subscribe {topic} refused: {reason}", self.inbox.name);
        }
    }

    pub async fn try_subscribe(&mut self, topic: &str) -> Result<(), String> {
        self.inbox.drain_acks();
        self.client
            .subscribe(topic, rumqttc::QoS::AtLeastOnce)
            .await
            .expect("the event loop takes requests");
        self.inbox.wait_suback().await
    }

    /// Publishes QoS 1 and waits for the PUBACK. (MQTT 3.1.1 cannot say "refused": a
    /// broker that denies a publish still acknowledges it.)
    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.publish_qos(topic, payload, 1, false).await;
    }

    /// Publishes with this QoS and retain flag; for QoS 1 waits for the PUBACK.
    pub async fn publish_qos(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: u8,
        retain: bool,
    ) {
        self.inbox.drain_acks();
        self.publish_nowait(topic, payload, qos, retain).await;
        if qos > 0 {
            if let Err(reason) = self.inbox.wait_puback().await {
                panic!("{}: publish to {topic} refused: {reason}", self.inbox.name);
            }
        }
    }

    /// Queues a publish with the event loop and returns at once.
    pub async fn publish_nowait(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: u8,
        retain: bool,
    ) {
        self.client
            .publish(topic, qos4(qos), retain, payload.into())
            .await
            .expect("the event loop takes requests");
    }

    /// Acknowledges a message received with manual acks, and waits until the PUBACK left.
    pub async fn ack(&mut self, msg: &Msg) {
        let Raw::V4(publish) = &msg.raw else {
            panic!("an MQTT 5 message given to an MQTT 3.1.1 station");
        };
        self.inbox.drain_acks();
        self.client
            .ack(publish)
            .await
            .expect("the event loop takes requests");
        self.inbox.wait_ack_sent(publish.pkid).await;
    }

    pub async fn next_message(&mut self, timeout: Duration) -> Option<Msg> {
        self.inbox.next_message(timeout).await
    }

    pub async fn wait_for(&mut self, pred: impl FnMut(&Msg) -> bool, timeout: Duration) -> Msg {
        self.inbox.wait_for(pred, timeout).await
    }

    pub fn drain(&mut self) -> Vec<Msg> {
        self.inbox.drain()
    }

    pub fn seen(&self) -> &[Msg] {
        &self.inbox.seen
    }

    pub fn status(&self) -> LinkStatus {
        self.inbox.status()
    }

    pub async fn wait_connacks(&self, n: u32, timeout: Duration) -> LinkStatus {
        let inbox = &self.inbox;
        if !super::util::wait_until_async(timeout, || inbox.status().connacks >= n).await {
            panic!(
                "{}: not {n} CONNACKs within {timeout:?}: {:?}",
                inbox.name,
                inbox.status()
            );
        }
        inbox.status()
    }

    pub fn client(&self) -> &Client4 {
        &self.client
    }

    pub async fn disconnect(self) {
        let mut this = self;
        this.client
            .disconnect()
            .await
            .expect("the event loop takes requests");
        let _ = tokio::time::timeout(ACK_TIMEOUT, &mut this.task).await;
    }
}

impl Drop for MqttStation311 {
    fn drop(&mut self) {
        self.task.abort();
    }
}
