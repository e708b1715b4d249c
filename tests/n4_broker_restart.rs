//! N4: the broker restarted mid-flow.
//!
//! (a) SIGTERM with persistence (the shipped config and ACL): events queued for a station
//!     that is away, events made while the broker is down, and commands queued for an
//!     agent that is away all arrive; stations with persistent sessions see every event
//!     of each request, in `seq` order, without a gap; one create per charge.
//! (b) SIGKILL without persistence: every session is gone. After reconnecting without a
//!     session the agent republishes the latest event of every open or recent request;
//!     stations re-send their commands (same `request_id`) and get the current event
//!     back, not a second charge.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::acl;
use common::agent::{charge, AgentOpts};
use common::proxy::{FaultProxy, ProxyMode};
use common::{Mosquitto, MqttStation, Msg, World};
use pointgate::sim::{SimHandle, TerminalMode};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn json(m: &Msg) -> Value {
    serde_json::from_slice(&m.payload).unwrap_or(Value::Null)
}

/// Waits on `s` for an event of `request_id` on `topic` in `state`, looking first at what
/// `s` already received.
async fn event(s: &mut MqttStation, topic: &str, request_id: &str, state: &str) -> Value {
    let is = |m: &Msg| {
        let v = json(m);
        m.topic == topic && v["request_id"] == request_id && v["state"] == state
    };
    if let Some(m) = s.seen().iter().find(|m| is(m)) {
        return json(m);
    }
    json(&s.wait_for(is, WAIT).await)
}

/// Waits until `s` has received, at or after position `from` of what it saw, an event on
/// `topic` equal to `want`.
async fn copy_of(s: &mut MqttStation, topic: &str, from: usize, want: &Value) {
    let is = |m: &Msg| m.topic == topic && json(m) == *want;
    if s.seen()[from..].iter().any(is) {
        return;
    }
    s.wait_for(is, WAIT).await;
}

/// Every event after position `from` repeats one seen before it (same request, same
/// `seq`, same content): nothing new happened, nothing was refused.
fn only_repeats(s: &MqttStation, from: usize) {
    let before: Vec<Value> = s.seen()[..from].iter().map(json).collect();
    for m in &s.seen()[from..] {
        let v = json(m);
        if v["request_id"].is_string() {
            assert!(before.contains(&v), "not a repeat: {v}");
        }
    }
}

/// The payment intent the simulator holds for this amount (cents); each charge of a
/// test has its own amount.
fn intent_for(sim: &SimHandle, cents: u64) -> String {
    let intents = sim.intents();
    let found: Vec<_> = intents.iter().filter(|i| i.amount == Some(cents)).collect();
    assert_eq!(found.len(), 1, "one intent of {cents}: {intents:?}");
    found[0].id.clone()
}

/// Moves an intent through the terminal to FINISHED (the payment approved).
fn finish(sim: &SimHandle, intent: &str) {
    for to in ["ON_TERMINAL", "PROCESSING", "PROCESSED", "FINISHED"] {
        sim.advance(intent, to)
            .unwrap_or_else(|e| panic!("advance {intent} to {to}: {e}"));
    }
}

/// Every event of `request_id` that `s` received on `topic`, duplicates dropped by `seq`
/// (as a station does), in arrival order; asserts they arrived in increasing `seq`
/// order, starting at 1, with no gap, and ends final.
fn complete_story(seen_msgs: &[Msg], topic: &str, request_id: &str) -> Vec<Value> {
    let mut seen: BTreeMap<u64, Value> = BTreeMap::new();
    let mut order = Vec::new();
    for m in seen_msgs.iter().filter(|m| m.topic == topic) {
        let v = json(m);
        if v["request_id"] != request_id {
            continue;
        }
        let seq = v["seq"].as_u64().expect("seq");
        if seen.contains_key(&seq) {
            continue;
        }
        if let Some(last) = order.last() {
            assert!(
                seq > *last,
                "{request_id}: seq {seq} after {last}: {seen:?}"
            );
        }
        order.push(seq);
        seen.insert(seq, v);
    }
    let want: Vec<u64> = (1..=order.len() as u64).collect();
    assert_eq!(order, want, "{request_id}: a gap in the events: {seen:?}");
    let events: Vec<Value> = seen.into_values().collect();
    assert_eq!(
        events.last().map(|v| v["final"].clone()),
        Some(Value::Bool(true)),
        "{request_id}: {events:?}"
    );
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_persistence_loses_no_command_and_no_event() {
    let mut w = World::builder()
        .acl(&["kiosk-1", "kiosk-2"])
        .agent(AgentOpts {
            terminal: TerminalMode::Manual,
            ..AgentOpts::default()
        })
        .start()
        .await;
    let mut b = w.acl.take().expect("the ACL broker");
    let mut agent = w.agent;
    let evt1 = agent.evt_topic("kiosk-1");
    let evt2 = agent.evt_topic("kiosk-2");
    let status = agent.status_topic();
    // A live observer with the agent's rights: it tells the test when an event is at the
    // broker.
    let mut spy = b.station(acl::AGENT_USER, "spy", true).await;
    spy.subscribe(&format!("{}/station/+/evt", agent.prefix()))
        .await;
    spy.subscribe(&status).await;
    spy.wait_for(|m| m.topic == status && json(m)["state"] == "online", WAIT)
        .await;
    let mut k1 = b.station("kiosk-1", "kiosk-1", false).await;
    k1.subscribe(&evt1).await;
    let mut k2 = b.station("kiosk-2", "kiosk-2", false).await;
    k2.subscribe(&evt2).await;

    // A charge in progress; kiosk-1 goes away (its session stays) while it moves on.
    k1.publish(&agent.cmd_topic("kiosk-1"), charge("a1", "10.00"))
        .await;
    event(&mut k1, &evt1, "a1", "sent").await;
    let mut k1_seen: Vec<Msg> = k1.seen().to_vec();
    k1.disconnect().await;
    let a1 = intent_for(&agent.sim, 1000);
    agent.sim.advance(&a1, "ON_TERMINAL").unwrap();
    event(&mut spy, &evt1, "a1", "on_terminal").await;
    agent.sim.advance(&a1, "PROCESSING").unwrap();
    event(&mut spy, &evt1, "a1", "processing").await;

    // The broker stops (SIGTERM: it saves); the payment finishes while it is down.
    tokio::task::block_in_place(|| b.broker.stop_term());
    agent.sim.advance(&a1, "PROCESSED").unwrap();
    agent.sim.advance(&a1, "FINISHED").unwrap();
    tokio::task::block_in_place(|| b.broker.restart());
    // kiosk-2 (its harness client reconnects by itself) and the agent come back.
    k2.wait_connacks(2, WAIT).await;
    assert_eq!(k2.status().session_present, Some(true));

    // Now the agent goes away, and kiosk-2's commands queue in its session, across a
    // second SIGTERM restart.
    agent.stop_agent().await;
    k2.publish(&agent.cmd_topic("kiosk-2"), charge("b1", "20.00"))
        .await;
    k2.publish(&agent.cmd_topic("kiosk-2"), charge("b2", "21.00"))
        .await;
    tokio::task::block_in_place(|| b.broker.restart());
    k2.wait_connacks(3, WAIT).await;
    agent.start_again();

    // kiosk-1 comes back to its session: what was queued and what came since.
    let mut k1 = b.station("kiosk-1", "kiosk-1", false).await;
    assert_eq!(k1.status().session_present, Some(true));
    event(&mut k1, &evt1, "a1", "approved").await;
    k1_seen.extend(k1.seen().iter().cloned());
    let a1_story = complete_story(&k1_seen, &evt1, "a1");
    let states: Vec<&str> = a1_story
        .iter()
        .filter_map(|v| v["state"].as_str())
        .collect();
    assert_eq!(
        states,
        ["accepted", "sent", "on_terminal", "processing", "approved"],
        "{a1_story:?}"
    );

    // The commands queued at the broker reached the agent: both run, in order.
    event(&mut k2, &evt2, "b1", "sent").await;
    finish(&agent.sim, &intent_for(&agent.sim, 2000));
    event(&mut k2, &evt2, "b1", "approved").await;
    event(&mut k2, &evt2, "b2", "sent").await;
    finish(&agent.sim, &intent_for(&agent.sim, 2100));
    event(&mut k2, &evt2, "b2", "approved").await;
    complete_story(k2.seen(), &evt2, "b1");
    complete_story(k2.seen(), &evt2, "b2");

    assert_eq!(agent.sim.ledger().len(), 3, "{:?}", agent.sim.ledger());
    assert!(agent.sim.duplicated_references().is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_without_persistence_republishes_latest_events_and_resends_are_answered_not_doubled(
) {
    let broker = Mosquitto::start_default();
    // The agent reaches the broker through a proxy, so the test decides when it may
    // reconnect: after the station has subscribed again.
    let proxy = FaultProxy::start(broker.port()).await;
    let (mut broker, mut agent) = World::builder()
        .with_broker(broker)
        .agent_url(&proxy.url())
        .agent(AgentOpts {
            terminal: TerminalMode::Manual,
            ..AgentOpts::default()
        })
        .start()
        .await
        .into_broker_and_agent();
    let evt1 = agent.evt_topic("kiosk-1");
    let cmd1 = agent.cmd_topic("kiosk-1");
    let status = agent.status_topic();
    let mut k1 = MqttStation::connect(broker.port(), "kiosk-1", false).await;
    k1.subscribe(&evt1).await;
    k1.subscribe(&status).await;
    k1.wait_for(|m| m.topic == status && json(m)["state"] == "online", WAIT)
        .await;

    // c0 ended (recent), c1 is at the terminal, c2 waits for it.
    k1.publish(&cmd1, charge("c0", "10.00")).await;
    event(&mut k1, &evt1, "c0", "sent").await;
    finish(&agent.sim, &intent_for(&agent.sim, 1000));
    let c0 = event(&mut k1, &evt1, "c0", "approved").await;
    k1.publish(&cmd1, charge("c1", "11.50")).await;
    let c1 = event(&mut k1, &evt1, "c1", "sent").await;
    k1.publish(&cmd1, charge("c2", "12.50")).await;
    let c2 = event(&mut k1, &evt1, "c2", "waiting").await;
    assert_eq!(c2["reason"], "terminal_busy");
    let latest = [("c0", &c0), ("c1", &c1), ("c2", &c2)];

    // SIGKILL, and back without persistence: every session and subscription is gone.
    proxy.set_mode(ProxyMode::Reject);
    tokio::task::block_in_place(|| {
        broker.kill();
        broker.restart();
    });
    k1.wait_connacks(2, WAIT).await;
    assert_eq!(k1.status().session_present, Some(false));
    k1.subscribe(&evt1).await;
    let mark = k1.seen().len();
    proxy.set_mode(ProxyMode::Forward);

    // The agent finds no session and republishes each request's latest event, unchanged
    // (events still in its outbox, not yet acknowledged by the old broker, come again too:
    // the station drops those by seq).
    for (_, last) in latest {
        copy_of(&mut k1, &evt1, mark, last).await;
    }
    only_repeats(&k1, mark);

    // The station, unsure what it missed, re-sends every command: each is answered with
    // its current event (same seq), none is charged again.
    let mark = k1.seen().len();
    for (rid, amount) in [("c0", "10.00"), ("c1", "11.50"), ("c2", "12.50")] {
        k1.publish(&cmd1, charge(rid, amount)).await;
    }
    for (_, last) in latest {
        copy_of(&mut k1, &evt1, mark, last).await;
    }
    only_repeats(&k1, mark);
    assert_eq!(
        agent.sim.ledger().len(),
        2,
        "c0 and c1 once each, c2 not yet"
    );

    // And the flow goes on: c1 finishes, then c2 runs, each created once.
    finish(&agent.sim, &intent_for(&agent.sim, 1150));
    event(&mut k1, &evt1, "c1", "approved").await;
    event(&mut k1, &evt1, "c2", "sent").await;
    finish(&agent.sim, &intent_for(&agent.sim, 1250));
    event(&mut k1, &evt1, "c2", "approved").await;
    assert_eq!(agent.sim.ledger().len(), 3, "{:?}", agent.sim.ledger());
    assert!(agent.sim.duplicated_references().is_empty());
    agent.stop().await;
}
