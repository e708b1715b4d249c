//! An agent under test, in-process: the Point simulator over real TLS (its CA written to
//! the work directory and trusted through `point.extra_ca_file`) and `pointgate::run`
//! with a config written for the test, against a broker the test started.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use pointgate::config::Config;
use pointgate::sim::{self, SimConfig, SimHandle, TerminalMode};
use tokio_util::sync::CancellationToken;

use super::util::Workdir;

/// What differs from one test's agent to another's.
pub struct AgentOpts {
    pub site: &'static str,
    /// `(station, terminals)`.
    pub stations: Vec<(&'static str, Vec<&'static str>)>,
    /// Devices the simulator lists in PDV mode (default: every bound terminal).
    pub devices: Option<Vec<&'static str>>,
    pub standalone: Vec<&'static str>,
    pub terminal: TerminalMode,
    /// Extra lines for the `[point]` section (e.g. `confirm_window = "2s"`).
    pub point_extra: Vec<&'static str>,
    /// Extra lines for the `[queue]` section.
    pub queue_extra: Vec<&'static str>,
    /// Extra lines for the `[mqtt]` section (`username`, `password_file`, `ca_file`...).
    /// A `keep_alive` line here replaces the harness's `keep_alive = "5s"`.
    pub mqtt_extra: Vec<String>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            site: "MLA",
            stations: vec![
                ("kiosk-1", vec!["PAX_A910__0001"]),
                ("kiosk-2", vec!["PAX_A910__0002"]),
            ],
            devices: None,
            standalone: Vec::new(),
            terminal: TerminalMode::Auto {
                pickup: Duration::from_millis(50),
                process: Duration::from_millis(50),
            },
            point_extra: Vec::new(),
            queue_extra: Vec::new(),
            mqtt_extra: Vec::new(),
        }
    }
}

pub const TOKEN: &str = "TEST-e2e-token-0123456789";
pub const STORE: &str = "store-e2e";

pub struct TestAgent {
    pub sim: SimHandle,
    pub config: Config,
    pub dir: Workdir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), pointgate::RunError>>>,
}

impl TestAgent {
    /// Start the simulator and the agent; returns once the agent task runs (a test waits
    /// for `agent/status` online before its first command, as a station would).
    pub async fn start(broker_url: &str, opts: AgentOpts) -> TestAgent {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = Workdir::new();
        let devices: Vec<String> = match &opts.devices {
            Some(d) => d.iter().map(|s| s.to_string()).collect(),
            None => opts
                .stations
                .iter()
                .flat_map(|(_, t)| t.iter().map(|s| s.to_string()))
                .filter(|t| !opts.standalone.contains(&t.as_str()))
                .collect(),
        };
        let sim = sim::start(SimConfig {
            site: opts.site.parse().expect("site"),
            token: TOKEN.into(),
            devices,
            standalone_devices: opts.standalone.iter().map(|s| s.to_string()).collect(),
            ca_out: Some(dir.join("sim-ca.pem")),
            terminal: opts.terminal.clone(),
            ..SimConfig::default()
        })
        .await
        .expect("simulator starts");
        let token = dir.write("access_token", TOKEN);
        set_mode_600(&token);
        let mut stations = String::new();
        for (s, ts) in &opts.stations {
            let list: Vec<String> = ts.iter().map(|t| format!("\"{t}\"")).collect();
            stations.push_str(&format!(
                "\n[stations.{s}]\nterminals = [{}]\n",
                list.join(", ")
            ));
        }
        let mut mqtt_lines = opts.mqtt_extra.clone();
        if !mqtt_lines
            .iter()
            .any(|l| l.trim_start().starts_with("keep_alive"))
        {
            mqtt_lines.push("keep_alive = \"5s\"".to_owned());
        }
        let mqtt_lines = mqtt_lines.join("\n");
        let toml = format!(
            r#"[store]
id = "{STORE}"
site = "{site}"

[point]
base_url = "{base}"
access_token_file = "{token}"
extra_ca_file = "{ca}"
poll_interval = "100ms"
max_requests_per_second = 50
{point_extra}

[mqtt]
url = "{broker_url}"
{mqtt_lines}

[queue]
dir = "{state}"
{queue_extra}

[control]
socket = "{control}"
{stations}"#,
            site = opts.site,
            base = sim.base_url(),
            token = token.display(),
            ca = dir.join("sim-ca.pem").display(),
            state = dir.join("state").display(),
            point_extra = opts.point_extra.join("\n"),
            queue_extra = opts.queue_extra.join("\n"),
            mqtt_lines = mqtt_lines,
            control = dir.join("control.sock").display(),
        );
        // On disk too, for the command line (`pointgate status --config ...`).
        dir.write("pointgate.toml", &toml);
        let config = Config::from_toml_str(&toml, &HashMap::new()).expect("test config is valid");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pointgate::run(config.clone(), shutdown.clone()));
        TestAgent {
            sim,
            config,
            dir,
            shutdown,
            task: Some(task),
        }
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

    /// Stop the agent cleanly and wait for it; the simulator keeps running, so
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

    /// Start the agent again (after [`TestAgent::stop_agent`]) with the same config, state
    /// directory and simulator: a restart of the daemon.
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
    pub fn control_socket(&self) -> std::path::PathBuf {
        self.config.control.socket.clone()
    }

    /// The agent's configuration file, as the command line reads it.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.join("pointgate.toml")
    }

    /// Stop the agent cleanly and wait for it.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let res = tokio::time::timeout(Duration::from_secs(20), t).await;
            let res = res
                .expect("the agent stops within 20 s")
                .expect("agent task joins");
            res.expect("the agent ran without error");
        }
        self.sim.shutdown();
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.sim.shutdown();
    }
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
