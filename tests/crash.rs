//! C1: `kill -9` the agent at random instants while stations send charges.
//!
//! The agent runs as a separate process (the `pointgate` binary); Mosquitto and the Point
//! simulator (automatic terminals) run outside it and outlive every kill. Four stations
//! with two terminals each keep charges flowing over MQTT 5 persistent sessions and
//! re-send any command that got no `accepted` within 1 s, as real stations do. Kill `i`
//! of `K` comes at a random instant (seeded, the seed is printed) once `i·N/K` charges
//! were sent, so kills spread over the whole run and some land while the agent is still
//! starting; the agent is restarted at once. At the end, with the agent left running, the
//! test waits for every charge to be final or `needs_attention` and checks the promises:
//! 0 duplicated creates at the simulator, 0 accepted charges lost, every charge
//! accepted, `approved` only with a payment approved at the simulator for the amount.
//!
//! CI size: 500 charges, 50 kills. `POINTGATE_LONG=1`: 10,000 charges, 1,000 kills.
//! `POINTGATE_CRASH_CHARGES` / `POINTGATE_CRASH_KILLS` set other sizes,
//! `POINTGATE_CRASH_SEED` replays a seed.

mod common;

use std::time::{Duration, Instant};

use common::crowd::{Crowd, CrowdOpts, SimCheck, Summary};
use common::util::{ms, percentile, unix_ms};
use common::{AgentOpts, World};

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_instants_loses_nothing_and_creates_nothing_twice() {
    let long = std::env::var("POINTGATE_LONG").is_ok_and(|v| v == "1");
    let charges = env_usize("POINTGATE_CRASH_CHARGES").unwrap_or(if long { 10_000 } else { 500 });
    let kills = env_usize("POINTGATE_CRASH_KILLS").unwrap_or(if long { 1_000 } else { 50 });
    let seed: u64 = std::env::var("POINTGATE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| unix_ms() as u64);
    println!("C1: {charges} charges, {kills} kills, seed {seed} (POINTGATE_CRASH_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);

    let mut opts = AgentOpts::crowd(4, 2);
    // A charge stuck behind another on its terminal ends (`expired`) in 10 s, the least
    // the contract allows, so the run keeps moving whatever the engine holds.
    opts.queue_extra.push("charge_ttl = \"10s\"");
    let world = World::builder()
        .broker(
            common::MosquittoOpts::default()
                // The agent's session holds every command sent while it is down.
                .with_line("max_queued_messages 0")
                .with_line("max_inflight_messages 0"),
        )
        .agent(opts.clone())
        .setup_only()
        .status_watch()
        .start()
        .await;
    let World {
        broker,
        mut agent,
        watch,
        ..
    } = world;
    let (broker, watch) = (broker.expect("a broker"), watch.expect("a status watch"));
    let started = Instant::now();
    let spawned_ms = unix_ms();
    agent.spawn(&[]);
    watch
        .wait_online_since(spawned_ms, Duration::from_secs(30))
        .await
        .expect("the agent comes online");

    let crowd = Crowd::start(CrowdOpts::new(
        broker.port(),
        &agent.prefix(),
        &opts.stations,
        charges,
    ))
    .await;

    // (spawned at, its Unix ms, killed at) per process after the first.
    let mut restarts: Vec<(Instant, i64, Option<Instant>)> = Vec::new();
    // Progress must continue between kills; a stall this long is a failure.
    let stall = Duration::from_secs(if long { 300 } else { 120 });
    for i in 1..=kills {
        let threshold = (i * charges).div_ceil(kills);
        let crowd_ref = &crowd;
        let reached =
            common::wait_until_async(stall, || crowd_ref.sent() >= threshold.min(charges)).await;
        assert!(
            reached,
            "no progress: {} of {charges} charges sent, {} done, before kill {i}; {}",
            crowd.sent(),
            crowd.done(),
            Summary::of(&crowd.tracks())
        );
        // A random instant: anywhere in the next 400 ms (the run's own pace decides what
        // the agent is doing then: starting, storing, sending, polling, publishing).
        tokio::time::sleep(Duration::from_millis(rng.u64(0..400))).await;
        let killed_at = Instant::now();
        assert!(
            agent.is_running(),
            "the agent died by itself before kill {i}"
        );
        agent.kill9();
        if let Some(last) = restarts.last_mut() {
            last.2 = Some(killed_at);
        }
        let at = Instant::now();
        let at_ms = unix_ms();
        agent.spawn(&[]);
        restarts.push((at, at_ms, None));
        if i % 10 == 0 {
            println!(
                "  {:>5.1} s: kill {i}, {} sent, {} done",
                started.elapsed().as_secs_f64(),
                crowd.sent(),
                crowd.done()
            );
        }
    }

    // The agent stays up now: every charge must end.
    let settle = Duration::from_secs(if long { 600 } else { 120 });
    let settled = crowd.wait_settled(settle).await;
    let elapsed = started.elapsed();
    let tracks = crowd.tracks();
    let summary = Summary::of(&tracks);
    // Clear any fault before asking the simulator (there is none in this test).
    let sim = SimCheck::of(&agent.sim, &tracks).await;

    // Time to recover: from the restart to the new process's `online`, for the restarts
    // that were not killed again first.
    let mut recover = Vec::new();
    let mut killed_while_starting = 0;
    for (at, at_ms, killed) in &restarts {
        match watch.online_since(*at_ms) {
            Some(s) if killed.is_none_or(|k| s.at <= k) => {
                recover.push(s.at.saturating_duration_since(*at))
            }
            _ => killed_while_starting += 1,
        }
    }
    println!("C1 results ({} s):", elapsed.as_secs());
    println!(
        "kills {kills} ({killed_while_starting} before the new process was online), restarts {}",
        restarts.len()
    );
    println!("{summary}");
    println!("{sim}");
    println!(
        "re-sent commands {}; time to recover (restart to online): p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms over {} restarts",
        crowd.resends(),
        percentile(&recover, 50).map_or(0.0, ms),
        percentile(&recover, 90).map_or(0.0, ms),
        percentile(&recover, 100).map_or(0.0, ms),
        recover.len()
    );
    if !summary.lost.is_empty() || !settled {
        let open: Vec<String> = tracks
            .iter()
            .filter(|t| !t.done())
            .take(20)
            .map(|t| format!("{}/{}: {:?}", t.station, t.request_id, t.states()))
            .collect();
        println!("not done (first 20): {open:#?}");
    }

    assert!(
        settled,
        "not every charge ended within {settle:?}: {summary}"
    );
    assert_eq!(summary.sent, charges);
    assert!(
        sim.duplicated.is_empty(),
        "duplicated creates: {:?}",
        sim.duplicated
    );
    assert!(
        summary.lost.is_empty(),
        "accepted and lost: {:?}",
        summary.lost
    );
    assert!(
        summary.never_accepted.is_empty(),
        "sent (and re-sent) but never accepted: {:?}",
        summary.never_accepted
    );
    assert_eq!(summary.refused, 0, "refusals: {summary}");
    assert!(
        summary.double_final.is_empty(),
        "{:?}",
        summary.double_final
    );
    assert!(sim.false_approvals.is_empty(), "{:?}", sim.false_approvals);
    assert!(sim.shared_payments.is_empty(), "{:?}", sim.shared_payments);
    assert!(
        sim.creates <= charges,
        "{} creates for {charges} charges",
        sim.creates
    );
    agent.stop_term_async().await;
    crowd.stop().await;
}

/// The checks above can fail: a reference committed twice, an accepted charge with no
/// end, two final states, and an `approved` whose payment was rejected are all caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_catch_a_duplicate_a_lost_charge_and_a_false_approval() {
    use common::crowd::{sim_client, Track};
    use pointgate::sim::{self, SimConfig, TerminalMode};
    use serde_json::json;

    let devices = vec!["PAX_A910__NEG1".to_string(), "PAX_A910__NEG2".to_string()];
    let sim = sim::start(SimConfig {
        token: common::agent::TOKEN.into(),
        devices: devices.clone(),
        terminal: TerminalMode::Auto {
            pickup: Duration::from_millis(5),
            process: Duration::from_millis(15),
        },
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let client = sim_client(&sim);
    let mut ids = Vec::new();
    // The same reference on two terminals: a duplicated create. 12.00 is rejected.
    for device in &devices {
        let answer: serde_json::Value = client
            .post(format!(
                "{}/point/integration-api/devices/{device}/payment-intents",
                sim.base_url()
            ))
            .bearer_auth(common::agent::TOKEN)
            .json(&json!({"amount": 1200, "additional_info": {
                "external_reference": "neg-ref", "print_on_terminal": true, "ticket_number": "T-1"}}))
            .send()
            .await
            .expect("create answered")
            .json()
            .await
            .expect("JSON");
        ids.push(answer["id"].as_str().expect("an id").to_string());
    }
    let sim_ref = &sim;
    let ids_ref = &ids;
    assert!(
        common::wait_until_async(Duration::from_secs(10), || {
            ids_ref
                .iter()
                .all(|i| sim_ref.intent(i).is_some_and(|v| v.payment_id.is_some()))
        })
        .await
    );
    let intent = sim.intent(&ids[0]).expect("intent");
    let payment = intent.payment_id.clone().expect("payment");

    let mut approved = Track::synthetic("st-1", "r-approved", &devices[0], "12.00");
    approved.push_event(
        json!({"request_id": "r-approved", "state": "accepted", "seq": 1, "final": false}),
    );
    approved.push_event(
        json!({"request_id": "r-approved", "state": "approved", "seq": 2, "final": true,
        "intent_id": ids[0], "payment": {"id": payment, "status": "approved"}}),
    );
    let mut lost = Track::synthetic("st-1", "r-lost", &devices[1], "15.00");
    lost.push_event(json!({"request_id": "r-lost", "state": "sent", "seq": 2, "final": false}));
    let mut twice = Track::synthetic("st-1", "r-twice", &devices[1], "15.00");
    twice
        .push_event(json!({"request_id": "r-twice", "state": "declined", "seq": 3, "final": true}));
    twice
        .push_event(json!({"request_id": "r-twice", "state": "approved", "seq": 4, "final": true}));
    let unheard = Track::synthetic("st-1", "r-unheard", &devices[1], "15.00");
    let tracks = vec![approved, lost, twice, unheard];

    let summary = Summary::of(&tracks);
    assert_eq!(summary.lost, vec!["st-1/r-lost".to_string()]);
    assert_eq!(summary.never_accepted, vec!["st-1/r-unheard".to_string()]);
    assert_eq!(summary.double_final.len(), 1, "{summary}");
    let check = SimCheck::of(&sim, &tracks).await;
    assert_eq!(check.duplicated, vec!["neg-ref".to_string()]);
    assert_eq!(
        check.false_approvals.len(),
        1,
        "{check}: {:?}",
        check.false_approvals
    );
    assert!(
        check.false_approvals[0].contains("rejected"),
        "{:?}",
        check.false_approvals
    );
    sim.shutdown();
}
