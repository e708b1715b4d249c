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

mod accept;
mod api;
mod clock;
mod effects;
mod limit;
mod operator;
pub mod port;
mod refunds;
mod status;
mod terminals;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::domain::command::CommandType;
use crate::domain::command::StationSection;
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
use api::{ApiCall, ApiHealth, ApiResult, Op};
pub use clock::{clock_doubt, Clock, SystemClock, TimeFacts};
use effects::address_of;
use limit::TokenBucket;
pub use port::{channel, CommandProps, Dest, EngineHandle, LinkPublish, ToEngine, ToLink};
use terminals::TermQueue;

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
