//! `agent/status` with the agent as a process: `online` once it runs; `offline` through
//! the MQTT last will when it is killed (`kill -9`); `offline` published by a clean stop
//! (SIGTERM); `online` again after a restart.

mod common;

use std::time::Duration;

use common::agent::AgentOpts;
use common::{MqttStation, World};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_offline_after_a_kill_and_after_a_clean_stop() {
    let World { broker, agent, .. } = World::builder()
        .agent(AgentOpts {
            log_level: Some("info"),
            ..AgentOpts::default()
        })
        .setup_only()
        .start()
        .await;
    let (broker, mut agent) = (broker.expect("a broker"), agent);
    agent.spawn(&[]);
    let status = agent.status_topic();
    let mut st = MqttStation::connect(broker.port(), "watcher", true).await;
    st.subscribe(&status).await;
    let state = |m: &common::Msg| m.json()["state"].as_str().unwrap_or("").to_string();

    let m = st.wait_for(|m| m.topic == status, WAIT).await;
    let first = state(&m);
    if first != "online" {
        st.wait_for(|m| m.topic == status && m.json()["state"] == "online", WAIT)
            .await;
    }
    agent.kill9();
    let m = st.wait_for(|m| m.topic == status, WAIT).await;
    assert_eq!(
        state(&m),
        "offline",
        "the last will after kill -9: {}",
        m.text()
    );
    assert_eq!(m.json()["v"], 1);

    agent.spawn(&[]);
    st.wait_for(|m| m.topic == status && m.json()["state"] == "online", WAIT)
        .await;
    assert_eq!(agent.terminate().code(), Some(0), "a clean stop exits 0");
    let m = st.wait_for(|m| m.topic == status, WAIT).await;
    assert_eq!(
        state(&m),
        "offline",
        "a clean stop says offline: {}",
        m.text()
    );

    // And it stays retained for a station that connects now.
    let mut late = MqttStation::connect(broker.port(), "late", true).await;
    late.subscribe(&status).await;
    let m = late.wait_for(|m| m.topic == status, WAIT).await;
    assert_eq!(state(&m), "offline");
}
