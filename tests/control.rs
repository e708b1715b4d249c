//! The operator's tools against a running agent: `pointgate status` and `pointgate queue`
//! (the real binary, through the control socket), SIGHUP (the agent as a process), and
//! S2's control part: the access token never appears in a control socket answer.
//! Real Mosquitto, the Point simulator over TLS, MQTT 5 stations.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::agent::{charge, stations, AgentOpts, TestAgent, TOKEN};
use common::cli::{pointgate, Run};
use common::{Mosquitto, MqttStation};
use pointgate::control::{self, ControlReply, ControlRequest, Outcome};
use pointgate::sim::{Fault, FaultScope, TerminalMode};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

struct World {
    _broker: Mosquitto,
    agent: TestAgent,
    station: MqttStation,
}

/// Broker, simulator, agent, and a station watching every station's events, with the
/// agent online.
async fn world(opts: AgentOpts) -> World {
    let mut w = common::World::builder()
        .agent(opts)
        .station("control-test")
        .start()
        .await;
    World {
        station: w.take_station(),
        _broker: w.broker.expect("a broker"),
        agent: w.agent,
    }
}

/// The event of `request_id` in `state`, already seen or still to come.
async fn event(station: &mut MqttStation, request_id: &str, state: &str) -> Value {
    let matches = |v: &Value| v["request_id"] == request_id && v["state"] == state;
    if let Some(m) = station.seen().iter().find(|m| matches(&m.json())) {
        return m.json();
    }
    station
        .wait_for(|m| m.topic.ends_with("/evt") && matches(&m.json()), WAIT)
        .await
        .json()
}

impl World {
    async fn send(&mut self, station: &str, payload: Vec<u8>) {
        let topic = self.agent.cmd_topic(station);
        self.station.publish(&topic, payload).await;
    }

    async fn event(&mut self, request_id: &str, state: &str) -> Value {
        event(&mut self.station, request_id, state).await
    }

    /// `pointgate ARGS... --config <the agent's file>`.
    async fn cli(&self, args: &[&str]) -> Run {
        let config = self.agent.config_path();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", config.to_str().expect("utf-8 path")]);
        pointgate(&all).await
    }

    /// As `cli`, with `--json`, parsed.
    async fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let run = self.cli(&all).await;
        assert_eq!(run.code, 0, "{args:?}: {run:#?}");
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {run:#?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_agent_online_its_pending_charges_and_terminals() {
    let mut w = world(AgentOpts {
        terminal: TerminalMode::Manual,
        ..AgentOpts::default()
    })
    .await;
    let idle = w.cli_json(&["status"]).await;
    assert_eq!(idle["answer"], "status");
    assert_eq!(idle["agent"]["state"], "online");
    assert_eq!(idle["pending"]["total"], 0);

    w.send("kiosk-1", charge("held", "10.00")).await;
    w.event("held", "sent").await;
    w.send("kiosk-1", charge("second", "11.00")).await;
    w.event("second", "waiting").await;

    let s = w.cli_json(&["status"]).await;
    assert_eq!(s["agent"]["state"], "online");
    assert_eq!(s["agent"]["pending"], 2);
    assert_eq!(s["pending"]["total"], 2);
    assert_eq!(s["pending"]["by_state"], json!({"sent": 1, "waiting": 1}));
    let t = s["terminals"]
        .as_array()
        .expect("terminals")
        .iter()
        .find(|t| t["terminal"] == "PAX_A910__0001")
        .expect("the bound terminal is listed")
        .clone();
    assert_eq!(t["busy"], true);
    assert_eq!(t["current"], "kiosk-1/held");
    // The engine counts the holder among the waiting too (as in the retained
    // TerminalState): at least the second charge waits.
    assert!(t["waiting"].as_u64() >= Some(1), "{t}");
    assert_eq!(s["stations"]["kiosk-1"], json!(["PAX_A910__0001"]));

    let run = w.cli(&["status"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    for text in [
        "online",
        "pending    2",
        "PAX_A910__0001",
        "kiosk-1/held",
        "TERMINAL",
    ] {
        assert!(
            run.stdout.contains(text),
            "{text:?} missing:\n{}",
            run.stdout
        );
    }
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_list_and_show_report_a_charge_and_its_latest_event() {
    let mut w = world(AgentOpts::default()).await;
    w.send("kiosk-1", charge("sale-1", "15.00")).await;
    w.event("sale-1", "approved").await;

    let run = w.cli(&["queue", "list"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    for text in ["kiosk-1/sale-1", "approved", "15.00", "PAX_A910__0001"] {
        assert!(
            run.stdout.contains(text),
            "{text:?} missing:\n{}",
            run.stdout
        );
    }
    let list = w.cli_json(&["queue", "list"]).await;
    let row = list["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .find(|r| r["id"] == "kiosk-1/sale-1")
        .expect("the charge is listed")
        .clone();
    assert_eq!(row["state"], "approved");
    assert_eq!(row["final"], true);
    assert_eq!(row["type"], "charge");

    let show = w.cli_json(&["queue", "show", "kiosk-1/sale-1"]).await;
    assert_eq!(show["answer"], "show");
    assert_eq!(show["state"], "approved");
    assert_eq!(show["stage"], "done");
    assert!(show["external_reference"]
        .as_str()
        .is_some_and(|r| r.starts_with("pg-")));
    let latest = &show["events"][0];
    assert_eq!(latest["state"], "approved");
    assert_eq!(latest["payment"]["status"], "approved");
    let run = w.cli(&["queue", "show", "kiosk-1/sale-1"]).await;
    assert!(run.stdout.contains("kiosk-1/sale-1"), "{run:#?}");
    assert!(run.stdout.contains("approved (final)"), "{run:#?}");

    let run = w.cli(&["queue", "show", "kiosk-1/nope"]).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("no request `nope`"), "{run:#?}");
    let run = w.cli(&["queue", "show", "sale-1"]).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("<station>/<request_id>"), "{run:#?}");
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_cancel_cancels_a_waiting_charge_and_an_open_intent_but_not_one_on_the_terminal() {
    let mut w = world(AgentOpts {
        terminal: TerminalMode::Manual,
        ..AgentOpts::default()
    })
    .await;
    w.send("kiosk-1", charge("held", "10.00")).await;
    w.event("held", "sent").await;
    w.send("kiosk-1", charge("second", "11.00")).await;
    w.event("second", "waiting").await;

    // Waiting for the terminal: canceled at once.
    let run = w.cli(&["queue", "cancel", "kiosk-1/second"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stdout.contains("canceled"), "{run:#?}");
    let ev = w.event("second", "canceled").await;
    assert_eq!(ev["final"], true);

    // OPEN at Mercado Pago: canceled there, then reported.
    let run = w.cli(&["queue", "cancel", "kiosk-1/held"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stdout.contains("canceled"), "{run:#?}");
    w.event("held", "canceled").await;
    let intent = &w.agent.sim.intents()[0];
    assert_eq!(intent.state, "CANCELED");
    assert_eq!(
        w.agent.sim.ledger().len(),
        1,
        "the second was never created"
    );

    // Final, or on the terminal: refused with the reason.
    let run = w.cli(&["queue", "cancel", "kiosk-1/held"]).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("already final"), "{run:#?}");
    w.send("kiosk-1", charge("third", "12.50")).await;
    w.event("third", "sent").await;
    let third = w
        .agent
        .sim
        .intents()
        .into_iter()
        .find(|i| i.state == "OPEN")
        .expect("the third's intent");
    w.agent.sim.advance(&third.id, "ON_TERMINAL").unwrap();
    w.event("third", "on_terminal").await;
    let run = w.cli(&["queue", "cancel", "kiosk-1/third"]).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("cancel it there"), "{run:#?}");
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_resolve_ends_a_needs_attention_charge_as_the_operator_and_nothing_else() {
    let mut w = world(AgentOpts {
        terminal: TerminalMode::Manual,
        ..AgentOpts::default()
    })
    .await;
    // The create is committed at Mercado Pago but its answer is lost, and without the
    // intent list reconcile cannot decide.
    w.agent.sim.set_serve_intent_lists(false);
    w.agent.sim.set_fault_scoped(
        FaultScope::Creates,
        Fault::CommitThenDrop { remaining: Some(1) },
    );
    w.send("kiosk-1", charge("na-1", "15.00")).await;
    w.event("na-1", "needs_attention").await;
    // A charge that is merely OPEN cannot be resolved.
    w.send("kiosk-2", charge("open-1", "16.00")).await;
    w.event("open-1", "sent").await;
    let run = w
        .cli(&["queue", "resolve", "kiosk-2/open-1", "--as", "approved"])
        .await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("not needs_attention"), "{run:#?}");
    let run = w
        .cli(&["queue", "resolve", "kiosk-1/na-1", "--as", "maybe"])
        .await;
    assert_eq!(run.code, 64, "{run:#?}");

    let run = w
        .cli(&["queue", "resolve", "kiosk-1/na-1", "--as", "approved"])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stdout.contains("resolved by the operator"), "{run:#?}");
    let ev = w.event("na-1", "approved").await;
    assert_eq!(ev["final"], true);
    assert_eq!(ev["resolved_by"], "operator");
    let show = w.cli_json(&["queue", "show", "kiosk-1/na-1"]).await;
    assert_eq!(show["state"], "approved");
    let open = w.cli_json(&["queue", "show", "kiosk-2/open-1"]).await;
    assert_eq!(open["state"], "sent", "the other charge is untouched");
    w.agent.stop().await;
}

/// Every kind of control answer, raw from the socket, including errors.
async fn every_answer(socket: &Path, ids: &[&str]) -> Vec<String> {
    let mut requests = vec![ControlRequest::Status, ControlRequest::List];
    for id in ids {
        requests.push(ControlRequest::Show { id: id.to_string() });
        requests.push(ControlRequest::Cancel { id: id.to_string() });
        requests.push(ControlRequest::Resolve {
            id: id.to_string(),
            outcome: Outcome::Declined,
        });
    }
    let mut out = Vec::new();
    for r in &requests {
        let reply = control::call(socket, r, WAIT).await.expect("an answer");
        out.push(serde_json::to_string(&reply).expect("json"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_the_access_token_never_appears_in_a_control_answer() {
    let mut w = world(AgentOpts::default()).await;
    assert_eq!(
        std::fs::read_to_string(w.agent.dir.join("access_token")).unwrap(),
        TOKEN,
        "the canary is the token in use"
    );
    w.send("kiosk-1", charge("s2-ok", "15.00")).await;
    w.event("s2-ok", "approved").await;
    w.send("kiosk-1", charge("s2-bad", "12.00")).await;
    w.event("s2-bad", "declined").await;
    // The agent used the token: the simulator accepts no other.
    assert_eq!(w.agent.sim.ledger().len(), 2);

    let socket = w.agent.control_socket();
    let mut texts = every_answer(
        &socket,
        &["kiosk-1/s2-ok", "kiosk-1/s2-bad", "kiosk-1/none", "bad"],
    )
    .await;
    assert!(
        texts.iter().any(|t| t.contains("s2-ok")),
        "answers are about the charges"
    );
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["queue", "list"],
        vec!["queue", "list", "--json"],
        vec!["queue", "show", "kiosk-1/s2-ok"],
        vec!["queue", "show", "kiosk-1/s2-ok", "--json"],
        vec!["queue", "cancel", "kiosk-1/s2-ok"],
    ] {
        texts.push(w.cli(&args).await.all());
    }
    for t in &texts {
        assert!(!t.contains(TOKEN), "the token leaked: {t}");
        assert!(!t.contains("0123456789"), "part of the token leaked: {t}");
    }
    // A raw bad line gets an error answer, and no token either.
    use std::io::{Read, Write};
    let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    raw.write_all(b"{\"v\":1,\"op\":\"explode\"}\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("\"answer\":\"error\""), "{answer}");
    assert!(!answer.contains(TOKEN));
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_agent_status_says_it_is_not_running_and_exits_1() {
    let dir = common::Workdir::new();
    let config = dir.write(
        "pointgate.toml",
        format!(
            "[store]\nid = \"s\"\n[control]\nsocket = \"{}\"\n",
            dir.join("none.sock").display()
        ),
    );
    let run = pointgate(&["status", "--config", config.to_str().unwrap()]).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("not running"), "{run:#?}");
    let run = pointgate(&["queue", "list", "--config", "/nonexistent.toml"]).await;
    assert_eq!(run.code, 78, "{run:#?}");
}

// ------------------------------------------------------------------ SIGHUP

/// Broker, simulator, and the agent as a process (logging at info) just started: not
/// waited for, as some tests watch it come up.
async fn process_world(opts: AgentOpts) -> (Mosquitto, TestAgent) {
    let w = common::World::builder()
        .agent(AgentOpts {
            log_level: Some("info"),
            ..opts
        })
        .setup_only()
        .start()
        .await;
    let mut agent = w.agent;
    agent.spawn(&[]);
    (w.broker.expect("a broker"), agent)
}

/// A station watching `agent/status` and every station's events of a process agent.
async fn watcher(broker: &Mosquitto, agent: &TestAgent) -> MqttStation {
    let mut s = MqttStation::connect(broker.port(), "sighup-watcher", true).await;
    s.subscribe(&format!("{}/station/+/evt", agent.prefix()))
        .await;
    s.subscribe(&agent.status_topic()).await;
    s
}

async fn status_of(socket: &Path) -> Value {
    let reply = control::call(socket, &ControlRequest::Status, WAIT)
        .await
        .expect("status");
    assert!(matches!(reply, ControlReply::Status(_)), "{reply:?}");
    serde_json::to_value(&reply).unwrap()
}

/// Polls the control socket's status until `cond` holds; panics after `WAIT`.
async fn wait_status(socket: &Path, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(ControlReply::Status(s)) =
            control::call(socket, &ControlRequest::Status, WAIT).await
        {
            let v = serde_json::to_value(ControlReply::Status(s)).unwrap();
            if cond(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: last status {v:#}");
        } else {
            assert!(Instant::now() < deadline, "{what}: no status answer");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_after_fixing_the_token_file_makes_a_401ing_agent_work_again() {
    let (broker, mut agent) = process_world(AgentOpts {
        token_file: Some("WRONG-token"),
        ..AgentOpts::default()
    })
    .await;
    let mut station = watcher(&broker, &agent).await;
    let status = agent.status_topic();
    station
        .wait_for(
            |m| m.topic == status && m.json()["api"] == "unauthorized",
            WAIT,
        )
        .await;
    station
        .publish(
            &format!("{}/station/kiosk-1/cmd", agent.prefix()),
            charge("tok-1", "15.00"),
        )
        .await;
    let waiting = event(&mut station, "tok-1", "waiting").await;
    assert_eq!(waiting["reason"], "unauthorized");
    assert!(
        agent.sim.ledger().is_empty(),
        "nothing is created with a refused token"
    );

    agent.write_token(TOKEN);
    agent.sighup();
    let approved = station
        .wait_for(
            |m| m.json()["request_id"] == "tok-1" && m.json()["final"] == true,
            Duration::from_secs(60),
        )
        .await
        .json();
    assert_eq!(approved["state"], "approved", "{approved}");
    wait_status(&agent.control_socket(), "api ok again", |s| {
        s["agent"]["api"] == "ok"
    })
    .await;
    assert!(
        agent.log().contains("access token reloaded"),
        "{}",
        agent.log()
    );
    assert!(!agent.log().contains(TOKEN), "the token is never logged");
    assert_eq!(agent.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_added_by_sighup_can_charge() {
    let opts = AgentOpts {
        stations: stations(&[("kiosk-1", &["PAX_A910__0001"])]),
        devices: Some(vec!["PAX_A910__0001", "PAX_A910__0002"]),
        ..AgentOpts::default()
    };
    let (broker, mut agent) = process_world(opts).await;
    let mut station = watcher(&broker, &agent).await;
    let status = agent.status_topic();
    station
        .wait_for(|m| m.topic == status && m.json()["state"] == "online", WAIT)
        .await;
    let config = agent.config_path();
    let config = config.to_str().unwrap();
    let charge_as = |s: &'static str| {
        let config = config.to_string();
        async move {
            pointgate(&[
                "charge",
                "--station",
                s,
                "--amount",
                "15.00",
                "--timeout",
                "30s",
                "--config",
                &config,
            ])
            .await
        }
    };
    let before = charge_as("kiosk-2").await;
    assert_eq!(before.code, 4, "{before:#?}");
    assert!(before.stdout.contains("unknown_station"), "{before:#?}");

    agent.write_config(&stations(&[
        ("kiosk-1", &["PAX_A910__0001"]),
        ("kiosk-2", &["PAX_A910__0002"]),
    ]));
    agent.sighup();
    let s = wait_status(&agent.control_socket(), "kiosk-2 configured", |s| {
        s["stations"]["kiosk-2"].is_array()
    })
    .await;
    assert!(s["terminals"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["terminal"] == "PAX_A910__0002"));
    let after = charge_as("kiosk-2").await;
    assert_eq!(after.code, 0, "{after:#?}");
    assert_eq!(agent.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_on_sighup_keeps_the_stations_and_the_log_names_the_key() {
    let (broker, mut agent) = process_world(AgentOpts::default()).await;
    let mut station = watcher(&broker, &agent).await;
    let status = agent.status_topic();
    station
        .wait_for(|m| m.topic == status && m.json()["state"] == "online", WAIT)
        .await;
    let socket = agent.control_socket();
    let before = status_of(&socket).await["stations"].clone();
    agent.write_config_text(
        "[stations.kiosk-1]\nterminals = [\"PAX_A910__0001\"]\n\
         [stations.kiosk-3]\nterminals = [\"PAX_A910__0001\"]\n",
    );
    agent.sighup();
    assert!(
        common::wait_until_async(WAIT, || agent.log().contains("stations.kiosk-3.terminals")).await,
        "the log names the key:\n{}",
        agent.log()
    );
    assert_eq!(status_of(&socket).await["stations"], before);
    let run = pointgate(&[
        "charge",
        "--station",
        "kiosk-2",
        "--amount",
        "15.00",
        "--timeout",
        "30s",
        "--broker",
        &broker.url(),
        "--topic-prefix",
        &agent.prefix(),
    ])
    .await;
    assert_eq!(run.code, 0, "the old stations still charge: {run:#?}");
    assert_eq!(agent.terminate().code(), Some(0));
}
