//! The simulated Mercado Pago API over HTTP: the routes of the Point Integrations API
//! and the payments API endpoints, and the middleware every API request passes through
//! (request log, injected fault, bearer token, `x-request-id`).
//!
//! Handlers only translate: each takes the lock on the world once, calls one `World`
//! method, releases it, then (for creates) arms the intent's timers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::{Json, Router};
use serde_json::Value;

use super::world::{now_ms, uuid_v4, ApiFail, FaultAction};
use super::{RequestLog, Shared};

const IA: &str = "/point/integration-api";

impl IntoResponse for ApiFail {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

fn answer(result: Result<Value, ApiFail>) -> Response {
    match result {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(&format!("{IA}/devices"), get(list_devices))
        .route(&format!("{IA}/devices/{{device}}"), patch(patch_device))
        .route(
            &format!("{IA}/devices/{{device}}/payment-intents"),
            post(create_intent),
        )
        .route(
            &format!("{IA}/devices/{{device}}/payment-intents/{{id}}"),
            delete(cancel_intent),
        )
        .route(
            &format!("{IA}/devices/{{device}}/refund"),
            post(create_refund_intent),
        )
        .route(
            &format!("{IA}/devices/{{device}}/refund/{{id}}"),
            delete(cancel_refund_intent),
        )
        .route(&format!("{IA}/payment-intents/events"), get(intent_events))
        .route(&format!("{IA}/payment-intents/{{id}}"), get(get_intent))
        .route(
            &format!("{IA}/payment-intents/{{id}}/events"),
            get(intent_last_event),
        )
        .route(&format!("{IA}/refund/{{id}}"), get(get_refund_intent))
        .route("/v1/payments/search", get(search_payments))
        .route("/v1/payments/{id}", get(get_payment))
        .route(
            "/v1/payments/{id}/refunds",
            post(refund_payment).get(list_refunds),
        )
        .fallback(|| async { ApiFail::not_found("not found") })
        .layer(middleware::from_fn_with_state(shared.clone(), api_layer))
        .with_state(shared)
}

/// Fault, then token, then the handler; logs the request and stamps `x-request-id`.
async fn api_layer(
    State(sh): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let at_unix_ms = now_ms();
    let request_id = uuid_v4();
    let action = sh.world().take_fault(&method, &path);

    let mut dropped = false;
    let mut response = match action {
        FaultAction::Pass => authorized(&sh, req, next).await,
        FaultAction::Drop => {
            sh.kill_connection(peer);
            dropped = true;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        FaultAction::Status(status) => {
            ApiFail::new(status, "internal_server_error", "internal server error").into_response()
        }
        FaultAction::TooMany(secs) => {
            let mut r = ApiFail::new(429, "too_many_requests", "too many requests").into_response();
            r.headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
            r
        }
        FaultAction::Slow(delay) => {
            tokio::time::sleep(delay).await;
            authorized(&sh, req, next).await
        }
        FaultAction::CommitThenDrop => {
            let r = authorized(&sh, req, next).await;
            // The work is done (committed under the world lock); now lose the answer.
            sh.kill_connection(peer);
            dropped = true;
            r
        }
        FaultAction::CommitThenStatus(status) => {
            let _ = authorized(&sh, req, next).await;
            ApiFail::new(status, "internal_server_error", "internal server error").into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let status = if dropped {
        0
    } else {
        response.status().as_u16()
    };
    tracing::debug!(
        method = %method,
        path = %path,
        status,
        request_id = %request_id,
        fault = ?action,
        "sim api request"
    );
    sh.world().log_request(RequestLog {
        method,
        path,
        at_unix_ms,
        status,
    });
    response
}

async fn authorized(sh: &Shared, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == sh.token);
    if !ok {
        let body = serde_json::json!({
            "message": "invalid_token",
            "error": "unauthorized",
            "status": 401,
            "cause": [],
        });
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    next.run(req).await
}

type Q = Query<HashMap<String, String>>;

async fn list_devices(State(sh): State<Arc<Shared>>, Query(q): Q) -> Response {
    answer(sh.world().list_devices(&q))
}

async fn patch_device(
    State(sh): State<Arc<Shared>>,
    Path(device): Path<String>,
    body: Bytes,
) -> Response {
    answer(sh.world().patch_device(&device, &body))
}

async fn create_intent(
    State(sh): State<Arc<Shared>>,
    Path(device): Path<String>,
    body: Bytes,
) -> Response {
    let created = sh.world().create_intent(&device, &body, now_ms());
    match created {
        Ok((v, id)) => {
            sh.arm_intent(&id);
            Json(v).into_response()
        }
        Err(f) => f.into_response(),
    }
}

async fn get_intent(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    answer(sh.world().get_intent(&id))
}

async fn cancel_intent(
    State(sh): State<Arc<Shared>>,
    Path((device, id)): Path<(String, String)>,
) -> Response {
    answer(sh.world().cancel_intent(&device, &id, now_ms()))
}

async fn intent_events(State(sh): State<Arc<Shared>>, Query(q): Q) -> Response {
    answer(sh.world().intent_events(&q))
}

async fn intent_last_event(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    answer(sh.world().intent_last_event(&id))
}

async fn create_refund_intent(
    State(sh): State<Arc<Shared>>,
    Path(device): Path<String>,
    body: Bytes,
) -> Response {
    let created = sh.world().create_refund_intent(&device, &body, now_ms());
    match created {
        Ok((v, id)) => {
            sh.arm_intent(&id);
            Json(v).into_response()
        }
        Err(f) => f.into_response(),
    }
}

async fn get_refund_intent(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    answer(sh.world().get_refund_intent(&id))
}

async fn cancel_refund_intent(
    State(sh): State<Arc<Shared>>,
    Path((device, id)): Path<(String, String)>,
) -> Response {
    answer(sh.world().cancel_refund_intent(&device, &id, now_ms()))
}

async fn get_payment(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    answer(sh.world().get_payment(&id))
}

async fn search_payments(State(sh): State<Arc<Shared>>, Query(q): Q) -> Response {
    answer(sh.world().search_payments(&q))
}

async fn refund_payment(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = headers
        .get("x-idempotency-key")
        .and_then(|v| v.to_str().ok());
    match sh.world().refund_payment(&id, &body, key, now_ms()) {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(f) => f.into_response(),
    }
}

async fn list_refunds(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    answer(sh.world().list_refunds(&id))
}
