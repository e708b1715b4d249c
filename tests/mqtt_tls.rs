//! Broker TLS: the agent on `mqtts://` against Mosquitto's TLS listener, with
//! certificates made at test time (rcgen). Server authentication with `mqtt.ca_file`,
//! mutual TLS with `mqtt.cert_file`/`mqtt.key_file`, and the failures: no client
//! certificate where one is required, a broker certificate from another CA. A failing
//! agent never says `online` and logs "could not connect to the broker" with the reason.
//!
//! Each broker also has a plain listener on 127.0.0.1, for the test's station.

mod common;

use std::time::Duration;

use common::agent::{charge, AgentOpts, TestAgent};
use common::logs;
use common::{free_port, wait_until_async, Mosquitto, MosquittoOpts, MqttStation, TestPki, World};

const WAIT: Duration = Duration::from_secs(30);

struct TlsBroker {
    broker: Mosquitto,
    /// The plain listener, for the station.
    plain_port: u16,
}

impl TlsBroker {
    fn tls_url(&self) -> String {
        format!("mqtts://localhost:{}", self.broker.port())
    }
}

/// Mosquitto whose main listener is TLS with a certificate for `localhost` from `pki`;
/// `require_certificate` asks every TLS client for a certificate from the same CA.
fn tls_broker(pki: &TestPki, require_certificate: bool) -> TlsBroker {
    let server = pki.server_cert(&["localhost"]);
    let plain_port = free_port();
    let opts = MosquittoOpts::default()
        .with_line(format!("cafile {}", pki.ca_path().display()))
        .with_line(format!("certfile {}", server.cert.display()))
        .with_line(format!("keyfile {}", server.key.display()))
        .with_line(format!("require_certificate {require_certificate}"))
        .with_line(format!("listener {plain_port} 127.0.0.1"));
    TlsBroker {
        broker: Mosquitto::start(opts),
        plain_port,
    }
}

fn mqtt_lines(ca: &std::path::Path, client: Option<&common::CertPaths>) -> Vec<String> {
    let mut lines = vec![format!("ca_file = \"{}\"", ca.display())];
    if let Some(c) = client {
        lines.push(format!("cert_file = \"{}\"", c.cert.display()));
        lines.push(format!("key_file = \"{}\"", c.key.display()));
    }
    lines
}

/// A station on the plain listener, subscribed to the agent's status and kiosk-1's events.
/// Simulator and agent (in-process) on the TLS broker `b`.
async fn agent(b: &TlsBroker, opts: AgentOpts) -> TestAgent {
    World::builder()
        .broker_url(&b.tls_url())
        .agent(opts)
        .start()
        .await
        .agent
}

async fn station(b: &TlsBroker, agent: &TestAgent) -> MqttStation {
    let mut s = MqttStation::connect(b.plain_port, "kiosk-1-tls-test", true).await;
    s.subscribe(&agent.status_topic()).await;
    s.subscribe(&agent.evt_topic("kiosk-1")).await;
    s
}

/// Charges 15.00 on kiosk-1 and waits for `approved`.
async fn charge_is_approved(s: &mut MqttStation, agent: &TestAgent) {
    let status = agent.status_topic();
    s.wait_for(|m| m.topic == status && m.json()["state"] == "online", WAIT)
        .await;
    s.publish(&agent.cmd_topic("kiosk-1"), charge("tls-1", "15.00"))
        .await;
    let evt = agent.evt_topic("kiosk-1");
    let last = s
        .wait_for(|m| m.topic == evt && m.json()["final"] == true, WAIT)
        .await;
    assert_eq!(last.json()["state"], "approved", "{}", last.text());
}

/// Waits until the agent has failed to connect to `url` at least twice (it retries with
/// backoff), and returns those log lines.
async fn connect_failures(log: &logs::LogBuffer, url: &str) -> Vec<String> {
    let needles = ["could not connect to the broker", url];
    let failed = wait_until_async(WAIT, || log.lines_with(&needles).len() >= 2).await;
    assert!(
        failed,
        "no connect failure logged for {url}:\n{}",
        log.text()
    );
    log.lines_with(&needles)
}

/// The agent never said `online` (nor anything else) on the broker: retained status
/// would reach a new subscriber before a marker it publishes after subscribing.
async fn never_online(b: &TlsBroker, agent: &TestAgent) {
    let mut s = MqttStation::connect(b.plain_port, "observer", true).await;
    s.subscribe(&format!("{}/#", agent.prefix())).await;
    let marker = format!("{}/test/marker", agent.prefix());
    s.publish(&marker, b"m".to_vec()).await;
    s.wait_for(|m| m.topic == marker, WAIT).await;
    let status = agent.status_topic();
    let statuses: Vec<String> = s
        .seen()
        .iter()
        .filter(|m| m.topic == status)
        .map(|m| m.text())
        .collect();
    assert!(
        statuses.is_empty(),
        "the agent published a status: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_connects_over_mqtts_with_a_ca_file_and_a_charge_completes() {
    logs::capture();
    let pki = TestPki::new();
    let b = tls_broker(&pki, false);
    let agent = agent(
        &b,
        AgentOpts {
            mqtt_extra: mqtt_lines(&pki.ca_path(), None),
            ..AgentOpts::default()
        },
    )
    .await;
    let mut s = station(&b, &agent).await;
    charge_is_approved(&mut s, &agent).await;
    // It really went through the TLS listener: Mosquitto logged the agent's connection
    // on that port.
    assert!(b.broker.log().contains("pointgate-store-e2e"));
    let mut agent = agent;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_the_agent_s_client_certificate_is_accepted_and_a_charge_completes() {
    logs::capture();
    let pki = TestPki::new();
    let b = tls_broker(&pki, true);
    let client = pki.client_cert("pointgate");
    let mut agent = agent(
        &b,
        AgentOpts {
            mqtt_extra: mqtt_lines(&pki.ca_path(), Some(&client)),
            ..AgentOpts::default()
        },
    )
    .await;
    let mut s = station(&b, &agent).await;
    charge_is_approved(&mut s, &agent).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_an_agent_without_a_client_certificate_cannot_connect() {
    let log = logs::capture();
    let pki = TestPki::new();
    let b = tls_broker(&pki, true);
    let agent = agent(
        &b,
        AgentOpts {
            mqtt_extra: mqtt_lines(&pki.ca_path(), None),
            ..AgentOpts::default()
        },
    )
    .await;
    let lines = connect_failures(&log, &b.tls_url()).await;
    assert!(
        lines.iter().any(|l| l.contains("CertificateRequired")),
        "the log says the broker wants a client certificate: {lines:?}"
    );
    never_online(&b, &agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_another_ca_is_refused() {
    let log = logs::capture();
    let pki = TestPki::new();
    let other = TestPki::named("some other CA");
    let b = tls_broker(&pki, false);
    let agent = agent(
        &b,
        AgentOpts {
            mqtt_extra: mqtt_lines(&other.ca_path(), None),
            ..AgentOpts::default()
        },
    )
    .await;
    let lines = connect_failures(&log, &b.tls_url()).await;
    assert!(
        lines.iter().any(|l| l.contains("UnknownIssuer")),
        "the log says the broker's certificate is not trusted: {lines:?}"
    );
    never_online(&b, &agent).await;
}
