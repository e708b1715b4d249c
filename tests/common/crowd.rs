//! A crowd of test stations that keep charges flowing, as real checkout stations would:
//! each station (an MQTT 5 client with a persistent session) keeps a few charges open per
//! terminal, re-sends a command with the same `request_id` when no `accepted` came within
//! `resend_after`, and records every event it gets. The crash and network tests drive the
//! agent with it and then check the promises on what it recorded ([`Track`]).
//!
//! A charge is *accepted* once any event of its stored request arrived (`seq` ≥ 1: after
//! a repeat the agent publishes the latest event, not `accepted` again), *done* once it has
//! a final event or `needs_attention` (stop and call staff: the station moves on).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::mqtt::MqttStation;
use super::util::unix_ms;
use super::util::wait_until_async;

/// How the crowd behaves.
#[derive(Clone)]
pub struct CrowdOpts {
    pub port: u16,
    /// The agent's topic prefix.
    pub prefix: String,
    /// `(station, terminals)`, as configured at the agent.
    pub stations: Vec<(String, Vec<String>)>,
    /// Charges to send in all.
    pub total: usize,
    /// Charges a station keeps open (not done) per terminal.
    pub window_per_terminal: usize,
    /// Re-send a command that got no `accepted` within this.
    pub resend_after: Duration,
    /// The amount of the n-th charge (0-based).
    pub amount: fn(usize) -> String,
    /// `ttl_s` on every charge, if any.
    pub ttl_s: Option<u32>,
    /// `expires_at` = first send + this, if set.
    pub expires_in: Option<Duration>,
    /// Send an `external_reference` of our own (`<station>-<request_id>`), so tests can
    /// find each charge in the simulator's ledger without knowing how the agent derives one.
    pub explicit_reference: bool,
    /// Prefix of the request ids (`<prefix>00001`...).
    pub id_prefix: String,
}

impl CrowdOpts {
    pub fn new(port: u16, prefix: &str, stations: &[(String, Vec<String>)], total: usize) -> Self {
        CrowdOpts {
            port,
            prefix: prefix.to_string(),
            stations: stations.to_vec(),
            total,
            window_per_terminal: 2,
            resend_after: Duration::from_millis(1000),
            amount: default_amount,
            ttl_s: None,
            expires_in: None,
            explicit_reference: false,
            id_prefix: "c".to_string(),
        }
    }
}

/// Amounts from 5.00 (MLA's minimum) to 99.99 that avoid the simulator's outcome amounts
/// (11, 12, 13).
pub fn default_amount(n: usize) -> String {
    let cents = 500 + (n * 7919) % 9500;
    let cents = if (1100..=1300).contains(&cents) {
        cents + 300
    } else {
        cents
    };
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// One charge as its station saw it.
#[derive(Debug, Clone)]
pub struct Track {
    pub n: usize,
    pub station: String,
    pub request_id: String,
    pub terminal: String,
    pub amount: String,
    pub external_reference: Option<String>,
    /// `expires_at` sent, Unix ms.
    pub expires_at_ms: Option<i64>,
    pub payload: Vec<u8>,
    pub sends: u32,
    pub first_sent_ms: i64,
    last_sent: Instant,
    pub accepted: bool,
    pub events: Vec<Value>,
    /// The first final event (state, payment...).
    pub final_event: Option<Value>,
    /// Every distinct final state seen (more than one breaks the contract).
    pub final_states: BTreeSet<String>,
    pub needs_attention: bool,
    pub refused: Option<Value>,
}

impl Track {
    /// A charge as if sent now and nothing heard yet: for the checks' negative controls.
    pub fn synthetic(station: &str, request_id: &str, terminal: &str, amount: &str) -> Track {
        Track {
            n: 0,
            station: station.to_string(),
            request_id: request_id.to_string(),
            terminal: terminal.to_string(),
            amount: amount.to_string(),
            external_reference: None,
            expires_at_ms: None,
            payload: Vec::new(),
            sends: 1,
            first_sent_ms: unix_ms(),
            last_sent: Instant::now(),
            accepted: false,
            events: Vec::new(),
            final_event: None,
            final_states: BTreeSet::new(),
            needs_attention: false,
            refused: None,
        }
    }

    /// Records an event as a station would have received it.
    pub fn push_event(&mut self, v: Value) {
        let mut s = State::default();
        let key = (self.station.clone(), self.request_id.clone());
        s.tracks.insert(key.clone(), self.clone());
        record(&mut s, &self.station.clone(), v);
        *self = s.tracks.remove(&key).expect("the track is there");
    }

    pub fn done(&self) -> bool {
        self.final_event.is_some() || self.needs_attention || self.refused.is_some()
    }

    pub fn final_state(&self) -> Option<String> {
        self.final_event
            .as_ref()
            .and_then(|e| e["state"].as_str().map(str::to_string))
    }

    /// The intent id of the latest event that named one.
    pub fn intent_id(&self) -> Option<String> {
        self.events
            .iter()
            .rev()
            .find_map(|e| e["intent_id"].as_str().map(str::to_string))
    }

    pub fn states(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| e["state"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

#[derive(Default)]
struct State {
    tracks: BTreeMap<(String, String), Track>,
    /// Not-done request ids per station.
    open: HashMap<String, BTreeSet<String>>,
    next: usize,
    resends: u64,
}

/// The running crowd.
pub struct Crowd {
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    pub total: usize,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Crowd {
    /// Connects every station (persistent session, subscribed to its events) and starts
    /// sending at once.
    pub async fn start(opts: CrowdOpts) -> Crowd {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = CancellationToken::new();
        let opts = Arc::new(opts);
        let mut tasks = Vec::new();
        for i in 0..opts.stations.len() {
            let name = &opts.stations[i].0;
            let mut station =
                MqttStation::connect(opts.port, &format!("crowd-{name}"), false).await;
            station
                .subscribe(&format!("{}/station/{name}/evt", opts.prefix))
                .await;
            let (o, s, st) = (opts.clone(), state.clone(), stop.clone());
            tasks.push(tokio::spawn(station_task(o, i, station, s, st)));
        }
        Crowd {
            state,
            stop,
            tasks,
            total: opts.total,
        }
    }

    /// Charges sent so far (first sends).
    pub fn sent(&self) -> usize {
        lock(&self.state).tracks.len()
    }

    /// Charges done so far.
    pub fn done(&self) -> usize {
        lock(&self.state)
            .tracks
            .values()
            .filter(|t| t.done())
            .count()
    }

    /// Re-sends so far.
    pub fn resends(&self) -> u64 {
        lock(&self.state).resends
    }

    /// Every charge sent, in order of first send.
    pub fn tracks(&self) -> Vec<Track> {
        let mut v: Vec<Track> = lock(&self.state).tracks.values().cloned().collect();
        v.sort_by_key(|t| t.n);
        v
    }

    /// Waits until all `total` charges were sent and each is done; false after `timeout`.
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        let total = self.total;
        wait_until_async(timeout, || {
            let s = lock(&self.state);
            s.tracks.len() >= total && s.open.values().all(BTreeSet::is_empty)
        })
        .await
    }

    /// Stops the stations.
    pub async fn stop(mut self) {
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn charge_payload(opts: &CrowdOpts, track: &Track, multi_terminal: bool) -> Vec<u8> {
    let mut cmd = json!({
        "v": 1,
        "type": "charge",
        "request_id": track.request_id,
        "amount": track.amount,
    });
    if multi_terminal {
        cmd["terminal"] = json!(track.terminal);
    }
    if let Some(ttl) = opts.ttl_s {
        cmd["ttl_s"] = json!(ttl);
    }
    if let Some(ms) = track.expires_at_ms {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
            .expect("a valid time");
        cmd["expires_at"] = json!(t
            .format(&time::format_description::well_known::Rfc3339)
            .expect("formats"));
    }
    if let Some(r) = &track.external_reference {
        cmd["external_reference"] = json!(r);
    }
    cmd.to_string().into_bytes()
}

async fn station_task(
    opts: Arc<CrowdOpts>,
    index: usize,
    mut station: MqttStation,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
) {
    let (name, terminals) = opts.stations[index].clone();
    let cmd_topic = format!("{}/station/{name}/cmd", opts.prefix);
    let window = terminals.len() * opts.window_per_terminal;
    let mut rr = 0usize;
    while !stop.is_cancelled() {
        // New charges, up to the window.
        loop {
            let payload = {
                let mut s = lock(&state);
                let open = s.open.get(&name).map_or(0, BTreeSet::len);
                if open >= window || s.next >= opts.total {
                    None
                } else {
                    let n = s.next;
                    s.next += 1;
                    let request_id = format!("{}{n:05}", opts.id_prefix);
                    let terminal = terminals[rr % terminals.len()].clone();
                    rr += 1;
                    let now = unix_ms();
                    let mut track = Track {
                        n,
                        station: name.clone(),
                        request_id: request_id.clone(),
                        terminal,
                        amount: (opts.amount)(n),
                        external_reference: opts
                            .explicit_reference
                            .then(|| format!("{name}-{request_id}")),
                        expires_at_ms: opts.expires_in.map(|d| now + d.as_millis() as i64),
                        payload: Vec::new(),
                        sends: 1,
                        first_sent_ms: now,
                        last_sent: Instant::now(),
                        accepted: false,
                        events: Vec::new(),
                        final_event: None,
                        final_states: BTreeSet::new(),
                        needs_attention: false,
                        refused: None,
                    };
                    track.payload = charge_payload(&opts, &track, terminals.len() > 1);
                    let payload = track.payload.clone();
                    s.open
                        .entry(name.clone())
                        .or_default()
                        .insert(request_id.clone());
                    s.tracks.insert((name.clone(), request_id), track);
                    Some(payload)
                }
            };
            match payload {
                Some(p) => station.publish(&cmd_topic, p).await,
                None => break,
            }
        }
        // Re-sends of commands that got no `accepted` in time.
        let resend: Vec<Vec<u8>> = {
            let mut s = lock(&state);
            let open: Vec<String> = s
                .open
                .get(&name)
                .map(|o| o.iter().cloned().collect())
                .unwrap_or_default();
            let mut out = Vec::new();
            for rid in open {
                if let Some(t) = s.tracks.get_mut(&(name.clone(), rid)) {
                    if !t.accepted && t.last_sent.elapsed() >= opts.resend_after {
                        t.last_sent = Instant::now();
                        t.sends += 1;
                        out.push(t.payload.clone());
                    }
                }
            }
            s.resends += out.len() as u64;
            out
        };
        for p in resend {
            station.publish(&cmd_topic, p).await;
        }
        // Events.
        let mut msgs = Vec::new();
        if let Some(m) = station.next_message(Duration::from_millis(20)).await {
            msgs.push(m);
            msgs.extend(station.drain());
        }
        if !msgs.is_empty() {
            let mut s = lock(&state);
            for m in msgs {
                let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                    continue;
                };
                record(&mut s, &name, v);
            }
        }
    }
}

fn record(s: &mut State, station: &str, v: Value) {
    let Some(rid) = v["request_id"].as_str().map(str::to_string) else {
        return;
    };
    let key = (station.to_string(), rid.clone());
    let Some(t) = s.tracks.get_mut(&key) else {
        return;
    };
    let state = v["state"].as_str().unwrap_or_default().to_string();
    let seq = v["seq"].as_u64().unwrap_or(0);
    if seq >= 1 {
        t.accepted = true;
    }
    if state == "refused" {
        t.refused.get_or_insert(v.clone());
    } else if v["final"] == true {
        t.final_states.insert(state.clone());
        t.final_event.get_or_insert(v.clone());
    } else if state == "needs_attention" {
        t.needs_attention = true;
    }
    t.events.push(v);
    if t.done() {
        if let Some(o) = s.open.get_mut(station) {
            o.remove(&rid);
        }
    }
}

/// What a crowd's charges came to.
#[derive(Debug, Default)]
pub struct Summary {
    pub sent: usize,
    pub sends: u64,
    pub accepted: usize,
    pub final_by_state: BTreeMap<String, usize>,
    /// Done as `needs_attention`, with no final state yet.
    pub needs_attention_open: usize,
    /// Reached a final state after `needs_attention`.
    pub resolved_after_attention: usize,
    pub refused: usize,
    /// Accepted, and neither final nor `needs_attention`.
    pub lost: Vec<String>,
    /// Sent, never accepted nor refused.
    pub never_accepted: Vec<String>,
    /// More than one final state.
    pub double_final: Vec<String>,
}

impl Summary {
    pub fn of(tracks: &[Track]) -> Summary {
        let mut s = Summary {
            sent: tracks.len(),
            ..Summary::default()
        };
        for t in tracks {
            let id = format!("{}/{}", t.station, t.request_id);
            s.sends += u64::from(t.sends);
            if t.accepted {
                s.accepted += 1;
            }
            if t.refused.is_some() {
                s.refused += 1;
            }
            if let Some(st) = t.final_state() {
                *s.final_by_state.entry(st).or_default() += 1;
                if t.needs_attention {
                    s.resolved_after_attention += 1;
                }
            } else if t.needs_attention {
                s.needs_attention_open += 1;
            } else if t.accepted {
                s.lost.push(id.clone());
            }
            if !t.accepted && t.refused.is_none() {
                s.never_accepted.push(id.clone());
            }
            if t.final_states.len() > 1 {
                s.double_final.push(format!("{id}: {:?}", t.final_states));
            }
        }
        s
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "charges sent {} (commands published {}), accepted {}, refused {}",
            self.sent, self.sends, self.accepted, self.refused
        )?;
        writeln!(f, "final by state: {:?}", self.final_by_state)?;
        writeln!(
            f,
            "needs_attention (no final yet) {}, final after needs_attention {}",
            self.needs_attention_open, self.resolved_after_attention
        )?;
        write!(
            f,
            "lost {}, never accepted {}, more than one final state {}",
            self.lost.len(),
            self.never_accepted.len(),
            self.double_final.len()
        )
    }
}

/// One `agent/status` message as a watcher got it.
#[derive(Debug, Clone)]
pub struct StatusSeen {
    pub at: Instant,
    pub state: String,
    /// The payload's `since`, Unix ms (set when the agent process started its engine).
    pub since_ms: Option<i64>,
}

/// A client subscribed to `agent/status` that records every message, for "is the agent
/// (the new process) online yet" and recovery times.
pub struct StatusWatch {
    seen: Arc<Mutex<Vec<StatusSeen>>>,
    task: JoinHandle<()>,
}

impl StatusWatch {
    pub async fn start(port: u16, prefix: &str) -> StatusWatch {
        let mut station = MqttStation::connect(port, "status-watch", true).await;
        station.subscribe(&format!("{prefix}/agent/status")).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Some(m) = station.next_message(Duration::from_secs(3600)).await else {
                    continue;
                };
                let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                    continue;
                };
                let s = StatusSeen {
                    at: Instant::now(),
                    state: v["state"].as_str().unwrap_or_default().to_string(),
                    since_ms: v["since"].as_str().and_then(super::util::rfc3339_ms),
                };
                out.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            }
        });
        StatusWatch { seen, task }
    }

    pub fn seen(&self) -> Vec<StatusSeen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first `online` from a process started at or after `started_ms` (Unix ms).
    pub fn online_since(&self, started_ms: i64) -> Option<StatusSeen> {
        self.seen()
            .into_iter()
            .find(|s| s.state == "online" && s.since_ms.is_some_and(|m| m >= started_ms))
    }

    /// Waits for [`StatusWatch::online_since`]; None after `timeout`.
    pub async fn wait_online_since(
        &self,
        started_ms: i64,
        timeout: Duration,
    ) -> Option<StatusSeen> {
        let mut found = None;
        wait_until_async(timeout, || {
            found = self.online_since(started_ms);
            found.is_some()
        })
        .await;
        found
    }
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the simulator says about a crowd's charges.
#[derive(Debug, Default)]
pub struct SimCheck {
    /// `external_reference`s the simulator committed more than once.
    pub duplicated: Vec<String>,
    /// Payment intents committed in all.
    pub creates: usize,
    /// `approved` charges whose payment is not approved at the simulator for the amount,
    /// on the charge's terminal (with why).
    pub false_approvals: Vec<String>,
    /// Payments claimed by more than one `approved` charge.
    pub shared_payments: Vec<String>,
}

impl SimCheck {
    /// Reads the simulator's ledger, and looks up every approved charge's payment through
    /// the simulator's own payments API (`GET /v1/payments/{id}`).
    pub async fn of(sim: &pointgate::sim::SimHandle, tracks: &[Track]) -> SimCheck {
        let mut c = SimCheck {
            duplicated: sim.duplicated_references(),
            creates: sim.ledger().len(),
            ..SimCheck::default()
        };
        let client = sim_client(sim);
        let intents: HashMap<String, pointgate::sim::IntentView> = sim
            .intents()
            .into_iter()
            .map(|i| (i.id.clone(), i))
            .collect();
        let mut claimed: HashMap<String, String> = HashMap::new();
        for t in tracks {
            let Some(ev) = &t.final_event else { continue };
            if ev["state"] != "approved" {
                continue;
            }
            let id = format!("{}/{}", t.station, t.request_id);
            let Some(pid) = ev["payment"]["id"].as_str() else {
                c.false_approvals
                    .push(format!("{id}: no payment id in {ev}"));
                continue;
            };
            if let Some(other) = claimed.insert(pid.to_string(), id.clone()) {
                c.shared_payments.push(format!("{pid}: {other} and {id}"));
            }
            let url = format!("{}/v1/payments/{pid}", sim.base_url());
            let answer = client
                .get(&url)
                .bearer_auth(super::agent::TOKEN)
                .send()
                .await;
            let body: Value = match answer {
                Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
                Ok(r) => {
                    c.false_approvals
                        .push(format!("{id}: payment {pid}: HTTP {}", r.status()));
                    continue;
                }
                Err(e) => {
                    c.false_approvals.push(format!("{id}: payment {pid}: {e}"));
                    continue;
                }
            };
            let want = t.amount.parse::<f64>().unwrap_or(-1.0);
            let got = body["transaction_amount"].as_f64().unwrap_or(-2.0);
            if body["status"] != "approved" || (want - got).abs() > 0.001 {
                c.false_approvals.push(format!(
                    "{id}: payment {pid} is {} for {got}, charge is {want}",
                    body["status"]
                ));
            }
            // The payment was made by an intent on this charge's terminal for its amount,
            // and by the intent the events named, when they named one (a charge resolved
            // by a payment search after `needs_attention` may never have learned its id).
            let maker = intents
                .values()
                .find(|i| i.payment_id.as_deref() == Some(pid))
                .cloned();
            let named = t.intent_id();
            let want_cents = (want * 100.0).round() as u64;
            match &maker {
                Some(i)
                    if i.device_id == t.terminal
                        && i.amount == Some(want_cents)
                        && named.as_ref().is_none_or(|n| *n == i.id) => {}
                other => c.false_approvals.push(format!(
                    "{id}: payment {pid} not made on {} for {want_cents} by intent {named:?}: {other:?}",
                    t.terminal
                )),
            }
        }
        c
    }
}

impl std::fmt::Display for SimCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "simulator: creates {}, duplicated references {}, false approvals {}, payments claimed twice {}",
            self.creates,
            self.duplicated.len(),
            self.false_approvals.len(),
            self.shared_payments.len()
        )
    }
}

/// A reqwest client that trusts the simulator's CA.
pub fn sim_client(sim: &pointgate::sim::SimHandle) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(sim.ca_pem().as_bytes()) {
        roots
            .add(cert.expect("CA PEM parses"))
            .expect("CA accepted");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client builds")
}
