//! An agent under test: the Point simulator over real TLS (its CA written to the work
//! directory and trusted through `point.extra_ca_file`), a config file written for the
//! test, and the agent on it, either in-process (`pointgate::run`) or as the real binary
//! through the one process harness ([`AgentProc`], reached through `Deref`: `spawn`,
//! `kill9`, `stop_term`, `log`...). Against a broker the test (or [`super::world::World`])
//! started.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pointgate::config::Config;
use pointgate::sim::{self, SimConfig, SimHandle, TerminalMode};
use tokio_util::sync::CancellationToken;

use super::process::AgentProc;
use super::util::Workdir;

/// What differs from one test's agent to another's (the simulator and the config file).
#[derive(Debug, Clone)]
pub struct AgentOpts {
    /// `store.id`.
    pub store: &'static str,
    pub site: &'static str,
    /// `(station, terminals)`.
    pub stations: Vec<(String, Vec<String>)>,
    /// Devices the simulator lists in PDV mode (default: every bound terminal).
    pub devices: Option<Vec<&'static str>>,
    pub standalone: Vec<&'static str>,
    pub terminal: TerminalMode,
    /// Whether the simulator serves the intent list endpoints.
    pub serve_intent_lists: bool,
    /// The token the simulator accepts.
    pub token: &'static str,
    /// What the agent's access token file holds, when not [`AgentOpts::token`].
    pub token_file: Option<&'static str>,
    /// `point.poll_interval`.
    pub poll_interval: &'static str,
    /// `point.max_requests_per_second`.
    pub max_rps: u32,
    /// Extra lines for the `[point]` section (e.g. `confirm_window = "2s"`; not the keys
    /// above).
    pub point_extra: Vec<&'static str>,
    /// Extra lines for the `[queue]` section.
    pub queue_extra: Vec<&'static str>,
    /// Extra lines for the `[mqtt]` section (`username`, `password_file`, `ca_file`...).
    /// A `keep_alive` line here replaces the harness's `keep_alive = "5s"`.
    pub mqtt_extra: Vec<String>,
    /// `queue.dir` (default: `state` in the work directory).
    pub state_dir: Option<PathBuf>,
    /// A `[log]` section with this `level`, or none.
    pub log_level: Option<&'static str>,
    /// A `[control]` section with the socket in the work directory, or none.
    pub control: bool,
}

impl Default for AgentOpts {
    /// Two stations, `kiosk-1` and `kiosk-2`, one terminal each; quick automatic terminals.
    fn default() -> Self {
        AgentOpts {
            store: STORE,
            site: "MLA",
            stations: stations(&[
                ("kiosk-1", &["PAX_A910__0001"]),
                ("kiosk-2", &["PAX_A910__0002"]),
            ]),
            devices: None,
            standalone: Vec::new(),
            terminal: TerminalMode::Auto {
                pickup: Duration::from_millis(50),
                process: Duration::from_millis(50),
            },
            serve_intent_lists: true,
            token: TOKEN,
            token_file: None,
            poll_interval: "100ms",
            max_rps: 50,
            point_extra: Vec::new(),
            queue_extra: Vec::new(),
            mqtt_extra: Vec::new(),
            state_dir: None,
            log_level: None,
            control: true,
        }
    }
}

impl AgentOpts {
    /// For the crash and network tests' crowds: `stations` stations `st-1`.. with
    /// `terminals_each` terminals `PAX_A910__SxxTyy` each, quick automatic terminals, a
    /// generous rate limit, `[log] level = "info"` and no control socket.
    pub fn crowd(stations: usize, terminals_each: usize) -> AgentOpts {
        let stations = (1..=stations)
            .map(|s| {
                let ts = (1..=terminals_each)
                    .map(|t| format!("PAX_A910__S{s:02}T{t:02}"))
                    .collect();
                (format!("st-{s}"), ts)
            })
            .collect();
        AgentOpts {
            stations,
            terminal: TerminalMode::Auto {
                pickup: Duration::from_millis(10),
                process: Duration::from_millis(30),
            },
            max_rps: 200,
            log_level: Some("info"),
            control: false,
            ..AgentOpts::default()
        }
    }

    /// For the process tests of systemd, logging and packaging: store `store-proc`, one
    /// station ([`STATION`] bound to [`TERMINAL`]), the simulator and the token file on
    /// `token`, no `[log]` and no `[control]` section.
    pub fn single(terminal: TerminalMode, token: &'static str) -> AgentOpts {
        AgentOpts {
            store: "store-proc",
            stations: stations(&[(STATION, &[TERMINAL])]),
            terminal,
            token,
            control: false,
            ..AgentOpts::default()
        }
    }
}

/// `(station, terminals)` pairs as [`AgentOpts::stations`] holds them.
pub fn stations(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    list.iter()
        .map(|(s, ts)| (s.to_string(), ts.iter().map(|t| t.to_string()).collect()))
        .collect()
}

pub const TOKEN: &str = "TEST-e2e-token-0123456789";
pub const STORE: &str = "store-e2e";
/// [`AgentOpts::single`]'s station and terminal.
pub const STATION: &str = "kiosk-1";
pub const TERMINAL: &str = "PAX_A910__0001";

/// The simulator, the config file and the agent (in-process, or a process).
pub struct TestAgent {
    pub sim: SimHandle,
    pub config: Config,
    pub dir: Workdir,
    pub opts: AgentOpts,
    broker_url: String,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), pointgate::RunError>>>,
    /// The agent as a process on [`TestAgent::config_path`], logging to `agent.log` in
    /// the work directory; nothing runs until the test spawns it.
    pub proc: AgentProc,
}

impl Deref for TestAgent {
    type Target = AgentProc;
    fn deref(&self) -> &AgentProc {
        &self.proc
    }
}

impl DerefMut for TestAgent {
    fn deref_mut(&mut self) -> &mut AgentProc {
        &mut self.proc
    }
}

impl TestAgent {
    /// Start the simulator and the agent in-process; returns once the agent task runs (a
    /// test waits for `agent/status` online before its first command, as a station would).
    pub async fn start(broker_url: &str, opts: AgentOpts) -> TestAgent {
        let mut agent = TestAgent::setup(broker_url, opts).await;
        agent.start_again();
        agent
    }

    /// Start the simulator and write the config file; no agent runs yet: start it
    /// in-process ([`TestAgent::start_again`]) or as a process (`spawn`).
    pub async fn setup(broker_url: &str, opts: AgentOpts) -> TestAgent {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = Workdir::new();
        let devices: Vec<String> = match &opts.devices {
            Some(d) => d.iter().map(|s| s.to_string()).collect(),
            None => opts
                .stations
                .iter()
                .flat_map(|(_, t)| t.iter().cloned())
                .filter(|t| !opts.standalone.contains(&t.as_str()))
                .collect(),
        };
        let sim = sim::start(SimConfig {
            site: opts.site.parse().expect("site"),
            token: opts.token.into(),
            devices,
            standalone_devices: opts.standalone.iter().map(|s| s.to_string()).collect(),
            ca_out: Some(dir.join("sim-ca.pem")),
            terminal: opts.terminal.clone(),
            serve_intent_lists: opts.serve_intent_lists,
            ..SimConfig::default()
        })
        .await
        .expect("simulator starts");
        let token = dir.write("access_token", opts.token_file.unwrap_or(opts.token));
        set_mode_600(&token);
        let toml = render(&opts, broker_url, &sim.base_url(), &dir, None, None);
        // On disk too, for the command line (`pointgate status --config ...`) and the
        // agent as a process.
        let config_path = dir.write("pointgate.toml", &toml);
        let config = Config::from_toml_str(&toml, &HashMap::new()).expect("test config is valid");
        let log_path = dir.join("agent.log");
        TestAgent {
            sim,
            config,
            dir,
            opts,
            broker_url: broker_url.to_owned(),
            shutdown: CancellationToken::new(),
            task: None,
            proc: AgentProc::new(config_path, log_path),
        }
    }

    /// The config file's text with these stations (the rest from the options).
    pub fn render_config(&self, stations: &[(String, Vec<String>)]) -> String {
        let mut opts = self.opts.clone();
        opts.stations = stations.to_vec();
        render(
            &opts,
            &self.broker_url,
            &self.sim.base_url(),
            &self.dir,
            None,
            None,
        )
    }

    /// The config file's text with the access token file and the simulator's CA at these
    /// paths (e.g. the shipped ones under `/etc/pointgate`).
    pub fn render_config_with_files(&self, token: &Path, ca: &Path) -> String {
        render(
            &self.opts,
            &self.broker_url,
            &self.sim.base_url(),
            &self.dir,
            None,
            Some((token, ca)),
        )
    }

    /// Writes the configuration file with these stations (the rest as at start); what
    /// the in-process agent's next start reads too.
    pub fn write_config(&mut self, stations: &[(String, Vec<String>)]) {
        let toml = self.render_config(stations);
        self.config = Config::from_toml_str(&toml, &HashMap::new()).expect("test config is valid");
        self.dir.write("pointgate.toml", toml);
    }

    /// Writes the configuration file with `tail` (stations, or anything) in place of the
    /// stations' tables: for a test of a config the agent must refuse.
    pub fn write_config_text(&self, tail: &str) {
        let toml = render(
            &self.opts,
            &self.broker_url,
            &self.sim.base_url(),
            &self.dir,
            Some(tail),
            None,
        );
        self.dir.write("pointgate.toml", toml);
    }

    /// Writes the agent's access token file (mode 0600), for a SIGHUP to reload.
    pub fn write_token(&self, token: &str) {
        set_mode_600(&self.dir.write("access_token", token));
    }

    pub fn prefix(&self) -> String {
        self.config.topic_prefix()
    }

    pub fn cmd_topic(&self, station: &str) -> String {
        format!("{}/station/{station}/cmd", self.prefix())
    }

    pub fn evt_topic(&self, station: &str) -> String {
        format!("{}/station/{station}/evt", self.prefix())
    }

    pub fn status_topic(&self) -> String {
        format!("{}/agent/status", self.prefix())
    }

    /// sled's data directory (`queue.dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.config.queue.dir.clone()
    }

    /// Stop the in-process agent cleanly and wait for it; the simulator keeps running, so
    /// [`TestAgent::start_again`] can bring the same agent back.
    pub async fn stop_agent(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let res = tokio::time::timeout(Duration::from_secs(20), t).await;
            let res = res
                .expect("the agent stops within 20 s")
                .expect("agent task joins");
            res.expect("the agent ran without error");
        }
    }

    /// Start the agent in-process (again, after [`TestAgent::stop_agent`]) with the same
    /// config, state directory and simulator: a restart of the daemon.
    pub fn start_again(&mut self) {
        assert!(
            self.task.is_none(),
            "stop the agent before starting it again"
        );
        self.shutdown = CancellationToken::new();
        self.task = Some(tokio::spawn(pointgate::run(
            self.config.clone(),
            self.shutdown.clone(),
        )));
    }

    /// The agent's control socket (`control.socket`, in the work directory).
    pub fn control_socket(&self) -> PathBuf {
        self.config.control.socket.clone()
    }

    /// The agent's configuration file, as the command line reads it.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("pointgate.toml")
    }

    /// Stop the in-process agent cleanly, wait for it, and stop the simulator.
    pub async fn stop(&mut self) {
        self.stop_agent().await;
        self.sim.shutdown();
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.proc.kill9();
        self.sim.shutdown();
    }
}

/// The agent's config file: `tail` in place of the stations' tables when given; the token
/// file and the simulator's CA in the work directory unless `files` says where.
fn render(
    opts: &AgentOpts,
    broker_url: &str,
    sim_url: &str,
    dir: &Workdir,
    tail: Option<&str>,
    files: Option<(&Path, &Path)>,
) -> String {
    let (token, ca) = match files {
        Some((t, c)) => (t.to_path_buf(), c.to_path_buf()),
        None => (dir.join("access_token"), dir.join("sim-ca.pem")),
    };
    let stations = match tail {
        Some(t) => t.to_owned(),
        None => {
            let mut s = String::new();
            for (station, ts) in &opts.stations {
                let list: Vec<String> = ts.iter().map(|t| format!("\"{t}\"")).collect();
                s.push_str(&format!(
                    "\n[stations.{station}]\nterminals = [{}]\n",
                    list.join(", ")
                ));
            }
            s
        }
    };
    let mut mqtt_lines = opts.mqtt_extra.clone();
    if !mqtt_lines
        .iter()
        .any(|l| l.trim_start().starts_with("keep_alive"))
    {
        mqtt_lines.push("keep_alive = \"5s\"".to_owned());
    }
    let log = match opts.log_level {
        Some(level) => format!("\n[log]\nlevel = \"{level}\"\n"),
        None => String::new(),
    };
    let control = if opts.control {
        format!(
            "\n[control]\nsocket = \"{}\"\n",
            dir.join("control.sock").display()
        )
    } else {
        String::new()
    };
    let state = opts.state_dir.clone().unwrap_or_else(|| dir.join("state"));
    format!(
        r#"[store]
id = "{store}"
site = "{site}"

[point]
base_url = "{sim_url}"
access_token_file = "{token}"
extra_ca_file = "{ca}"
poll_interval = "{poll}"
max_requests_per_second = {rps}
{point_extra}

[mqtt]
url = "{broker_url}"
{mqtt_lines}

[queue]
dir = "{state}"
{queue_extra}
{log}{control}{stations}"#,
        store = opts.store,
        site = opts.site,
        token = token.display(),
        ca = ca.display(),
        poll = opts.poll_interval,
        rps = opts.max_rps,
        point_extra = opts.point_extra.join("\n"),
        mqtt_lines = mqtt_lines.join("\n"),
        state = state.display(),
        queue_extra = opts.queue_extra.join("\n"),
    )
}

fn set_mode_600(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod token");
}

/// A charge command.
pub fn charge(request_id: &str, amount: &str) -> Vec<u8> {
    serde_json::json!({"v": 1, "type": "charge", "request_id": request_id, "amount": amount})
        .to_string()
        .into_bytes()
}

/// A charge command, as text (for `mosquitto_pub`).
pub fn charge_text(request_id: &str, amount: &str) -> String {
    serde_json::json!({"v": 1, "type": "charge", "request_id": request_id, "amount": amount})
        .to_string()
}
