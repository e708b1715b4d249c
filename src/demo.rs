//! `pointgate demo`: the whole flow on one machine with nothing installed. It starts the
//! embedded MQTT broker, the Point simulator (HTTPS, its own CA), the agent in-process,
//! and scripted stations that publish real MQTT commands: charges that end approved,
//! declined, failed and canceled, and an API outage in the middle. It prints what
//! happens and a summary table, and exits non-zero if any charge ended otherwise than
//! the script expects.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::EmbeddedBroker;
use crate::config::Config;
use crate::sim::{self, Fault, SimConfig, TerminalMode};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo set-up: {0}")]
    Setup(String),
    #[error("demo: {0}")]
    Failed(String),
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> DemoError {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// One scripted charge and what it must end as.
struct Step {
    station: &'static str,
    request_id: &'static str,
    amount: &'static str,
    expect: &'static str,
    note: &'static str,
}

#[derive(Debug, Clone)]
struct Seen {
    states: Vec<String>,
    started: Instant,
    ended: Option<Duration>,
    intent: Option<String>,
}

const STATIONS: [(&str, &str); 4] = [
    ("kiosk-01", "DEMO_A910__0001"),
    ("kiosk-02", "DEMO_A910__0002"),
    ("lane-03", "DEMO_SMART__0003"),
    ("scale-04", "DEMO_SMART__0004"),
];

fn write_config(dir: &Path, api: &str, broker: &str) -> Result<std::path::PathBuf, DemoError> {
    let token = dir.join("access_token");
    std::fs::write(&token, "TEST-demo-token\n").map_err(setup("token file"))?;
    restrict(&token)?;
    let mut stations = String::new();
    for (s, t) in STATIONS {
        stations.push_str(&format!("\n[stations.{s}]\nterminals = [\"{t}\"]\n"));
    }
    let text = format!(
        r#"[store]
id = "demo-store"
site = "MLA"

[point]
base_url = "{api}"
access_token_file = "{token}"
extra_ca_file = "{ca}"
poll_interval = "300ms"
max_requests_per_second = 20
confirm_window = "10s"

[mqtt]
url = "{broker}"
keep_alive = "5s"

[queue]
dir = "{state}"
{stations}"#,
        token = token.display(),
        ca = dir.join("sim-ca.pem").display(),
        state = dir.join("state").display(),
    );
    let path = dir.join("pointgate.toml");
    std::fs::write(&path, text).map_err(setup("config file"))?;
    Ok(path)
}

#[cfg(unix)]
fn restrict(path: &Path) -> Result<(), DemoError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(setup("token file mode"))
}

#[cfg(not(unix))]
fn restrict(_: &Path) -> Result<(), DemoError> {
    Ok(())
}

/// A scripted station: one MQTT 5 client for all demo stations, subscribed to their
/// event topics; events are forwarded as (station, JSON).
async fn stations_client(
    broker_port: u16,
    prefix: &str,
) -> Result<(AsyncClient, mpsc::UnboundedReceiver<(String, Value)>), DemoError> {
    let mut o = MqttOptions::new("demo-stations", "127.0.0.1", broker_port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(o, 256);
    let (tx, rx) = mpsc::unbounded_channel();
    let evt_filter = format!("{prefix}/station/+/evt");
    let status = format!("{prefix}/agent/status");
    client
        .subscribe(evt_filter, QoS::AtLeastOnce)
        .await
        .map_err(setup("subscribe"))?;
    client
        .subscribe(status, QoS::AtLeastOnce)
        .await
        .map_err(setup("subscribe"))?;
    let prefix = prefix.to_string();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).to_string();
                    let station = topic
                        .strip_prefix(&format!("{prefix}/station/"))
                        .and_then(|r| r.strip_suffix("/evt"))
                        .unwrap_or("agent")
                        .to_string();
                    if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                        if tx.send((station, v)).is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    Ok((client, rx))
}

fn charge_json(request_id: &str, amount: &str) -> Vec<u8> {
    serde_json::json!({"v": 1, "type": "charge", "request_id": request_id, "amount": amount})
        .to_string()
        .into_bytes()
}

/// Run the demo. Returns an error when set-up fails or an outcome differs.
pub async fn run() -> Result<(), DemoError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let t0 = Instant::now();
    let dir = tempfile_dir()?;
    println!(
        "pointgate demo: everything runs on this machine, in {}",
        dir.display()
    );

    let broker = EmbeddedBroker::start().map_err(setup("embedded broker"))?;
    println!("  broker     {} (embedded)", broker.url());

    let sim_cfg = SimConfig {
        devices: STATIONS.iter().map(|(_, t)| t.to_string()).collect(),
        ca_out: Some(dir.join("sim-ca.pem")),
        token: "TEST-demo-token".into(),
        terminal: TerminalMode::Auto {
            pickup: Duration::from_millis(1500),
            process: Duration::from_millis(400),
        },
        ..SimConfig::default()
    };
    let sim = sim::start(sim_cfg).await.map_err(setup("simulator"))?;
    println!(
        "  Point API  {} (simulator, CA in sim-ca.pem)",
        sim.base_url()
    );

    let config_path = write_config(&dir, &sim.base_url(), &broker.url())?;
    let config = Config::load(Some(&config_path), &Default::default()).map_err(setup("config"))?;
    let prefix = config.topic_prefix();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(crate::run(config, shutdown.clone()));

    let (client, mut events) = stations_client(broker.addr().port(), &prefix).await?;
    // Stations wait for the agent to say online before their first command.
    wait_for(&mut events, Duration::from_secs(15), |s, v| {
        s == "agent" && v["state"] == "online"
    })
    .await
    .ok_or_else(|| DemoError::Failed("the agent did not come online".into()))?;
    println!("  agent      online, topics under {prefix}/\n");

    let steps = [
        Step {
            station: "kiosk-01",
            request_id: "sale-1001",
            amount: "25.00",
            expect: "approved",
            note: "card approved",
        },
        Step {
            station: "kiosk-02",
            request_id: "sale-2001",
            amount: "12.00",
            expect: "declined",
            note: "simulator amount 1200: rejected",
        },
        Step {
            station: "scale-04",
            request_id: "sale-4001",
            amount: "13.00",
            expect: "failed",
            note: "simulator amount 1300: terminal error",
        },
        Step {
            station: "lane-03",
            request_id: "sale-3001",
            amount: "40.00",
            expect: "canceled",
            note: "the station cancels while OPEN",
        },
    ];
    let mut seen: BTreeMap<(String, String), Seen> = BTreeMap::new();
    let cmd_topic = |station: &str| format!("{prefix}/station/{station}/cmd");

    println!("Part 1: four stations, four outcomes");
    for s in &steps {
        println!(
            "  {:<9} → charge {} of {} ({})",
            s.station, s.request_id, s.amount, s.note
        );
        seen.insert(
            (s.station.into(), s.request_id.into()),
            Seen {
                states: vec![],
                started: Instant::now(),
                ended: None,
                intent: None,
            },
        );
        client
            .publish(
                cmd_topic(s.station),
                QoS::AtLeastOnce,
                false,
                charge_json(s.request_id, s.amount),
            )
            .await
            .map_err(setup("publish"))?;
    }
    let mut cancel_sent = false;
    let deadline = Instant::now() + Duration::from_secs(40);
    while !all_final(&seen) {
        let Some((station, ev)) = next_event(&mut events, deadline).await else {
            break;
        };
        record(&mut seen, &station, &ev);
        if station == "lane-03"
            && ev["request_id"] == "sale-3001"
            && ev["state"] == "sent"
            && !cancel_sent
        {
            cancel_sent = true;
            println!("  {:<9} → cancel sale-3001", "lane-03");
            let cancel = serde_json::json!({"v":1,"type":"cancel","request_id":"cancel-3001","target":"sale-3001"});
            client
                .publish(
                    cmd_topic("lane-03"),
                    QoS::AtLeastOnce,
                    false,
                    cancel.to_string().into_bytes(),
                )
                .await
                .map_err(setup("publish"))?;
        }
    }

    println!("\nPart 2: the Point API goes down while a charge arrives");
    sim.set_fault(Fault::Down);
    println!("  simulator  API DOWN");
    seen.insert(
        ("kiosk-01".into(), "sale-1002".into()),
        Seen {
            states: vec![],
            started: Instant::now(),
            ended: None,
            intent: None,
        },
    );
    println!("  {:<9} → charge sale-1002 of 18.50", "kiosk-01");
    client
        .publish(
            cmd_topic("kiosk-01"),
            QoS::AtLeastOnce,
            false,
            charge_json("sale-1002", "18.50"),
        )
        .await
        .map_err(setup("publish"))?;
    let outage_start = Instant::now();
    let waited = wait_for_recording(&mut events, &mut seen, Duration::from_secs(20), |s, v| {
        s == "kiosk-01" && v["request_id"] == "sale-1002" && v["state"] == "waiting"
    })
    .await;
    if waited.is_none() {
        return Err(DemoError::Failed(
            "the charge was not reported waiting during the outage".into(),
        ));
    }
    // Keep the API down a little longer, as a real outage would be.
    let _ = wait_for_recording(&mut events, &mut seen, Duration::from_secs(3), |_, _| false).await;
    sim.set_fault(Fault::None);
    let outage = outage_start.elapsed();
    println!("  simulator  API back after {:.1} s", outage.as_secs_f64());
    let deadline = Instant::now() + Duration::from_secs(40);
    while !all_final(&seen) {
        let Some((station, ev)) = next_event(&mut events, deadline).await else {
            break;
        };
        record(&mut seen, &station, &ev);
    }

    shutdown.cancel();
    let _ = agent.await;

    // Summary.
    let expected: BTreeMap<(String, String), &str> = steps
        .iter()
        .map(|s| ((s.station.to_string(), s.request_id.to_string()), s.expect))
        .chain(std::iter::once((
            ("kiosk-01".to_string(), "sale-1002".to_string()),
            "approved",
        )))
        .collect();
    println!("\nSummary");
    println!(
        "  {:<9} {:<10} {:<10} {:<8} {:>7}  events",
        "station", "request", "outcome", "expected", "time"
    );
    let mut wrong = 0;
    for ((station, rid), s) in &seen {
        let outcome = s.states.last().cloned().unwrap_or_else(|| "(none)".into());
        let want = expected
            .get(&(station.clone(), rid.clone()))
            .copied()
            .unwrap_or("?");
        if outcome != want {
            wrong += 1;
        }
        println!(
            "  {:<9} {:<10} {:<10} {:<8} {:>6.1}s  {}",
            station,
            rid,
            outcome,
            want,
            s.ended.unwrap_or_default().as_secs_f64(),
            s.states.join(" → ")
        );
    }
    let ledger = sim.ledger();
    let dups = sim.duplicated_references();
    println!(
        "  outage: API down {:.1} s; charge sale-1002 waited and then ran",
        outage.as_secs_f64()
    );
    println!(
        "  simulator ledger: {} intents created, {} created twice",
        ledger.len(),
        dups.len()
    );
    println!("  total {:.1} s", t0.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&dir);
    if wrong > 0 || !dups.is_empty() {
        return Err(DemoError::Failed(format!(
            "{wrong} charge(s) ended otherwise than expected"
        )));
    }
    println!("demo OK");
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf, DemoError> {
    let base = std::env::temp_dir().join(format!("pointgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(setup("work directory"))?;
    Ok(base)
}

fn all_final(seen: &BTreeMap<(String, String), Seen>) -> bool {
    seen.values().all(|s| s.ended.is_some())
}

fn record(seen: &mut BTreeMap<(String, String), Seen>, station: &str, ev: &Value) {
    let rid = ev["request_id"].as_str().unwrap_or_default().to_string();
    let state = ev["state"].as_str().unwrap_or_default().to_string();
    let Some(s) = seen.get_mut(&(station.to_string(), rid.clone())) else {
        if station != "agent" {
            println!("  {:<9} ← {} {}", station, rid, state);
        }
        return;
    };
    if s.states.last() == Some(&state) {
        return;
    }
    if let Some(i) = ev["intent_id"].as_str() {
        s.intent = Some(i.to_string());
    }
    let detail = match (
        ev["reason"].as_str(),
        ev["error"]["code"].as_str(),
        ev["payment"]["status"].as_str(),
    ) {
        (Some(r), _, _) => format!(" ({r})"),
        (_, Some(c), _) => format!(" ({c})"),
        (_, _, Some(p)) => format!(" (payment {p})"),
        _ => String::new(),
    };
    println!("  {:<9} ← {} {}{}", station, rid, state, detail);
    s.states.push(state);
    if ev["final"].as_bool() == Some(true) {
        s.ended = Some(s.started.elapsed());
    }
}

async fn next_event(
    rx: &mut mpsc::UnboundedReceiver<(String, Value)>,
    deadline: Instant,
) -> Option<(String, Value)> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, rx.recv()).await.ok().flatten()
}

async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<(String, Value)>,
    within: Duration,
    pred: impl Fn(&str, &Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + within;
    while let Some((s, v)) = next_event(rx, deadline).await {
        if pred(&s, &v) {
            return Some(v);
        }
    }
    None
}

async fn wait_for_recording(
    rx: &mut mpsc::UnboundedReceiver<(String, Value)>,
    seen: &mut BTreeMap<(String, String), Seen>,
    within: Duration,
    pred: impl Fn(&str, &Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + within;
    while let Some((s, v)) = next_event(rx, deadline).await {
        record(seen, &s, &v);
        if pred(&s, &v) {
            return Some(v);
        }
    }
    None
}
