//! The control endpoint: plain HTTP with JSON bodies, the same operations as `SimHandle`,
//! for scripting the simulator from outside the process (demo scripts, integrators).
//! Faults never apply here and no token is asked: bind it to loopback.
//!
//! | request | body / answer |
//! |---|---|
//! | `POST /control/advance` | `{"intent_id": "...", "to": "FINISHED"}` |
//! | `POST /control/fault` | `{"fault": "none" \| "down" \| "status5xx" \| "too_many" \| "slow" \| "commit_then_drop" \| "commit_then_5xx", "status": 503, "retry_after_s": 2, "ms": 1500, "remaining": 1, "scope": "all" \| "creates" \| "/path/prefix"}` |
//! | `POST /control/mode` | `{"auto": {"pickup_ms": 200, "process_ms": 200}}` or `{"manual": true}` |
//! | `POST /control/payment-status` | `{"payment_id": "...", "status": "approved", "status_detail": "accredited"}` |
//! | `POST /control/serve-lists` | `{"on": false}` |
//! | `POST /control/device-mode` | `{"device": "...", "mode": "STANDALONE"}` |
//! | `GET /control/ledger` | `{"entries": [...], "duplicated_references": [...]}` |
//! | `GET /control/intents` | `[{"id", "kind", "device_id", "state", ...}]` |
//! | `GET /control/stats` | `{"request_count": n}` |
//!
//! Errors answer 400/404/409 with `{"error": "..."}`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{Fault, FaultScope, SimError, SimHandle, TerminalMode};

pub(crate) fn router(handle: SimHandle) -> Router {
    Router::new()
        .route("/control/advance", post(advance))
        .route("/control/fault", post(fault))
        .route("/control/mode", post(mode))
        .route("/control/payment-status", post(payment_status))
        .route("/control/serve-lists", post(serve_lists))
        .route("/control/device-mode", post(device_mode))
        .route("/control/ledger", get(ledger))
        .route("/control/intents", get(intents))
        .route("/control/stats", get(stats))
        .with_state(handle)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn from_sim(e: SimError) -> Response {
    let status = match e {
        SimError::UnknownIntent(_) | SimError::UnknownPayment(_) => StatusCode::NOT_FOUND,
        SimError::InvalidTransition { .. } => StatusCode::CONFLICT,
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, e.to_string())
}

fn ok() -> Response {
    Json(json!({ "ok": true })).into_response()
}

#[derive(Deserialize)]
struct Advance {
    intent_id: String,
    to: String,
}

async fn advance(State(h): State<SimHandle>, Json(a): Json<Advance>) -> Response {
    match h.advance(&a.intent_id, &a.to) {
        Ok(()) => ok(),
        Err(e) => from_sim(e),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum FaultKind {
    None,
    Down,
    Status5xx,
    TooMany,
    Slow,
    CommitThenDrop,
    CommitThen5xx,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultBody {
    fault: FaultKind,
    status: Option<u16>,
    retry_after_s: Option<u32>,
    ms: Option<u64>,
    remaining: Option<u32>,
    scope: Option<String>,
}

impl FaultBody {
    fn into_fault(self) -> Result<(FaultScope, Fault), String> {
        let scope = match self.scope.as_deref() {
            None | Some("all") => FaultScope::All,
            Some("creates") => FaultScope::Creates,
            Some(p) if p.starts_with('/') => FaultScope::PathPrefix(p.to_string()),
            Some(other) => {
                return Err(format!(
                    "scope: all, creates or a path starting with /, not {other:?}"
                ))
            }
        };
        let status = self.status.unwrap_or(500);
        if !(500..=599).contains(&status) {
            return Err("status: must be 500 to 599".to_string());
        }
        let remaining = self.remaining;
        let fault = match self.fault {
            FaultKind::None => Fault::None,
            FaultKind::Down => Fault::Down,
            FaultKind::Status5xx => Fault::Status5xx { status, remaining },
            FaultKind::TooMany => Fault::TooMany {
                retry_after_s: self.retry_after_s.unwrap_or(1),
                remaining,
            },
            FaultKind::Slow => Fault::Slow(Duration::from_millis(self.ms.unwrap_or(1000))),
            FaultKind::CommitThenDrop => Fault::CommitThenDrop { remaining },
            FaultKind::CommitThen5xx => Fault::CommitThen5xx { status, remaining },
        };
        Ok((scope, fault))
    }
}

async fn fault(State(h): State<SimHandle>, Json(b): Json<FaultBody>) -> Response {
    match b.into_fault() {
        Ok((scope, fault)) => {
            h.set_fault_scoped(scope, fault);
            ok()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoBody {
    pickup_ms: u64,
    process_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeBody {
    auto: Option<AutoBody>,
    manual: Option<bool>,
}

async fn mode(State(h): State<SimHandle>, Json(b): Json<ModeBody>) -> Response {
    let mode = match (b.auto, b.manual) {
        (Some(a), None | Some(false)) => TerminalMode::Auto {
            pickup: Duration::from_millis(a.pickup_ms),
            process: Duration::from_millis(a.process_ms),
        },
        (None, Some(true)) => TerminalMode::Manual,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give either auto {pickup_ms, process_ms} or manual: true",
            )
        }
    };
    h.set_terminal_mode(mode);
    ok()
}

#[derive(Deserialize)]
struct PaymentStatus {
    payment_id: String,
    status: String,
    status_detail: String,
}

async fn payment_status(State(h): State<SimHandle>, Json(b): Json<PaymentStatus>) -> Response {
    match h.try_set_payment_status(&b.payment_id, &b.status, &b.status_detail) {
        Ok(()) => ok(),
        Err(e) => from_sim(e),
    }
}

#[derive(Deserialize)]
struct ServeLists {
    on: bool,
}

async fn serve_lists(State(h): State<SimHandle>, Json(b): Json<ServeLists>) -> Response {
    h.set_serve_intent_lists(b.on);
    ok()
}

#[derive(Deserialize)]
struct DeviceMode {
    device: String,
    mode: String,
}

async fn device_mode(State(h): State<SimHandle>, Json(b): Json<DeviceMode>) -> Response {
    h.set_device_mode(&b.device, &b.mode);
    ok()
}

async fn ledger(State(h): State<SimHandle>) -> Response {
    Json(json!({
        "entries": h.ledger(),
        "duplicated_references": h.duplicated_references(),
    }))
    .into_response()
}

async fn intents(State(h): State<SimHandle>) -> Response {
    Json(h.intents()).into_response()
}

async fn stats(State(h): State<SimHandle>) -> Response {
    Json(json!({ "request_count": h.request_count() })).into_response()
}
