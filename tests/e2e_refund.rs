//! Refunds end to end: Mosquitto started by the harness, the Point simulator over TLS,
//! the agent in-process, an MQTT 5 station. The simulator's own payment record (read
//! over its API with a client that trusts only its CA) is the witness of what was
//! refunded and how many times.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::agent::{charge, stations, AgentOpts, TestAgent};
use common::{Mosquitto, MqttStation};
use pointgate::sim::{Fault, FaultScope, TerminalMode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};

/// An upper bound, not a pace: retries after an outage back off up to 30 s.
const WAIT: Duration = Duration::from_secs(60);

struct World {
    _broker: Mosquitto,
    agent: TestAgent,
    station: MqttStation,
    /// Every event seen so far, in order.
    log: Vec<(String, Value)>,
}

async fn world(opts: AgentOpts) -> World {
    let mut w = common::World::builder()
        .agent(opts)
        .station("kiosk-1-test")
        .online_within(WAIT)
        .start()
        .await;
    World {
        station: w.take_station(),
        _broker: w.broker.take().expect("a broker"),
        agent: w.agent,
        log: Vec::new(),
    }
}

fn refund(request_id: &str, target: &str, extra: Value) -> Vec<u8> {
    let mut v = json!({"v": 1, "type": "refund", "request_id": request_id, "target": target});
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v.to_string().into_bytes()
}

fn cancel(request_id: &str, target: &str) -> Vec<u8> {
    json!({"v": 1, "type": "cancel", "request_id": request_id, "target": target})
        .to_string()
        .into_bytes()
}

/// A payment as the simulator holds it, read over its API with a client that trusts
/// only the simulator's CA.
async fn sim_payment(sim: &pointgate::sim::SimHandle, id: &str) -> Value {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(sim.ca_pem().as_bytes()) {
        roots.add(cert.expect("CA PEM parses")).expect("CA added");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    client
        .get(format!("{}/v1/payments/{id}", sim.base_url()))
        .bearer_auth(common::agent::TOKEN)
        .send()
        .await
        .expect("the simulator answers")
        .json()
        .await
        .expect("a payment")
}

fn states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

impl World {
    async fn send(&mut self, payload: Vec<u8>) {
        let topic = self.agent.cmd_topic("kiosk-1");
        self.station.publish(&topic, payload).await;
    }

    async fn event_from(&mut self, from: usize, pred: impl Fn(&Value) -> bool) -> Value {
        let topic = self.agent.evt_topic("kiosk-1");
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
                None => panic!("no matching event within {WAIT:?}; saw {:#?}", self.log),
            }
        }
    }

    async fn event(&mut self, request_id: &str, state: &str) -> Value {
        self.event_from(0, |v| v["request_id"] == request_id && v["state"] == state)
            .await
    }

    /// Events of `request_id` until its final one.
    async fn story(&mut self, request_id: &str) -> Vec<Value> {
        let mut events = Vec::new();
        let mut from = 0;
        loop {
            let v = self
                .event_from(from, |v| v["request_id"] == request_id && v["seq"] != 0)
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
    async fn refusal(&mut self, payload: Vec<u8>) -> Value {
        let mark = self.log.len();
        self.send(payload).await;
        self.event_from(mark, |v| v["state"] == "refused").await
    }

    /// A charge that ends `approved`; returns its payment id.
    async fn approved(&mut self, request_id: &str, amount: &str) -> String {
        self.send(charge(request_id, amount)).await;
        let events = self.story(request_id).await;
        let last = events.last().expect("a final event");
        assert_eq!(last["state"], "approved", "{events:?}");
        last["payment"]["id"]
            .as_str()
            .expect("the payment id")
            .to_string()
    }

    /// The simulator's payment, over its API.
    async fn payment(&self, id: &str) -> Value {
        sim_payment(&self.agent.sim, id).await
    }

    /// Refund POSTs that reached the simulator and were answered.
    fn refund_posts(&self) -> usize {
        self.agent
            .sim
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/refunds"))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_then_full_api_refunds_end_refunded_and_the_payment_shows_both() {
    let mut w = world(AgentOpts::default()).await;
    let pid = w.approved("sale-1", "15.00").await;
    w.send(refund("rf-1", "sale-1", json!({"amount": "5"})))
        .await;
    let events = w.story("rf-1").await;
    assert_eq!(states(&events), vec!["accepted", "sent", "refunded"]);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "refund");
    assert_eq!(last["amount"], "5.00");
    assert!(last["intent_id"].is_string(), "the refund id: {last}");
    let p = w.payment(&pid).await;
    assert_eq!(p["transaction_amount_refunded"].as_f64(), Some(5.0));
    assert_eq!(p["status_detail"], "partially_refunded");
    // No amount: what is left.
    w.send(refund("rf-2", "sale-1", json!({}))).await;
    let events = w.story("rf-2").await;
    assert_eq!(states(&events).last().unwrap(), "refunded");
    assert_eq!(events.last().unwrap()["amount"], "10.00");
    let p = w.payment(&pid).await;
    assert_eq!(p["status"], "refunded");
    assert_eq!(p["transaction_amount_refunded"].as_f64(), Some(15.0));
    assert_eq!(p["refunds"].as_array().map(Vec::len), Some(2));
    // Nothing is left now.
    let r = w.refusal(refund("rf-3", "sale-1", json!({}))).await;
    assert_eq!(r["error"]["code"], "not_refundable");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("0.00"),
        "{r}"
    );
    assert_eq!(w.refund_posts(), 2);
    // The charge itself still says approved.
    let q = w
        .refusal(
            json!({"v":1,"type":"cancel","request_id":"c-1","target":"sale-1"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(q["error"]["code"], "not_cancelable");
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_beyond_what_is_left_are_not_refundable_and_never_sent() {
    let mut w = world(AgentOpts::default()).await;
    let pid = w.approved("sale-2", "10.00").await;
    let r = w
        .refusal(refund("over", "sale-2", json!({"amount": "10.01"})))
        .await;
    assert_eq!(r["error"]["code"], "not_refundable");
    assert!(r["error"]["message"].as_str().unwrap().contains("10.00"));
    // A pending refund counts: keep it pending with the API down.
    w.agent.sim.set_fault(Fault::Down);
    w.send(refund("part", "sale-2", json!({"amount": "4.00"})))
        .await;
    w.event("part", "accepted").await;
    let r = w
        .refusal(refund("over-2", "sale-2", json!({"amount": "6.01"})))
        .await;
    assert_eq!(r["error"]["code"], "not_refundable");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("6.00"),
        "what is left is named: {r}"
    );
    // What is left exactly is fine.
    w.send(refund("rest", "sale-2", json!({"amount": "6.00"})))
        .await;
    w.event("rest", "accepted").await;
    w.agent.sim.set_fault(Fault::None);
    for rid in ["part", "rest"] {
        let events = w.story(rid).await;
        assert_eq!(states(&events).last().unwrap(), "refunded", "{events:?}");
    }
    let p = w.payment(&pid).await;
    assert_eq!(p["transaction_amount_refunded"].as_f64(), Some(10.0));
    assert_eq!(p["refunds"].as_array().map(Vec::len), Some(2));
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_approved_charges_of_this_station_can_be_refunded() {
    let mut w = world(AgentOpts::default()).await;
    w.send(charge("declined-1", "12.00")).await;
    let events = w.story("declined-1").await;
    assert_eq!(states(&events).last().unwrap(), "declined");
    let r = w.refusal(refund("rf-d", "declined-1", json!({}))).await;
    assert_eq!(r["error"]["code"], "not_refundable");
    assert!(r["error"]["message"].as_str().unwrap().contains("declined"));
    let r = w.refusal(refund("rf-u", "no-such-sale", json!({}))).await;
    assert_eq!(r["error"]["code"], "unknown_target");
    // A refund is not a charge: it cannot be refunded.
    w.approved("ok-1", "20.00").await;
    w.send(refund("rf-ok", "ok-1", json!({"amount": "1.00"})))
        .await;
    w.story("rf-ok").await;
    let r = w.refusal(refund("rf-rf", "rf-ok", json!({}))).await;
    assert_eq!(r["error"]["code"], "unknown_target");
    assert_eq!(w.refund_posts(), 1);
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_refund_via_terminal_runs_on_the_paying_terminal_and_ends_refunded() {
    let mut w = world(AgentOpts::default()).await;
    let pid = w.approved("sale-t", "25.00").await;
    // Part via terminal: refused, nothing created.
    let r = w
        .refusal(refund(
            "rf-part",
            "sale-t",
            json!({"via": "terminal", "amount": "5.00"}),
        ))
        .await;
    assert_eq!(r["error"]["code"], "not_refundable");
    w.send(refund("rf-t", "sale-t", json!({"via": "terminal"})))
        .await;
    let events = w.story("rf-t").await;
    let s = states(&events);
    assert_eq!(s.first().unwrap(), "accepted");
    assert!(s.contains(&"sent".to_string()), "{s:?}");
    assert_eq!(s.last().unwrap(), "refunded", "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(last["terminal"], "PAX_A910__0001");
    assert_eq!(last["amount"], "25.00");
    assert_eq!(last["payment"]["status"], "refunded");
    let refunds: Vec<_> = w
        .agent
        .sim
        .intents()
        .into_iter()
        .filter(|i| i.kind == pointgate::sim::IntentKind::Refund)
        .collect();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0].device_id, "PAX_A910__0001");
    assert_eq!(refunds[0].state, "FINISHED");
    assert_eq!(Some(refunds[0].id.as_str()), last["intent_id"].as_str());
    let p = w.payment(&pid).await;
    assert_eq!(p["status"], "refunded");
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_via_terminal_waits_behind_a_charge_and_can_be_canceled_while_open() {
    let mut w = world(AgentOpts::default()).await;
    w.approved("sale-q", "30.00").await;
    w.agent.sim.set_terminal_mode(TerminalMode::Manual);
    w.send(charge("busy", "10.00")).await;
    w.event("busy", "sent").await;
    w.send(refund("rf-q", "sale-q", json!({"via": "terminal"})))
        .await;
    let waiting = w.event("rf-q", "waiting").await;
    assert_eq!(waiting["reason"], "terminal_busy");
    // The charge frees the terminal: the refund intent is created, then canceled.
    w.send(cancel("c-busy", "busy")).await;
    w.event("busy", "canceled").await;
    w.event("rf-q", "sent").await;
    w.send(cancel("c-rf", "rf-q")).await;
    let events = w.story("rf-q").await;
    assert_eq!(states(&events).last().unwrap(), "canceled");
    let c = w.story("c-rf").await;
    assert_eq!(states(&c), vec!["accepted", "done"]);
    let intent = w
        .agent
        .sim
        .intents()
        .into_iter()
        .find(|i| i.kind == pointgate::sim::IntentKind::Refund)
        .expect("the refund intent");
    assert_eq!(intent.state, "CANCELED");
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_an_unsent_refund_is_local_and_nothing_reaches_the_api() {
    let mut w = world(AgentOpts::default()).await;
    w.approved("sale-c", "10.00").await;
    w.agent.sim.set_fault(Fault::Down);
    w.send(refund("rf-c", "sale-c", json!({}))).await;
    w.event("rf-c", "accepted").await;
    w.send(cancel("c-rf", "rf-c")).await;
    let events = w.story("rf-c").await;
    assert_eq!(states(&events), vec!["accepted", "canceled"]);
    let c = w.story("c-rf").await;
    assert_eq!(states(&c), vec!["accepted", "done"]);
    w.agent.sim.set_fault(Fault::None);
    // A canceled refund does not count against the charge: all of it can be refunded.
    w.send(refund("rf-all", "sale-c", json!({}))).await;
    let events = w.story("rf-all").await;
    assert_eq!(states(&events).last().unwrap(), "refunded");
    assert_eq!(events.last().unwrap()["amount"], "10.00");
    assert_eq!(w.refund_posts(), 1, "only rf-all reached the API");
    // A final refund is not cancelable.
    let r = w.refusal(cancel("c-again", "rf-all")).await;
    assert_eq!(r["error"]["code"], "not_cancelable");
    w.agent.stop().await;
}

/// N1, the refund part: the API is down for longer than a charge's ttl while a charge
/// and refunds arrive. The charge expires unsent; the refunds wait (`waiting`,
/// `api_unreachable`), go out after recovery and end `refunded`, each exactly once at
/// the simulator even when an answer is lost and the POST is retried with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_wait_out_an_outage_longer_than_a_charge_ttl_and_are_made_exactly_once() {
    let mut w = world(AgentOpts::default()).await;
    let pid = w.approved("sale-n1", "10.00").await;
    w.agent.sim.set_fault(Fault::Down);
    let down = tokio::time::Instant::now();
    w.send(refund("n1-a", "sale-n1", json!({"amount": "3.00"})))
        .await;
    w.send(refund("n1-b", "sale-n1", json!({"amount": "4.00"})))
        .await;
    w.send(
        json!({"v":1,"type":"charge","request_id":"n1-charge","amount":"9.00","ttl_s":10})
            .to_string()
            .into_bytes(),
    )
    .await;
    let expired = w.story("n1-charge").await;
    assert_eq!(states(&expired).last().unwrap(), "expired");
    for rid in ["n1-a", "n1-b"] {
        let waiting = w.event(rid, "waiting").await;
        assert_eq!(waiting["reason"], "api_unreachable");
    }
    assert!(down.elapsed() >= Duration::from_secs(10));
    // The first refund POST after recovery is committed and its answer lost: the agent
    // must retry with the same key and get the same refund back.
    w.agent.sim.set_fault_scoped(
        FaultScope::Creates,
        Fault::CommitThenDrop { remaining: Some(1) },
    );
    for rid in ["n1-a", "n1-b"] {
        let events = w.story(rid).await;
        assert_eq!(states(&events).last().unwrap(), "refunded", "{events:?}");
        assert!(!states(&events).contains(&"expired".to_string()));
    }
    let p = w.payment(&pid).await;
    assert_eq!(p["transaction_amount_refunded"].as_f64(), Some(7.0));
    assert_eq!(
        p["refunds"].as_array().map(Vec::len),
        Some(2),
        "exactly one refund each: {p}"
    );
    let dropped = w
        .agent
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/refunds") && r.status == 0)
        .count();
    assert_eq!(dropped, 1, "one answer was lost and the POST retried");
    assert_eq!(
        w.agent.sim.ledger().len(),
        1,
        "the expired charge never reached the API"
    );
    w.agent.stop().await;
}

/// N2/N3 for refunds: 5xx answers, one after the refund was committed, and a 429 with
/// `Retry-After`: the POST is retried with its key and the payment gets one refund.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_posts_answered_5xx_or_429_are_retried_with_the_same_key_and_made_once() {
    let mut w = world(AgentOpts::default()).await;
    let pid = w.approved("sale-5xx", "12.50").await;
    w.agent.sim.set_fault_scoped(
        FaultScope::Creates,
        Fault::CommitThen5xx {
            status: 500,
            remaining: Some(1),
        },
    );
    w.send(refund("rf-5xx", "sale-5xx", json!({"amount": "2.50"})))
        .await;
    let events = w.story("rf-5xx").await;
    assert_eq!(states(&events).last().unwrap(), "refunded", "{events:?}");
    w.agent.sim.set_fault_scoped(
        FaultScope::Creates,
        Fault::TooMany {
            retry_after_s: 1,
            remaining: Some(2),
        },
    );
    w.send(refund("rf-429", "sale-5xx", json!({"amount": "1.00"})))
        .await;
    let events = w.story("rf-429").await;
    assert_eq!(states(&events).last().unwrap(), "refunded", "{events:?}");
    w.agent.sim.set_fault_scoped(
        FaultScope::Creates,
        Fault::Status5xx {
            status: 503,
            remaining: Some(3),
        },
    );
    w.send(refund("rf-503", "sale-5xx", json!({"amount": "1.00"})))
        .await;
    let events = w.story("rf-503").await;
    assert_eq!(states(&events).last().unwrap(), "refunded", "{events:?}");
    let p = w.payment(&pid).await;
    assert_eq!(p["transaction_amount_refunded"].as_f64(), Some(4.5));
    assert_eq!(p["refunds"].as_array().map(Vec::len), Some(3), "{p}");
    // The faults did happen: 1 + 2 + 3 failed POSTs besides the 3 that succeeded.
    let posts: Vec<u16> = w
        .agent
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/refunds"))
        .map(|r| r.status)
        .collect();
    assert_eq!(posts.iter().filter(|s| **s >= 400).count(), 6, "{posts:?}");
    w.agent.stop().await;
}

/// A restart: one refund whose answer was lost (it may exist, so it is re-POSTed with its
/// key) and one never sent (the API was down) are stored, the agent stops, and the next
/// agent on the same store finishes both: each `refunded`, each made once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_in_flight_or_unsent_resume_after_a_restart_and_are_made_once() {
    use tokio_util::sync::CancellationToken;

    // The agent runs in-process, started and stopped by the test itself.
    let (broker, agent) = common::World::builder()
        .agent(AgentOpts {
            store: "store-restart",
            stations: stations(&[("kiosk-1", &["PAX_A910__0001"])]),
            control: false,
            ..AgentOpts::default()
        })
        .setup_only()
        .start()
        .await
        .into_broker_and_agent();
    let sim = &agent.sim;
    let config = agent.config.clone();
    let prefix = config.topic_prefix();
    let (evt, cmd, status) = (
        format!("{prefix}/station/kiosk-1/evt"),
        format!("{prefix}/station/kiosk-1/cmd"),
        format!("{prefix}/agent/status"),
    );
    let start = |config: pointgate::config::Config| {
        let stop = CancellationToken::new();
        let task = tokio::spawn(pointgate::run(config, stop.clone()));
        (stop, task)
    };
    let mut station = MqttStation::connect(broker.port(), "kiosk-1-restart", true).await;
    station.subscribe(&evt).await;
    station.subscribe(&status).await;
    let (stop, task) = start(config.clone());
    station
        .wait_for(|m| m.topic == status && m.json()["state"] == "online", WAIT)
        .await;
    station.publish(&cmd, charge("sale-r", "10.00")).await;
    let approved = station
        .wait_for(
            |m| m.topic == evt && m.json()["request_id"] == "sale-r" && m.json()["final"] == true,
            WAIT,
        )
        .await
        .json();
    assert_eq!(approved["state"], "approved");
    let pid = approved["payment"]["id"].as_str().unwrap().to_string();

    // Refund 1: committed, answer lost; the API goes down before the retry.
    sim.set_fault_scoped(
        FaultScope::Creates,
        Fault::CommitThenDrop { remaining: Some(1) },
    );
    station
        .publish(&cmd, refund("rr-1", "sale-r", json!({"amount": "3.00"})))
        .await;
    let lost = common::wait_until_async(WAIT, || {
        sim.requests()
            .iter()
            .any(|r| r.path.ends_with("/refunds") && r.status == 0)
    })
    .await;
    assert!(
        lost,
        "the first refund POST was committed and its answer dropped"
    );
    sim.set_fault(Fault::Down);
    // Refund 2: accepted while the API is down, never sent.
    station
        .publish(&cmd, refund("rr-2", "sale-r", json!({"amount": "2.00"})))
        .await;
    station
        .wait_for(
            |m| {
                m.topic == evt
                    && m.json()["request_id"] == "rr-2"
                    && m.json()["state"] == "accepted"
            },
            WAIT,
        )
        .await;
    stop.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the agent stops")
        .expect("joins")
        .expect("ran without error");
    let before: Vec<Value> = station.drain().iter().map(|m| m.json()).collect();
    assert!(
        !before.iter().any(|v| v["request_id"]
            .as_str()
            .is_some_and(|r| r.starts_with("rr-"))
            && v["final"] == true),
        "neither refund ended before the restart: {before:?}"
    );

    sim.set_fault(Fault::None);
    let (stop, task) = start(config.clone());
    // Both end; in whichever order (waiting for one consumes the other's events).
    let mut finals = std::collections::BTreeMap::new();
    while finals.len() < 2 {
        let m = station
            .wait_for(
                |m| {
                    m.topic == evt
                        && m.json()["request_id"]
                            .as_str()
                            .is_some_and(|r| r.starts_with("rr-"))
                        && m.json()["final"] == true
                },
                WAIT,
            )
            .await
            .json();
        finals.insert(m["request_id"].as_str().unwrap().to_string(), m);
    }
    for (rid, last) in &finals {
        assert_eq!(last["state"], "refunded", "{rid}: {last}");
    }
    let refunds: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/refunds"))
        .collect();
    assert!(refunds.len() >= 3, "rr-1 was POSTed again: {refunds:?}");
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, task).await;
    // The payment shows exactly the two refunds.
    let w_payment = sim_payment(sim, &pid).await;
    assert_eq!(w_payment["transaction_amount_refunded"].as_f64(), Some(5.0));
    assert_eq!(
        w_payment["refunds"].as_array().map(Vec::len),
        Some(2),
        "{w_payment}"
    );
    sim.shutdown();
}
