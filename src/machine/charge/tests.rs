//! Transition tests of the charge state machine, one behaviour per test.

use super::*;
use crate::domain::remote::{Payment, Phase, RemoteCharge};

const TIMING: Timing = Timing {
    poll_interval_ms: 2_000,
    terminal_timeout_ms: 300_000,
    confirm_window_ms: 60_000,
    confirm_window_max_ms: 86_400_000,
};

fn ctx(now_ms: i64) -> Ctx {
    Ctx {
        now_ms,
        jitter: 0.5,
        timing: TIMING,
        idempotent_create: false,
    }
}

fn remote(phase: Phase, payment_id: Option<&str>) -> RemoteCharge {
    RemoteCharge {
        id: "intent-1".into(),
        phase,
        raw_state: String::new(),
        terminal: Some("T1".into()),
        amount: Some(Cents(1500)),
        external_reference: Some("ref".into()),
        payment_id: payment_id.map(str::to_string),
    }
}

fn payment(status: &str, amount: u64) -> Payment {
    Payment {
        id: "99".into(),
        status: status.into(),
        status_detail: None,
        amount: Some(Cents(amount)),
        refunded: None,
        external_reference: None,
    }
}

fn emitted(fx: &[Effect]) -> Vec<State> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Emit(em) => Some(em.state),
            _ => None,
        })
        .collect()
}

/// A charge that is live (intent OPEN) at t=1000.
fn live() -> Charge {
    let mut c = Charge::new(Cents(1500), 120_000);
    assert_eq!(c.step(Input::MayStart, &ctx(1_000)), vec![Effect::Create]);
    let fx = c.step(
        Input::CreateDone(Ok(remote(Phase::Open, None))),
        &ctx(1_100),
    );
    assert_eq!(emitted(&fx), vec![State::Sent]);
    c
}

#[test]
fn a_queued_charge_is_created_once_when_its_terminal_is_free() {
    let mut c = Charge::new(Cents(1500), 120_000);
    let fx = c.step(Input::MayStart, &ctx(1_000));
    assert_eq!(fx, vec![Effect::Create]);
    assert!(matches!(c.stage, Stage::SendBegun { at_ms: 1_000 }));
    // Another MayStart while the send is out creates nothing more.
    assert!(c.step(Input::MayStart, &ctx(1_001)).is_empty());
}

#[test]
fn a_charge_past_its_deadline_is_expired_and_never_sent() {
    let mut c = Charge::new(Cents(1500), 120_000);
    let fx = c.step(Input::MayStart, &ctx(120_000));
    assert_eq!(emitted(&fx), vec![State::Expired]);
    assert!(!fx.contains(&Effect::Create));
    assert!(c.is_final());
}

#[test]
fn a_charge_behind_a_busy_terminal_is_told_waiting_once() {
    let mut c = Charge::new(Cents(1500), 120_000);
    let fx = c.step(Input::TerminalBusy, &ctx(1_000));
    assert_eq!(emitted(&fx), vec![State::Waiting]);
    assert!(c.step(Input::TerminalBusy, &ctx(2_000)).is_empty());
}

fn candidate(amount: u64, device_matches: bool, created_ms: Option<i64>) -> Candidate {
    let mut r = remote(Phase::Open, None);
    r.amount = Some(Cents(amount));
    Candidate {
        remote: r,
        created_ms,
        device_matches,
    }
}

/// A charge whose create failed ambiguously at t=2000 (sent at t=1000).
fn ambiguous() -> Charge {
    let mut c = Charge::new(Cents(1500), 120_000);
    c.step(Input::MayStart, &ctx(1_000));
    let fx = c.step(Input::CreateDone(Err(Failure::Ambiguous)), &ctx(2_000));
    assert!(fx.is_empty(), "reconcile is internal: {fx:?}");
    assert!(matches!(c.stage, Stage::Reconciling { .. }));
    c
}

fn list(c: &mut Charge, t: i64) {
    let fx = c.step(Input::Wake, &ctx(t));
    assert_eq!(fx, vec![Effect::ListIntents { from_ms: 1_000 }]);
}

#[test]
fn an_ambiguous_create_reconciles_and_never_resends_before_the_list_answers() {
    let mut c = ambiguous();
    // Nothing leaves before the settle time; then the list, never a create.
    assert!(c.step(Input::Wake, &ctx(2_500)).is_empty());
    assert!(!c
        .step(Input::MayStart, &ctx(2_500))
        .contains(&Effect::Create));
    list(&mut c, 3_000);
    // The list fails: retried with backoff, still no create, even past the deadline.
    for t in [4_000, 130_000] {
        let fx = c.step(
            Input::ListDone(Err(Failure::Unreachable {
                retry_after_ms: None,
                rate_limited: false,
            })),
            &ctx(t),
        );
        assert!(!fx.contains(&Effect::Create));
        assert!(!emitted(&fx).contains(&State::Expired));
        let at = c.next_at_ms.expect("a retry is scheduled");
        assert_eq!(
            c.step(Input::Wake, &ctx(at)),
            vec![Effect::ListIntents { from_ms: 1_000 }]
        );
    }
}

#[test]
fn reconcile_adopts_the_one_matching_intent() {
    let mut c = ambiguous();
    list(&mut c, 3_000);
    let fx = c.step(
        Input::ListDone(Ok(Some(vec![candidate(1500, true, Some(1_500))]))),
        &ctx(3_100),
    );
    assert_eq!(emitted(&fx), vec![State::Sent]);
    assert!(!fx.contains(&Effect::Create));
    assert_eq!(c.intent_id(), Some("intent-1"));
    assert!(matches!(c.stage, Stage::Live { .. }));
}

#[test]
fn reconcile_with_no_intent_creates_once_more_with_the_same_reference() {
    let mut c = ambiguous();
    list(&mut c, 3_000);
    let fx = c.step(Input::ListDone(Ok(Some(vec![]))), &ctx(3_100));
    assert_eq!(fx, vec![Effect::Create]);
    assert_eq!(c.sends, 2);
    // That re-create answered 409: ours may have committed late: reconcile again.
    let fx = c.step(Input::CreateDone(Err(Failure::Conflict)), &ctx(3_200));
    assert!(!fx.contains(&Effect::Create));
    assert!(matches!(c.stage, Stage::Reconciling { .. }));
}

#[test]
fn reconcile_with_no_intent_after_the_deadline_expires_without_sending() {
    let mut c = ambiguous();
    list(&mut c, 3_000);
    let fx = c.step(Input::ListDone(Ok(Some(vec![]))), &ctx(120_000));
    assert_eq!(emitted(&fx), vec![State::Expired]);
    assert!(!fx.contains(&Effect::Create));
}

#[test]
fn reconcile_that_cannot_decide_needs_attention() {
    // Two intents with our reference, one of another amount, one on another device, one
    // older than the send: none is adopted and nothing is created.
    let cases = vec![
        vec![
            candidate(1500, true, Some(1_500)),
            candidate(1500, true, Some(1_600)),
        ],
        vec![candidate(999, true, Some(1_500))],
        vec![candidate(1500, false, Some(1_500))],
        vec![candidate(
            1500,
            true,
            Some(1_000 - Timing::RECONCILE_SKEW_MS - 1),
        )],
        vec![candidate(1500, true, None)],
    ];
    for cands in cases {
        let mut c = ambiguous();
        list(&mut c, 3_000);
        let fx = c.step(Input::ListDone(Ok(Some(cands.clone()))), &ctx(3_100));
        assert_eq!(emitted(&fx), vec![State::NeedsAttention], "{cands:?}");
        assert!(!fx.contains(&Effect::Create));
    }
}

#[test]
fn reconcile_without_the_list_endpoint_needs_attention_then_keeps_looking() {
    let mut c = ambiguous();
    list(&mut c, 3_000);
    let fx = c.step(Input::ListDone(Ok(None)), &ctx(3_100));
    assert_eq!(emitted(&fx), vec![State::NeedsAttention]);
    // It alternates the payment search and the list, and never creates.
    let mut seen = Vec::new();
    let mut t = 3_100;
    for _ in 0..4 {
        t = c.next_at_ms.expect("keeps looking");
        let fx = c.step(Input::Wake, &ctx(t));
        assert!(!fx.contains(&Effect::Create));
        seen.extend(fx.clone());
        match fx.as_slice() {
            [Effect::SearchPayments] => {
                c.step(Input::SearchDone(Ok(vec![])), &ctx(t + 10));
            }
            [Effect::ListIntents { .. }] => {
                c.step(Input::ListDone(Ok(None)), &ctx(t + 10));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(seen.contains(&Effect::SearchPayments));
    assert!(seen.iter().any(|e| matches!(e, Effect::ListIntents { .. })));
    // A later list that finds ours resolves it by lookup.
    let at = c.next_at_ms.expect("keeps looking");
    let _ = t;
    let mut fx = c.step(Input::Wake, &ctx(at));
    if fx == vec![Effect::SearchPayments] {
        c.step(Input::SearchDone(Ok(vec![])), &ctx(at + 10));
        fx = c.step(Input::Wake, &ctx(c.next_at_ms.unwrap()));
    }
    assert!(matches!(fx.as_slice(), [Effect::ListIntents { .. }]));
    let mut r = remote(Phase::Canceled, None);
    r.amount = Some(Cents(1500));
    let fx = c.step(
        Input::ListDone(Ok(Some(vec![Candidate {
            remote: r,
            created_ms: Some(1_200),
            device_matches: true,
        }]))),
        &ctx(at + 100_000),
    );
    assert_eq!(emitted(&fx), vec![State::Canceled]);
}

#[test]
fn a_crash_after_the_write_ahead_reconciles_not_a_second_create() {
    let mut c = Charge::new(Cents(1500), 120_000);
    c.step(Input::MayStart, &ctx(1_000));
    let fx = c.step(Input::Restarted, &ctx(5_000));
    assert!(fx.is_empty());
    assert!(matches!(c.stage, Stage::Reconciling { .. }));
    assert_eq!(
        c.step(Input::Wake, &ctx(5_000)),
        vec![Effect::ListIntents { from_ms: 1_000 }]
    );
}

#[test]
fn with_an_idempotency_key_an_ambiguous_create_is_retried_with_the_same_key() {
    let key_ctx = |t| Ctx {
        idempotent_create: true,
        ..ctx(t)
    };
    let mut c = Charge::new(Cents(1500), 120_000);
    assert_eq!(
        c.step(Input::MayStart, &key_ctx(1_000)),
        vec![Effect::Create]
    );
    assert!(c
        .step(Input::CreateDone(Err(Failure::Ambiguous)), &key_ctx(2_000))
        .is_empty());
    let at = c.next_at_ms.expect("retry scheduled");
    assert_eq!(c.step(Input::Wake, &key_ctx(at)), vec![Effect::Create]);
    // Past the deadline it does not retry: it reconciles.
    c.step(
        Input::CreateDone(Err(Failure::Ambiguous)),
        &key_ctx(119_000),
    );
    let fx = c.step(Input::Wake, &key_ctx(121_000));
    assert!(!fx.contains(&Effect::Create));
}

#[test]
fn when_the_clock_is_in_doubt_queued_charges_expire_and_sent_ones_do_not() {
    let mut q = Charge::new(Cents(1500), 120_000);
    assert_eq!(
        emitted(&q.step(Input::ClockInDoubt, &ctx(1_000))),
        vec![State::Expired]
    );
    let mut l = live();
    assert!(l.step(Input::ClockInDoubt, &ctx(1_000)).is_empty());
    assert!(matches!(l.stage, Stage::Live { .. }));
}

#[test]
fn a_connect_failure_requeues_with_backoff_and_reports_api_unreachable() {
    let mut c = Charge::new(Cents(1500), 120_000);
    c.step(Input::MayStart, &ctx(1_000));
    let fx = c.step(
        Input::CreateDone(Err(Failure::Unreachable {
            retry_after_ms: None,
            rate_limited: false,
        })),
        &ctx(1_500),
    );
    assert!(fx.contains(&Effect::ReleaseTerminal));
    assert_eq!(emitted(&fx), vec![State::Waiting]);
    assert!(matches!(
        c.stage,
        Stage::Queued {
            reason: Some(WaitReason::ApiUnreachable)
        }
    ));
    // Not before the backoff.
    assert!(c.step(Input::MayStart, &ctx(1_501)).is_empty());
    let at = c.next_at_ms.expect("a retry is scheduled");
    assert_eq!(c.step(Input::MayStart, &ctx(at)), vec![Effect::Create]);
}

#[test]
fn retry_after_is_honoured_on_a_429() {
    let mut c = Charge::new(Cents(1500), 120_000);
    c.step(Input::MayStart, &ctx(1_000));
    c.step(
        Input::CreateDone(Err(Failure::Unreachable {
            retry_after_ms: Some(7_000),
            rate_limited: true,
        })),
        &ctx(1_000),
    );
    assert!(c.next_at_ms.expect("scheduled") >= 8_000);
    assert!(matches!(
        c.stage,
        Stage::Queued {
            reason: Some(WaitReason::RateLimited)
        }
    ));
}

#[test]
fn finished_is_not_approved_until_the_payment_is_confirmed() {
    let mut c = live();
    let fx = c.step(
        Input::PollDone(Ok(remote(Phase::Ended, Some("99")))),
        &ctx(3_000),
    );
    assert!(emitted(&fx).is_empty());
    assert_eq!(
        fx,
        vec![Effect::LookupPayment {
            payment_id: "99".into()
        }]
    );
    let fx = c.step(
        Input::PaymentDone(Ok(payment("approved", 1500))),
        &ctx(3_100),
    );
    assert_eq!(emitted(&fx), vec![State::Approved]);
    assert!(fx.contains(&Effect::ReleaseTerminal));
}

#[test]
fn an_approved_payment_of_another_amount_is_not_approved() {
    let mut c = live();
    c.step(
        Input::PollDone(Ok(remote(Phase::Ended, Some("99")))),
        &ctx(3_000),
    );
    let fx = c.step(
        Input::PaymentDone(Ok(payment("approved", 1400))),
        &ctx(3_100),
    );
    assert!(!emitted(&fx).contains(&State::Approved));
    // After the confirm window it needs attention.
    let fx = c.step(Input::Wake, &ctx(3_000 + TIMING.confirm_window_ms));
    assert_eq!(emitted(&fx), vec![State::NeedsAttention]);
}

#[test]
fn rejected_and_reversed_payments_are_declined() {
    for status in ["rejected", "cancelled", "refunded", "charged_back"] {
        let mut c = live();
        c.step(
            Input::PollDone(Ok(remote(Phase::Ended, Some("99")))),
            &ctx(3_000),
        );
        let fx = c.step(Input::PaymentDone(Ok(payment(status, 1500))), &ctx(3_100));
        assert_eq!(emitted(&fx), vec![State::Declined], "{status}");
    }
}

#[test]
fn an_undecided_payment_needs_attention_after_the_confirm_window() {
    let mut c = live();
    c.step(
        Input::PollDone(Ok(remote(Phase::Ended, Some("99")))),
        &ctx(3_000),
    );
    let fx = c.step(
        Input::PaymentDone(Ok(payment("in_process", 1500))),
        &ctx(3_100),
    );
    assert!(emitted(&fx).is_empty());
    let fx = c.step(
        Input::PaymentDone(Ok(payment("in_process", 1500))),
        &ctx(3_000 + TIMING.confirm_window_ms),
    );
    assert_eq!(emitted(&fx), vec![State::NeedsAttention]);
    // A later lookup that finds it approved resolves it.
    let fx = c.step(
        Input::PaymentDone(Ok(payment("approved", 1500))),
        &ctx(200_000),
    );
    assert_eq!(emitted(&fx), vec![State::Approved]);
}

#[test]
fn terminal_states_map_as_the_contract_says() {
    for (phase, state) in [
        (Phase::Canceled, State::Canceled),
        (Phase::Error, State::Failed),
        (Phase::Abandoned, State::Expired),
    ] {
        let mut c = live();
        let fx = c.step(
            Input::PollDone(Ok(remote(phase.clone(), None))),
            &ctx(3_000),
        );
        assert_eq!(emitted(&fx), vec![state], "{phase:?}");
    }
    let mut c = live();
    assert_eq!(
        emitted(&c.step(
            Input::PollDone(Ok(remote(Phase::OnTerminal, None))),
            &ctx(3_000)
        )),
        vec![State::OnTerminal]
    );
    assert_eq!(
        emitted(&c.step(
            Input::PollDone(Ok(remote(Phase::Processing, None))),
            &ctx(4_000)
        )),
        vec![State::Processing]
    );
    assert!(emitted(&c.step(
        Input::PollDone(Ok(remote(Phase::Processing, None))),
        &ctx(5_000)
    ))
    .is_empty());
}

#[test]
fn an_intent_still_open_after_the_terminal_timeout_is_canceled_and_expired() {
    let mut c = live();
    let fx = c.step(
        Input::PollDone(Ok(remote(Phase::Open, None))),
        &ctx(1_100 + TIMING.terminal_timeout_ms),
    );
    assert_eq!(
        fx,
        vec![Effect::CancelRemote {
            intent_id: "intent-1".into()
        }]
    );
    let fx = c.step(Input::CancelDone(Ok(())), &ctx(400_000));
    assert_eq!(emitted(&fx), vec![State::Expired]);
}

#[test]
fn a_station_cancel_of_an_open_intent_cancels_it_through_the_api() {
    let mut c = live();
    let fx = c.step(Input::CancelRequested, &ctx(2_000));
    assert_eq!(
        fx,
        vec![Effect::CancelRemote {
            intent_id: "intent-1".into()
        }]
    );
    let fx = c.step(Input::CancelDone(Ok(())), &ctx(2_100));
    assert_eq!(emitted(&fx), vec![State::Canceled]);
    assert!(fx.contains(&Effect::CancelAnswer(Ok(()))));
}

#[test]
fn a_cancel_that_loses_the_race_to_the_terminal_is_not_cancelable() {
    let mut c = live();
    c.step(Input::CancelRequested, &ctx(2_000));
    let fx = c.step(Input::CancelDone(Err(Failure::Conflict)), &ctx(2_100));
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::CancelAnswer(Err((ErrorCode::NotCancelable, _))))));
    assert!(!c.is_final());
}

#[test]
fn a_cancel_of_a_queued_charge_is_local() {
    let mut c = Charge::new(Cents(1500), 120_000);
    let fx = c.step(Input::CancelRequested, &ctx(1_000));
    assert_eq!(emitted(&fx), vec![State::Canceled]);
    assert!(fx.contains(&Effect::CancelAnswer(Ok(()))));
}

#[test]
fn an_operator_resolves_needs_attention() {
    let mut c = Charge::new(Cents(1500), 120_000);
    c.step(Input::MayStart, &ctx(1_000));
    c.step(Input::CreateDone(Err(Failure::Ambiguous)), &ctx(2_000));
    c.step(Input::Wake, &ctx(3_000));
    c.step(Input::ListDone(Ok(None)), &ctx(3_000));
    let fx = c.step(Input::Resolve { approved: true }, &ctx(3_000));
    assert_eq!(emitted(&fx), vec![State::Approved]);
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Emit(Emit {
            resolved_by: Some(ResolvedBy::Operator),
            ..
        })
    )));
}

#[test]
fn an_api_refusal_fails_the_charge_with_api_refused() {
    let mut c = Charge::new(Cents(1500), 120_000);
    c.step(Input::MayStart, &ctx(1_000));
    let fx = c.step(
        Input::CreateDone(Err(Failure::Refused {
            message: "bad".into(),
        })),
        &ctx(1_100),
    );
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Emit(Emit {
            state: State::Failed,
            error: Some((ErrorCode::ApiRefused, _)),
            ..
        })
    )));
}

#[test]
fn an_outage_is_reported_once_and_a_backoff_is_brought_forward_when_the_api_is_back() {
    let unreachable = || {
        Input::CreateDone(Err(Failure::Unreachable {
            retry_after_ms: None,
            rate_limited: false,
        }))
    };
    let mut c = Charge::new(Cents(1500), 120_000);
    c.step(Input::MayStart, &ctx(1_000));
    assert_eq!(
        emitted(&c.step(unreachable(), &ctx(1_100))),
        vec![State::Waiting]
    );
    // Retries while the API stays down say nothing new.
    for _ in 0..4 {
        let at = c.next_at_ms.unwrap();
        assert_eq!(c.step(Input::MayStart, &ctx(at)), vec![Effect::Create]);
        assert!(emitted(&c.step(unreachable(), &ctx(at + 10))).is_empty());
    }
    // The backoff has grown; the API is back: it goes at the hurried time.
    let later = c.next_at_ms.unwrap();
    let now = later - 3_000;
    assert!(c.hurry(now + 500));
    assert!(!c.hurry(now + 600), "only ever brought forward");
    assert_eq!(
        c.step(Input::MayStart, &ctx(now + 500)),
        vec![Effect::Create]
    );
    let fx = c.step(
        Input::CreateDone(Ok(remote(Phase::Open, None))),
        &ctx(now + 600),
    );
    assert_eq!(emitted(&fx), vec![State::Sent]);
}
