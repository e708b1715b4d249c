//! End to end, with real parts: Mosquitto started by the harness on a free port, the
//! Point simulator over TLS, the agent in-process, MQTT 5 stations and the real
//! `mosquitto_pub`/`mosquitto_sub` clients. One charge outcome per test.

mod common;

use std::time::Duration;

use common::agent::{charge, stations, AgentOpts, TestAgent};
use common::{mosquitto_pub, Mosquitto, MosquittoSub, MqttStation};
use pointgate::sim::TerminalMode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

struct World {
    _broker: Mosquitto,
    agent: TestAgent,
    station: MqttStation,
    /// Every event seen so far, in order: waits look here first, so an event that came
    /// while the test waited for another one is not lost.
    log: Vec<(String, Value)>,
}

/// Broker, simulator, agent, and station `kiosk-1` subscribed to its events, with the
/// agent online (stations wait for it before their first command).
async fn world(opts: AgentOpts) -> World {
    let mut w = common::World::builder()
        .agent(opts)
        .station("kiosk-1-test")
        .start()
        .await;
    World {
        station: w.take_station(),
        _broker: w.broker.take().expect("a broker"),
        agent: w.agent,
        log: Vec::new(),
    }
}

impl World {
    async fn send(&mut self, station: &str, payload: Vec<u8>) {
        let topic = self.agent.cmd_topic(station);
        self.station.publish(&topic, payload).await;
    }

    /// The first event at or after log position `from` on `station`'s topic for which
    /// `pred` holds, waiting for more as needed. Panics after `WAIT` with what it saw.
    async fn event_from(
        &mut self,
        from: usize,
        station: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let topic = self.agent.evt_topic(station);
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut i = from;
        loop {
            while i < self.log.len() {
                let (t, v) = &self.log[i];
                i += 1;
                if *t == topic && pred(v) {
                    return v.clone();
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.station.next_message(left).await {
                Some(m) => {
                    let v = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                    self.log.push((m.topic, v));
                }
                None => panic!(
                    "no matching event on {topic} within {WAIT:?}; saw {:#?}",
                    self.log
                ),
            }
        }
    }

    async fn event(&mut self, station: &str, request_id: &str, state: &str) -> Value {
        self.event_from(0, station, |v| {
            v["request_id"] == request_id && v["state"] == state
        })
        .await
    }

    /// Events of `request_id` on `station`'s topic until the final one; returns them all.
    async fn story(&mut self, station: &str, request_id: &str) -> Vec<Value> {
        let mut events = Vec::new();
        let mut from = 0;
        loop {
            let v = self
                .event_from(from, station, |v| v["request_id"] == request_id)
                .await;
            from = self
                .log
                .iter()
                .position(|(_, x)| *x == v)
                .map(|p| p + 1)
                .unwrap_or(from);
            let done = v["final"] == true;
            events.push(v);
            if done {
                return events;
            }
        }
    }

    /// Send a command and return the refusal that follows it.
    async fn refusal(&mut self, station: &str, payload: Vec<u8>) -> Value {
        let mark = self.log.len();
        self.send(station, payload).await;
        self.event_from(mark, station, |v| v["state"] == "refused")
            .await
    }
}

fn states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_charge_reports_every_step_and_the_confirmed_payment() {
    let mut w = world(AgentOpts::default()).await;
    w.send("kiosk-1", charge("sale-1", "15.00")).await;
    let events = w.story("kiosk-1", "sale-1").await;
    let s = states(&events);
    assert_eq!(s.first().map(String::as_str), Some("accepted"));
    assert!(s.contains(&"sent".to_string()), "{s:?}");
    assert_eq!(s.last().map(String::as_str), Some("approved"));
    let last = events.last().unwrap();
    assert_eq!(last["amount"], "15.00");
    assert_eq!(last["payment"]["status"], "approved");
    assert!(last["intent_id"].is_string());
    // seq counts 1, 2, 3... per request.
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(w.agent.sim.ledger().len(), 1);
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_outcome_amounts_map_to_declined_and_failed() {
    let mut w = world(AgentOpts::default()).await;
    for (rid, amount, want, code) in [
        ("rej", "12.00", "declined", None),
        ("rev", "11.00", "declined", None),
        ("err", "13.00", "failed", Some("terminal_error")),
    ] {
        w.send("kiosk-1", charge(rid, amount)).await;
        let events = w.story("kiosk-1", rid).await;
        let last = events.last().unwrap();
        assert_eq!(last["state"], want, "{rid}: {events:?}");
        if let Some(code) = code {
            assert_eq!(last["error"]["code"], code);
        }
        assert!(!states(&events).contains(&"approved".to_string()));
    }
    assert!(w.agent.sim.duplicated_references().is_empty());
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmation_required_with_an_undecided_payment_is_never_approved() {
    let mut w = world(AgentOpts {
        terminal: TerminalMode::Manual,
        point_extra: vec!["confirm_window = \"1s\""],
        ..AgentOpts::default()
    })
    .await;
    w.send("kiosk-1", charge("cr-1", "20.00")).await;
    w.event("kiosk-1", "cr-1", "sent").await;
    let intent = w
        .agent
        .sim
        .intents()
        .into_iter()
        .next()
        .expect("an intent exists");
    w.agent.sim.advance(&intent.id, "ON_TERMINAL").unwrap();
    w.agent
        .sim
        .advance(&intent.id, "CONFIRMATION_REQUIRED")
        .unwrap();
    let m = w
        .event_from(0, "kiosk-1", |v| {
            matches!(v["state"].as_str(), Some("needs_attention" | "approved"))
        })
        .await;
    assert_eq!(m["state"], "needs_attention");
    assert_eq!(m["final"], false);
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_charge_on_a_busy_terminal_waits_then_runs() {
    let mut w = world(AgentOpts {
        terminal: TerminalMode::Manual,
        ..AgentOpts::default()
    })
    .await;
    w.send("kiosk-1", charge("first", "10.00")).await;
    w.event("kiosk-1", "first", "sent").await;
    w.send("kiosk-1", charge("second", "11.50")).await;
    let waiting = w.event("kiosk-1", "second", "waiting").await;
    assert_eq!(waiting["reason"], "terminal_busy");
    assert_eq!(
        w.agent.sim.ledger().len(),
        1,
        "the second charge is not created while the first holds the terminal"
    );
    let first = w.agent.sim.intents()[0].id.clone();
    w.agent.sim.advance(&first, "ON_TERMINAL").unwrap();
    w.agent.sim.advance(&first, "PROCESSING").unwrap();
    w.agent.sim.advance(&first, "PROCESSED").unwrap();
    w.agent.sim.advance(&first, "FINISHED").unwrap();
    let events = w.story("kiosk-1", "first").await;
    assert_eq!(states(&events).last().unwrap(), "approved");
    // Now the second is created.
    w.event("kiosk-1", "second", "sent").await;
    assert_eq!(w.agent.sim.ledger().len(), 2);
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_cancels_an_open_intent() {
    let mut w = world(AgentOpts {
        terminal: TerminalMode::Manual,
        ..AgentOpts::default()
    })
    .await;
    w.send("kiosk-1", charge("to-cancel", "30.00")).await;
    w.event("kiosk-1", "to-cancel", "sent").await;
    w.send(
        "kiosk-1",
        json!({"v":1,"type":"cancel","request_id":"c-1","target":"to-cancel"})
            .to_string()
            .into_bytes(),
    )
    .await;
    let charge_story = w.story("kiosk-1", "to-cancel").await;
    assert_eq!(states(&charge_story).last().unwrap(), "canceled");
    let cancel_story = w.story("kiosk-1", "c-1").await;
    assert_eq!(states(&cancel_story), vec!["accepted", "done"]);
    let intent = &w.agent.sim.intents()[0];
    assert_eq!(intent.state, "CANCELED");
    // Canceling again: the target is final.
    let r = w
        .refusal(
            "kiosk-1",
            json!({"v":1,"type":"cancel","request_id":"c-2","target":"to-cancel"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(r["error"]["code"], "not_cancelable");
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_this_validation_produces_reaches_the_station_and_nothing_reaches_the_api() {
    let mut w = world(AgentOpts {
        stations: stations(&[
            ("kiosk-1", &["PAX_A910__0001"]),
            ("kiosk-2", &["PAX_A910__0002"]),
            ("kiosk-3", &["PAX_STANDALONE__0003"]),
        ]),
        standalone: vec!["PAX_STANDALONE__0003"],
        terminal: TerminalMode::Manual,
        ..AgentOpts::default()
    })
    .await;
    let big = format!(
        r#"{{"v":1,"type":"charge","request_id":"big","amount":"1.00","description":"{}"}}"#,
        "x".repeat(9000)
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("kiosk-1", b"not json".to_vec(), "bad_json"),
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
        let m = w.refusal(station, payload).await;
        assert_eq!(m["error"]["code"], code, "{m}");
        assert_eq!(m["seq"], 0);
        assert_eq!(m["final"], true);
        assert!(m["error"]["message"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
    }
    // A repeat with other content is a conflict carrying the original's latest event.
    w.send("kiosk-1", charge("dup", "10.00")).await;
    w.event("kiosk-1", "dup", "accepted").await;
    let r = w.refusal("kiosk-1", charge("dup", "11.00")).await;
    assert_eq!(r["error"]["code"], "conflict");
    assert_eq!(r["current"]["request_id"], "dup");
    // The same content again is answered with the latest event, not a second charge.
    w.send("kiosk-1", charge("dup", "10")).await;
    // A reference owned by another request.
    w.send("kiosk-2", json!({"v":1,"type":"charge","request_id":"r1","amount":"10.00","external_reference":"ref-123"}).to_string().into_bytes()).await;
    w.event("kiosk-2", "r1", "accepted").await;
    let r = w.refusal("kiosk-2", json!({"v":1,"type":"charge","request_id":"r2","amount":"10.00","external_reference":"ref-123"}).to_string().into_bytes()).await;
    assert_eq!(r["error"]["code"], "duplicate_reference");
    // On the terminal: not cancelable through the API.
    w.event("kiosk-1", "dup", "sent").await;
    let intent = w
        .agent
        .sim
        .intents()
        .into_iter()
        .find(|i| i.device_id == "PAX_A910__0001")
        .unwrap();
    w.agent.sim.advance(&intent.id, "ON_TERMINAL").unwrap();
    w.event("kiosk-1", "dup", "on_terminal").await;
    let r = w
        .refusal(
            "kiosk-1",
            json!({"v":1,"type":"cancel","request_id":"c9","target":"dup"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(r["error"]["code"], "not_cancelable");
    // Only the two accepted charges reached the API: one create each, nothing twice.
    let ledger = w.agent.sim.ledger();
    assert_eq!(ledger.len(), 2, "{ledger:?}");
    assert!(w.agent.sim.duplicated_references().is_empty());
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_refuses_charges_beyond_max_pending() {
    let mut w = world(AgentOpts {
        terminal: TerminalMode::Manual,
        queue_extra: vec!["max_pending = 1"],
        ..AgentOpts::default()
    })
    .await;
    w.send("kiosk-1", charge("one", "10.00")).await;
    w.event("kiosk-1", "one", "accepted").await;
    let r = w.refusal("kiosk-2", charge("two", "10.00")).await;
    assert_eq!(r["error"]["code"], "queue_full");
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_as_the_station_get_an_approved_charge_with_exactly_one_create() {
    let (broker, mut agent) = common::World::builder()
        .start()
        .await
        .into_broker_and_agent();
    let evt = agent.evt_topic("kiosk-1");
    let status = agent.status_topic();
    let mut sub = MosquittoSub::start(broker.port(), &[evt.as_str(), status.as_str()]);
    sub.wait_for(|m| m.topic == status && m.payload.contains("online"), WAIT);
    mosquitto_pub(
        broker.port(),
        &agent.cmd_topic("kiosk-1"),
        r#"{"v":1,"type":"charge","request_id":"cli-1","amount":"15"}"#,
    );
    let last = sub.wait_for(
        |m| m.topic == evt && m.payload.contains(r#""final":true"#),
        WAIT,
    );
    let v: Value = serde_json::from_str(&last.payload).unwrap();
    assert_eq!(v["state"], "approved", "{}", last.payload);
    assert_eq!(v["amount"], "15.00");
    let reference = agent.sim.ledger()[0].external_reference.clone().unwrap();
    assert_eq!(agent.sim.creates_for(&reference), 1);
    agent.stop().await;
}

/// The create commits at Mercado Pago but its answer is lost. With the intent list
/// served, reconcile finds the intent and adopts it: one create, `approved` as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_answer_is_reconciled_through_the_intent_list() {
    use pointgate::sim::{Fault, FaultScope};
    let mut w = world(AgentOpts::default()).await;
    for (rid, fault) in [
        ("drop-1", Fault::CommitThenDrop { remaining: Some(1) }),
        (
            "5xx-1",
            Fault::CommitThen5xx {
                status: 502,
                remaining: Some(1),
            },
        ),
    ] {
        w.agent.sim.set_fault_scoped(FaultScope::Creates, fault);
        w.send("kiosk-1", charge(rid, "15.00")).await;
        let events = w.story("kiosk-1", rid).await;
        let s = states(&events);
        assert_eq!(
            s.last().map(String::as_str),
            Some("approved"),
            "{rid}: {s:?}"
        );
        assert!(!s.contains(&"needs_attention".to_string()), "{rid}: {s:?}");
        assert!(s.contains(&"sent".to_string()), "{rid}: {s:?}");
    }
    // Two charges, two creates that committed, and not one more.
    let ledger = w.agent.sim.ledger();
    assert_eq!(ledger.len(), 2, "{ledger:?}");
    assert!(w.agent.sim.duplicated_references().is_empty());
    w.agent.stop().await;
}

/// The same, with the list endpoints not served: the agent cannot decide, so the charge
/// goes `needs_attention` (never a second create), then the payment search by
/// `external_reference` finds the approved payment: `approved`, resolved by lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_answer_without_the_list_needs_attention_and_is_never_resent() {
    use pointgate::sim::{Fault, FaultScope};
    let mut w = world(AgentOpts::default()).await;
    w.agent.sim.set_serve_intent_lists(false);
    w.agent.sim.set_fault_scoped(
        FaultScope::Creates,
        Fault::CommitThenDrop { remaining: Some(1) },
    );
    w.send("kiosk-1", charge("nolist-1", "15.00")).await;
    let events = w.story("kiosk-1", "nolist-1").await;
    let s = states(&events);
    assert!(s.contains(&"needs_attention".to_string()), "{s:?}");
    let last = events.last().unwrap();
    assert_eq!(last["state"], "approved", "{s:?}");
    assert_eq!(last["resolved_by"], "lookup");
    assert_eq!(last["payment"]["status"], "approved");
    assert_eq!(w.agent.sim.ledger().len(), 1);
    assert!(w.agent.sim.duplicated_references().is_empty());
    w.agent.stop().await;
}
