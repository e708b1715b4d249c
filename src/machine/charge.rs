//! The charge state machine: `step(charge, input, ctx) -> effects`. Pure: no IO, no
//! clock reads (the time comes in `Ctx`), no randomness of its own (jitter comes in
//! `Ctx`). The driver (`engine::driver`) stores the charge and its emitted events in one
//! write, flushes, and only then performs the effects: so a `Create` effect never leaves
//! before the `SendBegun` stage that announces it is durable.
//!
//! Invariants kept here (and checked by the transition tests and the property test in
//! `machine/prop.rs`):
//! - `Create` is emitted only together with the move to `SendBegun`, and only before the
//!   deadline.
//! - After an ambiguous create (no answer, 5xx, a crash between the write-ahead and the
//!   answer) the charge **reconciles before any new create** (`Reconciling`): it lists
//!   the intents created since the send began; exactly one matching intent is adopted;
//!   none at all (the list answered) allows one more create with the same reference,
//!   before the deadline only, and a 409 to that create sends it back to reconcile (ours
//!   may have committed late); anything it cannot decide goes to `NeedsAttention`. So at
//!   most one intent ever exists per charge.
//! - With a backend whose creates carry an idempotency key (`Ctx::idempotent_create`,
//!   the Orders API) an ambiguous create is retried with the same key instead.
//! - A charge whose send has begun is never `expired` by its deadline; it is `expired`
//!   only when reconcile has shown that no intent exists.
//! - `approved` is emitted only from a payment lookup that said `approved` for the
//!   charge's exact amount, or by an operator.

use serde::{Deserialize, Serialize};

use crate::domain::outcome::{ErrorCode, ResolvedBy, State, WaitReason};
use crate::domain::remote::{Candidate, Failure, Payment, Phase, RemoteCharge};
use crate::machine::live::{self, LiveNext};
pub use crate::machine::live::{CancelMark, Ctx, Emit, PaymentSeen, Remote, Timing};
use crate::money::Cents;

/// Where a charge stands. Stored with the request; internal stages (`SendBegun`,
/// `Confirming`) are never published as such.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Stored, not sent. Waits for its turn on the terminal and for the API.
    Queued { reason: Option<WaitReason> },
    /// Written ahead: the create is about to leave, or left without a known answer.
    SendBegun { at_ms: i64 },
    /// A create's outcome is unknown: finding out from the intent list before anything
    /// else is sent.
    Reconciling { since_ms: i64 },
    /// The intent exists at Mercado Pago and has not ended.
    Live {
        intent_id: String,
        remote: Remote,
        sent_ms: i64,
        cancel: CancelMark,
    },
    /// The intent ended; the payment is being confirmed.
    Confirming {
        intent_id: String,
        payment_id: Option<String>,
        since_ms: i64,
    },
    /// The outcome is unknown; looked up until `confirm_window_max`, then only an
    /// operator can end it.
    NeedsAttention {
        intent_id: Option<String>,
        payment_id: Option<String>,
        since_ms: i64,
    },
    /// Final.
    Done { state: State },
}

/// The part of a charge the machine reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub amount: Cents,
    pub deadline_ms: i64,
    pub stage: Stage,
    /// A station asked to cancel while the create was in flight.
    pub cancel_pending: bool,
    /// When the next timed action is due (poll, retry, lookup, expiry).
    pub next_at_ms: Option<i64>,
    /// Consecutive failed attempts, for backoff.
    pub attempts: u32,
    /// Since when the API has been failing for this charge, if it is.
    pub unreachable_since_ms: Option<i64>,
    /// `waiting` with `api_unreachable` was reported for the current outage.
    pub reported_unreachable: bool,
    /// The last payment seen, for the final event.
    pub payment: Option<PaymentSeen>,
    /// The intent id, once Mercado Pago gave one; kept after the charge ends.
    pub intent: Option<String>,
    /// When the first create of this charge began (reconcile lists from there).
    pub first_send_ms: Option<i64>,
    /// Creates sent for this charge (more than one only after reconcile proved the
    /// earlier ones left nothing, or with an idempotency key).
    pub sends: u32,
    /// Reconcile rounds ended by a 409 on the re-create.
    pub reconcile_rounds: u32,
    /// In `needs_attention` without an intent: the next lookup is the payment search
    /// (else the intent list); they alternate.
    pub search_next: bool,
}

/// Something that happened to a charge.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The charge's `next_at_ms` came, or the driver re-examines it.
    Wake,
    /// The terminal is free and this charge is first in its queue.
    MayStart,
    /// The terminal is busy with an earlier charge.
    TerminalBusy,
    CreateDone(Result<RemoteCharge, Failure>),
    PollDone(Result<RemoteCharge, Failure>),
    PaymentDone(Result<Payment, Failure>),
    /// Payments found by `external_reference` (needs_attention without a payment id).
    SearchDone(Result<Vec<Payment>, Failure>),
    CancelDone(Result<(), Failure>),
    /// Reconcile's answer: the intents carrying this charge's reference, created since
    /// the send began; `None` when the API does not serve the list.
    ListDone(Result<Option<Vec<Candidate>>, Failure>),
    /// A station's cancel command for this charge.
    CancelRequested,
    /// The clock cannot be trusted (a reboot without time sync, or it went backwards):
    /// a charge not yet sent is expired rather than sent.
    ClockInDoubt,
    /// The agent started again with this charge in its stored stage.
    Restarted,
    /// An operator resolved a `needs_attention` charge.
    Resolve {
        approved: bool,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Record and publish a station event for this charge.
    Emit(Emit),
    /// Create the intent. Emitted together with the move to `SendBegun`.
    Create,
    Poll {
        intent_id: String,
    },
    LookupPayment {
        payment_id: String,
    },
    SearchPayments,
    /// List the intents created since `from_ms` and return those with this charge's
    /// reference (`Input::ListDone`).
    ListIntents {
        from_ms: i64,
    },
    CancelRemote {
        intent_id: String,
    },
    /// The terminal is no longer held by this charge.
    ReleaseTerminal,
    /// Answer to a station's cancel: `Ok` → the cancel is `done`; `Err` → `failed`
    /// (or refused at once, when the driver can tell before storing it).
    CancelAnswer(Result<(), (ErrorCode, String)>),
}

impl Charge {
    pub fn new(amount: Cents, deadline_ms: i64) -> Charge {
        Charge {
            amount,
            deadline_ms,
            stage: Stage::Queued { reason: None },
            cancel_pending: false,
            next_at_ms: Some(deadline_ms),
            attempts: 0,
            unreachable_since_ms: None,
            reported_unreachable: false,
            payment: None,
            intent: None,
            first_send_ms: None,
            sends: 0,
            reconcile_rounds: 0,
            search_next: false,
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self.stage, Stage::Done { .. })
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

    /// True while this charge holds its terminal (a send has begun and it has not ended).
    pub fn holds_terminal(&self) -> bool {
        matches!(
            self.stage,
            Stage::SendBegun { .. }
                | Stage::Reconciling { .. }
                | Stage::Live { .. }
                | Stage::Confirming { .. }
        ) || matches!(
            self.stage,
            Stage::NeedsAttention {
                intent_id: Some(_),
                ..
            }
        )
    }

    pub fn intent_id(&self) -> Option<&str> {
        match &self.stage {
            Stage::Live { intent_id, .. } | Stage::Confirming { intent_id, .. } => Some(intent_id),
            Stage::NeedsAttention { intent_id, .. } => intent_id.as_deref(),
            _ => self.intent.as_deref(),
        }
    }

    /// Apply one input. Returns the effects, in order.
    pub fn step(&mut self, input: Input, ctx: &Ctx) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.step_into(input, ctx, &mut fx);
        if self.is_final() {
            self.next_at_ms = None;
        }
        fx
    }

    fn finish(&mut self, emit: Emit, fx: &mut Vec<Effect>) {
        let held = self.holds_terminal();
        self.stage = Stage::Done { state: emit.state };
        fx.push(Effect::Emit(emit));
        if held {
            fx.push(Effect::ReleaseTerminal);
        }
    }

    /// Write ahead and create: the only place a `Create` leaves.
    fn begin_send(&mut self, now: i64, fx: &mut Vec<Effect>) {
        self.stage = Stage::SendBegun { at_ms: now };
        self.first_send_ms.get_or_insert(now);
        self.sends = self.sends.saturating_add(1);
        self.next_at_ms = None;
        fx.push(Effect::Create);
    }

    /// A create that certainly left nothing behind: back to the queue, to try again after
    /// `wait` — but never past the deadline, where it expires (at the deadline, not
    /// before: when our own backoff would overshoot it, one last try is made a second
    /// before it; a server's `Retry-After` is obeyed, so then it just waits to expire).
    fn requeue(
        &mut self,
        reason: WaitReason,
        wait: i64,
        server_imposed: bool,
        now: i64,
        fx: &mut Vec<Effect>,
    ) {
        let retry_at = now + wait;
        let last_try = self.deadline_ms - 1_000;
        let next = if retry_at < self.deadline_ms {
            retry_at
        } else if !server_imposed && last_try > now {
            last_try
        } else {
            self.deadline_ms
        };
        self.stage = Stage::Queued {
            reason: Some(reason),
        };
        self.next_at_ms = Some(next);
        fx.push(Effect::ReleaseTerminal);
        // Told once per outage, not at every retry.
        let outage = reason != WaitReason::TerminalBusy;
        if !(outage && self.reported_unreachable) {
            self.reported_unreachable = outage;
            fx.push(Effect::Emit(Emit::waiting(reason)));
        }
    }

    /// The create's outcome is unknown: find out before anything else is sent.
    fn start_reconcile(&mut self, now: i64) {
        self.stage = Stage::Reconciling { since_ms: now };
        let settle = self.first_send_ms.unwrap_or(now) + Timing::RECONCILE_SETTLE_MS;
        self.next_at_ms = Some(settle.max(now));
    }

    /// The outcome cannot be decided by the agent now: tell the station to call staff,
    /// and keep looking.
    fn need_attention(&mut self, intent_id: Option<String>, now: i64, fx: &mut Vec<Effect>) {
        let held = self.holds_terminal();
        self.stage = Stage::NeedsAttention {
            intent_id,
            payment_id: None,
            since_ms: now,
        };
        self.attempts = 0;
        self.next_at_ms = Some(now + Timing::MIN_POLL_GAP_MS);
        fx.push(Effect::Emit(Emit::state(State::NeedsAttention)));
        if held && !self.holds_terminal() {
            // Without a known intent it does not hold the terminal: the charges behind it
            // go on (if our intent is there after all, their creates get 409 and wait).
            fx.push(Effect::ReleaseTerminal);
        }
        if std::mem::take(&mut self.cancel_pending) {
            fx.push(Effect::CancelAnswer(Err((
                ErrorCode::NotCancelable,
                "the outcome of this charge is not known yet: staff must check the terminal".into(),
            ))));
        }
    }

    /// The intent exists (created, or found by reconcile): the station hears `sent`.
    fn go_live(&mut self, intent_id: String, now: i64, fx: &mut Vec<Effect>) -> String {
        self.intent = Some(intent_id.clone());
        self.attempts = 0;
        self.reported_unreachable = false;
        self.unreachable_since_ms = None;
        self.stage = Stage::Live {
            intent_id: intent_id.clone(),
            remote: Remote::Open,
            sent_ms: now,
            cancel: CancelMark::None,
        };
        fx.push(Effect::Emit(Emit::state(State::Sent)));
        intent_id
    }

    /// Reconcile found the one intent that is ours: carry on from what it says.
    fn adopt(&mut self, remote: RemoteCharge, ctx: &Ctx, fx: &mut Vec<Effect>) {
        let now = ctx.now_ms;
        let intent_id = self.go_live(remote.id.clone(), now, fx);
        let open = remote.phase == Phase::Open;
        self.on_remote(remote, ctx, fx);
        if std::mem::take(&mut self.cancel_pending) {
            match &mut self.stage {
                Stage::Live { cancel, .. } if open && *cancel == CancelMark::None => {
                    *cancel = CancelMark::Station;
                    fx.push(Effect::CancelRemote { intent_id });
                    self.next_at_ms = None;
                }
                _ => fx.push(Effect::CancelAnswer(Err((
                    ErrorCode::NotCancelable,
                    "the terminal took the charge before the cancel arrived: cancel it there"
                        .into(),
                )))),
            }
        }
    }

    /// Of reconcile's candidates, the one that is certainly ours: reference (already
    /// filtered), device, amount and time all match, and nothing else carries our
    /// reference. `Err` when candidates exist but none is certain.
    fn pick<'a>(&self, cands: &'a [Candidate]) -> Result<Option<&'a Candidate>, ()> {
        let from = self.first_send_ms.unwrap_or(0) - Timing::RECONCILE_SKEW_MS;
        match cands {
            [] => Ok(None),
            [c] if c.device_matches
                && c.remote.amount == Some(self.amount)
                && c.created_ms.is_some_and(|t| t >= from) =>
            {
                Ok(Some(c))
            }
            _ => Err(()),
        }
    }

    fn backoff_ms(&self, ctx: &Ctx) -> i64 {
        let exp = Timing::BACKOFF_BASE_MS.saturating_mul(1i64 << self.attempts.min(16));
        let capped = exp.min(Timing::BACKOFF_CAP_MS);
        // Full jitter over the upper half: spreads retries after an outage.
        capped / 2 + ((capped / 2) as f64 * ctx.jitter) as i64
    }

    fn poll_gap_ms(ctx: &Ctx) -> i64 {
        live::poll_gap_ms(ctx)
    }

    /// Record an API failure on a live charge; maybe report `waiting`.
    fn live_failure(&mut self, failure: &Failure, ctx: &Ctx, fx: &mut Vec<Effect>) {
        self.attempts = self.attempts.saturating_add(1);
        let since = *self.unreachable_since_ms.get_or_insert(ctx.now_ms);
        let retry = match failure {
            Failure::Unreachable {
                retry_after_ms: Some(ms),
                ..
            } => (*ms).max(self.backoff_ms(ctx)),
            _ => self.backoff_ms(ctx),
        };
        self.next_at_ms = Some(ctx.now_ms + retry);
        if !self.reported_unreachable && ctx.now_ms - since >= Timing::UNREACHABLE_REPORT_MS {
            self.reported_unreachable = true;
            let reason = match failure {
                Failure::Unauthorized => WaitReason::Unauthorized,
                Failure::Unreachable {
                    rate_limited: true, ..
                } => WaitReason::RateLimited,
                _ => WaitReason::ApiUnreachable,
            };
            fx.push(Effect::Emit(Emit::waiting(reason)));
        }
    }

    /// The API answered again: clear the outage, and re-tell the station where it stands
    /// if it was told `waiting` meanwhile.
    fn live_recovered(&mut self, fx: &mut Vec<Effect>) {
        self.attempts = 0;
        self.unreachable_since_ms = None;
        if std::mem::take(&mut self.reported_unreachable) {
            let state = match &self.stage {
                Stage::Live {
                    remote: Remote::Open,
                    ..
                } => State::Sent,
                Stage::Live {
                    remote: Remote::OnTerminal,
                    ..
                } => State::OnTerminal,
                Stage::NeedsAttention { .. } => State::NeedsAttention,
                _ => State::Processing,
            };
            fx.push(Effect::Emit(Emit::state(state)));
        }
    }

    fn step_into(&mut self, input: Input, ctx: &Ctx, fx: &mut Vec<Effect>) {
        let now = ctx.now_ms;
        match (&mut self.stage, input) {
            // ---- operator ----
            (Stage::NeedsAttention { .. }, Input::Resolve { approved }) => {
                let state = if approved {
                    State::Approved
                } else {
                    State::Declined
                };
                self.finish(
                    Emit {
                        state,
                        reason: None,
                        error: None,
                        resolved_by: Some(ResolvedBy::Operator),
                    },
                    fx,
                );
            }
            (_, Input::Resolve { .. }) => {}

            // ---- queued: waiting for the terminal and the API ----
            (Stage::Queued { .. }, Input::CancelRequested) => {
                self.finish(Emit::state(State::Canceled), fx);
                fx.push(Effect::CancelAnswer(Ok(())));
            }
            (Stage::Queued { .. }, Input::ClockInDoubt) => {
                self.finish(Emit::state(State::Expired), fx);
            }
            (_, Input::ClockInDoubt) => {}
            (Stage::Queued { reason }, _) if now >= self.deadline_ms => {
                if *reason == Some(WaitReason::Unauthorized) {
                    self.finish(
                        Emit::failed(
                            ErrorCode::Unauthorized,
                            "Mercado Pago refused the access token until the charge's ttl ran out",
                        ),
                        fx,
                    );
                } else {
                    self.finish(Emit::state(State::Expired), fx);
                }
            }
            (Stage::Queued { reason }, Input::TerminalBusy) => {
                if *reason != Some(WaitReason::TerminalBusy) {
                    *reason = Some(WaitReason::TerminalBusy);
                    fx.push(Effect::Emit(Emit::waiting(WaitReason::TerminalBusy)));
                }
                self.next_at_ms = Some(self.deadline_ms);
            }
            (Stage::Queued { .. }, Input::MayStart) => {
                if self.next_at_ms.is_some_and(|at| at > now) && self.attempts > 0 {
                    // Backing off after a failure: not yet.
                    return;
                }
                self.begin_send(now, fx);
            }
            (Stage::Queued { .. }, Input::Restarted | Input::Wake) => {
                self.next_at_ms = Some(
                    self.next_at_ms
                        .unwrap_or(self.deadline_ms)
                        .min(self.deadline_ms),
                );
            }
            (Stage::Queued { .. }, _) => {}

            // ---- send begun: the create is out ----
            (Stage::SendBegun { .. }, Input::CreateDone(Ok(remote))) => {
                let intent_id = self.go_live(remote.id, now, fx);
                if std::mem::take(&mut self.cancel_pending) {
                    if let Stage::Live { cancel, .. } = &mut self.stage {
                        *cancel = CancelMark::Station;
                    }
                    fx.push(Effect::CancelRemote { intent_id });
                    self.next_at_ms = None;
                } else {
                    self.next_at_ms = Some(now + ctx.timing.poll_interval_ms);
                }
            }
            (Stage::SendBegun { .. }, Input::CreateDone(Err(failure))) => match failure {
                // Nothing was committed: back to the queue until the deadline.
                Failure::Unreachable {
                    retry_after_ms,
                    rate_limited,
                } => {
                    // A failed connect or a 429 left nothing behind at Mercado Pago.
                    self.attempts = self.attempts.saturating_add(1);
                    if self.cancel_pending {
                        self.cancel_pending = false;
                        self.finish(Emit::state(State::Canceled), fx);
                        fx.push(Effect::CancelAnswer(Ok(())));
                        return;
                    }
                    let reason = if rate_limited {
                        WaitReason::RateLimited
                    } else {
                        WaitReason::ApiUnreachable
                    };
                    let wait = retry_after_ms.unwrap_or(0).max(self.backoff_ms(ctx));
                    self.requeue(reason, wait, retry_after_ms.is_some(), now, fx);
                }
                Failure::Unauthorized => {
                    self.attempts = self.attempts.saturating_add(1);
                    let wait = self.backoff_ms(ctx);
                    self.requeue(WaitReason::Unauthorized, wait, false, now, fx);
                }
                Failure::Conflict if self.sends > 1 && !ctx.idempotent_create => {
                    // A re-create after reconcile found nothing: the intent the terminal
                    // holds may be our first create, committed late. Reconcile again.
                    self.reconcile_rounds = self.reconcile_rounds.saturating_add(1);
                    if self.reconcile_rounds >= Timing::RECONCILE_MAX_ROUNDS {
                        self.need_attention(None, now, fx);
                        return;
                    }
                    self.start_reconcile(now);
                    self.next_at_ms = Some(now + Self::poll_gap_ms(ctx));
                }
                Failure::Conflict => {
                    // The terminal holds a queued intent that is not ours (ours would
                    // have been a late commit of an ambiguous send, which reconciles,
                    // never comes here). Wait for it to end.
                    self.attempts = self.attempts.saturating_add(1);
                    let wait = self.backoff_ms(ctx).max(ctx.timing.poll_interval_ms);
                    self.requeue(WaitReason::TerminalBusy, wait, false, now, fx);
                }
                Failure::Refused { message } => {
                    self.finish(Emit::failed(ErrorCode::ApiRefused, message), fx);
                    if std::mem::take(&mut self.cancel_pending) {
                        fx.push(Effect::CancelAnswer(Err((
                            ErrorCode::NotCancelable,
                            "the charge already failed".into(),
                        ))));
                    }
                }
                Failure::NotFound => {
                    self.finish(
                        Emit::failed(
                            ErrorCode::ApiRefused,
                            "Mercado Pago does not know this terminal (404)",
                        ),
                        fx,
                    );
                }
                Failure::Ambiguous => {
                    // The intent may exist. Never send again blindly.
                    if ctx.idempotent_create && now < self.deadline_ms {
                        // Same key on the retry: it cannot make a second charge.
                        self.attempts = self.attempts.saturating_add(1);
                        self.next_at_ms = Some(now + self.backoff_ms(ctx));
                    } else {
                        self.start_reconcile(now);
                    }
                }
            },
            (Stage::SendBegun { .. }, Input::CancelRequested) => {
                self.cancel_pending = true;
            }
            (Stage::SendBegun { .. }, Input::Restarted) => {
                // Crashed between the write-ahead and the answer: the intent may exist.
                if ctx.idempotent_create && now < self.deadline_ms {
                    self.next_at_ms = Some(now);
                } else {
                    self.start_reconcile(now);
                }
            }
            (Stage::SendBegun { .. }, Input::Wake)
                if ctx.idempotent_create && self.next_at_ms.is_some_and(|at| at <= now) =>
            {
                if now < self.deadline_ms {
                    self.begin_send(now, fx);
                } else {
                    self.start_reconcile(now);
                }
            }
            (Stage::SendBegun { .. }, _) => {}

            // ---- reconciling: did the create reach Mercado Pago? ----
            (Stage::Reconciling { .. }, Input::CancelRequested) => {
                self.cancel_pending = true;
            }
            (Stage::Reconciling { .. }, Input::Wake | Input::Restarted) => {
                if self.next_at_ms.is_some_and(|at| at > now) {
                    return;
                }
                self.next_at_ms = None;
                fx.push(Effect::ListIntents {
                    from_ms: self.first_send_ms.unwrap_or(now),
                });
            }
            (Stage::Reconciling { .. }, Input::ListDone(Ok(Some(cands)))) => {
                self.live_recovered(fx);
                match self.pick(&cands) {
                    Ok(Some(c)) => {
                        let remote = c.remote.clone();
                        self.adopt(remote, ctx, fx);
                    }
                    Ok(None) if std::mem::take(&mut self.cancel_pending) => {
                        // No intent exists: the cancel is local.
                        self.finish(Emit::state(State::Canceled), fx);
                        fx.push(Effect::CancelAnswer(Ok(())));
                    }
                    Ok(None) if now >= self.deadline_ms => {
                        // No intent exists and it is too late to send one.
                        self.finish(Emit::state(State::Expired), fx);
                    }
                    Ok(None) => self.begin_send(now, fx),
                    Err(()) => self.need_attention(None, now, fx),
                }
            }
            (Stage::Reconciling { .. }, Input::ListDone(Ok(None))) => {
                // The list is not served: nothing can be decided here.
                self.live_recovered(fx);
                self.need_attention(None, now, fx);
            }
            (Stage::Reconciling { .. }, Input::ListDone(Err(f))) => {
                self.live_failure(&f, ctx, fx);
            }
            (Stage::Reconciling { .. }, _) => {}

            // ---- live: the intent exists ----
            (
                Stage::Live {
                    remote,
                    cancel,
                    intent_id,
                    ..
                },
                Input::CancelRequested,
            ) => match remote {
                Remote::Open => {
                    if *cancel == CancelMark::None {
                        *cancel = CancelMark::Station;
                        fx.push(Effect::CancelRemote {
                            intent_id: intent_id.clone(),
                        });
                    } else {
                        *cancel = CancelMark::Station;
                    }
                }
                _ => fx.push(Effect::CancelAnswer(Err((
                    ErrorCode::NotCancelable,
                    "the charge is already on the terminal: cancel it there".into(),
                )))),
            },
            (Stage::Live { intent_id, .. }, Input::Wake | Input::Restarted) => {
                if self.next_at_ms.is_some_and(|at| at > now) {
                    return;
                }
                self.next_at_ms = None;
                fx.push(Effect::Poll {
                    intent_id: intent_id.clone(),
                });
            }
            (Stage::Live { .. }, Input::PollDone(Err(failure))) => {
                if failure == Failure::NotFound {
                    let intent_id = self.intent_id().map(str::to_string);
                    self.stage = Stage::NeedsAttention {
                        intent_id,
                        payment_id: None,
                        since_ms: now,
                    };
                    self.next_at_ms = Some(now + Timing::ATTENTION_LOOKUP_MS);
                    fx.push(Effect::Emit(Emit::state(State::NeedsAttention)));
                    return;
                }
                self.live_failure(&failure, ctx, fx);
            }
            (Stage::Live { .. }, Input::PollDone(Ok(remote_charge))) => {
                self.live_recovered(fx);
                self.on_remote(remote_charge, ctx, fx);
            }
            (Stage::Live { cancel, remote, .. }, Input::CancelDone(result)) => {
                let mark = *cancel;
                match result {
                    Ok(()) => {
                        let state = if mark == CancelMark::Timeout {
                            State::Expired
                        } else {
                            State::Canceled
                        };
                        self.finish(Emit::state(state), fx);
                        if mark == CancelMark::Station {
                            fx.push(Effect::CancelAnswer(Ok(())));
                        }
                    }
                    Err(Failure::Conflict) => {
                        // Already on the terminal: only the terminal can cancel it now.
                        *cancel = CancelMark::None;
                        if *remote == Remote::Open {
                            *remote = Remote::OnTerminal;
                            fx.push(Effect::Emit(Emit::state(State::OnTerminal)));
                        }
                        if mark == CancelMark::Station {
                            fx.push(Effect::CancelAnswer(Err((
                                ErrorCode::NotCancelable,
                                "the terminal took the charge before the cancel arrived: cancel it there"
                                    .into(),
                            ))));
                        }
                        self.next_at_ms = Some(now);
                    }
                    Err(failure) => {
                        // Keep polling; the station may cancel again.
                        *cancel = CancelMark::None;
                        self.live_failure(&failure, ctx, fx);
                        if mark == CancelMark::Station {
                            // The next Wake polls; the cancel is re-issued by the driver
                            // re-sending CancelRequested after the pause.
                            fx.push(Effect::CancelAnswer(Err((
                                ErrorCode::NotCancelable,
                                "Mercado Pago could not be reached to cancel; try again".into(),
                            ))));
                        }
                    }
                }
            }
            (Stage::Live { .. }, _) => {}

            // ---- confirming the payment ----
            (Stage::Confirming { .. }, Input::CancelRequested) => {
                fx.push(Effect::CancelAnswer(Err((
                    ErrorCode::NotCancelable,
                    "the charge has been processed by the terminal".into(),
                ))));
            }
            (
                Stage::Confirming {
                    intent_id,
                    payment_id,
                    since_ms,
                },
                Input::Wake | Input::Restarted,
            ) => {
                if self.next_at_ms.is_some_and(|at| at > now) {
                    return;
                }
                if now - *since_ms >= ctx.timing.confirm_window_ms {
                    let stage = Stage::NeedsAttention {
                        intent_id: Some(intent_id.clone()),
                        payment_id: payment_id.clone(),
                        since_ms: *since_ms,
                    };
                    self.stage = stage;
                    self.next_at_ms = Some(now + Timing::ATTENTION_LOOKUP_MS);
                    fx.push(Effect::Emit(Emit::state(State::NeedsAttention)));
                    return;
                }
                self.next_at_ms = None;
                match payment_id {
                    Some(p) => fx.push(Effect::LookupPayment {
                        payment_id: p.clone(),
                    }),
                    None => fx.push(Effect::Poll {
                        intent_id: intent_id.clone(),
                    }),
                }
            }
            (Stage::Confirming { .. }, Input::PollDone(Ok(remote))) => {
                self.live_recovered(fx);
                if let Stage::Confirming { payment_id, .. } = &mut self.stage {
                    if payment_id.is_none() {
                        *payment_id = remote.payment_id.clone();
                    }
                }
                self.next_at_ms =
                    Some(now + Self::poll_gap_ms(ctx).min(ctx.timing.poll_interval_ms.max(200)));
            }
            (Stage::Confirming { .. }, Input::PaymentDone(Ok(payment))) => {
                self.live_recovered(fx);
                self.on_payment(payment, None, ctx, fx);
            }
            (Stage::Confirming { .. }, Input::PollDone(Err(f)) | Input::PaymentDone(Err(f))) => {
                self.live_failure(&f, ctx, fx);
            }
            (Stage::Confirming { .. }, _) => {}

            // ---- needs attention: keep looking ----
            (Stage::NeedsAttention { .. }, Input::CancelRequested) => {
                fx.push(Effect::CancelAnswer(Err((
                    ErrorCode::NotCancelable,
                    "the outcome of this charge is not known yet: staff must check the terminal"
                        .into(),
                ))));
            }
            (
                Stage::NeedsAttention {
                    intent_id,
                    payment_id,
                    since_ms,
                },
                Input::Wake | Input::Restarted,
            ) => {
                if self.next_at_ms.is_some_and(|at| at > now) {
                    return;
                }
                if now - *since_ms >= ctx.timing.confirm_window_max_ms {
                    // Only an operator can end it now.
                    self.next_at_ms = None;
                    return;
                }
                self.next_at_ms = None;
                match (payment_id, intent_id) {
                    (Some(p), _) => fx.push(Effect::LookupPayment {
                        payment_id: p.clone(),
                    }),
                    (None, Some(i)) => fx.push(Effect::Poll {
                        intent_id: i.clone(),
                    }),
                    (None, None) => {
                        self.search_next = !self.search_next;
                        if self.search_next {
                            fx.push(Effect::SearchPayments);
                        } else {
                            fx.push(Effect::ListIntents {
                                from_ms: self.first_send_ms.unwrap_or(*since_ms),
                            });
                        }
                    }
                }
            }
            (
                Stage::NeedsAttention {
                    intent_id: None, ..
                },
                Input::ListDone(Ok(Some(cands))),
            ) => {
                self.live_recovered(fx);
                match self.pick(&cands) {
                    Ok(Some(c)) => {
                        // Found ours: follow the intent from here (resolved by lookup).
                        let remote = c.remote.clone();
                        self.intent = Some(remote.id.clone());
                        if let Stage::NeedsAttention { intent_id, .. } = &mut self.stage {
                            *intent_id = Some(remote.id.clone());
                        }
                        self.step_into(Input::PollDone(Ok(remote)), ctx, fx);
                    }
                    _ => self.next_at_ms = Some(now + Timing::ATTENTION_LOOKUP_MS),
                }
            }
            (Stage::NeedsAttention { .. }, Input::ListDone(Ok(_))) => {
                self.live_recovered(fx);
                self.next_at_ms = Some(now + Timing::ATTENTION_LOOKUP_MS);
            }
            (Stage::NeedsAttention { .. }, Input::PollDone(Ok(remote))) => {
                self.live_recovered(fx);
                match remote.phase {
                    Phase::Canceled | Phase::Abandoned | Phase::Error => {
                        let state = match remote.phase {
                            Phase::Canceled => State::Canceled,
                            Phase::Abandoned => State::Expired,
                            _ => State::Failed,
                        };
                        let mut emit = Emit::state(state);
                        emit.resolved_by = Some(ResolvedBy::Lookup);
                        if state == State::Failed {
                            emit.error = Some((
                                ErrorCode::TerminalError,
                                "the terminal reported an error".into(),
                            ));
                        }
                        self.finish(emit, fx);
                    }
                    _ => {
                        if let Stage::NeedsAttention { payment_id, .. } = &mut self.stage {
                            if payment_id.is_none() {
                                *payment_id = remote.payment_id.clone();
                            }
                        }
                        self.next_at_ms =
                            Some(now + Timing::ATTENTION_LOOKUP_MS.min(Self::poll_gap_ms(ctx) * 5));
                    }
                }
            }
            (Stage::NeedsAttention { .. }, Input::PaymentDone(Ok(payment))) => {
                self.live_recovered(fx);
                self.on_payment(payment, Some(ResolvedBy::Lookup), ctx, fx);
            }
            (Stage::NeedsAttention { .. }, Input::SearchDone(Ok(payments))) => {
                self.live_recovered(fx);
                // Adopt a payment only if exactly one carries our reference.
                if payments.len() == 1 {
                    let payment = payments.into_iter().next().expect("len is 1");
                    if let Stage::NeedsAttention { payment_id, .. } = &mut self.stage {
                        *payment_id = Some(payment.id.clone());
                    }
                    self.on_payment(payment, Some(ResolvedBy::Lookup), ctx, fx);
                } else {
                    self.next_at_ms = Some(now + Timing::ATTENTION_LOOKUP_MS);
                }
            }
            (
                Stage::NeedsAttention { .. },
                Input::PollDone(Err(f))
                | Input::PaymentDone(Err(f))
                | Input::SearchDone(Err(f))
                | Input::ListDone(Err(f)),
            ) => {
                self.live_failure(&f, ctx, fx);
                self.next_at_ms = self
                    .next_at_ms
                    .map(|at| at.max(now + Timing::ATTENTION_LOOKUP_MS / 3));
            }
            (Stage::NeedsAttention { .. }, _) => {}

            // ---- done ----
            (Stage::Done { .. }, Input::CancelRequested) => {
                fx.push(Effect::CancelAnswer(Err((
                    ErrorCode::NotCancelable,
                    "the charge is already final".into(),
                ))));
            }
            (Stage::Done { .. }, _) => {}
        }
    }

    /// A poll answer for a live intent (`live::on_remote` says what it means).
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
            LiveNext::Poll { emit, next_at_ms } => {
                if let Some(state) = emit {
                    fx.push(Effect::Emit(Emit::state(state)));
                }
                self.next_at_ms = Some(next_at_ms);
            }
            LiveNext::CancelForTimeout => {
                fx.push(Effect::CancelRemote {
                    intent_id: intent_id.clone(),
                });
                self.next_at_ms = None;
            }
            LiveNext::Ended { .. } => {
                let intent_id = intent_id.clone();
                let payment_id = remote.payment_id.clone();
                self.stage = Stage::Confirming {
                    intent_id: intent_id.clone(),
                    payment_id: payment_id.clone(),
                    since_ms: now,
                };
                self.next_at_ms = None;
                match payment_id {
                    Some(p) => fx.push(Effect::LookupPayment { payment_id: p }),
                    None => self.next_at_ms = Some(now + Self::poll_gap_ms(ctx)),
                }
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

    /// A payment lookup answer while confirming or in needs_attention.
    fn on_payment(
        &mut self,
        payment: Payment,
        resolved_by: Option<ResolvedBy>,
        ctx: &Ctx,
        fx: &mut Vec<Effect>,
    ) {
        let now = ctx.now_ms;
        self.payment = Some(PaymentSeen {
            id: payment.id.clone(),
            status: payment.status.clone(),
            status_detail: payment.status_detail.clone(),
        });
        let status = payment.status.to_ascii_lowercase();
        let amount_ok = payment.amount == Some(self.amount);
        match status.as_str() {
            "approved" if amount_ok => {
                self.finish(
                    Emit {
                        state: State::Approved,
                        reason: None,
                        error: None,
                        resolved_by,
                    },
                    fx,
                );
            }
            "rejected" | "cancelled" | "canceled" | "refunded" | "charged_back" => {
                self.finish(
                    Emit {
                        state: State::Declined,
                        reason: None,
                        error: None,
                        resolved_by,
                    },
                    fx,
                );
            }
            _ => {
                // Undecided (pending, in_process, authorized, in_mediation, unknown) or an
                // approved payment of another amount: keep looking until the window ends.
                match &self.stage {
                    Stage::Confirming { since_ms, .. } => {
                        let since = *since_ms;
                        if now - since >= ctx.timing.confirm_window_ms {
                            if let Stage::Confirming {
                                intent_id,
                                payment_id,
                                since_ms,
                            } = &self.stage
                            {
                                self.stage = Stage::NeedsAttention {
                                    intent_id: Some(intent_id.clone()),
                                    payment_id: payment_id.clone(),
                                    since_ms: *since_ms,
                                };
                            }
                            self.next_at_ms = Some(now + Timing::ATTENTION_LOOKUP_MS);
                            fx.push(Effect::Emit(Emit::state(State::NeedsAttention)));
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
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod prop;
