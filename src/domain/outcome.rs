//! What the agent tells stations: the contract's event states (`State`), wait reasons,
//! refusal and error codes, how an outcome was resolved, and the payloads that carry
//! them (`Event`, `AgentStatus`, `TerminalState`). Pure data; serialization only.
//!
//! Events are rendered once, when the state change that causes them is stored, and kept
//! as bytes in the outbox; what a station receives is exactly what was stored.

use serde::{Deserialize, Serialize};

use crate::domain::command::CommandType;

/// Where a request's events go. The station link renders it as a topic; the engine and
/// the store never see topic names. Stored in the outbox (`store::record`): variants are
/// append-only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Address {
    /// The station's own event topic (`P/station/<id>/evt`).
    Station(String),
    /// The MQTT 5 Response Topic its command named, once the link allowed it.
    Reply(String),
    /// A topic rendered before the outbox format 2 (entries written by 0.1 agents).
    Topic(String),
}

/// The contract's event states, for every request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Accepted,
    Waiting,
    Sent,
    OnTerminal,
    Processing,
    NeedsAttention,
    Approved,
    Declined,
    Canceled,
    Expired,
    Failed,
    Refunded,
    Done,
    Refused,
    Answered,
}

impl State {
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            State::Accepted
                | State::Waiting
                | State::Sent
                | State::OnTerminal
                | State::Processing
                | State::NeedsAttention
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Accepted => "accepted",
            State::Waiting => "waiting",
            State::Sent => "sent",
            State::OnTerminal => "on_terminal",
            State::Processing => "processing",
            State::NeedsAttention => "needs_attention",
            State::Approved => "approved",
            State::Declined => "declined",
            State::Canceled => "canceled",
            State::Expired => "expired",
            State::Failed => "failed",
            State::Refunded => "refunded",
            State::Done => "done",
            State::Refused => "refused",
            State::Answered => "answered",
        }
    }
}

/// Why a request waits (`reason` on `waiting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    TerminalBusy,
    ApiUnreachable,
    RateLimited,
    Unauthorized,
}

/// Every refusal and failure code of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    TooLarge,
    BadVersion,
    MissingField,
    BadField,
    BadAmount,
    AmountOutOfRange,
    UnknownStation,
    UnknownTerminal,
    TerminalNotBound,
    TerminalUnavailable,
    UnknownTarget,
    Conflict,
    DuplicateReference,
    NotCancelable,
    NotRefundable,
    QueueFull,
    StorageUnavailable,
    // `failed` codes
    ApiRefused,
    TerminalError,
    Unauthorized,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentInfo {
    pub id: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolvedBy {
    Lookup,
    Operator,
}

/// One event to a station. Absent optional fields are left out of the JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub v: u8,
    /// `null` only on a refusal of a payload that names no `request_id`.
    pub request_id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<CommandType>,
    pub state: State,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub seq: u32,
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment: Option<PaymentInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<WaitReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<ResolvedBy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<Box<Event>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Box<Event>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminals: Option<Vec<TerminalState>>,
}

impl Event {
    /// A bare event with only the always-present fields set.
    pub fn new(
        request_id: Option<String>,
        kind: Option<CommandType>,
        state: State,
        seq: u32,
        at: String,
    ) -> Event {
        Event {
            v: 1,
            request_id,
            kind,
            state,
            is_final: state.is_final(),
            seq,
            at,
            terminal: None,
            amount: None,
            intent_id: None,
            payment: None,
            error: None,
            reason: None,
            resolved_by: None,
            current: None,
            target: None,
            terminals: None,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these plain structs to JSON cannot fail (no maps with non-string
        // keys, no custom serializers that error).
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `P/agent/status`, retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub v: u8,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_pending_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// `P/terminal/<id>/state`, retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalState {
    pub v: u8,
    pub terminal: String,
    /// `PDV`, `STANDALONE` or `UNKNOWN`.
    pub mode: String,
    pub busy: bool,
    pub current: Option<String>,
    pub waiting: u32,
}
