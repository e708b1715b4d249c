//! pointgate: the in-store agent between MQTT checkout stations and Mercado Pago Point
//! terminals.
//!
//! ```text
//!  stations ──MQTT──▶ station::link ──port──▶ engine (one task) ──▶ point::PointBackend ──HTTPS──▶ Mercado Pago
//!       ▲                   │                   │   ▲                  (point::integrations)
//!       └──── events ◀──────┘◀──── outbox ──────┘   └─ machine (pure state machines)
//!                                               │
//!                                             store (sled: requests, refs, outbox)
//! ```
//!
//! Layers, bottom to top (`docs/architecture.md`; `tests/layering.rs` checks them):
//! - `money`, `domain` (commands, outcomes, what the API said, ids, operator verbs) and
//!   `machine` (the charge and refund state machines): pure.
//! - `store`: the only code that touches sled; versioned records, real fsync.
//! - `engine`: the driver, one task; `engine::port` is all an adapter may use.
//! - `point`: the Point API behind one trait; `point::integrations` is the backend.
//! - Adapters: `station` (the MQTT link and topics), `control` (the operator socket),
//!   `service` (readiness, watchdog), sharing `mqtt` for what MQTT links have in common.
//! - `config`: the one config tree, loaded and validated once; `charge`: `pointgate
//!   charge`, a station on the command line; `sim`, `broker`, `demo`: developer tools.
//!
//! Only this file wires the parts together.
//!
//! SIGHUP (see [`run_with_reloads`]) re-reads the token file and the `[stations.*]`
//! tables; everything else in the configuration takes effect at the next start.
//!
//! `docs/architecture.md` says which file owns what.

#![forbid(unsafe_code)]

#[cfg(feature = "devtools")]
pub mod broker;
pub mod charge;
pub mod config;
pub mod control;
#[cfg(feature = "devtools")]
pub mod demo;
pub mod domain;
pub mod engine;
pub mod failpoint;
pub mod logging;
pub mod machine;
pub mod money;
pub mod mqtt;
pub mod point;
pub mod service;
#[cfg(feature = "devtools")]
pub mod sim;
pub mod station;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use config::{BackendKind, Config, ConfigError};
use engine::{Engine, Settings, SystemClock};
use machine::charge::Timing;
use station::link::LinkConfig;
use station::topics::Topics;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A configuration problem found at start (exit 78).
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Link(#[from] station::link::LinkError),
}

/// How long a stop may take to make state durable and say `offline`; below the unit's
/// `TimeoutStopSec`.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// The engine's settings from the config.
pub fn engine_settings(config: &Config) -> Settings {
    Settings {
        site: config.store.site,
        store_id: config.store.id.clone(),
        stations: config.stations.clone(),
        charge_ttl_ms: ms(config.queue.charge_ttl),
        refund_ttl_ms: ms(config.queue.refund_ttl),
        max_pending: config.queue.max_pending as usize,
        retention_ms: ms(config.queue.retention),
        timing: Timing {
            poll_interval_ms: ms(config.point.poll_interval),
            terminal_timeout_ms: ms(config.point.terminal_timeout),
            confirm_window_ms: ms(config.point.confirm_window),
            confirm_window_max_ms: ms(config.point.confirm_window_max),
        },
        max_requests_per_second: config.point.max_requests_per_second,
        devices_refresh: config.point.devices_refresh,
        backend: match config.point.backend {
            BackendKind::Integrations => "integrations",
            BackendKind::Orders => "orders",
        },
    }
}

/// The station link's settings from the config.
pub fn link_config(config: &Config) -> Result<LinkConfig, RunError> {
    let opt = |p: &std::path::Path| (!p.as_os_str().is_empty()).then(|| p.to_path_buf());
    let password = match opt(&config.mqtt.password_file) {
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .map_err(|e| RunError::Config(format!("mqtt.password_file: {}: {e}", p.display())))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    Ok(LinkConfig {
        url: config.mqtt.url.clone(),
        client_id: config.client_id(),
        username: (!config.mqtt.username.is_empty()).then(|| config.mqtt.username.clone()),
        password,
        keep_alive: config.mqtt.keep_alive,
        ca_file: opt(&config.mqtt.ca_file),
        cert_file: opt(&config.mqtt.cert_file),
        key_file: opt(&config.mqtt.key_file),
        topics: Topics::new(config.topic_prefix()),
    })
}

/// A reload (SIGHUP): the configuration as read again from its file, or why it could not
/// be read. The token file is re-read either way; the stations change only with `Ok`.
pub type Reload = Result<Config, ConfigError>;

/// Run the agent until `shutdown` is cancelled: open the store, resume every open
/// request, connect to the broker and the API. Returns once state is durable and the
/// broker was told `offline` (or the drain timeout passed).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let (_never, reloads) = mpsc::channel(1);
    run_with_reloads(config, shutdown, reloads).await
}

/// As [`run`], and each [`Reload`] received re-reads the access token file (on error
/// the previous token stays) and, when the new configuration is valid, replaces the
/// `[stations.*]` tables (on error the old ones stay, and the log names the key).
pub async fn run_with_reloads(
    config: Config,
    shutdown: CancellationToken,
    reloads: mpsc::Receiver<Reload>,
) -> Result<(), RunError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if config.point.backend == BackendKind::Orders {
        return Err(RunError::Config(
            "point.backend: the orders backend is not available in this version".into(),
        ));
    }
    let http = point::http::HttpClient::new(&point::http::HttpConfig::from_point(&config.point))
        .map_err(|e| RunError::Config(e.to_string()))?;
    let backend = Arc::new(point::integrations::IntegrationsClient::new(
        http.clone(),
        config.store.site,
    ));
    let store = store::Store::open(&config.queue.dir)?;
    let link_cfg = link_config(&config)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        backend = "integrations",
        broker = %config.mqtt.url,
        store = %config.queue.dir.display(),
        "pointgate starting"
    );

    let (handle, rx) = engine::channel();
    let (link_tx, link_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut engine = Engine::new(
        engine_settings(&config),
        store,
        backend,
        Arc::new(SystemClock),
        link_tx,
    );
    let resumed = engine.recover(&engine::TimeFacts::read())?;
    tracing::info!(resumed, "store open; open requests resumed");

    let tasks = tokio_util::task::TaskTracker::new();
    let engine_stop = CancellationToken::new();
    let watchdog_handle = handle.clone();
    let engine_task = tasks.spawn(engine.run(rx, engine_stop.clone()));
    match control::bind(&config.control.socket) {
        Ok(listener) => {
            tracing::info!(socket = %config.control.socket.display(), "control socket listening");
            tasks.spawn(control::serve(
                listener,
                config.control.socket.clone(),
                handle.clone(),
                shutdown.clone(),
            ));
        }
        // The agent takes payments without it; only the operator commands are missing.
        Err(e) => {
            tracing::warn!(error = %e, "control socket unavailable: pointgate status and queue will not work")
        }
    }
    tasks.spawn(reload_loop(
        reloads,
        http,
        handle.clone(),
        config.point.access_token_file.clone(),
        shutdown.clone(),
    ));
    let link_task = tasks.spawn(station::link::run(
        link_cfg,
        handle,
        link_rx,
        shutdown.clone(),
    ));
    if let Some(interval) = service::watchdog_interval() {
        tasks.spawn(service::watchdog(
            watchdog_handle,
            interval,
            shutdown.clone(),
        ));
    }
    tasks.close();
    // Ready: the store is open, open requests are resumed and the tasks run. Not waiting
    // for the broker or the API: their health goes to the status topic.
    service::notify_ready(resumed);

    shutdown.cancelled().await;
    service::notify_stopping();
    // The link says offline and disconnects; then the engine makes its state durable.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let link = link_task.await;
        engine_stop.cancel();
        let _ = engine_task.await;
        link
    })
    .await;
    match drained {
        Ok(Ok(res)) => res?,
        Ok(Err(e)) => tracing::error!(error = %e, "link task failed"),
        Err(_) => tracing::warn!("drain timeout: stopping anyway"),
    }
    Ok(())
}

/// Applies each [`Reload`] until `shutdown` or until the sender is gone.
async fn reload_loop(
    mut reloads: mpsc::Receiver<Reload>,
    http: point::http::HttpClient,
    engine: engine::EngineHandle,
    token_file: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    loop {
        let reload = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = reloads.recv() => r,
        };
        let Some(reload) = reload else { return };
        match http.reload_token() {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "reload: the token file was refused; the previous token stays in use")
            }
        }
        match reload {
            Ok(fresh) => {
                if fresh.point.access_token_file != token_file {
                    tracing::warn!(
                        key = "point.access_token_file",
                        "reload: a new token file path takes effect at the next start"
                    );
                }
                engine
                    .send(engine::ToEngine::Reload {
                        stations: fresh.stations,
                    })
                    .await;
            }
            Err(e) => tracing::error!(
                key = e.key().unwrap_or("-"),
                error = %e,
                "reload: the configuration is not valid; the current stations stay"
            ),
        }
    }
}
