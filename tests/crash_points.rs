//! C2: a crash at each named window of the reliability table (the fail points of
//! `pointgate::failpoint`, compiled in only with `--features failpoints`).
//!
//! For every point, and for its first and third hit (the points of one hit count run side
//! by side, each with its own broker, simulator and agent): start the agent binary with
//! `POINTGATE_FAILPOINT=<name>:<n>`, let stations send charges until the process aborts
//! there (SIGABRT, nothing flushed: as a power cut or `kill -9` would leave it), restart it
//! without the point, and check that every charge ends final or `needs_attention` (a
//! command that was never acknowledged comes back from the broker's session or the
//! station's re-send and completes), none is refused, and the simulator committed nothing
//! twice.
//!
//! Run: `cargo test --features failpoints --test crash_points -- --nocapture`.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::crowd::{Crowd, CrowdOpts, SimCheck, StatusWatch, Summary};
use common::util::unix_ms;
use common::{AgentOpts, World};

/// Charges per round: enough for the third hit of every point.
const CHARGES: usize = 12;

/// The world of a round: broker, simulator, the agent's config and a status watch; the
/// round starts the agent itself (with its fail point).
async fn setup(opts: AgentOpts) -> (common::Mosquitto, common::TestAgent, StatusWatch) {
    let w = World::builder()
        .agent(opts)
        .setup_only()
        .status_watch()
        .start()
        .await;
    let World {
        broker,
        agent,
        watch,
        ..
    } = w;
    (
        broker.expect("a broker"),
        agent,
        watch.expect("a status watch"),
    )
}

struct Round {
    point: &'static str,
    hit: u32,
    summary: Summary,
    sim: SimCheck,
}

async fn crash_at(point: &'static str, hit: u32) -> Round {
    let mut opts = AgentOpts::crowd(2, 2);
    // A charge stuck behind a `needs_attention` one on its terminal ends in 10 s.
    opts.queue_extra.push("charge_ttl = \"10s\"");
    let (broker, mut agent, watch) = setup(opts.clone()).await;
    let spawned = unix_ms();
    let spec = format!("{point}:{hit}");
    agent.spawn(&[("POINTGATE_FAILPOINT", spec.as_str())]);
    watch
        .wait_online_since(spawned, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("{spec}: the agent comes online"));
    let mut crowd_opts = CrowdOpts::new(broker.port(), &agent.prefix(), &opts.stations, CHARGES);
    crowd_opts.window_per_terminal = 1;
    let crowd = Crowd::start(crowd_opts).await;

    let status = agent
        .wait_exit_async(Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("{spec}: the agent did not crash at its fail point within 60 s"));
    assert_eq!(
        status.signal(),
        Some(6),
        "{spec}: the agent ended by SIGABRT ({status:?})"
    );
    assert!(
        agent
            .log()
            .contains(&format!("failpoint {point}: aborting")),
        "{spec}: the abort was at the fail point"
    );
    let sent_at_crash = crowd.sent();
    let done_at_crash = crowd.done();

    let restarted = unix_ms();
    agent.spawn(&[]);
    watch
        .wait_online_since(restarted, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("{spec}: the agent comes back online"));
    let settled = crowd.wait_settled(Duration::from_secs(90)).await;
    let tracks = crowd.tracks();
    let summary = Summary::of(&tracks);
    let sim = SimCheck::of(&agent.sim, &tracks).await;
    println!("{spec}: crashed with {sent_at_crash} sent, {done_at_crash} done\n{summary}\n{sim}");
    if !settled {
        for t in tracks.iter().filter(|t| !t.done()) {
            println!("  open: {}/{}: {:?}", t.station, t.request_id, t.states());
        }
    }
    assert!(settled, "{spec}: not every charge ended: {summary}");
    assert!(
        sim.duplicated.is_empty(),
        "{spec}: duplicated: {:?}",
        sim.duplicated
    );
    assert!(summary.lost.is_empty(), "{spec}: lost: {:?}", summary.lost);
    assert!(
        summary.never_accepted.is_empty(),
        "{spec}: never accepted: {:?}",
        summary.never_accepted
    );
    assert_eq!(summary.refused, 0, "{spec}: {summary}");
    assert!(
        summary.double_final.is_empty(),
        "{spec}: {:?}",
        summary.double_final
    );
    assert!(
        sim.false_approvals.is_empty(),
        "{spec}: {:?}",
        sim.false_approvals
    );
    agent.stop_term_async().await;
    crowd.stop().await;
    Round {
        point,
        hit,
        summary,
        sim,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_fail_point_loses_nothing_and_creates_nothing_twice() {
    assert!(
        !pointgate::failpoint::ALL.is_empty(),
        "the fail points are listed"
    );
    // The rounds are independent (each has its own broker, simulator, agent and state)
    // and mostly wait: one wave per hit count, the points of a wave side by side.
    let mut rounds = Vec::new();
    for hit in [1, 3] {
        let wave: Vec<_> = pointgate::failpoint::ALL
            .iter()
            .map(|&point| tokio::spawn(crash_at(point, hit)))
            .collect();
        for round in wave {
            match round.await {
                Ok(r) => rounds.push(r),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("a round did not finish: {e}"),
            }
        }
    }
    println!("C2 summary:");
    println!(
        "{:<24} {:>3} {:>5} {:>8} {:>9} {:>8} {:>5} {:>10}",
        "point", "hit", "sent", "accepted", "final", "n_attn", "lost", "duplicates"
    );
    for r in &rounds {
        let finals: usize = r.summary.final_by_state.values().sum();
        println!(
            "{:<24} {:>3} {:>5} {:>8} {:>9} {:>8} {:>5} {:>10}   {:?}",
            r.point,
            r.hit,
            r.summary.sent,
            r.summary.accepted,
            finals,
            r.summary.needs_attention_open,
            r.summary.lost.len(),
            r.sim.duplicated.len(),
            r.summary.final_by_state
        );
    }
}

/// The crash is real: with a point armed and nothing else, the agent aborts where told,
/// and without one it does not (the control for the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unarmed_agent_does_not_abort() {
    let opts = AgentOpts::crowd(1, 1);
    let (broker, mut agent, watch) = setup(opts.clone()).await;
    let spawned = unix_ms();
    agent.spawn(&[]);
    watch
        .wait_online_since(spawned, Duration::from_secs(30))
        .await
        .expect("the agent comes online");
    let crowd = Crowd::start(CrowdOpts::new(
        broker.port(),
        &agent.prefix(),
        &opts.stations,
        3,
    ))
    .await;
    assert!(crowd.wait_settled(Duration::from_secs(30)).await);
    assert!(agent.is_running(), "no fail point armed: no abort");
    assert!(!agent.log().contains("failpoint"));
    agent.stop_term_async().await;
    crowd.stop().await;
}
