//! What the real binary logs, at trace level, through one charge that meets a 401:
//!
//! - on stderr (not under systemd): the charge's request id is there, the access token
//!   (a canary) is not;
//! - to the journal (stderr named by `JOURNAL_STREAM`): each event is a native journald
//!   datagram with the charge's fields (`REQUEST_ID=`, `STATION=`, `TERMINAL=`), the
//!   priority and `SYSLOG_IDENTIFIER=pointgate`, and no datagram holds the canary.
//!   journald's socket path is fixed in systemd-journal-logger
//!   (`/run/systemd/journal/socket`), so the agent runs in a private mount namespace
//!   (`unshare`) where that path is a bind mount of the test's own datagram socket.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::agent::{charge_text as charge, AgentOpts, TestAgent, STATION, TERMINAL};
use common::{Mosquitto, MosquittoSub, World};
use pointgate::sim::{Fault, FaultScope, TerminalMode};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
/// The access token: must never appear in a log. Its middle part is checked on its own
/// too, in case something logs a token cut short.
const CANARY: &str = "TEST-CANARY-9f8e7d6c5b4a39281706";
const CANARY_CORE: &str = "9f8e7d6c5b4a";

fn terminal() -> TerminalMode {
    TerminalMode::Auto {
        pickup: Duration::from_millis(50),
        process: Duration::from_millis(50),
    }
}

/// The next intent polls answer 401 (the token refused), twice; then the API recovers.
fn refuse_polls(setup: &TestAgent) {
    setup.sim.set_fault_scoped(
        FaultScope::PathPrefix("/point/integration-api/payment-intents/".into()),
        Fault::Status5xx {
            status: 401,
            remaining: Some(2),
        },
    );
}

/// Sends a charge and waits for its final event; returns it.
fn charge_to_the_end(broker: &Mosquitto, setup: &TestAgent, request_id: &str) -> Value {
    let evt = setup.evt_topic(STATION);
    let status = setup.status_topic();
    let mut sub = MosquittoSub::start(broker.port(), &[evt.as_str(), status.as_str()]);
    sub.wait_for(|m| m.topic == status && m.payload.contains("online"), WAIT);
    common::mosquitto_pub(
        broker.port(),
        &setup.cmd_topic(STATION),
        charge(request_id, "15"),
    );
    let last = sub.wait_for(
        |m| m.topic == evt && m.payload.contains(r#""final":true"#),
        WAIT,
    );
    serde_json::from_str(&last.payload).expect("event json")
}

/// Broker, simulator (accepting the canary token, which the agent's token file holds) and
/// the config of one station; the test starts the agent.
async fn world() -> (Mosquitto, TestAgent) {
    let w = World::builder()
        .agent(AgentOpts::single(terminal(), CANARY))
        .setup_only()
        .start()
        .await;
    (w.broker.expect("a broker"), w.agent)
}

fn assert_a_401_was_answered(setup: &TestAgent) {
    let refused = setup
        .sim
        .requests()
        .iter()
        .filter(|r| r.status == 401)
        .count();
    assert!(refused >= 1, "the simulator answered no 401");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_on_stderr_through_a_charge_and_a_401_never_show_the_token() {
    let (broker, mut agent) = world().await;
    refuse_polls(&agent);
    let mut cmd = agent.command();
    cmd.env("RUST_LOG", "trace");
    agent.spawn_command(cmd);

    let last = charge_to_the_end(&broker, &agent, "canary-1");
    assert_eq!(last["state"], "approved", "{last}");
    assert_a_401_was_answered(&agent);
    let exit = agent.terminate();
    assert!(exit.success(), "exit {exit:?}");

    let log = agent.log();
    // Positive controls: the log is the trace-level story of this very charge.
    assert!(log.contains("canary-1"), "no request id in the log:\n{log}");
    assert!(log.contains("TRACE"), "not a trace-level log");
    assert!(log.contains("status=401"), "the 401 is not in the log");
    assert!(!log.contains(CANARY), "the access token is in the log");
    assert!(
        !log.contains(CANARY_CORE),
        "part of the access token is in the log"
    );
    // The grep itself can find the token where it is.
    assert!(agent
        .dir
        .read_to_string("access_token")
        .contains(CANARY_CORE));
}

/// One journald native-protocol datagram: field name → values.
type Entry = BTreeMap<String, Vec<String>>;

/// Parses `NAME=value\n` and `NAME\n<u64 le length><bytes>\n` fields.
fn parse_entry(data: &[u8]) -> Entry {
    let mut entry = Entry::new();
    let mut i = 0;
    while i < data.len() {
        let end = data[i..]
            .iter()
            .position(|b| *b == b'=' || *b == b'\n')
            .map(|p| i + p)
            .expect("a field name ends with = or a newline");
        let name = String::from_utf8_lossy(&data[i..end]).into_owned();
        let (value, next) = if data[end] == b'=' {
            let stop = data[end..]
                .iter()
                .position(|b| *b == b'\n')
                .map(|p| end + p)
                .expect("a value ends with a newline");
            (&data[end + 1..stop], stop + 1)
        } else {
            let len_at = end + 1;
            let mut len = [0u8; 8];
            len.copy_from_slice(&data[len_at..len_at + 8]);
            let start = len_at + 8;
            let stop = start + u64::from_le_bytes(len) as usize;
            (&data[start..stop], stop + 1)
        };
        entry
            .entry(name)
            .or_default()
            .push(String::from_utf8_lossy(value).into_owned());
        i = next;
    }
    entry
}

fn field<'a>(e: &'a Entry, name: &str) -> Option<&'a str> {
    e.get(name).and_then(|v| v.first()).map(String::as_str)
}

/// The agent's command wrapped to run in a private mount namespace in which
/// `/run/systemd/journal/socket` is the test's socket. Not root: a user namespace too.
fn in_journal_namespace(agent: Command, socket: &std::path::Path) -> Command {
    let mut cmd = Command::new("unshare");
    if !is_root() {
        cmd.arg("--user").arg("--map-root-user");
    }
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"]);
    cmd.arg(
        "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/journal; \
         touch /run/systemd/journal/socket; mount --bind \"$0\" /run/systemd/journal/socket; \
         exec \"$@\"",
    );
    cmd.arg(socket);
    cmd.arg(agent.get_program());
    cmd.args(agent.get_args());
    for (k, v) in agent.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_each_event_is_a_journal_entry_with_the_charge_fields_and_no_token() {
    let (broker, mut agent) = world().await;
    refuse_polls(&agent);
    let socket_path = agent.dir.join("journal.sock");
    let journal = tokio::net::UnixDatagram::bind(&socket_path).expect("bind the journal socket");
    // Read all along, as journald does: a full socket queue would block the agent.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut raw: Vec<Vec<u8>> = Vec::new();
        let mut buf = vec![0u8; 1 << 17];
        let mut stopping = false;
        loop {
            if stopping {
                // Drain what is queued; the agent has exited, so nothing more comes.
                match tokio::time::timeout(Duration::from_millis(300), journal.recv(&mut buf)).await
                {
                    Ok(Ok(n)) => raw.push(buf[..n].to_vec()),
                    _ => return raw,
                }
            } else {
                tokio::select! {
                    r = journal.recv(&mut buf) => match r {
                        Ok(n) => raw.push(buf[..n].to_vec()),
                        Err(_) => return raw,
                    },
                    _ = &mut stop_rx => stopping = true,
                }
            }
        }
    });
    let mut agent_cmd = agent.command();
    agent_cmd.env("RUST_LOG", "trace");
    let cmd = in_journal_namespace(agent_cmd, &socket_path);
    agent.spawn_command_as_journal_stream(cmd);

    let last = charge_to_the_end(&broker, &agent, "journal-1");
    assert_eq!(last["state"], "approved", "{last}");
    assert_a_401_was_answered(&agent);
    let exit = agent.terminate();
    assert!(exit.success(), "exit {exit:?}; stderr:\n{}", agent.log());
    let _ = stop_tx.send(());
    let raw = reader.await.expect("the reader joins");
    let entries: Vec<Entry> = raw
        .iter()
        .filter(|d| !d.is_empty())
        .map(|d| parse_entry(d))
        .collect();
    assert!(
        !entries.is_empty(),
        "no journal datagram; stderr:\n{}",
        agent.log()
    );

    let accepted = entries
        .iter()
        .find(|e| {
            field(e, "MESSAGE").is_some_and(|m| m.starts_with("charge accepted"))
                && field(e, "REQUEST_ID") == Some("journal-1")
        })
        .unwrap_or_else(|| panic!("no `charge accepted` entry for journal-1: {entries:#?}"));
    assert_eq!(field(accepted, "STATION"), Some(STATION));
    assert_eq!(field(accepted, "TERMINAL"), Some(TERMINAL));
    assert_eq!(field(accepted, "PRIORITY"), Some("5"), "info is notice");
    assert_eq!(field(accepted, "SYSLOG_IDENTIFIER"), Some("pointgate"));
    assert!(field(accepted, "CODE_MODULE").is_some());
    // The whole story is findable by REQUEST_ID: accepted ... approved.
    let story: Vec<&str> = entries
        .iter()
        .filter(|e| field(e, "REQUEST_ID") == Some("journal-1"))
        .filter_map(|e| field(e, "STATE"))
        .collect();
    assert!(story.contains(&"approved"), "story: {story:?}");
    // Debug and trace reach the journal too (trace level asked), as priorities 6 and 7.
    assert!(entries.iter().any(|e| field(e, "PRIORITY") == Some("7")));

    for d in &raw {
        let text = String::from_utf8_lossy(d);
        assert!(
            !text.contains(CANARY_CORE),
            "the access token is in a journal entry: {text}"
        );
    }
    // Under the journal, nothing of the story goes to stderr.
    assert!(
        !agent.log().contains("journal-1"),
        "stderr:\n{}",
        agent.log()
    );
}
