//! What a station asks for (`CommandBody`: charge, cancel, refund, query, terminals),
//! and parsing and validating a station's command into it: bytes in, `ValidCommand` or `Refusal`
//! out. Pure: no IO, no clock (the caller passes what it needs). The checks that need
//! the engine's state (`conflict`, `duplicate_reference`, `unknown_target`,
//! `not_cancelable`, `not_refundable`, `queue_full`, `terminal_unavailable`) live in the
//! engine.
//!
//! The checks run in a fixed order, and the first that fails is the refusal:
//! size (`too_large`), JSON object (`bad_json`), `v` (`missing_field`, `bad_version`),
//! the topic's station (`unknown_station`), `type`, keys named twice, fields that do not
//! belong to the type (`bad_field`), `request_id`, then the type's own fields in the
//! order of the contract's table (a charge: `terminal`, `amount`, `description`,
//! `external_reference`, `ticket_number`, `print_on_terminal`, `payment`, `ttl_s`,
//! `expires_at`).
//!
//! Rules beyond the contract's table (recorded here for `docs/`):
//! - `null` is the same as an absent field (`"description": null` = no description;
//!   `"amount": null` on a charge = `missing_field`).
//! - A key that appears twice in one object is refused (`bad_field`): serde_json would
//!   silently keep the last one, and a station library may keep the first.
//! - Any non-string `amount` is `bad_amount` (the contract's "not a decimal string").
//! - An empty `description` is no description; an empty `external_reference` or
//!   `ticket_number` is refused (`bad_field`): leave the field out to get the default.
//! - A refund `amount` is only refused when it is zero (`amount_out_of_range`); below the
//!   site's minimum is fine, and more than is left is the engine's `not_refundable`.
//! - `ttl_s` of a refund via api: 1 to `min(queue.refund_ttl, 30 days)` seconds.
//! - Fields inside `payment` that break its rules, including a missing `payment.type`,
//!   are `bad_field`.
//!
//! Invariants: never panics, whatever the bytes (fuzzed: `fuzz/`); a refusal names the
//! payload's `request_id` whenever the payload is an object whose `request_id` is well
//! formed (and not given twice); a refusal's `kind` is set whenever `type` is valid;
//! commands that differ only in amount notation (`"15"`, `"15.00"`), key order,
//! whitespace, or an absent field versus its default (`print_on_terminal`, `via`) are
//! equal `ValidCommand`s. `ttl_s` stays `None` when absent: its default
//! (`queue.charge_ttl`/`queue.refund_ttl`) is applied and compared by the engine.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::RangeInclusive;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::domain::outcome::ErrorCode;
use crate::money::{quote, Cents, Site};

/// The command types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandType {
    Charge,
    Cancel,
    Refund,
    Query,
    Terminals,
}

/// MLB's `payment` object of a payment intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlbPayment {
    /// `credit_card`, `debit_card` or `voucher_card`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installments: Option<u8>,
    /// `seller` or `buyer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installments_cost: Option<String>,
    /// `sodexo` or `alelo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voucher_type: Option<String>,
}

/// A `[stations.<id>]` table of the config: the terminals bound to that station.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StationSection {
    #[serde(default)]
    pub terminals: Vec<String>,
}

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

/// The longest `ttl_s` of any command: 30 days.
const TTL_MAX_S: u64 = 30 * 24 * 3600;
/// `ttl_s` of a charge and of a refund via terminal.
const CHARGE_TTL_S: RangeInclusive<u64> = 10..=900;
const DESCRIPTION_MAX_CHARS: usize = 150;
const EXTERNAL_REFERENCE_MAX: usize = 64;
const TICKET_NUMBER_MAX: usize = 20;
const REQUEST_ID_MAX: usize = 64;
const INSTALLMENTS: RangeInclusive<u64> = 1..=72;

const COMMON_FIELDS: &[&str] = &["v", "type", "request_id"];
const CHARGE_FIELDS: &[&str] = &[
    "terminal",
    "amount",
    "description",
    "external_reference",
    "ticket_number",
    "print_on_terminal",
    "payment",
    "ttl_s",
    "expires_at",
];
const REFUND_FIELDS: &[&str] = &["target", "amount", "via", "ttl_s", "expires_at"];
const TARGET_ONLY: &[&str] = &["target"];
const PAYMENT_FIELDS: &[&str] = &["type", "installments", "installments_cost", "voucher_type"];
const TYPES: &str = "charge, cancel, refund, query, terminals";

/// Parse and validate one command payload.
pub fn validate(payload: &[u8], ctx: &Context<'_>) -> Result<ValidCommand, Refusal> {
    let anonymous = |code, message: String| Refusal {
        request_id: None,
        kind: None,
        code,
        message,
    };
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(anonymous(
            ErrorCode::TooLarge,
            format!(
                "the command is {} bytes; at most {MAX_COMMAND_BYTES} are allowed",
                payload.len()
            ),
        ));
    }
    let doc: Checked = serde_json::from_slice(payload)
        .map_err(|e| anonymous(ErrorCode::BadJson, format!("not a JSON object: {e}")))?;
    let Value::Object(obj) = &doc.value else {
        return Err(anonymous(
            ErrorCode::BadJson,
            format!("a command is a JSON object, not {}", json_kind(&doc.value)),
        ));
    };
    Command::new(obj, doc.duplicate.as_deref()).validate(ctx)
}

/// The fields of one command object, and what every refusal of it names.
struct Command<'a> {
    obj: &'a Map<String, Value>,
    /// A key given twice anywhere in the payload (`payment.type` for a nested one).
    duplicate: Option<&'a str>,
    /// The payload's `request_id` when it is well formed, for every refusal.
    request_id: Option<String>,
    /// The payload's `type` when it is valid, for every refusal.
    kind: Option<CommandType>,
}

impl<'a> Command<'a> {
    fn new(obj: &'a Map<String, Value>, duplicate: Option<&'a str>) -> Command<'a> {
        let request_id = match obj.get("request_id") {
            Some(Value::String(id)) if is_request_id(id) && duplicate != Some("request_id") => {
                Some(id.clone())
            }
            _ => None,
        };
        let kind = obj.get("type").and_then(Value::as_str).and_then(parse_kind);
        Command {
            obj,
            duplicate,
            request_id,
            kind,
        }
    }

    fn refuse(&self, code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            request_id: self.request_id.clone(),
            kind: self.kind,
            code,
            message: message.into(),
        }
    }

    fn bad_field(&self, message: impl Into<String>) -> Refusal {
        self.refuse(ErrorCode::BadField, message)
    }

    /// A field's value; `null` counts as absent.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    fn validate(&self, ctx: &Context<'_>) -> Result<ValidCommand, Refusal> {
        match self.get("v") {
            None => {
                return Err(self.refuse(
                    ErrorCode::MissingField,
                    "v: required; this agent speaks version 1",
                ))
            }
            Some(v) if v.as_u64() == Some(1) => {}
            Some(v) => {
                return Err(self.refuse(
                    ErrorCode::BadVersion,
                    format!(
                        "v: {} is not a version this agent speaks; use 1",
                        json_text(v)
                    ),
                ))
            }
        }
        let Some(station) = ctx.stations.get(ctx.station) else {
            return Err(self.refuse(
                ErrorCode::UnknownStation,
                format!(
                    "station {} is not configured on this agent",
                    quote(ctx.station)
                ),
            ));
        };
        let kind = match self.get("type") {
            None => {
                return Err(self.refuse(
                    ErrorCode::MissingField,
                    format!("type: required; one of {TYPES}"),
                ))
            }
            Some(Value::String(s)) => match parse_kind(s) {
                Some(kind) => kind,
                None => {
                    return Err(self.bad_field(format!("type: {} is not one of {TYPES}", quote(s))))
                }
            },
            Some(v) => {
                return Err(self.bad_field(format!(
                    "type: must be a string, one of {TYPES}; got {}",
                    json_kind(v)
                )))
            }
        };
        if let Some(key) = self.duplicate {
            return Err(
                self.bad_field(format!("field {} is given more than once", field_name(key)))
            );
        }
        self.check_keys(kind)?;
        let request_id = self.id_field("request_id")?;
        let body = match kind {
            CommandType::Charge => CommandBody::Charge(self.charge(ctx, station)?),
            CommandType::Cancel => CommandBody::Cancel {
                target: self.id_field("target")?,
            },
            CommandType::Refund => CommandBody::Refund(self.refund(ctx)?),
            CommandType::Query => CommandBody::Query {
                target: self.id_field("target")?,
            },
            CommandType::Terminals => CommandBody::Terminals,
        };
        Ok(ValidCommand { request_id, body })
    }

    /// Every key must be a field of this command type.
    fn check_keys(&self, kind: CommandType) -> Result<(), Refusal> {
        let own = fields_of(kind);
        let Some(key) = self
            .obj
            .keys()
            .find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !own.contains(&k.as_str()))
        else {
            return Ok(());
        };
        let known_elsewhere =
            CHARGE_FIELDS.contains(&key.as_str()) || REFUND_FIELDS.contains(&key.as_str());
        let takes = COMMON_FIELDS
            .iter()
            .chain(own)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        Err(self.bad_field(if known_elsewhere {
            format!(
                "field {} does not belong to a {} command, which takes: {takes}",
                field_name(key),
                kind_name(kind)
            )
        } else {
            format!(
                "unknown field {}; a {} command takes: {takes}",
                field_name(key),
                kind_name(kind)
            )
        }))
    }

    /// A string field, `None` when absent.
    fn string(&self, name: &str) -> Result<Option<&'a str>, Refusal> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => {
                Err(self.bad_field(format!("{name}: must be a string, not {}", json_kind(v))))
            }
        }
    }

    /// `request_id` or `target`: required, 1 to 64 of `A-Z a-z 0-9 . _ : -`.
    fn id_field(&self, name: &str) -> Result<String, Refusal> {
        let Some(id) = self.string(name)? else {
            return Err(self.refuse(ErrorCode::MissingField, format!("{name}: required")));
        };
        if !is_request_id(id) {
            return Err(self.bad_field(format!(
                "{name}: must be 1 to {REQUEST_ID_MAX} of A-Z a-z 0-9 . _ : -; got {}",
                quote(id)
            )));
        }
        Ok(id.to_string())
    }

    fn charge(&self, ctx: &Context<'_>, station: &StationSection) -> Result<ChargeCmd, Refusal> {
        let terminal = self.terminal(ctx, station)?;
        let Some(amount) = self.amount()? else {
            return Err(self.refuse(
                ErrorCode::MissingField,
                "amount: required, a decimal string like \"15.00\"",
            ));
        };
        ctx.site
            .check(amount)
            .map_err(|e| self.refuse(ErrorCode::AmountOutOfRange, format!("amount: {e}")))?;
        let description = match self.string("description")? {
            Some(d) if d.chars().count() > DESCRIPTION_MAX_CHARS => {
                return Err(self.bad_field(format!(
                    "description: {} characters; at most {DESCRIPTION_MAX_CHARS} are allowed",
                    d.chars().count()
                )))
            }
            Some("") | None => None,
            Some(d) => Some(d.to_string()),
        };
        let external_reference = self.reference(
            "external_reference",
            EXTERNAL_REFERENCE_MAX,
            "A-Z a-z 0-9 _ -",
            |c| c.is_ascii_alphanumeric() || c == '_' || c == '-',
        )?;
        let ticket_number =
            self.reference("ticket_number", TICKET_NUMBER_MAX, "A-Z a-z 0-9 -", |c| {
                c.is_ascii_alphanumeric() || c == '-'
            })?;
        let print_on_terminal = match self.get("print_on_terminal") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(self.bad_field(format!(
                    "print_on_terminal: must be true or false, not {}",
                    json_kind(v)
                )))
            }
        };
        let payment = self.payment(ctx.site)?;
        let ttl_s = self.ttl(CHARGE_TTL_S, "a charge")?;
        let expires_at_ms = self.expires_at()?;
        Ok(ChargeCmd {
            terminal,
            amount,
            description,
            external_reference,
            ticket_number,
            print_on_terminal,
            payment,
            ttl_s,
            expires_at_ms,
        })
    }

    /// The charge's terminal: the one given, if it is bound to this station, or the
    /// station's only one when none is given.
    fn terminal(&self, ctx: &Context<'_>, station: &StationSection) -> Result<String, Refusal> {
        let Some(terminal) = self.string("terminal")? else {
            return match station.terminals.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(self.refuse(
                    ErrorCode::MissingField,
                    format!(
                        "terminal: required; station {} has no terminal bound",
                        quote(ctx.station)
                    ),
                )),
                several => Err(self.refuse(
                    ErrorCode::MissingField,
                    format!(
                        "terminal: required; station {} has {} terminals bound, name one",
                        quote(ctx.station),
                        several.len()
                    ),
                )),
            };
        };
        if station.terminals.iter().any(|t| t == terminal) {
            return Ok(terminal.to_string());
        }
        let bound_elsewhere = ctx
            .stations
            .values()
            .any(|s| s.terminals.iter().any(|t| t == terminal));
        let listed = ctx.listed_terminals.is_some_and(|l| l.contains(terminal));
        if bound_elsewhere || listed {
            Err(self.refuse(
                ErrorCode::TerminalNotBound,
                format!(
                    "terminal: {} is not bound to station {}",
                    quote(terminal),
                    quote(ctx.station)
                ),
            ))
        } else {
            Err(self.refuse(
                ErrorCode::UnknownTerminal,
                format!(
                    "terminal: {} is not bound to any station and not in the device listing",
                    quote(terminal)
                ),
            ))
        }
    }

    /// `amount` in cents, `None` when absent; its form, not its range.
    fn amount(&self) -> Result<Option<Cents>, Refusal> {
        match self.get("amount") {
            None => Ok(None),
            Some(Value::String(s)) => Cents::parse_decimal(s)
                .map(Some)
                .map_err(|e| self.refuse(ErrorCode::BadAmount, format!("amount: {e}"))),
            Some(v) => Err(self.refuse(
                ErrorCode::BadAmount,
                format!(
                    "amount: must be a decimal string like \"15.00\", not {}",
                    json_kind(v)
                ),
            )),
        }
    }

    /// An optional identifier field: 1 to `max` characters accepted by `allowed`.
    fn reference(
        &self,
        name: &str,
        max: usize,
        charset: &str,
        allowed: impl Fn(char) -> bool,
    ) -> Result<Option<String>, Refusal> {
        match self.string(name)? {
            None => Ok(None),
            Some(s) if !s.is_empty() && s.len() <= max && s.chars().all(allowed) => {
                Ok(Some(s.to_string()))
            }
            Some(s) => Err(self.bad_field(format!(
                "{name}: must be 1 to {max} of {charset} (leave it out for the default); got {}",
                quote(s)
            ))),
        }
    }

    /// MLB's `payment` object, checked against its rules.
    fn payment(&self, site: Site) -> Result<Option<MlbPayment>, Refusal> {
        let Some(value) = self.get("payment") else {
            return Ok(None);
        };
        if !site.allows_payment_options() {
            return Err(self.bad_field(format!(
                "payment: only accepted on site MLB; this agent runs on site {site}"
            )));
        }
        let Value::Object(p) = value else {
            return Err(self.bad_field(format!(
                "payment: must be an object, not {}",
                json_kind(value)
            )));
        };
        if let Some(key) = p.keys().find(|k| !PAYMENT_FIELDS.contains(&k.as_str())) {
            return Err(self.bad_field(format!(
                "unknown field {} in payment, which takes: {}",
                field_name(key),
                PAYMENT_FIELDS.join(", ")
            )));
        }
        let field = |name: &str| p.get(name).filter(|v| !v.is_null());
        let one_of = |name: &str, allowed: &[&str]| -> Result<Option<String>, Refusal> {
            match field(name) {
                None => Ok(None),
                Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(Some(s.clone())),
                Some(v) => Err(self.bad_field(format!(
                    "payment.{name}: must be one of {}; got {}",
                    allowed.join(", "),
                    json_text(v)
                ))),
            }
        };
        let Some(kind) = one_of("type", &["credit_card", "debit_card", "voucher_card"])? else {
            return Err(self.bad_field(
                "payment.type: required; one of credit_card, debit_card, voucher_card",
            ));
        };
        let installments = match field("installments") {
            None => None,
            Some(v) => match v
                .as_u64()
                .filter(|n| INSTALLMENTS.contains(n))
                .and_then(|n| u8::try_from(n).ok())
            {
                Some(n) => Some(n),
                None => {
                    return Err(self.bad_field(format!(
                        "payment.installments: must be a whole number from 1 to 72; got {}",
                        json_text(v)
                    )))
                }
            },
        };
        let installments_cost = one_of("installments_cost", &["seller", "buyer"])?;
        let voucher_type = one_of("voucher_type", &["sodexo", "alelo"])?;
        let only_with = |name: &str, given: bool, type_needed: &str| -> Result<(), Refusal> {
            if given && kind != type_needed {
                Err(self.bad_field(format!(
                    "payment.{name}: only allowed with type {type_needed}, not {kind}"
                )))
            } else {
                Ok(())
            }
        };
        only_with("installments", installments.is_some(), "credit_card")?;
        only_with(
            "installments_cost",
            installments_cost.is_some(),
            "credit_card",
        )?;
        only_with("voucher_type", voucher_type.is_some(), "voucher_card")?;
        Ok(Some(MlbPayment {
            kind,
            installments,
            installments_cost,
            voucher_type,
        }))
    }

    /// `ttl_s`, a whole number of seconds within `range`; `None` when absent.
    fn ttl(&self, range: RangeInclusive<u64>, what: &str) -> Result<Option<u32>, Refusal> {
        let Some(v) = self.get("ttl_s") else {
            return Ok(None);
        };
        match v
            .as_u64()
            .filter(|s| range.contains(s))
            .and_then(|s| u32::try_from(s).ok())
        {
            Some(s) => Ok(Some(s)),
            None => Err(self.bad_field(format!(
                "ttl_s: must be a whole number of seconds from {} to {} for {what}; got {}",
                range.start(),
                range.end(),
                json_text(v)
            ))),
        }
    }

    /// `expires_at`, an RFC 3339 time with an offset, as Unix milliseconds.
    fn expires_at(&self) -> Result<Option<i64>, Refusal> {
        let Some(s) = self.string("expires_at")? else {
            return Ok(None);
        };
        let bad = || {
            self.bad_field(format!(
                "expires_at: must be an RFC 3339 time with an offset, like \"2026-11-03T14:05:00Z\"; got {}",
                quote(s)
            ))
        };
        let at = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| bad())?;
        // `unix_timestamp` floors to the second; the millisecond within it is added back.
        at.unix_timestamp()
            .checked_mul(1000)
            .and_then(|ms| ms.checked_add(i64::from(at.millisecond())))
            .map(Some)
            .ok_or_else(bad)
    }

    fn refund(&self, ctx: &Context<'_>) -> Result<RefundCmd, Refusal> {
        let target = self.id_field("target")?;
        let amount = self.amount()?;
        if amount == Some(Cents(0)) {
            return Err(self.refuse(
                ErrorCode::AmountOutOfRange,
                "amount: 0.00 refunds nothing; leave amount out to refund what is left of the charge",
            ));
        }
        let via = match self.get("via") {
            None => Via::Api,
            Some(Value::String(s)) if s == "api" => Via::Api,
            Some(Value::String(s)) if s == "terminal" => Via::Terminal,
            Some(v) => {
                return Err(self.bad_field(format!(
                    "via: must be \"api\" or \"terminal\"; got {}",
                    json_text(v)
                )))
            }
        };
        let ttl_s = match via {
            Via::Api => self.ttl(1..=ctx.refund_ttl_max_s.min(TTL_MAX_S), "a refund via api")?,
            Via::Terminal => self.ttl(CHARGE_TTL_S, "a refund via terminal")?,
        };
        let expires_at_ms = self.expires_at()?;
        Ok(RefundCmd {
            target,
            amount,
            via,
            ttl_s,
            expires_at_ms,
        })
    }
}

fn parse_kind(s: &str) -> Option<CommandType> {
    match s {
        "charge" => Some(CommandType::Charge),
        "cancel" => Some(CommandType::Cancel),
        "refund" => Some(CommandType::Refund),
        "query" => Some(CommandType::Query),
        "terminals" => Some(CommandType::Terminals),
        _ => None,
    }
}

fn kind_name(kind: CommandType) -> &'static str {
    match kind {
        CommandType::Charge => "charge",
        CommandType::Cancel => "cancel",
        CommandType::Refund => "refund",
        CommandType::Query => "query",
        CommandType::Terminals => "terminals",
    }
}

/// The fields of a command type besides `v`, `type` and `request_id`.
fn fields_of(kind: CommandType) -> &'static [&'static str] {
    match kind {
        CommandType::Charge => CHARGE_FIELDS,
        CommandType::Refund => REFUND_FIELDS,
        CommandType::Cancel | CommandType::Query => TARGET_ONLY,
        CommandType::Terminals => &[],
    }
}

/// The contract's `request_id` (and `target`) form: 1 to 64 of `A-Z a-z 0-9 . _ : -`.
pub fn is_request_id(s: &str) -> bool {
    (1..=REQUEST_ID_MAX).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A key for a message: in backticks, escaped and cut like any quoted input.
fn field_name(key: &str) -> String {
    let quoted = quote(key);
    let inner = quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(&quoted);
    format!("`{inner}`")
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value as JSON text for a message, cut like any quoted input.
fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => quote(s),
        Value::Array(_) | Value::Object(_) => json_kind(v).to_string(),
        other => other.to_string(),
    }
}

/// A JSON value, and the first key that some object in it gives twice (serde_json's
/// `Value` would silently keep the last). The path of a nested key is dotted:
/// `payment.type`.
struct Checked {
    value: Value,
    duplicate: Option<String>,
}

impl Checked {
    fn plain(value: Value) -> Checked {
        Checked {
            value,
            duplicate: None,
        }
    }
}

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Checked, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Checked, E> {
        Ok(Checked::plain(Value::Bool(b)))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Checked, E> {
        Ok(Checked::plain(Value::Number(n.into())))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Checked, E> {
        Ok(Checked::plain(Value::Number(n.into())))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Checked, E> {
        // As serde_json's own `Value`: a non-finite float (not valid JSON anyway) is null.
        Ok(Checked::plain(
            serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Checked, E> {
        Ok(Checked::plain(Value::String(s.to_string())))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Checked, E> {
        Ok(Checked::plain(Value::String(s)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked::plain(Value::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked::plain(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Checked, D::Error> {
        Checked::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        let mut values = Vec::new();
        let mut duplicate = None;
        while let Some(item) = seq.next_element::<Checked>()? {
            duplicate = duplicate.or(item.duplicate);
            values.push(item.value);
        }
        Ok(Checked {
            value: Value::Array(values),
            duplicate,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        let mut values = Map::new();
        let mut duplicate = None;
        while let Some(key) = map.next_key::<String>()? {
            let item: Checked = map.next_value()?;
            if duplicate.is_none() {
                if values.contains_key(&key) {
                    duplicate = Some(key.clone());
                } else if let Some(inner) = item.duplicate {
                    duplicate = Some(format!("{key}.{inner}"));
                }
            }
            values.insert(key, item.value);
        }
        Ok(Checked {
            value: Value::Object(values),
            duplicate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const T1: &str = "PAX_A910__SMARTPOS1234345545";

    struct Fixture {
        stations: BTreeMap<String, StationSection>,
        listed: HashSet<String>,
    }

    /// kiosk-01 has one terminal, lane-02 two, scale-03 none; T9 is listed by the API
    /// but bound nowhere.
    fn fixture() -> Fixture {
        let station = |ts: &[&str]| StationSection {
            terminals: ts.iter().map(|t| t.to_string()).collect(),
        };
        let stations = BTreeMap::from([
            ("kiosk-01".to_string(), station(&[T1])),
            ("lane-02".to_string(), station(&["T2", "T3"])),
            ("scale-03".to_string(), station(&[])),
        ]);
        let listed = [T1, "T2", "T3", "T9"]
            .iter()
            .map(|t| t.to_string())
            .collect();
        Fixture { stations, listed }
    }

    impl Fixture {
        fn ctx<'a>(&'a self, site: Site, station: &'a str) -> Context<'a> {
            Context {
                site,
                station,
                stations: &self.stations,
                listed_terminals: Some(&self.listed),
                refund_ttl_max_s: 7 * 24 * 3600,
            }
        }
    }

    fn run_at(site: Site, station: &str, cmd: &Value) -> Result<ValidCommand, Refusal> {
        let f = fixture();
        validate(cmd.to_string().as_bytes(), &f.ctx(site, station))
    }

    fn run(cmd: &Value) -> Result<ValidCommand, Refusal> {
        run_at(Site::MLA, "kiosk-01", cmd)
    }

    fn refusal(cmd: &Value) -> Refusal {
        refusal_at(Site::MLA, "kiosk-01", cmd)
    }

    fn refusal_at(site: Site, station: &str, cmd: &Value) -> Refusal {
        match run_at(site, station, cmd) {
            Err(r) => r,
            Ok(ok) => panic!("expected a refusal of {cmd}, got {ok:?}"),
        }
    }

    fn code(cmd: &Value) -> ErrorCode {
        refusal(cmd).code
    }

    fn charge_at(site: Site, cmd: &Value) -> ChargeCmd {
        match run_at(site, "kiosk-01", cmd) {
            Ok(ValidCommand {
                body: CommandBody::Charge(c),
                ..
            }) => c,
            other => panic!("expected a charge from {cmd}, got {other:?}"),
        }
    }

    fn charge(cmd: &Value) -> ChargeCmd {
        charge_at(Site::MLA, cmd)
    }

    fn refund(cmd: &Value) -> RefundCmd {
        match run(cmd) {
            Ok(ValidCommand {
                body: CommandBody::Refund(r),
                ..
            }) => r,
            other => panic!("expected a refund from {cmd}, got {other:?}"),
        }
    }

    /// A minimal valid charge with `extra` merged in (a `null` in `extra` removes a key).
    fn with(base: Value, extra: Value) -> Value {
        let (Value::Object(mut b), Value::Object(e)) = (base, extra) else {
            panic!("objects only")
        };
        for (k, v) in e {
            if v.is_null() {
                b.remove(&k);
            } else {
                b.insert(k, v);
            }
        }
        Value::Object(b)
    }

    fn base_charge() -> Value {
        json!({"v": 1, "type": "charge", "request_id": "r-1", "amount": "15.00"})
    }

    fn ch(extra: Value) -> Value {
        with(base_charge(), extra)
    }

    fn base_refund() -> Value {
        json!({"v": 1, "type": "refund", "request_id": "rf-1", "target": "r-1"})
    }

    fn rf(extra: Value) -> Value {
        with(base_refund(), extra)
    }

    // ---- size and JSON ----

    #[test]
    fn accepts_8192_bytes_and_refuses_8193_as_too_large() {
        let f = fixture();
        let ctx = f.ctx(Site::MLA, "kiosk-01");
        let text = base_charge().to_string();
        let mut payload = text.clone().into_bytes();
        payload.resize(MAX_COMMAND_BYTES, b' ');
        assert_eq!(payload.len(), 8192);
        assert!(validate(&payload, &ctx).is_ok(), "8192 bytes are allowed");
        payload.push(b' ');
        let r = validate(&payload, &ctx).err();
        assert_eq!(r.as_ref().map(|r| r.code), Some(ErrorCode::TooLarge));
        assert_eq!(
            r.as_ref().and_then(|r| r.request_id.clone()),
            None,
            "too_large names no request_id"
        );
        assert_eq!(
            r.map(|r| r.message),
            Some("the command is 8193 bytes; at most 8192 are allowed".to_string())
        );
    }

    #[test]
    fn refuses_what_is_not_a_json_object_as_bad_json_without_request_id() {
        let f = fixture();
        let ctx = f.ctx(Site::MLA, "kiosk-01");
        let inputs: [&[u8]; 10] = [
            b"",
            b"not json",
            b"[1, 2]",
            b"\"charge\"",
            b"42",
            b"null",
            b"{\"v\": 1,",
            b"{\"v\": 1} {}",
            b"{\"request_id\": \"\xff\xfe\"}",
            b"\xef\xbb\xbf{\"v\": 1}",
        ];
        for input in inputs {
            let r = validate(input, &ctx).err();
            assert_eq!(
                r.as_ref().map(|r| r.code),
                Some(ErrorCode::BadJson),
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(r.and_then(|r| r.request_id), None);
        }
        let r = validate(b"[1]", &ctx).err().map(|r| r.message);
        assert_eq!(
            r.as_deref(),
            Some("a command is a JSON object, not an array")
        );
    }

    #[test]
    fn deep_nesting_is_bad_json_not_a_stack_overflow() {
        let f = fixture();
        let ctx = f.ctx(Site::MLA, "kiosk-01");
        let deep = "[".repeat(4000) + &"]".repeat(4000);
        assert_eq!(
            validate(deep.as_bytes(), &ctx).err().map(|r| r.code),
            Some(ErrorCode::BadJson)
        );
        let deep_obj = "{\"a\":".repeat(1000) + "1" + &"}".repeat(1000);
        assert!(deep_obj.len() <= MAX_COMMAND_BYTES);
        assert_eq!(
            validate(deep_obj.as_bytes(), &ctx).err().map(|r| r.code),
            Some(ErrorCode::BadJson)
        );
    }

    // ---- v, station, type ----

    #[test]
    fn refuses_a_missing_v_as_missing_field_naming_the_request() {
        let r = refusal(&ch(json!({"v": null})));
        assert_eq!(r.code, ErrorCode::MissingField);
        assert_eq!(r.request_id.as_deref(), Some("r-1"));
        assert_eq!(r.kind, Some(CommandType::Charge));
        assert!(r.message.starts_with("v: required"), "{}", r.message);
    }

    #[test]
    fn refuses_any_v_but_the_number_1_as_bad_version() {
        for v in [
            json!(2),
            json!(0),
            json!("1"),
            json!(1.0),
            json!(1.5),
            json!(-1),
            json!(true),
            json!([1]),
        ] {
            let r = refusal(&ch(json!({ "v": v })));
            assert_eq!(r.code, ErrorCode::BadVersion, "v = {v}");
            assert_eq!(r.request_id.as_deref(), Some("r-1"));
        }
        assert_eq!(
            refusal(&ch(json!({"v": 2}))).message,
            "v: 2 is not a version this agent speaks; use 1"
        );
    }

    #[test]
    fn refuses_a_station_that_is_not_configured() {
        let r = refusal_at(Site::MLA, "kiosk-99", &base_charge());
        assert_eq!(r.code, ErrorCode::UnknownStation);
        assert_eq!(r.request_id.as_deref(), Some("r-1"));
        assert_eq!(
            r.message,
            "station \"kiosk-99\" is not configured on this agent"
        );
    }

    #[test]
    fn refuses_a_missing_or_unknown_type() {
        let r = refusal(&ch(json!({"type": null})));
        assert_eq!((r.code, r.kind), (ErrorCode::MissingField, None));
        assert_eq!(r.request_id.as_deref(), Some("r-1"));
        let r = refusal(&ch(json!({"type": "pay"})));
        assert_eq!((r.code, r.kind), (ErrorCode::BadField, None));
        assert_eq!(
            r.message,
            "type: \"pay\" is not one of charge, cancel, refund, query, terminals"
        );
        assert_eq!(code(&ch(json!({"type": "Charge"}))), ErrorCode::BadField);
        assert_eq!(code(&ch(json!({"type": 1}))), ErrorCode::BadField);
    }

    // ---- unknown and duplicate fields ----

    #[test]
    fn refuses_an_unknown_field_naming_it() {
        let r = refusal(&ch(json!({"amout": "15.00"})));
        assert_eq!(r.code, ErrorCode::BadField);
        assert_eq!(r.request_id.as_deref(), Some("r-1"));
        assert!(
            r.message.starts_with(
                "unknown field `amout`; a charge command takes: v, type, request_id, terminal"
            ),
            "{}",
            r.message
        );
        // Even a null unknown field is a typo worth surfacing.
        let payload = br#"{"v":1,"type":"charge","request_id":"r-1","amount":"15","amout":null}"#;
        let f = fixture();
        assert_eq!(
            validate(payload, &f.ctx(Site::MLA, "kiosk-01"))
                .err()
                .map(|r| r.code),
            Some(ErrorCode::BadField)
        );
    }

    #[test]
    fn refuses_a_field_of_another_command_type() {
        let r = refusal(
            &json!({"v": 1, "type": "query", "request_id": "q-1", "target": "r-1", "amount": "1"}),
        );
        assert_eq!(
            (r.code, r.kind),
            (ErrorCode::BadField, Some(CommandType::Query))
        );
        assert_eq!(r.message, "field `amount` does not belong to a query command, which takes: v, type, request_id, target");
        assert_eq!(
            code(&json!({"v": 1, "type": "terminals", "request_id": "t", "target": "r-1"})),
            ErrorCode::BadField
        );
        assert_eq!(
            code(
                &json!({"v": 1, "type": "cancel", "request_id": "c", "target": "r-1", "via": "api"})
            ),
            ErrorCode::BadField
        );
        assert_eq!(code(&ch(json!({"target": "r-0"}))), ErrorCode::BadField);
        assert_eq!(code(&ch(json!({"via": "api"}))), ErrorCode::BadField);
        assert_eq!(code(&rf(json!({"terminal": T1}))), ErrorCode::BadField);
        assert_eq!(code(&rf(json!({"description": "x"}))), ErrorCode::BadField);
    }

    #[test]
    fn refuses_a_key_given_twice() {
        let f = fixture();
        let ctx = f.ctx(Site::MLB, "kiosk-01");
        let r = validate(
            br#"{"v":1,"type":"charge","request_id":"r-1","amount":"15","amount":"1500"}"#,
            &ctx,
        )
        .err();
        assert_eq!(r.as_ref().map(|r| r.code), Some(ErrorCode::BadField));
        assert_eq!(
            r.as_ref().and_then(|r| r.request_id.as_deref()),
            Some("r-1")
        );
        assert_eq!(
            r.map(|r| r.message).as_deref(),
            Some("field `amount` is given more than once")
        );
        let nested = br#"{"v":1,"type":"charge","request_id":"r-1","amount":"15","payment":{"type":"debit_card","type":"credit_card"}}"#;
        let r = validate(nested, &ctx).err();
        assert_eq!(
            r.map(|r| r.message).as_deref(),
            Some("field `payment.type` is given more than once")
        );
        // A request_id given twice is not named: which one would it be?
        let r = validate(
            br#"{"v":1,"type":"charge","request_id":"a","request_id":"b","amount":"15"}"#,
            &ctx,
        )
        .err();
        assert_eq!(r.as_ref().map(|r| r.code), Some(ErrorCode::BadField));
        assert_eq!(r.and_then(|r| r.request_id), None);
    }

    // ---- request_id ----

    #[test]
    fn request_id_takes_1_to_64_of_its_charset() {
        let all = "AZaz09._:-";
        assert_eq!(
            run(&ch(json!({"request_id": all})))
                .map(|c| c.request_id)
                .ok()
                .as_deref(),
            Some(all)
        );
        let max = "a".repeat(64);
        assert!(run(&ch(json!({"request_id": max}))).is_ok());
        for bad in [
            json!(""),
            json!("a".repeat(65)),
            json!("a b"),
            json!("a/b"),
            json!("é"),
            json!("a#"),
            json!("a+b"),
            json!("a\n"),
        ] {
            let r = refusal(&ch(json!({"request_id": bad})));
            assert_eq!(r.code, ErrorCode::BadField, "request_id = {bad}");
            assert_eq!(r.request_id, None, "a malformed request_id is not named");
            assert!(
                r.message
                    .starts_with("request_id: must be 1 to 64 of A-Z a-z 0-9 . _ : -"),
                "{}",
                r.message
            );
        }
        for wrong in [json!(7), json!(true), json!(["r-1"])] {
            let r = refusal(&ch(json!({"request_id": wrong})));
            assert_eq!(r.code, ErrorCode::BadField);
            assert!(
                r.message.starts_with("request_id: must be a string"),
                "{}",
                r.message
            );
        }
        assert_eq!(
            code(&ch(json!({"request_id": null}))),
            ErrorCode::MissingField
        );
    }

    // ---- charge: terminal ----

    #[test]
    fn charge_terminal_defaults_to_the_only_one_bound() {
        assert_eq!(charge(&base_charge()).terminal, T1);
        assert_eq!(charge(&ch(json!({"terminal": T1}))).terminal, T1);
        let c = run_at(Site::MLA, "lane-02", &ch(json!({"terminal": "T3"})));
        assert!(
            matches!(c, Ok(ValidCommand { body: CommandBody::Charge(ChargeCmd { ref terminal, .. }), .. }) if terminal == "T3")
        );
    }

    #[test]
    fn charge_terminal_is_required_when_zero_or_several_are_bound() {
        let r = refusal_at(Site::MLA, "lane-02", &base_charge());
        assert_eq!(r.code, ErrorCode::MissingField);
        assert_eq!(
            r.message,
            "terminal: required; station \"lane-02\" has 2 terminals bound, name one"
        );
        let r = refusal_at(Site::MLA, "scale-03", &base_charge());
        assert_eq!(r.code, ErrorCode::MissingField);
        assert_eq!(
            r.message,
            "terminal: required; station \"scale-03\" has no terminal bound"
        );
    }

    #[test]
    fn charge_terminal_of_another_station_or_only_listed_is_not_bound() {
        let r = refusal(&ch(json!({"terminal": "T2"})));
        assert_eq!(r.code, ErrorCode::TerminalNotBound);
        assert_eq!(
            r.message,
            "terminal: \"T2\" is not bound to station \"kiosk-01\""
        );
        assert_eq!(
            code(&ch(json!({"terminal": "T9"}))),
            ErrorCode::TerminalNotBound
        );
        assert_eq!(
            refusal_at(Site::MLA, "scale-03", &ch(json!({"terminal": T1}))).code,
            ErrorCode::TerminalNotBound
        );
    }

    #[test]
    fn charge_terminal_known_nowhere_is_unknown() {
        assert_eq!(
            code(&ch(json!({"terminal": "T404"}))),
            ErrorCode::UnknownTerminal
        );
        // Without a device listing, only bindings make a terminal known.
        let f = fixture();
        let ctx = Context {
            listed_terminals: None,
            ..f.ctx(Site::MLA, "kiosk-01")
        };
        let payload = ch(json!({"terminal": "T9"})).to_string();
        assert_eq!(
            validate(payload.as_bytes(), &ctx).err().map(|r| r.code),
            Some(ErrorCode::UnknownTerminal)
        );
        let payload = ch(json!({"terminal": "T2"})).to_string();
        assert_eq!(
            validate(payload.as_bytes(), &ctx).err().map(|r| r.code),
            Some(ErrorCode::TerminalNotBound)
        );
        assert_eq!(code(&ch(json!({"terminal": 5}))), ErrorCode::BadField);
    }

    // ---- charge: amount ----

    #[test]
    fn charge_amount_is_required_and_a_decimal_string() {
        assert_eq!(code(&ch(json!({"amount": null}))), ErrorCode::MissingField);
        for bad in [
            json!(15),
            json!(15.0),
            json!(true),
            json!(["15"]),
            json!({"value": "15"}),
        ] {
            let r = refusal(&ch(json!({ "amount": bad })));
            assert_eq!(r.code, ErrorCode::BadAmount, "amount = {bad}");
            assert_eq!(r.request_id.as_deref(), Some("r-1"));
        }
        assert_eq!(
            refusal(&ch(json!({"amount": 15}))).message,
            "amount: must be a decimal string like \"15.00\", not a number"
        );
        for bad in [
            "15.001",
            "-15",
            "+15",
            "1e3",
            "abc",
            "",
            " 15",
            ".5",
            "15.",
            "15,00",
            "99999999999999999999999",
        ] {
            assert_eq!(
                code(&ch(json!({ "amount": bad }))),
                ErrorCode::BadAmount,
                "amount = {bad:?}"
            );
        }
        assert_eq!(
            refusal(&ch(json!({"amount": "15.001"}))).message,
            "amount: \"15.001\" has more than two decimals"
        );
    }

    #[test]
    fn charge_amount_outside_the_site_limits_is_out_of_range() {
        assert_eq!(charge(&ch(json!({"amount": "5"}))).amount, Cents(500));
        assert_eq!(
            charge(&ch(json!({"amount": "4000000.00"}))).amount,
            Cents(400_000_000)
        );
        for out in ["0", "0.00", "4.99", "4000000.01"] {
            assert_eq!(
                code(&ch(json!({ "amount": out }))),
                ErrorCode::AmountOutOfRange,
                "amount = {out}"
            );
        }
        let r = refusal_at(Site::MLB, "kiosk-01", &ch(json!({"amount": "70000.01"})));
        assert_eq!(r.code, ErrorCode::AmountOutOfRange);
        assert_eq!(
            r.message,
            "amount: 70000.01 is outside the limits of site MLB: 1.00 to 70000.00"
        );
        assert_eq!(
            charge_at(Site::MLB, &ch(json!({"amount": "1"}))).amount,
            Cents(100)
        );
        assert_eq!(
            refusal_at(Site::MLM, "kiosk-01", &ch(json!({"amount": "350000.01"}))).code,
            ErrorCode::AmountOutOfRange
        );
    }

    // ---- charge: optional fields ----

    #[test]
    fn charge_description_is_at_most_150_characters() {
        let max = "é".repeat(150);
        assert_eq!(
            charge(&ch(json!({"description": max})))
                .description
                .as_deref(),
            Some(max.as_str())
        );
        let r = refusal(&ch(json!({"description": "x".repeat(151)})));
        assert_eq!(
            (r.code, r.message.as_str()),
            (
                ErrorCode::BadField,
                "description: 151 characters; at most 150 are allowed"
            )
        );
        assert_eq!(code(&ch(json!({"description": 5}))), ErrorCode::BadField);
        assert_eq!(charge(&ch(json!({"description": ""}))).description, None);
    }

    #[test]
    fn charge_external_reference_is_1_to_64_of_its_charset() {
        let max = "Az09_-".repeat(10) + "abcd";
        assert_eq!(max.len(), 64);
        assert_eq!(
            charge(&ch(json!({"external_reference": max})))
                .external_reference
                .as_deref(),
            Some(max.as_str())
        );
        for bad in [
            json!("a".repeat(65)),
            json!("a.b"),
            json!("a:b"),
            json!("a b"),
            json!(""),
            json!("ñ"),
            json!(12),
        ] {
            assert_eq!(
                code(&ch(json!({ "external_reference": bad }))),
                ErrorCode::BadField,
                "{bad}"
            );
        }
    }

    #[test]
    fn charge_ticket_number_is_1_to_20_of_letters_digits_and_dashes() {
        let max = "AB-12-cd-34-ef-56-gh";
        assert_eq!(max.len(), 20);
        assert_eq!(
            charge(&ch(json!({"ticket_number": max})))
                .ticket_number
                .as_deref(),
            Some(max)
        );
        for bad in [
            json!("a".repeat(21)),
            json!("a_b"),
            json!("a.b"),
            json!("a b"),
            json!(""),
            json!(123),
        ] {
            let r = refusal(&ch(json!({ "ticket_number": bad })));
            assert_eq!(r.code, ErrorCode::BadField, "{bad}");
            assert!(r.message.starts_with("ticket_number: "), "{}", r.message);
        }
        // Accepted on every site: the agent keeps it and sends it only on MLA.
        assert_eq!(
            charge_at(Site::MLB, &ch(json!({"ticket_number": "T-1"})))
                .ticket_number
                .as_deref(),
            Some("T-1")
        );
    }

    #[test]
    fn charge_print_on_terminal_is_a_boolean_defaulting_to_true() {
        assert!(charge(&base_charge()).print_on_terminal);
        assert!(!charge(&ch(json!({"print_on_terminal": false}))).print_on_terminal);
        for bad in [json!("yes"), json!(1), json!("true")] {
            assert_eq!(
                code(&ch(json!({ "print_on_terminal": bad }))),
                ErrorCode::BadField
            );
        }
    }

    // ---- charge: payment (MLB) ----

    fn payment(p: Value) -> Result<Option<MlbPayment>, Refusal> {
        run_at(Site::MLB, "kiosk-01", &ch(json!({ "payment": p }))).map(|c| match c.body {
            CommandBody::Charge(c) => c.payment,
            _ => None,
        })
    }

    fn payment_refused(p: Value) -> String {
        match payment(p.clone()) {
            Err(r) if r.code == ErrorCode::BadField => r.message,
            other => panic!("payment {p} should be a bad_field, got {other:?}"),
        }
    }

    #[test]
    fn payment_is_refused_off_mlb() {
        for site in [Site::MLA, Site::MLM] {
            let r = refusal_at(
                site,
                "kiosk-01",
                &ch(json!({"payment": {"type": "debit_card"}})),
            );
            assert_eq!(r.code, ErrorCode::BadField);
            assert_eq!(
                r.message,
                format!("payment: only accepted on site MLB; this agent runs on site {site}")
            );
        }
    }

    #[test]
    fn payment_accepts_each_type_with_its_own_options() {
        let p = |kind: &str, i: Option<u8>, c: Option<&str>, v: Option<&str>| {
            Ok(Some(MlbPayment {
                kind: kind.to_string(),
                installments: i,
                installments_cost: c.map(str::to_string),
                voucher_type: v.map(str::to_string),
            }))
        };
        assert_eq!(
            payment(json!({"type": "debit_card"})),
            p("debit_card", None, None, None)
        );
        assert_eq!(
            payment(json!({"type": "credit_card"})),
            p("credit_card", None, None, None)
        );
        assert_eq!(
            payment(
                json!({"type": "credit_card", "installments": 72, "installments_cost": "buyer"})
            ),
            p("credit_card", Some(72), Some("buyer"), None)
        );
        assert_eq!(
            payment(
                json!({"type": "credit_card", "installments": 1, "installments_cost": "seller"})
            ),
            p("credit_card", Some(1), Some("seller"), None)
        );
        assert_eq!(
            payment(json!({"type": "voucher_card", "voucher_type": "alelo"})),
            p("voucher_card", None, None, Some("alelo"))
        );
        assert_eq!(
            payment(json!({"type": "voucher_card", "voucher_type": "sodexo"})),
            p("voucher_card", None, None, Some("sodexo"))
        );
        assert_eq!(
            payment(json!({"type": "voucher_card"})),
            p("voucher_card", None, None, None)
        );
    }

    #[test]
    fn payment_refuses_what_breaks_its_rules() {
        assert_eq!(
            payment_refused(json!({})),
            "payment.type: required; one of credit_card, debit_card, voucher_card"
        );
        assert_eq!(
            payment_refused(json!("credit_card")),
            "payment: must be an object, not a string"
        );
        assert_eq!(
            payment_refused(json!({"type": "pix"})),
            "payment.type: must be one of credit_card, debit_card, voucher_card; got \"pix\""
        );
        payment_refused(json!({"type": 1}));
        assert_eq!(
            payment_refused(json!({"type": "credit_card", "installments": 0})),
            "payment.installments: must be a whole number from 1 to 72; got 0"
        );
        payment_refused(json!({"type": "credit_card", "installments": 73}));
        payment_refused(json!({"type": "credit_card", "installments": 3.0}));
        payment_refused(json!({"type": "credit_card", "installments": "3"}));
        payment_refused(json!({"type": "credit_card", "installments": -1}));
        payment_refused(json!({"type": "credit_card", "installments_cost": "both"}));
        assert_eq!(
            payment_refused(json!({"type": "debit_card", "installments": 3})),
            "payment.installments: only allowed with type credit_card, not debit_card"
        );
        payment_refused(json!({"type": "voucher_card", "installments_cost": "buyer"}));
        payment_refused(json!({"type": "credit_card", "voucher_type": "sodexo"}));
        payment_refused(json!({"type": "voucher_card", "voucher_type": "ticket"}));
        assert_eq!(
            payment_refused(json!({"type": "debit_card", "installment": 3})),
            "unknown field `installment` in payment, which takes: type, installments, installments_cost, voucher_type"
        );
    }

    // ---- ttl_s and expires_at ----

    #[test]
    fn charge_ttl_s_is_10_to_900_whole_seconds() {
        assert_eq!(charge(&ch(json!({"ttl_s": 10}))).ttl_s, Some(10));
        assert_eq!(charge(&ch(json!({"ttl_s": 900}))).ttl_s, Some(900));
        assert_eq!(charge(&base_charge()).ttl_s, None);
        for bad in [
            json!(9),
            json!(901),
            json!(0),
            json!(-10),
            json!(60.5),
            json!(60.0),
            json!("60"),
            json!(u64::MAX),
        ] {
            let r = refusal(&ch(json!({ "ttl_s": bad })));
            assert_eq!(r.code, ErrorCode::BadField, "ttl_s = {bad}");
        }
        assert_eq!(
            refusal(&ch(json!({"ttl_s": 5}))).message,
            "ttl_s: must be a whole number of seconds from 10 to 900 for a charge; got 5"
        );
    }

    #[test]
    fn expires_at_is_rfc3339_with_an_offset_in_unix_ms() {
        let at = |s: &str| charge(&ch(json!({ "expires_at": s }))).expires_at_ms;
        assert_eq!(at("2026-11-03T14:05:00Z"), Some(1_793_714_700_000));
        assert_eq!(at("2026-11-03T15:05:00+01:00"), Some(1_793_714_700_000));
        assert_eq!(at("2026-11-03T14:05:00.250Z"), Some(1_793_714_700_250));
        assert_eq!(at("1969-12-31T23:59:59.500Z"), Some(-500));
        for bad in [
            json!("2026-11-03T14:05:00"),
            json!("2026-11-03"),
            json!("tomorrow"),
            json!(1_793_714_700),
            json!("2026-13-03T14:05:00Z"),
        ] {
            let r = refusal(&ch(json!({ "expires_at": bad })));
            assert_eq!(r.code, ErrorCode::BadField, "expires_at = {bad}");
            assert!(r.message.starts_with("expires_at: "), "{}", r.message);
        }
    }

    // ---- cancel, query, terminals ----

    #[test]
    fn cancel_and_query_need_a_well_formed_target() {
        for (kind, ty) in [
            ("cancel", CommandType::Cancel),
            ("query", CommandType::Query),
        ] {
            let ok = run(&json!({"v": 1, "type": kind, "request_id": "x-1", "target": "r-1"}));
            let body = ok.map(|c| c.body);
            match ty {
                CommandType::Cancel => assert_eq!(
                    body,
                    Ok(CommandBody::Cancel {
                        target: "r-1".to_string()
                    })
                ),
                _ => assert_eq!(
                    body,
                    Ok(CommandBody::Query {
                        target: "r-1".to_string()
                    })
                ),
            }
            let r = refusal(&json!({"v": 1, "type": kind, "request_id": "x-1"}));
            assert_eq!(
                (r.code, r.kind, r.message.as_str()),
                (ErrorCode::MissingField, Some(ty), "target: required")
            );
            assert_eq!(
                code(&json!({"v": 1, "type": kind, "request_id": "x-1", "target": "r 1"})),
                ErrorCode::BadField
            );
            assert_eq!(
                code(&json!({"v": 1, "type": kind, "request_id": "x-1", "target": 1})),
                ErrorCode::BadField
            );
        }
    }

    #[test]
    fn terminals_takes_nothing_else() {
        let ok = run(&json!({"v": 1, "type": "terminals", "request_id": "t-1"}));
        assert_eq!(
            ok,
            Ok(ValidCommand {
                request_id: "t-1".to_string(),
                body: CommandBody::Terminals
            })
        );
        // No terminal binding is needed to ask.
        assert!(run_at(
            Site::MLA,
            "scale-03",
            &json!({"v": 1, "type": "terminals", "request_id": "t-1"})
        )
        .is_ok());
    }

    // ---- refund ----

    #[test]
    fn refund_defaults_to_a_full_refund_via_api() {
        assert_eq!(
            refund(&base_refund()),
            RefundCmd {
                target: "r-1".to_string(),
                amount: None,
                via: Via::Api,
                ttl_s: None,
                expires_at_ms: None
            }
        );
        assert_eq!(refund(&rf(json!({"via": "terminal"}))).via, Via::Terminal);
        assert_eq!(code(&rf(json!({"target": null}))), ErrorCode::MissingField);
        for bad in [json!("card"), json!("API"), json!(1)] {
            assert_eq!(
                code(&rf(json!({ "via": bad }))),
                ErrorCode::BadField,
                "via = {bad}"
            );
        }
    }

    #[test]
    fn refund_amount_is_any_positive_decimal_string() {
        assert_eq!(
            refund(&rf(json!({"amount": "0.01"}))).amount,
            Some(Cents(1)),
            "below the charge minimum is fine"
        );
        assert_eq!(
            refund(&rf(json!({"amount": "10.5"}))).amount,
            Some(Cents(1050))
        );
        // Partial via terminal is the engine's `not_refundable`: it knows the charge.
        assert_eq!(
            refund(&rf(json!({"amount": "10", "via": "terminal"}))).amount,
            Some(Cents(1000))
        );
        assert_eq!(
            code(&rf(json!({"amount": "0"}))),
            ErrorCode::AmountOutOfRange
        );
        assert_eq!(
            code(&rf(json!({"amount": "0.00"}))),
            ErrorCode::AmountOutOfRange
        );
        assert_eq!(code(&rf(json!({"amount": 10}))), ErrorCode::BadAmount);
        assert_eq!(code(&rf(json!({"amount": "1.234"}))), ErrorCode::BadAmount);
    }

    #[test]
    fn refund_ttl_depends_on_via() {
        let week = 7 * 24 * 3600;
        assert_eq!(refund(&rf(json!({"ttl_s": 1}))).ttl_s, Some(1));
        assert_eq!(refund(&rf(json!({"ttl_s": week}))).ttl_s, Some(week as u32));
        assert_eq!(code(&rf(json!({"ttl_s": 0}))), ErrorCode::BadField);
        assert_eq!(code(&rf(json!({"ttl_s": week + 1}))), ErrorCode::BadField);
        assert_eq!(
            refund(&rf(json!({"via": "terminal", "ttl_s": 10}))).ttl_s,
            Some(10)
        );
        assert_eq!(
            refund(&rf(json!({"via": "terminal", "ttl_s": 900}))).ttl_s,
            Some(900)
        );
        assert_eq!(
            code(&rf(json!({"via": "terminal", "ttl_s": 9}))),
            ErrorCode::BadField
        );
        assert_eq!(
            code(&rf(json!({"via": "terminal", "ttl_s": 901}))),
            ErrorCode::BadField
        );
        // Never beyond 30 days, whatever queue.refund_ttl says.
        let f = fixture();
        let ctx = Context {
            refund_ttl_max_s: 90 * 24 * 3600,
            ..f.ctx(Site::MLA, "kiosk-01")
        };
        let at = |ttl: u64| {
            validate(rf(json!({ "ttl_s": ttl })).to_string().as_bytes(), &ctx).map(|_| ())
        };
        assert_eq!(at(TTL_MAX_S), Ok(()));
        assert_eq!(
            at(TTL_MAX_S + 1).map_err(|r| r.code),
            Err(ErrorCode::BadField)
        );
    }

    #[test]
    fn refund_expires_at_is_read_like_a_charges() {
        assert_eq!(
            refund(&rf(json!({"expires_at": "1970-01-01T00:00:01Z"}))).expires_at_ms,
            Some(1000)
        );
        assert_eq!(
            code(&rf(json!({"expires_at": "soon"}))),
            ErrorCode::BadField
        );
    }

    // ---- normalisation ----

    #[test]
    fn equal_content_gives_equal_commands() {
        let short = run(&json!({"v": 1, "type": "charge", "request_id": "r-1", "amount": "15"}));
        let f = fixture();
        let ctx = f.ctx(Site::MLA, "kiosk-01");
        let long = validate(
            br#"  { "amount" : "15.00", "print_on_terminal": true, "description": null, "ticket_number": null,
                  "request_id": "r-1", "terminal": "PAX_A910__SMARTPOS1234345545", "type": "charge", "v": 1 } "#,
            &ctx,
        );
        assert!(short.is_ok());
        assert_eq!(short, long);
        assert_eq!(
            run(&ch(json!({"amount": "15.5"}))),
            run(&ch(json!({"amount": "15.50"})))
        );
        assert_eq!(
            run(&ch(json!({"amount": "015.5"}))),
            run(&ch(json!({"amount": "15.50"})))
        );
        assert_eq!(run(&ch(json!({"description": ""}))), run(&base_charge()));
        assert_eq!(run(&base_refund()), run(&rf(json!({"via": "api"}))));
        assert_eq!(
            run(&rf(json!({"amount": "3"}))),
            run(&rf(json!({"amount": "3.00"})))
        );
        // And different content is different.
        assert_ne!(run(&ch(json!({"amount": "15.01"}))), short);
        assert_ne!(run(&ch(json!({"print_on_terminal": false}))), short);
        assert_ne!(run(&ch(json!({"description": "x"}))), short);
    }

    #[test]
    fn every_refusal_after_the_json_names_a_well_formed_request_id() {
        for cmd in [
            ch(json!({"v": 2})),
            ch(json!({"amount": "x"})),
            ch(json!({"amount": "0"})),
            ch(json!({"terminal": "T404"})),
            ch(json!({"terminal": "T2"})),
            ch(json!({"oops": 1})),
            ch(json!({"ttl_s": 1})),
            ch(json!({"payment": {"type": "debit_card"}})),
        ] {
            let r = refusal(&cmd);
            assert_eq!(r.request_id.as_deref(), Some("r-1"), "{cmd}");
            assert_eq!(r.kind, Some(CommandType::Charge), "{cmd}");
        }
        assert_eq!(
            refusal_at(Site::MLA, "nobody", &base_charge())
                .request_id
                .as_deref(),
            Some("r-1")
        );
    }

    #[test]
    fn null_is_the_same_as_absent() {
        assert_eq!(
            run(&ch(json!({"ttl_s": null, "expires_at": null}))),
            run(&base_charge())
        );
        let with_nulls = br#"{"v":1,"type":"charge","request_id":"r-1","amount":"15","payment":null,"external_reference":null,"print_on_terminal":null}"#;
        let f = fixture();
        assert_eq!(
            validate(with_nulls, &f.ctx(Site::MLA, "kiosk-01")),
            run(&base_charge())
        );
        let no_amount = br#"{"v":1,"type":"charge","request_id":"r-1","amount":null}"#;
        assert_eq!(
            validate(no_amount, &f.ctx(Site::MLA, "kiosk-01"))
                .err()
                .map(|r| r.code),
            Some(ErrorCode::MissingField)
        );
    }

    #[test]
    fn a_full_charge_is_read_field_by_field() {
        let c = charge_at(
            Site::MLB,
            &ch(json!({
                "terminal": T1, "amount": "40", "description": "Pão de queijo",
                "external_reference": "ord-77_a", "ticket_number": "0001-42",
                "print_on_terminal": false,
                "payment": {"type": "credit_card", "installments": 3, "installments_cost": "seller"},
                "ttl_s": 300, "expires_at": "2026-11-03T14:05:00Z"
            })),
        );
        assert_eq!(
            c,
            ChargeCmd {
                terminal: T1.to_string(),
                amount: Cents(4000),
                description: Some("Pão de queijo".to_string()),
                external_reference: Some("ord-77_a".to_string()),
                ticket_number: Some("0001-42".to_string()),
                print_on_terminal: false,
                payment: Some(MlbPayment {
                    kind: "credit_card".to_string(),
                    installments: Some(3),
                    installments_cost: Some("seller".to_string()),
                    voucher_type: None,
                }),
                ttl_s: Some(300),
                expires_at_ms: Some(1_793_714_700_000),
            }
        );
    }

    #[test]
    fn messages_quote_hostile_input_safely_and_briefly() {
        let r = refusal(&ch(
            json!({ "amount": format!("1\n\"{}", "9".repeat(5000)) }),
        ));
        assert_eq!(r.code, ErrorCode::BadAmount);
        assert!(r.message.len() < 200, "{}", r.message);
        assert!(!r.message.contains('\n'));
        let r = refusal(&ch(json!({ format!("k\u{0}{}", "x".repeat(500)): 1 })));
        assert!(
            r.message.starts_with("unknown field `k\\0xxx"),
            "{}",
            r.message
        );
        assert!(r.message.len() < 400, "{}", r.message);
    }

    // ---- never panics ----

    const FIELDS: &[&str] = &[
        "v",
        "type",
        "request_id",
        "terminal",
        "amount",
        "description",
        "external_reference",
        "ticket_number",
        "print_on_terminal",
        "payment",
        "via",
        "ttl_s",
        "expires_at",
        "target",
        "installments",
        "voucher_type",
    ];

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            any::<String>().prop_map(Value::String),
            prop_oneof![
                Just("charge"),
                Just("refund"),
                Just("cancel"),
                Just("query"),
                Just("terminals"),
                Just("15.00"),
                Just("credit_card"),
                Just("voucher_card"),
                Just("sodexo"),
                Just("terminal"),
                Just(T1),
                Just("T2"),
                Just("2026-11-03T14:05:00Z")
            ]
            .prop_map(|s| Value::String(s.to_string())),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(FIELDS).prop_map(str::to_string),
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn commandish() -> impl Strategy<Value = Value> {
        (
            prop::collection::btree_map(
                prop::sample::select(FIELDS).prop_map(str::to_string),
                any_json(),
                0..10,
            ),
            any::<bool>(),
        )
            .prop_map(|(m, v1)| {
                let mut obj: Map<String, Value> = m.into_iter().collect();
                if v1 {
                    obj.insert("v".to_string(), json!(1));
                }
                Value::Object(obj)
            })
    }

    fn check_refusal_shape(
        payload: &[u8],
        result: &Result<ValidCommand, Refusal>,
    ) -> Result<(), TestCaseError> {
        if let Err(r) = result {
            prop_assert!(!r.message.is_empty());
            if let Some(id) = &r.request_id {
                prop_assert!(is_request_id(id));
            }
            if matches!(r.code, ErrorCode::TooLarge | ErrorCode::BadJson) {
                prop_assert_eq!(&r.request_id, &None);
            }
        } else {
            prop_assert!(payload.len() <= MAX_COMMAND_BYTES);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let f = fixture();
            for site in [Site::MLA, Site::MLB] {
                let result = validate(&bytes, &f.ctx(site, "kiosk-01"));
                check_refusal_shape(&bytes, &result)?;
            }
        }

        #[test]
        fn arbitrary_command_like_json_never_panics(cmd in commandish(), site in prop::sample::select(vec![Site::MLA, Site::MLB, Site::MLM])) {
            let f = fixture();
            let payload = cmd.to_string();
            for station in ["kiosk-01", "lane-02", "scale-03"] {
                let result = validate(payload.as_bytes(), &f.ctx(site, station));
                check_refusal_shape(payload.as_bytes(), &result)?;
            }
        }

        #[test]
        fn valid_amounts_within_limits_are_accepted_in_any_notation(c in 500u64..=400_000_000) {
            let two = Cents(c).to_decimal();
            let got = charge(&ch(json!({ "amount": two }))).amount;
            prop_assert_eq!(got, Cents(c));
            if c % 100 == 0 {
                prop_assert_eq!(charge(&ch(json!({ "amount": (c / 100).to_string() }))).amount, Cents(c));
            }
        }
    }
}
