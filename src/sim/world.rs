//! The simulator's state and rules, without IO: devices, payment and refund intents,
//! payments and their refunds, the create ledger, the request log and the injected
//! fault. Every API operation is a method that takes the request as bytes or fields and
//! the current time, and returns the JSON to answer or an `ApiFail` (an MP-style error).
//!
//! Invariants:
//! - A device holds at most one non-final intent (payment or refund): `busy_with` is the
//!   only place that decides it, and every create checks it under the same lock.
//! - An intent never leaves a final state; `enter` is the only code that changes a
//!   state, and it performs the side effects (payment created on FINISHED or
//!   CONFIRMATION_REQUIRED, payment refunded when a refund intent FINISHES).
//! - The ledger gets exactly one entry per payment intent answered 200 (committed).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{
    Fault, FaultScope, IntentKind, IntentView, LedgerEntry, OutcomeAmounts, RequestLog, SimError,
    TerminalMode,
};
use crate::money::Site;

/// Most requests the log keeps; beyond it the oldest half is dropped (long soaks).
const REQUEST_LOG_MAX: usize = 1_000_000;

/// An error answer in Mercado Pago's usual shape (`message`, `error`, `status`, `cause`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiFail {
    pub status: u16,
    pub error: &'static str,
    pub message: String,
    pub cause: Vec<Value>,
}

impl ApiFail {
    pub fn new(status: u16, error: &'static str, message: impl Into<String>) -> Self {
        ApiFail {
            status,
            error,
            message: message.into(),
            cause: Vec::new(),
        }
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiFail {
            status: 400,
            error: "bad_request",
            cause: vec![json!({ "code": code, "description": message })],
            message,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiFail::new(404, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiFail::new(409, "conflict", message)
    }

    pub fn body(&self) -> Value {
        json!({
            "message": self.message,
            "error": self.error,
            "status": self.status,
            "cause": self.cause,
        })
    }
}

/// Intent states as the Integrations API writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IState {
    Open,
    OnTerminal,
    Processing,
    Processed,
    Finished,
    Canceled,
    Error,
    Abandoned,
    ConfirmationRequired,
}

impl IState {
    pub fn as_str(self) -> &'static str {
        match self {
            IState::Open => "OPEN",
            IState::OnTerminal => "ON_TERMINAL",
            IState::Processing => "PROCESSING",
            IState::Processed => "PROCESSED",
            IState::Finished => "FINISHED",
            IState::Canceled => "CANCELED",
            IState::Error => "ERROR",
            IState::Abandoned => "ABANDONED",
            IState::ConfirmationRequired => "CONFIRMATION_REQUIRED",
        }
    }

    pub fn parse(s: &str) -> Option<IState> {
        Some(match s {
            "OPEN" => IState::Open,
            "ON_TERMINAL" => IState::OnTerminal,
            "PROCESSING" => IState::Processing,
            "PROCESSED" => IState::Processed,
            "FINISHED" => IState::Finished,
            "CANCELED" => IState::Canceled,
            "ERROR" => IState::Error,
            "ABANDONED" => IState::Abandoned,
            "CONFIRMATION_REQUIRED" => IState::ConfirmationRequired,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            IState::Finished
                | IState::Canceled
                | IState::Error
                | IState::Abandoned
                | IState::ConfirmationRequired
        )
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DeviceRec {
    pub id: String,
    pub mode: String,
    pub store_id: String,
    pub pos_id: u64,
    pub external_pos_id: String,
}

#[derive(Debug, Clone)]
pub(crate) enum IntentBody {
    Payment {
        amount: u64,
        external_reference: Option<String>,
        /// The request as received: the create answer and GET echo it.
        echo: Map<String, Value>,
        /// MLB `payment.type`, when sent.
        payment_type: Option<String>,
        installments: Option<u64>,
        voucher_type: Option<String>,
        payment_id: Option<u64>,
    },
    Refund {
        payment_id: u64,
        additional_info: Option<Value>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct IntentRec {
    pub id: String,
    pub device_id: String,
    pub state: IState,
    pub created_ms: i64,
    pub changed_ms: i64,
    pub body: IntentBody,
}

impl IntentRec {
    fn kind(&self) -> IntentKind {
        match self.body {
            IntentBody::Payment { .. } => IntentKind::Payment,
            IntentBody::Refund { .. } => IntentKind::Refund,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RefundRec {
    pub id: u64,
    pub amount: u64,
    pub created_ms: i64,
}

#[derive(Debug, Clone)]
pub(crate) struct PaymentRec {
    pub id: u64,
    pub status: String,
    pub status_detail: String,
    pub amount: u64,
    pub refunded: u64,
    pub external_reference: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub payment_type_id: String,
    pub payment_method_id: String,
    pub installments: u64,
    pub device_id: String,
    pub description: Option<String>,
    pub refunds: Vec<RefundRec>,
}

/// What the API middleware must do with one request, decided by the current fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FaultAction {
    Pass,
    /// Drop the connection without answering and without processing.
    Drop,
    Status(u16),
    TooMany(u32),
    Slow(Duration),
    CommitThenDrop,
    CommitThenStatus(u16),
}

/// The whole simulated world. Lives behind one mutex; no method awaits.
pub(crate) struct World {
    pub site: Site,
    pub outcomes: OutcomeAmounts,
    pub terminal: TerminalMode,
    /// Bumped on every terminal-mode change; auto drivers of an older epoch stop.
    pub mode_epoch: u64,
    pub abandon_after: Duration,
    pub serve_lists: bool,
    pub fault: Fault,
    pub fault_scope: FaultScope,
    devices: Vec<DeviceRec>,
    intents: HashMap<String, IntentRec>,
    /// Intent ids (payment and refund) in creation order.
    order: Vec<String>,
    /// Device id → its latest intent: the only one that can still be non-final.
    latest: HashMap<String, String>,
    payments: BTreeMap<u64, PaymentRec>,
    next_payment_id: u64,
    next_refund_id: u64,
    /// (payment id, X-Idempotency-Key) → refund id.
    refund_keys: HashMap<(u64, String), u64>,
    ledger: Vec<LedgerEntry>,
    requests: Vec<RequestLog>,
    request_count: u64,
}

impl World {
    pub fn new(cfg: &super::SimConfig) -> World {
        let mut world = World {
            site: cfg.site,
            outcomes: cfg.outcome_amounts.clone(),
            terminal: cfg.terminal.clone(),
            mode_epoch: 0,
            abandon_after: cfg.abandon_after,
            serve_lists: cfg.serve_intent_lists,
            fault: Fault::None,
            fault_scope: FaultScope::All,
            devices: Vec::new(),
            intents: HashMap::new(),
            order: Vec::new(),
            latest: HashMap::new(),
            payments: BTreeMap::new(),
            next_payment_id: fastrand::u64(10_000_000_000..80_000_000_000),
            next_refund_id: fastrand::u64(1_000_000_000..8_000_000_000),
            refund_keys: HashMap::new(),
            ledger: Vec::new(),
            requests: Vec::new(),
            request_count: 0,
        };
        for id in &cfg.devices {
            world.set_device_mode(id, "PDV");
        }
        for id in &cfg.standalone_devices {
            world.set_device_mode(id, "STANDALONE");
        }
        world
    }

    // ----- scripting and inspection -------------------------------------------------

    /// Sets a device's operating mode; an unknown device is added (in PDV order).
    pub fn set_device_mode(&mut self, id: &str, mode: &str) {
        if let Some(d) = self.devices.iter_mut().find(|d| d.id == id) {
            d.mode = mode.to_string();
            return;
        }
        let n = self.devices.len() as u64 + 1;
        self.devices.push(DeviceRec {
            id: id.to_string(),
            mode: mode.to_string(),
            store_id: "71000001".to_string(),
            pos_id: 72_000_000 + n,
            external_pos_id: format!("SIMPOS{n:03}"),
        });
    }

    pub fn set_fault(&mut self, scope: FaultScope, fault: Fault) {
        let exhausted = matches!(
            fault,
            Fault::Status5xx {
                remaining: Some(0),
                ..
            } | Fault::TooMany {
                remaining: Some(0),
                ..
            } | Fault::CommitThenDrop { remaining: Some(0) }
                | Fault::CommitThen5xx {
                    remaining: Some(0),
                    ..
                }
        );
        self.fault = if exhausted { Fault::None } else { fault };
        self.fault_scope = scope;
    }

    pub fn is_down(&self) -> bool {
        self.fault == Fault::Down
    }

    /// Decides what happens to one API request and consumes one use of a counted fault.
    pub fn take_fault(&mut self, method: &str, path: &str) -> FaultAction {
        if self.fault == Fault::Down {
            return FaultAction::Drop;
        }
        if !self.fault_scope.matches(method, path) {
            return FaultAction::Pass;
        }
        let (action, remaining) = match &mut self.fault {
            Fault::None | Fault::Down => return FaultAction::Pass,
            Fault::Slow(d) => return FaultAction::Slow(*d),
            Fault::Status5xx { status, remaining } => (FaultAction::Status(*status), remaining),
            Fault::TooMany {
                retry_after_s,
                remaining,
            } => (FaultAction::TooMany(*retry_after_s), remaining),
            Fault::CommitThenDrop { remaining } => (FaultAction::CommitThenDrop, remaining),
            Fault::CommitThen5xx { status, remaining } => {
                (FaultAction::CommitThenStatus(*status), remaining)
            }
        };
        if let Some(n) = remaining {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.fault = Fault::None;
            }
        }
        action
    }

    pub fn log_request(&mut self, entry: RequestLog) {
        self.request_count += 1;
        if self.requests.len() >= REQUEST_LOG_MAX {
            self.requests.drain(..REQUEST_LOG_MAX / 2);
        }
        self.requests.push(entry);
    }

    pub fn request_count(&self) -> u64 {
        self.request_count
    }

    pub fn requests(&self) -> Vec<RequestLog> {
        self.requests.clone()
    }

    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.ledger.clone()
    }

    pub fn creates_for(&self, external_reference: &str) -> usize {
        self.ledger
            .iter()
            .filter(|e| e.external_reference.as_deref() == Some(external_reference))
            .count()
    }

    pub fn duplicated_references(&self) -> Vec<String> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &self.ledger {
            if let Some(r) = e.external_reference.as_deref() {
                *counts.entry(r).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(r, _)| r.to_string())
            .collect()
    }

    pub fn view(&self, id: &str) -> Option<IntentView> {
        self.intents.get(id).map(|rec| self.view_of(rec))
    }

    pub fn views(&self) -> Vec<IntentView> {
        self.order.iter().filter_map(|id| self.view(id)).collect()
    }

    fn view_of(&self, rec: &IntentRec) -> IntentView {
        let (amount, external_reference, payment_id) = match &rec.body {
            IntentBody::Payment {
                amount,
                external_reference,
                payment_id,
                ..
            } => (
                Some(*amount),
                external_reference.clone(),
                payment_id.map(|p| p.to_string()),
            ),
            IntentBody::Refund { payment_id, .. } => {
                let p = self.payments.get(payment_id);
                (
                    p.map(|p| p.amount),
                    p.and_then(|p| p.external_reference.clone()),
                    Some(payment_id.to_string()),
                )
            }
        };
        IntentView {
            id: rec.id.clone(),
            kind: rec.kind(),
            device_id: rec.device_id.clone(),
            state: rec.state.as_str().to_string(),
            amount,
            external_reference,
            payment_id,
            created_unix_ms: rec.created_ms,
        }
    }

    /// Ids of the intents that are not final (for re-arming auto drivers).
    pub fn live_intents(&self) -> Vec<String> {
        self.order
            .iter()
            .filter(|id| self.intents.get(*id).is_some_and(|r| !r.state.is_final()))
            .cloned()
            .collect()
    }

    pub fn set_payment_status(
        &mut self,
        payment_id: &str,
        status: &str,
        detail: &str,
        now: i64,
    ) -> Result<(), SimError> {
        let p = payment_id
            .parse::<u64>()
            .ok()
            .and_then(|id| self.payments.get_mut(&id))
            .ok_or_else(|| SimError::UnknownPayment(payment_id.to_string()))?;
        p.status = status.to_string();
        p.status_detail = detail.to_string();
        p.updated_ms = now;
        Ok(())
    }

    /// Moves an intent to `to` as the terminal (or an operator) would.
    pub fn advance(&mut self, id: &str, to: &str, now: i64) -> Result<(), SimError> {
        let to_state = IState::parse(to).ok_or_else(|| SimError::UnknownState(to.to_string()))?;
        let rec = self
            .intents
            .get(id)
            .ok_or_else(|| SimError::UnknownIntent(id.to_string()))?;
        if rec.state == to_state {
            return Ok(());
        }
        let refund_only_bad = rec.kind() == IntentKind::Refund
            && matches!(to_state, IState::Processed | IState::ConfirmationRequired);
        if rec.state.is_final() || to_state == IState::Open || refund_only_bad {
            return Err(SimError::InvalidTransition {
                id: id.to_string(),
                from: rec.state.as_str().to_string(),
                to: to.to_string(),
            });
        }
        self.enter(id, to_state, now);
        Ok(())
    }

    // ----- the terminal ---------------------------------------------------------------

    /// Where the automatic terminal takes this intent next, and after how long.
    pub fn auto_step(&self, id: &str) -> Option<(IState, IState, Duration)> {
        let TerminalMode::Auto { pickup, process } = &self.terminal else {
            return None;
        };
        let rec = self.intents.get(id)?;
        let refund = rec.kind() == IntentKind::Refund;
        let third = *process / 3;
        let half = *process / 2;
        let (next, delay) = match (rec.state, &rec.body) {
            (IState::Open, _) => (IState::OnTerminal, *pickup),
            (IState::OnTerminal, _) => (IState::Processing, if refund { half } else { third }),
            (IState::Processing, IntentBody::Payment { amount, .. }) => {
                if *amount == self.outcomes.error {
                    (IState::Error, third)
                } else {
                    (IState::Processed, third)
                }
            }
            (IState::Processing, IntentBody::Refund { .. }) => (IState::Finished, half),
            (IState::Processed, _) => (IState::Finished, third),
            _ => return None,
        };
        Some((rec.state, next, delay))
    }

    /// Applies an automatic step if the intent is still where the driver saw it.
    pub fn auto_apply(&mut self, id: &str, from: IState, to: IState, now: i64) -> bool {
        match self.intents.get(id) {
            Some(rec) if rec.state == from => {
                self.enter(id, to, now);
                true
            }
            _ => false,
        }
    }

    /// Abandons the intent if it is still waiting for or on the terminal.
    pub fn abandon_if_waiting(&mut self, id: &str, now: i64) -> bool {
        let waiting = self
            .intents
            .get(id)
            .is_some_and(|r| matches!(r.state, IState::Open | IState::OnTerminal));
        if waiting {
            self.enter(id, IState::Abandoned, now);
        }
        waiting
    }

    /// The only state change: sets the state and performs its side effects.
    fn enter(&mut self, id: &str, to: IState, now: i64) {
        let Some(rec) = self.intents.get_mut(id) else {
            return;
        };
        rec.state = to;
        rec.changed_ms = now;
        let device_id = rec.device_id.clone();
        match &mut rec.body {
            IntentBody::Payment {
                amount,
                external_reference,
                echo,
                payment_type,
                installments,
                voucher_type,
                payment_id,
            } => {
                let outcome = match to {
                    IState::Finished => Some(outcome_for(*amount, &self.outcomes)),
                    IState::ConfirmationRequired => Some(("in_process", "pending_contingency")),
                    _ => None,
                };
                let Some((status, detail)) = outcome else {
                    return;
                };
                if payment_id.is_some() {
                    return;
                }
                let id = self.next_payment_id;
                self.next_payment_id += 1;
                *payment_id = Some(id);
                let kind = payment_type
                    .clone()
                    .unwrap_or_else(|| "credit_card".to_string());
                let method = match kind.as_str() {
                    "debit_card" => "debvisa".to_string(),
                    "voucher_card" => voucher_type.clone().unwrap_or_else(|| "sodexo".to_string()),
                    _ => "visa".to_string(),
                };
                let rec = PaymentRec {
                    id,
                    status: status.to_string(),
                    status_detail: detail.to_string(),
                    amount: *amount,
                    refunded: 0,
                    external_reference: external_reference.clone(),
                    created_ms: now,
                    updated_ms: now,
                    payment_type_id: kind,
                    payment_method_id: method,
                    installments: installments.unwrap_or(1),
                    device_id,
                    description: echo
                        .get("description")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    refunds: Vec::new(),
                };
                self.payments.insert(id, rec);
            }
            IntentBody::Refund { payment_id, .. } => {
                if to != IState::Finished {
                    return;
                }
                let pid = *payment_id;
                let refund_id = self.next_refund_id;
                if let Some(p) = self.payments.get_mut(&pid) {
                    let left = p.amount.saturating_sub(p.refunded);
                    if left > 0 {
                        self.next_refund_id += 1;
                        p.refunds.push(RefundRec {
                            id: refund_id,
                            amount: left,
                            created_ms: now,
                        });
                        p.refunded = p.amount;
                        p.status = "refunded".to_string();
                        p.status_detail = "refunded".to_string();
                        p.updated_ms = now;
                    }
                }
            }
        }
    }

    // ----- devices ----------------------------------------------------------------------

    fn device(&self, id: &str) -> Option<&DeviceRec> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// The non-final intent the device is holding, if any.
    fn busy_with(&self, device_id: &str) -> Option<&IntentRec> {
        self.latest
            .get(device_id)
            .and_then(|id| self.intents.get(id))
            .filter(|r| !r.state.is_final())
    }

    pub fn list_devices(&self, q: &HashMap<String, String>) -> Result<Value, ApiFail> {
        let limit = query_u64(q, "limit")?.unwrap_or(50);
        let offset = query_u64(q, "offset")?.unwrap_or(0);
        let pos_id = query_u64(q, "pos_id")?;
        let store_id = q.get("store_id");
        let matching: Vec<&DeviceRec> = self
            .devices
            .iter()
            .filter(|d| store_id.is_none_or(|s| *s == d.store_id))
            .filter(|d| pos_id.is_none_or(|p| p == d.pos_id))
            .collect();
        let page: Vec<Value> = matching
            .iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(|d| {
                json!({
                    "id": d.id,
                    "pos_id": d.pos_id,
                    "store_id": d.store_id,
                    "external_pos_id": d.external_pos_id,
                    "operating_mode": d.mode,
                })
            })
            .collect();
        Ok(json!({
            "devices": page,
            "paging": { "total": matching.len(), "offset": offset, "limit": limit },
        }))
    }

    pub fn patch_device(&mut self, id: &str, body: &[u8]) -> Result<Value, ApiFail> {
        let v = parse_object(body)?;
        only_fields(&v, &["operating_mode"])?;
        let mode = match v.get("operating_mode").and_then(Value::as_str) {
            Some(m @ ("PDV" | "STANDALONE")) => m.to_string(),
            _ => {
                return Err(ApiFail::bad_request(
                    "invalid_operating_mode",
                    "operating_mode: must be PDV or STANDALONE",
                ))
            }
        };
        if self.device(id).is_none() {
            return Err(ApiFail::not_found("Device not found"));
        }
        self.set_device_mode(id, &mode);
        Ok(json!({ "operating_mode": mode }))
    }

    // ----- payment intents ----------------------------------------------------------------

    /// `POST /devices/{id}/payment-intents`. On success the intent is committed and in
    /// the ledger; the caller arms its timers with the returned id.
    pub fn create_intent(
        &mut self,
        device_id: &str,
        body: &[u8],
        now: i64,
    ) -> Result<(Value, String), ApiFail> {
        let device = self
            .device(device_id)
            .ok_or_else(|| ApiFail::not_found("Device not found"))?;
        let v = parse_object(body)?;
        let checked = validate_create(self.site, &v)?;
        if device.mode != "PDV" {
            return Err(ApiFail::bad_request(
                "device_not_in_pdv_mode",
                "Device is not in PDV operating mode",
            ));
        }
        if self.busy_with(device_id).is_some() {
            return Err(ApiFail::conflict("Device has a queued payment intent"));
        }
        let id = uuid_v4();
        let mut answer = checked.echo.clone();
        answer.insert("id".into(), Value::String(id.clone()));
        answer.insert("device_id".into(), Value::String(device_id.to_string()));
        self.ledger.push(LedgerEntry {
            intent_id: id.clone(),
            device_id: device_id.to_string(),
            amount: checked.amount,
            external_reference: checked.external_reference.clone(),
            created_unix_ms: now,
        });
        self.intents.insert(
            id.clone(),
            IntentRec {
                id: id.clone(),
                device_id: device_id.to_string(),
                state: IState::Open,
                created_ms: now,
                changed_ms: now,
                body: IntentBody::Payment {
                    amount: checked.amount,
                    external_reference: checked.external_reference,
                    echo: checked.echo,
                    payment_type: checked.payment_type,
                    installments: checked.installments,
                    voucher_type: checked.voucher_type,
                    payment_id: None,
                },
            },
        );
        self.order.push(id.clone());
        self.latest.insert(device_id.to_string(), id.clone());
        Ok((Value::Object(answer), id))
    }

    fn payment_intent(&self, id: &str) -> Option<&IntentRec> {
        self.intents
            .get(id)
            .filter(|r| r.kind() == IntentKind::Payment)
    }

    pub fn get_intent(&self, id: &str) -> Result<Value, ApiFail> {
        let rec = self
            .payment_intent(id)
            .ok_or_else(|| ApiFail::not_found("Payment intent doesn't exist"))?;
        let IntentBody::Payment {
            echo, payment_id, ..
        } = &rec.body
        else {
            return Err(ApiFail::not_found("Payment intent doesn't exist"));
        };
        let mut out = echo.clone();
        out.insert("id".into(), json!(rec.id));
        out.insert("device_id".into(), json!(rec.device_id));
        out.insert("state".into(), json!(rec.state.as_str()));
        if let Some(pid) = payment_id {
            let mut payment = match out.remove("payment") {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            };
            payment.insert("id".into(), Value::String(pid.to_string()));
            out.insert("payment".into(), Value::Object(payment));
        }
        Ok(Value::Object(out))
    }

    pub fn cancel_intent(&mut self, device_id: &str, id: &str, now: i64) -> Result<Value, ApiFail> {
        let rec = self
            .payment_intent(id)
            .filter(|r| r.device_id == device_id)
            .ok_or_else(|| ApiFail::not_found("Payment intent doesn't exist"))?;
        if rec.state != IState::Open {
            return Err(ApiFail::conflict("Payment intent is blocked by terminal"));
        }
        self.enter(id, IState::Canceled, now);
        Ok(json!({ "id": id }))
    }

    // ----- intent lists (deprecated endpoints) ------------------------------------------------

    pub fn intent_events(&self, q: &HashMap<String, String>) -> Result<Value, ApiFail> {
        if !self.serve_lists {
            return Err(ApiFail::not_found("not found"));
        }
        let bad = || {
            ApiFail::bad_request(
                "invalid_dates",
                "startDate and/or endDate are missing or incorrect",
            )
        };
        let fmt = time::macros::format_description!("[year]-[month]-[day]");
        let start = q
            .get("startDate")
            .and_then(|s| time::Date::parse(s, &fmt).ok())
            .ok_or_else(bad)?;
        let end = q
            .get("endDate")
            .and_then(|s| time::Date::parse(s, &fmt).ok())
            .ok_or_else(bad)?;
        let span = (end - start).whole_days();
        if !(0..=30).contains(&span) {
            return Err(bad());
        }
        let events: Vec<Value> = self
            .order
            .iter()
            .filter_map(|id| self.payment_intent(id))
            .filter(|r| {
                let day = utc(r.created_ms).date();
                start <= day && day <= end
            })
            .map(|r| {
                json!({
                    "payment_intent_id": r.id,
                    "status": r.state.as_str(),
                    "created_on": rfc3339_secs(r.created_ms),
                })
            })
            .collect();
        Ok(json!({ "events": events }))
    }

    pub fn intent_last_event(&self, id: &str) -> Result<Value, ApiFail> {
        if !self.serve_lists {
            return Err(ApiFail::not_found("not found"));
        }
        let rec = self
            .payment_intent(id)
            .ok_or_else(|| ApiFail::not_found("Payment Intent doesn't exist"))?;
        Ok(json!({ "status": rec.state.as_str(), "created_on": rfc3339_secs(rec.changed_ms) }))
    }

    // ----- refund intents ------------------------------------------------------------------

    pub fn create_refund_intent(
        &mut self,
        device_id: &str,
        body: &[u8],
        now: i64,
    ) -> Result<(Value, String), ApiFail> {
        let device = self
            .device(device_id)
            .ok_or_else(|| ApiFail::not_found("Device or Payment not found"))?;
        let device_mode = device.mode.clone();
        let v = parse_object(body)?;
        only_fields(&v, &["payment_id", "additional_info"])?;
        let payment_id = match v.get("payment_id") {
            Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u64>().ok()
            }
            Some(Value::Number(n)) => n.as_u64(),
            _ => None,
        }
        .ok_or_else(|| {
            ApiFail::bad_request(
                "invalid_payment_id",
                "payment_id: required, a string of digits",
            )
        })?;
        let additional_info = match v.get("additional_info") {
            None | Some(Value::Null) => None,
            Some(Value::Object(info)) => {
                only_fields(info, &["print_on_terminal"])?;
                match info.get("print_on_terminal") {
                    None | Some(Value::Null) => {}
                    Some(Value::Array(items))
                        if items.iter().all(|i| {
                            matches!(i.as_str(), Some("SELLER_TICKET" | "BUYER_TICKET"))
                        }) => {}
                    Some(_) => {
                        return Err(ApiFail::bad_request(
                            "invalid_print_on_terminal",
                            "additional_info.print_on_terminal: an array of SELLER_TICKET, BUYER_TICKET",
                        ))
                    }
                }
                Some(Value::Object(info.clone()))
            }
            Some(_) => {
                return Err(ApiFail::bad_request(
                    "invalid_additional_info",
                    "additional_info: must be an object",
                ))
            }
        };
        let payment = self
            .payments
            .get(&payment_id)
            .ok_or_else(|| ApiFail::not_found("Device or Payment not found"))?;
        if payment.device_id != device_id {
            return Err(ApiFail::bad_request(
                "payment_from_another_device",
                "The payment was not processed by this device",
            ));
        }
        if payment.status != "approved" || payment.refunded > 0 {
            return Err(ApiFail::bad_request(
                "payment_not_refundable",
                "Only an approved payment with no refunds can be refunded on the terminal",
            ));
        }
        if device_mode != "PDV" {
            return Err(ApiFail::bad_request(
                "device_not_in_pdv_mode",
                "Device is not in PDV operating mode",
            ));
        }
        if self.busy_with(device_id).is_some() {
            return Err(ApiFail::conflict("Device has a queued intent"));
        }
        let id = uuid_v4();
        self.intents.insert(
            id.clone(),
            IntentRec {
                id: id.clone(),
                device_id: device_id.to_string(),
                state: IState::Open,
                created_ms: now,
                changed_ms: now,
                body: IntentBody::Refund {
                    payment_id,
                    additional_info,
                },
            },
        );
        self.order.push(id.clone());
        self.latest.insert(device_id.to_string(), id.clone());
        let answer = self.refund_json(&id, false)?;
        Ok((answer, id))
    }

    fn refund_json(&self, id: &str, with_state: bool) -> Result<Value, ApiFail> {
        let missing = || ApiFail::not_found("Refund intent doesn't exist");
        let rec = self.intents.get(id).ok_or_else(missing)?;
        let IntentBody::Refund {
            payment_id,
            additional_info,
        } = &rec.body
        else {
            return Err(missing());
        };
        let mut out = Map::new();
        out.insert("id".into(), json!(rec.id));
        out.insert("device_id".into(), json!(rec.device_id));
        out.insert("payment_id".into(), json!(payment_id.to_string()));
        if let Some(info) = additional_info {
            out.insert("additional_info".into(), info.clone());
        }
        if with_state {
            out.insert("state".into(), json!(rec.state.as_str()));
        }
        Ok(Value::Object(out))
    }

    pub fn get_refund_intent(&self, id: &str) -> Result<Value, ApiFail> {
        self.refund_json(id, true)
    }

    pub fn cancel_refund_intent(
        &mut self,
        device_id: &str,
        id: &str,
        now: i64,
    ) -> Result<Value, ApiFail> {
        let rec = self
            .intents
            .get(id)
            .filter(|r| r.kind() == IntentKind::Refund && r.device_id == device_id)
            .ok_or_else(|| ApiFail::not_found("Refund intent doesn't exist"))?;
        if rec.state != IState::Open {
            return Err(ApiFail::conflict("Refund intent is blocked by terminal"));
        }
        self.enter(id, IState::Canceled, now);
        Ok(json!({ "id": id }))
    }

    // ----- payments API -------------------------------------------------------------------

    fn payment_json(&self, p: &PaymentRec) -> Value {
        let device = self.device(&p.device_id);
        json!({
            "id": p.id,
            "status": p.status,
            "status_detail": p.status_detail,
            "transaction_amount": major(p.amount),
            "transaction_amount_refunded": major(p.refunded),
            "currency_id": currency(self.site),
            "external_reference": p.external_reference,
            "description": p.description,
            "date_created": mp_date(p.created_ms),
            "date_approved": if p.status == "approved" || p.status == "refunded" { Value::String(mp_date(p.created_ms)) } else { Value::Null },
            "date_last_updated": mp_date(p.updated_ms),
            "payment_type_id": p.payment_type_id,
            "payment_method_id": p.payment_method_id,
            "installments": p.installments,
            "pos_id": device.map(|d| d.pos_id.to_string()),
            "store_id": device.map(|d| d.store_id.clone()),
            "refunds": p.refunds.iter().map(|r| refund_json(p.id, r)).collect::<Vec<_>>(),
        })
    }

    pub fn get_payment(&self, id: &str) -> Result<Value, ApiFail> {
        let p = id
            .parse::<u64>()
            .ok()
            .and_then(|id| self.payments.get(&id))
            .ok_or_else(|| ApiFail::not_found("Payment not found"))?;
        Ok(self.payment_json(p))
    }

    pub fn search_payments(&self, q: &HashMap<String, String>) -> Result<Value, ApiFail> {
        let limit = query_u64(q, "limit")?.unwrap_or(30);
        let offset = query_u64(q, "offset")?.unwrap_or(0);
        let wanted = q.get("external_reference");
        let matching: Vec<&PaymentRec> = self
            .payments
            .values()
            .filter(|p| wanted.is_none_or(|w| p.external_reference.as_ref() == Some(w)))
            .collect();
        let results: Vec<Value> = matching
            .iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(|p| self.payment_json(p))
            .collect();
        Ok(json!({
            "results": results,
            "paging": { "total": matching.len(), "limit": limit, "offset": offset },
        }))
    }

    /// `POST /v1/payments/{id}/refunds`: `{}` (or no body) for the rest, `{"amount": 5.5}`
    /// for part. The same idempotency key on the same payment returns the same refund.
    pub fn refund_payment(
        &mut self,
        id: &str,
        body: &[u8],
        key: Option<&str>,
        now: i64,
    ) -> Result<Value, ApiFail> {
        let pid = id
            .parse::<u64>()
            .ok()
            .filter(|pid| self.payments.contains_key(pid))
            .ok_or_else(|| ApiFail::not_found("Payment not found"))?;
        if let Some(key) = key {
            if let Some(rid) = self.refund_keys.get(&(pid, key.to_string())) {
                let found = self
                    .payments
                    .get(&pid)
                    .and_then(|p| p.refunds.iter().find(|r| r.id == *rid));
                if let Some(r) = found {
                    return Ok(refund_json(pid, r));
                }
            }
        }
        let requested = if body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            let v = parse_object(body)?;
            match v.get("amount") {
                None | Some(Value::Null) => None,
                Some(a) => Some(cents_of(a).ok_or_else(|| {
                    ApiFail::bad_request(
                        "invalid_amount",
                        "amount: a positive amount with at most 2 decimals",
                    )
                })?),
            }
        };
        let refund_id = self.next_refund_id;
        let p = self
            .payments
            .get_mut(&pid)
            .ok_or_else(|| ApiFail::not_found("Payment not found"))?;
        if p.status != "approved" {
            return Err(ApiFail::bad_request(
                "invalid_payment_status",
                format!("Payment in status {} cannot be refunded", p.status),
            ));
        }
        let left = p.amount.saturating_sub(p.refunded);
        let amount = requested.unwrap_or(left);
        if amount == 0 || amount > left {
            return Err(ApiFail::bad_request(
                "invalid_refund_amount",
                "The refund amount exceeds what is left to refund",
            ));
        }
        self.next_refund_id += 1;
        let refund = RefundRec {
            id: refund_id,
            amount,
            created_ms: now,
        };
        p.refunds.push(refund.clone());
        p.refunded += amount;
        p.updated_ms = now;
        if p.refunded == p.amount {
            p.status = "refunded".to_string();
            p.status_detail = "refunded".to_string();
        } else {
            p.status_detail = "partially_refunded".to_string();
        }
        if let Some(key) = key {
            self.refund_keys.insert((pid, key.to_string()), refund_id);
        }
        Ok(refund_json(pid, &refund))
    }

    pub fn list_refunds(&self, id: &str) -> Result<Value, ApiFail> {
        let p = id
            .parse::<u64>()
            .ok()
            .and_then(|id| self.payments.get(&id))
            .ok_or_else(|| ApiFail::not_found("Payment not found"))?;
        Ok(Value::Array(
            p.refunds.iter().map(|r| refund_json(p.id, r)).collect(),
        ))
    }
}

fn refund_json(payment_id: u64, r: &RefundRec) -> Value {
    json!({
        "id": r.id,
        "payment_id": payment_id,
        "amount": major(r.amount),
        "status": "approved",
        "date_created": mp_date(r.created_ms),
    })
}

/// The payment a finished intent gets, by amount (the Point simulator's table).
fn outcome_for(amount: u64, outcomes: &OutcomeAmounts) -> (&'static str, &'static str) {
    if amount == outcomes.rejected {
        ("rejected", "cc_rejected_other_reason")
    } else if amount == outcomes.reversed {
        ("cancelled", "reversed")
    } else {
        ("approved", "accredited")
    }
}

/// Amount limits per site, in cents (docs: payment-processing).
pub(crate) fn amount_limits(site: Site) -> (u64, u64) {
    match site {
        Site::MLA => (500, 400_000_000),
        Site::MLB => (100, 7_000_000),
        Site::MLM => (500, 35_000_000),
    }
}

fn currency(site: Site) -> &'static str {
    match site {
        Site::MLA => "ARS",
        Site::MLB => "BRL",
        Site::MLM => "MXN",
    }
}

/// Cents to a JSON decimal in major units (1550 → 15.5). Exact: amounts stay far below 2^53.
fn major(cents: u64) -> Value {
    let n = serde_json::Number::from_f64(cents as f64 / 100.0);
    n.map(Value::Number).unwrap_or(Value::Null)
}

/// A JSON decimal in major units to cents; `None` unless positive with ≤ 2 decimals.
fn cents_of(v: &Value) -> Option<u64> {
    let x = v.as_f64()?;
    let scaled = x * 100.0;
    let rounded = scaled.round();
    if rounded.is_nan() || rounded < 1.0 || (scaled - rounded).abs() > 1e-6 || rounded > 1e15 {
        return None;
    }
    Some(rounded as u64)
}

struct CheckedCreate {
    amount: u64,
    external_reference: Option<String>,
    payment_type: Option<String>,
    installments: Option<u64>,
    voucher_type: Option<String>,
    echo: Map<String, Value>,
}

fn present<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

fn opt_str(m: &Map<String, Value>, key: &str, path: &str) -> Result<Option<String>, ApiFail> {
    match present(m, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiFail::bad_request(
            "invalid_field",
            format!("{path}: must be a string"),
        )),
    }
}

/// Checks a payment-intent create body against the site's schema (docs 2.3).
fn validate_create(site: Site, v: &Map<String, Value>) -> Result<CheckedCreate, ApiFail> {
    let mut allowed = vec!["amount", "additional_info"];
    if site == Site::MLB {
        allowed.extend(["description", "payment"]);
    }
    only_fields(v, &allowed)?;

    let amount = match present(v, "amount") {
        None => return Err(ApiFail::bad_request("missing_amount", "amount: required")),
        Some(a) => a.as_u64().ok_or_else(|| {
            ApiFail::bad_request(
                "invalid_amount",
                "amount: must be an integer number of cents",
            )
        })?,
    };
    let (min, max) = amount_limits(site);
    if !(min..=max).contains(&amount) {
        return Err(ApiFail::bad_request(
            "invalid_amount",
            format!("amount: must be between {min} and {max}"),
        ));
    }

    let mut external_reference = None;
    match present(v, "additional_info") {
        None if matches!(site, Site::MLA | Site::MLM) => {
            return Err(ApiFail::bad_request(
                "missing_additional_info",
                "additional_info: required",
            ))
        }
        None => {}
        Some(Value::Object(info)) => {
            let mut fields = vec!["external_reference", "print_on_terminal"];
            if site == Site::MLA {
                fields.push("ticket_number");
            }
            only_fields_at(info, &fields, "additional_info.")?;
            external_reference = opt_str(
                info,
                "external_reference",
                "additional_info.external_reference",
            )?;
            if present(info, "print_on_terminal").is_some_and(|p| !p.is_boolean()) {
                return Err(ApiFail::bad_request(
                    "invalid_field",
                    "additional_info.print_on_terminal: must be a boolean",
                ));
            }
            let ticket = opt_str(info, "ticket_number", "additional_info.ticket_number")?;
            if site == Site::MLA && ticket.as_deref().is_none_or(str::is_empty) {
                return Err(ApiFail::bad_request(
                    "missing_ticket_number",
                    "additional_info.ticket_number: required",
                ));
            }
        }
        Some(_) => {
            return Err(ApiFail::bad_request(
                "invalid_field",
                "additional_info: must be an object",
            ))
        }
    }
    if site == Site::MLA && present(v, "additional_info").is_none() {
        return Err(ApiFail::bad_request(
            "missing_ticket_number",
            "additional_info.ticket_number: required",
        ));
    }

    opt_str(v, "description", "description")?;
    let (mut payment_type, mut installments, mut voucher_type) = (None, None, None);
    match present(v, "payment") {
        None => {}
        Some(Value::Object(p)) => {
            only_fields_at(
                p,
                &["type", "installments", "installments_cost", "voucher_type"],
                "payment.",
            )?;
            let kind = opt_str(p, "type", "payment.type")?;
            let kind = match kind.as_deref() {
                Some(k @ ("credit_card" | "debit_card" | "voucher_card")) => k.to_string(),
                _ => {
                    return Err(ApiFail::bad_request(
                        "invalid_payment_type",
                        "payment.type: one of credit_card, debit_card, voucher_card",
                    ))
                }
            };
            if let Some(i) = present(p, "installments") {
                let n = i.as_u64().filter(|n| (1..=72).contains(n));
                if kind != "credit_card" || n.is_none() {
                    return Err(ApiFail::bad_request(
                        "invalid_installments",
                        "payment.installments: 1 to 72, only with credit_card",
                    ));
                }
                installments = n;
            }
            if let Some(c) = present(p, "installments_cost") {
                if kind != "credit_card" || !matches!(c.as_str(), Some("seller" | "buyer")) {
                    return Err(ApiFail::bad_request(
                        "invalid_installments_cost",
                        "payment.installments_cost: seller or buyer, only with credit_card",
                    ));
                }
            }
            if let Some(t) = present(p, "voucher_type") {
                match t.as_str() {
                    Some(t @ ("sodexo" | "alelo")) if kind == "voucher_card" => {
                        voucher_type = Some(t.to_string())
                    }
                    _ => {
                        return Err(ApiFail::bad_request(
                            "invalid_voucher_type",
                            "payment.voucher_type: sodexo or alelo, only with voucher_card",
                        ))
                    }
                }
            }
            payment_type = Some(kind);
        }
        Some(_) => {
            return Err(ApiFail::bad_request(
                "invalid_field",
                "payment: must be an object",
            ))
        }
    }

    Ok(CheckedCreate {
        amount,
        external_reference,
        payment_type,
        installments,
        voucher_type,
        echo: v.clone(),
    })
}

fn only_fields(v: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiFail> {
    only_fields_at(v, allowed, "")
}

fn only_fields_at(v: &Map<String, Value>, allowed: &[&str], prefix: &str) -> Result<(), ApiFail> {
    match v.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiFail::bad_request(
            "unknown_field",
            format!("{prefix}{k}: field not allowed"),
        )),
        None => Ok(()),
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiFail> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(ApiFail::bad_request(
            "invalid_body",
            "body: must be a JSON object",
        )),
    }
}

fn query_u64(q: &HashMap<String, String>, key: &str) -> Result<Option<u64>, ApiFail> {
    match q.get(key) {
        None => Ok(None),
        Some(s) => s.parse::<u64>().map(Some).map_err(|_| {
            ApiFail::bad_request(
                "invalid_query",
                format!("{key}: must be a non-negative integer"),
            )
        }),
    }
}

/// A random (version 4) UUID, as the API's intent ids look.
pub(crate) fn uuid_v4() -> String {
    let mut n = fastrand::u128(..);
    n = (n & !(0xF_u128 << 76)) | (0x4_u128 << 76);
    n = (n & !(0x3_u128 << 62)) | (0x2_u128 << 62);
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub(crate) fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn utc(ms: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// `2021-08-30T22:37:57Z`, as the events endpoints write dates.
fn rfc3339_secs(ms: i64) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    utc(ms).format(&fmt).unwrap_or_default()
}

/// `2021-08-30T22:37:57.000+00:00`, the payments API's date shape (in UTC).
fn mp_date(ms: i64) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]+00:00"
    );
    utc(ms).format(&fmt).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn mla_create_needs_ticket_number_and_refuses_mlb_fields() {
        let ok = body(
            json!({"amount": 1500, "additional_info": {"ticket_number": "T1", "external_reference": "r"}}),
        );
        assert!(validate_create(Site::MLA, &ok).is_ok());
        let no_ticket =
            body(json!({"amount": 1500, "additional_info": {"external_reference": "r"}}));
        assert_eq!(
            validate_create(Site::MLA, &no_ticket)
                .err()
                .map(|f| f.status),
            Some(400)
        );
        let no_info = body(json!({"amount": 1500}));
        assert!(validate_create(Site::MLA, &no_info).is_err());
        let mlb_field = body(
            json!({"amount": 1500, "description": "x", "additional_info": {"ticket_number": "T1"}}),
        );
        assert!(validate_create(Site::MLA, &mlb_field).is_err());
    }

    #[test]
    fn amounts_are_integers_within_site_limits() {
        for (site, min, max) in [
            (Site::MLA, 500, 400_000_000),
            (Site::MLB, 100, 7_000_000),
            (Site::MLM, 500, 35_000_000),
        ] {
            let info = if site == Site::MLA {
                json!({"ticket_number": "T"})
            } else {
                json!({})
            };
            for (amount, ok) in [(min - 1, false), (min, true), (max, true), (max + 1, false)] {
                let b = body(json!({"amount": amount, "additional_info": info}));
                assert_eq!(validate_create(site, &b).is_ok(), ok, "{site:?} {amount}");
            }
            let float = body(json!({"amount": 1500.0, "additional_info": info}));
            assert!(validate_create(site, &float).is_err());
        }
    }

    #[test]
    fn mlb_payment_rules() {
        let ok = [
            json!({"type": "credit_card", "installments": 3, "installments_cost": "buyer"}),
            json!({"type": "debit_card"}),
            json!({"type": "voucher_card", "voucher_type": "alelo"}),
        ];
        for p in ok {
            let b = body(json!({"amount": 1000, "payment": p}));
            assert!(validate_create(Site::MLB, &b).is_ok(), "{p}");
        }
        let bad = [
            json!({"type": "pix"}),
            json!({"installments": 2}),
            json!({"type": "debit_card", "installments": 2}),
            json!({"type": "credit_card", "installments": 73}),
            json!({"type": "credit_card", "installments": 0}),
            json!({"type": "debit_card", "installments_cost": "seller"}),
            json!({"type": "credit_card", "voucher_type": "sodexo"}),
            json!({"type": "voucher_card", "voucher_type": "ticket"}),
            json!({"type": "credit_card", "color": "red"}),
        ];
        for p in bad {
            let b = body(json!({"amount": 1000, "payment": p}));
            assert!(validate_create(Site::MLB, &b).is_err(), "{p}");
        }
        let ticket = body(json!({"amount": 1000, "additional_info": {"ticket_number": "T"}}));
        assert!(validate_create(Site::MLB, &ticket).is_err());
        let mlm_payment =
            body(json!({"amount": 1000, "additional_info": {}, "payment": {"type": "debit_card"}}));
        assert!(validate_create(Site::MLM, &mlm_payment).is_err());
    }

    #[test]
    fn decimal_refund_amounts_convert_to_cents() {
        assert_eq!(cents_of(&json!(5.5)), Some(550));
        assert_eq!(cents_of(&json!(0.01)), Some(1));
        assert_eq!(cents_of(&json!(19.99)), Some(1999));
        assert_eq!(cents_of(&json!(10)), Some(1000));
        assert_eq!(cents_of(&json!(0.001)), None);
        assert_eq!(cents_of(&json!(-1)), None);
        assert_eq!(cents_of(&json!("5")), None);
    }

    #[test]
    fn uuids_look_like_uuids() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(u.as_bytes()[14], b'4');
        assert_ne!(uuid_v4(), u);
    }

    #[test]
    fn counted_faults_run_out() {
        let mut w = World::new(&super::super::SimConfig::default());
        w.set_fault(
            FaultScope::All,
            Fault::Status5xx {
                status: 503,
                remaining: Some(2),
            },
        );
        assert_eq!(w.take_fault("GET", "/x"), FaultAction::Status(503));
        assert_eq!(w.take_fault("GET", "/x"), FaultAction::Status(503));
        assert_eq!(w.take_fault("GET", "/x"), FaultAction::Pass);
        w.set_fault(
            FaultScope::Creates,
            Fault::CommitThenDrop { remaining: None },
        );
        assert_eq!(w.take_fault("GET", "/x"), FaultAction::Pass);
        assert_eq!(w.take_fault("POST", "/x"), FaultAction::CommitThenDrop);
        w.set_fault(
            FaultScope::PathPrefix("/v1/".into()),
            Fault::TooMany {
                retry_after_s: 3,
                remaining: None,
            },
        );
        assert_eq!(
            w.take_fault("GET", "/v1/payments/1"),
            FaultAction::TooMany(3)
        );
        assert_eq!(w.take_fault("GET", "/point/x"), FaultAction::Pass);
    }
}
