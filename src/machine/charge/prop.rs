//! Property test (F2): random sequences of inputs, API outcomes and restarts against a
//! model of Mercado Pago, checking the machine's promises after every step:
//!
//! - at most one intent ever exists remotely for the charge (however creates failed,
//!   whatever crashed, whatever reconcile saw);
//! - no create leaves at or after the deadline;
//! - `approved` only when the remote payment is approved for the charge's amount, or an
//!   operator said so;
//! - `expired` never while an intent that is not ended exists;
//! - nothing is emitted after a final state, and only the contract's charge states are;
//! - once the API behaves (no more faults or crashes), the charge reaches a final state or
//!   `needs_attention` (which an operator can end).
//!
//! `PROPTEST_CASES` sets the number of cases (10,000 by default, the CI figure).

use proptest::prelude::*;

use super::*;
use crate::domain::remote::{Payment, Phase, RemoteCharge};

const AMOUNT: Cents = Cents(1500);
const DEADLINE: i64 = 60_000;

fn timing() -> Timing {
    Timing {
        poll_interval_ms: 1_000,
        terminal_timeout_ms: 30_000,
        confirm_window_ms: 10_000,
        confirm_window_max_ms: 300_000,
    }
}

/// Mercado Pago as far as one charge can see it.
#[derive(Debug, Clone)]
struct Intent {
    phase: Phase,
    created_ms: i64,
    /// Payment status once the intent ended (`approved`, `rejected`, `pending`).
    payment: Option<&'static str>,
}

#[derive(Debug)]
struct World {
    intents: Vec<Intent>,
    list_served: bool,
    /// API calls the machine asked for and that have not been answered yet.
    pending: Vec<Effect>,
    now: i64,
    final_state: Option<State>,
    resolved_approved_by_operator: bool,
    /// An operator ended it: their word stands, whatever the API shows.
    resolved_by_operator: bool,
    emitted: Vec<State>,
}

impl World {
    fn remote(&self, i: usize) -> RemoteCharge {
        let it = &self.intents[i];
        RemoteCharge {
            id: format!("intent-{i}"),
            phase: it.phase.clone(),
            raw_state: String::new(),
            terminal: Some("T".into()),
            amount: Some(AMOUNT),
            external_reference: Some("ref".into()),
            payment_id: it.payment.map(|_| format!("pay-{i}")),
        }
    }

    fn payment(&self, i: usize) -> Payment {
        Payment {
            id: format!("pay-{i}"),
            status: self.intents[i].payment.unwrap_or("pending").into(),
            status_detail: None,
            amount: Some(AMOUNT),
            refunded: None,
            external_reference: Some("ref".into()),
        }
    }

    fn open_intent(&self) -> Option<usize> {
        self.intents
            .iter()
            .position(|i| matches!(i.phase, Phase::Open | Phase::OnTerminal | Phase::Processing))
    }

    fn index(id: &str) -> usize {
        id.trim_start_matches("intent-")
            .trim_start_matches("pay-")
            .parse()
            .unwrap_or(usize::MAX)
    }

    /// Check the promises after one step's effects.
    fn check(&mut self, c: &Charge, fx: &[Effect]) -> Result<(), TestCaseError> {
        for e in fx {
            match e {
                Effect::Create => {
                    prop_assert!(
                        self.now < c.deadline_ms,
                        "create at {} ≥ deadline",
                        self.now
                    );
                }
                Effect::Emit(em) => {
                    prop_assert!(
                        self.final_state.is_none(),
                        "emit {:?} after final",
                        em.state
                    );
                    prop_assert!(
                        matches!(
                            em.state,
                            State::Accepted
                                | State::Waiting
                                | State::Sent
                                | State::OnTerminal
                                | State::Processing
                                | State::NeedsAttention
                                | State::Approved
                                | State::Declined
                                | State::Canceled
                                | State::Expired
                                | State::Failed
                        ),
                        "not a charge state: {:?}",
                        em.state
                    );
                    if em.state == State::Approved {
                        let paid = self.intents.iter().any(|i| i.payment == Some("approved"));
                        prop_assert!(
                            paid || self.resolved_approved_by_operator,
                            "approved without an approved payment"
                        );
                    }
                    if em.state == State::Expired {
                        prop_assert!(
                            self.open_intent().is_none(),
                            "expired while an intent is open: {:?}",
                            self.intents
                        );
                    }
                    if em.state.is_final() {
                        self.final_state = Some(em.state);
                    }
                    self.emitted.push(em.state);
                }
                _ => {}
            }
        }
        prop_assert!(self.intents.len() <= 1, "{} intents", self.intents.len());
        Ok(())
    }

    /// Answer the oldest pending call. `fault` picks how (0 = answer well).
    fn answer(&mut self, fault: u8) -> Option<Input> {
        if self.pending.is_empty() {
            return None;
        }
        let e = self.pending.remove(0);
        let unreachable = Failure::Unreachable {
            retry_after_ms: None,
            rate_limited: false,
        };
        Some(match e {
            Effect::Create => match (fault % 5, self.open_intent()) {
                (_, Some(_)) => Input::CreateDone(Err(Failure::Conflict)),
                (0 | 1, None) => {
                    self.intents.push(Intent {
                        phase: Phase::Open,
                        created_ms: self.now,
                        payment: None,
                    });
                    Input::CreateDone(Ok(self.remote(self.intents.len() - 1)))
                }
                (2, None) => {
                    // Committed, answer lost.
                    self.intents.push(Intent {
                        phase: Phase::Open,
                        created_ms: self.now,
                        payment: None,
                    });
                    Input::CreateDone(Err(Failure::Ambiguous))
                }
                (3, None) => Input::CreateDone(Err(Failure::Ambiguous)),
                _ => Input::CreateDone(Err(unreachable)),
            },
            Effect::Poll { intent_id } => {
                let i = Self::index(&intent_id);
                if fault % 4 == 3 || i >= self.intents.len() {
                    Input::PollDone(Err(unreachable))
                } else {
                    Input::PollDone(Ok(self.remote(i)))
                }
            }
            Effect::LookupPayment { payment_id } => {
                let i = Self::index(&payment_id);
                if fault % 4 == 3 || i >= self.intents.len() {
                    Input::PaymentDone(Err(unreachable))
                } else {
                    Input::PaymentDone(Ok(self.payment(i)))
                }
            }
            Effect::SearchPayments => {
                let found = (0..self.intents.len())
                    .filter(|i| self.intents[*i].payment.is_some())
                    .map(|i| self.payment(i))
                    .collect();
                Input::SearchDone(Ok(found))
            }
            Effect::ListIntents { .. } => {
                if fault % 4 == 3 {
                    Input::ListDone(Err(unreachable))
                } else if !self.list_served {
                    Input::ListDone(Ok(None))
                } else {
                    let c = (0..self.intents.len())
                        .map(|i| Candidate {
                            remote: self.remote(i),
                            created_ms: Some(self.intents[i].created_ms),
                            device_matches: true,
                        })
                        .collect();
                    Input::ListDone(Ok(Some(c)))
                }
            }
            Effect::CancelRemote { intent_id } => {
                let i = Self::index(&intent_id);
                match self.intents.get_mut(i) {
                    Some(it) if it.phase == Phase::Open && fault % 4 != 3 => {
                        it.phase = Phase::Canceled;
                        Input::CancelDone(Ok(()))
                    }
                    Some(_) if fault % 4 == 3 => Input::CancelDone(Err(unreachable)),
                    _ => Input::CancelDone(Err(Failure::Conflict)),
                }
            }
            _ => return None,
        })
    }

    /// The terminal moves the open intent on by one step.
    fn terminal_step(&mut self, choice: u8) {
        if let Some(i) = self.open_intent() {
            let it = &mut self.intents[i];
            it.phase = match (it.phase.clone(), choice % 8) {
                (Phase::Open, 0..=4) => Phase::OnTerminal,
                (Phase::Open, 5) => Phase::Abandoned,
                (Phase::Open, _) => Phase::Open,
                (Phase::OnTerminal, 0..=5) => Phase::Processing,
                (Phase::OnTerminal, 6) => Phase::Canceled,
                (Phase::OnTerminal, _) => Phase::Error,
                (Phase::Processing, _) => Phase::Ended,
                (p, _) => p,
            };
            if it.phase == Phase::Ended {
                it.payment = Some(match choice % 3 {
                    0 => "approved",
                    1 => "rejected",
                    _ => "pending",
                });
            }
        }
    }
}

fn run(list_served: bool, steps: &[(u8, u8, u16)]) -> Result<(), TestCaseError> {
    let mut c = Charge::new(AMOUNT, DEADLINE);
    let mut w = World {
        intents: Vec::new(),
        list_served,
        pending: Vec::new(),
        now: 0,
        final_state: None,
        resolved_approved_by_operator: false,
        resolved_by_operator: false,
        emitted: Vec::new(),
    };
    let ctx = |now| Ctx {
        now_ms: now,
        jitter: 0.5,
        timing: timing(),
        idempotent_create: false,
    };
    let feed = |c: &mut Charge, w: &mut World, input: Input| -> Result<(), TestCaseError> {
        if let Input::Resolve { approved } = input {
            if matches!(c.stage, Stage::NeedsAttention { .. }) {
                w.resolved_approved_by_operator |= approved;
                w.resolved_by_operator = true;
            }
        }
        let fx = c.step(input, &ctx(w.now));
        w.check(c, &fx)?;
        for e in fx {
            if matches!(
                e,
                Effect::Create
                    | Effect::Poll { .. }
                    | Effect::LookupPayment { .. }
                    | Effect::SearchPayments
                    | Effect::ListIntents { .. }
                    | Effect::CancelRemote { .. }
            ) {
                w.pending.push(e);
            }
        }
        Ok(())
    };

    for &(action, param, dt) in steps {
        w.now += i64::from(dt);
        match action % 10 {
            0 | 1 => feed(&mut c, &mut w, Input::Wake)?,
            2 => feed(&mut c, &mut w, Input::MayStart)?,
            3 | 4 => {
                if let Some(input) = w.answer(param) {
                    feed(&mut c, &mut w, input)?;
                }
            }
            5 => w.terminal_step(param),
            6 => {
                // A crash: calls in flight vanish; a create in flight may have committed.
                if w.pending.contains(&Effect::Create)
                    && param % 2 == 0
                    && w.open_intent().is_none()
                {
                    w.intents.push(Intent {
                        phase: Phase::Open,
                        created_ms: w.now,
                        payment: None,
                    });
                }
                w.pending.clear();
                feed(&mut c, &mut w, Input::Restarted)?;
            }
            7 => feed(&mut c, &mut w, Input::CancelRequested)?,
            8 => {
                if param % 8 == 0 {
                    feed(&mut c, &mut w, Input::ClockInDoubt)?;
                } else {
                    feed(&mut c, &mut w, Input::TerminalBusy)?;
                }
            }
            _ => {
                if param % 16 == 0 {
                    feed(
                        &mut c,
                        &mut w,
                        Input::Resolve {
                            approved: param % 32 == 0,
                        },
                    )?;
                } else {
                    feed(&mut c, &mut w, Input::Wake)?;
                }
            }
        }
    }

    // Then the world behaves: answers come, the terminal finishes, time moves.
    for round in 0..2_000 {
        if w.final_state.is_some() || matches!(c.stage, Stage::NeedsAttention { .. }) {
            break;
        }
        w.now = w.now.max(c.next_at_ms.unwrap_or(w.now)) + 1;
        if round % 3 == 0 {
            w.terminal_step(0);
        }
        if let Some(input) = w.answer(0) {
            feed(&mut c, &mut w, input)?;
        }
        feed(&mut c, &mut w, Input::MayStart)?;
        feed(&mut c, &mut w, Input::Wake)?;
    }
    prop_assert!(
        w.final_state.is_some() || matches!(c.stage, Stage::NeedsAttention { .. }),
        "did not settle: {:?} (emitted {:?}, remote {:?})",
        c.stage,
        w.emitted,
        w.intents
    );
    // Calls still out are answered (a create may commit now): a charge that ended
    // saying no money was taken must leave no live intent and no approved payment.
    while let Some(input) = w.answer(0) {
        feed(&mut c, &mut w, input)?;
    }
    if let Some(end) = w.final_state {
        if end != State::Approved && !w.resolved_by_operator {
            prop_assert!(
                w.open_intent().is_none()
                    && !w.intents.iter().any(|i| i.payment == Some("approved")),
                "{:?}, yet Mercado Pago holds {:?}",
                end,
                w.intents
            );
        }
    }
    // needs_attention always ends when an operator resolves it.
    if w.final_state.is_none() {
        feed(&mut c, &mut w, Input::Resolve { approved: false })?;
        prop_assert!(w.final_state.is_some());
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn random_inputs_and_restarts_keep_every_promise(
        list_served in any::<bool>(),
        steps in proptest::collection::vec((any::<u8>(), any::<u8>(), 0u16..5_000), 1..120),
    ) {
        run(list_served, &steps)?;
    }
}

/// The checker itself catches a broken machine: a second create after an ambiguous one
/// is a double charge (negative control for the property above).
#[test]
fn the_model_sees_a_double_create() {
    let mut w = World {
        intents: Vec::new(),
        list_served: true,
        pending: vec![Effect::Create],
        now: 10,
        final_state: None,
        resolved_approved_by_operator: false,
        resolved_by_operator: false,
        emitted: Vec::new(),
    };
    let c = Charge::new(AMOUNT, DEADLINE);
    // Committed, answer lost; a blind re-send is answered by a second commit.
    let _ = w.answer(2);
    w.intents.push(w.intents[0].clone());
    assert!(w.check(&c, &[Effect::Create]).is_err());
}
