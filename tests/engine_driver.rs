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
