//! The Mercado Pago Point API, seen from the engine: one trait (`PointBackend`) and the
//! normalized types it speaks, one module per backend, and the shared HTTP client.
//!
//! - `http`: the rustls-only HTTP client (built-in web roots plus `point.extra_ca_file`),
//!   bearer token, timeouts, and the mapping of every failure to `ApiError`.
//! - `integrations`: the Point Integrations API (payment intents, devices, refund
//!   intents) and the payments API endpoints it needs, complete and typed; it implements
//!   `PointBackend`.
//! - The Orders API will be a second implementation of the same trait.
//!
//! Rules: lenient in what we accept (ids as string or number, unknown states kept raw,
//! every optional field optional), strict in what we send (per-site fields only).

pub mod http;
pub mod integrations;
pub mod lenient;

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::money::Cents;

pub use crate::domain::remote::{
    Candidate, CreateCharge, Device, Failure, ListedCharge, Payment, Phase, Refund, RemoteCharge,
};

/// Mercado Pago's error body, parsed leniently (`message`, `error`, `status`, `cause`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MpErrorBody {
    pub message: Option<String>,
    pub error: Option<String>,
    pub status: Option<u16>,
    /// `cause` kept as raw JSON text: its shape varies.
    pub cause: Option<String>,
}

/// How a request failed. Keeps what an operator needs: status, body, `x-request-id`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The API answered with a non-success status.
    #[error("{method} {path}: HTTP {status}{}{}", .body.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default(), .request_id.as_deref().map(|r| format!(" (x-request-id {r})")).unwrap_or_default())]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: MpErrorBody,
        /// The body as received (truncated to 2 KiB), for when it is not JSON.
        raw_body: String,
        request_id: Option<String>,
        retry_after: Option<Duration>,
    },
    /// The request never left: connection refused, DNS, TLS handshake refused.
    /// Safe to retry a create after this: nothing can have been committed.
    #[error("{method} {path}: could not connect: {message}")]
    Connect {
        method: &'static str,
        path: String,
        message: String,
    },
    /// The request may have reached the API but no usable answer came back (timeout,
    /// reset after sending, truncated body). A create that fails this way is ambiguous.
    #[error("{method} {path}: no answer: {message}")]
    NoAnswer {
        method: &'static str,
        path: String,
        message: String,
    },
    /// A 2xx whose body we could not understand at all.
    #[error("{method} {path}: unreadable answer: {message}")]
    Decode {
        method: &'static str,
        path: String,
        message: String,
    },
    /// We refused to send: the request breaks a rule we know (per-site fields, limits).
    #[error("not sent: {0}")]
    Invalid(String),
    /// The access token file could not be read.
    #[error("access token: {0}")]
    Token(String),
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when a create that failed this way may nevertheless exist at Mercado Pago:
    /// no answer, an unreadable 2xx, or a 5xx (the API may commit, then fail).
    pub fn is_ambiguous(&self) -> bool {
        match self {
            ApiError::NoAnswer { .. } | ApiError::Decode { .. } => true,
            ApiError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// True when the API could not be reached or was overloaded: worth retrying later.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ApiError::Connect { .. } | ApiError::NoAnswer { .. } => true,
            ApiError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// True when the token was refused (401/403).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self.status(), Some(401) | Some(403))
    }

    /// The server's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A one-line message for a person (goes into `error.message` of `failed`).
    pub fn person_message(&self) -> String {
        match self {
            ApiError::Status {
                status,
                body,
                raw_body,
                ..
            } => {
                let what = body
                    .message
                    .clone()
                    .or_else(|| body.error.clone())
                    .unwrap_or_else(|| raw_body.chars().take(200).collect());
                format!("Mercado Pago answered {status}: {what}")
            }
            other => other.to_string(),
        }
    }
}

/// The engine's view of a Point backend. One implementation per Mercado Pago API; the
/// engine never sees HTTP. All methods are cancel-safe in the sense that dropping the
/// future leaves nothing half-done on our side (the remote side may still commit: that
/// is what `ApiError::is_ambiguous` and reconcile are for).
pub trait PointBackend: Send + Sync + 'static {
    /// True when `create_charge` sends `CreateCharge::idempotency_key` and the API
    /// honours it (the Orders API): then a retry after an ambiguous failure cannot create
    /// a second charge, and the engine retries with the same key instead of reconciling.
    /// Payment intents have no key.
    fn idempotent_create(&self) -> bool {
        false
    }

    /// What a failed call means to the machines; `creating` when the call was a create
    /// (a lost answer may then have left a charge behind). Each API has its own codes.
    fn failure(&self, e: &ApiError, creating: bool) -> Failure;

    /// Reconcile: the charges carrying `reference` created at or after `from_ms` (Unix
    /// ms, the caller's skew allowance included) up to `until_ms`, each with whether its
    /// device is `terminal`; requests paced `pace` apart. `Ok(None)` when the API serves
    /// no such search. The backend's own strategy (listing by day, or a lookup by key).
    fn find_created(
        &self,
        from_ms: i64,
        until_ms: i64,
        reference: &str,
        terminal: &str,
        pace: Duration,
    ) -> impl Future<Output = Result<Option<Vec<Candidate>>, ApiError>> + Send;

    /// Devices visible to the token (all pages).
    fn list_devices(&self) -> impl Future<Output = Result<Vec<Device>, ApiError>> + Send;

    /// Create a charge on a terminal (payment intent / order).
    fn create_charge(
        &self,
        req: &CreateCharge,
    ) -> impl Future<Output = Result<RemoteCharge, ApiError>> + Send;

    /// Read a charge by its id.
    fn get_charge(&self, id: &str) -> impl Future<Output = Result<RemoteCharge, ApiError>> + Send;

    /// Cancel a charge still queued for its terminal (`Phase::Open`).
    fn cancel_charge(
        &self,
        terminal: &str,
        id: &str,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Charges created on the UTC day `date` (`YYYY-MM-DD`). Reconcile uses it.
    /// `Ok(None)` when the API does not serve such a listing.
    fn list_charges_on(
        &self,
        date: time::Date,
    ) -> impl Future<Output = Result<Option<Vec<ListedCharge>>, ApiError>> + Send;

    /// `GET /v1/payments/{id}`.
    fn get_payment(&self, id: &str) -> impl Future<Output = Result<Payment, ApiError>> + Send;

    /// Payments whose `external_reference` is this one.
    fn search_payments(
        &self,
        external_reference: &str,
    ) -> impl Future<Output = Result<Vec<Payment>, ApiError>> + Send;

    /// Create a full, card-present refund of `payment_id` on the terminal that took it
    /// (a refund intent). The answer is normalized like a charge: `amount` and
    /// `external_reference` are `None`, `payment_id` is the refunded payment.
    fn create_refund_on_terminal(
        &self,
        terminal: &str,
        payment_id: &str,
    ) -> impl Future<Output = Result<RemoteCharge, ApiError>> + Send;

    /// Read a refund intent by its id (its states are a charge's: OPEN, ON_TERMINAL,
    /// PROCESSING, FINISHED, CANCELED, ERROR, ABANDONED).
    fn get_refund_on_terminal(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<RemoteCharge, ApiError>> + Send;

    /// Cancel a refund intent still queued for its terminal (`Phase::Open`).
    fn cancel_refund_on_terminal(
        &self,
        terminal: &str,
        id: &str,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// `POST /v1/payments/{id}/refunds`: full when `amount` is `None`.
    fn refund_payment(
        &self,
        payment_id: &str,
        amount: Option<Cents>,
        idempotency_key: &str,
    ) -> impl Future<Output = Result<Refund, ApiError>> + Send;
}
