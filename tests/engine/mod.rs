//! An in-process harness for the engine driver: the real `Engine` on a temporary sled
//! store, a fake Point backend (a small in-memory model of Mercado Pago), a manual clock,
//! and the link channel read directly. No broker, no TLS, no HTTP.
//!
//! Time: the test runs on a current-thread runtime with tokio's clock paused
//! (`#[tokio::test(start_paused = true)]`). The engine reads the wall clock from
//! [`ManualClock`] and sleeps on tokio's clock; [`Harness::advance`] moves both together,
//! in steps of [`STEP_MS`], and lets the engine finish what each step made due
//! ([`Harness::settle`]). Nothing waits on real time.
//!
//! The library's paths are about to move (issue 11): every `use pointgate::...` is in
//! the one import block below, `Settings` is built in [`settings`] only, and what the
//! engine hands the link is read in [`Harness::seen`] only.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// ---- every use of the library: the one block to change when its paths move ----
use pointgate::config::StationSection;
use pointgate::domain::outcome::Address;
use pointgate::domain::remote::{Candidate, Failure};
use pointgate::engine::port::{
    channel, CommandProps, Dest, EngineHandle, LinkPublish, ToEngine, ToLink,
};
use pointgate::engine::{Clock, Engine, Settings, TimeFacts};
use pointgate::machine::charge::Timing;
use pointgate::money::{Cents, Site};
use pointgate::point::integrations::{classify, reconcile};
use pointgate::point::{
    ApiError, CreateCharge, Device, ListedCharge, MpErrorBody, Payment, Phase, PointBackend,
    Refund, RemoteCharge,
};
use pointgate::store::Store;
// ---------------------------------------------------------------------------------

/// The manual clock's start: 2026-01-01T12:00:00Z (midday: reconcile's listing stays
/// within one UTC day).
pub const START_MS: i64 = 1_767_268_800_000;
/// How far [`Harness::advance`] moves time at once.
pub const STEP_MS: i64 = 100;
const PREFIX: &str = "pointgate/store-test";
/// A bound on waits for the engine's own answers (tokio's paused clock: virtual time).
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// A charge command.
pub fn charge(request_id: &str, amount: &str) -> Value {
    json!({"v": 1, "type": "charge", "request_id": request_id, "amount": amount})
}

/// States of a list of events, in order.
pub fn states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

// ================================================================== clock

/// The wall clock the engine reads: moved only by the test.
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now()
    }
}

// ================================================================== fake Point API

/// What the fake API does to a request instead of serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The connection is refused: nothing reached Mercado Pago.
    Connect,
    /// The request reached Mercado Pago and was done (a create makes its intent), but
    /// no answer came back.
    CommitThenDrop,
    /// As `CommitThenDrop`, and the answer never comes at all (the call hangs).
    CommitThenHang,
    /// `429 Too Many Requests` with this `Retry-After`; nothing done.
    TooMany { retry_after_s: u64 },
    /// This 5xx status; nothing done.
    Status(u16),
}

/// Which requests a [`Fault`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Any,
    Creates,
    Devices,
}

/// One request the engine made, stamped with the manual clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub at_ms: i64,
    /// `devices`, `create`, `get`, `cancel`, `list`, `payment`, `search`, `refund`.
    pub what: &'static str,
    pub arg: String,
    /// The fault it met, if any.
    pub fault: Option<Fault>,
}

#[derive(Debug, Clone)]
struct Intent {
    id: String,
    terminal: String,
    amount: Cents,
    reference: String,
    state: &'static str,
    payment_id: Option<String>,
    created_ms: i64,
}

impl Intent {
    fn is_final(&self) -> bool {
        matches!(self.state, "FINISHED" | "CANCELED" | "ERROR" | "ABANDONED")
    }

    fn remote(&self) -> RemoteCharge {
        let phase = match self.state {
            "OPEN" => Phase::Open,
            "ON_TERMINAL" => Phase::OnTerminal,
            "PROCESSING" => Phase::Processing,
            "FINISHED" => Phase::Ended,
            "CANCELED" => Phase::Canceled,
            "ERROR" => Phase::Error,
            "ABANDONED" => Phase::Abandoned,
            _ => Phase::Unknown,
        };
        RemoteCharge {
            id: self.id.clone(),
            phase,
            raw_state: self.state.to_string(),
            terminal: Some(self.terminal.clone()),
            amount: Some(self.amount),
            external_reference: Some(self.reference.clone()),
            payment_id: self.payment_id.clone(),
        }
    }
}

#[derive(Default)]
struct Model {
    next_id: u64,
    intents: Vec<Intent>,
    payments: Vec<Payment>,
    /// `None`: the device listing fails.
    devices: Option<Vec<Device>>,
    serve_lists: bool,
    /// Faults still to serve: scope, fault, how many more times.
    faults: Vec<(Scope, Fault, u32)>,
    calls: Vec<Call>,
    creates: Vec<CreateCharge>,
}

/// A small in-memory Mercado Pago (Point Integrations): payment intents queued one per
/// terminal (a second create on a terminal with an unfinished intent is 409), moved by
/// the test ([`FakePoint::take`], [`FakePoint::pay`], [`FakePoint::decline`]); payments
/// to look up; the device listing; the intent list by day; scripted faults. Every
/// request is recorded with the manual clock's time.
pub struct FakePoint {
    clock: Arc<ManualClock>,
    m: Mutex<Model>,
}

fn status_error(
    method: &'static str,
    path: &str,
    status: u16,
    retry_after: Option<Duration>,
) -> ApiError {
    ApiError::Status {
        method,
        path: path.to_string(),
        status,
        body: MpErrorBody {
            message: Some(format!("fake answer {status}")),
            ..MpErrorBody::default()
        },
        raw_body: String::new(),
        request_id: None,
        retry_after,
    }
}

fn fault_error(f: &Fault, method: &'static str, path: &str) -> ApiError {
    match f {
        Fault::Connect => ApiError::Connect {
            method,
            path: path.into(),
            message: "connection refused (fake)".into(),
        },
        Fault::CommitThenDrop | Fault::CommitThenHang => ApiError::NoAnswer {
            method,
            path: path.into(),
            message: "connection reset (fake)".into(),
        },
        Fault::TooMany { retry_after_s } => {
            status_error(method, path, 429, Some(Duration::from_secs(*retry_after_s)))
        }
        Fault::Status(s) => status_error(method, path, *s, None),
    }
}

fn utc_date(ms: i64) -> time::Date {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .expect("a valid time")
        .date()
}

impl FakePoint {
    fn new(clock: Arc<ManualClock>) -> FakePoint {
        FakePoint {
            clock,
            m: Mutex::new(Model {
                serve_lists: true,
                ..Model::default()
            }),
        }
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.m.lock().expect("fake model lock")
    }

    /// Record a request; the fault it meets, if one is scripted for it.
    fn begin(&self, what: &'static str, arg: &str, scope: Scope) -> Option<Fault> {
        let at_ms = self.clock.now();
        let mut m = self.model();
        let mut fault = None;
        if let Some(slot) = m
            .faults
            .iter_mut()
            .find(|(s, _, n)| *n > 0 && (*s == Scope::Any || *s == scope))
        {
            slot.2 -= 1;
            fault = Some(slot.1.clone());
        }
        m.faults.retain(|(_, _, n)| *n > 0);
        m.calls.push(Call {
            at_ms,
            what,
            arg: arg.to_string(),
            fault: fault.clone(),
        });
        fault
    }

    // ---- the test's side ----

    /// The next `times` requests in `scope` meet `fault`.
    pub fn fail(&self, scope: Scope, fault: Fault, times: u32) {
        self.model().faults.push((scope, fault, times));
    }

    /// The device listing: these terminals, with their operating mode.
    pub fn set_devices(&self, devices: &[(&str, &str)]) {
        self.model().devices = Some(
            devices
                .iter()
                .map(|(id, mode)| Device {
                    id: id.to_string(),
                    operating_mode: Some(mode.to_string()),
                    store_id: None,
                    pos_id: None,
                    external_pos_id: None,
                })
                .collect(),
        );
    }

    /// The device listing fails (no successful listing yet).
    pub fn fail_devices(&self) {
        self.model().devices = None;
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.model().calls.clone()
    }

    /// Every create request that reached the API (faults that left nothing excluded).
    pub fn creates(&self) -> Vec<CreateCharge> {
        self.model().creates.clone()
    }

    /// The amounts of the intents created on `terminal`, oldest first.
    pub fn intent_amounts(&self, terminal: &str) -> Vec<Cents> {
        let m = self.model();
        m.intents
            .iter()
            .filter(|i| i.terminal == terminal)
            .map(|i| i.amount)
            .collect()
    }

    /// The unfinished intent on `terminal`, if there is one.
    pub fn open_intent(&self, terminal: &str) -> Option<String> {
        let m = self.model();
        m.intents
            .iter()
            .find(|i| i.terminal == terminal && !i.is_final())
            .map(|i| i.id.clone())
    }

    fn move_intent(&self, terminal: &str, state: &'static str, payment: Option<&str>) {
        let mut m = self.model();
        m.next_id += 1;
        let pay_id = format!("pay-{}", m.next_id);
        let i = m
            .intents
            .iter_mut()
            .find(|i| i.terminal == terminal && !i.is_final())
            .unwrap_or_else(|| panic!("no unfinished intent on {terminal}"));
        i.state = state;
        let Some(status) = payment else { return };
        i.payment_id = Some(pay_id.clone());
        let (amount, reference) = (i.amount, i.reference.clone());
        m.payments.push(Payment {
            id: pay_id,
            status: status.to_string(),
            status_detail: Some(format!("{status} (fake)")),
            amount: Some(amount),
            refunded: None,
            external_reference: Some(reference),
        });
    }

    /// The customer picks up the intent on `terminal`: `ON_TERMINAL`.
    pub fn take(&self, terminal: &str) {
        self.move_intent(terminal, "ON_TERMINAL", None);
    }

    /// The intent on `terminal` ends `FINISHED` with an approved payment of its amount.
    pub fn pay(&self, terminal: &str) {
        self.move_intent(terminal, "FINISHED", Some("approved"));
    }

    /// The intent on `terminal` ends `FINISHED` with a rejected payment.
    pub fn decline(&self, terminal: &str) {
        self.move_intent(terminal, "FINISHED", Some("rejected"));
    }
}

impl PointBackend for FakePoint {
    // The fake models the Integrations API: its classification and reconcile strategy.
    fn failure(&self, e: &ApiError, creating: bool) -> Failure {
        classify::failure(e, creating)
    }

    async fn find_created(
        &self,
        from_ms: i64,
        until_ms: i64,
        reference: &str,
        terminal: &str,
        pace: Duration,
    ) -> Result<Option<Vec<Candidate>>, ApiError> {
        reconcile::find_created(self, from_ms, until_ms, reference, terminal, pace).await
    }

    async fn list_devices(&self) -> Result<Vec<Device>, ApiError> {
        let path = "/point/integration-api/devices";
        if let Some(f) = self.begin("devices", "", Scope::Devices) {
            return Err(fault_error(&f, "GET", path));
        }
        self.model()
            .devices
            .clone()
            .ok_or_else(|| status_error("GET", path, 500, None))
    }

    async fn create_charge(&self, req: &CreateCharge) -> Result<RemoteCharge, ApiError> {
        let path = format!(
            "/point/integration-api/devices/{}/payment-intents",
            req.terminal
        );
        let fault = self.begin("create", &req.external_reference, Scope::Creates);
        let commits = matches!(
            fault,
            None | Some(Fault::CommitThenDrop | Fault::CommitThenHang)
        );
        if !commits {
            return Err(fault_error(fault.as_ref().expect("a fault"), "POST", &path));
        }
        let created = {
            let mut m = self.model();
            if m.intents
                .iter()
                .any(|i| i.terminal == req.terminal && !i.is_final())
            {
                return Err(status_error("POST", &path, 409, None));
            }
            m.next_id += 1;
            let intent = Intent {
                id: format!("intent-{}", m.next_id),
                terminal: req.terminal.clone(),
                amount: req.amount,
                reference: req.external_reference.clone(),
                state: "OPEN",
                payment_id: None,
                created_ms: self.clock.now(),
            };
            m.creates.push(req.clone());
            m.intents.push(intent.clone());
            intent
        };
        match fault {
            None => Ok(created.remote()),
            Some(Fault::CommitThenHang) => std::future::pending().await,
            Some(f) => Err(fault_error(&f, "POST", &path)),
        }
    }

    async fn get_charge(&self, id: &str) -> Result<RemoteCharge, ApiError> {
        let path = format!("/point/integration-api/payment-intents/{id}");
        if let Some(f) = self.begin("get", id, Scope::Any) {
            return Err(fault_error(&f, "GET", &path));
        }
        let m = self.model();
        m.intents
            .iter()
            .find(|i| i.id == id)
            .map(Intent::remote)
            .ok_or_else(|| status_error("GET", &path, 404, None))
    }

    async fn cancel_charge(&self, _terminal: &str, id: &str) -> Result<(), ApiError> {
        let path = format!("/point/integration-api/payment-intents/{id}");
        if let Some(f) = self.begin("cancel", id, Scope::Any) {
            return Err(fault_error(&f, "DELETE", &path));
        }
        let mut m = self.model();
        match m.intents.iter_mut().find(|i| i.id == id) {
            Some(i) if i.state == "OPEN" => {
                i.state = "CANCELED";
                Ok(())
            }
            Some(_) => Err(status_error("DELETE", &path, 409, None)),
            None => Err(status_error("DELETE", &path, 404, None)),
        }
    }

    async fn list_charges_on(
        &self,
        date: time::Date,
    ) -> Result<Option<Vec<ListedCharge>>, ApiError> {
        let path = "/point/integration-api/payment-intents/events";
        if let Some(f) = self.begin("list", &date.to_string(), Scope::Any) {
            return Err(fault_error(&f, "GET", path));
        }
        let m = self.model();
        if !m.serve_lists {
            return Ok(None);
        }
        Ok(Some(
            m.intents
                .iter()
                .filter(|i| utc_date(i.created_ms) == date)
                .map(|i| ListedCharge {
                    id: i.id.clone(),
                    raw_state: i.state.to_string(),
                    created_unix: Some(i.created_ms.div_euclid(1000)),
                })
                .collect(),
        ))
    }

    async fn get_payment(&self, id: &str) -> Result<Payment, ApiError> {
        let path = format!("/v1/payments/{id}");
        if let Some(f) = self.begin("payment", id, Scope::Any) {
            return Err(fault_error(&f, "GET", &path));
        }
        let m = self.model();
        m.payments
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| status_error("GET", &path, 404, None))
    }

    async fn search_payments(&self, external_reference: &str) -> Result<Vec<Payment>, ApiError> {
        let path = "/v1/payments/search";
        if let Some(f) = self.begin("search", external_reference, Scope::Any) {
            return Err(fault_error(&f, "GET", path));
        }
        let m = self.model();
        Ok(m.payments
            .iter()
            .filter(|p| p.external_reference.as_deref() == Some(external_reference))
            .cloned()
            .collect())
    }

    // Refunds are not modelled: these tests make none.
    async fn create_refund_on_terminal(
        &self,
        terminal: &str,
        _payment_id: &str,
    ) -> Result<RemoteCharge, ApiError> {
        self.begin("refund", terminal, Scope::Any);
        Err(ApiError::Invalid(
            "refunds are not modelled by the fake".into(),
        ))
    }

    async fn get_refund_on_terminal(&self, id: &str) -> Result<RemoteCharge, ApiError> {
        self.begin("refund", id, Scope::Any);
        Err(ApiError::Invalid(
            "refunds are not modelled by the fake".into(),
        ))
    }

    async fn cancel_refund_on_terminal(&self, _terminal: &str, id: &str) -> Result<(), ApiError> {
        self.begin("refund", id, Scope::Any);
        Err(ApiError::Invalid(
            "refunds are not modelled by the fake".into(),
        ))
    }

    async fn refund_payment(
        &self,
        payment_id: &str,
        _amount: Option<Cents>,
        _idempotency_key: &str,
    ) -> Result<Refund, ApiError> {
        self.begin("refund", payment_id, Scope::Any);
        Err(ApiError::Invalid(
            "refunds are not modelled by the fake".into(),
        ))
    }
}

// ================================================================== settings

/// What a test may choose about the agent.
#[derive(Debug, Clone)]
pub struct Options {
    /// Station id → its bound terminals.
    pub stations: Vec<(String, Vec<String>)>,
    /// Terminals the device listing shows in STANDALONE mode (all bound terminals are
    /// listed, PDV unless named here).
    pub standalone: Vec<String>,
    pub max_pending: usize,
    pub max_requests_per_second: u32,
    pub charge_ttl_ms: i64,
    pub poll_interval_ms: i64,
}

impl Default for Options {
    /// `kiosk-1` with `PAX_A910__0001`, `kiosk-2` with `PAX_A910__0002`; a request
    /// limit high enough not to matter.
    fn default() -> Options {
        Options {
            stations: vec![
                ("kiosk-1".into(), vec!["PAX_A910__0001".into()]),
                ("kiosk-2".into(), vec!["PAX_A910__0002".into()]),
            ],
            standalone: Vec::new(),
            max_pending: 10_000,
            max_requests_per_second: 50,
            charge_ttl_ms: 120_000,
            poll_interval_ms: 1_000,
        }
    }
}

impl Options {
    /// `n` stations `kiosk-1..n`, each with its own terminal `PAX_A910__000i`.
    pub fn stations(n: usize) -> Options {
        Options {
            stations: (1..=n)
                .map(|i| (format!("kiosk-{i}"), vec![format!("PAX_A910__{i:04}")]))
                .collect(),
            ..Options::default()
        }
    }
}

/// The engine's settings: the one place they are built.
fn settings(o: &Options) -> Settings {
    let stations: BTreeMap<String, StationSection> = o
        .stations
        .iter()
        .map(|(s, t)| {
            (
                s.clone(),
                StationSection {
                    terminals: t.clone(),
                },
            )
        })
        .collect();
    Settings {
        site: Site::MLA,
        store_id: "store-test".into(),
        stations,
        charge_ttl_ms: o.charge_ttl_ms,
        refund_ttl_ms: 7 * 24 * 3_600_000,
        max_pending: o.max_pending,
        retention_ms: 30 * 24 * 3_600_000,
        timing: Timing {
            poll_interval_ms: o.poll_interval_ms,
            terminal_timeout_ms: 300_000,
            confirm_window_ms: 60_000,
            confirm_window_max_ms: 24 * 3_600_000,
        },
        max_requests_per_second: o.max_requests_per_second,
        devices_refresh: Duration::from_secs(300),
        backend: "integrations",
    }
}

// ================================================================== harness

/// What the engine handed the link, as the harness reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// The `Resync` marker: the whole outbox follows.
    pub resync: bool,
    /// `Some` for an outbox event (acknowledged with `Published`).
    pub outbox_id: Option<u64>,
    /// The station whose event topic it went to, for station events.
    pub station: Option<String>,
    pub payload: Value,
}

struct Running {
    handle: EngineHandle,
    link: mpsc::UnboundedReceiver<ToLink>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// One agent's engine with its store, fake API and clock; restartable on the same store.
pub struct Harness {
    pub clock: Arc<ManualClock>,
    pub point: Arc<FakePoint>,
    opts: Options,
    dir: tempfile::TempDir,
    running: Option<Running>,
    /// Everything handed to the link, across restarts, in order.
    log: Vec<ToLink>,
    /// Acknowledge outbox events as they come (as the link does on PUBACK).
    pub auto_ack: bool,
}

impl Harness {
    /// A fresh store, the fake API listing every bound terminal, the engine started and
    /// connected.
    pub async fn start(opts: Options) -> Harness {
        let clock = Arc::new(ManualClock(AtomicI64::new(START_MS)));
        let point = Arc::new(FakePoint::new(clock.clone()));
        let listed: Vec<(String, &str)> = opts
            .stations
            .iter()
            .flat_map(|(_, ts)| ts.iter())
            .map(|t| {
                let mode = if opts.standalone.contains(t) {
                    "STANDALONE"
                } else {
                    "PDV"
                };
                (t.clone(), mode)
            })
            .collect();
        let listed: Vec<(&str, &str)> = listed.iter().map(|(t, m)| (t.as_str(), *m)).collect();
        point.set_devices(&listed);
        Harness::start_with(opts, point, clock).await
    }

    /// As [`Harness::start`], with a fake API the test prepared.
    pub async fn start_with(
        opts: Options,
        point: Arc<FakePoint>,
        clock: Arc<ManualClock>,
    ) -> Harness {
        let mut h = Harness {
            clock,
            point,
            opts,
            dir: tempfile::tempdir().expect("a temporary directory"),
            running: None,
            log: Vec::new(),
            auto_ack: true,
        };
        h.launch();
        h.connect().await;
        h
    }

    /// A fake API and clock to prepare before [`Harness::start_with`].
    pub fn fake() -> (Arc<FakePoint>, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock(AtomicI64::new(START_MS)));
        (Arc::new(FakePoint::new(clock.clone())), clock)
    }

    /// Open the store, build the engine, recover, spawn its loop. Returns how many open
    /// requests it resumed. The link is not connected yet.
    fn launch(&mut self) -> usize {
        assert!(self.running.is_none(), "the engine is already running");
        let store = open_store(self.dir.path());
        let (handle, rx) = channel();
        let (link_tx, link) = mpsc::unbounded_channel();
        let clock: Arc<dyn Clock> = self.clock.clone();
        let mut engine = Engine::new(
            settings(&self.opts),
            store,
            self.point.clone(),
            clock,
            link_tx,
        );
        let facts = TimeFacts {
            boot_id: Some("boot-1".into()),
            synchronized: true,
        };
        let resumed = engine.recover(&facts).expect("recover");
        let stop = CancellationToken::new();
        let task = tokio::spawn(engine.run(rx, stop.clone()));
        self.running = Some(Running {
            handle,
            link,
            stop,
            task,
        });
        resumed
    }

    fn running(&mut self) -> &mut Running {
        self.running.as_mut().expect("the engine is running")
    }

    async fn send(&mut self, msg: ToEngine) {
        assert!(self.running().handle.send(msg).await, "the engine is gone");
    }

    /// The link (re)connected with its session present: the outbox goes out again.
    pub async fn connect(&mut self) {
        self.send(ToEngine::Connected {
            session_present: true,
        })
        .await;
        self.settle().await;
    }

    /// Stop the engine as the agent's drain does (its loop returns after making its
    /// state durable) and drop it with its store.
    pub async fn stop(&mut self) {
        let mut r = self.running.take().expect("the engine is running");
        r.stop.cancel();
        tokio::time::timeout(ANSWER_WAIT, &mut r.task)
            .await
            .expect("the engine stops")
            .expect("the engine task ends without panicking");
        while let Ok(m) = r.link.try_recv() {
            self.log.push(m);
        }
    }

    /// Start a new engine on the same store (and the same fake API and clock), without
    /// connecting its link. Returns how many open requests it resumed.
    pub async fn restart_unconnected(&mut self) -> usize {
        let n = self.launch();
        self.settle().await;
        n
    }

    /// Move every message the engine handed the link into the log; acknowledge outbox
    /// events if `auto_ack`.
    async fn drain(&mut self) {
        let mut acks = Vec::new();
        let r = self.running.as_mut().expect("the engine is running");
        while let Ok(m) = r.link.try_recv() {
            if let ToLink::Publish(LinkPublish {
                outbox_id: Some(id),
                ..
            }) = &m
            {
                acks.push(*id);
            }
            self.log.push(m);
        }
        if self.auto_ack {
            for outbox_id in acks {
                self.send(ToEngine::Published { outbox_id }).await;
            }
        }
    }

    /// The engine answers a ping: it has taken every message sent before it.
    async fn ping(&mut self) {
        let (tx, rx) = oneshot::channel();
        self.send(ToEngine::Ping(tx)).await;
        tokio::time::timeout(ANSWER_WAIT, rx)
            .await
            .expect("the engine answers a ping")
            .expect("the engine answers a ping");
    }

    /// Let the engine do everything due at the current instant: API answers, the
    /// batches they make, the events they publish. Returns when three rounds in a row
    /// saw no new request to the API and nothing new for the link.
    pub async fn settle(&mut self) {
        let mut quiet = 0;
        for _ in 0..2_000 {
            let before = (self.log.len(), self.point.model().calls.len());
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            self.ping().await;
            self.drain().await;
            if (self.log.len(), self.point.model().calls.len()) == before {
                quiet += 1;
                if quiet == 3 {
                    return;
                }
            } else {
                quiet = 0;
            }
        }
        panic!("the engine never settled: it keeps publishing or calling the API");
    }

    /// Move the manual clock and tokio's clock forward together by `ms`, in steps of
    /// [`STEP_MS`], settling after each.
    pub async fn advance(&mut self, ms: i64) {
        let mut left = ms;
        while left > 0 {
            let step = left.min(STEP_MS);
            self.clock.0.fetch_add(step, Ordering::SeqCst);
            tokio::time::advance(Duration::from_millis(step as u64)).await;
            self.settle().await;
            left -= step;
        }
    }

    /// Advance time until `done` holds (checked before each step); panics with `what`
    /// and the events seen after `max_ms`.
    pub async fn run_until(
        &mut self,
        max_ms: i64,
        what: &str,
        mut done: impl FnMut(&mut Harness) -> bool,
    ) {
        let until = self.clock.now() + max_ms;
        loop {
            if done(self) {
                return;
            }
            assert!(
                self.clock.now() < until,
                "{what}: not within {max_ms} ms; the link saw {:#?}",
                self.seen()
            );
            self.advance(STEP_MS).await;
        }
    }

    /// A station's command; returns the events `station` got while the engine settled
    /// after it (its `accepted` or `refused`, and whatever followed at once).
    pub async fn command(&mut self, station: &str, cmd: Value) -> Vec<Value> {
        self.command_bytes(station, cmd.to_string().into_bytes())
            .await
    }

    /// As [`Harness::command`], with the payload as raw bytes.
    pub async fn command_bytes(&mut self, station: &str, payload: Vec<u8>) -> Vec<Value> {
        let mark = self.events_of(station).len();
        let (done, answered) = oneshot::channel();
        self.send(ToEngine::Command {
            station: station.to_string(),
            payload,
            props: CommandProps::default(),
            done,
        })
        .await;
        tokio::time::timeout(ANSWER_WAIT, answered)
            .await
            .expect("the command is stored or refused")
            .expect("the command is stored or refused");
        self.settle().await;
        self.events_of(station).split_off(mark)
    }

    /// The one refusal a command gets.
    pub async fn refusal(&mut self, station: &str, cmd: Value) -> Value {
        let out = self.command(station, cmd).await;
        match out.as_slice() {
            [one] if one["state"] == "refused" => one.clone(),
            _ => panic!("expected one refusal, got {out:#?}"),
        }
    }

    /// Everything the engine handed the link, in order: the only place that reads a
    /// `LinkPublish`'s destination. Retained status and terminal state are left out.
    pub fn seen(&self) -> Vec<Seen> {
        let mut out = Vec::new();
        for m in &self.log {
            match m {
                ToLink::Resync => out.push(Seen {
                    resync: true,
                    outbox_id: None,
                    station: None,
                    payload: Value::Null,
                }),
                ToLink::Publish(p) if !p.retain => {
                    let station = match &p.dest {
                        Dest::Event(Address::Station(station)) => Some(station.clone()),
                        _ => None,
                    };
                    out.push(Seen {
                        resync: false,
                        outbox_id: p.outbox_id,
                        station,
                        payload: serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                    });
                }
                ToLink::Publish(_) => {}
            }
        }
        out
    }

    /// Every event `station` received, in order (repeats included).
    pub fn events_of(&self, station: &str) -> Vec<Value> {
        self.seen()
            .into_iter()
            .filter(|s| s.station.as_deref() == Some(station))
            .map(|s| s.payload)
            .collect()
    }

    /// The events of one request of `station`, in order.
    pub fn story(&self, station: &str, request_id: &str) -> Vec<Value> {
        self.events_of(station)
            .into_iter()
            .filter(|e| e["request_id"] == request_id)
            .collect()
    }

    /// The latest event of a request (panics if it has none).
    pub fn latest(&self, station: &str, request_id: &str) -> Value {
        self.story(station, request_id)
            .pop()
            .unwrap_or_else(|| panic!("no event of {station}/{request_id}"))
    }

    /// Has the request's story reached `state`?
    pub fn reached(&self, station: &str, request_id: &str, state: &str) -> bool {
        self.story(station, request_id)
            .iter()
            .any(|e| e["state"] == state)
    }

    /// Advance time until the request reaches `state`; its event.
    pub async fn until_state(
        &mut self,
        station: &str,
        request_id: &str,
        state: &str,
        max_ms: i64,
    ) -> Value {
        let what = format!("{station}/{request_id} reaches {state}");
        self.run_until(max_ms, &what, |h| h.reached(station, request_id, state))
            .await;
        self.story(station, request_id)
            .into_iter()
            .find(|e| e["state"] == state)
            .expect("reached")
    }
}

/// Open the store in `dir`. After a stop, sled's own threads may still hold the previous
/// handle's file lock for a moment (the stopped engine dropped its handle, sled releases
/// the lock when its last internal reference goes): wait for the lock, bounded.
fn open_store(dir: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Ok(store) => return store,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("the store opens: {e}"),
        }
    }
}
