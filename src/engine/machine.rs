//! The charge state machine: `step(charge, input, ctx) -> effects`. Pure: no IO, no
//! clock reads (the time comes in `Ctx`), no randomness of its own (jitter comes in
//! `Ctx`). The driver (`engine::driver`) stores the charge and its emitted events in one
//! write, flushes, and only then performs the effects: so a `Create` effect never leaves
//! before the `SendBegun` stage that announces it is durable.
//!
//! Invariants kept here (and checked by tests):
//! - `Create` is emitted only from `Queued`, only before the deadline, and only together
//!   with the move to `SendBegun`; nothing ever emits a second `Create` once a send has
//!   begun (an ambiguous outcome goes to `NeedsAttention`, never back to `Queued`).
//! - A charge in `SendBegun` or later is never `expired` by its deadline.
//! - `approved` is emitted only from a payment lookup that said `approved` for the
//!   charge's exact amount.

use serde::{Deserialize, Serialize};

use crate::money::Cents;
use crate::point::{Payment, Phase, RemoteCharge};
use crate::station::wire::{ErrorCode, ResolvedBy, State, WaitReason};

/// Timing rules, from config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub poll_interval_ms: i64,
    pub terminal_timeout_ms: i64,
    pub confirm_window_ms: i64,
    pub confirm_window_max_ms: i64,
}

impl Timing {
    /// The API asks for at most one GET per second per intent.
    pub const MIN_POLL_GAP_MS: i64 = 1_000;
    /// How long the API may be unreachable before a live charge reports it.
    pub const UNREACHABLE_REPORT_MS: i64 = 10_000;
    /// Retry backoff: first delay and cap.
    pub const BACKOFF_BASE_MS: i64 = 500;
    pub const BACKOFF_CAP_MS: i64 = 30_000;
    /// Lookups during `needs_attention`, after the confirm window.
    pub const ATTENTION_LOOKUP_MS: i64 = 30_000;
}

/// What the machine knows besides the input: the time, and a random number for jitter.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub now_ms: i64,
    /// Uniform in [0, 1): the driver's jitter source.
    pub jitter: f64,
    pub timing: Timing,
}

/// Where a charge stands. Stored with the request; internal stages (`SendBegun`,
/// `Confirming`) are never published as such.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Stored, not sent. Waits for its turn on the terminal and for the API.
    Queued { reason: Option<WaitReason> },
    /// Written ahead: the create is about to leave, or left without a known answer.
    SendBegun { at_ms: i64 },
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

/// The remote stage of a live intent, as far as the station has been told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Remote {
    Open,
    OnTerminal,
    Processing,
}

/// Whether the agent is canceling a live intent, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelMark {
    None,
    /// A station asked for it.
    Station,
    /// It stayed OPEN `terminal_timeout` after `sent`: it ends `expired`.
    Timeout,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentSeen {
    pub id: String,
    pub status: String,
    pub status_detail: Option<String>,
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
    /// A station's cancel command for this charge.
    CancelRequested,
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
    CancelRemote {
        intent_id: String,
    },
    /// The terminal is no longer held by this charge.
    ReleaseTerminal,
    /// Answer to a station's cancel: `Ok` → the cancel is `done`; `Err` → `failed`
    /// (or refused at once, when the driver can tell before storing it).
    CancelAnswer(Result<(), (ErrorCode, String)>),
}

/// A station event, before the driver adds seq, time, ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    pub state: State,
    pub reason: Option<WaitReason>,
    pub error: Option<(ErrorCode, String)>,
    pub resolved_by: Option<ResolvedBy>,
}

impl Emit {
    pub fn state(state: State) -> Emit {
        Emit {
            state,
            reason: None,
            error: None,
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
    fn failed(code: ErrorCode, message: impl Into<String>) -> Emit {
        Emit {
            state: State::Failed,
            reason: None,
            error: Some((code, message.into())),
            resolved_by: None,
        }
    }
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
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self.stage, Stage::Done { .. })
    }

    /// True while this charge holds its terminal (a send has begun and it has not ended).
    pub fn holds_terminal(&self) -> bool {
        matches!(
            self.stage,
            Stage::SendBegun { .. } | Stage::Live { .. } | Stage::Confirming { .. }
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

    fn backoff_ms(&self, ctx: &Ctx) -> i64 {
        let exp = Timing::BACKOFF_BASE_MS.saturating_mul(1i64 << self.attempts.min(16));
        let capped = exp.min(Timing::BACKOFF_CAP_MS);
        // Full jitter over the upper half: spreads retries after an outage.
        capped / 2 + ((capped / 2) as f64 * ctx.jitter) as i64
    }

    fn poll_gap_ms(ctx: &Ctx) -> i64 {
        ctx.timing.poll_interval_ms.max(Timing::MIN_POLL_GAP_MS)
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
            (Stage::Queued { .. }, _) if now >= self.deadline_ms => {
                self.finish(Emit::state(State::Expired), fx);
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
                self.stage = Stage::SendBegun { at_ms: now };
                self.next_at_ms = None;
                fx.push(Effect::Create);
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
                self.attempts = 0;
                let intent_id = remote.id.clone();
                self.intent = Some(intent_id.clone());
                self.stage = Stage::Live {
                    intent_id: intent_id.clone(),
                    remote: Remote::Open,
                    sent_ms: now,
                    cancel: CancelMark::None,
                };
                fx.push(Effect::Emit(Emit::state(State::Sent)));
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
                // Nothing was committed: back to the queue, unless the deadline passed.
                Failure::Unreachable {
                    retry_after_ms,
                    rate_limited,
                } => {
                    // A failed connect or a 429 left nothing behind at Mercado Pago.
                    self.attempts = self.attempts.saturating_add(1);
                    let reason = if rate_limited {
                        WaitReason::RateLimited
                    } else {
                        WaitReason::ApiUnreachable
                    };
                    let wait = retry_after_ms.unwrap_or(0).max(self.backoff_ms(ctx));
                    if self.cancel_pending {
                        self.cancel_pending = false;
                        self.finish(Emit::state(State::Canceled), fx);
                        fx.push(Effect::CancelAnswer(Ok(())));
                        return;
                    }
                    if now + wait >= self.deadline_ms {
                        self.finish(Emit::state(State::Expired), fx);
                        return;
                    }
                    self.stage = Stage::Queued {
                        reason: Some(reason),
                    };
                    self.next_at_ms = Some(now + wait);
                    fx.push(Effect::ReleaseTerminal);
                    fx.push(Effect::Emit(Emit::waiting(reason)));
                }
                Failure::Unauthorized => {
                    self.attempts = self.attempts.saturating_add(1);
                    let wait = self.backoff_ms(ctx);
                    if now + wait >= self.deadline_ms {
                        self.finish(
                            Emit::failed(
                                ErrorCode::Unauthorized,
                                "Mercado Pago refused the access token until the charge's ttl ran out",
                            ),
                            fx,
                        );
                        return;
                    }
                    self.stage = Stage::Queued {
                        reason: Some(WaitReason::Unauthorized),
                    };
                    self.next_at_ms = Some(now + wait);
                    fx.push(Effect::ReleaseTerminal);
                    fx.push(Effect::Emit(Emit::waiting(WaitReason::Unauthorized)));
                }
                Failure::Conflict => {
                    // The terminal holds a queued intent that is not ours (ours would
                    // have been a late commit of an ambiguous send, which goes to
                    // needs_attention, not here). Wait for it to end.
                    self.attempts = self.attempts.saturating_add(1);
                    let wait = self.backoff_ms(ctx).max(ctx.timing.poll_interval_ms);
                    if now + wait >= self.deadline_ms {
                        self.finish(Emit::state(State::Expired), fx);
                        return;
                    }
                    self.stage = Stage::Queued {
                        reason: Some(WaitReason::TerminalBusy),
                    };
                    self.next_at_ms = Some(now + wait);
                    fx.push(Effect::ReleaseTerminal);
                    fx.push(Effect::Emit(Emit::waiting(WaitReason::TerminalBusy)));
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
                    self.stage = Stage::NeedsAttention {
                        intent_id: None,
                        payment_id: None,
                        since_ms: now,
                    };
                    self.attempts = 0;
                    self.next_at_ms = Some(now + Self::poll_gap_ms(ctx));
                    fx.push(Effect::Emit(Emit::state(State::NeedsAttention)));
                }
            },
            (Stage::SendBegun { .. }, Input::CancelRequested) => {
                self.cancel_pending = true;
            }
            (Stage::SendBegun { at_ms }, Input::Restarted) => {
                // Crashed between the write-ahead and the answer: the intent may exist.
                let _ = at_ms;
                self.stage = Stage::NeedsAttention {
                    intent_id: None,
                    payment_id: None,
                    since_ms: now,
                };
                self.next_at_ms = Some(now);
                fx.push(Effect::Emit(Emit::state(State::NeedsAttention)));
            }
            (Stage::SendBegun { .. }, _) => {}

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
                    (None, None) => fx.push(Effect::SearchPayments),
                }
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
                Input::PollDone(Err(f)) | Input::PaymentDone(Err(f)) | Input::SearchDone(Err(f)),
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

    /// A poll answer for a live intent.
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
        let next_poll = now + Self::poll_gap_ms(ctx);
        match remote.phase {
            Phase::Open | Phase::Unknown => {
                if remote.phase == Phase::Open
                    && *cancel == CancelMark::None
                    && now - *sent_ms >= ctx.timing.terminal_timeout_ms
                {
                    *cancel = CancelMark::Timeout;
                    fx.push(Effect::CancelRemote {
                        intent_id: intent_id.clone(),
                    });
                    self.next_at_ms = None;
                    return;
                }
                self.next_at_ms = Some(next_poll);
            }
            Phase::OnTerminal => {
                if *seen == Remote::Open {
                    *seen = Remote::OnTerminal;
                    fx.push(Effect::Emit(Emit::state(State::OnTerminal)));
                }
                self.next_at_ms = Some(next_poll);
            }
            Phase::Processing => {
                if *seen != Remote::Processing {
                    *seen = Remote::Processing;
                    fx.push(Effect::Emit(Emit::state(State::Processing)));
                }
                self.next_at_ms = Some(next_poll);
            }
            Phase::Ended => {
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
            Phase::Canceled => {
                let state = if *cancel == CancelMark::Timeout {
                    State::Expired
                } else {
                    State::Canceled
                };
                let answer = *cancel == CancelMark::Station;
                self.finish(Emit::state(state), fx);
                if answer {
                    fx.push(Effect::CancelAnswer(Ok(())));
                }
            }
            Phase::Error => {
                self.finish(
                    Emit::failed(ErrorCode::TerminalError, "the terminal reported an error"),
                    fx,
                );
            }
            Phase::Abandoned => {
                self.finish(Emit::state(State::Expired), fx);
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
