//! The charge engine: the pure state machine (`machine`) and the driver (this file)
//! that performs its effects.
//!
//! One task owns the store and every open request. It takes commands from the station
//! link, answers from the Point API and timers, and works in batches: it applies all
//! inputs that are ready, writes the changed requests and their events in one store
//! transaction, syncs once (group commit), and only then acknowledges commands (the link
//! PUBACKs them), hands events to the link, and lets API calls leave. So nothing is
//! promised, published or sent before it is durable.
//!
//! Per terminal one charge at a time holds the terminal (the API queues one intent per
//! device); later charges wait in arrival order and are told `waiting`/`terminal_busy`.
//! API calls go through one token bucket (`point.max_requests_per_second`).

mod operator;
pub mod port;
mod refunds;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::StationSection;
use crate::domain::command::CommandType;
use crate::domain::command::{
    self as validate, ChargeCmd, CommandBody, Context, Refusal, ValidCommand,
};
use crate::domain::ids::{derived_reference, derived_ticket, rfc3339};
use crate::domain::outcome::{
    AgentStatus, ErrorCode, ErrorInfo, Event, PaymentInfo, State, TerminalState,
};
use crate::domain::remote::Candidate;
use crate::failpoint;
use crate::machine::charge::{self as machine, Charge, Ctx, Effect, Emit, Input, Timing};
use crate::machine::refund;
use crate::money::Site;
use crate::point::{ApiError, CreateCharge, Device, Payment, PointBackend, RemoteCharge};
use crate::store::{self, Outgoing, Progress, ReplyTo, Request, Store, Writes};

/// The wall clock, injected so tests can drive time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        d.as_millis() as i64
    }
}

/// What the agent knows about the clock at start (contract: time rules).
#[derive(Debug, Clone, Default)]
pub struct TimeFacts {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), if readable.
    pub boot_id: Option<String>,
    /// The system clock is synchronised (NTP).
    pub synchronized: bool,
}

impl TimeFacts {
    /// Read them from the system: the boot id, and whether systemd-timesyncd (or
    /// `timedatectl`) says the clock is synchronised.
    pub fn read() -> TimeFacts {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let synchronized = std::path::Path::new("/run/systemd/timesync/synchronized").exists()
            || std::process::Command::new("timedatectl")
                .args(["show", "-p", "NTPSynchronized", "--value"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "yes");
        TimeFacts {
            boot_id,
            synchronized,
        }
    }
}

/// Why the clock cannot be trusted for charges not yet sent, if it cannot (contract:
/// "when in doubt, expire").
pub fn clock_doubt(
    facts: &TimeFacts,
    stored_boot: Option<&str>,
    stored_last_ms: Option<i64>,
    now_ms: i64,
) -> Option<&'static str> {
    if stored_last_ms.is_some_and(|last| now_ms < last) {
        return Some("the clock reads earlier than the store's latest record");
    }
    let rebooted = match (stored_boot, facts.boot_id.as_deref()) {
        (Some(old), Some(new)) => old != new,
        // A store from an earlier run, and no way to tell the boot: assume a reboot.
        (Some(_), None) => true,
        (None, _) => false,
    };
    if rebooted && !facts.synchronized {
        return Some("the machine rebooted and the clock is not synchronised");
    }
    None
}

/// What the engine needs from config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub site: Site,
    pub store_id: String,
    pub stations: BTreeMap<String, StationSection>,
    pub charge_ttl_ms: i64,
    pub refund_ttl_ms: i64,
    pub max_pending: usize,
    /// Final requests (and their ids and references) are forgotten after this.
    pub retention_ms: i64,
    pub timing: Timing,
    pub max_requests_per_second: u32,
    pub devices_refresh: Duration,
    pub backend: &'static str,
}

use crate::domain::outcome::Address;
pub use port::{channel, CommandProps, Dest, EngineHandle, LinkPublish, ToEngine, ToLink};

#[derive(Debug)]
enum Op {
    Create(CreateCharge),
    Poll(String),
    Payment(String),
    Search(String),
    List {
        from_ms: i64,
        /// The engine's clock when the listing was asked for: the last day to list.
        until_ms: i64,
        reference: String,
        terminal: String,
    },
    Cancel {
        terminal: String,
        intent_id: String,
    },
    Devices,
    Refund(refunds::RefundOp),
}

#[derive(Debug)]
struct ApiCall {
    key: Vec<u8>,
    op: Op,
}

#[derive(Debug)]
enum ApiAnswer {
    Create(Result<RemoteCharge, ApiError>),
    Poll(Result<RemoteCharge, ApiError>),
    Payment(Result<Payment, ApiError>),
    Search(Result<Vec<Payment>, ApiError>),
    List(Result<Option<Vec<Candidate>>, ApiError>),
    Cancel(Result<(), ApiError>),
    Devices(Result<Vec<Device>, ApiError>),
    Refund(refunds::RefundAnswer),
}

#[derive(Debug)]
struct ApiResult {
    key: Vec<u8>,
    answer: ApiAnswer,
}

/// The API's health as the status topic reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApiHealth {
    Ok,
    Unreachable,
    Unauthorized,
}

#[derive(Debug, Default)]
struct TermQueue {
    holder: Option<Vec<u8>>,
    waiting: VecDeque<Vec<u8>>,
    published: Option<(bool, Option<String>, u32, String)>,
}

impl TermQueue {
    /// `key` holds the terminal now: it is no longer among those waiting.
    fn take_turn(&mut self, key: &[u8]) {
        self.holder = Some(key.to_vec());
        self.waiting.retain(|k| k != key);
    }
}

/// The API request limit (`point.max_requests_per_second`) as a sliding window that
/// holds every request from the moment it leaves until a second after its answer came.
/// A request reaches Mercado Pago somewhere between those two instants, so however
/// connection set-up and latency vary, no 1-second window at Mercado Pago ever sees more
/// than `limit` requests (a token bucket that starts full allows twice that across an idle
/// edge; a window of launch times alone lets slow and fast requests bunch up on arrival).
struct TokenBucket {
    limit: usize,
    /// Requests that left and have not been answered.
    inflight: usize,
    /// When the answers of the last second came, oldest first.
    answered: VecDeque<i64>,
}

impl TokenBucket {
    const WINDOW_MS: i64 = 1_000;

    fn new(rate: u32) -> TokenBucket {
        TokenBucket {
            limit: rate.max(1) as usize,
            inflight: 0,
            answered: VecDeque::new(),
        }
    }

    fn purge(&mut self, now: i64) {
        while self
            .answered
            .front()
            .is_some_and(|t| *t <= now - Self::WINDOW_MS)
        {
            self.answered.pop_front();
        }
    }

    /// Requests in flight at once, whatever the limit: each needs a connection (a TLS
    /// handshake, a file descriptor), and a few kept-alive ones serve a store.
    const MAX_INFLIGHT: usize = 32;

    /// May a request leave now? If so it is counted.
    fn take(&mut self, now: i64) -> bool {
        self.purge(now);
        if self.inflight < Self::MAX_INFLIGHT && self.inflight + self.answered.len() < self.limit {
            self.inflight += 1;
            true
        } else {
            false
        }
    }

    /// A request that left was answered (or failed).
    fn answered(&mut self, now: i64) {
        self.inflight = self.inflight.saturating_sub(1);
        self.answered.push_back(now);
    }

    /// When the next request may leave, if no answer comes first (answers wake the
    /// engine anyway).
    fn next_at(&self) -> i64 {
        if self.inflight >= Self::MAX_INFLIGHT {
            // An answer wakes the engine.
            return i64::MAX;
        }
        if self.inflight + self.answered.len() < self.limit {
            return 0;
        }
        self.answered
            .front()
            .map_or(i64::MAX, |t| t + Self::WINDOW_MS + 1)
    }
}

/// Where a request's events go: its MQTT 5 Response Topic, else the station's `evt`.
fn address_of(r: &Request) -> Address {
    match &r.reply {
        Some(reply) => Address::Reply(reply.topic.clone()),
        None => Address::Station(r.station.clone()),
    }
}

impl LinkPublish {
    /// An outbox event, removed from the outbox on its PUBACK.
    fn event(id: u64, o: Outgoing) -> LinkPublish {
        LinkPublish {
            outbox_id: Some(id),
            dest: Dest::Event(o.address),
            payload: o.payload,
            correlation: o.correlation,
            retain: false,
        }
    }
}

pub struct Engine<B: PointBackend> {
    s: Settings,
    store: Store,
    backend: Arc<B>,
    clock: Arc<dyn Clock>,
    link: mpsc::UnboundedSender<ToLink>,
    api_tx: mpsc::UnboundedSender<ApiResult>,
    api_rx: mpsc::UnboundedReceiver<ApiResult>,
    active: HashMap<Vec<u8>, Request>,
    wakes: BTreeSet<(i64, Vec<u8>)>,
    wake_of: HashMap<Vec<u8>, i64>,
    terminals: BTreeMap<String, TermQueue>,
    /// target request key → the open cancel request's key.
    cancels: HashMap<Vec<u8>, Vec<u8>>,
    inflight: HashSet<Vec<u8>>,
    calls: Vec<ApiCall>,
    api_queue: VecDeque<ApiCall>,
    bucket: TokenBucket,
    devices: Option<HashMap<String, String>>,
    next_devices_ms: i64,
    health: ApiHealth,
    failing_since_ms: Option<i64>,
    /// A 429's `Retry-After`: no call leaves before this.
    paused_until_ms: i64,
    /// Terminals whose requests changed since their state was last published.
    touched_terminals: HashSet<String>,
    /// The latest clock reading, to notice the clock going backwards.
    last_now_ms: i64,
    next_prune_ms: i64,
    published_status: Option<AgentStatus>,
    since: String,
    // the batch under way
    writes: Writes,
    dirty: BTreeSet<Vec<u8>>,
    replies: Vec<oneshot::Sender<()>>,
    /// Requests admitted in this batch.
    created: Vec<Vec<u8>>,
    publishes: Vec<LinkPublish>,
    resync: bool,
}

impl<B: PointBackend> Engine<B> {
    pub fn new(
        s: Settings,
        store: Store,
        backend: Arc<B>,
        clock: Arc<dyn Clock>,
        link: mpsc::UnboundedSender<ToLink>,
    ) -> Engine<B> {
        let (api_tx, api_rx) = mpsc::unbounded_channel();
        let bucket = TokenBucket::new(s.max_requests_per_second);
        let now = clock.now_ms();
        Engine {
            s,
            store,
            backend,
            since: rfc3339(now),
            clock,
            link,
            api_tx,
            api_rx,
            active: HashMap::new(),
            wakes: BTreeSet::new(),
            wake_of: HashMap::new(),
            terminals: BTreeMap::new(),
            cancels: HashMap::new(),
            inflight: HashSet::new(),
            calls: Vec::new(),
            api_queue: VecDeque::new(),
            bucket,
            devices: None,
            next_devices_ms: 0,
            health: ApiHealth::Ok,
            failing_since_ms: None,
            paused_until_ms: 0,
            touched_terminals: HashSet::new(),
            last_now_ms: now,
            next_prune_ms: now,
            published_status: None,
            writes: Writes::default(),
            dirty: BTreeSet::new(),
            replies: Vec::new(),
            created: Vec::new(),
            publishes: Vec::new(),
            resync: false,
        }
    }

    fn ctx(&self, now: i64) -> Ctx {
        Ctx {
            now_ms: now,
            jitter: fastrand::f64(),
            timing: self.s.timing,
            idempotent_create: self.backend.idempotent_create(),
        }
    }

    /// Load every open request and resume it. Charges not yet sent are expired instead
    /// when the clock is in doubt (`clock_doubt`).
    pub fn recover(&mut self, facts: &TimeFacts) -> Result<usize, store::StoreError> {
        let now = self.clock.now_ms();
        let (boot, last) = self.store.last_run()?;
        let doubt = clock_doubt(facts, boot.as_deref(), last, now);
        if let Some(boot_id) = &facts.boot_id {
            self.store.set_boot_id(boot_id)?;
        }
        let n = self.load()?;
        if let Some(why) = doubt {
            tracing::warn!(why, "clock in doubt: charges not yet sent are expired");
            self.expire_unsent(now);
        }
        self.resume(now);
        self.commit();
        Ok(n)
    }

    /// Fill the in-memory view (open requests, terminal queues, cancels) from the store.
    fn load(&mut self) -> Result<usize, store::StoreError> {
        let open = self.store.open_requests()?;
        let order = self.store.queue_order()?;
        self.active.clear();
        self.terminals.clear();
        self.cancels.clear();
        self.wakes.clear();
        self.wake_of.clear();
        let n = open.len();
        for r in open {
            if let Progress::Cancel { target, .. } = &r.progress {
                self.cancels.insert(store::key(&r.station, target), r.key());
            }
            self.active.insert(r.key(), r);
        }
        // Per terminal, in arrival order (the store's queue index).
        for (terminal, key) in order {
            // Holding the terminal, waiting for it, or neither (a charge in
            // needs_attention without an intent: it must not block those behind it).
            let (holds, waits) = match self.active.get(&key).map(|r| &r.progress) {
                Some(Progress::Charge(ch)) => (
                    ch.holds_terminal(),
                    matches!(ch.stage, machine::Stage::Queued { .. }),
                ),
                Some(Progress::Refund(rf)) => (
                    rf.holds_terminal(),
                    matches!(rf.stage, refund::Stage::Queued),
                ),
                _ => continue,
            };
            let q = self.terminals.entry(terminal).or_default();
            if holds {
                q.holder = Some(key);
            } else if waits {
                q.waiting.push_back(key);
            }
        }
        Ok(n)
    }

    /// Expire every charge not yet sent (the clock cannot be trusted).
    fn expire_unsent(&mut self, now: i64) {
        let keys: Vec<Vec<u8>> = self.active.keys().cloned().collect();
        for k in keys {
            self.apply(&k, Input::ClockInDoubt, now);
        }
    }

    /// Tell every loaded charge that the agent restarted, and settle cancels whose
    /// target ended while it was down.
    fn resume(&mut self, now: i64) {
        let keys: Vec<Vec<u8>> = self.active.keys().cloned().collect();
        for k in &keys {
            if matches!(
                self.active.get(k).map(|r| &r.progress),
                Some(Progress::Charge(_) | Progress::Refund(_))
            ) {
                self.apply(k, Input::Restarted, now);
            }
        }
        let cancels: Vec<(Vec<u8>, Vec<u8>)> = self
            .cancels
            .iter()
            .map(|(t, c)| (t.clone(), c.clone()))
            .collect();
        for (target, cancel) in cancels {
            if !self.active.contains_key(&target) {
                self.cancels.remove(&target);
                self.finish_cancel(
                    &cancel,
                    Err((ErrorCode::NotCancelable, "the charge ended first".into())),
                    now,
                );
            }
        }
    }

    /// The engine task.
    pub async fn run(mut self, mut rx: mpsc::Receiver<ToEngine>, shutdown: CancellationToken) {
        self.schedule_terminals(self.clock.now_ms());
        self.commit();
        self.publish_status(true);
        self.flush_link();
        loop {
            let now = self.clock.now_ms();
            let next = self.next_wake(now);
            let sleep =
                tokio::time::sleep(Duration::from_millis((next - now).clamp(0, 60_000) as u64));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    self.on_message(m);
                    let mut n = 0;
                    while n < 512 {
                        match rx.try_recv() {
                            Ok(m) => self.on_message(m),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                }
                r = self.api_rx.recv() => {
                    if let Some(r) = r {
                        self.on_api(r);
                        while let Ok(r) = self.api_rx.try_recv() {
                            self.on_api(r);
                        }
                    }
                }
                _ = sleep => {}
            }
            let now = self.clock.now_ms();
            if now + 1_000 < self.last_now_ms {
                tracing::warn!(
                    back_ms = self.last_now_ms - now,
                    "the clock went backwards: charges not yet sent are expired"
                );
                self.expire_unsent(now);
            }
            self.last_now_ms = self.last_now_ms.max(now);
            self.maybe_prune(now);
            self.wake_due(now);
            self.schedule_terminals(now);
            self.maybe_refresh_devices(now);
            self.commit();
            self.publish_status(false);
            self.publish_terminals();
            self.flush_link();
            self.launch(now);
        }
        // Make everything durable before returning.
        self.commit();
        if let Err(e) = self.store.sync() {
            tracing::error!(error = %e, "final store sync failed");
        }
    }

    fn next_wake(&self, now: i64) -> i64 {
        let mut next = now + 1_000;
        if let Some((at, _)) = self.wakes.iter().next() {
            next = next.min(*at);
        }
        if self
            .api_queue
            .iter()
            .any(|c| c.key.is_empty() || !self.inflight.contains(&c.key))
        {
            next = next.min(self.bucket.next_at().max(self.paused_until_ms));
        }
        next.min(self.next_devices_ms.max(now))
    }

    // ---------------------------------------------------------------- inputs

    fn on_message(&mut self, m: ToEngine) {
        let now = self.clock.now_ms();
        match m {
            ToEngine::Command {
                station,
                payload,
                props,
                done,
            } => {
                self.on_command(&station, &payload, props, now);
                self.replies.push(done);
            }
            ToEngine::Published { outbox_id } => {
                if let Err(e) = self.store.outbox_remove(outbox_id) {
                    tracing::warn!(error = %e, outbox_id, "could not remove an acknowledged event");
                }
            }
            ToEngine::Connected { session_present } => {
                tracing::info!(
                    session_present,
                    "station link connected; resending the outbox"
                );
                self.resync = true;
                self.published_status = None;
                for q in self.terminals.values_mut() {
                    q.published = None;
                }
                if !session_present {
                    self.republish_recent(now);
                }
            }
            ToEngine::Control { request, reply } => self.on_control(request, reply),
            ToEngine::Reload { stations } => self.on_reload(stations),
            ToEngine::Ping(reply) => {
                let _ = reply.send(());
            }
        }
    }

    /// After a session loss: the latest event of every open request and of every request
    /// that ended in the last hour goes out again.
    fn republish_recent(&mut self, now: i64) {
        let mut reqs: Vec<Request> = self.active.values().cloned().collect();
        match self.store.recent_final(now - 3_600_000) {
            Ok(mut r) => reqs.append(&mut r),
            Err(e) => tracing::error!(error = %e, "could not read recent requests to republish"),
        }
        reqs.sort_by_key(|r| r.received_ms);
        for r in reqs {
            if !r.last_event.is_empty() {
                let out = Outgoing {
                    address: address_of(&r),
                    payload: r.last_event.clone(),
                    correlation: r.reply.as_ref().and_then(|x| x.correlation.clone()),
                };
                let id = self.store.next_outbox_id();
                self.writes.outbox.push((id, out));
            }
        }
    }

    fn refuse(
        &mut self,
        station: &str,
        props: &CommandProps,
        refusal: Refusal,
        current: Option<Event>,
        now: i64,
    ) {
        tracing::info!(station, request_id = ?refusal.request_id, code = ?refusal.code, message = %refusal.message, "command refused");
        let mut ev = Event::new(
            refusal.request_id.clone(),
            refusal.kind,
            State::Refused,
            0,
            rfc3339(now),
        );
        ev.error = Some(ErrorInfo {
            code: refusal.code,
            message: refusal.message,
        });
        ev.current = current.map(Box::new);
        let address = Self::reply_address(station, props);
        self.push_outbox(address, ev.to_json(), props.correlation.clone());
    }

    fn answer(&mut self, station: &str, props: &CommandProps, ev: Event) {
        let address = Self::reply_address(station, props);
        self.push_outbox(address, ev.to_json(), props.correlation.clone());
    }

    /// Where the answer to a command goes: its Response Topic if the link allowed it,
    /// else the station's event topic.
    fn reply_address(station: &str, props: &CommandProps) -> Address {
        match Self::reply_topic(props) {
            Some(t) => Address::Reply(t),
            None => Address::Station(station.to_string()),
        }
    }

    /// The Response Topic of an MQTT 5 command, if it is an allowed one.
    fn reply_topic(props: &CommandProps) -> Option<String> {
        props
            .response_topic
            .as_ref()
            .filter(|_| props.response_topic_allowed)
            .cloned()
    }

    fn push_outbox(&mut self, address: Address, payload: Vec<u8>, correlation: Option<Vec<u8>>) {
        let id = self.store.next_outbox_id();
        self.writes.outbox.push((
            id,
            Outgoing {
                address,
                payload,
                correlation,
            },
        ));
    }

    fn on_command(&mut self, station: &str, payload: &[u8], props: CommandProps, now: i64) {
        let listed: Option<HashSet<String>> =
            self.devices.as_ref().map(|d| d.keys().cloned().collect());
        let ctx = Context {
            site: self.s.site,
            station,
            stations: &self.s.stations,
            listed_terminals: listed.as_ref(),
            refund_ttl_max_s: (self.s.refund_ttl_ms / 1000) as u64,
        };
        let cmd = match validate::validate(payload, &ctx) {
            Ok(c) => c,
            Err(r) => return self.refuse(station, &props, r, None, now),
        };
        let kind = cmd.body.kind();
        let refusal = |code: ErrorCode, message: String| Refusal {
            request_id: Some(cmd.request_id.clone()),
            kind: Some(kind),
            code,
            message,
        };
        if let Some(rt) = &props.response_topic {
            if !props.response_topic_allowed {
                let r = refusal(
                    ErrorCode::BadField,
                    format!("response topic `{rt}` is not under this station's own topics"),
                );
                let props = CommandProps {
                    response_topic: None,
                    ..props
                };
                return self.refuse(station, &props, r, None, now);
            }
        }
        match &cmd.body {
            CommandBody::Query { target } => {
                match self.lookup(station, target) {
                    Some(t) => {
                        let mut ev = Event::new(
                            Some(cmd.request_id.clone()),
                            Some(kind),
                            State::Answered,
                            0,
                            rfc3339(now),
                        );
                        ev.target = serde_json::from_slice(&t.last_event).ok().map(Box::new);
                        self.answer(station, &props, ev);
                    }
                    None => {
                        let r = refusal(
                            ErrorCode::UnknownTarget,
                            format!("no request `{target}` of this station"),
                        );
                        self.refuse(station, &props, r, None, now);
                    }
                }
                return;
            }
            CommandBody::Terminals => {
                let mut ev = Event::new(
                    Some(cmd.request_id.clone()),
                    Some(kind),
                    State::Answered,
                    0,
                    rfc3339(now),
                );
                let bound = self
                    .s
                    .stations
                    .get(station)
                    .map(|s| s.terminals.clone())
                    .unwrap_or_default();
                ev.terminals = Some(bound.iter().map(|t| self.terminal_state(t)).collect());
                self.answer(station, &props, ev);
                return;
            }
            _ => {}
        }
        // A repeat of a remembered request id? (the dedup index; open ones in memory)
        let key = store::key(station, &cmd.request_id);
        let seen = match self.active.get(&key) {
            Some(r) => Some(store::content_hash(&r.body)),
            None => match self.store.dedup(station, &cmd.request_id) {
                Ok(d) => d.map(|d| d.hash),
                Err(e) => {
                    tracing::error!(error = %e, "store read failed");
                    let r = refusal(
                        ErrorCode::StorageUnavailable,
                        "the agent's store cannot be read; nothing was accepted".into(),
                    );
                    return self.refuse(station, &props, r, None, now);
                }
            },
        };
        if let (Some(hash), Some(existing)) = (seen, self.lookup(station, &cmd.request_id)) {
            if hash == store::content_hash(&cmd.body) {
                let out = Outgoing {
                    address: address_of(&existing),
                    payload: existing.last_event.clone(),
                    correlation: existing.reply.as_ref().and_then(|r| r.correlation.clone()),
                };
                let id = self.store.next_outbox_id();
                self.writes.outbox.push((id, out));
            } else {
                let current = serde_json::from_slice(&existing.last_event).ok();
                let r = refusal(
                    ErrorCode::Conflict,
                    format!(
                        "request_id `{}` was already used for another command",
                        cmd.request_id
                    ),
                );
                self.refuse(station, &props, r, current, now);
            }
            return;
        }
        let pending = self.active.len();
        if pending >= self.s.max_pending {
            let r = refusal(
                ErrorCode::QueueFull,
                format!("{pending} requests are pending; try again later"),
            );
            return self.refuse(station, &props, r, None, now);
        }
        match cmd.body.clone() {
            CommandBody::Charge(c) => self.accept_charge(station, &cmd, c, props, now),
            CommandBody::Cancel { target } => {
                self.accept_cancel(station, &cmd, &target, props, now)
            }
            CommandBody::Refund(r) => self.accept_refund(station, &cmd, r, props, now),
            CommandBody::Query { .. } | CommandBody::Terminals => {}
        }
    }

    /// Take a command in as a stored request: it becomes active, is told `accepted`, and
    /// counts as new in this batch (refused `storage_unavailable` if the batch cannot be
    /// made durable). Returns its key.
    fn admit(
        &mut self,
        station: &str,
        cmd: &ValidCommand,
        props: &CommandProps,
        external_reference: Option<String>,
        progress: Progress,
        now: i64,
    ) -> Vec<u8> {
        let req = Request {
            station: station.to_string(),
            request_id: cmd.request_id.clone(),
            body: cmd.body.clone(),
            received_ms: now,
            reply: Self::reply_topic(props).map(|topic| ReplyTo {
                topic,
                correlation: props.correlation.clone(),
            }),
            external_reference,
            progress,
            seq: 0,
            last_event: Vec::new(),
            final_ms: None,
        };
        let key = req.key();
        self.active.insert(key.clone(), req);
        self.created.push(key.clone());
        self.emit(&key, Emit::state(State::Accepted), now);
        key
    }

    /// A request of this station, open or stored.
    fn lookup(&self, station: &str, request_id: &str) -> Option<Request> {
        let key = store::key(station, request_id);
        if let Some(r) = self.active.get(&key) {
            return Some(r.clone());
        }
        match self.store.get(station, request_id) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "store read failed");
                None
            }
        }
    }

    fn accept_charge(
        &mut self,
        station: &str,
        cmd: &ValidCommand,
        c: ChargeCmd,
        props: CommandProps,
        now: i64,
    ) {
        let refusal = |code: ErrorCode, message: String| Refusal {
            request_id: Some(cmd.request_id.clone()),
            kind: Some(CommandType::Charge),
            code,
            message,
        };
        if let Some(devices) = &self.devices {
            match devices.get(&c.terminal) {
                Some(mode) if mode.eq_ignore_ascii_case("STANDALONE") => {
                    let r = refusal(
                        ErrorCode::TerminalUnavailable,
                        format!(
                            "terminal `{}` is in STANDALONE mode; switch it to PDV",
                            c.terminal
                        ),
                    );
                    return self.refuse(station, &props, r, None, now);
                }
                Some(_) => {}
                None => {
                    let r = refusal(
                        ErrorCode::TerminalUnavailable,
                        format!("terminal `{}` is not among the devices Mercado Pago lists for this account", c.terminal),
                    );
                    return self.refuse(station, &props, r, None, now);
                }
            }
        }
        let ext_ref = c
            .external_reference
            .clone()
            .unwrap_or_else(|| derived_reference(&self.s.store_id, station, &cmd.request_id));
        let key = store::key(station, &cmd.request_id);
        let owner = self
            .writes
            .refs
            .iter()
            .find(|(r, _)| *r == ext_ref)
            .map(|(_, k)| k.clone());
        let owner = match owner {
            Some(o) => Some(o),
            None => self.store.ref_owner(&ext_ref).unwrap_or(None),
        };
        if owner.is_some_and(|o| o != key) {
            let r = refusal(
                ErrorCode::DuplicateReference,
                format!("external_reference `{ext_ref}` belongs to another request"),
            );
            return self.refuse(station, &props, r, None, now);
        }
        let ttl_ms = c
            .ttl_s
            .map(|s| s as i64 * 1000)
            .unwrap_or(self.s.charge_ttl_ms);
        let mut deadline = now + ttl_ms;
        if let Some(e) = c.expires_at_ms {
            deadline = deadline.min(e);
        }
        if let Some(x) = props.message_expiry_s {
            deadline = deadline.min(now + x as i64 * 1000);
        }
        let terminal = c.terminal.clone();
        let charge = Charge::new(c.amount, deadline);
        tracing::info!(station, request_id = %cmd.request_id, terminal = %terminal, amount = %c.amount.to_decimal(), "charge accepted");
        self.writes.refs.push((ext_ref.clone(), key.clone()));
        self.admit(
            station,
            cmd,
            &props,
            Some(ext_ref),
            Progress::Charge(charge),
            now,
        );
        self.terminals
            .entry(terminal)
            .or_default()
            .waiting
            .push_back(key.clone());
        self.set_wake(&key);
    }

    fn accept_cancel(
        &mut self,
        station: &str,
        cmd: &ValidCommand,
        target: &str,
        props: CommandProps,
        now: i64,
    ) {
        let refusal = |code: ErrorCode, message: String| Refusal {
            request_id: Some(cmd.request_id.clone()),
            kind: Some(CommandType::Cancel),
            code,
            message,
        };
        let tkey = store::key(station, target);
        let Some(t) = self.lookup(station, target) else {
            let r = refusal(
                ErrorCode::UnknownTarget,
                format!("no request `{target}` of this station"),
            );
            return self.refuse(station, &props, r, None, now);
        };
        if matches!(t.progress, Progress::Refund(_)) {
            return self.accept_refund_cancel(station, cmd, &t, props, now);
        }
        let Progress::Charge(ch) = &t.progress else {
            let r = refusal(
                ErrorCode::UnknownTarget,
                format!("request `{target}` is not a charge"),
            );
            return self.refuse(station, &props, r, None, now);
        };
        use machine::{Remote, Stage};
        let known = match &ch.stage {
            Stage::Done { .. } => Some("the charge is already final"),
            Stage::Live {
                remote: Remote::OnTerminal | Remote::Processing,
                ..
            }
            | Stage::Confirming { .. } => {
                Some("the charge is already on the terminal: cancel it there")
            }
            Stage::NeedsAttention { .. } => {
                Some("the outcome of this charge is not known yet: staff must check the terminal")
            }
            _ if self.cancels.contains_key(&tkey) => {
                Some("a cancel of this charge is already under way")
            }
            _ => None,
        };
        if let Some(why) = known {
            let r = refusal(ErrorCode::NotCancelable, why.into());
            return self.refuse(station, &props, r, None, now);
        }
        let key = store::key(station, &cmd.request_id);
        let progress = Progress::Cancel {
            target: target.to_string(),
            done: false,
        };
        self.admit(station, cmd, &props, None, progress, now);
        self.cancels.insert(tkey.clone(), key);
        self.apply(&tkey, Input::CancelRequested, now);
    }

    fn finish_cancel(
        &mut self,
        cancel_key: &[u8],
        result: Result<(), (ErrorCode, String)>,
        now: i64,
    ) {
        let emit = match result {
            Ok(()) => Emit::state(State::Done),
            Err((code, message)) => Emit {
                state: State::Failed,
                reason: None,
                error: Some((code, message)),
                resolved_by: None,
            },
        };
        if let Some(r) = self.active.get_mut(cancel_key) {
            if let Progress::Cancel { done, .. } = &mut r.progress {
                *done = true;
            }
        }
        self.emit(cancel_key, emit, now);
    }

    fn on_api(&mut self, r: ApiResult) {
        let now = self.clock.now_ms();
        self.bucket.answered(now);
        self.inflight.remove(&r.key);
        let ok = match &r.answer {
            ApiAnswer::Create(x) | ApiAnswer::Poll(x) => x.as_ref().err().cloned(),
            ApiAnswer::Payment(x) => x.as_ref().err().cloned(),
            ApiAnswer::Search(x) => x.as_ref().err().cloned(),
            ApiAnswer::List(x) => x.as_ref().err().cloned(),
            ApiAnswer::Cancel(x) => x.as_ref().err().cloned(),
            ApiAnswer::Devices(x) => x.as_ref().err().cloned(),
            ApiAnswer::Refund(x) => x.error().cloned(),
        };
        self.note_health(ok.as_ref(), now);
        if let Some(ra) = ok
            .as_ref()
            .filter(|e| e.status() == Some(429))
            .and_then(|e| e.retry_after())
        {
            // Mercado Pago asked everyone to wait, not just this request.
            self.paused_until_ms = self.paused_until_ms.max(now + ra.as_millis() as i64);
        }
        let input = match r.answer {
            ApiAnswer::Devices(res) => {
                match res {
                    Ok(list) => {
                        let map: HashMap<String, String> = list
                            .into_iter()
                            .map(|d| (d.id, d.operating_mode.unwrap_or_else(|| "UNKNOWN".into())))
                            .collect();
                        tracing::info!(devices = map.len(), "device list refreshed");
                        self.devices = Some(map);
                        for q in self.terminals.values_mut() {
                            q.published = None;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "device listing failed"),
                }
                return;
            }
            ApiAnswer::Create(res) => {
                if let Err(e) = &res {
                    tracing::warn!(error = %e, "create failed");
                }
                Input::CreateDone(res.map_err(|e| self.backend.failure(&e, true)))
            }
            ApiAnswer::Poll(res) => {
                Input::PollDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            ApiAnswer::Payment(res) => {
                Input::PaymentDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            ApiAnswer::Search(res) => {
                Input::SearchDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            ApiAnswer::List(res) => {
                match &res {
                    Ok(Some(c)) => tracing::info!(candidates = c.len(), "reconcile listed"),
                    Ok(None) => tracing::warn!("reconcile: the intent list is not served"),
                    Err(e) => tracing::warn!(error = %e, "reconcile listing failed"),
                }
                Input::ListDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            ApiAnswer::Cancel(res) => {
                Input::CancelDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            ApiAnswer::Refund(a) => return self.on_refund_answer(&r.key, a, now),
        };
        self.apply(&r.key, input, now);
    }

    fn note_health(&mut self, err: Option<&ApiError>, now: i64) {
        match err {
            None => {
                self.health = ApiHealth::Ok;
                if self.failing_since_ms.take().is_some() {
                    self.api_back(now);
                }
            }
            Some(e) if e.is_unauthorized() || matches!(e, ApiError::Token(_)) => {
                self.health = ApiHealth::Unauthorized
            }
            Some(e) if e.is_unreachable() => {
                let since = *self.failing_since_ms.get_or_insert(now);
                if now - since > 10_000 {
                    self.health = ApiHealth::Unreachable;
                }
            }
            Some(_) => {}
        }
    }

    /// The API answered again after failing: what waits out a backoff (up to 30 s) goes
    /// again within the next 2 s instead, spread at random; the request limit (and a
    /// 429's pause) still paces them, so there is no storm, and a customer is not kept
    /// waiting by a backoff that outlived the outage.
    fn api_back(&mut self, now: i64) {
        let keys: Vec<Vec<u8>> = self.active.keys().cloned().collect();
        for k in keys {
            let at = now + fastrand::i64(0..2_000);
            let hurried = match self.active.get_mut(&k).map(|r| &mut r.progress) {
                Some(Progress::Charge(ch)) => ch.hurry(at),
                Some(Progress::Refund(rf)) => rf.hurry(at),
                _ => false,
            };
            if hurried {
                self.dirty.insert(k.clone());
                self.set_wake(&k);
            }
        }
    }

    fn wake_due(&mut self, now: i64) {
        let due: Vec<Vec<u8>> = self
            .wakes
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, k)| k.clone())
            .collect();
        for k in due {
            self.apply(&k, Input::Wake, now);
        }
    }

    fn schedule_terminals(&mut self, now: i64) {
        // Only terminals with someone waiting have anything to schedule.
        let names: Vec<String> = self
            .terminals
            .iter()
            .filter(|(_, q)| !q.waiting.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            // Drop entries that ended while waiting (expired, canceled).
            if let Some(q) = self.terminals.get_mut(&name) {
                let active = &self.active;
                q.waiting.retain(|k| active.contains_key(k));
                if q.holder.as_ref().is_some_and(|h| !active.contains_key(h)) {
                    q.holder = None;
                }
            }
            let (holder, waiting) = match self.terminals.get(&name) {
                Some(q) => (q.holder.clone(), q.waiting.clone()),
                None => continue,
            };
            let mut busy = holder.is_some();
            for k in waiting {
                if self.inflight.contains(&k) {
                    busy = true;
                    continue;
                }
                if busy {
                    self.apply(&k, Input::TerminalBusy, now);
                    continue;
                }
                self.apply(&k, Input::MayStart, now);
                busy = true;
            }
        }
    }

    /// Apply one input to a charge, then act on its effects.
    fn apply(&mut self, key: &[u8], input: Input, now: i64) {
        if let Some(Progress::Refund(_)) = self.active.get(key).map(|r| &r.progress) {
            return self.apply_to_refund(key, input, now);
        }
        let ctx = self.ctx(now);
        let Some(req) = self.active.get_mut(key) else {
            return;
        };
        let Progress::Charge(ch) = &mut req.progress else {
            return;
        };
        let before = ch.clone();
        let fx = ch.step(input, &ctx);
        if *ch != before {
            self.dirty.insert(key.to_vec());
        }
        for e in fx {
            self.effect(key, e, now);
        }
        self.set_wake(key);
    }

    fn effect(&mut self, key: &[u8], e: Effect, now: i64) {
        let Some(req) = self.active.get(key) else {
            return;
        };
        let CommandBody::Charge(c) = &req.body else {
            return;
        };
        let terminal = c.terminal.clone();
        match e {
            Effect::Emit(em) => self.emit(key, em, now),
            Effect::Create => {
                let site = self.s.site;
                let create = CreateCharge {
                    terminal: terminal.clone(),
                    amount: c.amount,
                    external_reference: req.external_reference.clone().unwrap_or_default(),
                    description: c.description.clone(),
                    ticket_number: site.allows_ticket_number().then(|| {
                        c.ticket_number
                            .clone()
                            .unwrap_or_else(|| derived_ticket(&req.request_id))
                    }),
                    print_on_terminal: c.print_on_terminal,
                    payment: c.payment.clone(),
                    idempotency_key: None,
                };
                self.terminals.entry(terminal).or_default().take_turn(key);
                self.dirty.insert(key.to_vec());
                self.calls.push(ApiCall {
                    key: key.to_vec(),
                    op: Op::Create(create),
                });
            }
            Effect::Poll { intent_id } => self.calls.push(ApiCall {
                key: key.to_vec(),
                op: Op::Poll(intent_id),
            }),
            Effect::LookupPayment { payment_id } => self.calls.push(ApiCall {
                key: key.to_vec(),
                op: Op::Payment(payment_id),
            }),
            Effect::SearchPayments => {
                let r = req.external_reference.clone().unwrap_or_default();
                self.calls.push(ApiCall {
                    key: key.to_vec(),
                    op: Op::Search(r),
                })
            }
            Effect::ListIntents { from_ms } => {
                let reference = req.external_reference.clone().unwrap_or_default();
                self.calls.push(ApiCall {
                    key: key.to_vec(),
                    op: Op::List {
                        from_ms,
                        until_ms: now,
                        reference,
                        terminal,
                    },
                })
            }
            Effect::CancelRemote { intent_id } => self.calls.push(ApiCall {
                key: key.to_vec(),
                op: Op::Cancel {
                    terminal,
                    intent_id,
                },
            }),
            Effect::ReleaseTerminal => {
                if let Some(q) = self.terminals.get_mut(&terminal) {
                    if q.holder.as_deref() == Some(key) {
                        q.holder = None;
                    }
                    q.waiting.retain(|k| k != key);
                    // A charge sent back to the queue after a failure keeps its place; one
                    // that left the queue for good (final, needs_attention) does not
                    // block those behind it.
                    if let Some(Progress::Charge(ch)) = self.active.get(key).map(|r| &r.progress) {
                        if matches!(ch.stage, machine::Stage::Queued { .. }) {
                            q.waiting.push_front(key.to_vec());
                        }
                    }
                }
            }
            Effect::CancelAnswer(result) => {
                if let Some(ck) = self.cancels.remove(key) {
                    self.finish_cancel(&ck, result, now);
                }
            }
        }
    }

    /// Record an event for a stored request: next seq, last event, outbox.
    fn emit(&mut self, key: &[u8], em: Emit, now: i64) {
        let Some(req) = self.active.get_mut(key) else {
            return;
        };
        req.seq += 1;
        let mut ev = Event::new(
            Some(req.request_id.clone()),
            Some(req.body.kind()),
            em.state,
            req.seq,
            rfc3339(now),
        );
        if let CommandBody::Charge(c) = &req.body {
            ev.terminal = Some(c.terminal.clone());
            ev.amount = Some(c.amount.to_decimal());
        }
        if let Progress::Charge(ch) = &req.progress {
            ev.intent_id = ch.intent_id().map(str::to_string);
            if em.state.is_final() || em.state == State::NeedsAttention {
                ev.payment = ch.payment.as_ref().map(|p| PaymentInfo {
                    id: p.id.clone(),
                    status: p.status.clone(),
                    status_detail: p.status_detail.clone(),
                });
            }
        }
        if let Progress::Refund(rf) = &req.progress {
            rf.decorate(&mut ev);
        }
        ev.reason = em.reason;
        ev.error = em.error.map(|(code, message)| ErrorInfo { code, message });
        ev.resolved_by = em.resolved_by;
        let payload = ev.to_json();
        req.last_event = payload.clone();
        if em.state.is_final() {
            req.final_ms = Some(now);
        }
        tracing::info!(
            station = %req.station,
            request_id = %req.request_id,
            terminal = ev.terminal.as_deref().unwrap_or(""),
            intent_id = ev.intent_id.as_deref().unwrap_or(""),
            state = em.state.as_str(),
            seq = req.seq,
            "event"
        );
        let address = address_of(req);
        let correlation = req.reply.as_ref().and_then(|r| r.correlation.clone());
        self.dirty.insert(key.to_vec());
        self.push_outbox(address, payload, correlation);
    }

    fn set_wake(&mut self, key: &[u8]) {
        if let Some(old) = self.wake_of.remove(key) {
            self.wakes.remove(&(old, key.to_vec()));
        }
        let at = match self.active.get(key).map(|r| &r.progress) {
            Some(Progress::Charge(ch)) => ch.next_at_ms,
            Some(Progress::Refund(rf)) => rf.next_at_ms,
            _ => None,
        };
        if let Some(at) = at {
            self.wakes.insert((at, key.to_vec()));
            self.wake_of.insert(key.to_vec(), at);
        }
    }

    fn maybe_refresh_devices(&mut self, now: i64) {
        if now >= self.next_devices_ms {
            self.next_devices_ms = now + self.s.devices_refresh.as_millis() as i64;
            self.calls.push(ApiCall {
                key: Vec::new(),
                op: Op::Devices,
            });
        }
    }

    // ---------------------------------------------------------------- outputs

    /// Write the batch, sync once, then acknowledge and publish.
    fn commit(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for k in &dirty {
            if let Some(t) = self.active.get(k).and_then(store::terminal_of) {
                self.touched_terminals.insert(t.to_string());
            }
        }
        for k in &dirty {
            if let Some(r) = self.active.get(k) {
                self.writes.requests.push(r.clone());
            }
        }
        let mut writes = std::mem::take(&mut self.writes);
        writes.now_ms = Some(self.clock.now_ms());
        if !self.replies.is_empty() {
            failpoint::hit(failpoint::COMMAND_BEFORE_STORE);
        }
        if !writes.is_empty() {
            // Requests this batch creates (accepted just now): refused if it fails.
            let new = std::mem::take(&mut self.created);
            let res = self.store.write(&writes).and_then(|_| self.store.sync());
            if let Err(e) = res {
                tracing::error!(error = %e, "store write failed; the batch's new commands are refused storage_unavailable");
                self.storage_failed(&new);
                return;
            }
            if dirty
                .iter()
                .any(|k| self.active.get(k).is_some_and(|r| r.is_final()))
            {
                failpoint::hit(failpoint::FINAL_BEFORE_PUBLISH);
            }
            for (id, o) in writes.outbox {
                self.publishes.push(LinkPublish::event(id, o));
            }
        }
        if !self.replies.is_empty() {
            failpoint::hit(failpoint::STORED_BEFORE_ACK);
        }
        for k in &dirty {
            if self.active.get(k).is_some_and(|r| r.is_final()) {
                self.active.remove(k);
                if let Some(at) = self.wake_of.remove(k) {
                    self.wakes.remove(&(at, k.clone()));
                }
            }
        }
        for done in self.replies.drain(..) {
            let _ = done.send(());
        }
        self.api_queue.extend(self.calls.drain(..));
    }

    /// A batch could not be made durable: its new commands are refused
    /// `storage_unavailable` (published without the outbox, which cannot be written) and
    /// acknowledged, nothing of it is sent to the API, and the in-memory view goes back
    /// to what the store holds.
    fn storage_failed(&mut self, new: &[Vec<u8>]) {
        let now = self.clock.now_ms();
        self.calls.clear();
        for k in new {
            let Some(r) = self.active.get(k) else {
                continue;
            };
            let mut ev = Event::new(
                Some(r.request_id.clone()),
                Some(r.body.kind()),
                State::Refused,
                0,
                rfc3339(now),
            );
            ev.error = Some(ErrorInfo {
                code: ErrorCode::StorageUnavailable,
                message: "the agent cannot write its store (disk full or failing); nothing was accepted: try again later".into(),
            });
            self.publishes.push(LinkPublish {
                outbox_id: None,
                dest: Dest::Event(address_of(r)),
                payload: ev.to_json(),
                correlation: r.reply.as_ref().and_then(|x| x.correlation.clone()),
                retain: false,
            });
            // Whatever of it reached sled's memory must not come back at the next start.
            if let Err(e) = self.store.forget(r) {
                tracing::error!(error = %e, "could not forget a refused request");
            }
        }
        for done in self.replies.drain(..) {
            let _ = done.send(());
        }
        match self.load() {
            Ok(_) => self.resume(now),
            Err(e) => tracing::error!(error = %e, "store read failed after a failed write"),
        }
    }

    /// Forget final requests older than `queue.retention`, a bounded number per pass.
    fn maybe_prune(&mut self, now: i64) {
        if now < self.next_prune_ms {
            return;
        }
        const PER_PASS: usize = 2_000;
        match self.store.prune(now - self.s.retention_ms, PER_PASS) {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(pruned = n, "requests past retention forgotten");
                    if let Err(e) = self.store.sync() {
                        tracing::error!(error = %e, "store sync after pruning failed");
                    }
                }
                // More left: come back soon; else in an hour.
                self.next_prune_ms = now + if n == PER_PASS { 1_000 } else { 3_600_000 };
            }
            Err(e) => {
                tracing::error!(error = %e, "pruning failed");
                self.next_prune_ms = now + 60_000;
            }
        }
    }

    fn flush_link(&mut self) {
        if std::mem::take(&mut self.resync) {
            let _ = self.link.send(ToLink::Resync);
            match self.store.outbox() {
                Ok(all) => {
                    for (id, o) in all {
                        let _ = self.link.send(ToLink::Publish(LinkPublish::event(id, o)));
                    }
                }
                Err(e) => tracing::error!(error = %e, "could not read the outbox"),
            }
            self.publishes.clear();
            self.publish_status(true);
            self.publish_terminals();
        }
        for p in self.publishes.drain(..) {
            let _ = self.link.send(ToLink::Publish(p));
        }
    }

    /// Let queued API calls leave, within the rate limit and one at a time per request.
    fn launch(&mut self, now: i64) {
        if now < self.paused_until_ms {
            return;
        }
        let mut held = VecDeque::new();
        while let Some(call) = self.api_queue.pop_front() {
            if !call.key.is_empty() && self.inflight.contains(&call.key) {
                held.push_back(call);
                continue;
            }
            if !self.bucket.take(now) {
                held.push_back(call);
                held.extend(self.api_queue.drain(..));
                break;
            }
            if !call.key.is_empty() {
                self.inflight.insert(call.key.clone());
            }
            if matches!(call.op, Op::Create(_)) {
                failpoint::hit(failpoint::CREATE_BEFORE_SEND);
            }
            let backend = self.backend.clone();
            let tx = self.api_tx.clone();
            let pace =
                Duration::from_millis(1_000 / u64::from(self.s.max_requests_per_second.max(1)));
            tokio::spawn(async move {
                let answer = match call.op {
                    Op::Create(c) => {
                        let r = backend.create_charge(&c).await;
                        if r.is_ok() {
                            failpoint::hit(failpoint::CREATE_AFTER_SEND);
                        }
                        ApiAnswer::Create(r)
                    }
                    Op::Poll(id) => ApiAnswer::Poll(backend.get_charge(&id).await),
                    Op::Payment(id) => ApiAnswer::Payment(backend.get_payment(&id).await),
                    Op::Search(r) => ApiAnswer::Search(backend.search_payments(&r).await),
                    Op::List {
                        from_ms,
                        until_ms,
                        reference,
                        terminal,
                    } => ApiAnswer::List(
                        backend
                            .find_created(
                                from_ms - Timing::RECONCILE_SKEW_MS,
                                until_ms,
                                &reference,
                                &terminal,
                                pace,
                            )
                            .await,
                    ),
                    Op::Cancel {
                        terminal,
                        intent_id,
                    } => ApiAnswer::Cancel(backend.cancel_charge(&terminal, &intent_id).await),
                    Op::Devices => ApiAnswer::Devices(backend.list_devices().await),
                    Op::Refund(op) => ApiAnswer::Refund(op.run(backend.as_ref()).await),
                };
                let _ = tx.send(ApiResult {
                    key: call.key,
                    answer,
                });
            });
        }
        self.api_queue = held;
    }

    fn terminal_state(&self, terminal: &str) -> TerminalState {
        let q = self.terminals.get(terminal);
        let mode = match &self.devices {
            Some(d) => d.get(terminal).cloned().unwrap_or_else(|| "UNKNOWN".into()),
            None => "UNKNOWN".into(),
        };
        let current = q
            .and_then(|q| q.holder.as_ref())
            .and_then(|k| self.active.get(k))
            .map(|r| r.key_string());
        TerminalState {
            v: 1,
            terminal: terminal.to_string(),
            mode,
            busy: current.is_some(),
            current,
            waiting: q.map(|q| q.waiting.len() as u32).unwrap_or(0),
        }
    }

    /// Publish the retained state of every terminal whose state may have changed: those
    /// touched by this turn's writes, those never published (or to publish again after a
    /// reconnect or a device refresh), and bound terminals not seen yet.
    fn publish_terminals(&mut self) {
        let touched = std::mem::take(&mut self.touched_terminals);
        let mut names: BTreeSet<String> = self
            .terminals
            .iter()
            .filter(|(n, q)| q.published.is_none() || touched.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for s in self.s.stations.values() {
            for t in &s.terminals {
                if !self.terminals.contains_key(t) {
                    names.insert(t.clone());
                }
            }
        }
        for name in names {
            let ts = self.terminal_state(&name);
            let sig = (ts.busy, ts.current.clone(), ts.waiting, ts.mode.clone());
            let q = self.terminals.entry(name.clone()).or_default();
            if q.published.as_ref() == Some(&sig) {
                continue;
            }
            q.published = Some(sig);
            let payload = serde_json::to_vec(&ts).unwrap_or_default();
            let _ = self.link.send(ToLink::Publish(LinkPublish {
                outbox_id: None,
                dest: Dest::Terminal(name.clone()),
                payload,
                correlation: None,
                retain: true,
            }));
        }
    }

    /// The agent's status document (`agent/status`, and the `agent` part of `pointgate
    /// status`): health from the last API answers, with the caller's pending figures.
    fn agent_status(&self, pending: u64, oldest_pending_s: u64) -> AgentStatus {
        let (state, api) = match self.health {
            ApiHealth::Ok => ("online", "ok"),
            ApiHealth::Unreachable => ("degraded", "unreachable"),
            ApiHealth::Unauthorized => ("degraded", "unauthorized"),
        };
        AgentStatus {
            v: 1,
            state: state.into(),
            version: Some(env!("CARGO_PKG_VERSION").into()),
            store: Some(self.s.store_id.clone()),
            backend: Some(self.s.backend.into()),
            api: Some(api.into()),
            pending: Some(pending),
            oldest_pending_s: Some(oldest_pending_s),
            since: Some(self.since.clone()),
        }
    }

    fn publish_status(&mut self, force: bool) {
        let now = self.clock.now_ms();
        let mut pending = 0u64;
        let mut oldest: Option<i64> = None;
        for r in self.active.values() {
            if matches!(r.progress, Progress::Charge(_) | Progress::Refund(_)) {
                pending += 1;
            }
            oldest = Some(oldest.map_or(r.received_ms, |o| o.min(r.received_ms)));
        }
        let oldest = oldest.map(|t| ((now - t).max(0) / 1000) as u64);
        let status = self.agent_status(pending, oldest.unwrap_or(0));
        let changed = match &self.published_status {
            None => true,
            Some(p) => {
                p.state != status.state || p.api != status.api || p.pending != status.pending
            }
        };
        if !force && !changed {
            return;
        }
        self.published_status = Some(status.clone());
        let _ = self.link.send(ToLink::Publish(LinkPublish {
            outbox_id: None,
            dest: Dest::Status,
            payload: serde_json::to_vec(&status).unwrap_or_default(),
            correlation: None,
            retain: true,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(boot: &str, synchronized: bool) -> TimeFacts {
        TimeFacts {
            boot_id: Some(boot.into()),
            synchronized,
        }
    }

    #[test]
    fn the_clock_is_in_doubt_after_a_reboot_without_time_sync() {
        assert!(clock_doubt(&facts("b2", false), Some("b1"), Some(1_000), 2_000).is_some());
        // Synchronised after the reboot, or the same boot: trusted.
        assert!(clock_doubt(&facts("b2", true), Some("b1"), Some(1_000), 2_000).is_none());
        assert!(clock_doubt(&facts("b1", false), Some("b1"), Some(1_000), 2_000).is_none());
        // A fresh store has nothing to compare with.
        assert!(clock_doubt(&facts("b1", false), None, None, 2_000).is_none());
    }

    #[test]
    fn no_second_holds_more_requests_than_the_limit() {
        let mut b = TokenBucket::new(5);
        let mut sent = Vec::new();
        // Idle, then a burst, and asking every 10 ms for 3 s; each answer takes 30 ms.
        let mut out: VecDeque<i64> = VecDeque::new();
        for t in (10_000..13_000).step_by(10) {
            while out.front().is_some_and(|d| *d <= t) {
                out.pop_front();
                b.answered(t);
            }
            while b.take(t) {
                sent.push(t);
                out.push_back(t + 30);
            }
        }
        for (i, t) in sent.iter().enumerate() {
            let in_window = sent[i..].iter().take_while(|u| **u < t + 1_000).count();
            assert!(
                in_window <= 5,
                "{in_window} requests in the second from {t}"
            );
        }
        // And it does not starve: 5 per second on average.
        assert!(sent.len() >= 13, "{} sent in 3 s", sent.len());
        assert!(b.next_at() > 12_990);
    }

    #[test]
    fn the_clock_is_in_doubt_when_it_reads_earlier_than_the_store() {
        assert!(clock_doubt(&facts("b1", true), Some("b1"), Some(5_000), 4_999).is_some());
        assert!(clock_doubt(&facts("b1", true), Some("b1"), Some(5_000), 5_000).is_none());
    }
}
