//! What the Point API said, in backend-neutral terms: the create request the engine
//! builds, where a remote charge stands (`Phase`, `RemoteCharge`), payments, refunds,
//! devices, and what a failed call means to the machines (`Failure`). Every backend
//! (`point::integrations`, later the Orders API) maps its own answers to these. Pure data.

use serde::{Deserialize, Serialize};

use crate::domain::command::MlbPayment;
use crate::money::Cents;

/// What the engine asks for when it creates a charge on a terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateCharge {
    pub terminal: String,
    pub amount: Cents,
    /// Unique per charge within the retention period; the reconcile key.
    pub external_reference: String,
    pub description: Option<String>,
    /// MLA: printed on the receipt (required by the MLA schema).
    pub ticket_number: Option<String>,
    pub print_on_terminal: bool,
    /// MLB only.
    pub payment: Option<MlbPayment>,
    /// Orders API: generated and stored before the first send, reused on every retry.
    /// The integrations backend ignores it (payment intents have no idempotency key).
    pub idempotency_key: Option<String>,
}

/// Where a remote charge (payment intent or order) stands, normalized across backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Created and queued, not yet pulled by the terminal (intent `OPEN`). Cancelable.
    Open,
    /// Pulled by the terminal (`ON_TERMINAL`).
    OnTerminal,
    /// Being settled (`PROCESSING`, `PROCESSED`).
    Processing,
    /// Ended with a payment to look up (`FINISHED`, `CONFIRMATION_REQUIRED`).
    /// Never a success by itself: the payment must be confirmed.
    Ended,
    /// `CANCELED`.
    Canceled,
    /// `ERROR`.
    Error,
    /// `ABANDONED`.
    Abandoned,
    /// A state this build does not know; the raw string is in `RemoteCharge::raw_state`.
    Unknown,
}

impl Phase {
    /// True when the remote charge will not change any more.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Phase::Ended | Phase::Canceled | Phase::Error | Phase::Abandoned
        )
    }
}

/// A remote charge as the API reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCharge {
    pub id: String,
    pub phase: Phase,
    /// The state exactly as the API wrote it (`FINISHED`, `CONFIRMATION_REQUIRED`, ...).
    pub raw_state: String,
    pub terminal: Option<String>,
    pub amount: Option<Cents>,
    pub external_reference: Option<String>,
    /// The payment id, once the API gives one (string or number on the wire).
    pub payment_id: Option<String>,
}

/// An entry of the intent list by date (`.../payment-intents/events`), used to reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedCharge {
    pub id: String,
    pub raw_state: String,
    /// Unix seconds, when the API gave a parseable `created_on`.
    pub created_unix: Option<i64>,
}

/// A payment from `GET /v1/payments/{id}` or the payment search.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub id: String,
    /// `approved`, `rejected`, `cancelled`, `refunded`, `in_process`, ... as given.
    pub status: String,
    pub status_detail: Option<String>,
    /// `transaction_amount` converted from major units to cents.
    pub amount: Option<Cents>,
    /// `transaction_amount_refunded` in cents.
    pub refunded: Option<Cents>,
    pub external_reference: Option<String>,
}

/// A refund made through the payments API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub id: String,
    pub status: Option<String>,
    pub amount: Option<Cents>,
}

/// A Point device from the device listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    /// `PDV`, `STANDALONE`, or whatever else the API says; `None` when absent.
    pub operating_mode: Option<String>,
    pub store_id: Option<String>,
    pub pos_id: Option<String>,
    pub external_pos_id: Option<String>,
}

/// An intent found by reconcile whose `external_reference` is this charge's, with
/// what the match still needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub remote: RemoteCharge,
    /// When the API says it was created (Unix ms), if it said so readably.
    pub created_ms: Option<i64>,
    /// Its device is this charge's terminal.
    pub device_matches: bool,
}

/// Why an API call failed, as far as the machine cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Could not reach the API, 5xx on a read, or 429. Retry later.
    Unreachable {
        retry_after_ms: Option<i64>,
        rate_limited: bool,
    },
    /// The request may have been committed (no answer, 5xx on a create).
    Ambiguous,
    /// 401/403.
    Unauthorized,
    /// 409: the terminal holds a queued intent (create), or the intent is on the
    /// terminal (cancel).
    Conflict,
    /// 404.
    NotFound,
    /// Another 4xx: Mercado Pago refused the request. For a person.
    Refused { message: String },
}
