//! `pointgate charge`, the real binary as a station, against a real Mosquitto, the Point
//! simulator over TLS and the agent in-process: its exit code follows the charge's
//! outcome (0 approved, 2 declined, 3 needs_attention, 4 refused, 1 no agent) and it
//! prints the charge's events.

mod common;

use common::agent::{AgentOpts, TestAgent};
use common::cli::{pointgate, Run};
use common::{free_port, Mosquitto};
use pointgate::sim::{Fault, FaultScope, TerminalMode};

/// Broker and agent, with the agent online (seen by a station on `agent/status`).
async fn world(opts: AgentOpts) -> (Mosquitto, TestAgent) {
    let mut w = common::World::builder()
        .agent(opts)
        .status_station("status-watcher")
        .start()
        .await;
    w.take_station().disconnect().await;
    w.into_broker_and_agent()
}

async fn charge(agent: &TestAgent, station: &str, amount: &str, extra: &[&str]) -> Run {
    let config = agent.config_path();
    let mut args = vec![
        "charge",
        "--station",
        station,
        "--amount",
        amount,
        "--timeout",
        "30s",
        "--config",
        config.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    pointgate(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_charge_exits_0_and_prints_every_event() {
    let (_broker, mut agent) = world(AgentOpts::default()).await;
    let run = charge(&agent, "kiosk-1", "15.00", &[]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    for state in ["accepted", "sent", "approved"] {
        assert!(run.stdout.contains(state), "{state} missing: {run:#?}");
    }
    assert!(run.stdout.contains("payment"), "{run:#?}");
    assert_eq!(agent.sim.ledger().len(), 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_charge_exits_2_and_json_mode_prints_event_lines() {
    let (_broker, mut agent) = world(AgentOpts::default()).await;
    let run = charge(
        &agent,
        "kiosk-1",
        "12.00",
        &["--json", "--request-id", "dec-1"],
    )
    .await;
    assert_eq!(run.code, 2, "{run:#?}");
    let events: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert!(events.iter().all(|e| e["request_id"] == "dec-1"));
    let last = events.last().expect("events");
    assert_eq!(last["state"], "declined");
    assert_eq!(last["final"], true);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_charge_exits_4_with_the_reason() {
    let (_broker, mut agent) = world(AgentOpts::default()).await;
    let run = charge(&agent, "kiosk-1", "abc", &[]).await;
    assert_eq!(run.code, 4, "{run:#?}");
    assert!(run.stdout.contains("bad_amount"), "{run:#?}");
    let run = charge(&agent, "kiosk-9", "15.00", &[]).await;
    assert_eq!(run.code, 4, "{run:#?}");
    assert!(run.stdout.contains("unknown_station"), "{run:#?}");
    assert!(agent.sim.ledger().is_empty(), "nothing reached the API");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_whose_outcome_is_unknown_exits_3() {
    let (_broker, mut agent) = world(AgentOpts {
        terminal: TerminalMode::Manual,
        ..AgentOpts::default()
    })
    .await;
    // The create commits but its answer is lost, and the intent list is not served, so
    // reconcile cannot decide.
    agent.sim.set_serve_intent_lists(false);
    agent.sim.set_fault_scoped(
        FaultScope::Creates,
        Fault::CommitThenDrop { remaining: Some(1) },
    );
    let run = charge(&agent, "kiosk-1", "15.00", &[]).await;
    assert_eq!(run.code, 3, "{run:#?}");
    assert!(run.stdout.contains("needs_attention"), "{run:#?}");
    assert!(run.stdout.contains("pointgate queue resolve"), "{run:#?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_the_charge_exits_1() {
    let url = format!("mqtt://127.0.0.1:{}", free_port());
    let run = pointgate(&[
        "charge",
        "--station",
        "kiosk-1",
        "--amount",
        "15.00",
        "--broker",
        &url,
        "--topic-prefix",
        "pointgate/x",
    ])
    .await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("broker"), "{run:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charge_help_names_every_flag() {
    let run = pointgate(&["charge", "--help"]).await;
    assert_eq!(run.code, 0);
    for flag in [
        "--station",
        "--amount",
        "--terminal",
        "--broker",
        "--username",
        "--password-file",
        "--config",
        "--timeout",
    ] {
        assert!(run.stdout.contains(flag), "{flag}: {}", run.stdout);
    }
}
