//! The end-to-end benchmark (issue 6): a real broker, the Point simulator with instant
//! terminals, and the agent as its own release process, driven by MQTT 5 stations; every
//! figure beside its floor measured in the same run.
//!
//! ```text
//! cargo bench --bench e2e                 # the full run (about 5 minutes on 2 cores)
//! cargo bench --bench e2e -- --quick      # seconds; CI runs it through `cargo test --bench e2e`
//! cargo bench --bench e2e -- --soak 10m   # L1: RSS, store size and fds over a steady load
//! ```
//!
//! Why `cargo bench` and not `pointgate bench`: the load generator, the floors and the
//! simulator driver stay out of the shipped binary (whose size is itself a figure here),
//! and cargo builds the agent binary with the release profile before the run, so the
//! agent measured is always the one of the checkout.
//!
//! Clocks: intervals are `Instant`s in this process (stations, simulator and floors all
//! live here); the agent is a separate process, measured only from outside: MQTT events,
//! the simulator's records, and `/proc/<pid>`.

mod floor;
mod load;
mod procs;
mod report;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use pointgate::sim::{self, Fault, SimConfig, SimHandle, TerminalMode};
use serde_json::json;

use load::{station_id, terminal_id, Fleet};
use procs::{Agent, Broker};
use report::{pct, Row, Target};

const TOKEN: &str = "TEST-bench-token-0123456789";
const STORE: &str = "bench";
const IA: &str = "/point/integration-api";

#[derive(Debug, Parser)]
#[command(name = "e2e", about = "pointgate end-to-end benchmark")]
struct Args {
    /// Seconds instead of minutes: small counts, no timing asserted (CI).
    #[arg(long, env = "POINTGATE_BENCH_QUICK")]
    quick: bool,
    /// `mosquitto` (default; falls back to `embedded`, labelled, when it is not installed)
    /// or `embedded` (rumqttd in this process).
    #[arg(long, default_value = "mosquitto")]
    broker: String,
    /// An extra line for mosquitto.conf (repeatable), e.g. `set_tcp_nodelay true`.
    #[arg(long = "mosquitto-conf")]
    mosquitto_conf: Vec<String>,
    /// Stations, each with its own terminal [full: 1000, quick: 20].
    #[arg(long)]
    stations: Option<usize>,
    /// Charges per station in the throughput phase [full: 100, quick: 5].
    #[arg(long)]
    charges: Option<usize>,
    /// MQTT connections the stations share.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Charges of the latency phase (paced, one at a time per terminal) [full: 1000, quick: 40].
    #[arg(long)]
    latency_charges: Option<usize>,
    /// Charges per second in the latency phase.
    #[arg(long, default_value_t = 50.0)]
    latency_rate: f64,
    /// `point.max_requests_per_second` for the latency and throughput phases ("high").
    #[arg(long, default_value_t = 100_000)]
    rps: u32,
    /// Charges queued during the API outage [full: 50, quick: 5].
    #[arg(long)]
    backlog: Option<usize>,
    /// `point.max_requests_per_second` while the backlog drains [full: 5, the shipped
    /// default; quick: 50].
    #[arg(long)]
    backlog_rps: Option<u32>,
    /// `point.poll_interval` (the contract's minimum is 100ms).
    #[arg(long, default_value = "100ms")]
    poll_interval: String,
    /// Run the L1 soak for this long instead of the benchmark (e.g. `10m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// Charges per second during the soak.
    #[arg(long, default_value_t = 20.0)]
    soak_rate: f64,
    /// Seconds between soak samples.
    #[arg(long, default_value_t = 5)]
    soak_sample_s: u64,
    /// Where the JSON goes [default: target/bench/e2e-<unix time>.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The agent binary [default: the one cargo built for this run].
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Runs the agent under this command (e.g. `valgrind --tool=callgrind`), for profiles.
    #[arg(long, allow_hyphen_values = true)]
    agent_wrap: Option<String>,
    /// Keep the work directory (stores, logs, configs) after the run.
    #[arg(long)]
    keep: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Plan {
    stations: usize,
    charges: usize,
    latency_charges: usize,
    backlog: usize,
    backlog_rps: u32,
    floor_rounds: usize,
}

impl Args {
    fn plan(&self) -> Plan {
        let q = self.quick;
        Plan {
            stations: self.stations.unwrap_or(if q { 20 } else { 1000 }),
            charges: self.charges.unwrap_or(if q { 5 } else { 100 }),
            latency_charges: self.latency_charges.unwrap_or(if q { 40 } else { 1000 }),
            backlog: self.backlog.unwrap_or(if q { 5 } else { 50 }),
            backlog_rps: self.backlog_rps.unwrap_or(if q { 50 } else { 5 }),
            floor_rounds: if q { 100 } else { 1000 },
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// Everything a phase needs.
struct Bench {
    args: Args,
    work: PathBuf,
    bin: PathBuf,
    broker: Broker,
    sim: SimHandle,
    fleet: Fleet,
    ticks: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn run(args: Args) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let plan = args.plan();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench");
    std::fs::create_dir_all(&root)?;
    let tmp = tempfile::Builder::new().prefix("e2e-").tempdir_in(&root)?;
    let work = tmp.path().to_path_buf();
    let bin = args
        .agent_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pointgate")));
    if !bin.exists() {
        bail!("agent binary {} is missing", bin.display());
    }
    println!("pointgate e2e bench: work dir {}", work.display());
    println!("agent binary: {}", bin.display());

    let broker = match args.broker.as_str() {
        "embedded" => Broker::start_embedded()?,
        _ => match Broker::start_mosquitto(&work, &args.mosquitto_conf) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("WARNING: {e:#}\nWARNING: falling back to the embedded broker (labelled in the results)");
                Broker::start_embedded()?
            }
        },
    };
    println!("broker: {} at {}", broker.label(), broker.url());

    let stations = plan.stations.max(plan.backlog);
    let sim = sim::start(SimConfig {
        token: TOKEN.into(),
        devices: (0..stations).map(terminal_id).collect(),
        ca_out: Some(work.join("sim-ca.pem")),
        // Instant terminals: the intent moves OPEN → FINISHED without waiting.
        terminal: TerminalMode::Auto {
            pickup: Duration::ZERO,
            process: Duration::ZERO,
        },
        ..SimConfig::default()
    })
    .await
    .context("simulator")?;
    let token = work.join("access_token");
    std::fs::write(&token, TOKEN)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
    }
    let prefix = format!("pointgate/{STORE}");
    let fleet = Fleet::connect(broker.port(), &prefix, stations, args.clients).await?;
    let mut b = Bench {
        work,
        bin,
        broker,
        sim,
        fleet,
        ticks: procs::clock_ticks_per_s(),
        args,
    };
    let outcome = match b.args.soak {
        Some(d) => soak(&mut b, stations, d).await,
        None => bench(&mut b, &plan, stations).await,
    };
    b.sim.shutdown();
    b.broker.stop();
    if b.args.keep || outcome.is_err() {
        let kept = tmp.keep();
        println!("work dir kept: {}", kept.display());
    }
    outcome
}

impl Bench {
    fn write_config(&self, name: &str, state: &Path, rps: u32, stations: usize) -> Result<PathBuf> {
        let mut t = format!(
            "[store]\nid = \"{STORE}\"\nsite = \"MLA\"\n\n[point]\nbase_url = \"{base}\"\n\
             access_token_file = \"{token}\"\nextra_ca_file = \"{ca}\"\npoll_interval = \"{poll}\"\n\
             max_requests_per_second = {rps}\n\n[mqtt]\nurl = \"{broker}\"\nkeep_alive = \"10s\"\n\n\
             [queue]\ndir = \"{state}\"\n\n[log]\nlevel = \"warn\"\n",
            base = self.sim.base_url(),
            token = self.work.join("access_token").display(),
            ca = self.work.join("sim-ca.pem").display(),
            poll = self.args.poll_interval,
            broker = self.broker.url(),
            state = state.display(),
        );
        for s in 0..stations {
            t.push_str(&format!(
                "\n[stations.{}]\nterminals = [\"{}\"]\n",
                station_id(s),
                terminal_id(s)
            ));
        }
        let path = self.work.join(format!("{name}.toml"));
        std::fs::write(&path, t)?;
        Ok(path)
    }

    /// Spawns the agent and waits for it to be ready; returns it and spawn → ready.
    async fn start_agent(&self, config: &Path, tag: &str) -> Result<(Agent, f64, &'static str)> {
        self.fleet.reset_online();
        let agent = match &self.args.agent_wrap {
            None => Agent::spawn(&self.bin, config, &self.work, tag)?,
            Some(w) => Agent::spawn_wrapped(w, &self.bin, config, &self.work, tag)?,
        };
        let timeout = if self.args.agent_wrap.is_some() {
            300
        } else {
            60
        };
        if !self
            .fleet
            .wait_for(Duration::from_secs(timeout), |c| c.online)
            .await
        {
            bail!(
                "the agent did not publish online within {timeout} s; its log:\n{}",
                agent.log_tail()
            );
        }
        let online = self.fleet.online_at().context("online")?;
        // READY=1 (sd-notify) is sent when the agent is ready; if it speaks it, it is
        // the figure, else the retained `agent/status` online.
        let (at, via) = match agent.ready_at() {
            Some(r) => (r, "sd_notify READY=1"),
            None => (online, "agent/status online"),
        };
        let cold = ms(at - agent.spawned);
        Ok((agent, cold, via))
    }

    /// Waits until `n` more finals than `base` arrived; prints progress.
    async fn wait_finals(&self, base: u64, n: u64, timeout: Duration, what: &str) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_print = Instant::now();
        loop {
            let target = base + n;
            if self
                .fleet
                .wait_for(Duration::from_secs(5), |c| c.finals >= target)
                .await
            {
                return Ok(());
            }
            let c = self.fleet.counters();
            if last_print.elapsed() >= Duration::from_secs(5) {
                println!(
                    "  {what}: {}/{n} final, {} refused",
                    c.finals.saturating_sub(base),
                    c.refusals
                );
                last_print = Instant::now();
            }
            if Instant::now() >= deadline {
                bail!(
                    "{what}: only {}/{n} charges final after {} s",
                    c.finals.saturating_sub(base),
                    timeout.as_secs()
                );
            }
        }
    }

    /// Paced open loop: `n` charges at `rate`/s round robin over `stations`, tagged `tag`.
    async fn paced(&self, tag: &str, n: usize, rate: f64, stations: usize) {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..n {
            tick.tick().await;
            self.fleet.fire(i % stations, format!("{tag}-{i}"));
        }
    }
}

impl Agent {
    fn spawn_wrapped(
        wrap: &str,
        bin: &Path,
        config: &Path,
        work: &Path,
        tag: &str,
    ) -> Result<Agent> {
        // A wrapper script keeps `Agent::spawn` simple: it execs the wrapper with the agent.
        let script = work.join(format!("wrap-{tag}.sh"));
        std::fs::write(
            &script,
            format!("#!/bin/sh\nexec {wrap} \"{}\" \"$@\"\n", bin.display()),
        )?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Agent::spawn(&script, config, work, tag)
    }
}

/// Latency samples of a set of charges, in ms.
struct Lat {
    accept: Vec<f64>,
    sent: Vec<f64>,
    create: Vec<f64>,
    cycle: Vec<f64>,
    not_approved: usize,
}

fn latencies(b: &Bench, tag: &str) -> Lat {
    let charges = b.fleet.charges(tag);
    let ledger: std::collections::HashMap<String, i64> = b
        .sim
        .ledger()
        .into_iter()
        .map(|e| (e.intent_id, e.created_unix_ms))
        .collect();
    let mut l = Lat {
        accept: Vec::new(),
        sent: Vec::new(),
        create: Vec::new(),
        cycle: Vec::new(),
        not_approved: 0,
    };
    for c in &charges {
        let Some(p) = c.published else { continue };
        if let Some(a) = c.accepted {
            l.accept.push(ms(a - p));
        }
        if let Some(s) = c.sent {
            l.sent.push(ms(s - p));
        }
        if let Some(d) = c.done {
            l.cycle.push(ms(d - p));
        }
        if c.final_state.as_deref() != Some("approved") {
            l.not_approved += 1;
        }
        // The simulator stamps creates in whole ms (floor): the middle of that ms.
        if let Some(created) = c.intent_id.as_ref().and_then(|id| ledger.get(id)) {
            l.create
                .push((*created as f64 + 0.5) - c.published_unix_us as f64 / 1000.0);
        }
    }
    l
}

/// Samples the agent every 250 ms until stopped; returns the samples.
fn sampler(
    pid: u32,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<procs::ProcSample>>,
) {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = &mut rx => return out,
                _ = tick.tick() => {
                    if let Ok(s) = procs::sample(pid) { out.push(s); }
                }
            }
        }
    });
    (tx, h)
}

async fn bench(b: &mut Bench, plan: &Plan, stations: usize) -> Result<()> {
    let started = Instant::now();
    let state_a = b.work.join("state-a");
    let state_b = b.work.join("state-b");
    let cfg_a = b.write_config("agent-a", &state_a, b.args.rps, stations)?;
    let cfg_b = b.write_config("agent-b", &state_b, plan.backlog_rps, stations)?;
    let poll_ms = humantime::parse_duration(&b.args.poll_interval)
        .map(ms)
        .unwrap_or(100.0);

    // ---- floors (MQTT, fdatasync, exec); HTTPS comes once an intent exists ----
    println!("floor: MQTT QoS 1, fdatasync, exec ...");
    let (mqtt_hop, mqtt_puback) = floor::mqtt(b.broker.port(), plan.floor_rounds).await?;
    let fsync = floor::fdatasync(&b.work, plan.floor_rounds)?;
    let exec = floor::exec(&b.bin, if b.args.quick { 5 } else { 20 })?;

    // ---- agent A, empty store: cold start, idle ----
    println!("agent: cold start, empty store ...");
    let (mut agent, cold_empty, ready_via) = b.start_agent(&cfg_a, "a1").await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // settle, then read the idle figures
    let idle = agent.sample()?;

    // ---- latency: paced, one charge at a time per terminal ----
    let base = b.fleet.counters().finals;
    println!(
        "latency: {} charges at {}/s over {stations} terminals ...",
        plan.latency_charges, b.args.latency_rate
    );
    b.paced("lat", plan.latency_charges, b.args.latency_rate, stations)
        .await;
    b.wait_finals(
        base,
        plan.latency_charges as u64,
        Duration::from_secs(120),
        "latency",
    )
    .await?;
    let lat = latencies(b, "lat");

    // ---- HTTPS floor: a GET of an intent, as a poll is ----
    let probe = b
        .fleet
        .charges("lat")
        .iter()
        .find_map(|c| c.intent_id.clone())
        .map(|id| format!("{IA}/payment-intents/{id}"))
        .unwrap_or_else(|| format!("{IA}/payment-intents/no-such-intent"));
    let https = floor::https(
        &b.sim.base_url(),
        &b.sim.ca_pem(),
        TOKEN,
        &probe,
        plan.floor_rounds,
    )
    .await?;

    // ---- throughput: every station in a closed loop ----
    let n_tp = (plan.stations * plan.charges) as u64;
    println!(
        "throughput: {} stations × {} charges (closed loop, {} terminals, poll {}, {} req/s) ...",
        plan.stations, plan.charges, plan.stations, b.args.poll_interval, b.args.rps
    );
    let base = b.fleet.counters().finals;
    let cpu0 = agent.sample()?.cpu_ticks;
    let (stop_sampling, samples) = sampler(agent.pid());
    let t0 = Instant::now();
    b.fleet
        .start_closed_loop("tp", 0..plan.stations, plan.charges);
    let tp_timeout = Duration::from_secs((n_tp / 20).max(120));
    let waited = b.wait_finals(base, n_tp, tp_timeout, "throughput").await;
    let elapsed = t0.elapsed();
    let _ = stop_sampling.send(());
    let samples = samples.await.unwrap_or_default();
    waited?;
    let cpu1 = agent.sample()?.cpu_ticks;
    let tp_lat = latencies(b, "tp");
    let throughput = n_tp as f64 / elapsed.as_secs_f64();
    let cpu_per_charge = (cpu1.saturating_sub(cpu0)) as f64 / b.ticks as f64 * 1000.0 / n_tp as f64;
    let rss_load = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let fds_load = samples.iter().map(|s| s.fds).max().unwrap_or(0);

    let records = (plan.latency_charges as u64) + n_tp;
    tokio::time::sleep(Duration::from_secs(2)).await; // settle after the load
    let loaded = agent.sample()?;
    let (store_live, store_live_alloc) = procs::dir_size(&state_a);
    let info_bytes: usize = b
        .fleet
        .charges("tp")
        .iter()
        .map(|c| c.payload_bytes)
        .sum::<usize>();
    let info_per_charge = info_bytes as f64 / n_tp as f64;
    println!("agent: stop (SIGTERM) ...");
    let stop_time = agent.stop(Duration::from_secs(30));
    let (store_stopped, store_stopped_alloc) = procs::dir_size(&state_a);

    // ---- agent A again: cold start with the records ----
    println!("agent: cold start with {records} records ...");
    let (mut agent, cold_full, _) = b.start_agent(&cfg_a, "a2").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = agent.sample()?;
    agent.stop(Duration::from_secs(30));

    // ---- retention pruning: every record aged past `queue.retention` ----
    // The engine's retention pass is `Store::prune(now - retention, ..)` then `sync`; the
    // records here are minutes old and retention is at least a day, so the bench calls the
    // same function with a cut-off past every record, on the stopped agent's store, then
    // lets the agent open the pruned store once (sled reclaims emptied log segments as it
    // runs) and measures again after it stops.
    println!("store: prune every final record, as retention would ...");
    let (pruned, store_pruned) = {
        let store = pointgate::store::Store::open(&state_a).context("open the store to prune")?;
        let mut pruned = 0;
        loop {
            let n = store.prune(i64::MAX, 10_000).context("prune")?;
            store.sync().context("sync after prune")?;
            pruned += n;
            if n == 0 {
                break;
            }
        }
        (pruned, procs::dir_size(&state_a))
    };
    let store_empty = {
        let dir = b.work.join("state-empty");
        let store = pointgate::store::Store::open(&dir).context("open an empty store")?;
        store.sync().context("sync the empty store")?;
        drop(store);
        procs::dir_size(&dir)
    };
    // Does the space come back into use? The same load again on the pruned store.
    println!("store: the same load again on the pruned store ...");
    let (mut agent, _, _) = b.start_agent(&cfg_a, "a3").await?;
    let base = b.fleet.counters().finals;
    b.fleet
        .start_closed_loop("tp2", 0..plan.stations, plan.charges);
    b.wait_finals(base, n_tp, tp_timeout, "load after pruning")
        .await?;
    agent.stop(Duration::from_secs(30));
    let store_reloaded = procs::dir_size(&state_a);

    // ---- backlog: K charges queued during an outage, drained under the limit ----
    println!(
        "backlog: {} charges during an outage, drain at {} req/s ...",
        plan.backlog, plan.backlog_rps
    );
    let (mut agent, _, _) = b.start_agent(&cfg_b, "b").await?;
    b.sim.set_fault(Fault::Down);
    let base_acc = b.fleet.counters().accepted;
    let base = b.fleet.counters().finals;
    for i in 0..plan.backlog {
        b.fleet.fire(i, format!("bk-{i}"));
    }
    let k = plan.backlog as u64;
    if !b
        .fleet
        .wait_for(Duration::from_secs(30), |c| c.accepted >= base_acc + k)
        .await
    {
        bail!("backlog: the charges were not all accepted during the outage");
    }
    // Let the agent meet the outage (its create attempts fail, it backs off).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recovered = Instant::now();
    let recovered_unix_ms = load::unix_us() / 1000;
    b.sim.set_fault(Fault::None);
    b.wait_finals(base, k, Duration::from_secs(600), "backlog")
        .await?;
    let bk = b.fleet.charges("bk");
    let drained = bk
        .iter()
        .filter_map(|c| c.done)
        .max()
        .map(|d| ms(d - recovered))
        .unwrap_or(0.0);
    let drain_requests = b
        .sim
        .requests()
        .iter()
        .filter(|r| r.at_unix_ms >= recovered_unix_ms && r.status != 0)
        .count();
    let drain_floor = drain_requests as f64 / plan.backlog_rps as f64 * 1000.0;
    agent.stop(Duration::from_secs(30));

    // ---- binaries ----
    let x86 = std::fs::metadata(&b.bin).map(|m| m.len()).ok();
    let x86_note = if b.bin.components().any(|c| c.as_os_str() == "release") {
        "the release profile strips".to_string()
    } else {
        format!(
            "{} is not a release build: not a size figure",
            b.bin.display()
        )
    };
    let arm_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/aarch64-unknown-linux-gnu/release/pointgate");
    let arm = std::fs::metadata(&arm_path).map(|m| m.len()).ok();
    let arm_note = if arm.is_some() {
        "target/aarch64-unknown-linux-gnu/release/pointgate as built (may be older than this checkout)".to_string()
    } else {
        "not built: cargo build --release --target aarch64-unknown-linux-gnu".to_string()
    };

    // ---- the table ----
    let p = |v: &[f64], q: f64| pct(v, q);
    let hop50 = p(&mqtt_hop, 50.0);
    let hop99 = p(&mqtt_hop, 99.0);
    let fs50 = p(&fsync, 50.0);
    let fs99 = p(&fsync, 99.0);
    let h50 = p(&https, 50.0);
    let h99 = p(&https, 99.0);
    let sum = |xs: &[Option<f64>]| xs.iter().copied().sum::<Option<f64>>();
    // accepted: command hop to the agent, one fdatasync, event hop back.
    let accept_floor50 = sum(&[hop50, hop50, fs50]);
    let accept_floor99 = sum(&[hop99, hop99, fs99]);
    // create (the issue's floor): MQTT hop + HTTPS request + one fdatasync.
    let create_floor50 = sum(&[hop50, h50, fs50]);
    let create_floor99 = sum(&[hop99, h99, fs99]);
    // sent event: that, plus the event's hop back.
    let sent_floor50 = sum(&[hop50, h50, fs50, hop50]);
    // final: the create path, one poll interval, a poll and the payment look-up, the hop back.
    let cycle_floor50 = sum(&[hop50, h50, fs50, Some(poll_ms), h50, h50, hop50]);
    let cycle_floor99 = sum(&[hop99, h99, fs99, Some(poll_ms), h99, h99, hop99]);
    let exec50 = p(&exec, 50.0);

    let mut rows = vec![
        Row::new(
            "floor_mqtt_hop_p50",
            "floor: MQTT QoS 1 publish → subscriber p50",
            hop50,
            "ms",
        ),
        Row::new(
            "floor_mqtt_hop_p99",
            "floor: MQTT QoS 1 publish → subscriber p99",
            hop99,
            "ms",
        ),
        Row::new(
            "floor_mqtt_puback_p50",
            "floor: MQTT QoS 1 publish → PUBACK p50",
            p(&mqtt_puback, 50.0),
            "ms",
        ),
        Row::new(
            "floor_https_p50",
            "floor: HTTPS GET, kept-alive rustls p50",
            h50,
            "ms",
        ),
        Row::new(
            "floor_https_p99",
            "floor: HTTPS GET, kept-alive rustls p99",
            h99,
            "ms",
        ),
        Row::new(
            "floor_fdatasync_p50",
            "floor: 200 B write + fdatasync p50",
            fs50,
            "ms",
        ),
        Row::new(
            "floor_fdatasync_p99",
            "floor: 200 B write + fdatasync p99",
            fs99,
            "ms",
        ),
        Row::new(
            "floor_exec_p50",
            "floor: spawn → exit of `pointgate --version` p50",
            exec50,
            "ms",
        ),
        Row::new(
            "accept_p50",
            "accept latency p50 (paced)",
            p(&lat.accept, 50.0),
            "ms",
        )
        .floor(accept_floor50, "2 MQTT hops + fdatasync")
        .target(Target::AtMost(1.0)),
        Row::new(
            "accept_p99",
            "accept latency p99 (paced)",
            p(&lat.accept, 99.0),
            "ms",
        )
        .floor(accept_floor99, "2 MQTT hops + fdatasync, p99s")
        .target(Target::AtMost(5.0)),
        Row::new(
            "accept_load_p50",
            "accept latency p50 under load (throughput phase)",
            p(&tp_lat.accept, 50.0),
            "ms",
        )
        .floor(accept_floor50, "2 MQTT hops + fdatasync"),
        Row::new(
            "accept_load_p99",
            "accept latency p99 under load (throughput phase)",
            p(&tp_lat.accept, 99.0),
            "ms",
        )
        .floor(accept_floor99, "2 MQTT hops + fdatasync, p99s")
        .target(Target::AtMost(5.0)),
        Row::new(
            "create_p50",
            "create latency p50 (publish → intent at the simulator)",
            p(&lat.create, 50.0),
            "ms",
        )
        .floor(create_floor50, "MQTT hop + HTTPS + fdatasync")
        .target(Target::AtMost(
            create_floor50.map(|f| 1.5 * f).unwrap_or(f64::NAN),
        ))
        .note("simulator stamps whole ms: ±0.5 ms; target = 1.5 × floor"),
        Row::new(
            "create_p99",
            "create latency p99",
            p(&lat.create, 99.0),
            "ms",
        )
        .floor(create_floor99, "MQTT hop + HTTPS + fdatasync, p99s"),
        Row::new(
            "sent_p50",
            "publish → `sent` event p50",
            p(&lat.sent, 50.0),
            "ms",
        )
        .floor(sent_floor50, "create floor + MQTT hop back")
        .note("µs clock: a bound on create latency + one hop"),
        Row::new(
            "sent_p99",
            "publish → `sent` event p99",
            p(&lat.sent, 99.0),
            "ms",
        ),
        Row::new(
            "cycle_p50",
            "full cycle to final p50 (paced)",
            p(&lat.cycle, 50.0),
            "ms",
        )
        .floor(
            cycle_floor50,
            "create floor + poll interval + 2 HTTPS + hop",
        ),
        Row::new(
            "cycle_p99",
            "full cycle to final p99 (paced)",
            p(&lat.cycle, 99.0),
            "ms",
        )
        .floor(cycle_floor99, "same, p99s"),
        Row::new(
            "cycle_load_p50",
            "full cycle p50 under load",
            p(&tp_lat.cycle, 50.0),
            "ms",
        )
        .floor(
            cycle_floor50,
            "create floor + poll interval + 2 HTTPS + hop",
        ),
        Row::new(
            "cycle_load_p99",
            "full cycle p99 under load",
            p(&tp_lat.cycle, 99.0),
            "ms",
        ),
        Row::new(
            "throughput",
            "sustained throughput to final",
            Some(throughput),
            "charges/s",
        )
        .target(Target::AtLeast(1000.0))
        .note(format!(
            "{} stations/terminals closed loop × {}, poll {}, limit {} req/s",
            plan.stations, plan.charges, b.args.poll_interval, b.args.rps
        )),
        Row::new(
            "backlog_drain",
            "backlog drain after the outage",
            Some(drained),
            "ms",
        )
        .floor(
            Some(drain_floor),
            &format!("{drain_requests} requests ÷ {} req/s", plan.backlog_rps),
        )
        .note(format!(
            "{} charges queued during Fault::Down",
            plan.backlog
        )),
        Row::new(
            "rss_idle",
            "agent RSS idle (empty store)",
            Some(mib(idle.rss_kib)),
            "MiB",
        )
        .target(Target::AtMost(16.0)),
        Row::new(
            "rss_load",
            "agent RSS under load (max)",
            Some(mib(rss_load)),
            "MiB",
        )
        .note(format!(
            "VmHWM after the load: {:.1} MiB",
            mib(loaded.hwm_kib)
        )),
        Row::new(
            "rss_records",
            &format!("agent RSS with {records} records (after the load)"),
            Some(mib(loaded.rss_kib)),
            "MiB",
        )
        .target(Target::AtMost(48.0)),
        Row::new(
            "rss_records_restart",
            &format!("agent RSS with {records} records (fresh start)"),
            Some(mib(restarted.rss_kib)),
            "MiB",
        )
        .target(Target::AtMost(48.0)),
        Row::new(
            "fds",
            "agent open fds idle / under load (max)",
            Some(idle.fds as f64),
            "fds",
        )
        .note(format!("max under load: {fds_load}")),
        Row::new(
            "cpu_per_charge",
            "agent CPU per charge (user+sys)",
            Some(cpu_per_charge),
            "ms",
        )
        .target(Target::AtMost(0.5))
        .note(format!("tick {} ms", 1000 / b.ticks.max(1))),
        Row::new(
            "store_per_charge",
            "store on disk per charge (running)",
            Some(store_live as f64 / records as f64),
            "B",
        )
        .floor(Some(info_per_charge), "command + event payloads")
        .note(format!(
            "{} B apparent, {} B allocated",
            store_live, store_live_alloc
        )),
        Row::new(
            "store_per_charge_stopped",
            "store on disk per charge (after stop)",
            Some(store_stopped as f64 / records as f64),
            "B",
        )
        .floor(Some(info_per_charge), "command + event payloads")
        .note(format!(
            "{} B apparent, {} B allocated",
            store_stopped, store_stopped_alloc
        )),
        Row::new(
            "store_after_pruning",
            "store on disk after retention pruning",
            Some(store_pruned.0 as f64),
            "B",
        )
        .floor(Some(store_empty.0 as f64), "an empty store, opened and synced")
        .note(format!(
            "{pruned} of {records} records pruned; {} B allocated; before the prune: {store_stopped} B",
            store_pruned.1
        )),
        Row::new(
            "store_reloaded",
            &format!("store after pruning + the same {n_tp} charges again"),
            Some(store_reloaded.0 as f64),
            "B",
        )
        .floor(Some(store_stopped as f64), "the store after the first load")
        .note(format!(
            "{} B allocated; ratio 1 = the pruned space all reused, 2 = none of it",
            store_reloaded.1
        )),
        Row::new(
            "cold_start_empty",
            "cold start to ready, empty store",
            Some(cold_empty),
            "ms",
        )
        .floor(exec50, "exec of the binary")
        .target(Target::AtMost(200.0))
        .note(format!("ready = {ready_via}")),
        Row::new(
            "cold_start_records",
            &format!("cold start to ready, {records} records"),
            Some(cold_full),
            "ms",
        )
        .floor(exec50, "exec of the binary")
        .target(Target::AtMost(1000.0)),
        Row::new(
            "stop",
            "clean stop (SIGTERM → exit) after the load",
            stop_time.map(ms),
            "ms",
        ),
        Row::new(
            "bin_x86_64",
            "stripped binary x86_64",
            x86.map(|v| v as f64 / 1e6),
            "MB",
        )
        .note(x86_note),
        Row::new(
            "bin_aarch64",
            "stripped binary aarch64",
            arm.map(|v| v as f64 / 1e6),
            "MB",
        )
        .target(Target::AtMost(6.0))
        .note(arm_note),
    ];
    if b.args.quick {
        rows.push(
            Row::new(
                "quick",
                "QUICK MODE: counts too small for the targets",
                None,
                "",
            )
            .note("not a measurement"),
        );
    }

    let table = report::table(&rows);
    let machine = machine();
    println!("\n{}\n", machine.lines);
    println!("{table}");
    let other = b.fleet.other_finals();
    if lat.not_approved + tp_lat.not_approved > 0 || !other.is_empty() {
        println!("WARNING: charges not approved: {other:?}");
    }
    let out = b.args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/bench")
            .join(format!("e2e-{}.json", load::unix_us() / 1_000_000))
    });
    let figures: serde_json::Map<String, serde_json::Value> =
        rows.iter().map(|r| (r.key.clone(), r.json())).collect();
    let doc = json!({
        "bench": "pointgate e2e",
        "quick": b.args.quick,
        "machine": machine.json,
        "broker": b.broker.label(),
        "mosquitto_conf_extra": b.args.mosquitto_conf,
        "agent_binary": b.bin.display().to_string(),
        "setup": {
            "stations": plan.stations, "charges_per_station": plan.charges,
            "latency_charges": plan.latency_charges, "latency_rate_per_s": b.args.latency_rate,
            "poll_interval": b.args.poll_interval, "max_requests_per_second": b.args.rps,
            "backlog": plan.backlog, "backlog_rps": plan.backlog_rps,
            "mqtt_clients": b.args.clients, "terminal": "sim Auto { pickup: 0, process: 0 }",
            "records_in_store": records,
            "records_filled_by": "charges through the agent (latency + throughput phases)",
        },
        "figures": figures,
        "not_approved": other,
        "station_connection_errors": b.fleet.connection_errors(),
        "duration_s": started.elapsed().as_secs_f64(),
        "table_markdown": table,
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    println!("JSON: {}", out.display());
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    if lat.not_approved + tp_lat.not_approved > 0 {
        bail!(
            "{} charges did not end approved",
            lat.not_approved + tp_lat.not_approved
        );
    }
    Ok(())
}

struct Machine {
    lines: String,
    json: serde_json::Value,
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    let disk = std::process::Command::new("findmnt")
        .args([
            "-n",
            "-o",
            "SOURCE,FSTYPE",
            "-T",
            env!("CARGO_MANIFEST_DIR"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Machine {
        lines: format!(
            "machine: {nproc} CPUs ({cpu}), {:.1} GiB RAM, disk {disk}, kernel {}, load average {}",
            mem as f64 / 1048576.0,
            kernel.trim(),
            load.trim()
        ),
        json: json!({
            "nproc": nproc, "cpu": cpu, "mem_kib": mem, "disk": disk,
            "kernel": kernel.trim(), "loadavg_at_end": load.trim(),
        }),
    }
}

/// L1: a steady load for `duration`, sampling the agent's RSS, store size and open fds.
async fn soak(b: &mut Bench, stations: usize, duration: Duration) -> Result<()> {
    let state = b.work.join("state-soak");
    let cfg = b.write_config("agent-soak", &state, b.args.rps, stations)?;
    let (mut agent, _, _) = b.start_agent(&cfg, "soak").await?;
    let out = b.args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/bench")
            .join(format!("soak-{}.json", load::unix_us() / 1_000_000))
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let samples_path = out.with_extension("csv");
    procs::append_line(&samples_path, "t_s,rss_kib,store_bytes,fds,finals");
    println!(
        "soak: {} s at {}/s over {stations} stations, sampling every {} s ({})",
        duration.as_secs(),
        b.args.soak_rate,
        b.args.soak_sample_s,
        samples_path.display()
    );
    let base = b.fleet.counters().finals;
    let t0 = Instant::now();
    let mut samples: Vec<(f64, u64, u64, u64, u64)> = Vec::new();
    let mut fire = tokio::time::interval(Duration::from_secs_f64(1.0 / b.args.soak_rate.max(0.1)));
    fire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sample = tokio::time::interval(Duration::from_secs(b.args.soak_sample_s.max(1)));
    let mut fired = 0usize;
    while t0.elapsed() < duration {
        tokio::select! {
            _ = fire.tick() => {
                b.fleet.fire(fired % stations, format!("soak-{fired}"));
                fired += 1;
            }
            _ = sample.tick() => {
                let s = agent.sample()?;
                let (store, _) = procs::dir_size(&state);
                let finals = b.fleet.counters().finals - base;
                let t = t0.elapsed().as_secs_f64();
                procs::append_line(&samples_path, &format!("{t:.1},{},{store},{},{finals}", s.rss_kib, s.fds));
                samples.push((t, s.rss_kib, store, s.fds, finals));
                if samples.len() % 12 == 1 {
                    println!("  t={t:.0}s rss={:.1}MiB store={:.1}MB fds={} finals={finals}", mib(s.rss_kib), store as f64 / 1e6, s.fds);
                }
            }
        }
    }
    b.wait_finals(base, fired as u64, Duration::from_secs(120), "soak")
        .await?;
    agent.stop(Duration::from_secs(30));
    if samples.len() < 8 {
        bail!("soak: too few samples ({}) for a verdict", samples.len());
    }
    // The rule: skip the first quarter (warm-up); compare the median of the second quarter
    // with the median of the last quarter. RSS is flat if it grew by at most 5 % or 1 MiB;
    // fds if by at most 2; the store if it grew by at most 5 % (with retention pruning
    // absent the store grows with the records: then its bytes per charge are reported).
    let n = samples.len();
    let q2 = &samples[n / 4..n / 2];
    let q4 = &samples[3 * n / 4..];
    let med = |xs: &[(f64, u64, u64, u64, u64)], f: fn(&(f64, u64, u64, u64, u64)) -> u64| {
        let mut v: Vec<u64> = xs.iter().map(f).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let rss = (med(q2, |s| s.1), med(q4, |s| s.1));
    let store = (med(q2, |s| s.2), med(q4, |s| s.2));
    let fds = (med(q2, |s| s.3), med(q4, |s| s.3));
    let fin = (med(q2, |s| s.4), med(q4, |s| s.4));
    let rss_flat = rss.1 <= rss.0 + (rss.0 / 20).max(1024);
    let fds_flat = fds.1 <= fds.0 + 2;
    let store_flat = store.1 <= store.0 + store.0 / 20;
    let per_charge = (store.1 as f64 - store.0 as f64) / (fin.1 as f64 - fin.0 as f64).max(1.0);
    let first = samples[0];
    let last = samples[n - 1];
    let maxs = (
        samples.iter().map(|s| s.1).max().unwrap_or(0),
        samples.iter().map(|s| s.2).max().unwrap_or(0),
        samples.iter().map(|s| s.3).max().unwrap_or(0),
    );
    let verdict = |flat: bool| if flat { "flat" } else { "NOT flat" };
    let text = format!(
        "| soak ({} s, {fired} charges at {}/s) | first | last | max | q2 median → q4 median | verdict |\n|---|---:|---:|---:|---|---|\n\
         | RSS (KiB) | {} | {} | {} | {} → {} | {} |\n\
         | store (B) | {} | {} | {} | {} → {} | {} ({per_charge:.0} B per charge in the second half) |\n\
         | open fds | {} | {} | {} | {} → {} | {} |\n",
        duration.as_secs(), b.args.soak_rate,
        first.1, last.1, maxs.0, rss.0, rss.1, verdict(rss_flat),
        first.2, last.2, maxs.1, store.0, store.1, verdict(store_flat),
        first.3, last.3, maxs.2, fds.0, fds.1, verdict(fds_flat),
    );
    println!("\n{}\n\n{text}", machine().lines);
    let doc = json!({
        "bench": "pointgate soak (L1)",
        "machine": machine().json,
        "broker": b.broker.label(),
        "duration_s": duration.as_secs(), "charges": fired, "rate_per_s": b.args.soak_rate,
        "rule": "skip the first quarter; median of q2 vs median of q4; RSS flat if +≤5% or +≤1 MiB, fds if +≤2, store if +≤5%",
        "rss_kib": {"first": first.1, "last": last.1, "max": maxs.0, "q2": rss.0, "q4": rss.1, "flat": rss_flat},
        "store_bytes": {"first": first.2, "last": last.2, "max": maxs.1, "q2": store.0, "q4": store.1, "flat": store_flat, "bytes_per_charge_second_half": per_charge},
        "fds": {"first": first.3, "last": last.3, "max": maxs.2, "q2": fds.0, "q4": fds.1, "flat": fds_flat},
        "samples_csv": samples_path.display().to_string(),
        "table_markdown": text,
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    println!("JSON: {}", out.display());
    Ok(())
}
