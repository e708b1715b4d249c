//! What the embedded broker of `pointgate demo` (rumqttd 0.20, MQTT 5 listener) does with
//! rumqttc 0.25 clients: the demo may rely on exactly what these tests show. Some tests
//! pin down where rumqttd differs from Mosquitto (marked "differs"), so a rumqttd upgrade
//! that changes them is noticed.

mod common;

use std::time::Duration;

use common::{MqttStation, MqttStation311, PubOpts, StationOpts};
use pointgate::broker::EmbeddedBroker;

const WAIT: Duration = Duration::from_secs(10);
/// How long a negative control listens for something that must not arrive.
const QUIET: Duration = Duration::from_millis(300);

fn start() -> (EmbeddedBroker, u16) {
    let broker = EmbeddedBroker::start().expect("the embedded broker starts");
    let port = broker.addr().port();
    (broker, port)
}

/// Every message still to come within [`QUIET`], as text.
async fn rest(station: &mut MqttStation) -> Vec<String> {
    let mut texts = Vec::new();
    while let Some(msg) = station.next_message(QUIET).await {
        texts.push(msg.text());
    }
    texts
}

#[tokio::test]
async fn v5_client_publishes_qos1_with_puback_and_a_v5_subscriber_receives_it() {
    let (broker, port) = start();
    assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{port}"));
    let mut sub = MqttStation::connect(port, "sub", true).await;
    sub.subscribe("demo/in/#").await;
    let mut publisher = MqttStation::connect(port, "pub", true).await;

    publisher.publish("demo/elsewhere", "no").await; // returns on its PUBACK
    publisher.publish("demo/in/1", "hello").await;

    let msg = sub.next_message(WAIT).await.expect("a message");
    assert_eq!(
        (msg.topic.as_str(), msg.payload.as_slice(), msg.qos),
        ("demo/in/1", &b"hello"[..], 1)
    );
    // Negative control: nothing outside the filter.
    assert!(
        sub.next_message(QUIET).await.is_none(),
        "saw {:?}",
        sub.seen()
    );
}

#[tokio::test]
async fn v4_and_v5_listeners_share_one_router() {
    let broker = EmbeddedBroker::start().expect("the embedded broker starts");
    assert_eq!(broker.url_v4(), format!("mqtt://{}", broker.addr_v4()));
    let mut v5 = MqttStation::connect(broker.addr().port(), "five", true).await;
    v5.subscribe("demo/#").await;
    let mut v4 = MqttStation311::connect(broker.addr_v4().port(), "four", true).await;
    v4.subscribe("demo/#").await;

    v4.publish("demo/from4", "a").await;
    v5.publish("demo/from5", "b").await;

    for station_topic in ["demo/from4", "demo/from5"] {
        assert!(v5.wait_for(|m| m.topic == station_topic, WAIT).await.qos == 1);
        assert!(v4.wait_for(|m| m.topic == station_topic, WAIT).await.qos == 1);
    }
}

#[tokio::test]
async fn mqtt5_publish_properties_pass_through() {
    let (_broker, port) = start();
    let mut agent = MqttStation::connect(port, "agent", true).await;
    agent.subscribe("demo/cmd").await;
    let mut station = MqttStation::connect(port, "station", true).await;

    let opts = PubOpts {
        response_topic: Some("demo/reply".into()),
        correlation_data: Some(b"corr-7".to_vec()),
        message_expiry: Some(60),
        content_type: Some("application/json".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..PubOpts::default()
    };
    station.publish_opts("demo/cmd", "{}", opts).await;
    let msg = agent.wait_for(|m| m.topic == "demo/cmd", WAIT).await;
    assert_eq!(msg.response_topic.as_deref(), Some("demo/reply"));
    assert_eq!(msg.correlation_data.as_deref(), Some(&b"corr-7"[..]));
    assert_eq!(msg.message_expiry, Some(60));
    assert_eq!(msg.content_type.as_deref(), Some("application/json"));
    assert_eq!(msg.user_properties, vec![("k".to_owned(), "v".to_owned())]);

    // Negative control: a plain publish arrives without them.
    station.publish("demo/cmd", "bare").await;
    let bare = agent.wait_for(|m| m.payload == b"bare", WAIT).await;
    assert_eq!((bare.response_topic, bare.correlation_data), (None, None));
}

#[tokio::test]
async fn persistent_session_keeps_subscriptions_and_queues_messages_while_away() {
    let (_broker, port) = start();
    let mut publisher = MqttStation::connect(port, "pub", true).await;
    let mut station = MqttStation::connect(port, "persistent", false).await;
    assert_eq!(station.status().session_present, Some(false));
    station.subscribe("demo/q").await;
    drop(station); // a crash: no DISCONNECT

    publisher.publish("demo/q", "while away").await;
    let mut station = MqttStation::connect(port, "persistent", false).await;
    assert_eq!(station.status().session_present, Some(true));
    assert_eq!(
        station.next_message(WAIT).await.expect("queued").text(),
        "while away"
    );
    publisher.publish("demo/q", "live").await;
    assert_eq!(
        station.next_message(WAIT).await.expect("live").text(),
        "live"
    );

    // Negative control: a clean start gets no session and nothing queued.
    drop(station);
    publisher.publish("demo/q", "dropped").await;
    let mut clean = MqttStation::connect(port, "persistent", true).await;
    assert_eq!(clean.status().session_present, Some(false));
    assert_eq!(rest(&mut clean).await, Vec::<String>::new());
}

#[tokio::test]
async fn differs_session_expiry_zero_still_keeps_the_session() {
    // MQTT 5 says a session with expiry 0 ends with the connection (Mosquitto does so);
    // rumqttd keeps it. Harmless for the demo (it only errs towards redelivery).
    let (_broker, port) = start();
    let mut publisher = MqttStation::connect(port, "pub", true).await;
    let mut opts = StationOpts::new(port, "no-expiry", false);
    opts.session_expiry = None;
    let mut station = MqttStation::connect_with(opts.clone()).await;
    station.subscribe("demo/e").await;
    drop(station);
    publisher.publish("demo/e", "kept anyway").await;
    let mut station = MqttStation::connect_with(opts).await;
    assert_eq!(station.status().session_present, Some(true));
    assert_eq!(rest(&mut station).await, vec!["kept anyway"]);
}

#[tokio::test]
async fn manual_acks_an_unacked_message_is_redelivered_after_reconnect_an_acked_one_is_not() {
    let (_broker, port) = start();
    let mut publisher = MqttStation::connect(port, "pub", true).await;
    let opts = StationOpts::new(port, "agent", false).manual_acks();
    let mut agent = MqttStation::connect_with(opts.clone()).await;
    agent.subscribe("demo/cmd/#").await;

    for text in ["a", "b", "c"] {
        publisher.publish("demo/cmd/x", text).await;
    }
    let a = agent.next_message(WAIT).await.expect("a");
    let b = agent.next_message(WAIT).await.expect("b");
    let c = agent.next_message(WAIT).await.expect("c");
    assert_eq!([a.text(), b.text(), c.text()], ["a", "b", "c"]);
    // In order: a and b acknowledged (the PUBACKs left), c not; then a crash.
    agent.ack(&a).await;
    agent.ack(&b).await;
    drop(agent);

    let mut agent = MqttStation::connect_with(opts).await;
    assert_eq!(agent.status().session_present, Some(true));
    let again = agent.next_message(WAIT).await.expect("c again");
    assert_eq!(again.text(), "c");
    // Differs: the redelivery does not set DUP. Do not rely on it.
    assert!(!again.dup);
    agent.ack(&again).await;
    assert_eq!(rest(&mut agent).await, Vec::<String>::new());
}

#[tokio::test]
async fn differs_an_out_of_order_ack_is_not_honoured_the_message_comes_again() {
    // rumqttd releases acknowledged messages in order only: acking c while b is pending
    // leaves c to be redelivered after a reconnect. A duplicate, never a loss: the agent
    // must (and does) treat a re-sent command as the same request.
    let (_broker, port) = start();
    let mut publisher = MqttStation::connect(port, "pub", true).await;
    let opts = StationOpts::new(port, "agent", false).manual_acks();
    let mut agent = MqttStation::connect_with(opts.clone()).await;
    agent.subscribe("demo/cmd/#").await;
    for text in ["a", "b", "c"] {
        publisher.publish("demo/cmd/x", text).await;
    }
    let a = agent.next_message(WAIT).await.expect("a");
    let _b = agent.next_message(WAIT).await.expect("b");
    let c = agent.next_message(WAIT).await.expect("c");
    agent.ack(&c).await;
    agent.ack(&a).await;
    drop(agent);

    let mut agent = MqttStation::connect_with(opts).await;
    assert_eq!(rest(&mut agent).await, vec!["b", "c"]);
}

#[tokio::test]
async fn unacked_deliveries_stop_at_100_in_flight_and_resume_on_acks() {
    let (_broker, port) = start();
    let mut publisher = MqttStation::connect(port, "pub", true).await;
    let mut agent =
        MqttStation::connect_with(StationOpts::new(port, "agent", false).manual_acks()).await;
    agent.subscribe("demo/many").await;
    for i in 0..120 {
        publisher.publish("demo/many", i.to_string()).await;
    }
    let mut first = Vec::new();
    while let Some(msg) = agent.next_message(QUIET).await {
        first.push(msg);
    }
    assert_eq!(first.len(), 100, "the listener's max_inflight_count");
    for msg in &first {
        agent.ack(msg).await;
    }
    let mut rest_count = 0;
    while let Some(msg) = agent.next_message(QUIET).await {
        agent.ack(&msg).await;
        rest_count += 1;
    }
    assert_eq!(rest_count, 20);
}

#[tokio::test]
async fn retained_messages_are_served_to_later_subscribers() {
    let (_broker, port) = start();
    let mut publisher = MqttStation::connect(port, "pub", true).await;
    let retained = PubOpts {
        retain: true,
        ..PubOpts::default()
    };
    publisher
        .publish_opts("demo/status", "online", retained)
        .await;
    publisher.publish("demo/plain", "not kept").await;

    let mut late = MqttStation::connect(port, "late", true).await;
    late.subscribe("demo/status").await;
    late.subscribe("demo/plain").await;
    let msg = late.next_message(WAIT).await.expect("the retained message");
    assert_eq!((msg.text(), msg.retain), ("online".to_owned(), true));
    assert_eq!(rest(&mut late).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_queued_message_past_its_expiry_is_dropped() {
    let (_broker, port) = start();
    let mut publisher = MqttStation::connect(port, "pub", true).await;
    let mut station = MqttStation::connect(port, "away", false).await;
    station.subscribe("demo/x").await;
    drop(station);

    let short = PubOpts {
        message_expiry: Some(1),
        ..PubOpts::default()
    };
    publisher.publish_opts("demo/x", "short-lived", short).await;
    let long = PubOpts {
        message_expiry: Some(600),
        ..PubOpts::default()
    };
    publisher.publish_opts("demo/x", "long-lived", long).await;
    // Not synchronisation: the point is that more than the 1 s expiry passes.
    tokio::time::sleep(Duration::from_millis(2_100)).await;

    let mut station = MqttStation::connect(port, "away", false).await;
    let msg = station
        .next_message(WAIT)
        .await
        .expect("the long-lived message");
    assert_eq!(msg.text(), "long-lived");
    // As MQTT 5 asks, the expiry forwarded is what remains after the time spent queued.
    assert!(
        matches!(msg.message_expiry, Some(590..=599)),
        "{:?}",
        msg.message_expiry
    );
    assert_eq!(rest(&mut station).await, Vec::<String>::new());
}
