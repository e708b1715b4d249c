//! What an operator asks of a running agent and what the engine answers: the verbs of
//! `pointgate status` and `pointgate queue` (`ControlRequest`, `ControlReply` and their
//! views). Pure data; the control socket (`control::protocol`) carries them as JSON lines,
//! and any later operator channel can carry the same ones.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::command::CommandType;
use crate::domain::outcome::{AgentStatus, TerminalState};

/// What an operator asks. Ids are `<station>/<request_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The agent's status, its pending requests by state, its terminals and stations.
    Status,
    /// Open requests and those that ended in the last hour.
    List,
    /// One request: its stored fields and latest event.
    Show { id: String },
    /// Cancel a charge, as its station's `cancel` would.
    Cancel { id: String },
    /// End a `needs_attention` charge after checking the terminal.
    Resolve { id: String, outcome: Outcome },
}

/// An operator's verdict on a `needs_attention` charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Approved,
    Declined,
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum ControlReply {
    Status(StatusView),
    List(ListView),
    Show(RequestDetail),
    /// A cancel or resolve was applied and stored; `request` is where it stands now.
    Changed(ChangeView),
    Error(ControlFailure),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// As `agent/status` says it, computed now.
    pub agent: AgentStatus,
    pub pending: PendingSummary,
    pub terminals: Vec<TerminalState>,
    /// Station id → its bound terminals, as configured now (after any SIGHUP).
    pub stations: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSummary {
    /// Requests that are not final (charges and cancels).
    pub total: u64,
    /// Latest state → how many open requests are in it.
    pub by_state: BTreeMap<String, u64>,
    pub oldest_pending_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListView {
    /// Open requests first (oldest first), then recent final ones (newest first).
    pub requests: Vec<RequestRow>,
}

/// One request, as a line of `queue list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRow {
    /// `<station>/<request_id>`.
    pub id: String,
    pub station: String,
    pub request_id: String,
    #[serde(rename = "type")]
    pub kind: CommandType,
    /// The state of its latest event.
    pub state: String,
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Seconds since the agent received it.
    pub age_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    /// `reason` of a `waiting` event, or `error.code` of a `failed` one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The charge a cancel is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One request in full, for `queue show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestDetail {
    #[serde(flatten)]
    pub row: RequestRow,
    pub received_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_at: Option<String>,
    /// When a charge not yet sent expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<String>,
    /// The engine's internal stage (`queued`, `send_begun`, `live`, `confirming`,
    /// `needs_attention`, `done`), for a charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_reference: Option<String>,
    /// The MQTT 5 Response Topic its events go to, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_topic: Option<String>,
    /// The command as the agent accepted it (normalised).
    pub command: serde_json::Value,
    /// Every stored event of the request, oldest first; the store keeps only the latest
    /// one for now, so this holds that one.
    pub events: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeView {
    pub request: RequestRow,
    /// What happened, for a person.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlFailure {
    pub code: FailureCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// Not a request of this protocol.
    BadRequest,
    /// No such request.
    NotFound,
    /// The request is in a state where this cannot be done.
    NotAllowed,
    /// The engine or its store could not answer.
    Unavailable,
}

impl ControlReply {
    pub fn error(code: FailureCode, message: impl Into<String>) -> ControlReply {
        ControlReply::Error(ControlFailure::new(code, message))
    }
}

impl ControlFailure {
    pub fn new(code: FailureCode, message: impl Into<String>) -> ControlFailure {
        ControlFailure {
            code,
            message: message.into(),
        }
    }
}
