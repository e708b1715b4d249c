//! The Point API simulator: an HTTPS server (rustls, a certificate generated at start)
//! that behaves as Mercado Pago's docs describe the Integrations API and the payments
//! API, for tests, `pointgate demo` and integrators who develop offline (`pointgate sim`).
//!
//! It keeps a ledger of every create per `external_reference`, so tests can prove that
//! nothing was created twice. Terminal behaviour is scriptable (automatic with delays,
//! or step by step) and faults can be injected, in-process through `SimHandle` or over
//! the control endpoint.
//!
//! Files: `world` (state and rules, no IO), `api` (routes and the fault/token
//! middleware), `net` (certificates, the acceptor that refuses or cuts connections),
//! `control` (the plain-HTTP control endpoint).
//!
//! Where the docs are silent or unverified (see `shared/spec/point-integrations-api.md`),
//! the simulator picks a reading and sticks to it:
//! - Error bodies everywhere use MP's `{message, error, status, cause}` shape; 400s carry
//!   one `cause` `{code, description}`. A create answers 400 on the first problem found.
//! - Create order of checks: unknown device 404, body 400 (site schema, unknown fields,
//!   `additional_info` required on MLA and MLM, `ticket_number` required on MLA), device
//!   in STANDALONE 400 (a configuration problem, not a busy queue, hence not 409), device
//!   busy 409. JSON `null` counts as an absent field. The answer echoes the request as
//!   sent plus `id` and `device_id`, with no `state` and no server default for
//!   `installments_cost`.
//! - One queue per device shared by payment and refund intents; it frees when the intent
//!   reaches a final state.
//! - Auto terminal: OPEN → ON_TERMINAL after `pickup`; then `process` split in thirds
//!   over PROCESSING, PROCESSED, FINISHED (refund intents: halves over PROCESSING,
//!   FINISHED). The payment is created on FINISHED (by amount: `outcome_amounts.error` →
//!   ERROR after PROCESSING and no payment; `rejected` → payment `rejected` /
//!   `cc_rejected_other_reason`; `reversed` → payment `cancelled` / `reversed`, since the
//!   docs do not say how a reversal shows; anything else `approved` / `accredited`) or on
//!   CONFIRMATION_REQUIRED (`in_process` / `pending_contingency`). GET shows
//!   `payment.id` as a string, as the guide examples do.
//! - ABANDONED: `abandon_after` (default 15 min) counted from creation, applied if the
//!   intent is still OPEN or ON_TERMINAL.
//! - Cancel of an intent of another device, or of an unknown intent: 404.
//! - Intent lists: both dates required, `endDate` ≥ `startDate`, at most 30 days apart;
//!   every payment intent created on those UTC days, with its current state. The
//!   per-intent `/events` gives the current state and the time it was entered. When lists
//!   are off, both answer 404 `not found`.
//! - Refund intents: 404 for an unknown device or payment, 400 when the payment was taken
//!   on another device or is not `approved` with nothing refunded. FINISHED refunds the
//!   whole payment (`refunded`). Refund intents are not in the ledger (it counts charges).
//! - Payments API: refunds answer 201; `status_detail` `partially_refunded` while money
//!   is left, `refunded`/`refunded` when none; `X-Idempotency-Key` is per payment.
//!   Dates are UTC (`...+00:00`). `PATCH /devices/{id}` applies at once (no restart).
//! - Faults apply to API requests only, checked before the token. `Down` ignores the
//!   scope: new connections are reset before the TLS handshake (the client sees a
//!   connect error: nothing reached the API) and live ones are cut. The first request on
//!   a connection pooled before the outage may fail after sending, as in a real outage.
//!   In the request log a request whose answer was dropped has status 0.

mod api;
mod control;
mod net;
mod world;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::money::Site;
use net::ConnKill;
use world::{now_ms, World};

/// How the simulator starts.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where the API listens (port 0: any free port).
    pub listen: SocketAddr,
    /// Where the plain-HTTP control endpoint listens, if anywhere.
    pub control: Option<SocketAddr>,
    pub site: Site,
    /// The bearer token it accepts; anything else is 401.
    pub token: String,
    /// Devices in PDV mode.
    pub devices: Vec<String>,
    /// Devices in STANDALONE mode.
    pub standalone_devices: Vec<String>,
    /// Write the CA certificate (PEM) here.
    pub ca_out: Option<PathBuf>,
    /// Names the server certificate is valid for (default: `localhost`, `127.0.0.1`).
    pub hostnames: Vec<String>,
    /// Terminal behaviour at start.
    pub terminal: TerminalMode,
    /// Serve the intent list endpoints (`.../payment-intents/events`), which Mercado Pago
    /// no longer documents.
    pub serve_intent_lists: bool,
    /// Amounts (cents) that end in a reversed payment, a rejected payment, a terminal error.
    pub outcome_amounts: OutcomeAmounts,
    /// How long an intent may stay OPEN or ON_TERMINAL (from creation) before it is
    /// ABANDONED. Mercado Pago says 15 minutes since 2024-07.
    pub abandon_after: Duration,
}

/// How terminals behave once an intent is queued on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalMode {
    /// Each intent moves on by itself: OPEN → ON_TERMINAL after `pickup`, then through
    /// PROCESSING/PROCESSED to its end after `process`.
    Auto { pickup: Duration, process: Duration },
    /// Intents stay where they are until the control endpoint (or `SimHandle`) moves them.
    Manual,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeAmounts {
    pub reversed: u64,
    pub rejected: u64,
    pub error: u64,
}

impl Default for OutcomeAmounts {
    fn default() -> Self {
        OutcomeAmounts {
            reversed: 1100,
            rejected: 1200,
            error: 1300,
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            control: None,
            site: Site::MLA,
            token: "TEST-sim-token".to_string(),
            devices: vec!["SIM_A910__0001".to_string()],
            standalone_devices: Vec::new(),
            ca_out: None,
            hostnames: vec!["localhost".to_string(), "127.0.0.1".to_string()],
            terminal: TerminalMode::Auto {
                pickup: Duration::from_millis(200),
                process: Duration::from_millis(200),
            },
            serve_intent_lists: true,
            outcome_amounts: OutcomeAmounts::default(),
            abandon_after: Duration::from_secs(15 * 60),
        }
    }
}

/// Why the simulator failed to start or refused a scripting call.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot generate the certificates: {0}")]
    Certificate(String),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(String),
    #[error("cannot write the CA certificate to {path}: {source}")]
    CaWrite {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no intent {0}")]
    UnknownIntent(String),
    #[error("no payment {0}")]
    UnknownPayment(String),
    #[error("unknown intent state {0:?}")]
    UnknownState(String),
    #[error("intent {id} cannot go from {from} to {to}")]
    InvalidTransition {
        id: String,
        from: String,
        to: String,
    },
    #[error("cannot wait for a stop signal: {0}")]
    Signal(#[source] io::Error),
}

/// A fault injected into API requests (never the control endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Refuse connections: new ones are reset at accept, live ones are cut.
    Down,
    /// Answer this status without doing anything; `remaining` requests, or until changed.
    Status5xx {
        status: u16,
        remaining: Option<u32>,
    },
    /// Answer 429 with `Retry-After: retry_after_s`.
    TooMany {
        retry_after_s: u32,
        remaining: Option<u32>,
    },
    /// Wait this long before handling each request.
    Slow(Duration),
    /// Handle the request (a create is committed and in the ledger), then cut the
    /// connection without answering.
    CommitThenDrop {
        remaining: Option<u32>,
    },
    /// Handle the request, then answer this 5xx status instead of the real answer.
    CommitThen5xx {
        status: u16,
        remaining: Option<u32>,
    },
}

/// Which API requests a fault applies to (`Down` always applies to all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultScope {
    All,
    /// Every POST: payment intents, refund intents, refunds.
    Creates,
    /// Requests whose path starts with this.
    PathPrefix(String),
}

impl FaultScope {
    fn matches(&self, method: &str, path: &str) -> bool {
        match self {
            FaultScope::All => true,
            FaultScope::Creates => method == "POST",
            FaultScope::PathPrefix(p) => path.starts_with(p.as_str()),
        }
    }
}

/// One committed payment intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    pub intent_id: String,
    pub device_id: String,
    /// Cents.
    pub amount: u64,
    pub external_reference: Option<String>,
    pub created_unix_ms: i64,
}

/// One API request as the simulator received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestLog {
    pub method: String,
    pub path: String,
    pub at_unix_ms: i64,
    /// The status answered; 0 when the connection was cut instead.
    pub status: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentKind {
    Payment,
    Refund,
}

/// An intent (payment or refund) as the simulator holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IntentView {
    pub id: String,
    pub kind: IntentKind,
    pub device_id: String,
    /// `OPEN`, `ON_TERMINAL`, ... as the API writes it.
    pub state: String,
    /// Cents (for a refund intent: the refunded payment's amount).
    pub amount: Option<u64>,
    pub external_reference: Option<String>,
    /// The payment made (payment intent) or refunded (refund intent).
    pub payment_id: Option<String>,
    pub created_unix_ms: i64,
}

/// Live connections and the token that cuts them all.
struct Conns {
    generation: CancellationToken,
    live: HashMap<SocketAddr, ConnKill>,
    next_serial: u64,
}

/// What the API server, the control endpoint, the timers and `SimHandle` share.
pub(crate) struct Shared {
    world: Mutex<World>,
    token: String,
    conns: Mutex<Conns>,
    shutdown: CancellationToken,
    rt: tokio::runtime::Handle,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere (which aborts in release); the data
    // is still consistent because no method leaves it half-changed before a panic point.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }

    fn register_connection(&self, peer: SocketAddr) -> ConnKill {
        let mut c = lock(&self.conns);
        c.next_serial += 1;
        let kill = ConnKill {
            serial: c.next_serial,
            token: c.generation.child_token(),
        };
        c.live.insert(peer, kill.clone());
        kill
    }

    fn forget_connection(&self, peer: SocketAddr, serial: u64) {
        let mut c = lock(&self.conns);
        if c.live.get(&peer).is_some_and(|k| k.serial == serial) {
            c.live.remove(&peer);
        }
    }

    fn kill_connection(&self, peer: SocketAddr) {
        if let Some(k) = lock(&self.conns).live.get(&peer) {
            k.token.cancel();
        }
    }

    fn kill_all_connections(&self) {
        let mut c = lock(&self.conns);
        c.generation.cancel();
        c.generation = CancellationToken::new();
    }

    /// Starts the timers of a new intent: the abandonment clock, and the automatic
    /// terminal when it is on.
    fn arm_intent(self: &Arc<Self>, id: &str) {
        let (epoch, auto, abandon_after) = {
            let w = self.world();
            (
                w.mode_epoch,
                matches!(w.terminal, TerminalMode::Auto { .. }),
                w.abandon_after,
            )
        };
        if auto {
            self.spawn_driver(id.to_string(), epoch);
        }
        let sh = self.clone();
        let id = id.to_string();
        self.rt.spawn(async move {
            tokio::select! {
                _ = sh.shutdown.cancelled() => {}
                _ = tokio::time::sleep(abandon_after) => {
                    if sh.world().abandon_if_waiting(&id, now_ms()) {
                        tracing::debug!(intent_id = %id, "sim intent abandoned");
                    }
                }
            }
        });
    }

    fn spawn_driver(self: &Arc<Self>, id: String, epoch: u64) {
        let sh = self.clone();
        self.rt.spawn(async move { sh.drive(id, epoch).await });
    }

    /// The automatic terminal for one intent; stops at a final state, when the terminal
    /// mode changes (a newer epoch) or at shutdown.
    async fn drive(&self, id: String, epoch: u64) {
        loop {
            let step = {
                let w = self.world();
                if w.mode_epoch != epoch {
                    return;
                }
                w.auto_step(&id)
            };
            let Some((from, to, delay)) = step else {
                return;
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let mut w = self.world();
            if w.mode_epoch != epoch {
                return;
            }
            // If someone moved it meanwhile, the next turn starts from where it is now.
            if w.auto_apply(&id, from, to, now_ms()) {
                tracing::debug!(intent_id = %id, state = to.as_str(), "sim intent moved");
            }
        }
    }
}

struct HandleInner {
    addr: SocketAddr,
    control: Option<SocketAddr>,
    ca_pem: String,
    ca_path: Option<PathBuf>,
    server: axum_server::Handle<SocketAddr>,
}

/// The running simulator. Cheap to clone; every clone controls the same simulator.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
    inner: Arc<HandleInner>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

/// Starts the simulator: generates the certificates, binds the API (and the control
/// endpoint when configured) and serves in background tasks of the current runtime.
pub async fn start(cfg: SimConfig) -> Result<SimHandle, SimError> {
    // Another part of the process may have installed it already; either way ring is
    // what the server config below uses explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = net::generate(&cfg.hostnames)?;
    if let Some(path) = &cfg.ca_out {
        tokio::fs::write(path, certs.ca_pem.as_bytes())
            .await
            .map_err(|source| SimError::CaWrite {
                path: path.clone(),
                source,
            })?;
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| SimError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| SimError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let control_listener = match cfg.control {
        Some(c) => {
            let l = tokio::net::TcpListener::bind(c)
                .await
                .map_err(|source| SimError::Bind { addr: c, source })?;
            let a = l
                .local_addr()
                .map_err(|source| SimError::Bind { addr: c, source })?;
            Some((l, a))
        }
        None => None,
    };

    let shared = Arc::new(Shared {
        world: Mutex::new(World::new(&cfg)),
        token: cfg.token.clone(),
        conns: Mutex::new(Conns {
            generation: CancellationToken::new(),
            live: HashMap::new(),
            next_serial: 0,
        }),
        shutdown: CancellationToken::new(),
        rt: tokio::runtime::Handle::current(),
    });
    let server_handle = axum_server::Handle::<SocketAddr>::new();
    let acceptor =
        RustlsAcceptor::new(RustlsConfig::from_config(certs.server)).acceptor(net::SimAcceptor {
            shared: shared.clone(),
        });
    let server = axum_server::Server::<SocketAddr>::from_listener(listener)
        .acceptor(acceptor)
        .handle(server_handle.clone());
    let app = api::router(shared.clone()).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        if let Err(e) = server.serve(app).await {
            tracing::error!(error = %e, "sim api server stopped");
        }
    });

    let handle = SimHandle {
        shared: shared.clone(),
        inner: Arc::new(HandleInner {
            addr,
            control: control_listener.as_ref().map(|(_, a)| *a),
            ca_pem: certs.ca_pem,
            ca_path: cfg.ca_out.clone(),
            server: server_handle,
        }),
    };
    if let Some((listener, _)) = control_listener {
        let app = control::router(handle.clone());
        let stop = shared.shutdown.clone().cancelled_owned();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "sim control server stopped");
            }
        });
    }
    tracing::info!(addr = %addr, site = ?cfg.site, devices = cfg.devices.len(), "sim started");
    Ok(handle)
}

impl SimHandle {
    /// `https://localhost:PORT` (the certificate covers `localhost` and `127.0.0.1`).
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.inner.addr.port())
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://IP:PORT` of the control endpoint, when it was configured.
    pub fn control_url(&self) -> Option<String> {
        self.inner.control.map(|a| format!("http://{a}"))
    }

    /// The CA that signed the server certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.inner.ca_pem.clone()
    }

    /// Where the CA PEM was written (`SimConfig::ca_out`).
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.inner.ca_path.clone()
    }

    /// Every committed payment intent, in order.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.shared.world().ledger()
    }

    /// How many payment intents were committed with this `external_reference`.
    pub fn creates_for(&self, external_reference: &str) -> usize {
        self.shared.world().creates_for(external_reference)
    }

    /// The `external_reference`s committed more than once.
    pub fn duplicated_references(&self) -> Vec<String> {
        self.shared.world().duplicated_references()
    }

    /// API requests received (control requests and refused connections excluded).
    pub fn request_count(&self) -> u64 {
        self.shared.world().request_count()
    }

    /// The API requests received, in order.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared.world().requests()
    }

    /// Changes how terminals behave. Intents not yet final continue under the new mode.
    pub fn set_terminal_mode(&self, m: TerminalMode) {
        let (epoch, live) = {
            let mut w = self.shared.world();
            w.terminal = m;
            w.mode_epoch += 1;
            let live = match w.terminal {
                TerminalMode::Auto { .. } => w.live_intents(),
                TerminalMode::Manual => Vec::new(),
            };
            (w.mode_epoch, live)
        };
        for id in live {
            self.shared.spawn_driver(id, epoch);
        }
    }

    /// Moves an intent (payment or refund) to a state, as the terminal would; entering
    /// FINISHED or CONFIRMATION_REQUIRED creates the payment. Final states do not move.
    pub fn advance(&self, intent_id: &str, to: &str) -> Result<(), SimError> {
        self.shared.world().advance(intent_id, to, now_ms())
    }

    /// Sets a payment's status; an unknown payment is only logged (see
    /// `try_set_payment_status`).
    pub fn set_payment_status(&self, payment_id: &str, status: &str, status_detail: &str) {
        if let Err(e) = self.try_set_payment_status(payment_id, status, status_detail) {
            tracing::warn!(error = %e, "sim payment status not set");
        }
    }

    pub fn try_set_payment_status(
        &self,
        payment_id: &str,
        status: &str,
        status_detail: &str,
    ) -> Result<(), SimError> {
        self.shared
            .world()
            .set_payment_status(payment_id, status, status_detail, now_ms())
    }

    pub fn intent(&self, id: &str) -> Option<IntentView> {
        self.shared.world().view(id)
    }

    /// All intents (payment and refund), in creation order.
    pub fn intents(&self) -> Vec<IntentView> {
        self.shared.world().views()
    }

    /// Injects a fault into every API request (`Fault::None` clears it).
    pub fn set_fault(&self, f: Fault) {
        self.set_fault_scoped(FaultScope::All, f);
    }

    /// Injects a fault into the API requests of `scope` only.
    pub fn set_fault_scoped(&self, scope: FaultScope, f: Fault) {
        let down = f == Fault::Down;
        self.shared.world().set_fault(scope, f);
        if down {
            self.shared.kill_all_connections();
        }
    }

    /// Serve (or answer 404 to) the intent list endpoints.
    pub fn set_serve_intent_lists(&self, on: bool) {
        self.shared.world().serve_lists = on;
    }

    /// Sets a device's operating mode (`PDV`, `STANDALONE`); an unknown device is added.
    pub fn set_device_mode(&self, device: &str, mode: &str) {
        self.shared.world().set_device_mode(device, mode);
    }

    /// Stops serving: cuts every connection and stops the timers and the control endpoint.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.inner.server.shutdown();
        self.shared.kill_all_connections();
    }
}

/// `pointgate sim`: starts the simulator, prints where it listens, then runs until
/// Ctrl-C or SIGTERM. Without `ca_out` the CA goes to the temp directory, so there is
/// always a file to point a client at.
pub async fn run_cli(mut cfg: SimConfig) -> Result<(), SimError> {
    if cfg.ca_out.is_none() {
        cfg.ca_out = Some(std::env::temp_dir().join("pointgate-sim-ca.pem"));
    }
    let token = cfg.token.clone();
    let devices = cfg.devices.join(",");
    let sim = start(cfg).await?;
    println!("pointgate sim listening on {}", sim.base_url());
    match sim.control_url() {
        Some(url) => println!("control endpoint: {url}"),
        None => println!("control endpoint: off"),
    }
    if let Some(path) = sim.ca_path() {
        println!("CA certificate: {}", path.display());
    }
    println!("access token: {token}");
    println!("devices (PDV): {devices}");
    wait_for_stop().await?;
    sim.shutdown();
    Ok(())
}

async fn wait_for_stop() -> Result<(), SimError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(SimError::Signal)?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map_err(SimError::Signal),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map_err(SimError::Signal)
    }
}
