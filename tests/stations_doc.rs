//! `docs/stations.md` as written: its `mosquitto_pub` examples and its Python (paho-mqtt
//! 2.x) example are taken from the page and run, against Mosquitto, the simulator and the
//! agent, and each charge must end `approved`. Only the broker port and the store's
//! prefix are changed (the page's commands use the default port).

mod common;

use std::process::Command;
use std::time::Duration;

use common::agent::{stations, AgentOpts, TestAgent};
use common::{Mosquitto, MosquittoSub};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn page() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/stations.md");
    std::fs::read_to_string(path).expect("read docs/stations.md")
}

/// The page's fenced blocks of this language, in order.
fn blocks(lang: &str) -> Vec<String> {
    let page = page();
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = page.as_str();
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("```").expect("a closed block");
        out.push(body[..end].to_owned());
        rest = &body[end..];
    }
    out
}

/// The one `sh` block that contains `needle`.
fn sh_block(needle: &str) -> String {
    let found: Vec<String> = blocks("sh")
        .into_iter()
        .filter(|b| b.contains(needle))
        .collect();
    assert_eq!(found.len(), 1, "one sh block with {needle:?}: {found:?}");
    found[0].clone()
}

/// Broker, simulator (auto-paying terminal) and agent with the page's station `kiosk-01`.
async fn world() -> (Mosquitto, TestAgent) {
    common::World::builder()
        .agent(AgentOpts {
            stations: stations(&[("kiosk-01", &["PAX_A910__0001"])]),
            ..AgentOpts::default()
        })
        .status_station("doc-observer")
        .start()
        .await
        .into_broker_and_agent()
}

/// Runs a shell block of the page with `P` and `S` set and the port added.
fn run_sh(block: &str, port: u16, prefix: &str) {
    let script = block.replace("-h 127.0.0.1", &format!("-h 127.0.0.1 -p {port}"));
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("P", prefix)
        .env("S", "kiosk-01")
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_s_mosquitto_pub_charge_ends_approved_and_its_repeat_charges_nothing() {
    let (broker, mut agent) = world().await;
    let prefix = agent.prefix();
    let evt = agent.evt_topic("kiosk-01");
    let mut sub = MosquittoSub::start(broker.port(), &[&evt]);
    let charge = sh_block(r#""request_id":"sale-1","amount":"15.00""#);
    run_sh(&charge, broker.port(), &prefix);
    let last = sub.wait_for(|m| json(&m.payload)["final"] == true, WAIT);
    let v = json(&last.payload);
    assert_eq!(v["request_id"], "sale-1");
    assert_eq!(v["state"], "approved", "{v}");
    // "Publishing the same line again prints the approved event again (same seq)".
    let seen = sub.seen().len();
    run_sh(&charge, broker.port(), &prefix);
    let again = sub.wait_for(|m| json(&m.payload)["request_id"] == "sale-1", WAIT);
    assert_eq!(json(&again.payload), v);
    assert!(sub.seen().len() == seen + 1);
    // The query and terminals examples are answered.
    run_sh(&sh_block(r#""type":"query""#), broker.port(), &prefix);
    let q = sub.wait_for(|m| json(&m.payload)["request_id"] == "q-1", WAIT);
    assert_eq!(json(&q.payload)["target"], v);
    run_sh(&sh_block(r#""type":"terminals""#), broker.port(), &prefix);
    let t = sub.wait_for(|m| json(&m.payload)["request_id"] == "t-1", WAIT);
    assert_eq!(json(&t.payload)["terminals"][0]["mode"], "PDV");
    assert_eq!(agent.sim.ledger().len(), 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_s_mqtt5_mosquitto_pub_request_gets_its_events_on_the_response_topic() {
    let (broker, mut agent) = world().await;
    let prefix = agent.prefix();
    let resp = format!("{prefix}/station/kiosk-01/resp");
    let mut sub = MosquittoSub::start(broker.port(), &[&resp]);
    let block = sh_block("correlation-data");
    // The page starts its own listener in the background; ours replaces it.
    let publish: String = block
        .split_inclusive('\n')
        .skip_while(|l| !l.starts_with("mosquitto_pub"))
        .collect();
    run_sh(&publish, broker.port(), &prefix);
    let last = sub.wait_for(|m| json(&m.payload)["final"] == true, WAIT);
    assert_eq!(json(&last.payload)["state"], "approved", "{}", last.payload);
    assert_eq!(json(&last.payload)["request_id"], "sale-2");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Needs python3 with paho-mqtt 2.x: `.ci/run deps` installs it (pip install 'paho-mqtt>=2,<3').
async fn the_page_s_python_example_charges_and_exits_0_on_approved() {
    let (broker, mut agent) = world().await;
    let python = blocks("python").into_iter().next().expect("a python block");
    let script = python
        .replace(
            "BROKER, PORT = \"127.0.0.1\", 1883",
            &format!("BROKER, PORT = \"127.0.0.1\", {}", broker.port()),
        )
        .replace(
            "PREFIX = \"pointgate/store-0001\"",
            &format!("PREFIX = \"{}\"", agent.prefix()),
        );
    assert_ne!(script, python, "the example's settings lines were found");
    let dir = common::Workdir::new();
    let file = dir.write("station.py", &script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["60", "python3"])
            .arg(&file)
            .output()
            .expect("run python3")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("final: approved"), "{stdout}");
    assert_eq!(agent.sim.ledger().len(), 1);
    agent.stop().await;
}
