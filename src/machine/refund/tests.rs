//! Transition tests of the refund state machine, one behaviour per test.

use super::*;

const TIMING: Timing = Timing {
    poll_interval_ms: 2_000,
    terminal_timeout_ms: 300_000,
    confirm_window_ms: 60_000,
    confirm_window_max_ms: 86_400_000,
};

const DAY: i64 = 86_400_000;

pub(crate) fn ctx(now_ms: i64) -> Ctx {
    Ctx {
        now_ms,
        jitter: 0.5,
        timing: TIMING,
        idempotent_create: false,
    }
}

fn api(amount: u64, deadline: i64) -> Refund {
    Refund::new(
        Via::Api,
        Cents(amount),
        "99".into(),
        None,
        "pg-rf-k".into(),
        deadline,
        1_000,
    )
}

fn terminal(deadline: i64) -> Refund {
    Refund::new(
        Via::Terminal,
        Cents(1500),
        "99".into(),
        Some("T1".into()),
        "pg-rf-k".into(),
        deadline,
        1_000,
    )
}

fn answer(status: &str) -> ApiRefund {
    ApiRefund {
        id: "rf-7".into(),
        status: Some(status.into()),
        amount: Some(Cents(500)),
    }
}

fn unreachable() -> Failure {
    Failure::Unreachable {
        retry_after_ms: None,
        rate_limited: false,
    }
}

pub(crate) fn remote(phase: Phase) -> RemoteCharge {
    RemoteCharge {
        id: "ri-1".into(),
        phase,
        raw_state: String::new(),
        terminal: Some("T1".into()),
        amount: None,
        external_reference: None,
        payment_id: Some("99".into()),
    }
}

pub(crate) fn payment(status: &str, refunded: u64) -> Payment {
    Payment {
        id: "99".into(),
        status: status.into(),
        status_detail: None,
        amount: Some(Cents(1500)),
        refunded: Some(Cents(refunded)),
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

fn error_code(fx: &[Effect]) -> Option<ErrorCode> {
    fx.iter().find_map(|e| match e {
        Effect::Emit(em) => em.error.as_ref().map(|(c, _)| *c),
        _ => None,
    })
}

fn sends(fx: &[Effect]) -> usize {
    fx.iter()
        .filter(|e| matches!(e, Effect::Send | Effect::Create))
        .count()
}

/// An api refund whose first POST is out (t=1000).
pub(crate) fn api_sending() -> Refund {
    let mut r = api(500, 1_000 + 7 * DAY);
    assert_eq!(r.step(Input::Wake, &ctx(1_000)), vec![Effect::Send]);
    assert!(matches!(r.stage, Stage::SendBegun { at_ms: 1_000 }));
    r
}

/// A terminal refund whose intent is OPEN (t=1100).
pub(crate) fn terminal_live() -> Refund {
    let mut r = terminal(121_000);
    assert_eq!(r.step(Input::MayStart, &ctx(1_000)), vec![Effect::Create]);
    let fx = r.step(Input::CreateDone(Ok(remote(Phase::Open))), &ctx(1_100));
    assert_eq!(emitted(&fx), vec![State::Sent]);
    assert_eq!(r.remote_id.as_deref(), Some("ri-1"));
    r
}

// ---- helpers ----

#[test]
fn the_idempotency_key_is_stable_per_request_and_differs_between_requests() {
    let a = idempotency_key("store-1", "kiosk-1", "rf-1");
    assert_eq!(a, idempotency_key("store-1", "kiosk-1", "rf-1"));
    assert!(a.starts_with("pg-rf-") && a.len() == 6 + 32, "{a}");
    assert_ne!(a, idempotency_key("store-1", "kiosk-1", "rf-2"));
    assert_ne!(a, idempotency_key("store-1", "kiosk-2", "rf-1"));
    assert_ne!(a, idempotency_key("store-2", "kiosk-1", "rf-1"));
    // The separator keeps ("ab","c") and ("a","bc") apart.
    assert_ne!(
        idempotency_key("s", "ab", "c"),
        idempotency_key("s", "a", "bc")
    );
}

#[test]
fn pending_and_refunded_refunds_count_against_the_charge_others_do_not() {
    let mut r = api(500, 10_000);
    assert!(r.counts_against_charge());
    r.stage = Stage::Done {
        state: State::Refunded,
    };
    assert!(r.counts_against_charge());
    for s in [State::Failed, State::Canceled, State::Expired] {
        r.stage = Stage::Done { state: s };
        assert!(!r.counts_against_charge(), "{s:?}");
    }
}

#[test]
fn events_carry_amount_terminal_and_the_remote_id() {
    let r = terminal_live();
    let mut ev = Event::new(Some("rf".into()), None, State::Sent, 2, "t".into());
    r.decorate(&mut ev);
    assert_eq!(ev.amount.as_deref(), Some("15.00"));
    assert_eq!(ev.terminal.as_deref(), Some("T1"));
    assert_eq!(ev.intent_id.as_deref(), Some("ri-1"));
    let mut ev = Event::new(Some("rf".into()), None, State::Accepted, 1, "t".into());
    api(500, 10_000).decorate(&mut ev);
    assert_eq!(ev.amount.as_deref(), Some("5.00"));
    assert_eq!(ev.terminal, None);
}

// ---- via api ----

#[test]
fn an_api_refund_is_sent_at_once_and_written_ahead() {
    let r = api_sending();
    assert!(!r.holds_terminal());
    assert_eq!(r.next_at_ms, None);
}

#[test]
fn an_api_refund_past_its_deadline_expires_unsent() {
    let mut r = api(500, 5_000);
    let fx = r.step(Input::Wake, &ctx(5_000));
    assert_eq!(emitted(&fx), vec![State::Expired]);
    assert_eq!(sends(&fx), 0);
    assert!(r.is_final());
    assert_eq!(r.next_at_ms, None);
}

#[test]
fn an_approved_refund_is_sent_then_refunded() {
    let mut r = api_sending();
    let fx = r.step(Input::SendDone(Ok(answer("approved"))), &ctx(1_200));
    assert_eq!(emitted(&fx), vec![State::Sent, State::Refunded]);
    assert_eq!(r.remote_id.as_deref(), Some("rf-7"));
    assert!(r.is_final());
}

#[test]
fn a_pending_refund_is_asked_again_with_the_same_key_until_approved() {
    let mut r = api_sending();
    let fx = r.step(Input::SendDone(Ok(answer("in_process"))), &ctx(1_200));
    assert_eq!(emitted(&fx), vec![State::Sent]);
    assert!(matches!(r.stage, Stage::Confirming { .. }));
    let next = r.next_at_ms.expect("a retry is scheduled");
    assert!(next > 1_200);
    // Not before its time.
    assert!(r.step(Input::Wake, &ctx(next - 1)).is_empty());
    assert_eq!(r.step(Input::Wake, &ctx(next)), vec![Effect::Send]);
    let fx = r.step(Input::SendDone(Ok(answer("approved"))), &ctx(next + 50));
    // `sent` is told once.
    assert_eq!(emitted(&fx), vec![State::Refunded]);
}

#[test]
fn a_rejected_or_cancelled_refund_fails_as_api_refused() {
    for status in ["rejected", "cancelled"] {
        let mut r = api_sending();
        let fx = r.step(Input::SendDone(Ok(answer(status))), &ctx(1_200));
        assert_eq!(emitted(&fx), vec![State::Sent, State::Failed]);
        assert_eq!(error_code(&fx), Some(ErrorCode::ApiRefused));
    }
}

#[test]
fn a_refused_or_unknown_payment_fails_the_refund() {
    let mut r = api_sending();
    let fx = r.step(
        Input::SendDone(Err(Failure::Refused {
            message: "Mercado Pago answered 400: amount".into(),
        })),
        &ctx(1_200),
    );
    assert_eq!(emitted(&fx), vec![State::Failed]);
    assert_eq!(error_code(&fx), Some(ErrorCode::ApiRefused));
    let mut r = api_sending();
    let fx = r.step(Input::SendDone(Err(Failure::NotFound)), &ctx(1_200));
    assert_eq!(error_code(&fx), Some(ErrorCode::ApiRefused));
}

#[test]
fn a_send_that_never_connected_goes_back_to_the_queue_and_may_still_expire() {
    let mut r = api(500, 60_000);
    r.step(Input::Wake, &ctx(1_000));
    let fx = r.step(Input::SendDone(Err(unreachable())), &ctx(1_100));
    // Under 10 s of failures: nothing reported yet.
    assert!(emitted(&fx).is_empty());
    assert_eq!(r.stage, Stage::Queued);
    assert!(!r.may_exist);
    let mut t = 1_100;
    let mut waitings = 0;
    loop {
        let at = r.next_at_ms.expect("a wake is scheduled");
        assert!(at > t, "time moves forward");
        t = at;
        let fx = r.step(Input::Wake, &ctx(t));
        if r.is_final() {
            assert_eq!(emitted(&fx), vec![State::Expired]);
            assert_eq!(sends(&fx), 0);
            assert!(t >= 60_000);
            break;
        }
        assert_eq!(fx, vec![Effect::Send]);
        let fx = r.step(Input::SendDone(Err(unreachable())), &ctx(t + 10));
        for e in &fx {
            if let Effect::Emit(em) = e {
                if em.state == State::Waiting {
                    waitings += 1;
                    assert_eq!(em.reason, Some(WaitReason::ApiUnreachable));
                }
            }
        }
        if r.is_final() {
            // The next retry would come after the deadline: expired now, unsent.
            assert_eq!(emitted(&fx).last(), Some(&State::Expired));
            break;
        }
    }
    assert_eq!(waitings, 1, "waiting is reported once per outage");
}

#[test]
fn a_token_refused_until_the_deadline_fails_as_unauthorized() {
    let mut r = api(500, 30_000);
    let mut t = 1_000;
    loop {
        let fx = r.step(Input::Wake, &ctx(t));
        if r.is_final() {
            assert_eq!(error_code(&fx), Some(ErrorCode::Unauthorized));
            break;
        }
        if fx.contains(&Effect::Send) {
            let fx = r.step(Input::SendDone(Err(Failure::Unauthorized)), &ctx(t + 10));
            if r.is_final() {
                assert_eq!(error_code(&fx), Some(ErrorCode::Unauthorized));
                break;
            }
        }
        t = r.next_at_ms.expect("scheduled");
    }
}

#[test]
fn after_an_ambiguous_send_the_refund_is_never_expired_and_retries_the_same_key() {
    let mut r = api(500, 5_000);
    r.step(Input::Wake, &ctx(1_000));
    let fx = r.step(Input::SendDone(Err(Failure::Ambiguous)), &ctx(1_100));
    assert!(emitted(&fx).is_empty());
    assert!(r.may_exist);
    assert!(matches!(r.stage, Stage::Confirming { .. }));
    // Long past the deadline, with connect failures in between: still retried.
    let mut t = 1_100;
    for _ in 0..20 {
        t = r.next_at_ms.expect("scheduled").max(t + 1);
        let fx = r.step(Input::Wake, &ctx(t));
        assert_eq!(fx, vec![Effect::Send]);
        let fx = r.step(Input::SendDone(Err(unreachable())), &ctx(t + 5));
        assert!(!emitted(&fx).contains(&State::Expired));
        assert!(matches!(r.stage, Stage::Confirming { .. }));
    }
    assert!(t > 5_000);
    t = r.next_at_ms.expect("scheduled");
    assert_eq!(r.step(Input::Wake, &ctx(t)), vec![Effect::Send]);
    let fx = r.step(Input::SendDone(Ok(answer("approved"))), &ctx(t + 5));
    // The outage was reported; then the story goes on.
    assert_eq!(emitted(&fx), vec![State::Sent, State::Refunded]);
}

#[test]
fn a_restart_mid_send_resends_with_the_same_key_never_expires() {
    let mut r = api(500, 5_000);
    r.step(Input::Wake, &ctx(1_000));
    let fx = r.step(Input::Restarted, &ctx(9_000));
    assert!(emitted(&fx).is_empty());
    assert!(matches!(r.stage, Stage::Confirming { .. }));
    assert_eq!(r.step(Input::Wake, &ctx(9_000)), vec![Effect::Send]);
}

#[test]
fn an_api_refund_waits_out_a_three_day_outage_and_goes_out_after() {
    let mut r = api(500, 1_000 + 7 * DAY);
    let mut t = 1_000;
    let mut reported = Vec::new();
    let mut sends_n = 0;
    while t < 1_000 + 3 * DAY {
        let fx = r.step(Input::Wake, &ctx(t));
        if fx.contains(&Effect::Send) {
            sends_n += 1;
            let fx = r.step(Input::SendDone(Err(unreachable())), &ctx(t + 20));
            reported.extend(emitted(&fx));
        }
        assert!(!r.is_final());
        t = r.next_at_ms.expect("scheduled");
    }
    assert_eq!(reported, vec![State::Waiting]);
    // Backoff is capped (30 s) and never tighter than its base.
    assert!(
        sends_n > 3 * 2_880 / 2 && sends_n < 3 * 86_400 / 10,
        "{sends_n}"
    );
    assert_eq!(r.step(Input::Wake, &ctx(t)), vec![Effect::Send]);
    let fx = r.step(Input::SendDone(Ok(answer("approved"))), &ctx(t + 20));
    assert_eq!(emitted(&fx), vec![State::Sent, State::Refunded]);
}

#[test]
fn rate_limits_honour_retry_after() {
    let mut r = api_sending();
    r.step(
        Input::SendDone(Err(Failure::Unreachable {
            retry_after_ms: Some(20_000),
            rate_limited: true,
        })),
        &ctx(1_100),
    );
    assert_eq!(r.next_at_ms, Some(21_100));
    assert!(r.step(Input::Wake, &ctx(21_099)).is_empty());
}

#[test]
fn cancel_of_a_queued_refund_is_local() {
    let mut r = api(500, 60_000);
    let fx = r.step(Input::CancelRequested, &ctx(1_000));
    assert_eq!(emitted(&fx), vec![State::Canceled]);
    assert!(fx.contains(&Effect::CancelAnswer(Ok(()))));
    assert_eq!(sends(&fx), 0);
}

#[test]
fn cancel_during_a_send_that_never_connected_cancels() {
    let mut r = api_sending();
    assert!(r.step(Input::CancelRequested, &ctx(1_050)).is_empty());
    let fx = r.step(Input::SendDone(Err(unreachable())), &ctx(1_100));
    assert_eq!(emitted(&fx), vec![State::Canceled]);
    assert!(fx.contains(&Effect::CancelAnswer(Ok(()))));
}

#[test]
fn cancel_during_a_send_that_reached_mercado_pago_is_not_cancelable() {
    let mut r = api_sending();
    r.step(Input::CancelRequested, &ctx(1_050));
    let fx = r.step(Input::SendDone(Ok(answer("approved"))), &ctx(1_100));
    assert_eq!(emitted(&fx), vec![State::Sent, State::Refunded]);
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::CancelAnswer(Err((ErrorCode::NotCancelable, _))))));
    // And a sent refund refuses at once.
    let mut r = api_sending();
    r.step(Input::SendDone(Ok(answer("pending"))), &ctx(1_100));
    assert!(r.cancel_refusal().is_some());
    let fx = r.step(Input::CancelRequested, &ctx(1_200));
    assert!(matches!(
        fx.as_slice(),
        [Effect::CancelAnswer(Err((ErrorCode::NotCancelable, _)))]
    ));
}

#[test]
fn cancel_during_an_ambiguous_send_is_answered_not_cancelable() {
    let mut r = api_sending();
    r.step(Input::CancelRequested, &ctx(1_050));
    let fx = r.step(Input::SendDone(Err(Failure::Ambiguous)), &ctx(1_100));
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::CancelAnswer(Err((ErrorCode::NotCancelable, _))))));
    assert!(!r.cancel_pending);
}

// ---- via terminal ----

#[test]
fn a_terminal_refund_waits_for_its_terminal() {
    let mut r = terminal(121_000);
    assert!(r.step(Input::Wake, &ctx(1_000)).is_empty());
    let fx = r.step(Input::TerminalBusy, &ctx(1_000));
    assert_eq!(emitted(&fx), vec![State::Waiting]);
    // Told once.
    assert!(r.step(Input::TerminalBusy, &ctx(2_000)).is_empty());
    assert_eq!(r.step(Input::MayStart, &ctx(3_000)), vec![Effect::Create]);
    assert!(r.holds_terminal());
    assert!(r.step(Input::MayStart, &ctx(3_001)).is_empty());
}

#[test]
fn a_terminal_refund_past_its_deadline_expires_without_a_create() {
    let mut r = terminal(121_000);
    let fx = r.step(Input::MayStart, &ctx(121_000));
    assert_eq!(emitted(&fx), vec![State::Expired]);
    assert_eq!(sends(&fx), 0);
}

#[test]
fn a_finished_refund_intent_is_refunded_once_the_payment_shows_it() {
    let mut r = terminal_live();
    let next = r.next_at_ms.expect("poll scheduled");
    assert_eq!(
        r.step(Input::Wake, &ctx(next)),
        vec![Effect::Poll {
            intent_id: "ri-1".into()
        }]
    );
    let fx = r.step(
        Input::PollDone(Ok(remote(Phase::OnTerminal))),
        &ctx(next + 10),
    );
    assert_eq!(emitted(&fx), vec![State::OnTerminal]);
    let fx = r.step(
        Input::PollDone(Ok(remote(Phase::Processing))),
        &ctx(next + 20),
    );
    assert_eq!(emitted(&fx), vec![State::Processing]);
    let fx = r.step(Input::PollDone(Ok(remote(Phase::Ended))), &ctx(next + 30));
    assert_eq!(fx, vec![Effect::LookupPayment]);
    // The payment does not show it yet: keep looking, not refunded.
    let fx = r.step(
        Input::PaymentDone(Ok(payment("approved", 0))),
        &ctx(next + 40),
    );
    assert!(emitted(&fx).is_empty());
    assert!(r.holds_terminal());
    let fx = r.step(
        Input::PaymentDone(Ok(payment("refunded", 1500))),
        &ctx(next + 50),
    );
    assert_eq!(emitted(&fx), vec![State::Refunded]);
    assert!(fx.contains(&Effect::ReleaseTerminal));
    assert_eq!(
        r.payment.as_ref().map(|p| p.status.as_str()),
        Some("refunded")
    );
}

#[test]
fn the_refunded_amount_alone_confirms_a_terminal_refund() {
    let mut r = terminal_live();
    r.step(Input::PollDone(Ok(remote(Phase::Ended))), &ctx(5_000));
    let fx = r.step(
        Input::PaymentDone(Ok(payment("approved", 1500))),
        &ctx(5_100),
    );
    assert_eq!(emitted(&fx), vec![State::Refunded]);
}

#[test]
fn a_payment_that_never_shows_the_refund_goes_needs_attention_then_lookup_resolves() {
    let mut r = terminal_live();
    r.step(Input::PollDone(Ok(remote(Phase::Ended))), &ctx(5_000));
    let fx = r.step(Input::PaymentDone(Ok(payment("approved", 0))), &ctx(65_000));
    assert_eq!(emitted(&fx), vec![State::NeedsAttention]);
    assert!(r.holds_terminal());
    let at = r.next_at_ms.expect("looking");
    assert_eq!(
        r.step(Input::Wake, &ctx(at)),
        vec![Effect::Poll {
            intent_id: "ri-1".into()
        }]
    );
    let fx = r.step(Input::PollDone(Ok(remote(Phase::Ended))), &ctx(at + 10));
    assert_eq!(fx, vec![Effect::LookupPayment]);
    let fx = r.step(
        Input::PaymentDone(Ok(payment("refunded", 1500))),
        &ctx(at + 20),
    );
    assert!(matches!(
        fx.first(),
        Some(Effect::Emit(Emit {
            state: State::Refunded,
            resolved_by: Some(ResolvedBy::Lookup),
            ..
        }))
    ));
}

#[test]
fn canceled_error_and_abandoned_refund_intents_end_as_such() {
    for (phase, want, code) in [
        (Phase::Canceled, State::Canceled, None),
        (Phase::Error, State::Failed, Some(ErrorCode::TerminalError)),
        (Phase::Abandoned, State::Expired, None),
    ] {
        let mut r = terminal_live();
        let fx = r.step(Input::PollDone(Ok(remote(phase.clone()))), &ctx(5_000));
        assert_eq!(emitted(&fx), vec![want], "{phase:?}");
        assert_eq!(error_code(&fx), code);
        assert!(fx.contains(&Effect::ReleaseTerminal));
    }
}

#[test]
fn an_intent_left_open_past_terminal_timeout_is_canceled_and_expired() {
    let mut r = terminal_live();
    let t = 1_100 + TIMING.terminal_timeout_ms;
    let fx = r.step(Input::PollDone(Ok(remote(Phase::Open))), &ctx(t));
    assert_eq!(
        fx,
        vec![Effect::CancelRemote {
            intent_id: "ri-1".into()
        }]
    );
    let fx = r.step(Input::CancelDone(Ok(())), &ctx(t + 100));
    assert_eq!(emitted(&fx), vec![State::Expired]);
}

#[test]
fn a_station_cancels_an_open_refund_intent_through_the_api() {
    let mut r = terminal_live();
    assert_eq!(r.cancel_refusal(), None);
    let fx = r.step(Input::CancelRequested, &ctx(2_000));
    assert_eq!(
        fx,
        vec![Effect::CancelRemote {
            intent_id: "ri-1".into()
        }]
    );
    let fx = r.step(Input::CancelDone(Ok(())), &ctx(2_100));
    assert_eq!(emitted(&fx), vec![State::Canceled]);
    assert!(fx.contains(&Effect::CancelAnswer(Ok(()))));
}

#[test]
fn a_refund_intent_on_the_terminal_is_not_cancelable() {
    let mut r = terminal_live();
    r.step(Input::PollDone(Ok(remote(Phase::OnTerminal))), &ctx(3_000));
    assert!(r.cancel_refusal().is_some());
    let fx = r.step(Input::CancelRequested, &ctx(3_100));
    assert!(matches!(
        fx.as_slice(),
        [Effect::CancelAnswer(Err((ErrorCode::NotCancelable, _)))]
    ));
    // The cancel raced the terminal: 409 on the cancel.
    let mut r = terminal_live();
    r.step(Input::CancelRequested, &ctx(2_000));
    let fx = r.step(Input::CancelDone(Err(Failure::Conflict)), &ctx(2_100));
    assert_eq!(emitted(&fx), vec![State::OnTerminal]);
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::CancelAnswer(Err((ErrorCode::NotCancelable, _))))));
}

#[test]
fn an_ambiguous_create_goes_needs_attention_and_is_never_created_again() {
    let mut r = terminal(121_000);
    r.step(Input::MayStart, &ctx(1_000));
    let fx = r.step(Input::CreateDone(Err(Failure::Ambiguous)), &ctx(1_100));
    assert_eq!(emitted(&fx), vec![State::NeedsAttention]);
    let mut t = 1_100;
    for input in [
        Input::MayStart,
        Input::Wake,
        Input::Restarted,
        Input::TerminalBusy,
        Input::PaymentDone(Err(unreachable())),
        Input::Wake,
        Input::MayStart,
    ] {
        t = r.next_at_ms.unwrap_or(t + 1_000).max(t + 1);
        let fx = r.step(input, &ctx(t));
        assert_eq!(sends(&fx), 0);
    }
    // The lookup finds the money returned.
    let fx = r.step(
        Input::PaymentDone(Ok(payment("refunded", 1500))),
        &ctx(t + 1),
    );
    assert_eq!(emitted(&fx), vec![State::Refunded]);
}

#[test]
fn a_busy_terminal_409_sends_the_refund_back_to_its_queue() {
    let mut r = terminal(121_000);
    r.step(Input::MayStart, &ctx(1_000));
    let fx = r.step(Input::CreateDone(Err(Failure::Conflict)), &ctx(1_100));
    assert_eq!(emitted(&fx), vec![State::Waiting]);
    assert!(fx.contains(&Effect::ReleaseTerminal));
    assert_eq!(r.stage, Stage::Queued);
    let retry = r.next_at_ms.expect("retry");
    assert!(r.step(Input::MayStart, &ctx(retry - 1)).is_empty());
    assert_eq!(r.step(Input::MayStart, &ctx(retry)), vec![Effect::Create]);
}

#[test]
fn a_restart_mid_create_looks_the_payment_up_instead_of_creating() {
    let mut r = terminal(121_000);
    r.step(Input::MayStart, &ctx(1_000));
    let fx = r.step(Input::Restarted, &ctx(2_000));
    assert_eq!(emitted(&fx), vec![State::NeedsAttention]);
    assert!(!r.holds_terminal());
    assert_eq!(
        r.step(Input::Wake, &ctx(2_000)),
        vec![Effect::LookupPayment]
    );
}

#[test]
fn a_restart_with_a_cancel_under_way_sends_the_cancel_again() {
    let mut r = terminal_live();
    r.step(Input::CancelRequested, &ctx(2_000));
    assert_eq!(
        r.step(Input::Restarted, &ctx(3_000)),
        vec![Effect::CancelRemote {
            intent_id: "ri-1".into()
        }]
    );
}

#[test]
fn live_poll_failures_report_waiting_after_ten_seconds_then_restate() {
    let mut r = terminal_live();
    let mut t = 2_000;
    let mut seen = Vec::new();
    while t < 20_000 {
        seen.extend(emitted(
            &r.step(Input::PollDone(Err(unreachable())), &ctx(t)),
        ));
        t += 1_000;
    }
    assert_eq!(seen, vec![State::Waiting]);
    let fx = r.step(Input::PollDone(Ok(remote(Phase::Open))), &ctx(t));
    assert_eq!(emitted(&fx), vec![State::Sent]);
}

#[test]
fn a_station_cancel_is_answered_even_when_the_intent_ends_otherwise() {
    // The terminal reports an error while the cancel is under way.
    let mut r = terminal_live();
    r.step(Input::CancelRequested, &ctx(2_000));
    let fx = r.step(Input::PollDone(Ok(remote(Phase::Error))), &ctx(2_100));
    assert_eq!(emitted(&fx), vec![State::Failed]);
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::CancelAnswer(Err((ErrorCode::NotCancelable, _))))));
    // The intent ended before the cancel's answer came back.
    let mut r = terminal_live();
    r.step(Input::CancelRequested, &ctx(2_000));
    r.step(Input::PollDone(Ok(remote(Phase::Ended))), &ctx(2_100));
    let fx = r.step(Input::CancelDone(Err(Failure::Conflict)), &ctx(2_200));
    assert!(matches!(
        fx.as_slice(),
        [Effect::CancelAnswer(Err((ErrorCode::NotCancelable, _)))]
    ));
}

// ---- random sequences against the invariants ----

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn input(kind: u8) -> Input {
        let ok = |s: &str| Input::SendDone(Ok(answer(s)));
        match kind {
            0 => Input::Wake,
            1 => Input::MayStart,
            2 => Input::TerminalBusy,
            3 => Input::Restarted,
            4 => Input::CancelRequested,
            5 => ok("approved"),
            6 => ok("pending"),
            7 => ok("rejected"),
            8 => Input::SendDone(Err(unreachable())),
            9 => Input::SendDone(Err(Failure::Ambiguous)),
            10 => Input::SendDone(Err(Failure::Unauthorized)),
            11 => Input::SendDone(Err(Failure::Conflict)),
            12 => Input::CreateDone(Ok(remote(Phase::Open))),
            13 => Input::CreateDone(Err(unreachable())),
            14 => Input::CreateDone(Err(Failure::Conflict)),
            15 => Input::CreateDone(Err(Failure::Ambiguous)),
            16 => Input::PollDone(Ok(remote(Phase::OnTerminal))),
            17 => Input::PollDone(Ok(remote(Phase::Ended))),
            18 => Input::PollDone(Ok(remote(Phase::Canceled))),
            19 => Input::PollDone(Ok(remote(Phase::Abandoned))),
            20 => Input::PollDone(Ok(remote(Phase::Open))),
            21 => Input::PollDone(Err(unreachable())),
            22 => Input::CancelDone(Ok(())),
            23 => Input::CancelDone(Err(Failure::Conflict)),
            24 => Input::PaymentDone(Ok(payment("refunded", 1500))),
            25 => Input::PaymentDone(Ok(payment("approved", 0))),
            _ => Input::PaymentDone(Err(unreachable())),
        }
    }

    fn check(via_terminal: bool, steps: &[(u8, i64)]) -> Result<(), TestCaseError> {
        let deadline = 60_000;
        let mut r = if via_terminal {
            terminal(deadline)
        } else {
            api(1500, deadline)
        };
        let mut now = 1_000;
        // A create (terminal) that has not been proven to have left nothing behind.
        let mut create_out = false;
        let mut may_exist = false;
        let mut finals = 0;
        for (kind, dt) in steps {
            now += dt;
            let inp = input(*kind);
            let was_queued = r.stage == Stage::Queued;
            let was_final = r.is_final();
            let fx = r.step(inp.clone(), &ctx(now));
            let states = emitted(&fx);
            if was_final {
                prop_assert!(states.is_empty(), "events after the end: {states:?}");
            }
            finals += states.iter().filter(|s| s.is_final()).count();
            prop_assert!(finals <= 1);
            for e in &fx {
                match e {
                    Effect::Create | Effect::Send if was_queued => {
                        prop_assert!(now < deadline, "a first send after the deadline");
                    }
                    _ => {}
                }
                if *e == Effect::Create {
                    prop_assert!(!create_out, "a second create while one may exist");
                    create_out = true;
                }
            }
            match &inp {
                Input::CreateDone(Err(
                    Failure::Unreachable { .. } | Failure::Unauthorized | Failure::Conflict,
                )) if matches!(r.stage, Stage::Queued | Stage::Done { .. }) => {
                    create_out = false;
                }
                Input::SendDone(Ok(_) | Err(Failure::Ambiguous | Failure::Conflict))
                    if !via_terminal && !was_final && !was_queued =>
                {
                    may_exist = true;
                }
                Input::Restarted if r.may_exist => may_exist = true,
                _ => {}
            }
            if states.contains(&State::Refunded) {
                let confirmed = matches!(&inp, Input::SendDone(Ok(a)) if a.status.as_deref() == Some("approved"))
                    || matches!(&inp, Input::PaymentDone(Ok(p)) if p.status == "refunded");
                prop_assert!(
                    confirmed,
                    "refunded without Mercado Pago saying so: {inp:?}"
                );
            }
            if !via_terminal && may_exist {
                prop_assert!(
                    !states.contains(&State::Expired),
                    "an api refund that may exist was expired"
                );
            }
            if r.is_final() {
                prop_assert_eq!(r.next_at_ms, None);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]
        #[test]
        fn random_inputs_keep_the_refund_invariants(
            via_terminal in any::<bool>(),
            steps in prop::collection::vec((0u8..27, 0i64..20_000), 1..80),
        ) {
            check(via_terminal, &steps)?;
        }
    }
}
