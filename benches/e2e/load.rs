//! The stations: MQTT 5 clients (rumqttc) that publish charge commands on their stations'
//! `cmd` topics and time the events that come back. One client connection drives several
//! station ids (the bench broker has no ACL), so a thousand stations do not need a
//! thousand connections; every station has its own terminal.
//!
//! Times are taken in this process: `Instant` for intervals between our own publish and
//! the events we receive, and the system clock (µs) at publish for comparison with the
//! simulator's ledger, which the simulator (also in this process) stamps in ms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, Notify};

pub fn station_id(i: usize) -> String {
    format!("st-{i:04}")
}

pub fn terminal_id(i: usize) -> String {
    format!("PAX_A910__BENCH{i:05}")
}

pub fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// One charge as the station saw it.
#[derive(Debug, Clone, Default)]
pub struct Charge {
    pub station: usize,
    pub published: Option<Instant>,
    pub published_unix_us: i64,
    pub accepted: Option<Instant>,
    pub sent: Option<Instant>,
    pub done: Option<Instant>,
    pub final_state: Option<String>,
    pub intent_id: Option<String>,
    /// Bytes of the command and of every event about it (the information the store keeps).
    pub payload_bytes: usize,
    pub events: u32,
}

#[derive(Default)]
struct State {
    charges: HashMap<String, Charge>,
    /// Closed loop: the request ids each station sends next, in order.
    queued: HashMap<usize, std::collections::VecDeque<String>>,
    finals: u64,
    accepted: u64,
    refusals: u64,
    other_finals: HashMap<String, u64>,
    status_online_at: Option<Instant>,
    status_state: String,
    connection_errors: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Notify,
    prefix: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Outgoing {
    request_id: String,
    station: usize,
}

/// The station fleet.
pub struct Fleet {
    shared: Arc<Shared>,
    /// Per client connection: the channel of charges to publish.
    senders: Vec<mpsc::UnboundedSender<Outgoing>>,
}

fn charge_payload(request_id: &str) -> String {
    format!(r#"{{"v":1,"type":"charge","request_id":"{request_id}","amount":"15.00"}}"#)
}

impl Fleet {
    /// Connects `clients` connections sharing `stations` station ids, plus one that
    /// watches `agent/status`; returns once every subscription is acknowledged.
    pub async fn connect(
        port: u16,
        prefix: &str,
        stations: usize,
        clients: usize,
    ) -> Result<Fleet> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            prefix: prefix.to_string(),
        });
        let clients = clients.clamp(1, stations.max(1));
        let mut senders = Vec::new();
        let mut subacks = Vec::new();
        for c in 0..clients {
            let mine: Vec<usize> = (0..stations).filter(|s| s % clients == c).collect();
            let (tx, rx) = mpsc::unbounded_channel();
            let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
            spawn_client(
                port,
                format!("bench-stations-{c}"),
                shared.clone(),
                mine,
                rx,
                sub_tx,
            )?;
            senders.push(tx);
            subacks.push(sub_rx);
        }
        let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
        spawn_status_watcher(port, shared.clone(), sub_tx)?;
        subacks.push(sub_rx);
        for s in subacks {
            match tokio::time::timeout(Duration::from_secs(20), s).await {
                Ok(Ok(())) => {}
                _ => bail!("a station client did not connect and subscribe within 20 s"),
            }
        }
        Ok(Fleet { shared, senders })
    }

    /// Forgets when `online` was last seen (before a new agent starts).
    pub fn reset_online(&self) {
        self.shared.lock().status_online_at = None;
    }

    pub fn online_at(&self) -> Option<Instant> {
        self.shared.lock().status_online_at
    }

    /// Waits until `pred` holds over the fleet's counters, or `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Counters) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(&self.counters()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return pred(&self.counters());
            }
        }
    }

    pub fn counters(&self) -> Counters {
        let s = self.shared.lock();
        Counters {
            finals: s.finals,
            accepted: s.accepted,
            refusals: s.refusals,
            online: s.status_online_at.is_some(),
        }
    }

    /// Publishes one charge now (open loop).
    pub fn fire(&self, station: usize, request_id: String) {
        self.shared.lock().charges.insert(
            request_id.clone(),
            Charge {
                station,
                ..Charge::default()
            },
        );
        let c = station % self.senders.len();
        let _ = self.senders[c].send(Outgoing {
            request_id,
            station,
        });
    }

    /// Closed loop: each station in `stations` sends `per_station` charges, the next one
    /// as soon as the previous one's final event arrives.
    pub fn start_closed_loop(
        &self,
        tag: &str,
        stations: std::ops::Range<usize>,
        per_station: usize,
    ) {
        let mut first = Vec::new();
        {
            let mut s = self.shared.lock();
            for st in stations {
                let mut q: std::collections::VecDeque<String> = (0..per_station)
                    .map(|n| format!("{tag}-{st}-{n}"))
                    .collect();
                for id in &q {
                    s.charges.insert(
                        id.clone(),
                        Charge {
                            station: st,
                            ..Charge::default()
                        },
                    );
                }
                if let Some(id) = q.pop_front() {
                    first.push((st, id));
                }
                s.queued.insert(st, q);
            }
        }
        for (st, id) in first {
            let c = st % self.senders.len();
            let _ = self.senders[c].send(Outgoing {
                request_id: id,
                station: st,
            });
        }
    }

    /// The charges whose request id starts with `tag-`.
    pub fn charges(&self, tag: &str) -> Vec<Charge> {
        let p = format!("{tag}-");
        self.shared
            .lock()
            .charges
            .iter()
            .filter(|(k, _)| k.starts_with(&p))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Station connection errors so far (each followed by a reconnect).
    pub fn connection_errors(&self) -> u64 {
        self.shared.lock().connection_errors
    }

    pub fn other_finals(&self) -> HashMap<String, u64> {
        self.shared.lock().other_finals.clone()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Counters {
    pub finals: u64,
    pub accepted: u64,
    pub refusals: u64,
    pub online: bool,
}

fn options(port: u16, id: String) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_start(true);
    o.set_max_packet_size(Some(1024 * 1024));
    o
}

fn spawn_client(
    port: u16,
    id: String,
    shared: Arc<Shared>,
    stations: Vec<usize>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let (client, mut eventloop) = AsyncClient::new(options(port, id), 10_000);
    let filters: Vec<Filter> = stations
        .iter()
        .map(|s| {
            Filter::new(
                format!("{}/station/{}/evt", shared.prefix, station_id(*s)),
                QoS::AtLeastOnce,
            )
        })
        .collect();
    let c2 = client.clone();
    let sh = shared.clone();
    // Publisher: stamps each command just before it goes to rumqttc.
    tokio::spawn(async move {
        while let Some(o) = rx.recv().await {
            let topic = format!("{}/station/{}/cmd", sh.prefix, station_id(o.station));
            let payload = charge_payload(&o.request_id);
            {
                let mut s = sh.lock();
                if let Some(c) = s.charges.get_mut(&o.request_id) {
                    c.published = Some(Instant::now());
                    c.published_unix_us = unix_us();
                    c.payload_bytes += payload.len();
                }
            }
            if c2
                .publish(topic, QoS::AtLeastOnce, false, payload.into_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let sub_client = client.clone();
    tokio::spawn(async move {
        let mut subscribed = Some(subscribed);
        let mut pending_subacks = filters.len().div_ceil(100);
        let mut filters = Some(filters);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(f) = filters.take() {
                        // Chunks: a SUBSCRIBE of a thousand filters is fine, but keep it modest.
                        for chunk in f.chunks(100) {
                            let _ = sub_client.try_subscribe_many(chunk.to_vec());
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    pending_subacks = pending_subacks.saturating_sub(1);
                    if pending_subacks == 0 {
                        if let Some(tx) = subscribed.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = Instant::now();
                    on_event(&shared, &p.payload, now, &client);
                }
                Ok(_) => {}
                Err(_) => {
                    // rumqttc reconnects on the next poll; the broker going away at the
                    // end of the run lands here too, so this stays quiet.
                    shared.lock().connection_errors += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    Ok(())
}

fn on_event(shared: &Shared, payload: &[u8], now: Instant, client: &AsyncClient) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return;
    };
    let rid = v["request_id"].as_str().unwrap_or("").to_string();
    let state = v["state"].as_str().unwrap_or("").to_string();
    let is_final = v["final"].as_bool().unwrap_or(false);
    let mut next = None;
    {
        let mut s = shared.lock();
        if state == "refused" {
            s.refusals += 1;
        }
        let mut newly_final = false;
        let mut newly_accepted = false;
        let mut station = None;
        if let Some(c) = s.charges.get_mut(&rid) {
            c.payload_bytes += payload.len();
            c.events += 1;
            if let Some(id) = v["intent_id"].as_str() {
                c.intent_id = Some(id.to_string());
            }
            match state.as_str() {
                "accepted" if c.accepted.is_none() => {
                    c.accepted = Some(now);
                    newly_accepted = true;
                }
                "sent" if c.sent.is_none() => c.sent = Some(now),
                _ => {}
            }
            if is_final && c.done.is_none() {
                c.done = Some(now);
                c.final_state = Some(state.clone());
                newly_final = true;
                station = Some(c.station);
            }
        }
        if newly_accepted {
            s.accepted += 1;
        }
        if newly_final {
            s.finals += 1;
            if state != "approved" {
                *s.other_finals.entry(state.clone()).or_default() += 1;
            }
            if let Some(st) = station {
                if let Some(q) = s.queued.get_mut(&st) {
                    next = q.pop_front().map(|id| (st, id));
                }
            }
        }
        if let Some((_, id)) = &next {
            if let Some(c) = s.charges.get_mut(id) {
                c.published = Some(Instant::now());
                c.published_unix_us = unix_us();
            }
        }
    }
    if let Some((st, id)) = next {
        // From the polling task: try_publish never waits on the request channel (its
        // capacity exceeds the stations of one client, each with one charge in flight).
        let topic = format!("{}/station/{}/cmd", shared.prefix, station_id(st));
        let payload = charge_payload(&id);
        if let Some(c) = shared.lock().charges.get_mut(&id) {
            c.payload_bytes += payload.len();
        }
        let _ = client.try_publish(topic, QoS::AtLeastOnce, false, payload.into_bytes());
    }
    shared.changed.notify_waiters();
}

fn spawn_status_watcher(
    port: u16,
    shared: Arc<Shared>,
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let (client, mut eventloop) = AsyncClient::new(options(port, "bench-status".into()), 64);
    let topic = format!("{}/agent/status", shared.prefix);
    tokio::spawn(async move {
        let mut subscribed = Some(subscribed);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = Instant::now();
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    let state = v["state"].as_str().unwrap_or("").to_string();
                    {
                        let mut s = shared.lock();
                        // A retained message delivered at subscribe is history, not news.
                        if state == "online" && !p.retain && s.status_online_at.is_none() {
                            s.status_online_at = Some(now);
                        }
                        s.status_state = state;
                    }
                    shared.changed.notify_waiters();
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    Ok(())
}
