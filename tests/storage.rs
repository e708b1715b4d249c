//! A store that cannot write (a full or dead disk, by the `store_write_error` fail point):
//! a charge is refused `storage_unavailable`, nothing is accepted and nothing reaches the
//! API. Needs `--features failpoints`; one test per binary because the fail point is
//! read once per process.

mod common;

use std::time::Duration;

use common::agent::charge;
use common::World;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_refuses_commands_storage_unavailable() {
    // This binary holds this one test, so no other thread
    // reads the environment concurrently.
    std::env::set_var("POINTGATE_FAILPOINT", "store_write_error");
    let mut w = World::builder().station("kiosk-1-test").start().await;
    let mut station = w.take_station();
    let (_broker, mut agent) = w.into_broker_and_agent();
    station
        .publish(&agent.cmd_topic("kiosk-1"), charge("disk-1", "15.00"))
        .await;
    let evt = agent.evt_topic("kiosk-1");
    let m = station
        .wait_for(
            |m| m.topic == evt && m.json()["request_id"] == "disk-1",
            Duration::from_secs(30),
        )
        .await;
    let v = m.json();
    assert_eq!(v["state"], "refused", "{v}");
    assert_eq!(v["error"]["code"], "storage_unavailable", "{v}");
    assert_eq!(v["seq"], 0);
    assert!(agent.sim.ledger().is_empty());
    assert!(
        agent.sim.requests().iter().all(|r| r.method != "POST"),
        "nothing is sent to the API"
    );
    agent.stop().await;
}
