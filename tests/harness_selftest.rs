//! The harness tests itself: a real Mosquitto, the test stations, the command-line clients
//! and the test PKI behave as the end-to-end tests assume. Each test has its negative
//! control, so a harness that silently drops or invents messages fails here first.

mod common;

use std::time::Duration;

use common::{
    mosquitto_pub, mosquitto_pub_with, try_mosquitto_pub, wait_until, Mosquitto, MosquittoOpts,
    MosquittoSub, MqttStation, MqttStation311, PubOpts, TestPki,
};

const WAIT: Duration = Duration::from_secs(10);
/// How long a negative control listens for something that must not arrive.
const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn station_receives_what_mosquitto_pub_publishes_and_nothing_else() {
    let broker = Mosquitto::start_default();
    let mut station = MqttStation::connect(broker.port(), "selftest-sub", true).await;
    station.subscribe("selftest/in/#").await;

    mosquitto_pub(broker.port(), "selftest/other", "not for you");
    mosquitto_pub(broker.port(), "selftest/in/a", "hello");

    let msg = station.next_message(WAIT).await.expect("a message");
    assert_eq!(msg.topic, "selftest/in/a");
    assert_eq!(msg.payload, b"hello");
    assert_eq!(msg.qos, 1);
    assert!(!msg.retain);
    // Negative control: the unsubscribed topic never shows up.
    assert!(
        station.next_message(QUIET).await.is_none(),
        "saw {:?}",
        station.seen()
    );
}

#[tokio::test]
async fn mqtt5_response_topic_and_correlation_data_pass_through_mosquitto() {
    let broker = Mosquitto::start_default();
    let mut agent = MqttStation::connect(broker.port(), "selftest-agent", true).await;
    agent.subscribe("selftest/cmd").await;
    let mut requester = MqttStation::connect(broker.port(), "selftest-requester", true).await;
    requester.subscribe("selftest/reply").await;

    requester
        .publish_with_props(
            "selftest/cmd",
            "ping",
            "selftest/reply",
            b"corr-1",
            Some(60),
        )
        .await;
    let cmd = agent.wait_for(|m| m.topic == "selftest/cmd", WAIT).await;
    assert_eq!(cmd.response_topic.as_deref(), Some("selftest/reply"));
    assert_eq!(cmd.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    // Mosquitto forwards the remaining expiry: at most what was sent, and not gone.
    assert!(
        matches!(cmd.message_expiry, Some(1..=60)),
        "{:?}",
        cmd.message_expiry
    );

    let reply = PubOpts {
        correlation_data: cmd.correlation_data.clone(),
        ..PubOpts::default()
    };
    agent
        .publish_opts(cmd.response_topic.as_deref().unwrap(), "pong", reply)
        .await;
    let pong = requester
        .wait_for(|m| m.topic == "selftest/reply", WAIT)
        .await;
    assert_eq!(pong.payload, b"pong");
    assert_eq!(pong.correlation_data.as_deref(), Some(&b"corr-1"[..]));

    // Negative control: a plain publish carries no properties.
    requester.publish("selftest/cmd", "bare").await;
    let bare = agent.wait_for(|m| m.payload == b"bare", WAIT).await;
    assert_eq!(bare.response_topic, None);
    assert_eq!(bare.correlation_data, None);
}

#[tokio::test]
async fn retained_message_survives_a_restart_only_with_persistence() {
    for persistence in [true, false] {
        let opts = MosquittoOpts {
            persistence,
            ..MosquittoOpts::default()
        };
        let mut broker = Mosquitto::start(opts);
        let port = broker.port();
        let mut publisher = MqttStation::connect(port, "selftest-retainer", true).await;
        let retained = PubOpts {
            retain: true,
            ..PubOpts::default()
        };
        publisher
            .publish_opts("selftest/retained", "kept", retained)
            .await;
        drop(publisher);

        broker.restart();
        assert_eq!(broker.port(), port, "restart keeps the port");

        let mut reader = MqttStation::connect(port, "selftest-reader", true).await;
        reader.subscribe("selftest/retained").await;
        if persistence {
            let msg = reader
                .next_message(WAIT)
                .await
                .expect("the retained message");
            assert_eq!(msg.payload, b"kept");
            assert!(msg.retain);
        } else {
            // Negative control: without persistence the restart forgets it.
            assert!(
                reader.next_message(QUIET).await.is_none(),
                "saw {:?}",
                reader.seen()
            );
        }
    }
}

#[tokio::test]
async fn mosquitto_sub_receives_what_a_station_publishes() {
    let broker = Mosquitto::start_default();
    let mut sub = MosquittoSub::start(broker.port(), &["selftest/out/+"]);
    let mut station = MqttStation::connect(broker.port(), "selftest-pub", true).await;

    station.publish("selftest/elsewhere", "skip").await;
    station.publish("selftest/out/1", r#"{"n":1}"#).await;

    let msg = sub.next_message(WAIT).expect("a message");
    assert_eq!(msg.topic, "selftest/out/1");
    assert_eq!(msg.payload, r#"{"n":1}"#);
    // Negative control: the topic outside the filter was not delivered.
    assert!(sub.next_message(QUIET).is_none(), "saw {:?}", sub.seen());
}

#[tokio::test]
async fn persistent_session_keeps_messages_for_an_absent_station() {
    let broker = Mosquitto::start_default();
    let port = broker.port();
    let mut station = MqttStation::connect(port, "selftest-persistent", false).await;
    assert_eq!(station.status().session_present, Some(false));
    station.subscribe("selftest/queued").await;
    drop(station); // a crash: no DISCONNECT

    mosquitto_pub(port, "selftest/queued", "while away");

    let mut station = MqttStation::connect(port, "selftest-persistent", false).await;
    assert_eq!(station.status().session_present, Some(true));
    let msg = station
        .next_message(WAIT)
        .await
        .expect("the queued message");
    assert_eq!(msg.payload, b"while away");

    // Negative control: a clean start discards the session and what it held.
    drop(station);
    mosquitto_pub(port, "selftest/queued", "discarded");
    let mut clean = MqttStation::connect(port, "selftest-persistent", true).await;
    assert_eq!(clean.status().session_present, Some(false));
    assert!(
        clean.next_message(QUIET).await.is_none(),
        "saw {:?}",
        clean.seen()
    );
}

#[tokio::test]
async fn stations_reconnect_after_sigterm_and_sigkill_restarts() {
    let mut broker = Mosquitto::start(MosquittoOpts::default().with_persistence());
    let port = broker.port();
    let mut v5 = MqttStation::connect(port, "selftest-reconnect-5", false).await;
    v5.subscribe("selftest/after").await;
    let mut v4 = MqttStation311::connect(port, "selftest-reconnect-4", false).await;
    v4.subscribe("selftest/after").await;

    broker.restart(); // SIGTERM: the sessions are saved
    let status = v5.wait_connacks(2, WAIT).await;
    assert_eq!(status.session_present, Some(true), "{status:?}");
    assert!(status.errors >= 1, "the restart was seen: {status:?}");
    let status = v4.wait_connacks(2, WAIT).await;
    assert_eq!(status.session_present, Some(true), "{status:?}");

    mosquitto_pub(port, "selftest/after", "one");
    assert_eq!(
        v5.wait_for(|m| m.topic == "selftest/after", WAIT)
            .await
            .payload,
        b"one"
    );
    assert_eq!(
        v4.wait_for(|m| m.topic == "selftest/after", WAIT)
            .await
            .payload,
        b"one"
    );

    // SIGKILL: whatever the broker kept, the stations come back by themselves.
    broker.kill();
    assert!(!broker.is_running());
    broker.restart();
    assert!(broker.is_running());
    v5.wait_connacks(3, WAIT).await;
    v4.wait_connacks(3, WAIT).await;
}

#[tokio::test]
async fn mosquitto_sub_sees_retained_flagged_messages_from_mosquitto_pub_v5() {
    let broker = Mosquitto::start_default();
    mosquitto_pub_with(broker.port(), "selftest/r", "r1", &["-r", "-V", "mqttv5"]);
    let mut sub = MosquittoSub::start_with(broker.port(), &["selftest/r"], &["-V", "mqttv5"]);
    let msg = sub.wait_for(|m| m.topic == "selftest/r", WAIT);
    assert_eq!(msg.payload, "r1");
}

#[test]
fn tls_listener_accepts_the_test_ca_and_refuses_another() {
    let pki = TestPki::new();
    let server = pki.server_cert(&["localhost", "127.0.0.1"]);
    let opts = MosquittoOpts::default()
        .with_line(format!("cafile {}", pki.ca_path().display()))
        .with_line(format!("certfile {}", server.cert.display()))
        .with_line(format!("keyfile {}", server.key.display()));
    let broker = Mosquitto::start(opts);
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();

    try_mosquitto_pub(broker.port(), "selftest/tls", "x", &["--cafile", ca])
        .expect("the test CA is trusted");

    // Negative controls: another CA, and plain TCP, are refused.
    let stranger = TestPki::named("some other CA");
    let other = stranger.ca_path();
    assert!(try_mosquitto_pub(
        broker.port(),
        "selftest/tls",
        "x",
        &["--cafile", other.to_str().unwrap()]
    )
    .is_err());
    assert!(try_mosquitto_pub(broker.port(), "selftest/tls", "x", &[]).is_err());
}

#[test]
fn test_pki_issues_distinct_files_and_expired_certificates() {
    let pki = TestPki::new();
    let a = pki.server_cert(&["localhost"]);
    let b = pki.client_cert("station-1");
    let expired = pki.expired_server_cert(&["localhost"]);
    let selfsigned = pki.self_signed_cert(&["localhost"]);
    let paths = [
        &a.cert,
        &a.key,
        &b.cert,
        &b.key,
        &expired.cert,
        &selfsigned.cert,
    ];
    for (i, p) in paths.iter().enumerate() {
        assert!(p.is_file(), "{}", p.display());
        for q in &paths[i + 1..] {
            assert_ne!(p, q);
        }
    }
    assert!(a.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(a.key_pem().contains("PRIVATE KEY"));
    assert_ne!(a.cert_pem(), expired.cert_pem());
}

#[test]
fn a_missing_program_fails_with_the_install_hint() {
    let panic = std::panic::catch_unwind(|| {
        common::mosquitto::find_program("pointgate-no-such-mosquitto", "POINTGATE_TEST_UNSET_VAR")
    })
    .expect_err("a missing program must fail the test, not skip it");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains(".ci/run"), "{message}");
    // Positive control: the real one is found.
    assert!(common::mosquitto::find_program("mosquitto", "POINTGATE_TEST_UNSET_VAR").is_file());
}

#[test]
fn wait_until_returns_as_soon_as_the_condition_holds_and_false_at_the_deadline() {
    let mut calls = 0;
    assert!(wait_until(WAIT, || {
        calls += 1;
        calls == 3
    }));
    assert_eq!(calls, 3);
    let start = std::time::Instant::now();
    assert!(!wait_until(Duration::from_millis(50), || false));
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert!(start.elapsed() < WAIT);
}
