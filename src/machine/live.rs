//! What both machines share: the timing rules and context they step with (`Timing`,
//! `Ctx`), the station event they emit (`Emit`), and the handling of a live intent on a
//! terminal (a charge's payment intent, or a refund's refund intent): what a poll answer
//! means (`on_remote`: progress to report, the terminal timeout's cancel, the end), how
//! the station was told (`Remote`) and why the agent cancels (`CancelMark`). Pure.
//! `Remote`, `CancelMark` and `PaymentSeen` are stored inside both machines' stages
//! (`store::record` format): their variants are append-only.

use serde::{Deserialize, Serialize};

use crate::domain::outcome::{ErrorCode, ResolvedBy, State, WaitReason};
use crate::domain::remote::Phase;

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
    /// How long after a send began reconcile waits before it lists: a create that
    /// reached Mercado Pago shows in the list by then.
    pub const RECONCILE_SETTLE_MS: i64 = 2_000;
    /// An intent created this long before our send began still counts (clock skew).
    pub const RECONCILE_SKEW_MS: i64 = 120_000;
    /// Rounds of "re-create answered 409, reconcile found nothing" before giving up.
    pub const RECONCILE_MAX_ROUNDS: u32 = 5;
}

/// What the machine knows besides the input: the time, and a random number for jitter.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub now_ms: i64,
    /// Uniform in [0, 1): the driver's jitter source.
    pub jitter: f64,
    pub timing: Timing,
    /// The backend's creates carry an idempotency key (generated with the request,
    /// stored before the first send, reused on every retry): a retry cannot make a
    /// second charge. False for payment intents, which have no key.
    pub idempotent_create: bool,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentSeen {
    pub id: String,
    pub status: String,
    pub status_detail: Option<String>,
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
    pub(crate) fn waiting(reason: WaitReason) -> Emit {
        Emit {
            state: State::Waiting,
            reason: Some(reason),
            error: None,
            resolved_by: None,
        }
    }
    pub fn failed(code: ErrorCode, message: impl Into<String>) -> Emit {
        Emit {
            state: State::Failed,
            reason: None,
            error: Some((code, message.into())),
            resolved_by: None,
        }
    }
}

/// The gap between two polls of one intent: `point.poll_interval`, at least the API's
/// one GET per second per intent.
pub fn poll_gap_ms(ctx: &Ctx) -> i64 {
    ctx.timing.poll_interval_ms.max(Timing::MIN_POLL_GAP_MS)
}

/// What a poll answer means for a live intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveNext {
    /// Still live: poll again at `next_at_ms`, after telling the station `emit`.
    Poll {
        emit: Option<State>,
        next_at_ms: i64,
    },
    /// OPEN for `terminal_timeout` since it was sent: the cancel is marked (`Timeout`);
    /// cancel the intent now, and stop polling until the cancel is answered.
    CancelForTimeout,
    /// It ended: its payment decides. `seen` is what the station was told last.
    Ended { seen: Remote },
    /// It is final without a payment to look up: emit this, and answer a station's
    /// cancel `done` when `answer_cancel`.
    Final { emit: Emit, answer_cancel: bool },
}

/// A poll answer (`phase`) for a live intent sent at `sent_ms`: updates what the station
/// was told (`seen`) and the cancel mark, and says what follows. The charge and refund
/// machines differ only in what an ended intent leads to.
pub fn on_remote(
    phase: &Phase,
    seen: &mut Remote,
    sent_ms: i64,
    cancel: &mut CancelMark,
    ctx: &Ctx,
) -> LiveNext {
    let now = ctx.now_ms;
    let next_at_ms = now + poll_gap_ms(ctx);
    match phase {
        Phase::Open | Phase::Unknown => {
            if *phase == Phase::Open
                && *cancel == CancelMark::None
                && now - sent_ms >= ctx.timing.terminal_timeout_ms
            {
                *cancel = CancelMark::Timeout;
                return LiveNext::CancelForTimeout;
            }
            LiveNext::Poll {
                emit: None,
                next_at_ms,
            }
        }
        Phase::OnTerminal => {
            let emit = (*seen == Remote::Open).then(|| {
                *seen = Remote::OnTerminal;
                State::OnTerminal
            });
            LiveNext::Poll { emit, next_at_ms }
        }
        Phase::Processing => {
            let emit = (*seen != Remote::Processing).then(|| {
                *seen = Remote::Processing;
                State::Processing
            });
            LiveNext::Poll { emit, next_at_ms }
        }
        Phase::Ended => LiveNext::Ended { seen: *seen },
        Phase::Canceled => LiveNext::Final {
            emit: Emit::state(if *cancel == CancelMark::Timeout {
                State::Expired
            } else {
                State::Canceled
            }),
            answer_cancel: *cancel == CancelMark::Station,
        },
        Phase::Error => LiveNext::Final {
            emit: Emit::failed(ErrorCode::TerminalError, "the terminal reported an error"),
            answer_cancel: false,
        },
        Phase::Abandoned => LiveNext::Final {
            emit: Emit::state(State::Expired),
            answer_cancel: false,
        },
    }
}
