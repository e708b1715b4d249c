//! `pointgate charge`: a station on the command line, for kiosk developers and store
//! technicians. It connects to the broker with MQTT 5 as the given station, waits for
//! `agent/status` to say the agent is there (as the contract asks of every station),
//! publishes one charge with a fresh `request_id`, and hands every event of that request
//! to the caller until the final state, `needs_attention`, a refusal, or the timeout.
//!
//! It is a station like any other: it uses only the station's topics (its `cmd` and
//! `evt`, and `agent/status`), so it works through the shipped ACL with the station's own
//! username. Its session lives a little longer than its timeout, so events published
//! while it reconnects are not lost.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;

/// How long to wait for the broker's CONNACK and the agent's retained status.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What `pointgate charge` does.
#[derive(Debug, Clone)]
pub struct ChargeArgs {
    pub station: String,
    /// A decimal string, as the contract's `amount`.
    pub amount: String,
    pub terminal: Option<String>,
    pub description: Option<String>,
    /// `None`: a fresh one.
    pub request_id: Option<String>,
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub broker: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM roots for `mqtts://` (default: the built-in web roots).
    pub ca_file: Option<PathBuf>,
    /// `P`, as the agent's `topic_prefix()`.
    pub topic_prefix: String,
    /// How long to wait for the final state after publishing.
    pub timeout: Duration,
}

/// How the charge ended, as far as the command line could tell.
#[derive(Debug, Clone, PartialEq)]
pub struct ChargeEnd {
    pub request_id: String,
    /// The state of the last event (`approved`, `refused`, `needs_attention`...), or
    /// `None` when no final state came within the timeout.
    pub state: Option<String>,
    /// The last event seen, if any.
    pub last: Option<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChargeError {
    #[error("--broker `{0}`: {1}")]
    Url(String, String),
    #[error("broker TLS: {0}")]
    Tls(String),
    #[error("cannot reach the broker: {0}")]
    Connect(String),
    #[error("the broker refused the subscription to {0}")]
    Subscribe(String),
    #[error("the agent is not there: {0}")]
    AgentAbsent(String),
}

/// The contract's exit code for a charge's end: 0 approved; 2 declined, canceled or
/// expired; 3 needs_attention; 4 failed or refused; 1 anything else (no final state).
pub fn exit_code(state: Option<&str>) -> u8 {
    match state {
        Some("approved") => 0,
        Some("declined" | "canceled" | "expired") => 2,
        Some("needs_attention") => 3,
        Some("failed" | "refused") => 4,
        _ => 1,
    }
}

/// A request id the station has not used: `cli-<unix ms>-<4 hex>`.
pub fn fresh_request_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("cli-{ms}-{:04x}", fastrand::u16(..))
}

/// The charge command's payload.
pub fn command(args: &ChargeArgs, request_id: &str) -> Vec<u8> {
    let mut cmd = serde_json::json!({
        "v": 1,
        "type": "charge",
        "request_id": request_id,
        "amount": args.amount,
    });
    if let Some(t) = &args.terminal {
        cmd["terminal"] = Value::String(t.clone());
    }
    if let Some(d) = &args.description {
        cmd["description"] = Value::String(d.clone());
    }
    cmd.to_string().into_bytes()
}

fn options(args: &ChargeArgs) -> Result<MqttOptions, ChargeError> {
    let bad = |m: String| ChargeError::Url(args.broker.clone(), m);
    let url = reqwest::Url::parse(&args.broker).map_err(|e| bad(e.to_string()))?;
    let tls = match url.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => return Err(bad(format!("unknown scheme `{other}`"))),
    };
    let host = url.host_str().ok_or_else(|| bad("no host".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    let client_id = format!(
        "pointgate-charge-{}-{:08x}",
        args.station,
        fastrand::u32(..)
    );
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_clean_start(true);
    let expiry = (args.timeout + READY_TIMEOUT)
        .as_secs()
        .min(u32::MAX as u64) as u32;
    o.set_session_expiry_interval(Some(expiry));
    // One command in flight; rumqttc's default would allocate slots for 65,535 (14 MiB).
    o.set_outgoing_inflight_upper_limit(8);
    if let Some(u) = &args.username {
        o.set_credentials(u.clone(), args.password.clone().unwrap_or_default());
    }
    if tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(args)?)),
        ));
    }
    Ok(o)
}

fn tls_config(args: &ChargeArgs) -> Result<rustls::ClientConfig, ChargeError> {
    use rustls_pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    match &args.ca_file {
        Some(ca) => {
            let shown =
                |e: &dyn std::fmt::Display| ChargeError::Tls(format!("{}: {e}", ca.display()));
            for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| shown(&e))? {
                roots
                    .add(c.map_err(|e| shown(&e))?)
                    .map_err(|e| shown(&e))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Where the charge stands.
enum Phase {
    /// Waiting for CONNACK and both SUBACKs.
    Connecting { subacks: u8 },
    /// Subscribed; waiting for the retained `agent/status`.
    AwaitingAgent,
    /// Published; waiting for its events.
    Charging,
}

/// Make the charge; `on_event` sees every event of it, in order. Returns how it ended.
pub async fn run(
    args: &ChargeArgs,
    mut on_event: impl FnMut(&Value),
) -> Result<ChargeEnd, ChargeError> {
    let request_id = args.request_id.clone().unwrap_or_else(fresh_request_id);
    let prefix = args.topic_prefix.trim_end_matches('/');
    let evt = format!("{prefix}/station/{}/evt", args.station);
    let cmd = format!("{prefix}/station/{}/cmd", args.station);
    let status = format!("{prefix}/agent/status");
    let (client, mut eventloop) = AsyncClient::new(options(args)?, 16);
    let mut phase = Phase::Connecting { subacks: 0 };
    let mut deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let mut last: Option<Value> = None;
    let mut agent_state: Option<String> = None;
    let end = |state: Option<String>, last: Option<Value>| ChargeEnd {
        request_id: request_id.clone(),
        state,
        last,
    };
    loop {
        let polled = tokio::time::timeout_at(deadline, eventloop.poll()).await;
        let event = match polled {
            Err(_) => {
                return match phase {
                    Phase::Connecting { .. } => Err(ChargeError::Connect(format!(
                        "no answer from {} within {READY_TIMEOUT:?}",
                        args.broker
                    ))),
                    Phase::AwaitingAgent => Err(ChargeError::AgentAbsent(match agent_state {
                        Some(s) => format!("agent/status says `{s}`"),
                        None => format!("no agent/status on {status}: is the topic prefix right?"),
                    })),
                    Phase::Charging => {
                        disconnect(&client, &mut eventloop).await;
                        Ok(end(None, last))
                    }
                };
            }
            Ok(Err(e)) => {
                if matches!(phase, Phase::Connecting { .. }) {
                    return Err(ChargeError::Connect(e.to_string()));
                }
                // Reconnect (the session keeps the subscriptions), after a pause.
                tracing::warn!(error = %e, "broker connection lost; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Ok(Ok(event)) => event,
        };
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                if let Phase::Connecting { .. } = phase {
                    for topic in [&evt, &status] {
                        client
                            .subscribe(topic.clone(), QoS::AtLeastOnce)
                            .await
                            .map_err(|e| ChargeError::Connect(e.to_string()))?;
                    }
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                {
                    return Err(ChargeError::Subscribe(format!("{evt} or {status}")));
                }
                if let Phase::Connecting { subacks } = &mut phase {
                    *subacks += 1;
                    if *subacks == 2 {
                        phase = Phase::AwaitingAgent;
                    }
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                let topic = String::from_utf8_lossy(&p.topic).to_string();
                let Ok(value) = serde_json::from_slice::<Value>(&p.payload) else {
                    continue;
                };
                if topic == status {
                    let s = value["state"].as_str().unwrap_or("unknown").to_string();
                    agent_state = Some(s.clone());
                    if matches!(phase, Phase::AwaitingAgent)
                        && matches!(s.as_str(), "online" | "degraded")
                    {
                        client
                            .publish(
                                cmd.clone(),
                                QoS::AtLeastOnce,
                                false,
                                command(args, &request_id),
                            )
                            .await
                            .map_err(|e| ChargeError::Connect(e.to_string()))?;
                        phase = Phase::Charging;
                        deadline = tokio::time::Instant::now() + args.timeout;
                    }
                    continue;
                }
                if topic != evt || value["request_id"].as_str() != Some(request_id.as_str()) {
                    continue;
                }
                on_event(&value);
                let state = value["state"].as_str().map(str::to_string);
                let done = value["final"] == true || state.as_deref() == Some("needs_attention");
                last = Some(value);
                if done {
                    disconnect(&client, &mut eventloop).await;
                    return Ok(end(state, last));
                }
            }
            _ => {}
        }
    }
}

async fn disconnect(client: &AsyncClient, eventloop: &mut rumqttc::v5::EventLoop) {
    let _ = client.try_disconnect();
    let stop = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(stop, eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
    }
}

/// One event as a line for a person: time, state, and what matters about it.
pub fn describe(ev: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let mut parts = vec![format!(
        "{:<20} {:<16} seq {}",
        text(&ev["at"]),
        text(&ev["state"]),
        ev["seq"]
    )];
    if let Some(r) = ev["reason"].as_str() {
        parts.push(format!("reason {r}"));
    }
    if let Some(i) = ev["intent_id"].as_str() {
        parts.push(format!("intent {i}"));
    }
    if ev["payment"].is_object() {
        let p = &ev["payment"];
        let detail = p["status_detail"]
            .as_str()
            .map(|d| format!("/{d}"))
            .unwrap_or_default();
        parts.push(format!(
            "payment {} {}{detail}",
            text(&p["id"]),
            text(&p["status"])
        ));
    }
    if ev["error"].is_object() {
        parts.push(format!(
            "{}: {}",
            text(&ev["error"]["code"]),
            text(&ev["error"]["message"])
        ));
    }
    if let Some(r) = ev["resolved_by"].as_str() {
        parts.push(format!("resolved by {r}"));
    }
    parts.join("  ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ChargeArgs {
        ChargeArgs {
            station: "kiosk-1".into(),
            amount: "15.00".into(),
            terminal: Some("T1".into()),
            description: None,
            request_id: None,
            broker: "mqtt://127.0.0.1:1883".into(),
            username: None,
            password: None,
            ca_file: None,
            topic_prefix: "pointgate/s".into(),
            timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(exit_code(Some("approved")), 0);
        for s in ["declined", "canceled", "expired"] {
            assert_eq!(exit_code(Some(s)), 2);
        }
        assert_eq!(exit_code(Some("needs_attention")), 3);
        assert_eq!(exit_code(Some("failed")), 4);
        assert_eq!(exit_code(Some("refused")), 4);
        assert_eq!(exit_code(Some("processing")), 1);
        assert_eq!(exit_code(None), 1);
    }

    #[test]
    fn fresh_request_ids_are_valid_and_differ() {
        let a = fresh_request_id();
        let b = fresh_request_id();
        assert_ne!(a, b);
        assert!(a.len() <= 64);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-')));
    }

    #[test]
    fn the_command_carries_only_what_was_given() {
        let v: Value = serde_json::from_slice(&command(&args(), "r1")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v":1,"type":"charge","request_id":"r1","amount":"15.00","terminal":"T1"})
        );
    }

    #[test]
    fn a_bad_broker_url_is_named() {
        let mut a = args();
        a.broker = "http://x".into();
        assert!(matches!(options(&a), Err(ChargeError::Url(..))));
        a.broker = "mqtts://localhost".into();
        assert!(options(&a).is_ok());
    }

    #[test]
    fn events_are_described_for_a_person() {
        let line = describe(&serde_json::json!({
            "at": "2026-01-01T00:00:00Z", "state": "approved", "seq": 5,
            "intent_id": "i-1", "payment": {"id": "p-1", "status": "approved", "status_detail": "accredited"}
        }));
        assert!(line.contains("approved"), "{line}");
        assert!(line.contains("payment p-1 approved/accredited"), "{line}");
        let line = describe(&serde_json::json!({
            "at": "t", "state": "refused", "seq": 0,
            "error": {"code": "bad_amount", "message": "amount must be a string"}
        }));
        assert!(
            line.contains("bad_amount: amount must be a string"),
            "{line}"
        );
    }
}
