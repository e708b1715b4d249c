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
        assert_eq!(out, [latest.clone()], "the latest event, same seq");
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
