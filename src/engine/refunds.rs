//! The driver's side of refunds: acceptance (the checks that need the engine's state),
//! the refund machine's effects, and the API calls and answers that belong to refunds.
//! The refund machine itself is pure (`refund`); this file only performs what it asks,
//! through the same batch, group commit and token bucket as charges.
//!
//! Invariants kept here:
//! - A refund is accepted only for an `approved` charge of the same station whose payment
//!   id is known, and only when its amount fits in what is left: the charge's amount
//!   minus every refund of it that is pending (not final) or `refunded`. Refunds accepted
//!   in the same batch count, since they are in `active` before the batch is written.
//! - A refund via terminal returns the whole charge, on the terminal that took it, and
//!   waits in that terminal's queue like a charge.
//! - API calls leave only after the batch that recorded the stage asking for them is
//!   durable (`calls` are released by `commit`), as for charges.

use std::collections::HashSet;

use super::refund::{self, Effect as RefundEffect, Input as RefundInput, Refund};
use super::{machine, ApiCall, CommandProps, Engine, Op, ValidCommand};
use crate::domain::command::CommandType;
use crate::domain::command::{CommandBody, RefundCmd, Refusal, Via};
use crate::domain::outcome::{ErrorCode, State};
use crate::money::Cents;
use crate::point::{ApiError, Payment, PointBackend, Refund as ApiRefund, RemoteCharge};
use crate::store::{self, Progress, Request};

/// A refund's API call.
#[derive(Debug)]
pub(super) enum RefundOp {
    /// `POST /v1/payments/{id}/refunds` with the stored idempotency key.
    Send {
        payment_id: String,
        amount: Cents,
        idempotency_key: String,
    },
    Create {
        terminal: String,
        payment_id: String,
    },
    Get(String),
    Cancel {
        terminal: String,
        id: String,
    },
    Payment(String),
}

/// Its answer.
#[derive(Debug)]
pub(super) enum RefundAnswer {
    Send(Result<ApiRefund, ApiError>),
    Create(Result<RemoteCharge, ApiError>),
    Get(Result<RemoteCharge, ApiError>),
    Cancel(Result<(), ApiError>),
    Payment(Result<Payment, ApiError>),
}

impl RefundOp {
    pub(super) async fn run<B: PointBackend>(self, backend: &B) -> RefundAnswer {
        match self {
            RefundOp::Send {
                payment_id,
                amount,
                idempotency_key,
            } => RefundAnswer::Send(
                backend
                    .refund_payment(&payment_id, Some(amount), &idempotency_key)
                    .await,
            ),
            RefundOp::Create {
                terminal,
                payment_id,
            } => RefundAnswer::Create(
                backend
                    .create_refund_on_terminal(&terminal, &payment_id)
                    .await,
            ),
            RefundOp::Get(id) => RefundAnswer::Get(backend.get_refund_on_terminal(&id).await),
            RefundOp::Cancel { terminal, id } => {
                RefundAnswer::Cancel(backend.cancel_refund_on_terminal(&terminal, &id).await)
            }
            RefundOp::Payment(id) => RefundAnswer::Payment(backend.get_payment(&id).await),
        }
    }
}

impl RefundAnswer {
    /// The error, for the engine's API health.
    pub(super) fn error(&self) -> Option<&ApiError> {
        match self {
            RefundAnswer::Send(r) => r.as_ref().err(),
            RefundAnswer::Create(r) | RefundAnswer::Get(r) => r.as_ref().err(),
            RefundAnswer::Cancel(r) => r.as_ref().err(),
            RefundAnswer::Payment(r) => r.as_ref().err(),
        }
    }
}

/// The charge machine's driver inputs that a refund understands.
fn from_charge_input(input: machine::Input) -> Option<RefundInput> {
    match input {
        machine::Input::Wake => Some(RefundInput::Wake),
        machine::Input::MayStart => Some(RefundInput::MayStart),
        machine::Input::TerminalBusy => Some(RefundInput::TerminalBusy),
        machine::Input::Restarted => Some(RefundInput::Restarted),
        machine::Input::CancelRequested => Some(RefundInput::CancelRequested),
        _ => None,
    }
}

impl<B: PointBackend> Engine<B> {
    /// A driver input (`Wake`, `MayStart`, `TerminalBusy`, `Restarted`,
    /// `CancelRequested`) for a refund.
    pub(super) fn apply_to_refund(&mut self, key: &[u8], input: machine::Input, now: i64) {
        if let Some(input) = from_charge_input(input) {
            self.apply_refund(key, input, now);
        }
    }

    /// Apply one input to a refund, then act on its effects.
    fn apply_refund(&mut self, key: &[u8], input: RefundInput, now: i64) {
        let ctx = self.ctx(now);
        let Some(req) = self.active.get_mut(key) else {
            return;
        };
        let Progress::Refund(rf) = &mut req.progress else {
            return;
        };
        let before = rf.clone();
        let fx = rf.step(input, &ctx);
        if *rf != before {
            self.dirty.insert(key.to_vec());
        }
        for e in fx {
            self.refund_effect(key, e, now);
        }
        self.set_wake(key);
    }

    fn refund_effect(&mut self, key: &[u8], e: RefundEffect, now: i64) {
        let Some(Progress::Refund(rf)) = self.active.get(key).map(|r| &r.progress) else {
            return;
        };
        let terminal = rf.terminal.clone().unwrap_or_default();
        let call = |op: RefundOp| ApiCall {
            key: key.to_vec(),
            op: Op::Refund(op),
        };
        match e {
            RefundEffect::Emit(em) => self.emit(key, em, now),
            RefundEffect::Send => {
                let op = RefundOp::Send {
                    payment_id: rf.payment_id.clone(),
                    amount: rf.amount,
                    idempotency_key: rf.idempotency_key.clone(),
                };
                self.calls.push(call(op));
            }
            RefundEffect::Create => {
                let op = RefundOp::Create {
                    terminal: terminal.clone(),
                    payment_id: rf.payment_id.clone(),
                };
                self.terminals.entry(terminal).or_default().take_turn(key);
                self.dirty.insert(key.to_vec());
                self.calls.push(call(op));
            }
            RefundEffect::Poll { intent_id } => self.calls.push(call(RefundOp::Get(intent_id))),
            RefundEffect::CancelRemote { intent_id } => self.calls.push(call(RefundOp::Cancel {
                terminal,
                id: intent_id,
            })),
            RefundEffect::LookupPayment => {
                let op = RefundOp::Payment(rf.payment_id.clone());
                self.calls.push(call(op));
            }
            RefundEffect::ReleaseTerminal => {
                let open = !rf.is_final();
                if let Some(q) = self.terminals.get_mut(&terminal) {
                    if q.holder.as_deref() == Some(key) {
                        q.holder = None;
                    }
                    q.waiting.retain(|k| k != key);
                    // Sent back to the queue after a failure: it keeps its place.
                    if open {
                        q.waiting.push_front(key.to_vec());
                    }
                }
            }
            RefundEffect::CancelAnswer(result) => {
                if let Some(ck) = self.cancels.remove(key) {
                    self.finish_cancel(&ck, result, now);
                }
            }
        }
    }

    /// An API answer for a refund.
    pub(super) fn on_refund_answer(&mut self, key: &[u8], a: RefundAnswer, now: i64) {
        let input = match a {
            RefundAnswer::Send(res) => {
                if let Err(e) = &res {
                    tracing::warn!(error = %e, "refund send failed");
                }
                // A POST: `Ambiguous` marks "it may exist"; the machine retries with the
                // same idempotency key (safe), and never expires it.
                RefundInput::SendDone(res.map_err(|e| self.backend.failure(&e, true)))
            }
            RefundAnswer::Create(res) => {
                if let Err(e) = &res {
                    tracing::warn!(error = %e, "refund intent create failed");
                }
                RefundInput::CreateDone(res.map_err(|e| self.backend.failure(&e, true)))
            }
            RefundAnswer::Get(res) => {
                RefundInput::PollDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            RefundAnswer::Cancel(res) => {
                RefundInput::CancelDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            RefundAnswer::Payment(res) => {
                RefundInput::PaymentDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
        };
        self.apply_refund(key, input, now);
    }

    /// The sum of the refunds of charge `target` that count against it: pending ones and
    /// `refunded` ones, open (in `active`) or stored.
    fn refunds_against(&self, station: &str, target: &str) -> Result<Cents, store::StoreError> {
        let counts = |r: &Request| match (&r.body, &r.progress) {
            (CommandBody::Refund(c), Progress::Refund(rf))
                if c.target == target && rf.counts_against_charge() =>
            {
                rf.amount.0
            }
            _ => 0,
        };
        let mut seen = HashSet::new();
        let mut sum: u64 = 0;
        for r in self.active.values().filter(|r| r.station == station) {
            seen.insert(r.key());
            sum = sum.saturating_add(counts(r));
        }
        for r in self.store.station_requests(station)? {
            if !seen.contains(&r.key()) {
                sum = sum.saturating_add(counts(&r));
            }
        }
        Ok(Cents(sum))
    }

    pub(super) fn accept_refund(
        &mut self,
        station: &str,
        cmd: &ValidCommand,
        r: RefundCmd,
        props: CommandProps,
        now: i64,
    ) {
        let rf = match self.refund_terms(station, cmd, &r, &props, now) {
            Ok(rf) => rf,
            Err(refusal) => return self.refuse(station, &props, refusal, None, now),
        };
        tracing::info!(station, request_id = %cmd.request_id, target = %r.target, via = ?r.via, amount = %rf.amount, "refund accepted");
        let terminal = rf.terminal.clone();
        let key = self.admit(station, cmd, &props, None, Progress::Refund(rf), now);
        if let Some(t) = terminal {
            self.terminals
                .entry(t)
                .or_default()
                .waiting
                .push_back(key.clone());
        }
        self.set_wake(&key);
    }

    /// The refund a station's command asks for, or why it cannot be accepted.
    fn refund_terms(
        &self,
        station: &str,
        cmd: &ValidCommand,
        r: &RefundCmd,
        props: &CommandProps,
        now: i64,
    ) -> Result<Refund, Refusal> {
        let refusal = |code: ErrorCode, message: String| Refusal {
            request_id: Some(cmd.request_id.clone()),
            kind: Some(CommandType::Refund),
            code,
            message,
        };
        let not_refundable = |m: String| refusal(ErrorCode::NotRefundable, m);
        let target = r.target.as_str();
        let Some(t) = self.lookup(station, target) else {
            let m = format!("no request `{target}` of this station");
            return Err(refusal(ErrorCode::UnknownTarget, m));
        };
        let (Progress::Charge(ch), CommandBody::Charge(c)) = (&t.progress, &t.body) else {
            let m = format!("request `{target}` is not a charge");
            return Err(refusal(ErrorCode::UnknownTarget, m));
        };
        let state = match &ch.stage {
            machine::Stage::Done { state } => state.as_str(),
            machine::Stage::NeedsAttention { .. } => "needs_attention",
            _ => "not final",
        };
        if state != State::Approved.as_str() {
            return Err(not_refundable(format!(
                "charge `{target}` is {state}: only an approved charge can be refunded"
            )));
        }
        let Some(payment) = &ch.payment else {
            return Err(not_refundable(format!(
                "the payment of charge `{target}` is not known, so it cannot be refunded here"
            )));
        };
        let taken = self.refunds_against(station, target).map_err(|e| {
            tracing::error!(error = %e, "store read failed while summing refunds");
            let m = "the store cannot be read; nothing was accepted".to_string();
            refusal(ErrorCode::StorageUnavailable, m)
        })?;
        let left = Cents(ch.amount.0.saturating_sub(taken.0));
        let amount = r.amount.unwrap_or(left);
        if left.0 == 0 || amount > left {
            return Err(not_refundable(format!(
                "a refund of {amount} exceeds what is left of charge `{target}`: {left} of {} (refunded or pending: {taken})",
                ch.amount
            )));
        }
        if r.via == Via::Terminal && amount != ch.amount {
            return Err(not_refundable(format!(
                "a refund via terminal returns the whole charge ({}); {amount} asked, {left} left: refund via api for part",
                ch.amount
            )));
        }
        let ttl_ms = match (r.ttl_s, r.via) {
            (Some(s), _) => i64::from(s) * 1000,
            (None, Via::Api) => self.s.refund_ttl_ms,
            (None, Via::Terminal) => self.s.charge_ttl_ms,
        };
        let mut deadline = now + ttl_ms;
        if let Some(e) = r.expires_at_ms {
            deadline = deadline.min(e);
        }
        if let Some(x) = props.message_expiry_s {
            deadline = deadline.min(now + i64::from(x) * 1000);
        }
        Ok(Refund::new(
            r.via,
            amount,
            payment.id.clone(),
            (r.via == Via::Terminal).then(|| c.terminal.clone()),
            refund::idempotency_key(&self.s.store_id, station, &cmd.request_id),
            deadline,
            now,
        ))
    }

    /// A station's cancel whose target is a refund.
    pub(super) fn accept_refund_cancel(
        &mut self,
        station: &str,
        cmd: &ValidCommand,
        target: &Request,
        props: CommandProps,
        now: i64,
    ) {
        let Progress::Refund(rf) = &target.progress else {
            return;
        };
        let tkey = target.key();
        let why = rf.cancel_refusal().or_else(|| {
            self.cancels
                .contains_key(&tkey)
                .then_some("a cancel of this refund is already under way")
        });
        if let Some(why) = why {
            let r = Refusal {
                request_id: Some(cmd.request_id.clone()),
                kind: Some(CommandType::Cancel),
                code: ErrorCode::NotCancelable,
                message: why.to_string(),
            };
            return self.refuse(station, &props, r, None, now);
        }
        tracing::info!(station, request_id = %cmd.request_id, target = %target.request_id, "cancel of a refund accepted");
        let progress = Progress::Cancel {
            target: target.request_id.clone(),
            done: false,
        };
        let key = self.admit(station, cmd, &props, None, progress, now);
        self.cancels.insert(tkey.clone(), key);
        self.apply_refund(&tkey, RefundInput::CancelRequested, now);
    }
}
