//! N5: a half-open broker connection. A fault proxy between the agent and Mosquitto stops
//! forwarding in both directions without closing anything. The agent (keep-alive 5 s, the smallest allowed)
//! must take the connection as dead within two keep-alives, reconnect once the path
//! works again, and run a charge sent afterwards to `approved`.

mod common;

use std::time::{Duration, Instant};

use common::agent::{charge, AgentOpts, TestAgent};
use common::logs;
use common::proxy::{FaultProxy, ProxyMode};
use common::{wait_until_async, Mosquitto, MqttStation, World};

const WAIT: Duration = Duration::from_secs(30);
/// The smallest keep-alive rumqttc (and so `mqtt.keep_alive`) allows.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Timer and scheduling slack on top of the 2 × keep-alive bound.
const SLACK: Duration = Duration::from_millis(300);

/// Broker, a fault proxy in front of it, simulator and agent (through the proxy,
/// keep-alive [`KEEP_ALIVE`]), and a station `client_id` on the broker directly that saw
/// the agent online.
async fn world(client_id: &str) -> (Mosquitto, FaultProxy, TestAgent, MqttStation) {
    let broker = Mosquitto::start_default();
    let proxy = FaultProxy::start(broker.port()).await;
    let mut w = World::builder()
        .with_broker(broker)
        .agent_url(&proxy.url())
        .agent(AgentOpts {
            mqtt_extra: vec![format!("keep_alive = \"{}s\"", KEEP_ALIVE.as_secs())],
            ..AgentOpts::default()
        })
        .station(client_id)
        .online_within(WAIT)
        .start()
        .await;
    let s = w.take_station();
    let (broker, agent) = w.into_broker_and_agent();
    (broker, proxy, agent, s)
}

async fn approved(s: &mut MqttStation, agent: &TestAgent, request_id: &str) {
    s.publish(&agent.cmd_topic("kiosk-1"), charge(request_id, "15.00"))
        .await;
    let evt = agent.evt_topic("kiosk-1");
    let last = s
        .wait_for(
            |m| m.topic == evt && m.json()["request_id"] == request_id && m.json()["final"] == true,
            WAIT,
        )
        .await;
    assert_eq!(last.json()["state"], "approved", "{}", last.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_broker_connection_is_detected_within_two_keep_alives_and_recovered() {
    let log = logs::capture();
    // The station talks to the broker directly.
    let (_broker, proxy, mut agent, mut s) = world("kiosk-1-n5").await;
    let status = agent.status_topic();
    approved(&mut s, &agent, "before").await;

    let lost = ["broker connection lost", &proxy.url()];
    let lost_before = log.lines_with(&lost).len();
    let connects_before = proxy.accepted();
    let t0 = Instant::now();
    proxy.set_mode(ProxyMode::Blackhole);
    let detected = wait_until_async(WAIT, || log.lines_with(&lost).len() > lost_before).await;
    let took = t0.elapsed();
    assert!(
        detected,
        "the agent never noticed the dead connection:\n{}",
        log.text()
    );
    eprintln!("half-open connection detected after {took:?} (keep-alive {KEEP_ALIVE:?})");
    assert!(
        took <= KEEP_ALIVE * 2 + SLACK,
        "detected after {took:?}, more than two keep-alives ({KEEP_ALIVE:?}): {:?}",
        log.lines_with(&lost)
    );
    // The broker, hearing nothing either, dropped the agent and published its will.
    s.wait_for(
        |m| m.topic == status && m.json()["state"] == "offline",
        WAIT,
    )
    .await;

    // The path works again: the agent comes back through a new proxy connection (the
    // old one stays dead) and says online.
    proxy.set_mode(ProxyMode::Forward);
    s.wait_for(|m| m.topic == status && m.json()["state"] == "online", WAIT)
        .await;
    assert!(proxy.accepted() > connects_before, "the agent reconnected");
    approved(&mut s, &agent, "after").await;
    assert_eq!(agent.sim.ledger().len(), 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_sent_while_the_agent_s_connection_is_half_open_completes_after_recovery() {
    let (_broker, proxy, mut agent, mut s) = world("kiosk-1-n5b").await;
    let status = agent.status_topic();
    proxy.set_mode(ProxyMode::Blackhole);
    // The command reaches the broker while the agent's connection is dead; the broker
    // keeps it in the agent's persistent session once it drops the connection.
    s.publish(&agent.cmd_topic("kiosk-1"), charge("during", "15.00"))
        .await;
    s.wait_for(
        |m| m.topic == status && m.json()["state"] == "offline",
        WAIT,
    )
    .await;
    proxy.set_mode(ProxyMode::Forward);
    let evt = agent.evt_topic("kiosk-1");
    let last = s
        .wait_for(
            |m| m.topic == evt && m.json()["request_id"] == "during" && m.json()["final"] == true,
            WAIT,
        )
        .await;
    assert_eq!(last.json()["state"], "approved", "{}", last.text());
    assert_eq!(agent.sim.ledger().len(), 1);
    agent.stop().await;
}
