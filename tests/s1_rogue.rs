//! S1, the rogue-station matrix of `reliability.md`, through the shipped broker config and
//! ACL: another station's topic or terminal, a replayed `request_id` with other content,
//! amount `"0"`, negative, over the site limit, a JSON float, a 9 KiB payload. Each is
//! refused with its code (or dropped by the broker), and nothing reaches the Point API:
//! the simulator's request log shows no create.

mod common;

use common::acl::{AclBroker, WAIT};
use common::agent::{charge, TestAgent};
use common::{MqttStation, Msg, PubOpts};
use serde_json::{json, Value};

struct World {
    acl: AclBroker,
    agent: TestAgent,
    /// kiosk-1, logged in as itself, subscribed to its own events; the agent is online.
    k1: MqttStation,
}

async fn world(extra_users: &[&str]) -> World {
    let mut users = vec!["kiosk-1", "kiosk-2"];
    users.extend_from_slice(extra_users);
    let mut w = common::World::builder()
        .acl(&users)
        .acl_station("kiosk-1")
        .start()
        .await;
    World {
        k1: w.take_station(),
        acl: w.acl.take().expect("the ACL broker"),
        agent: w.agent,
    }
}

fn json(m: &Msg) -> Value {
    serde_json::from_slice(&m.payload).unwrap_or(Value::Null)
}

/// Creates (POSTs) the simulator received: payment intents, refunds, anything.
fn posts(agent: &TestAgent) -> Vec<String> {
    agent
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.path)
        .collect()
}

fn cmd(v: Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rogue_command_is_refused_with_its_code_and_nothing_reaches_the_api() {
    let mut w = world(&[]).await;
    let cmd1 = w.agent.cmd_topic("kiosk-1");
    let evt1 = w.agent.evt_topic("kiosk-1");
    let big = "x".repeat(9 * 1024);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "other-terminal",
            cmd(json!({"v":1,"type":"charge","request_id":"other-terminal",
                       "amount":"10.00","terminal":"PAX_A910__0002"})),
            "terminal_not_bound",
        ),
        ("zero", charge("zero", "0"), "amount_out_of_range"),
        (
            "zero-cents",
            charge("zero-cents", "0.00"),
            "amount_out_of_range",
        ),
        ("negative", charge("negative", "-10.00"), "bad_amount"),
        (
            "over-limit",
            charge("over-limit", "4000000.01"),
            "amount_out_of_range",
        ),
        (
            "under-minimum",
            charge("under-minimum", "4.99"),
            "amount_out_of_range",
        ),
        (
            "float",
            cmd(json!({"v":1,"type":"charge","request_id":"float","amount":15.5})),
            "bad_amount",
        ),
        (
            "integer",
            cmd(json!({"v":1,"type":"charge","request_id":"integer","amount":15})),
            "bad_amount",
        ),
        (
            "",
            cmd(json!({"v":1,"type":"charge","request_id":"too-big",
                       "amount":"10.00","description":big})),
            "too_large",
        ),
    ];
    for (rid, payload, code) in &cases {
        w.k1.publish(&cmd1, payload.clone()).await;
        let m =
            w.k1.wait_for(|m| m.topic == evt1 && json(m)["state"] == "refused", WAIT)
                .await;
        let v = json(&m);
        assert_eq!(v["error"]["code"], *code, "case {rid:?}: {v}");
        assert_eq!(v["final"], true);
        assert_eq!(v["seq"], 0);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "case {rid:?}: a refusal says why: {v}"
        );
        if rid.is_empty() {
            assert!(
                v["request_id"].is_null(),
                "too_large has no request_id: {v}"
            );
        } else {
            assert_eq!(v["request_id"], *rid);
        }
    }
    assert_eq!(posts(&w.agent), Vec::<String>::new(), "nothing may be sent");
    // Positive control: the same station, topic and terminal, an honest charge: one create.
    w.k1.publish(&cmd1, charge("honest", "10.00")).await;
    let last =
        w.k1.wait_for(
            |m| m.topic == evt1 && json(m)["request_id"] == "honest" && json(m)["final"] == true,
            WAIT,
        )
        .await;
    assert_eq!(json(&last)["state"], "approved");
    assert_eq!(posts(&w.agent).len(), 1, "{:?}", posts(&w.agent));
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_id_with_other_content_is_a_conflict_and_the_original_is_untouched() {
    let mut w = world(&[]).await;
    let cmd1 = w.agent.cmd_topic("kiosk-1");
    let evt1 = w.agent.evt_topic("kiosk-1");
    w.k1.publish(&cmd1, charge("sale-7", "10.00")).await;
    let accepted =
        w.k1.wait_for(
            |m| json(m)["request_id"] == "sale-7" && json(m)["state"] == "accepted",
            WAIT,
        )
        .await;
    assert_eq!(json(&accepted)["seq"], 1);
    // The replay: same request_id, another amount, then another terminal.
    for (payload, what) in [
        (charge("sale-7", "99.00"), "amount"),
        (
            cmd(
                json!({"v":1,"type":"charge","request_id":"sale-7","amount":"10.00",
                       "terminal":"PAX_A910__0002"}),
            ),
            "terminal",
        ),
    ] {
        w.k1.publish(&cmd1, payload).await;
        let m =
            w.k1.wait_for(|m| m.topic == evt1 && json(m)["state"] == "refused", WAIT)
                .await;
        let v = json(&m);
        // Another station's terminal is refused by validation, before the replay check
        // (terminal_not_bound); either way the original is untouched and nothing is sent.
        let code = v["error"]["code"].as_str().unwrap_or_default().to_owned();
        match what {
            "amount" => {
                assert_eq!(code, "conflict", "{v}");
                assert_eq!(v["current"]["request_id"], "sale-7", "{v}");
                assert_eq!(v["current"]["amount"], "10.00", "{v}");
            }
            _ => assert_eq!(code, "terminal_not_bound", "{v}"),
        }
        assert_eq!(v["request_id"], "sale-7");
        assert_eq!(v["seq"], 0);
    }
    // The original runs to its end at its own amount, with one create. (Its final event
    // may have come while the test waited for a refusal.)
    let is_final = |m: &Msg| {
        let v = json(m);
        m.topic == evt1 && v["request_id"] == "sale-7" && v["final"] == true && v["seq"] != 0
    };
    let seen = w.k1.seen().iter().find(|m| is_final(m)).cloned();
    let last = match seen {
        Some(m) => m,
        None => w.k1.wait_for(is_final, WAIT).await,
    };
    let v = json(&last);
    assert_eq!(v["state"], "approved", "{v}");
    assert_eq!(v["amount"], "10.00");
    let ledger = w.agent.sim.ledger();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].amount, 1000);
    assert_eq!(ledger[0].device_id, "PAX_A910__0001");
    // The same content again is answered with the current event, not run again.
    w.k1.publish(&cmd1, charge("sale-7", "10")).await;
    let again =
        w.k1.wait_for(
            |m| m.topic == evt1 && json(m)["request_id"] == "sale-7",
            WAIT,
        )
        .await;
    assert_eq!(json(&again), v, "a repeat is the latest event, unchanged");
    assert_eq!(posts(&w.agent).len(), 1, "{:?}", posts(&w.agent));
    w.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_station_s_topic_is_closed_by_the_broker_and_an_unconfigured_station_is_refused() {
    // kiosk-9 has a broker login but no [stations.kiosk-9] table at the agent.
    let mut w = world(&["kiosk-9"]).await;
    let mut k2 = w.acl.station("kiosk-2", "kiosk-2", true).await;
    let evt2 = w.agent.evt_topic("kiosk-2");
    k2.subscribe(&evt2).await;
    // kiosk-1 writes into kiosk-2's command topic: the broker refuses it.
    let res =
        w.k1.try_publish_opts(
            &w.agent.cmd_topic("kiosk-2"),
            charge("hijack", "10.00"),
            PubOpts::default(),
        )
        .await;
    assert!(
        res.is_err(),
        "the broker took a publish into another station's cmd"
    );
    // kiosk-9 writes into its own topic: the agent refuses it, unknown_station.
    let mut k9 = w.acl.station("kiosk-9", "kiosk-9", true).await;
    let evt9 = w.agent.evt_topic("kiosk-9");
    k9.subscribe(&evt9).await;
    k9.publish(&w.agent.cmd_topic("kiosk-9"), charge("nine", "10.00"))
        .await;
    let m = k9
        .wait_for(|m| m.topic == evt9 && json(m)["state"] == "refused", WAIT)
        .await;
    assert_eq!(json(&m)["error"]["code"], "unknown_station", "{}", m.text());
    // kiosk-2 (after the hijack attempt) gets an answer to its own command, and none
    // for the hijack.
    k2.publish(
        &w.agent.cmd_topic("kiosk-2"),
        cmd(json!({"v":1,"type":"terminals","request_id":"t-1"})),
    )
    .await;
    k2.wait_for(|m| json(m)["request_id"] == "t-1", WAIT).await;
    assert!(!k2.seen().iter().any(|m| json(m)["request_id"] == "hijack"));
    assert_eq!(posts(&w.agent), Vec::<String>::new());
    w.agent.stop().await;
}
