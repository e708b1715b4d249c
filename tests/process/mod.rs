//! The agent as a process (the real `pointgate run`), for the tests that need what only a
//! process shows: systemd notifications, its stderr, a restart over a package upgrade.
//! The Point simulator runs in-process over real TLS; the broker is the test's Mosquitto.
//!
//! The binary is this build's `pointgate`, or `PG_TEST_AGENT_EXE` (e.g. the arm64 build
//! in `.ci/run arm`), run through `PG_TEST_AGENT_RUNNER` when set (e.g. `qemu-aarch64 -L
//! /usr/aarch64-linux-gnu`). Not `POINTGATE_*`: the agent refuses unknown variables of
//! its own prefix, and the child inherits the test's environment.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pointgate::sim::{self, SimConfig, SimHandle, TerminalMode};

use crate::common::Workdir;

pub const STORE: &str = "store-proc";
pub const STATION: &str = "kiosk-1";
pub const TERMINAL: &str = "PAX_A910__0001";

/// The simulator and a config file for one agent process.
pub struct ProcSetup {
    pub sim: SimHandle,
    pub dir: Workdir,
    pub config: PathBuf,
}

impl ProcSetup {
    /// Starts the simulator (accepting `token`) and writes `pointgate.toml` for an agent
    /// talking to `broker_url`, with its access token file holding `token` (mode 0600)
    /// and its state under the work directory.
    pub async fn new(broker_url: &str, terminal: TerminalMode, token: &str) -> ProcSetup {
        let dir = Workdir::new();
        let state = dir.join("state");
        ProcSetup::with_state(broker_url, terminal, token, dir, &state).await
    }

    /// [`ProcSetup::new`] with the state directory given.
    pub async fn with_state(
        broker_url: &str,
        terminal: TerminalMode,
        token: &str,
        dir: Workdir,
        state: &Path,
    ) -> ProcSetup {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let sim = sim::start(SimConfig {
            token: token.into(),
            devices: vec![TERMINAL.into()],
            ca_out: Some(dir.join("sim-ca.pem")),
            terminal,
            ..SimConfig::default()
        })
        .await
        .expect("simulator starts");
        let token_path = dir.write("access_token", token);
        set_mode(&token_path, 0o600);
        let toml = render_config(
            &sim.base_url(),
            broker_url,
            &token_path,
            &dir.join("sim-ca.pem"),
            state,
        );
        let config = dir.write("pointgate.toml", toml);
        ProcSetup { sim, dir, config }
    }

    pub fn prefix(&self) -> String {
        format!("pointgate/{STORE}")
    }

    pub fn cmd_topic(&self) -> String {
        format!("{}/station/{STATION}/cmd", self.prefix())
    }

    pub fn evt_topic(&self) -> String {
        format!("{}/station/{STATION}/evt", self.prefix())
    }

    pub fn status_topic(&self) -> String {
        format!("{}/agent/status", self.prefix())
    }

    /// `pointgate run --config <this config>`, stderr to `stderr.log` in the work dir.
    pub fn run_command(&self) -> Command {
        let mut cmd = agent_command();
        cmd.arg("run").arg("--config").arg(&self.config);
        cmd
    }
}

/// An agent config: one station (`STATION`, bound to `TERMINAL`), the simulator's CA
/// trusted, fast polling.
pub fn render_config(
    base_url: &str,
    broker_url: &str,
    token: &Path,
    ca: &Path,
    state: &Path,
) -> String {
    format!(
        r#"[store]
id = "{STORE}"
site = "MLA"

[point]
base_url = "{base_url}"
access_token_file = "{token}"
extra_ca_file = "{ca}"
poll_interval = "100ms"
max_requests_per_second = 50

[mqtt]
url = "{broker_url}"
keep_alive = "5s"

[queue]
dir = "{state}"

[stations.{STATION}]
terminals = ["{TERMINAL}"]
"#,
        token = token.display(),
        ca = ca.display(),
        state = state.display(),
    )
}

/// The agent binary under test, through its runner if any, with a clean environment for
/// what the agent reads (no `RUST_LOG`, no systemd variables unless a test sets them).
pub fn agent_command() -> Command {
    let exe = std::env::var_os("PG_TEST_AGENT_EXE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pointgate")));
    let runner = std::env::var("PG_TEST_AGENT_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    for var in [
        "RUST_LOG",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A running agent process; killed on drop if still running.
pub struct ProcAgent {
    child: Child,
    pub stderr: PathBuf,
}

impl ProcAgent {
    /// Spawns `cmd` with stdout and stderr into `<dir>/<name>.log`.
    pub fn spawn(mut cmd: Command, dir: &Workdir, name: &str) -> ProcAgent {
        let stderr = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&stderr).expect("create the agent log");
        let out = file.try_clone().expect("clone the log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(file)
            .spawn()
            .expect("spawn the agent");
        ProcAgent { child, stderr }
    }

    /// [`ProcAgent::spawn`] with `JOURNAL_STREAM` naming the log file's device and inode,
    /// as systemd sets it when stderr is the journal's stream: the agent logs natively to
    /// journald (see `logging`).
    pub fn spawn_as_journal_stream(mut cmd: Command, dir: &Workdir, name: &str) -> ProcAgent {
        use std::os::unix::fs::MetadataExt;
        let stderr = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&stderr).expect("create the agent log");
        let meta = file.metadata().expect("stat the agent log");
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        let out = file.try_clone().expect("clone the log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(file)
            .spawn()
            .expect("spawn the agent");
        ProcAgent { child, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, then wait (up to 30 s) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        self.wait(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the agent did not stop within 30 s; log:\n{}", self.log()))
    }

    /// The exit status, or None if it still runs after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProcAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A charge command's payload.
pub fn charge(request_id: &str, amount: &str) -> String {
    serde_json::json!({"v": 1, "type": "charge", "request_id": request_id, "amount": amount})
        .to_string()
}
