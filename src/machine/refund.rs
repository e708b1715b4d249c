//! The refund state machine: `step(refund, input, ctx) -> effects`. Pure, in the style of
//! `machine` (the charge machine): no IO, no clock reads (time and jitter come in `Ctx`).
//! The driver (`engine::refunds`) stores the refund and its events in one write, syncs,
//! and only then performs the effects, so `Send` and `Create` never leave before the
//! `SendBegun` stage that announces them is durable.
//!
//! Two ways to refund (`via`):
//! - `api`: `POST /v1/payments/{id}/refunds` with an `X-Idempotency-Key` derived from
//!   store, station and request id, stored with the request at acceptance. Full or
//!   partial. Retries reuse the key, so once a send has begun the machine re-POSTs until
//!   Mercado Pago says how it ended: `approved` → `refunded`, `rejected`/`cancelled` →
//!   `failed`, anything else → keep looking with backoff.
//! - `terminal`: a refund intent on the terminal that took the payment, queued there like
//!   a charge (one intent per terminal). `FINISHED` → the payment is looked up:
//!   `refunded` only when it shows the money returned.
//!
//! Invariants kept here (and checked by the tests below):
//! - The deadline is checked before every send from `Queued`, the only stage where
//!   nothing can exist at Mercado Pago; a refund in `SendBegun` or later is never
//!   `expired` by its deadline (a refund intent left OPEN or ABANDONED is, as charges).
//! - A refund intent is created at most once: an ambiguous create goes to
//!   `NeedsAttention`, never back to `Queued`.
//! - An api refund goes back to `Queued` only after a failure that proves nothing was
//!   committed (no connection, 429, 401/403), and only if no earlier attempt was
//!   ambiguous; otherwise it re-POSTs with the same key.
//! - `refunded` is emitted only after Mercado Pago said so: an `approved` refund (api) or
//!   a payment showing the amount returned (terminal).
//! - A cancel recorded while a send is in flight is always answered.

use serde::{Deserialize, Serialize};

use super::live::{self, CancelMark, Ctx, Emit, LiveNext, PaymentSeen, Remote, Timing};
use crate::domain::command::Via;
use crate::domain::outcome::{ErrorCode, Event, PaymentInfo, ResolvedBy, State, WaitReason};
use crate::domain::remote::{Failure, Payment, Phase, Refund as ApiRefund, RemoteCharge};
use crate::money::Cents;

/// How long the API may fail before a refund reports `waiting`.
const REPORT_AFTER_MS: i64 = Timing::UNREACHABLE_REPORT_MS;

/// Where a refund stands. Stored with the request; internal stages (`SendBegun`,
/// `Confirming`, `Checking`) are never published as such.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Stored, not sent: nothing of it can exist at Mercado Pago. The deadline applies.
    Queued,
    /// Written ahead: the POST (refund or refund intent) is about to leave or is out.
    SendBegun { at_ms: i64 },
    /// via api: the refund may exist (an ambiguous answer, a restart mid-send) or exists
    /// undecided: re-POST with the same key until Mercado Pago decides.
    Confirming { since_ms: i64 },
    /// via terminal: the refund intent exists and has not ended.
    Live {
        intent_id: String,
        remote: Remote,
        sent_ms: i64,
        cancel: CancelMark,
    },
    /// via terminal: the refund intent FINISHED; the payment is being checked.
    Checking { intent_id: String, since_ms: i64 },
    /// via terminal: the outcome is unknown (ambiguous create, restart mid-send, intent
    /// gone, payment not showing the refund): looked up until `confirm_window_max`.
    NeedsAttention {
        intent_id: Option<String>,
        since_ms: i64,
    },
    /// Final.
    Done { state: State },
}

/// One refund, as stored (`store::Progress::Refund`). Field order is the format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub via: Via,
    /// The amount to return (resolved at acceptance: the default is what was left).
    pub amount: Cents,
    /// The charge's payment.
    pub payment_id: String,
    /// via terminal: the terminal that took the payment.
    pub terminal: Option<String>,
    /// via api: `X-Idempotency-Key`, the same on every attempt.
    pub idempotency_key: String,
    pub deadline_ms: i64,
    pub stage: Stage,
    /// A station asked to cancel while a send was in flight.
    pub cancel_pending: bool,
    /// When the next timed action is due (send, retry, poll, lookup, expiry).
    pub next_at_ms: Option<i64>,
    /// Consecutive failed attempts, for backoff.
    pub attempts: u32,
    /// Since when the API has been failing for this refund, if it is.
    pub unreachable_since_ms: Option<i64>,
    /// The `waiting` reason last reported, until the API answers again.
    pub reported: Option<WaitReason>,
    /// An api attempt may have been committed: never back to `Queued`.
    pub may_exist: bool,
    /// The Mercado Pago refund id (api) or refund intent id (terminal), once known.
    pub remote_id: Option<String>,
    /// The payment as last looked up (terminal), for the final event.
    pub payment: Option<PaymentSeen>,
}

/// Something that happened to a refund.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// `next_at_ms` came, or the driver re-examines the refund.
    Wake,
    /// via terminal: the terminal is free and this refund is first in its queue.
    MayStart,
    /// via terminal: the terminal is busy with an earlier request.
    TerminalBusy,
    /// via api: the answer to `POST /v1/payments/{id}/refunds`.
    SendDone(Result<ApiRefund, Failure>),
    /// via terminal: the answer to the refund intent create.
    CreateDone(Result<RemoteCharge, Failure>),
    /// via terminal: the refund intent as read.
    PollDone(Result<RemoteCharge, Failure>),
    /// via terminal: the refund intent cancel.
    CancelDone(Result<(), Failure>),
    /// via terminal: the payment as read.
    PaymentDone(Result<Payment, Failure>),
    /// A station's cancel command for this refund.
    CancelRequested,
    /// The agent started again with this refund in its stored stage.
    Restarted,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Emit(Emit),
    /// via api: POST the refund with the stored key (first send: with the move to
    /// `SendBegun`).
    Send,
    /// via terminal: create the refund intent (with the move to `SendBegun`).
    Create,
    Poll {
        intent_id: String,
    },
    CancelRemote {
        intent_id: String,
    },
    LookupPayment,
    /// The terminal is no longer held by this refund.
    ReleaseTerminal,
    /// Answer to a station's cancel: `Ok` → `done`; `Err` → `failed`.
    CancelAnswer(Result<(), (ErrorCode, String)>),
}

fn emit(state: State) -> Emit {
    Emit::state(state)
}

fn failed(code: ErrorCode, message: impl Into<String>) -> Emit {
    Emit {
        state: State::Failed,
        reason: None,
        error: Some((code, message.into())),
        resolved_by: None,
    }
}

fn waiting(reason: WaitReason) -> Emit {
    Emit {
        state: State::Waiting,
        reason: Some(reason),
        error: None,
        resolved_by: None,
    }
}

fn not_cancelable(message: &str) -> Effect {
    Effect::CancelAnswer(Err((ErrorCode::NotCancelable, message.to_string())))
}

/// The `X-Idempotency-Key` of an api refund: SHA-256 over store, station and request id
/// (and a `refund` tag, so it never equals a charge's reference), `pg-rf-<32 hex>`.
pub fn idempotency_key(store: &str, station: &str, request_id: &str) -> String {
    crate::domain::ids::hashed_id("pg-rf-", &["refund", store, station, request_id])
}

impl Refund {
    /// A refund just accepted. An api refund is due at once; a terminal refund waits for
    /// its turn (`MayStart`) until its deadline.
    pub fn new(
        via: Via,
        amount: Cents,
        payment_id: String,
        terminal: Option<String>,
        idempotency_key: String,
        deadline_ms: i64,
        now_ms: i64,
    ) -> Refund {
        let next = match via {
            Via::Api => now_ms.min(deadline_ms),
            Via::Terminal => deadline_ms,
        };
        Refund {
            via,
            amount,
            payment_id,
            terminal,
            idempotency_key,
            deadline_ms,
            stage: Stage::Queued,
            cancel_pending: false,
            next_at_ms: Some(next),
            attempts: 0,
            unreachable_since_ms: None,
            reported: None,
            may_exist: false,
            remote_id: None,
            payment: None,
        }
    }

    /// Bring the next timed action forward to `at_ms` if it was later (the driver's
    /// "the API is back": a backoff must not outlive the outage). Returns whether it moved.
    /// The stage's own rules still decide what happens then.
    pub fn hurry(&mut self, at_ms: i64) -> bool {
        match self.next_at_ms {
            Some(n) if n > at_ms && !self.is_final() => {
                self.next_at_ms = Some(at_ms);
                true
            }
            _ => false,
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self.stage, Stage::Done { .. })
    }

    /// Counts against what is left of the charge: pending, or `refunded`.
    pub fn counts_against_charge(&self) -> bool {
        match self.stage {
            Stage::Done { state } => state == State::Refunded,
            _ => true,
        }
    }

    /// True while this refund holds its terminal (via terminal, a send has begun and the
    /// intent has not ended).
    pub fn holds_terminal(&self) -> bool {
        self.via == Via::Terminal
            && (matches!(
                self.stage,
                Stage::SendBegun { .. } | Stage::Live { .. } | Stage::Checking { .. }
            ) || matches!(
                self.stage,
                Stage::NeedsAttention {
                    intent_id: Some(_),
                    ..
                }
            ))
    }

    /// Why a cancel of this refund is refused at once, or `None` when the machine must
    /// decide (`CancelRequested`).
    pub fn cancel_refusal(&self) -> Option<&'static str> {
        match (&self.stage, self.via) {
            (Stage::Done { .. }, _) => Some("the refund is already final"),
            (Stage::Queued | Stage::SendBegun { .. }, _) => None,
            (
                Stage::Live {
                    remote: Remote::Open,
                    ..
                },
                Via::Terminal,
            ) => None,
            (Stage::Live { .. } | Stage::Checking { .. }, _) => {
                Some("the refund is already on the terminal: cancel it there")
            }
            (Stage::NeedsAttention { .. }, _) => {
                Some("the outcome of this refund is not known yet: staff must check the terminal")
            }
            (Stage::Confirming { .. }, _) => {
                Some("the refund has been sent to Mercado Pago and cannot be called back")
            }
        }
    }

    /// Fill a station event with what this refund knows.
    pub fn decorate(&self, ev: &mut Event) {
        ev.amount = Some(self.amount.to_decimal());
        ev.terminal = self.terminal.clone();
        ev.intent_id = self.remote_id.clone();
        if ev.state.is_final() || ev.state == State::NeedsAttention {
            ev.payment = self.payment.as_ref().map(|p| PaymentInfo {
                id: p.id.clone(),
                status: p.status.clone(),
                status_detail: p.status_detail.clone(),
            });
        }
    }

    /// Apply one input. Returns the effects, in order.
    pub fn step(&mut self, input: Input, ctx: &Ctx) -> Vec<Effect> {
        let mut fx = Vec::new();
        let asked = self.cancel_pending
            || matches!(
                self.stage,
                Stage::Live {
                    cancel: CancelMark::Station,
                    ..
                }
            );
        self.step_into(input, ctx, &mut fx);
        if self.is_final() {
            self.next_at_ms = None;
            self.cancel_pending = false;
            let answered = fx.iter().any(|e| matches!(e, Effect::CancelAnswer(_)));
            if asked && !answered {
                fx.push(not_cancelable("the refund ended first"));
            }
        }
        fx
    }

    fn finish(&mut self, e: Emit, fx: &mut Vec<Effect>) {
        let held = self.holds_terminal();
        self.stage = Stage::Done { state: e.state };
        fx.push(Effect::Emit(e));
        if held {
            fx.push(Effect::ReleaseTerminal);
        }
    }

    fn backoff_ms(&self, ctx: &Ctx) -> i64 {
        let exp = Timing::BACKOFF_BASE_MS.saturating_mul(1i64 << self.attempts.min(16));
        let capped = exp.min(Timing::BACKOFF_CAP_MS);
        // Jitter over the upper half: spreads the retries after an outage.
        capped / 2 + ((capped / 2) as f64 * ctx.jitter) as i64
    }

    fn poll_gap_ms(ctx: &Ctx) -> i64 {
        live::poll_gap_ms(ctx)
    }

    /// An API failure: count it, schedule the retry, report `waiting` once the API has
    /// failed for `REPORT_AFTER_MS` (again when the reason changes).
    fn failing(&mut self, failure: &Failure, ctx: &Ctx, fx: &mut Vec<Effect>) -> i64 {
        let now = ctx.now_ms;
        self.attempts = self.attempts.saturating_add(1);
        let wait = match failure {
            Failure::Unreachable {
                retry_after_ms: Some(ms),
                ..
            } => (*ms).max(self.backoff_ms(ctx)),
            _ => self.backoff_ms(ctx),
        };
        let reason = match failure {
            Failure::Unauthorized => Some(WaitReason::Unauthorized),
            Failure::Unreachable {
                rate_limited: true, ..
            } => Some(WaitReason::RateLimited),
            // A busy terminal (409) is not an outage; the caller reports it.
            Failure::Conflict => None,
            _ => Some(WaitReason::ApiUnreachable),
        };
        if let Some(reason) = reason {
            let since = *self.unreachable_since_ms.get_or_insert(now);
            if now - since >= REPORT_AFTER_MS && self.reported != Some(reason) {
                self.reported = Some(reason);
                fx.push(Effect::Emit(waiting(reason)));
            }
        }
        now + wait
    }

    /// The API answered: clear the outage. If `waiting` was reported and `restate` is
    /// given, tell the station where the refund stands again.
    fn recovered(&mut self, restate: Option<State>, fx: &mut Vec<Effect>) {
        self.attempts = 0;
        self.unreachable_since_ms = None;
        let was = self.reported.take();
        if let (Some(r), Some(s)) = (was, restate) {
            if r != WaitReason::TerminalBusy {
                fx.push(Effect::Emit(emit(s)));
            }
        }
    }

    /// The published state of a live or checking terminal refund.
    fn current_state(&self) -> Option<State> {
        match &self.stage {
            Stage::Live {
                remote: Remote::Open,
                ..
            } => Some(State::Sent),
            Stage::Live {
                remote: Remote::OnTerminal,
                ..
            } => Some(State::OnTerminal),
            Stage::Live { .. } | Stage::Checking { .. } => Some(State::Processing),
            Stage::NeedsAttention { .. } => Some(State::NeedsAttention),
            _ => None,
        }
    }

    /// Back to `Queued` after a send that left nothing behind.
    fn requeue(&mut self, retry_at: i64, fx: &mut Vec<Effect>) {
        self.stage = Stage::Queued;
        self.next_at_ms = Some(retry_at.min(self.deadline_ms));
        if self.via == Via::Terminal {
            fx.push(Effect::ReleaseTerminal);
        }
    }

    /// `Queued` reached its deadline: never sent.
    fn expire_unsent(&mut self, fx: &mut Vec<Effect>) {
        if self.reported == Some(WaitReason::Unauthorized) {
            self.finish(
                failed(
                    ErrorCode::Unauthorized,
                    "Mercado Pago refused the access token until the refund's ttl ran out",
                ),
                fx,
            );
        } else {
            self.finish(emit(State::Expired), fx);
        }
    }

    /// Leave `Queued`: write ahead and send.
    fn begin_send(&mut self, now: i64, fx: &mut Vec<Effect>) {
        self.stage = Stage::SendBegun { at_ms: now };
        self.next_at_ms = None;
        fx.push(match self.via {
            Via::Api => Effect::Send,
            Via::Terminal => Effect::Create,
        });
    }

    fn step_into(&mut self, input: Input, ctx: &Ctx, fx: &mut Vec<Effect>) {
        let now = ctx.now_ms;
        match (&mut self.stage, input) {
            // ---- queued: nothing sent ----
            (Stage::Queued, Input::CancelRequested) => {
                self.finish(emit(State::Canceled), fx);
                fx.push(Effect::CancelAnswer(Ok(())));
            }
            (Stage::Queued, _) if now >= self.deadline_ms => self.expire_unsent(fx),
            (Stage::Queued, Input::TerminalBusy) if self.via == Via::Terminal => {
                if self.reported != Some(WaitReason::TerminalBusy) {
                    self.reported = Some(WaitReason::TerminalBusy);
                    fx.push(Effect::Emit(waiting(WaitReason::TerminalBusy)));
                }
                self.next_at_ms = Some(self.deadline_ms);
            }
            (Stage::Queued, Input::MayStart) if self.via == Via::Terminal => {
                if self.attempts > 0 && self.next_at_ms.is_some_and(|at| at > now) {
                    return; // backing off after a failure
                }
                self.begin_send(now, fx);
            }
            (Stage::Queued, Input::Wake | Input::Restarted) => match self.via {
                Via::Api if self.next_at_ms.is_none_or(|at| at <= now) => {
                    self.begin_send(now, fx);
                }
                Via::Api => {}
                Via::Terminal => {
                    let due = self.next_at_ms.unwrap_or(self.deadline_ms);
                    self.next_at_ms = Some(due.min(self.deadline_ms));
                }
            },
            (Stage::Queued, _) => {}

            // ---- send begun ----
            (Stage::SendBegun { .. }, Input::CancelRequested) => self.cancel_pending = true,
            (Stage::SendBegun { .. }, Input::Restarted) => {
                // Crashed between the write-ahead and the answer: it may exist.
                match self.via {
                    Via::Api => {
                        self.may_exist = true;
                        self.stage = Stage::Confirming { since_ms: now };
                        self.next_at_ms = Some(now);
                    }
                    Via::Terminal => {
                        self.stage = Stage::NeedsAttention {
                            intent_id: None,
                            since_ms: now,
                        };
                        self.next_at_ms = Some(now);
                        fx.push(Effect::Emit(emit(State::NeedsAttention)));
                    }
                }
                if std::mem::take(&mut self.cancel_pending) {
                    fx.push(not_cancelable("the refund may have reached Mercado Pago"));
                }
            }
            (Stage::SendBegun { .. }, Input::SendDone(res)) if self.via == Via::Api => {
                self.on_send(res, ctx, fx);
            }
            (Stage::SendBegun { .. }, Input::CreateDone(res)) if self.via == Via::Terminal => {
                self.on_create(res, ctx, fx);
            }
            (Stage::SendBegun { .. }, _) => {}

            // ---- api: re-POST with the same key until decided ----
            (Stage::Confirming { .. }, Input::CancelRequested) => {
                fx.push(not_cancelable(
                    "the refund has been sent to Mercado Pago and cannot be called back",
                ));
            }
            (Stage::Confirming { .. }, Input::Wake | Input::Restarted) => {
                if self.next_at_ms.is_some_and(|at| at > now) {
                    return;
                }
                self.next_at_ms = None;
                fx.push(Effect::Send);
            }
            (Stage::Confirming { .. }, Input::SendDone(res)) => self.on_send(res, ctx, fx),
            (Stage::Confirming { .. }, _) => {}

            // ---- terminal: the refund intent exists ----
            (
                Stage::Live {
                    remote,
                    cancel,
                    intent_id,
                    ..
                },
                Input::CancelRequested,
            ) => {
                if *remote == Remote::Open {
                    if *cancel == CancelMark::None {
                        fx.push(Effect::CancelRemote {
                            intent_id: intent_id.clone(),
                        });
                    }
                    *cancel = CancelMark::Station;
                } else {
                    fx.push(not_cancelable(
                        "the refund is already on the terminal: cancel it there",
                    ));
                }
            }
            (
                Stage::Live {
                    intent_id,
                    remote,
                    cancel,
                    ..
                },
                Input::Restarted,
            ) if *cancel != CancelMark::None && *remote == Remote::Open => {
                // A cancel may not have left before the restart: send it (again).
                self.next_at_ms = None;
                fx.push(Effect::CancelRemote {
                    intent_id: intent_id.clone(),
                });
            }
            (Stage::Live { intent_id, .. }, Input::Wake | Input::Restarted) => {
                if self.next_at_ms.is_some_and(|at| at > now) {
                    return;
                }
                self.next_at_ms = None;
                fx.push(Effect::Poll {
                    intent_id: intent_id.clone(),
                });
            }
            (Stage::Live { intent_id, .. }, Input::PollDone(Err(Failure::NotFound))) => {
                let intent_id = Some(intent_id.clone());
                self.enter_attention(intent_id, now, fx);
            }
            (Stage::Live { .. }, Input::PollDone(Err(f))) => {
                let at = self.failing(&f, ctx, fx);
                self.next_at_ms = Some(at);
            }
            (Stage::Live { .. }, Input::PollDone(Ok(remote))) => {
                let restate = self.current_state();
                self.recovered(restate, fx);
                self.on_remote(remote, ctx, fx);
            }
            (Stage::Live { cancel, remote, .. }, Input::CancelDone(res)) => {
                let mark = *cancel;
                *cancel = CancelMark::None;
                match res {
                    Ok(()) => {
                        let state = if mark == CancelMark::Timeout {
                            State::Expired
                        } else {
                            State::Canceled
                        };
                        self.finish(emit(state), fx);
                        if mark == CancelMark::Station {
                            fx.push(Effect::CancelAnswer(Ok(())));
                        }
                    }
                    Err(Failure::Conflict) => {
                        if *remote == Remote::Open {
                            *remote = Remote::OnTerminal;
                            fx.push(Effect::Emit(emit(State::OnTerminal)));
                        }
                        self.next_at_ms = Some(now);
                        if mark == CancelMark::Station {
                            fx.push(not_cancelable(
                                "the terminal took the refund before the cancel arrived: cancel it there",
                            ));
                        }
                    }
                    Err(f) => {
                        let at = self.failing(&f, ctx, fx);
                        self.next_at_ms = Some(at);
                        if mark == CancelMark::Station {
                            fx.push(not_cancelable(
                                "Mercado Pago could not be reached to cancel; try again",
                            ));
                        }
                    }
                }
            }
            (Stage::Live { .. }, _) => {}
            // A cancel answer after the intent moved on (a poll saw it end first).
            (Stage::Checking { .. } | Stage::NeedsAttention { .. }, Input::CancelDone(_)) => {
                fx.push(not_cancelable("the refund moved on before the cancel"));
            }

            // ---- terminal: FINISHED, check the payment ----
            (Stage::Checking { .. }, Input::CancelRequested) => {
                fx.push(not_cancelable("the terminal has processed the refund"));
            }
            (
                Stage::Checking {
                    intent_id,
                    since_ms,
                },
                Input::Wake | Input::Restarted,
            ) => {
                if self.next_at_ms.is_some_and(|at| at > now) {
                    return;
                }
                if now - *since_ms >= ctx.timing.confirm_window_ms {
                    let intent_id = Some(intent_id.clone());
                    self.enter_attention(intent_id, now, fx);
                    return;
                }
                self.next_at_ms = None;
                fx.push(Effect::LookupPayment);
            }
            (Stage::Checking { .. }, Input::PaymentDone(Ok(p))) => {
                self.recovered(Some(State::Processing), fx);
                self.on_payment(p, None, ctx, fx);
            }
            (Stage::Checking { .. }, Input::PaymentDone(Err(f))) => {
                let at = self.failing(&f, ctx, fx);
                self.next_at_ms = Some(at);
            }
            (Stage::Checking { .. }, _) => {}

            // ---- terminal: outcome unknown, keep looking ----
            (Stage::NeedsAttention { .. }, Input::CancelRequested) => {
                fx.push(not_cancelable(
                    "the outcome of this refund is not known yet: staff must check the terminal",
                ));
            }
            (
                Stage::NeedsAttention {
                    intent_id,
                    since_ms,
                },
                Input::Wake | Input::Restarted,
            ) => {
                if self.next_at_ms.is_some_and(|at| at > now) {
                    return;
                }
                self.next_at_ms = None;
                if now - *since_ms >= ctx.timing.confirm_window_max_ms {
                    return; // only an operator can end it now
                }
                match intent_id {
                    Some(id) => fx.push(Effect::Poll {
                        intent_id: id.clone(),
                    }),
                    None => fx.push(Effect::LookupPayment),
                }
            }
            (Stage::NeedsAttention { .. }, Input::PollDone(Ok(remote))) => {
                self.recovered(Some(State::NeedsAttention), fx);
                let end = |state: State| {
                    let mut e = emit(state);
                    e.resolved_by = Some(ResolvedBy::Lookup);
                    e
                };
                match remote.phase {
                    Phase::Canceled => self.finish(end(State::Canceled), fx),
                    Phase::Abandoned => self.finish(end(State::Expired), fx),
                    Phase::Error => {
                        let mut e = end(State::Failed);
                        e.error = Some((
                            ErrorCode::TerminalError,
                            "the terminal reported an error".into(),
                        ));
                        self.finish(e, fx);
                    }
                    Phase::Ended => {
                        self.next_at_ms = None;
                        fx.push(Effect::LookupPayment);
                    }
                    _ => {
                        self.next_at_ms = Some(now + Self::poll_gap_ms(ctx) * 5);
                    }
                }
            }
            (Stage::NeedsAttention { .. }, Input::PaymentDone(Ok(p))) => {
                self.recovered(Some(State::NeedsAttention), fx);
                self.on_payment(p, Some(ResolvedBy::Lookup), ctx, fx);
            }
            (
                Stage::NeedsAttention { .. },
                Input::PollDone(Err(f)) | Input::PaymentDone(Err(f)),
            ) => {
                let at = self.failing(&f, ctx, fx);
                self.next_at_ms = Some(at.max(now + Timing::ATTENTION_LOOKUP_MS / 3));
            }
            (Stage::NeedsAttention { .. }, _) => {}

            // ---- done ----
            (Stage::Done { .. }, Input::CancelRequested) => {
                fx.push(not_cancelable("the refund is already final"));
            }
            (Stage::Done { .. }, _) => {}
        }
    }

    fn enter_attention(&mut self, intent_id: Option<String>, now: i64, fx: &mut Vec<Effect>) {
        self.stage = Stage::NeedsAttention {
            intent_id,
            since_ms: now,
        };
        self.next_at_ms = Some(now + Timing::ATTENTION_LOOKUP_MS);
        fx.push(Effect::Emit(emit(State::NeedsAttention)));
    }

    /// via api: the answer to a POST (first or a retry with the same key).
    fn on_send(&mut self, res: Result<ApiRefund, Failure>, ctx: &Ctx, fx: &mut Vec<Effect>) {
        let now = ctx.now_ms;
        match res {
            Ok(refund) => {
                let restate = self.remote_id.is_some().then_some(State::Sent);
                self.recovered(restate, fx);
                self.may_exist = true;
                if self.remote_id.is_none() {
                    self.remote_id = Some(refund.id.clone());
                    fx.push(Effect::Emit(emit(State::Sent)));
                }
                if std::mem::take(&mut self.cancel_pending) {
                    fx.push(not_cancelable(
                        "the refund reached Mercado Pago before the cancel",
                    ));
                }
                let status = refund.status.unwrap_or_default().to_ascii_lowercase();
                match status.as_str() {
                    "approved" => self.finish(emit(State::Refunded), fx),
                    "rejected" | "cancelled" | "canceled" => self.finish(
                        failed(
                            ErrorCode::ApiRefused,
                            format!("Mercado Pago answered the refund with status {status}"),
                        ),
                        fx,
                    ),
                    _ => {
                        // pending, in_process, unknown: ask again (same key) later.
                        let since = match self.stage {
                            Stage::Confirming { since_ms } => since_ms,
                            _ => now,
                        };
                        self.stage = Stage::Confirming { since_ms: since };
                        self.attempts = self.attempts.saturating_add(1);
                        self.next_at_ms =
                            Some(now + self.backoff_ms(ctx).max(Self::poll_gap_ms(ctx)));
                    }
                }
            }
            Err(Failure::Refused { message }) => {
                self.finish(failed(ErrorCode::ApiRefused, message), fx);
            }
            Err(Failure::NotFound) => {
                self.finish(
                    failed(
                        ErrorCode::ApiRefused,
                        "Mercado Pago does not know the charge's payment (404)",
                    ),
                    fx,
                );
            }
            Err(f @ (Failure::Unreachable { .. } | Failure::Unauthorized)) if !self.may_exist => {
                // Nothing was committed: still unsent, the deadline applies again.
                let at = self.failing(&f, ctx, fx);
                if std::mem::take(&mut self.cancel_pending) {
                    self.finish(emit(State::Canceled), fx);
                    fx.push(Effect::CancelAnswer(Ok(())));
                    return;
                }
                if at >= self.deadline_ms {
                    self.expire_unsent(fx);
                    return;
                }
                self.requeue(at, fx);
            }
            Err(f) => {
                // It may exist (no answer, 5xx, 409 in progress, or an earlier attempt was
                // ambiguous): the same key again, later. Never expired from here.
                self.may_exist = true;
                let at = self.failing(&f, ctx, fx);
                if std::mem::take(&mut self.cancel_pending) {
                    fx.push(not_cancelable("the refund may have reached Mercado Pago"));
                }
                let since = match self.stage {
                    Stage::Confirming { since_ms } => since_ms,
                    _ => now,
                };
                self.stage = Stage::Confirming { since_ms: since };
                self.next_at_ms = Some(at);
            }
        }
    }

    /// via terminal: the answer to the refund intent create.
    fn on_create(&mut self, res: Result<RemoteCharge, Failure>, ctx: &Ctx, fx: &mut Vec<Effect>) {
        let now = ctx.now_ms;
        match res {
            Ok(remote) => {
                self.recovered(None, fx);
                self.remote_id = Some(remote.id.clone());
                self.stage = Stage::Live {
                    intent_id: remote.id.clone(),
                    remote: Remote::Open,
                    sent_ms: now,
                    cancel: CancelMark::None,
                };
                fx.push(Effect::Emit(emit(State::Sent)));
                if std::mem::take(&mut self.cancel_pending) {
                    if let Stage::Live { cancel, .. } = &mut self.stage {
                        *cancel = CancelMark::Station;
                    }
                    fx.push(Effect::CancelRemote {
                        intent_id: remote.id,
                    });
                    self.next_at_ms = None;
                } else {
                    self.next_at_ms = Some(now + ctx.timing.poll_interval_ms);
                }
            }
            Err(f @ (Failure::Unreachable { .. } | Failure::Unauthorized | Failure::Conflict)) => {
                // Nothing was committed (409: the terminal holds another intent).
                let at = self.failing(&f, ctx, fx);
                let at = if f == Failure::Conflict {
                    at.max(now + ctx.timing.poll_interval_ms)
                } else {
                    at
                };
                if std::mem::take(&mut self.cancel_pending) {
                    // `finish` releases the terminal: SendBegun holds it.
                    self.finish(emit(State::Canceled), fx);
                    fx.push(Effect::CancelAnswer(Ok(())));
                    return;
                }
                if at >= self.deadline_ms {
                    // `finish` releases the terminal: SendBegun holds it.
                    self.expire_unsent(fx);
                    return;
                }
                if f == Failure::Conflict && self.reported != Some(WaitReason::TerminalBusy) {
                    self.reported = Some(WaitReason::TerminalBusy);
                    fx.push(Effect::Emit(waiting(WaitReason::TerminalBusy)));
                }
                self.requeue(at, fx);
            }
            Err(Failure::Refused { message }) => {
                self.finish(failed(ErrorCode::ApiRefused, message), fx);
            }
            Err(Failure::NotFound) => {
                self.finish(
                    failed(
                        ErrorCode::ApiRefused,
                        "Mercado Pago knows neither this terminal nor the payment (404)",
                    ),
                    fx,
                );
            }
            Err(Failure::Ambiguous) => {
                // The refund intent may exist. Never create it again blindly.
                self.attempts = 0;
                self.enter_attention(None, now, fx);
                self.next_at_ms = Some(now + Self::poll_gap_ms(ctx));
                if std::mem::take(&mut self.cancel_pending) {
                    fx.push(not_cancelable("the refund may have reached the terminal"));
                }
            }
        }
    }

    /// via terminal: a poll answer for the live refund intent (`live::on_remote` says
    /// what it means).
    fn on_remote(&mut self, remote: RemoteCharge, ctx: &Ctx, fx: &mut Vec<Effect>) {
        let now = ctx.now_ms;
        let Stage::Live {
            intent_id,
            remote: seen,
            sent_ms,
            cancel,
        } = &mut self.stage
        else {
            return;
        };
        match live::on_remote(&remote.phase, seen, *sent_ms, cancel, ctx) {
            LiveNext::Poll {
                emit: e,
                next_at_ms,
            } => {
                if let Some(state) = e {
                    fx.push(Effect::Emit(emit(state)));
                }
                self.next_at_ms = Some(next_at_ms);
            }
            LiveNext::CancelForTimeout => {
                fx.push(Effect::CancelRemote {
                    intent_id: intent_id.clone(),
                });
                self.next_at_ms = None;
            }
            LiveNext::Ended { seen } => {
                if seen != Remote::Processing {
                    fx.push(Effect::Emit(emit(State::Processing)));
                }
                self.stage = Stage::Checking {
                    intent_id: intent_id.clone(),
                    since_ms: now,
                };
                self.next_at_ms = None;
                fx.push(Effect::LookupPayment);
            }
            LiveNext::Final {
                emit,
                answer_cancel,
            } => {
                self.finish(emit, fx);
                if answer_cancel {
                    fx.push(Effect::CancelAnswer(Ok(())));
                }
            }
        }
    }

    /// via terminal: the payment as looked up after FINISHED or in needs_attention.
    /// `refunded` only when the payment shows this refund's amount returned.
    fn on_payment(
        &mut self,
        p: Payment,
        resolved_by: Option<ResolvedBy>,
        ctx: &Ctx,
        fx: &mut Vec<Effect>,
    ) {
        let now = ctx.now_ms;
        self.payment = Some(PaymentSeen {
            id: p.id.clone(),
            status: p.status.clone(),
            status_detail: p.status_detail.clone(),
        });
        let status = p.status.to_ascii_lowercase();
        let returned = status == "refunded" || p.refunded.is_some_and(|r| r >= self.amount);
        if returned {
            let mut e = emit(State::Refunded);
            e.resolved_by = resolved_by;
            self.finish(e, fx);
            return;
        }
        match &self.stage {
            Stage::Checking {
                intent_id,
                since_ms,
            } => {
                let since = *since_ms;
                if now - since >= ctx.timing.confirm_window_ms {
                    let intent_id = Some(intent_id.clone());
                    self.enter_attention(intent_id, now, fx);
                } else {
                    let gap = Self::poll_gap_ms(ctx);
                    self.next_at_ms = Some(
                        (now + gap)
                            .min(since + ctx.timing.confirm_window_ms)
                            .max(now + 1),
                    );
                }
            }
            _ => self.next_at_ms = Some(now + Timing::ATTENTION_LOOKUP_MS),
        }
    }
}

// The store's tests build refunds in every stage with these helpers.
#[cfg(test)]
pub(crate) mod tests;
