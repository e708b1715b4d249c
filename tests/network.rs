//! N1–N3: the Point API misbehaves while stations send charges (the agent binary as a
//! process, the simulator in the test with injected faults, a real Mosquitto).
//!
//! - N1: the API is down for longer than the charges' ttl while charges arrive: none is
//!   created after its deadline (the simulator's ledger against each charge's
//!   `expires_at`), each is reported `expired`, and once the API is back the request rate
//!   (the simulator's request log) stays within `point.max_requests_per_second`.
//! - N2: the API commits a create and the answer is lost (connection cut, or a 5xx
//!   instead of the answer), and connections are reset mid-flow: 0 duplicated creates,
//!   every charge final or `needs_attention` (how many ended `needs_attention` is printed:
//!   reconcile turns them into finals).
//! - N3: 429 with `Retry-After`, and bursts of 5xx on polls and payment lookups: no request
//!   sooner than `Retry-After` allows, all charges final.

mod common;

use std::time::Duration;

use common::crowd::{Crowd, CrowdOpts, SimCheck, StatusWatch, Summary};
use common::util::unix_ms;
use common::{AgentOpts, Mosquitto, TestAgent};
use pointgate::sim::{Fault, FaultScope, RequestLog};

struct World {
    broker: Mosquitto,
    agent: TestAgent,
    _watch: StatusWatch,
}

/// Broker, simulator and the agent binary, online.
async fn world(opts: AgentOpts) -> World {
    let w = common::World::builder().agent(opts).process().start().await;
    World {
        broker: w.broker.expect("a broker"),
        agent: w.agent,
        _watch: w.watch.expect("a status watch"),
    }
}

impl World {
    fn crowd_opts(&self, total: usize, id_prefix: &str) -> CrowdOpts {
        let mut o = CrowdOpts::new(
            self.broker.port(),
            &self.agent.prefix(),
            &self.agent.opts.stations,
            total,
        );
        o.id_prefix = id_prefix.to_string();
        o
    }
}

/// The promises every fault test checks, with what the run came to.
async fn check_promises(tag: &str, crowd: &Crowd, agent: &TestAgent) -> (Summary, SimCheck) {
    let tracks = crowd.tracks();
    let summary = Summary::of(&tracks);
    agent.sim.set_fault(Fault::None);
    let sim = SimCheck::of(&agent.sim, &tracks).await;
    println!("{tag}:\n{summary}\n{sim}");
    for t in tracks.iter().filter(|t| !t.done()) {
        println!(
            "  {tag}: open {}/{}: {:?}",
            t.station,
            t.request_id,
            t.states()
        );
    }
    assert!(
        sim.duplicated.is_empty(),
        "{tag}: duplicated creates {:?}",
        sim.duplicated
    );
    assert!(summary.lost.is_empty(), "{tag}: lost {:?}", summary.lost);
    assert!(
        summary.never_accepted.is_empty(),
        "{tag}: never accepted {:?}",
        summary.never_accepted
    );
    assert_eq!(summary.refused, 0, "{tag}: {summary}");
    assert!(
        summary.double_final.is_empty(),
        "{tag}: {:?}",
        summary.double_final
    );
    assert!(
        sim.false_approvals.is_empty(),
        "{tag}: {:?}",
        sim.false_approvals
    );
    (summary, sim)
}

/// The most requests in any window `[t, t + window)` starting at a request.
fn max_in_window(log: &[RequestLog], window_ms: i64) -> usize {
    let t: Vec<i64> = log.iter().map(|r| r.at_unix_ms).collect();
    let mut best = 0;
    let mut j = 0;
    for i in 0..t.len() {
        while j < t.len() && t[j] < t[i] + window_ms {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

/// The requests of the busiest window `[t, t + window)`.
fn busiest_window(log: &[RequestLog], window_ms: i64) -> Vec<RequestLog> {
    let (mut best, mut from) = (0, 0);
    let mut j = 0;
    for i in 0..log.len() {
        while j < log.len() && log[j].at_unix_ms < log[i].at_unix_ms + window_ms {
            j += 1;
        }
        if j - i > best {
            (best, from) = (j - i, i);
        }
    }
    log[from..from + best].to_vec()
}

/// The request-rate promise after an outage, for a limit of `rate` per second: in every
/// window of W seconds at most `rate·W` requests, plus a burst allowance of `burst`.
///
/// Why a burst allowance: a rate limit per second is a token bucket; one that has been
/// idle may let a short burst go at once, and then refills at `rate`. What must never
/// happen is a storm (everything queued during the outage sent at once, or a sustained
/// rate above the limit): the windows of 2, 5 and 10 s catch that, where a burst of
/// `burst` is a small part of the allowance.
fn rate_violations(log: &[RequestLog], rate: usize, burst: usize) -> Vec<String> {
    let mut out = Vec::new();
    for w in [1i64, 2, 5, 10] {
        let max = max_in_window(log, w * 1000);
        let allowed = rate * w as usize + burst;
        if max > allowed {
            out.push(format!(
                "{max} requests in {w} s (allowed {allowed} = {rate}/s x {w} + {burst})"
            ));
        }
    }
    out
}

#[test]
fn the_rate_check_sees_a_storm_and_passes_a_paced_flow() {
    let at = |ms: i64| RequestLog {
        method: "GET".into(),
        path: "/x".into(),
        at_unix_ms: ms,
        status: 200,
    };
    // 5 per second, evenly: fine.
    let paced: Vec<RequestLog> = (0..50).map(|i| at(i * 200)).collect();
    assert!(rate_violations(&paced, 5, 5).is_empty());
    assert_eq!(max_in_window(&paced, 1000), 5);
    // 30 at once after an outage: a storm.
    let storm: Vec<RequestLog> = (0..30).map(at).collect();
    assert!(!rate_violations(&storm, 5, 5).is_empty());
    // 8 per second sustained: over the limit in the longer windows.
    let fast: Vec<RequestLog> = (0..80).map(|i| at(i * 125)).collect();
    assert!(!rate_violations(&fast, 5, 5).is_empty());
}

/// N1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_ttl_expires_charges_and_no_storm_follows() {
    outage_then_recovery(false, false).await;
}

/// N1, strictly: every sliding second holds at most `max_requests_per_second` requests
/// (+1 for the window's edge and millisecond stamps), not the token bucket's envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_no_second_holds_more_requests_than_the_limit() {
    outage_then_recovery(true, false).await;
}

/// N1, time rule: a charge that cannot be sent while the API is down is `expired` when
/// its deadline passes (within a second), not before: the API may come back in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_is_not_expired_before_its_deadline() {
    outage_then_recovery(false, true).await;
}

async fn outage_then_recovery(strict_rate: bool, strict_expiry: bool) {
    const RATE: usize = 5;
    let mut opts = AgentOpts::crowd(2, 2);
    opts.max_rps = RATE as u32;
    opts.poll_interval = "500ms";
    let w = world(opts).await;
    let sim = &w.agent.sim;

    // The API goes down; charges arrive, each with a 10 s ttl and an `expires_at` 10 s
    // after it was sent (its deadline is the earliest of the two, so at most this).
    sim.set_fault(Fault::Down);
    let down_at = unix_ms();
    let mut o = w.crowd_opts(8, "down-");
    o.ttl_s = Some(10);
    o.expires_in = Some(Duration::from_secs(10));
    o.explicit_reference = true;
    let during = Crowd::start(o).await;
    assert!(
        during.wait_settled(Duration::from_secs(40)).await,
        "the charges sent during the outage end while it lasts: {}",
        Summary::of(&during.tracks())
    );
    let down_tracks = during.tracks();
    // The outage lasts past every deadline (the point of N1), whenever the charges ended.
    let last_deadline = down_tracks
        .iter()
        .filter_map(|t| t.expires_at_ms)
        .max()
        .expect("deadlines");
    common::wait_until_async(Duration::from_secs(30), || unix_ms() > last_deadline + 1000).await;
    let up_at = unix_ms();
    sim.set_fault(Fault::None);
    for t in &down_tracks {
        let at = t.final_event.as_ref().and_then(|e| e["at"].as_str());
        let at = at.and_then(common::util::rfc3339_ms).unwrap_or(0);
        println!(
            "N1: {} sent at +{} ms, {:?} at +{} ms, deadline +{} ms",
            t.request_id,
            t.first_sent_ms - down_at,
            t.final_state(),
            at - down_at,
            t.expires_at_ms.unwrap_or(0) - down_at
        );
    }
    during.stop().await;
    println!("N1: API down for {} ms", up_at - down_at);
    let longest_ttl = down_tracks
        .iter()
        .filter_map(|t| t.expires_at_ms.map(|e| e - t.first_sent_ms))
        .max()
        .unwrap_or(0);
    assert!(
        up_at - down_at > longest_ttl,
        "the outage outlasted the ttl"
    );
    for t in &down_tracks {
        assert_eq!(
            t.final_state().as_deref(),
            Some("expired"),
            "{}: {:?}",
            t.request_id,
            t.states()
        );
        assert!(
            t.intent_id().is_none(),
            "{}: an intent exists",
            t.request_id
        );
        let reference = t.external_reference.as_deref().expect("explicit reference");
        assert_eq!(sim.creates_for(reference), 0, "{reference} was created");
        // "expired within a second" of the deadline (plus delivery to the station).
        let at = t.final_event.as_ref().and_then(|e| e["at"].as_str());
        let at = at.and_then(common::util::rfc3339_ms).expect("event time");
        let deadline = t.expires_at_ms.expect("expires_at");
        assert!(
            at <= deadline + 1500,
            "{}: expired {} ms after its deadline",
            t.request_id,
            at - deadline
        );
        if strict_expiry {
            // The agent received it a little after the station sent it; 1 s covers that
            // and the millisecond stamps.
            assert!(
                at >= deadline - 1000,
                "{}: expired {} ms before its deadline",
                t.request_id,
                deadline - at
            );
        }
    }

    // The API is back: more charges; none may be created after its deadline, and the
    // request rate stays within the limit.
    let mut o = w.crowd_opts(24, "up-");
    o.ttl_s = Some(10);
    o.expires_in = Some(Duration::from_secs(10));
    o.explicit_reference = true;
    let after = Crowd::start(o).await;
    let settled = after.wait_settled(Duration::from_secs(90)).await;
    // The agent's requests only: the checks below make requests of their own.
    let agent_requests = sim.requests();
    let (summary, _) = check_promises("N1 after recovery", &after, &w.agent).await;
    assert!(
        settled,
        "N1: not every charge ended after recovery: {summary}"
    );
    let tracks: Vec<_> = down_tracks
        .iter()
        .chain(after.tracks().iter())
        .cloned()
        .collect();
    let by_ref: std::collections::HashMap<String, &common::crowd::Track> = tracks
        .iter()
        .filter_map(|t| t.external_reference.clone().map(|r| (r, t)))
        .collect();
    // The deadline is checked before the create leaves; the simulator stamps the
    // request after the TLS handshake on arrival: 250 ms covers that on a loaded machine.
    const ARRIVAL_SLACK_MS: i64 = 250;
    let mut late = Vec::new();
    for e in sim.ledger() {
        let t = e
            .external_reference
            .as_ref()
            .and_then(|r| by_ref.get(r))
            .unwrap_or_else(|| panic!("a create no charge asked for: {e:?}"));
        let deadline = t.expires_at_ms.expect("expires_at");
        if e.created_unix_ms > deadline + ARRIVAL_SLACK_MS {
            late.push(format!(
                "{}: created {} ms after its deadline",
                t.request_id,
                e.created_unix_ms - deadline
            ));
        }
    }
    let log: Vec<RequestLog> = agent_requests
        .into_iter()
        .filter(|r| r.at_unix_ms >= up_at)
        .collect();
    let strict = max_in_window(&log, 1000);
    let violations = rate_violations(&log, RATE, RATE);
    println!(
        "N1: {} requests after recovery; at most {strict} in any 1 s window (limit {RATE}/s); \
         2 s: {}, 5 s: {}, 10 s: {}; creates after their deadline: {}",
        log.len(),
        max_in_window(&log, 2000),
        max_in_window(&log, 5000),
        max_in_window(&log, 10_000),
        late.len()
    );
    assert!(late.is_empty(), "created after the deadline: {late:?}");
    if strict_rate {
        assert!(
            strict <= RATE + 1,
            "{strict} requests in one second at a limit of {RATE}/s: {:#?}",
            busiest_window(&log, 1000)
        );
    }
    if !violations.is_empty() {
        let first = busiest_window(&log, 1000);
        let lines: Vec<String> = first
            .iter()
            .map(|r| format!("{} {} {} {}", r.at_unix_ms, r.method, r.path, r.status))
            .collect();
        panic!(
            "request storm after recovery: {violations:?}; the busiest second:\n{}",
            lines.join("\n")
        );
    }
    after.stop().await;
}

/// N2: one round per fault; each is its own world, run side by side.
async fn ambiguous_round(tag: &'static str, fault: Option<(FaultScope, Fault)>, resets: bool) {
    let mut opts = AgentOpts::crowd(2, 2);
    // A charge held behind a `needs_attention` one on its terminal ends in 10 s.
    opts.queue_extra.push("charge_ttl = \"10s\"");
    let w = world(opts).await;
    if let Some((scope, f)) = fault {
        w.agent.sim.set_fault_scoped(scope, f);
    }
    let crowd = Crowd::start(w.crowd_opts(16, "amb-")).await;
    if resets {
        // Cut every live connection to the API now and then while charges flow: 200 ms
        // outages every 700 ms, 6 times (a fault schedule, not a synchronisation).
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            w.agent.sim.set_fault(Fault::Down);
            tokio::time::sleep(Duration::from_millis(200)).await;
            w.agent.sim.set_fault(Fault::None);
        }
    }
    let settled = crowd.wait_settled(Duration::from_secs(90)).await;
    let log = w.agent.sim.requests();
    let (summary, sim) = check_promises(tag, &crowd, &w.agent).await;
    assert!(settled, "{tag}: not every charge ended: {summary}");
    let cut = log
        .iter()
        .filter(|r| r.method == "POST" && r.status != 201 && r.status != 200)
        .count();
    println!(
        "{tag}: creates committed {}, create answers lost or 5xx {cut}, needs_attention without a final {}, finals after needs_attention {}",
        sim.creates, summary.needs_attention_open, summary.resolved_after_attention
    );
    crowd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_whose_answer_is_lost_and_connection_resets_create_nothing_twice() {
    let rounds = [
        tokio::spawn(ambiguous_round(
            "N2 commit then drop",
            Some((
                FaultScope::Creates,
                Fault::CommitThenDrop { remaining: Some(4) },
            )),
            false,
        )),
        tokio::spawn(ambiguous_round(
            "N2 commit then 502",
            Some((
                FaultScope::Creates,
                Fault::CommitThen5xx {
                    status: 502,
                    remaining: Some(4),
                },
            )),
            false,
        )),
        tokio::spawn(ambiguous_round("N2 connection resets", None, true)),
    ];
    for r in rounds {
        if let Err(e) = r.await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
            panic!("{e}");
        }
    }
}

/// N3: 429 with Retry-After, then 5xx bursts on polls and payment lookups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_5xx_bursts_still_end_every_charge() {
    const RETRY_AFTER_S: u32 = 2;
    // One station, one terminal, one charge at a time: the only requests are this
    // charge's, so the request after a 429 shows when the agent chose to come back.
    let mut opts = AgentOpts::crowd(1, 1);
    opts.poll_interval = "200ms";
    let w = world(opts).await;
    let sim = &w.agent.sim;
    let mut o = w.crowd_opts(6, "n3-");
    o.window_per_terminal = 1;
    o.ttl_s = Some(60);
    let crowd = Crowd::start(o).await;
    // A 429 for the next request, three times over the run, between charges.
    for k in 1..=3 {
        let crowd_ref = &crowd;
        assert!(
            common::wait_until_async(Duration::from_secs(60), || crowd_ref.done() >= k).await,
            "charge {k} ends"
        );
        sim.set_fault(Fault::TooMany {
            retry_after_s: RETRY_AFTER_S,
            remaining: Some(1),
        });
    }
    // Then bursts of 503 on everything but creates (an unanswered create is N2's case).
    let crowd_ref = &crowd;
    assert!(common::wait_until_async(Duration::from_secs(60), || crowd_ref.done() >= 4).await);
    for prefix in ["/point/integration-api/payment-intents", "/v1/payments"] {
        sim.set_fault_scoped(
            FaultScope::PathPrefix(prefix.into()),
            Fault::Status5xx {
                status: 503,
                remaining: Some(3),
            },
        );
    }
    let settled = crowd.wait_settled(Duration::from_secs(90)).await;
    // The agent's requests only: the checks below make requests of their own.
    let log = sim.requests();
    let (summary, _) = check_promises("N3", &crowd, &w.agent).await;
    assert!(settled, "N3: not every charge ended: {summary}");
    let finals: usize = summary.final_by_state.values().sum();
    assert_eq!(finals, 6, "N3: every charge final: {summary}");

    let mut too_soon = Vec::new();
    let mut n429 = 0;
    for (i, r) in log.iter().enumerate() {
        if r.status != 429 {
            continue;
        }
        n429 += 1;
        if let Some(next) = log.get(i + 1) {
            // Whole milliseconds on both sides: 1 ms of rounding.
            let gap = next.at_unix_ms - r.at_unix_ms;
            if gap < i64::from(RETRY_AFTER_S) * 1000 - 1 {
                too_soon.push(format!(
                    "{} {} {gap} ms after a 429",
                    next.method, next.path
                ));
            }
        }
    }
    let n5xx = log.iter().filter(|r| r.status == 503).count();
    println!("N3: {n429} answers 429 (Retry-After {RETRY_AFTER_S} s), {n5xx} answers 503; requests sooner than Retry-After: {too_soon:?}");
    assert_eq!(n429, 3, "the 429s were served");
    assert!(n5xx >= 3, "the 503 bursts were served");
    assert!(
        too_soon.is_empty(),
        "Retry-After not honoured: {too_soon:?}"
    );
    crowd.stop().await;
}
