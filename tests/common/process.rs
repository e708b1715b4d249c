//! The agent as a separate process (the `pointgate` binary Cargo built for this test run),
//! for the crash tests: it can be `kill -9`ed, aborted by a fail point, restarted on the
//! same state directory, and traced by `strace`, while the Point simulator runs in the
//! test process and outlives it.
//!
//! [`ProcAgent::setup`] starts the simulator and writes the config file once (same shape
//! as [`super::agent::TestAgent`]'s); [`ProcAgent::spawn`] starts the binary on it as
//! many times as the test wants. Everything the processes print goes to one log file in
//! the work directory, appended across restarts and printed if the test panics.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use pointgate::sim::{self, SimConfig, SimHandle, TerminalMode};

use super::agent::{STORE, TOKEN};
use super::util::{wait_until, Workdir};

/// The agent binary built for this test run.
pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_pointgate");

/// What differs from one process agent to another.
#[derive(Debug, Clone)]
pub struct ProcOpts {
    /// `(station, terminals)`.
    pub stations: Vec<(String, Vec<String>)>,
    pub terminal: TerminalMode,
    /// Lines for the `[point]` section, after the harness's own (later keys must not
    /// repeat these: `poll_interval`, `max_requests_per_second`).
    pub point_extra: Vec<String>,
    /// Lines for the `[queue]` section.
    pub queue_extra: Vec<String>,
    /// `point.poll_interval`.
    pub poll_interval: &'static str,
    /// `point.max_requests_per_second`.
    pub max_rps: u32,
    /// Whether the simulator serves the intent list endpoints.
    pub serve_intent_lists: bool,
}

impl ProcOpts {
    /// `stations` stations `st-1`.. with `terminals_each` terminals each, quick automatic
    /// terminals, a generous rate limit.
    pub fn stations(stations: usize, terminals_each: usize) -> ProcOpts {
        let stations = (1..=stations)
            .map(|s| {
                let ts = (1..=terminals_each)
                    .map(|t| format!("PAX_A910__S{s:02}T{t:02}"))
                    .collect();
                (format!("st-{s}"), ts)
            })
            .collect();
        ProcOpts {
            stations,
            terminal: TerminalMode::Auto {
                pickup: Duration::from_millis(10),
                process: Duration::from_millis(30),
            },
            point_extra: Vec::new(),
            queue_extra: Vec::new(),
            poll_interval: "100ms",
            max_rps: 200,
            serve_intent_lists: true,
        }
    }
}

/// The simulator, the config file, and the agent process (when one runs).
pub struct ProcAgent {
    pub sim: SimHandle,
    pub dir: Workdir,
    pub opts: ProcOpts,
    pub config_path: PathBuf,
    prefix: String,
    child: Option<Child>,
    /// How many times a process was started.
    pub spawns: u32,
}

impl ProcAgent {
    /// Starts the simulator and writes the config; no agent process yet.
    pub async fn setup(broker_url: &str, opts: ProcOpts) -> ProcAgent {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = Workdir::new();
        let devices: Vec<String> = opts
            .stations
            .iter()
            .flat_map(|(_, ts)| ts.iter().cloned())
            .collect();
        let sim = sim::start(SimConfig {
            site: "MLA".parse().expect("site"),
            token: TOKEN.into(),
            devices,
            ca_out: Some(dir.join("sim-ca.pem")),
            terminal: opts.terminal.clone(),
            serve_intent_lists: opts.serve_intent_lists,
            ..SimConfig::default()
        })
        .await
        .expect("simulator starts");
        let token = dir.write("access_token", TOKEN);
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))
                .expect("chmod token");
        }
        let mut stations = String::new();
        for (s, ts) in &opts.stations {
            let list: Vec<String> = ts.iter().map(|t| format!("\"{t}\"")).collect();
            stations.push_str(&format!(
                "\n[stations.{s}]\nterminals = [{}]\n",
                list.join(", ")
            ));
        }
        let toml = format!(
            r#"[store]
id = "{STORE}"
site = "MLA"

[point]
base_url = "{base}"
access_token_file = "{token}"
extra_ca_file = "{ca}"
poll_interval = "{poll}"
max_requests_per_second = {rps}
{point_extra}

[mqtt]
url = "{broker_url}"
keep_alive = "5s"

[queue]
dir = "{state}"
{queue_extra}

[log]
level = "info"
{stations}"#,
            base = sim.base_url(),
            token = token.display(),
            ca = dir.join("sim-ca.pem").display(),
            poll = opts.poll_interval,
            rps = opts.max_rps,
            state = dir.join("state").display(),
            point_extra = opts.point_extra.join("\n"),
            queue_extra = opts.queue_extra.join("\n"),
        );
        let config_path = dir.write("pointgate.toml", &toml);
        let config = pointgate::config::Config::from_toml_str(&toml, &Default::default())
            .expect("test config is valid");
        ProcAgent {
            sim,
            dir,
            opts,
            config_path,
            prefix: config.topic_prefix(),
            child: None,
            spawns: 0,
        }
    }

    /// sled's data directory (`queue.dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// Everything the agent processes printed so far.
    pub fn log(&self) -> String {
        self.dir.read_to_string("agent.log")
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn cmd_topic(&self, station: &str) -> String {
        format!("{}/station/{station}/cmd", self.prefix)
    }

    pub fn evt_topic(&self, station: &str) -> String {
        format!("{}/station/{station}/evt", self.prefix)
    }

    pub fn status_topic(&self) -> String {
        format!("{}/agent/status", self.prefix)
    }

    /// The command line `spawn` runs: `pointgate run --config <file>`.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(AGENT_BIN);
        cmd.arg("run").arg("--config").arg(&self.config_path);
        // The harness's config, not whatever the test's environment says.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("POINTGATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env_remove("RUST_LOG");
        cmd
    }

    /// Starts the agent binary with these extra environment variables. Panics if one
    /// still runs.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        let mut cmd = self.command();
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.spawn_command(cmd);
    }

    /// Starts `cmd` (from [`ProcAgent::command`], possibly wrapped) as the agent.
    pub fn spawn_command(&mut self, mut cmd: Command) {
        assert!(self.child.is_none(), "an agent process already runs");
        self.spawns += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the agent log");
        writeln!(log, "---- test harness: agent start #{} ----", self.spawns)
            .expect("write the agent log");
        let out = log.try_clone().expect("clone the log handle");
        // Its own process group, so a kill reaches whatever it runs under (strace).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {AGENT_BIN}: {e}"));
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process still runs (reaps it if it ended).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `kill -9` (the process and its process group) and reap. Returns false if no process
    /// was running.
    pub fn kill9(&mut self) -> bool {
        match self.child.take() {
            Some(mut c) => {
                let _ = c.kill();
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", c.id())])
                    .stderr(Stdio::null())
                    .status();
                let _ = c.wait();
                true
            }
            None => false,
        }
    }

    /// Waits (at most `timeout`) for the process to end by itself; returns its status, or
    /// None if it still runs (it is left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        let child = self.child.as_mut()?;
        wait_until(timeout, || match child.try_wait() {
            Ok(Some(s)) => {
                status = Some(s);
                true
            }
            _ => false,
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// [`ProcAgent::wait_exit`] for async tests: polls with `tokio::time::sleep`, so the
    /// runtime's other tasks (stations) keep running meanwhile.
    pub async fn wait_exit_async(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        let child = self.child.as_mut()?;
        super::util::wait_until_async(timeout, || match child.try_wait() {
            Ok(Some(s)) => {
                status = Some(s);
                true
            }
            _ => false,
        })
        .await;
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGTERM and wait (at most 20 s): a clean stop.
    pub fn stop_term(&mut self) -> Option<ExitStatus> {
        let pid = self.pid()?;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let s = self.wait_exit(Duration::from_secs(20));
        if s.is_none() {
            self.kill9();
        }
        s
    }

    /// [`ProcAgent::stop_term`] for async tests.
    pub async fn stop_term_async(&mut self) -> Option<ExitStatus> {
        let pid = self.pid()?;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let s = self.wait_exit_async(Duration::from_secs(20)).await;
        if s.is_none() {
            self.kill9();
        }
        s
    }
}

impl Drop for ProcAgent {
    fn drop(&mut self) {
        self.kill9();
        self.sim.shutdown();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!("---- agent log (last 200 lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Parses an RFC 3339 time into Unix milliseconds.
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Percentile (0..=100) of a sample, by nearest rank; None when empty.
pub fn percentile(sample: &[Duration], p: u32) -> Option<Duration> {
    if sample.is_empty() {
        return None;
    }
    let mut v = sample.to_vec();
    v.sort();
    let rank = ((p as usize * v.len()).div_ceil(100)).clamp(1, v.len());
    Some(v[rank - 1])
}

/// `Instant` helper for the reports: milliseconds as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
