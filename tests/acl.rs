//! The shipped Mosquitto config and ACL (`packaging/mosquitto/`), run for real: per-station
//! usernames, a station writes only its own `cmd` and reads only its own topics, the
//! agent's user has the whole prefix. A station can neither publish into another
//! station's command topic, nor read its events, nor make the agent publish elsewhere
//! through an MQTT 5 Response Topic; honest stations and the agent still work.

mod common;

use common::acl::{AclBroker, WAIT};
use common::agent::{charge, TestAgent};
use common::{MqttStation, Msg, PubOpts};
use serde_json::Value;

struct World {
    acl: AclBroker,
    agent: TestAgent,
    /// Logged in as `kiosk-1`, subscribed to its own events and the agent's status.
    k1: MqttStation,
    /// Logged in as `kiosk-2`, subscribed to its own events.
    k2: MqttStation,
}

async fn world() -> World {
    let mut w = common::World::builder()
        .acl(&["kiosk-1", "kiosk-2"])
        .acl_station("kiosk-1")
        .start()
        .await;
    let acl = w.acl.take().expect("the ACL broker");
    let mut k2 = acl.station("kiosk-2", "kiosk-2", true).await;
    k2.subscribe(&w.agent.evt_topic("kiosk-2")).await;
    World {
        k1: w.take_station(),
        acl,
        agent: w.agent,
        k2,
    }
}

fn json(m: &Msg) -> Value {
    serde_json::from_slice(&m.payload).unwrap_or(Value::Null)
}

/// Waits on `station` for the final event of `request_id` on `topic`.
async fn final_event(station: &mut MqttStation, topic: &str, request_id: &str) -> Msg {
    station
        .wait_for(
            |m| m.topic == topic && json(m)["request_id"] == request_id && json(m)["final"] == true,
            WAIT,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_cannot_publish_into_another_station_s_command_topic() {
    let mut w = world().await;
    let foreign = w.agent.cmd_topic("kiosk-2");
    // The broker drops the publish (MQTT 5: a PUBACK that says not authorized).
    let res =
        w.k1.try_publish_opts(&foreign, charge("rogue-1", "10.00"), PubOpts::default())
            .await;
    assert!(
        res.is_err(),
        "the broker took kiosk-1's publish into kiosk-2's cmd"
    );
    // Positive control, after the rogue publish: kiosk-2's own charge goes through.
    w.k2.publish(&foreign, charge("honest-2", "10.00")).await;
    let evt2 = w.agent.evt_topic("kiosk-2");
    let last = final_event(&mut w.k2, &evt2, "honest-2").await;
    assert_eq!(json(&last)["state"], "approved");
    // The agent never saw rogue-1: no event for it, one create (honest-2's) at the API.
    assert!(
        !w.k2
            .seen()
            .iter()
            .any(|m| json(m)["request_id"] == "rogue-1"),
        "the agent answered a command kiosk-1 put into kiosk-2's topic: {:?}",
        w.k2.seen()
    );
    assert_eq!(w.agent.sim.ledger().len(), 1);
    // And kiosk-1's own command topic works.
    w.k1.publish(&w.agent.cmd_topic("kiosk-1"), charge("honest-1", "14.00"))
        .await;
    let evt1 = w.agent.evt_topic("kiosk-1");
    let last = final_event(&mut w.k1, &evt1, "honest-1").await;
    assert_eq!(json(&last)["state"], "approved");
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_cannot_read_another_station_s_events() {
    let mut w = world().await;
    // kiosk-1 tries to listen to kiosk-2's events, directly and by wildcard.
    let evt2 = w.agent.evt_topic("kiosk-2");
    let all = format!("{}/station/+/evt", w.agent.prefix());
    let _ = w.k1.try_subscribe(&evt2).await;
    let _ = w.k1.try_subscribe(&all).await;
    // Negative control: an agent-user spy with the same subscription does see them.
    let mut spy = w.acl.station("pointgate", "spy", true).await;
    spy.subscribe(&all).await;

    w.k2.publish(&w.agent.cmd_topic("kiosk-2"), charge("secret-2", "10.00"))
        .await;
    final_event(&mut w.k2, &evt2, "secret-2").await;
    final_event(&mut spy, &evt2, "secret-2").await;
    // kiosk-1's own charge runs after kiosk-2's ended: once kiosk-1 has its own final
    // event, anything of kiosk-2's the broker would deliver to it has been delivered.
    w.k1.publish(&w.agent.cmd_topic("kiosk-1"), charge("mine-1", "14.00"))
        .await;
    let evt1 = w.agent.evt_topic("kiosk-1");
    final_event(&mut w.k1, &evt1, "mine-1").await;
    let leaked: Vec<&Msg> = w.k1.seen().iter().filter(|m| m.topic == evt2).collect();
    assert!(
        leaked.is_empty(),
        "kiosk-1 read kiosk-2's events: {leaked:?}"
    );
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_topic_outside_the_station_s_own_is_refused_and_never_published_to() {
    let mut w = world().await;
    let mut spy = w.acl.station("pointgate", "spy", true).await;
    spy.subscribe(&format!("{}/#", w.agent.prefix())).await;
    let cmd1 = w.agent.cmd_topic("kiosk-1");
    let evt1 = w.agent.evt_topic("kiosk-1");
    let foreign = [
        w.agent.evt_topic("kiosk-2"),
        format!("{}/station/kiosk-2/resp", w.agent.prefix()),
        w.agent.status_topic(),
        format!("{}/terminal/PAX_A910__0002/state", w.agent.prefix()),
    ];
    for (i, rt) in foreign.iter().enumerate() {
        let rid = format!("redirect-{i}");
        let corr = format!("corr-{i}");
        w.k1.publish_with_props(&cmd1, charge(&rid, "10.00"), rt, corr.as_bytes(), None)
            .await;
        let refusal = final_event(&mut w.k1, &evt1, &rid).await;
        let v = json(&refusal);
        assert_eq!(v["state"], "refused", "{v}");
        assert_eq!(v["error"]["code"], "bad_field", "{v}");
        assert_eq!(v["seq"], 0);
        assert_eq!(refusal.correlation_data.as_deref(), Some(corr.as_bytes()));
    }
    // An honest MQTT 5 request/response under kiosk-1's own prefix still works.
    let own = format!("{}/station/kiosk-1/resp/7", w.agent.prefix());
    w.k1.subscribe(&own).await;
    w.k1.publish_with_props(&cmd1, charge("rr-1", "12.50"), &own, b"c-rr-1", None)
        .await;
    let last = final_event(&mut w.k1, &own, "rr-1").await;
    assert_eq!(json(&last)["state"], "approved");
    assert_eq!(last.correlation_data.as_deref(), Some(&b"c-rr-1"[..]));
    // The spy sees everything the agent publishes, in order: by rr-1's final event it has
    // seen anything the refused commands could have caused.
    final_event(&mut spy, &own, "rr-1").await;
    for m in spy.seen().iter().filter(|m| !m.topic.ends_with("/cmd")) {
        let v = json(m);
        let rid = v["request_id"].as_str().unwrap_or_default();
        if rid.starts_with("redirect-") {
            assert_eq!(
                m.topic, evt1,
                "a refused command's event went to {}",
                m.topic
            );
        }
        assert!(
            !foreign[..2].contains(&m.topic),
            "the agent published on {}",
            m.topic
        );
    }
    assert!(w.agent.sim.ledger().iter().all(|e| e.amount == 1250));
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_unknown_users_and_wrong_passwords() {
    let acl = AclBroker::start(&["kiosk-1"]);
    let bad = common::StationOpts::new(acl.port(), "intruder", true).credentials("kiosk-1", "nope");
    assert!(MqttStation::try_connect_with(bad).await.is_err());
    let anon = common::StationOpts::new(acl.port(), "anon", true);
    assert!(MqttStation::try_connect_with(anon).await.is_err());
    // Positive control: the right password connects.
    acl.station("kiosk-1", "kiosk-1", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_mqtt_3_1_1_station_works_under_the_acl_and_cannot_reach_another_s_topics() {
    let w = world().await;
    let opts = w.acl.station_opts("kiosk-2", "kiosk-2-v311", true);
    let mut s = common::MqttStation311::connect_with(opts).await;
    let evt2 = w.agent.evt_topic("kiosk-2");
    s.subscribe(&evt2).await;
    // MQTT 3.1.1 has no PUBACK reason: the foreign publish looks fine to the station,
    // and the broker drops it.
    s.publish(&w.agent.cmd_topic("kiosk-1"), charge("v311-rogue", "10.00"))
        .await;
    s.publish(&w.agent.cmd_topic("kiosk-2"), charge("v311-1", "10.00"))
        .await;
    let last = s
        .wait_for(
            |m| m.topic == evt2 && json(m)["request_id"] == "v311-1" && json(m)["final"] == true,
            WAIT,
        )
        .await;
    assert_eq!(json(&last)["state"], "approved");
    assert_eq!(w.agent.sim.ledger().len(), 1, "only the honest charge");
    let mut agent = w.agent;
    agent.stop().await;
}
