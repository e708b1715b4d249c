//! The station side through a real Mosquitto: MQTT 5 request/response (Response Topic,
//! Correlation Data, Message Expiry), an MQTT 3.1.1 station, `not_cancelable`, and S2's
//! event/status/store part (the access token never leaves the token file).

mod common;

use std::time::Duration;

use common::agent::{charge, AgentOpts, TestAgent, TOKEN};
use common::{Mosquitto, MqttStation, MqttStation311, PubOpts, World};
use pointgate::sim::TerminalMode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// Broker, simulator, agent, and a station `client_id` that saw the agent online on
/// `agent/status`.
async fn world(opts: AgentOpts, client_id: &str) -> (Mosquitto, TestAgent, MqttStation) {
    let mut w = World::builder()
        .agent(opts)
        .status_station(client_id)
        .start()
        .await;
    let st = w.take_station();
    let (broker, agent) = w.into_broker_and_agent();
    (broker, agent, st)
}

/// Every message until one satisfies `done`; all of them, in order.
async fn collect_until(
    station: &mut MqttStation,
    done: impl Fn(&common::Msg) -> bool,
) -> Vec<common::Msg> {
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = station
            .next_message(left)
            .await
            .unwrap_or_else(|| panic!("timed out; saw {:#?}", all));
        let stop = done(&m);
        all.push(m);
        if stop {
            return all;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_events_go_to_the_response_topic_with_the_correlation_data() {
    let (_broker, mut agent, mut st) = world(AgentOpts::default(), "kiosk-1-rr").await;
    let prefix = agent.prefix();
    let reply = format!("{prefix}/station/kiosk-1/reply/lane-3");
    let evt = agent.evt_topic("kiosk-1");
    st.subscribe(&reply).await;
    st.subscribe(&evt).await;
    st.publish_with_props(
        &agent.cmd_topic("kiosk-1"),
        charge("rr-1", "15.00"),
        &reply,
        b"corr-77",
        None,
    )
    .await;
    let msgs = collect_until(&mut st, |m| m.topic == reply && m.json()["final"] == true).await;
    let on_reply: Vec<&common::Msg> = msgs.iter().filter(|m| m.topic == reply).collect();
    let states: Vec<Value> = on_reply.iter().map(|m| m.json()["state"].clone()).collect();
    assert_eq!(states.first(), Some(&json!("accepted")), "{states:?}");
    assert_eq!(states.last(), Some(&json!("approved")), "{states:?}");
    for m in &on_reply {
        assert_eq!(
            m.correlation_data.as_deref(),
            Some(&b"corr-77"[..]),
            "{m:?}"
        );
    }
    // None of this request's events went to the station's plain evt topic.
    assert!(
        !msgs
            .iter()
            .any(|m| m.topic == evt && m.json()["request_id"] == "rr-1"),
        "{msgs:#?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_message_expiry_is_the_charge_deadline() {
    let (_broker, mut agent, mut st) = world(
        AgentOpts {
            terminal: TerminalMode::Manual,
            ..AgentOpts::default()
        },
        "kiosk-1-exp",
    )
    .await;
    let evt = agent.evt_topic("kiosk-1");
    st.subscribe(&evt).await;
    // The first charge holds the terminal (manual: nobody pays), the second waits behind
    // it with a 2 s Message Expiry and so expires, never sent.
    st.publish(&agent.cmd_topic("kiosk-1"), charge("hold-1", "15.00"))
        .await;
    st.wait_for(
        |m| m.topic == evt && m.json()["request_id"] == "hold-1" && m.json()["state"] == "sent",
        WAIT,
    )
    .await;
    st.publish_opts(
        &agent.cmd_topic("kiosk-1"),
        charge("exp-1", "16.00"),
        PubOpts {
            message_expiry: Some(2),
            ..PubOpts::default()
        },
    )
    .await;
    let msgs = collect_until(&mut st, |m| {
        m.topic == evt && m.json()["request_id"] == "exp-1" && m.json()["final"] == true
    })
    .await;
    let last = msgs.last().unwrap().json();
    assert_eq!(last["state"], "expired", "{last}");
    let creates = agent
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(creates, 1, "only the first charge was sent");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_3_1_1_station_charges_through_the_fixed_topics() {
    let (broker, mut agent) = World::builder().start().await.into_broker_and_agent();
    let mut st = MqttStation311::connect(broker.port(), "kiosk-1-v4", true).await;
    let evt = agent.evt_topic("kiosk-1");
    let status = agent.status_topic();
    st.subscribe(&status).await;
    st.wait_for(|m| m.topic == status && m.json()["state"] == "online", WAIT)
        .await;
    st.subscribe(&evt).await;
    st.publish(&agent.cmd_topic("kiosk-1"), charge("v4-1", "15.00"))
        .await;
    let m = st
        .wait_for(
            |m| m.topic == evt && m.json()["request_id"] == "v4-1" && m.json()["final"] == true,
            WAIT,
        )
        .await;
    assert_eq!(m.json()["state"], "approved", "{}", m.text());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceling_a_final_charge_is_refused_not_cancelable() {
    let (_broker, mut agent, mut st) = world(AgentOpts::default(), "kiosk-1-nc").await;
    let evt = agent.evt_topic("kiosk-1");
    st.subscribe(&evt).await;
    st.publish(&agent.cmd_topic("kiosk-1"), charge("nc-1", "15.00"))
        .await;
    st.wait_for(
        |m| m.topic == evt && m.json()["request_id"] == "nc-1" && m.json()["final"] == true,
        WAIT,
    )
    .await;
    let cancel = json!({"v": 1, "type": "cancel", "request_id": "nc-2", "target": "nc-1"});
    st.publish(&agent.cmd_topic("kiosk-1"), cancel.to_string())
        .await;
    let m = st
        .wait_for(|m| m.topic == evt && m.json()["request_id"] == "nc-2", WAIT)
        .await;
    let v = m.json();
    assert_eq!(v["state"], "refused", "{v}");
    assert_eq!(v["error"]["code"], "not_cancelable", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("final"),
        "{v}"
    );
    agent.stop().await;
}

/// S2 (events, status, store): through a whole charge, the token appears in no MQTT
/// message under the prefix (events, retained status and terminal states) and in no file
/// of the store. Positive control: the same scan finds the charge's request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_token_never_reaches_events_status_or_the_store() {
    let (_broker, mut agent, mut st) = world(AgentOpts::default(), "kiosk-1-s2").await;
    st.subscribe(&format!("{}/#", agent.prefix())).await;
    st.publish(
        &agent.cmd_topic("kiosk-1"),
        charge("s2-canary-rid", "15.00"),
    )
    .await;
    let evt = agent.evt_topic("kiosk-1");
    let msgs = collect_until(&mut st, |m| {
        m.topic == evt && m.json()["request_id"] == "s2-canary-rid" && m.json()["final"] == true
    })
    .await;
    agent.stop().await;
    let needle = TOKEN.as_bytes();
    let contains = |hay: &[u8], n: &[u8]| hay.windows(n.len()).any(|w| w == n);
    let mut saw_rid = false;
    for m in &msgs {
        assert!(
            !contains(&m.payload, needle),
            "token in {}: {}",
            m.topic,
            m.text()
        );
        saw_rid |= contains(&m.payload, b"s2-canary-rid");
    }
    assert!(saw_rid, "the scan sees the messages it should");
    let mut files = 0;
    let mut rid_in_store = false;
    let mut stack = vec![agent.dir.join("state")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("store dir") {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                assert!(!contains(&bytes, needle), "token in {}", p.display());
                rid_in_store |= contains(&bytes, b"s2-canary-rid");
                files += 1;
            }
        }
    }
    assert!(files > 0 && rid_in_store, "the store scan reads the store");
}
