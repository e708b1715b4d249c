//! The engine driver in process (issue 11): the real `Engine` on a temporary store, with
//! a fake Point API and a manual clock (`tests/engine/`). These are the driver's
//! behaviours that the end-to-end tests check through Mosquitto and the TLS simulator
//! and that need no real broker: acceptance and refusals, terminal queues, the request
//! limit, recovery at start. Each test names the end-to-end test it mirrors.

mod engine;

use engine::{charge, states, Fault, Harness, Options, Scope, START_MS};
use serde_json::json;

const T1: &str = "PAX_A910__0001";
const T2: &str = "PAX_A910__0002";

// ================================================================ acceptance and refusals

/// Mirrors e2e_charge::an_approved_charge_reports_every_step_and_the_confirmed_payment.
#[tokio::test(start_paused = true)]
async fn a_charge_is_accepted_sent_and_approved_after_its_payment_is_looked_up() {
    let mut h = Harness::start(Options::default()).await;
    let out = h.command("kiosk-1", charge("sale-1", "15")).await;
    assert_eq!(states(&out), ["accepted", "sent"], "{out:#?}");
    assert_eq!(out[0]["seq"], 1);
    assert_eq!(out[0]["amount"], "15.00");
    assert_eq!(out[0]["terminal"], T1);
    let creates = h.point.creates();
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0].terminal, T1);
    assert_eq!(creates[0].amount.0, 1500);

    h.point.take(T1);
    h.until_state("kiosk-1", "sale-1", "on_terminal", 5_000)
        .await;
    h.point.pay(T1);
    let last = h.until_state("kiosk-1", "sale-1", "approved", 5_000).await;
    assert_eq!(last["final"], true);
    assert_eq!(last["payment"]["status"], "approved");
    let story = h.story("kiosk-1", "sale-1");
    assert_eq!(
        states(&story),
        ["accepted", "sent", "on_terminal", "approved"]
    );
    let seqs: Vec<u64> = story.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert!(
        h.point.calls().iter().any(|c| c.what == "payment"),
        "approved only after the payment was looked up"
    );
    assert_eq!(h.point.creates().len(), 1, "one create");
}

/// Mirrors e2e_charge::every_refusal_this_validation_produces_reaches_the_station_and_nothing_reaches_the_api
/// (the validation part; the rogue cases of s1_rogue::every_rogue_command_is_refused_with_its_code_and_nothing_reaches_the_api).
#[tokio::test(start_paused = true)]
async fn every_refusal_reaches_the_station_final_with_seq_0_and_nothing_reaches_the_api() {
    let standalone = "PAX_STANDALONE__0003";
    let mut opts = Options::default();
    opts.stations
        .push(("kiosk-3".into(), vec![standalone.into()]));
    opts.standalone = vec![standalone.into()];
    let mut h = Harness::start(opts).await;
    let big = format!(
        r#"{{"v":1,"type":"charge","request_id":"big","amount":"1.00","description":"{}"}}"#,
        "x".repeat(9000)
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("kiosk-1", b"not json".to_vec(), "bad_json"),
        ("kiosk-1", b"[1, 2]".to_vec(), "bad_json"),
        ("kiosk-1", big.into_bytes(), "too_large"),
        ("kiosk-1", br#"{"v":2,"type":"charge","request_id":"a","amount":"1.00"}"#.to_vec(), "bad_version"),
        ("kiosk-1", br#"{"type":"charge","request_id":"a","amount":"10.00"}"#.to_vec(), "missing_field"),
        ("kiosk-1", br#"{"v":1,"type":"charge","request_id":"a","amout":"10.00"}"#.to_vec(), "bad_field"),
        ("kiosk-1", br#"{"v":1,"type":"charge","request_id":"a","amount":10.5}"#.to_vec(), "bad_amount"),
        ("kiosk-1", br#"{"v":1,"type":"charge","request_id":"a","amount":"-5.00"}"#.to_vec(), "bad_amount"),
        ("kiosk-1", br#"{"v":1,"type":"charge","request_id":"a","amount":"10.001"}"#.to_vec(), "bad_amount"),
        ("kiosk-1", br#"{"v":1,"type":"charge","request_id":"a","amount":"0"}"#.to_vec(), "amount_out_of_range"),
        ("kiosk-1", br#"{"v":1,"type":"charge","request_id":"a","amount":"5000000.00"}"#.to_vec(), "amount_out_of_range"),
        ("intruder", br#"{"v":1,"type":"charge","request_id":"a","amount":"10.00"}"#.to_vec(), "unknown_station"),
        ("kiosk-1", br#"{"v":1,"type":"charge","request_id":"a","amount":"10.00","terminal":"NOPE__1"}"#.to_vec(), "unknown_terminal"),
        ("kiosk-1", br#"{"v":1,"type":"charge","request_id":"a","amount":"10.00","terminal":"PAX_A910__0002"}"#.to_vec(), "terminal_not_bound"),
        ("kiosk-3", br#"{"v":1,"type":"charge","request_id":"a","amount":"10.00"}"#.to_vec(), "terminal_unavailable"),
        ("kiosk-1", br#"{"v":1,"type":"cancel","request_id":"c","target":"nothing"}"#.to_vec(), "unknown_target"),
        ("kiosk-1", br#"{"v":1,"type":"query","request_id":"q","target":"nothing"}"#.to_vec(), "unknown_target"),
    ];
    for (station, payload, code) in cases {
        let out = h.command_bytes(station, payload).await;
        assert_eq!(out.len(), 1, "{code}: one event: {out:#?}");
        let r = &out[0];
        assert_eq!(r["state"], "refused", "{code}: {r}");
        assert_eq!(r["error"]["code"], code, "{r}");
        assert_eq!(r["seq"], 0, "{r}");
        assert_eq!(r["final"], true, "{r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{r}"
        );
        if code == "too_large" || code == "bad_json" {
            assert!(r["request_id"].is_null(), "{r}");
        } else {
            assert!(r["request_id"].is_string(), "{r}");
        }
    }
    let calls: Vec<_> = h
        .point
        .calls()
        .into_iter()
        .filter(|c| c.what != "devices")
        .collect();
    assert!(calls.is_empty(), "nothing reaches the API: {calls:?}");
}

/// The device-listing rules of `terminal_unavailable`, `unknown_terminal` and
/// `terminal_not_bound`. Mirrors the `terminal_unavailable` case of
/// e2e_charge::every_refusal_this_validation_produces_reaches_the_station_and_nothing_reaches_the_api.
#[tokio::test(start_paused = true)]
async fn a_bound_terminal_the_device_listing_lacks_is_unavailable_and_one_only_listed_is_not_bound()
{
    let (point, clock) = Harness::fake();
    point.set_devices(&[(T2, "PDV"), ("PAX_A910__0099", "PDV")]);
    let mut h = Harness::start_with(Options::default(), point, clock).await;
    let r = h.refusal("kiosk-1", charge("a", "10.00")).await;
    assert_eq!(r["error"]["code"], "terminal_unavailable", "{r}");
    let r = h
        .refusal(
            "kiosk-2",
            json!({"v":1,"type":"charge","request_id":"b","amount":"10.00","terminal":"PAX_A910__0099"}),
        )
        .await;
    assert_eq!(r["error"]["code"], "terminal_not_bound", "{r}");
    let r = h
        .refusal(
            "kiosk-2",
            json!({"v":1,"type":"charge","request_id":"c","amount":"10.00","terminal":"PAX_A910__0404"}),
        )
        .await;
    assert_eq!(r["error"]["code"], "unknown_terminal", "{r}");
    let out = h.command("kiosk-2", charge("d", "10.00")).await;
    assert_eq!(
        states(&out),
        ["accepted", "sent"],
        "a listed PDV terminal works"
    );
    assert_eq!(h.point.creates().len(), 1);
}

/// Contract: "without a successful listing yet, charges are accepted". Mirrors the
/// same row of e2e_charge::every_refusal_this_validation_produces_reaches_the_station_and_nothing_reaches_the_api.
#[tokio::test(start_paused = true)]
async fn without_a_successful_device_listing_charges_are_accepted_and_sent() {
    let (point, clock) = Harness::fake();
    point.fail_devices();
    let mut h = Harness::start_with(Options::default(), point, clock).await;
    assert!(
        h.point.calls().iter().any(|c| c.what == "devices"),
        "the listing was asked for"
    );
    let out = h.command("kiosk-1", charge("a", "10.00")).await;
    assert_eq!(states(&out), ["accepted", "sent"], "{out:#?}");
    assert_eq!(h.point.creates().len(), 1);
}

/// Mirrors s1_rogue::a_replayed_request_id_with_other_content_is_a_conflict_and_the_original_is_untouched.
#[tokio::test(start_paused = true)]
async fn a_request_id_reused_with_other_content_is_a_conflict_carrying_the_original_s_latest_event()
{
    let mut h = Harness::start(Options::default()).await;
    let out = h.command("kiosk-1", charge("sale-7", "10.00")).await;
    assert_eq!(states(&out), ["accepted", "sent"]);
    let r = h.refusal("kiosk-1", charge("sale-7", "99.00")).await;
    assert_eq!(r["error"]["code"], "conflict", "{r}");
    assert_eq!(r["request_id"], "sale-7");
    assert_eq!(r["seq"], 0);
    assert_eq!(r["current"], h.story("kiosk-1", "sale-7")[1], "{r}");
    assert_eq!(r["current"]["amount"], "10.00");
    // The original is untouched: it runs to its end at its own amount, one create.
    h.point.pay(T1);
    let last = h.until_state("kiosk-1", "sale-7", "approved", 5_000).await;
    assert_eq!(last["amount"], "10.00");
    let creates = h.point.creates();
    assert_eq!(creates.len(), 1, "{creates:?}");
    assert_eq!(creates[0].amount.0, 1000);
}

/// Contract: a repeat with the same content (after normalising) publishes the request's
/// latest event again, unchanged. Mirrors the end of
/// s1_rogue::a_replayed_request_id_with_other_content_is_a_conflict_and_the_original_is_untouched
/// and n4_broker_restart::sigkill_without_persistence_republishes_latest_events_and_resends_are_answered_not_doubled.
#[tokio::test(start_paused = true)]
async fn an_exact_repeat_is_answered_with_the_stored_latest_event_and_charges_nothing() {
    let mut h = Harness::start(Options::default()).await;
    h.command("kiosk-1", charge("sale-1", "10.00")).await;
    let latest = h.latest("kiosk-1", "sale-1");
    assert_eq!(latest["state"], "sent");
    // "10" is "10.00"; an absent optional field is its default.
    for repeat in [
        charge("sale-1", "10"),
        json!({"v":1,"type":"charge","request_id":"sale-1","amount":"10.00","print_on_terminal":true}),
    ] {
        let out = h.command("kiosk-1", repeat).await;
        assert_eq!(
            out,
            std::slice::from_ref(&latest),
            "the latest event, same seq"
        );
    }
    h.point.pay(T1);
    let fin = h.until_state("kiosk-1", "sale-1", "approved", 5_000).await;
    let out = h.command("kiosk-1", charge("sale-1", "10")).await;
    assert_eq!(out, [fin], "after the end: the final event again");
    assert_eq!(h.point.creates().len(), 1, "nothing charged twice");
}

/// Mirrors the `duplicate_reference` case of
/// e2e_charge::every_refusal_this_validation_produces_reaches_the_station_and_nothing_reaches_the_api.
#[tokio::test(start_paused = true)]
async fn an_external_reference_owned_by_another_request_is_a_duplicate_reference() {
    let mut h = Harness::start(Options::default()).await;
    let with_ref = |rid: &str| json!({"v":1,"type":"charge","request_id":rid,"amount":"10.00","external_reference":"ref-123"});
    let out = h.command("kiosk-2", with_ref("r1")).await;
    assert_eq!(states(&out), ["accepted", "sent"]);
    for (station, rid) in [("kiosk-2", "r2"), ("kiosk-1", "r3")] {
        let r = h.refusal(station, with_ref(rid)).await;
        assert_eq!(r["error"]["code"], "duplicate_reference", "{station}: {r}");
        assert_eq!(r["request_id"], rid);
    }
    let creates = h.point.creates();
    assert_eq!(creates.len(), 1, "{creates:?}");
    assert_eq!(creates[0].external_reference, "ref-123");
}

/// Mirrors e2e_charge::the_queue_refuses_charges_beyond_max_pending.
#[tokio::test(start_paused = true)]
async fn charges_beyond_max_pending_are_refused_queue_full_until_one_ends() {
    let mut h = Harness::start(Options {
        max_pending: 1,
        ..Options::default()
    })
    .await;
    let out = h.command("kiosk-1", charge("one", "10.00")).await;
    assert_eq!(states(&out), ["accepted", "sent"]);
    let r = h.refusal("kiosk-2", charge("two", "10.00")).await;
    assert_eq!(r["error"]["code"], "queue_full", "{r}");
    h.point.pay(T1);
    h.until_state("kiosk-1", "one", "approved", 5_000).await;
    let out = h.command("kiosk-2", charge("three", "10.00")).await;
    assert_eq!(
        states(&out),
        ["accepted", "sent"],
        "room again once it ended"
    );
    assert_eq!(h.point.creates().len(), 2);
}

// ================================================================ terminal queues

/// Mirrors e2e_charge::a_second_charge_on_a_busy_terminal_waits_then_runs.
#[tokio::test(start_paused = true)]
async fn a_second_charge_on_a_busy_terminal_waits_terminal_busy_and_runs_when_the_first_ends() {
    let mut h = Harness::start(Options::default()).await;
    h.command("kiosk-1", charge("first", "10.00")).await;
    let out = h.command("kiosk-1", charge("second", "11.50")).await;
    assert_eq!(states(&out), ["accepted", "waiting"], "{out:#?}");
    assert_eq!(out[1]["reason"], "terminal_busy");
    h.advance(10_000).await;
    let creates = h
        .point
        .calls()
        .iter()
        .filter(|c| c.what == "create")
        .count();
    assert_eq!(
        creates, 1,
        "no create for the second while the first holds the terminal"
    );
    h.point.pay(T1);
    h.until_state("kiosk-1", "first", "approved", 5_000).await;
    h.until_state("kiosk-1", "second", "sent", 5_000).await;
    assert_eq!(
        h.point
            .intent_amounts(T1)
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        [1000, 1150]
    );
}

/// Extends e2e_charge::a_second_charge_on_a_busy_terminal_waits_then_runs to a queue of
/// four (FIFO); end to end this is only seen in aggregate, in the fleet runs of network.rs.
#[tokio::test(start_paused = true)]
async fn charges_on_one_terminal_are_created_one_at_a_time_in_arrival_order() {
    let mut h = Harness::start(Options::default()).await;
    for (rid, amount) in [
        ("a", "10.00"),
        ("b", "20.00"),
        ("c", "30.00"),
        ("d", "40.00"),
    ] {
        h.command("kiosk-1", charge(rid, amount)).await;
    }
    h.run_until(30_000, "every charge approved", |h| {
        if h.point.open_intent(T1).is_some() {
            h.point.pay(T1);
        }
        ["a", "b", "c", "d"]
            .iter()
            .all(|r| h.reached("kiosk-1", r, "approved"))
    })
    .await;
    assert_eq!(
        h.point
            .intent_amounts(T1)
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        [1000, 2000, 3000, 4000],
        "created in arrival order"
    );
    let creates = h
        .point
        .calls()
        .iter()
        .filter(|c| c.what == "create")
        .count();
    assert_eq!(
        creates, 4,
        "never a create while the terminal was held (no 409)"
    );
    // Each is sent only after the one before it ended.
    let log = h.events_of("kiosk-1");
    let at = |rid: &str, state: &str| {
        log.iter()
            .position(|e| e["request_id"] == rid && e["state"] == state)
            .unwrap_or_else(|| panic!("{rid} {state}"))
    };
    for (before, after) in [("a", "b"), ("b", "c"), ("c", "d")] {
        assert!(
            at(before, "approved") < at(after, "sent"),
            "{before} ends before {after} is sent"
        );
    }
}

/// No end-to-end test checks this alone; the fleet runs of network.rs (several stations
/// and terminals at once) rely on it.
#[tokio::test(start_paused = true)]
async fn charges_on_different_terminals_run_at_the_same_time() {
    let mut h = Harness::start(Options::default()).await;
    let one = h.command("kiosk-1", charge("k1", "10.00")).await;
    let two = h.command("kiosk-2", charge("k2", "20.00")).await;
    assert_eq!(states(&one), ["accepted", "sent"]);
    assert_eq!(
        states(&two),
        ["accepted", "sent"],
        "not held behind kiosk-1's charge"
    );
    assert!(h.point.open_intent(T1).is_some() && h.point.open_intent(T2).is_some());
    h.point.pay(T2);
    h.until_state("kiosk-2", "k2", "approved", 5_000).await;
    assert!(
        !h.reached("kiosk-1", "k1", "approved"),
        "each ends on its own"
    );
    h.point.decline(T1);
    h.until_state("kiosk-1", "k1", "declined", 5_000).await;
}

// ================================================================ the request limit

/// The most calls in any window `[t, t + 1 s)` of the manual clock that starts at a call.
fn busiest_second(at: &[i64]) -> usize {
    let mut at = at.to_vec();
    at.sort_unstable();
    let mut best = 0;
    let mut j = 0;
    for i in 0..at.len() {
        while j < at.len() && at[j] < at[i] + 1_000 {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

#[test]
fn the_busiest_second_counts_calls_within_one_second_of_each_other() {
    assert_eq!(busiest_second(&[0, 999, 1_000, 1_999]), 2);
    assert_eq!(busiest_second(&[0, 500, 999, 1_000]), 3);
    assert_eq!(busiest_second(&[]), 0);
}

/// Mirrors network::after_an_outage_no_second_holds_more_requests_than_the_limit:
/// six charges arrive at once on six terminals with `max_requests_per_second = 2`.
#[tokio::test(start_paused = true)]
async fn no_second_of_the_clock_holds_more_api_calls_than_max_requests_per_second() {
    const LIMIT: usize = 2;
    let mut h = Harness::start(Options {
        max_requests_per_second: LIMIT as u32,
        ..Options::stations(6)
    })
    .await;
    for i in 1..=6 {
        let out = h
            .command(&format!("kiosk-{i}"), charge(&format!("c{i}"), "10.00"))
            .await;
        assert_eq!(out[0]["state"], "accepted");
    }
    h.run_until(60_000, "every charge approved", |h| {
        for i in 1..=6 {
            let t = format!("PAX_A910__{i:04}");
            if h.point.open_intent(&t).is_some() {
                h.point.pay(&t);
            }
        }
        (1..=6).all(|i| h.reached(&format!("kiosk-{i}"), &format!("c{i}"), "approved"))
    })
    .await;
    let calls = h.point.calls();
    let at: Vec<i64> = calls.iter().map(|c| c.at_ms).collect();
    let busiest = busiest_second(&at);
    assert!(
        busiest <= LIMIT,
        "{busiest} calls in one second (limit {LIMIT}): {calls:#?}"
    );
    assert_eq!(busiest, LIMIT, "the limit is used, not undershot");
    // Not starved: 6 charges × (create, poll, payment) + the device listing at the limit.
    let took = at.iter().max().unwrap() - START_MS;
    assert!(
        took < 15_000,
        "{} calls took {took} ms at {LIMIT}/s",
        calls.len()
    );
}

/// Mirrors network::retry_after_is_honoured_and_5xx_bursts_still_end_every_charge (its
/// 429 part): a 429's Retry-After holds every call, not only the one that got it.
#[tokio::test(start_paused = true)]
async fn a_429_retry_after_holds_every_api_call_until_it_has_passed() {
    let mut h = Harness::start(Options::default()).await;
    h.point
        .fail(Scope::Creates, Fault::TooMany { retry_after_s: 3 }, 1);
    let out = h.command("kiosk-1", charge("slow", "10.00")).await;
    assert_eq!(states(&out), ["accepted", "waiting"], "{out:#?}");
    assert_eq!(out[1]["reason"], "rate_limited");
    let t429 = h.clock.now();
    assert!(h
        .point
        .calls()
        .iter()
        .any(|c| c.at_ms == t429 && c.fault == Some(Fault::TooMany { retry_after_s: 3 })));
    // Another station's charge during the pause waits for it too.
    h.advance(1_000).await;
    let out = h.command("kiosk-2", charge("other", "10.00")).await;
    assert_eq!(states(&out), ["accepted"], "{out:#?}");
    h.until_state("kiosk-1", "slow", "sent", 10_000).await;
    h.until_state("kiosk-2", "other", "sent", 10_000).await;
    let after: Vec<_> = h
        .point
        .calls()
        .into_iter()
        .filter(|c| c.at_ms > t429)
        .collect();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|c| c.at_ms >= t429 + 3_000),
        "a call left within Retry-After: {after:#?}"
    );
    assert_eq!(h.point.creates().len(), 2);
}

/// Mirrors network::a_charge_is_not_expired_before_its_deadline: the API cannot be
/// reached, so the charge is `expired` when its ttl runs out, within a second, not before.
#[tokio::test(start_paused = true)]
async fn a_charge_the_api_never_took_expires_at_its_deadline_not_before() {
    let mut h = Harness::start(Options::default()).await;
    h.point.fail(Scope::Creates, Fault::Connect, 1_000);
    let cmd = json!({"v":1,"type":"charge","request_id":"late","amount":"10.00","ttl_s":10});
    let out = h.command("kiosk-1", cmd).await;
    assert_eq!(states(&out), ["accepted", "waiting"], "{out:#?}");
    assert_eq!(out[1]["reason"], "api_unreachable");
    h.advance(9_900).await;
    assert!(
        !h.reached("kiosk-1", "late", "expired"),
        "not before the deadline"
    );
    let fin = h.until_state("kiosk-1", "late", "expired", 1_100).await;
    assert_eq!(fin["final"], true);
    assert!(
        h.point
            .calls()
            .iter()
            .filter(|c| c.what == "create")
            .count()
            > 1,
        "it kept trying"
    );
    assert!(h.point.creates().is_empty());
}

// ================================================================ recovery at start

/// Mirrors crash::kill_9_at_random_instants_loses_nothing_and_creates_nothing_twice (a
/// stop while the intent is open) and packaging::charges_queued_before_an_upgrade_finish_after_it.
#[tokio::test(start_paused = true)]
async fn after_a_restart_an_open_charge_is_followed_again_and_ends_approved_with_one_create() {
    let mut h = Harness::start(Options::default()).await;
    let out = h.command("kiosk-1", charge("open-1", "10.00")).await;
    assert_eq!(states(&out), ["accepted", "sent"]);
    h.stop().await;
    let resumed = h.restart_unconnected().await;
    assert_eq!(resumed, 1, "the open charge is resumed");
    h.connect().await;
    let restarted_at = h.clock.now();
    h.point.pay(T1);
    h.until_state("kiosk-1", "open-1", "approved", 5_000).await;
    assert!(
        h.point
            .calls()
            .iter()
            .any(|c| c.what == "get" && c.at_ms >= restarted_at),
        "the new engine polled the intent"
    );
    assert_eq!(h.point.creates().len(), 1, "never created again");
}

/// Mirrors crash_points::a_crash_at_every_fail_point_loses_nothing_and_creates_nothing_twice
/// at `create_before_send`: the send is written ahead, and the create has not left (the
/// request limit holds it) when the agent stops.
#[tokio::test(start_paused = true)]
async fn a_charge_written_ahead_but_never_sent_is_created_exactly_once_after_a_restart() {
    let mut h = Harness::start(Options {
        max_requests_per_second: 1,
        ..Options::default()
    })
    .await;
    // The device listing took this second's only request.
    let out = h.command("kiosk-1", charge("ahead-1", "10.00")).await;
    assert_eq!(states(&out), ["accepted"], "{out:#?}");
    assert!(
        h.point.creates().is_empty(),
        "the create is held by the limit"
    );
    h.stop().await;
    assert_eq!(h.restart_unconnected().await, 1);
    h.connect().await;
    h.until_state("kiosk-1", "ahead-1", "sent", 10_000).await;
    let calls = h.point.calls();
    let list = calls.iter().position(|c| c.what == "list");
    let create = calls.iter().position(|c| c.what == "create");
    assert!(
        list.is_some() && list < create,
        "reconcile looked before it created: {calls:#?}"
    );
    h.point.pay(T1);
    h.until_state("kiosk-1", "ahead-1", "approved", 5_000).await;
    assert_eq!(h.point.creates().len(), 1, "created exactly once");
}

/// Mirrors crash_points at `create_after_send` and
/// e2e_charge::a_lost_create_answer_is_reconciled_through_the_intent_list: the create
/// committed at Mercado Pago and its answer never came before the stop.
#[tokio::test(start_paused = true)]
async fn a_create_that_committed_but_never_answered_before_a_stop_is_adopted_not_sent_again() {
    let mut h = Harness::start(Options::default()).await;
    h.point.fail(Scope::Creates, Fault::CommitThenHang, 1);
    let out = h.command("kiosk-1", charge("hung-1", "10.00")).await;
    assert_eq!(states(&out), ["accepted"], "{out:#?}");
    assert_eq!(
        h.point.creates().len(),
        1,
        "the intent exists at Mercado Pago"
    );
    h.stop().await;
    assert_eq!(h.restart_unconnected().await, 1);
    h.connect().await;
    h.until_state("kiosk-1", "hung-1", "sent", 10_000).await;
    h.point.pay(T1);
    let fin = h.until_state("kiosk-1", "hung-1", "approved", 5_000).await;
    assert_eq!(h.point.creates().len(), 1, "adopted, never created again");
    assert_eq!(fin["intent_id"], h.latest("kiosk-1", "hung-1")["intent_id"]);
    assert!(!states(&h.story("kiosk-1", "hung-1")).contains(&"needs_attention".to_string()));
}

/// Mirrors packaging::charges_queued_before_an_upgrade_finish_after_it: a charge accepted
/// and waiting for its terminal at the stop is sent once, after the one ahead of it.
#[tokio::test(start_paused = true)]
async fn a_charge_waiting_for_its_terminal_at_a_stop_is_sent_once_after_the_restart() {
    let mut h = Harness::start(Options::default()).await;
    h.command("kiosk-1", charge("ahead", "10.00")).await;
    let out = h.command("kiosk-1", charge("behind", "20.00")).await;
    assert_eq!(states(&out), ["accepted", "waiting"]);
    h.stop().await;
    assert_eq!(h.restart_unconnected().await, 2);
    h.connect().await;
    h.advance(5_000).await;
    assert_eq!(h.point.creates().len(), 1, "still behind the first");
    h.point.pay(T1);
    h.until_state("kiosk-1", "ahead", "approved", 5_000).await;
    h.until_state("kiosk-1", "behind", "sent", 5_000).await;
    h.point.pay(T1);
    h.until_state("kiosk-1", "behind", "approved", 5_000).await;
    assert_eq!(
        h.point
            .intent_amounts(T1)
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        [1000, 2000],
        "each created once, in order"
    );
}

/// Mirrors n4_broker_restart::sigterm_with_persistence_loses_no_command_and_no_event:
/// events not acknowledged before a stop are sent again, after `Connected` only, and
/// acknowledged ones are not.
#[tokio::test(start_paused = true)]
async fn unacknowledged_events_are_resent_after_connected_and_acknowledged_ones_are_not() {
    let mut h = Harness::start(Options::default()).await;
    h.auto_ack = false;
    h.command("kiosk-1", charge("out-1", "10.00")).await;
    let unacked: Vec<_> = h
        .seen()
        .into_iter()
        .filter(|s| s.outbox_id.is_some())
        .collect();
    assert_eq!(
        states(
            &unacked
                .iter()
                .map(|s| s.payload.clone())
                .collect::<Vec<_>>()
        ),
        ["accepted", "sent"]
    );
    h.stop().await;

    let mark = h.seen().len();
    h.restart_unconnected().await;
    h.advance(2_000).await;
    let before = h.seen().split_off(mark);
    assert!(before.is_empty(), "nothing before Connected: {before:#?}");
    h.auto_ack = true;
    h.connect().await;
    let after = h.seen().split_off(mark);
    assert!(after[0].resync, "a Resync marker first: {after:#?}");
    assert_eq!(
        after[1..3],
        unacked[..],
        "the same outbox entries, same ids and payloads"
    );

    // Acknowledged now: the next reconnect has nothing to resend.
    h.stop().await;
    let mark = h.seen().len();
    h.restart_unconnected().await;
    h.connect().await;
    let again = h.seen().split_off(mark);
    assert!(again.first().is_some_and(|s| s.resync), "{again:#?}");
    assert!(
        again.iter().all(|s| s.outbox_id.is_none()),
        "acknowledged events are not resent: {again:#?}"
    );
}
