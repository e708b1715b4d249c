//! Parsing and validating a station's command: bytes in, `ValidCommand` or `Refusal`
//! out. Pure: no IO, no clock (the caller passes what it needs). The checks that need
//! the engine's state (`conflict`, `duplicate_reference`, `unknown_target`,
//! `not_cancelable`, `not_refundable`, `queue_full`, `terminal_unavailable`) live in the
//! engine.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::config::StationSection;
use crate::money::{Cents, Site};
use crate::point::MlbPayment;
use crate::station::wire::{CommandType, ErrorCode};

/// The contract's size limit for a command payload.
pub const MAX_COMMAND_BYTES: usize = 8 * 1024;

/// How a refund is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Api,
    Terminal,
}

/// A charge that passed validation. Optional fields are normalised to their defaults
/// where the contract gives one, so that two commands with equal content compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeCmd {
    pub terminal: String,
    pub amount: Cents,
    pub description: Option<String>,
    pub external_reference: Option<String>,
    pub ticket_number: Option<String>,
    pub print_on_terminal: bool,
    pub payment: Option<MlbPayment>,
    pub ttl_s: Option<u32>,
    /// `expires_at` as Unix milliseconds.
    pub expires_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundCmd {
    pub target: String,
    pub amount: Option<Cents>,
    pub via: Via,
    pub ttl_s: Option<u32>,
    pub expires_at_ms: Option<i64>,
}

/// What a valid command asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandBody {
    Charge(ChargeCmd),
    Cancel { target: String },
    Refund(RefundCmd),
    Query { target: String },
    Terminals,
}

impl CommandBody {
    pub fn kind(&self) -> CommandType {
        match self {
            CommandBody::Charge(_) => CommandType::Charge,
            CommandBody::Cancel { .. } => CommandType::Cancel,
            CommandBody::Refund(_) => CommandType::Refund,
            CommandBody::Query { .. } => CommandType::Query,
            CommandBody::Terminals => CommandType::Terminals,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidCommand {
    pub request_id: String,
    pub body: CommandBody,
}

/// A command that is not accepted: one `refused` event (seq 0) goes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub request_id: Option<String>,
    pub kind: Option<CommandType>,
    pub code: ErrorCode,
    /// Written for a person: names the field and what was wrong with it.
    pub message: String,
}

/// What validation needs to know besides the payload.
pub struct Context<'a> {
    pub site: Site,
    /// The station named by the topic.
    pub station: &'a str,
    pub stations: &'a BTreeMap<String, StationSection>,
    /// Terminal ids of the latest successful device listing, if there was one.
    pub listed_terminals: Option<&'a HashSet<String>>,
    /// `queue.refund_ttl` in seconds (the upper bound of `ttl_s` for refunds via api).
    pub refund_ttl_max_s: u64,
}

/// Parse and validate one command payload.
pub fn validate(_payload: &[u8], _ctx: &Context<'_>) -> Result<ValidCommand, Refusal> {
    todo!("station::validate")
}
