//! The systemd protocol of the real binary, through a test-owned `NOTIFY_SOCKET` (a unix
//! datagram socket in a temporary directory, as systemd would give): `READY=1` once the
//! agent runs (also with no broker at all), repeated `WATCHDOG=1` while it serves a
//! charge against Mosquitto, `STOPPING=1` and exit 0 on SIGTERM.
//!
//! `.ci/run arm` runs this file with the arm64 binary under qemu (see `common::process`).

mod common;

use std::time::{Duration, Instant};

use common::agent::{charge_text as charge, AgentOpts, STATION};
use common::process::AgentProc;
use common::{free_port, MosquittoSub, World};
use pointgate::sim::TerminalMode;
use serde_json::Value;
use tokio::net::UnixDatagram;

/// Generous: under qemu the agent starts in seconds, not milliseconds.
const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "TEST-notify-token-0123456789";

/// The notifications received so far, one entry per line (`READY=1`, `STATUS=...`).
struct Notifications {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notifications {
    fn bind(path: &std::path::Path) -> Notifications {
        Notifications {
            socket: UnixDatagram::bind(path).expect("bind the notify socket"),
            seen: Vec::new(),
        }
    }

    /// Waits until `count` lines equal to `line` were seen in all; panics with what came.
    async fn wait_for(&mut self, line: &str, count: usize, agent: &AgentProc) {
        let deadline = Instant::now() + WAIT;
        let mut buf = vec![0u8; 4096];
        while self.seen.iter().filter(|l| *l == line).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.socket.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.extend(text.lines().map(str::to_string));
                }
                Ok(Err(e)) => panic!("notify socket: {e}"),
                Err(_) => panic!(
                    "{count} x {line} not seen within {WAIT:?}; saw {:?}; agent log:\n{}",
                    self.seen,
                    agent.log()
                ),
            }
        }
    }

    fn count(&self, line: &str) -> usize {
        self.seen.iter().filter(|l| *l == line).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_ready_feeds_the_watchdog_while_charging_and_says_stopping() {
    let World { broker, agent, .. } = World::builder()
        .agent(AgentOpts::single(
            TerminalMode::Auto {
                pickup: Duration::from_millis(50),
                process: Duration::from_millis(50),
            },
            TOKEN,
        ))
        .setup_only()
        .start()
        .await;
    let (broker, mut agent) = (broker.expect("a broker"), agent);
    let socket_path = agent.dir.join("notify.sock");
    let mut notes = Notifications::bind(&socket_path);
    let mut cmd = agent.command();
    // A 2 s watchdog: the agent pings every second.
    cmd.env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000");
    let evt = agent.evt_topic(STATION);
    let status = agent.status_topic();
    let mut sub = MosquittoSub::start(broker.port(), &[evt.as_str(), status.as_str()]);
    agent.spawn_command(cmd);

    notes.wait_for("READY=1", 1, &agent.proc).await;
    assert!(
        notes.seen.iter().any(|l| l.starts_with("STATUS=running")),
        "{:?}",
        notes.seen
    );
    assert_eq!(notes.count("WATCHDOG=1"), 0, "no ping before ready");

    // A charge end to end while the watchdog is fed.
    sub.wait_for(|m| m.topic == status && m.payload.contains("online"), WAIT);
    common::mosquitto_pub(
        broker.port(),
        &agent.cmd_topic(STATION),
        charge("n-1", "15"),
    );
    let last = sub.wait_for(
        |m| m.topic == evt && m.payload.contains(r#""final":true"#),
        WAIT,
    );
    let v: Value = serde_json::from_str(&last.payload).expect("event json");
    assert_eq!(v["state"], "approved", "{}", last.payload);
    notes.wait_for("WATCHDOG=1", 3, &agent.proc).await;

    assert_eq!(notes.count("STOPPING=1"), 0);
    let exit = agent.terminate();
    assert!(exit.success(), "exit {exit:?}; log:\n{}", agent.log());
    notes.wait_for("STOPPING=1", 1, &agent.proc).await;
    assert_eq!(notes.count("READY=1"), 1, "{:?}", notes.seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_does_not_wait_for_the_broker() {
    // Nothing listens on this port: the link keeps retrying, the agent is ready anyway.
    let url = format!("mqtt://127.0.0.1:{}", free_port());
    let mut agent = World::builder()
        .broker_url(&url)
        .agent(AgentOpts::single(TerminalMode::Manual, TOKEN))
        .setup_only()
        .start()
        .await
        .agent;
    let socket_path = agent.dir.join("notify.sock");
    let mut notes = Notifications::bind(&socket_path);
    let mut cmd = agent.command();
    cmd.env("NOTIFY_SOCKET", &socket_path);
    agent.spawn_command(cmd);
    notes.wait_for("READY=1", 1, &agent.proc).await;
    // No WATCHDOG_USEC given: no pings. STOPPING=1 still comes.
    let exit = agent.terminate();
    assert!(exit.success(), "exit {exit:?}; log:\n{}", agent.log());
    notes.wait_for("STOPPING=1", 1, &agent.proc).await;
    assert_eq!(notes.count("WATCHDOG=1"), 0, "{:?}", notes.seen);
}
