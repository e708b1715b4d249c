//! An agent under test as a process (`pointgate run --config ...`, the real binary), for
//! what only a process shows: signals (SIGHUP) and the command line against it. The
//! Point simulator runs in the test, over real TLS, as for [`super::agent::TestAgent`].
//! The agent's stderr goes to `agent.log` in the work directory; it is killed on drop.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pointgate::sim::{self, SimConfig, SimHandle};

use super::agent::{AgentOpts, STORE, TOKEN};
use super::util::{wait_until, Workdir};

pub struct AgentProcess {
    pub sim: SimHandle,
    pub dir: Workdir,
    broker_url: String,
    opts: AgentOpts,
    child: Option<Child>,
}

impl AgentProcess {
    /// Start the simulator (accepting [`TOKEN`]) and the agent with `token` in its token
    /// file and `opts`' stations. The caller waits for `agent/status` as a station would.
    pub async fn start(broker_url: &str, opts: AgentOpts, token: &str) -> AgentProcess {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = Workdir::new();
        let devices: Vec<String> = match &opts.devices {
            Some(d) => d.iter().map(|s| s.to_string()).collect(),
            None => opts
                .stations
                .iter()
                .flat_map(|(_, t)| t.iter().map(|s| s.to_string()))
                .collect(),
        };
        let sim = sim::start(SimConfig {
            site: opts.site.parse().expect("site"),
            token: TOKEN.into(),
            devices,
            ca_out: Some(dir.join("sim-ca.pem")),
            terminal: opts.terminal.clone(),
            ..SimConfig::default()
        })
        .await
        .expect("simulator starts");
        let mut agent = AgentProcess {
            sim,
            dir,
            broker_url: broker_url.to_string(),
            opts,
            child: None,
        };
        agent.write_token(token);
        let stations = agent.opts.stations.clone();
        agent.write_config(&stations);
        let log = std::fs::File::create(agent.dir.join("agent.log")).expect("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_pointgate"))
            .args(["run", "--config"])
            .arg(agent.config_path())
            .env_remove("POINTGATE_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pointgate run");
        agent.child = Some(child);
        agent
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("pointgate.toml")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn prefix(&self) -> String {
        format!("pointgate/{STORE}")
    }

    pub fn evt_topic(&self, station: &str) -> String {
        format!("{}/station/{station}/evt", self.prefix())
    }

    pub fn status_topic(&self) -> String {
        format!("{}/agent/status", self.prefix())
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.dir.read_to_string("agent.log")
    }

    /// Write the token file (mode 0600).
    pub fn write_token(&self, token: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.write("access_token", token);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod token");
    }

    /// Write the configuration file with these stations (the rest as at start).
    pub fn write_config(&self, stations: &[(&'static str, Vec<&'static str>)]) {
        let mut tables = String::new();
        for (s, ts) in stations {
            let list: Vec<String> = ts.iter().map(|t| format!("\"{t}\"")).collect();
            tables.push_str(&format!(
                "\n[stations.{s}]\nterminals = [{}]\n",
                list.join(", ")
            ));
        }
        self.write_config_text(&tables);
    }

    /// Write the configuration file with `tail` (stations, or anything) at its end.
    pub fn write_config_text(&self, tail: &str) {
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
url = "{broker}"
keep_alive = "5s"

[queue]
dir = "{state}"
{queue_extra}

[log]
level = "info"

[control]
socket = "{control}"
{tail}"#,
            site = self.opts.site,
            base = self.sim.base_url(),
            token = self.dir.join("access_token").display(),
            ca = self.dir.join("sim-ca.pem").display(),
            broker = self.broker_url,
            state = self.dir.join("state").display(),
            point_extra = self.opts.point_extra.join("\n"),
            queue_extra = self.opts.queue_extra.join("\n"),
            control = self.control_socket().display(),
        );
        self.dir.write("pointgate.toml", toml);
    }

    /// Send SIGHUP to the agent.
    pub fn sighup(&self) {
        self.signal("-HUP");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("agent running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// SIGKILL (no chance to say anything), and reap it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent running");
        child.kill().expect("SIGKILL the agent");
        let _ = child.wait();
    }

    /// Start the agent binary again with the same config and store (after `stop` or
    /// `kill9`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the agent first");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_pointgate"))
            .args(["run", "--config"])
            .arg(self.config_path())
            .env_remove("POINTGATE_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pointgate run");
        self.child = Some(child);
    }

    /// SIGTERM, and wait for the agent to exit; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal("-TERM");
        let child = self.child.as_mut().expect("agent running");
        let mut code = None;
        let exited = wait_until(Duration::from_secs(20), || match child.try_wait() {
            Ok(Some(status)) => {
                code = status.code();
                true
            }
            _ => false,
        });
        assert!(
            exited,
            "the agent did not stop within 20 s; log:\n{}",
            self.log()
        );
        self.child = None;
        code
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.sim.shutdown();
    }
}
