//! The agent binary as a separate process: the one process harness of the tests, for what
//! only a process shows (`kill -9`, a fail point's abort, signals, systemd notifications,
//! its stderr, `strace`, a restart on the same state directory, a package upgrade).
//!
//! [`AgentProc`] runs `pointgate run --config <file>` on a config written by someone else
//! (usually [`super::agent::TestAgent`], through [`super::world::World`]) as many times as
//! the test wants. Everything the processes print goes to one log file, appended across
//! restarts (a `---- test harness: agent start #N ----` line before each start), and its
//! tail is printed if the test panics. Each start gets its own process group, so a kill
//! reaches whatever the agent runs under (`strace`, `unshare`, a runner).
//!
//! The binary is this build's `pointgate`, or `PG_TEST_AGENT_EXE` (e.g. the arm64 build in
//! `.ci/run arm`), run through `PG_TEST_AGENT_RUNNER` when set (e.g. `qemu-aarch64 -L
//! /usr/aarch64-linux-gnu`). Not `POINTGATE_*`: the agent refuses unknown variables of its
//! own prefix, and the child inherits the test's environment (the harness removes every
//! `POINTGATE_*`, `RUST_LOG` and the systemd variables; a test sets what it wants).

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::util::{wait_until, wait_until_async};

/// The agent binary built for this test run.
pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_pointgate");

/// The agent binary under test: `PG_TEST_AGENT_EXE` if set, else [`AGENT_BIN`].
pub fn agent_exe() -> PathBuf {
    std::env::var_os("PG_TEST_AGENT_EXE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(AGENT_BIN))
}

/// The agent binary under test, through its runner if any, with a clean environment for
/// what the agent reads: no `POINTGATE_*`, no `RUST_LOG`, no systemd variables (a test
/// sets what it wants on the returned command).
pub fn agent_command() -> Command {
    let runner = std::env::var("PG_TEST_AGENT_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(agent_exe());
            c
        }
        None => Command::new(agent_exe()),
    };
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("POINTGATE_") {
            cmd.env_remove(k);
        }
    }
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

/// The agent as a process on one config file; at most one process at a time.
pub struct AgentProc {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// How many times a process was started.
    pub spawns: u32,
}

impl AgentProc {
    /// An agent on `config`, logging (appending) to `log`; no process yet.
    pub fn new(config: impl Into<PathBuf>, log: impl Into<PathBuf>) -> AgentProc {
        AgentProc {
            config: config.into(),
            log: log.into(),
            child: None,
            spawns: 0,
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the agent processes printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The command line [`AgentProc::spawn`] runs: `pointgate run --config <file>`
    /// (through the runner, if any), for a test to add to or wrap.
    pub fn command(&self) -> Command {
        let mut cmd = agent_command();
        cmd.arg("run").arg("--config").arg(&self.config);
        cmd
    }

    /// Starts the agent with these extra environment variables. Panics if one still runs.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        let mut cmd = self.command();
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.spawn_command(cmd);
    }

    /// Starts `cmd` (from [`AgentProc::command`], possibly wrapped or with more
    /// environment) as the agent.
    pub fn spawn_command(&mut self, cmd: Command) {
        self.spawn_with(cmd, false);
    }

    /// [`AgentProc::spawn_command`] with `JOURNAL_STREAM` naming the log file's device
    /// and inode, as systemd sets it when stderr is the journal's stream: the agent logs
    /// natively to journald (see `logging`).
    pub fn spawn_command_as_journal_stream(&mut self, cmd: Command) {
        self.spawn_with(cmd, true);
    }

    fn spawn_with(&mut self, mut cmd: Command, journal_stream: bool) {
        assert!(self.child.is_none(), "an agent process already runs");
        self.spawns += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the agent log");
        writeln!(log, "---- test harness: agent start #{} ----", self.spawns)
            .expect("write the agent log");
        if journal_stream {
            use std::os::unix::fs::MetadataExt;
            let meta = log.metadata().expect("stat the agent log");
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        let out = log.try_clone().expect("clone the log handle");
        // Its own process group, so a kill reaches whatever it runs under (strace).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
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

    /// Sends `sig` (`"-HUP"`, `"-TERM"`) to the running agent; panics if none runs or
    /// `kill` fails.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().expect("agent running");
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// SIGHUP: reread the configuration.
    pub fn sighup(&self) {
        self.signal("-HUP");
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

    /// [`AgentProc::wait_exit`] for async tests: polls with `tokio::time::sleep`, so the
    /// runtime's other tasks (stations) keep running meanwhile.
    pub async fn wait_exit_async(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        let child = self.child.as_mut()?;
        wait_until_async(timeout, || match child.try_wait() {
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

    /// SIGTERM and wait (at most 20 s): a clean stop. None if none ran, or if it did not
    /// stop in time (it is then killed).
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

    /// [`AgentProc::stop_term`] for async tests.
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

    /// SIGTERM, then wait (up to `timeout`) for the exit; panics with the log if the agent
    /// does not stop in time.
    pub fn terminate_within(&mut self, timeout: Duration) -> ExitStatus {
        self.signal("-TERM");
        match self.wait_exit(timeout) {
            Some(s) => s,
            None => panic!(
                "the agent did not stop within {timeout:?}; log:\n{}",
                self.log()
            ),
        }
    }

    /// [`AgentProc::terminate_within`] 30 s.
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(30))
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() && self.spawns > 0 {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!(
                "---- agent log {} (last 200 lines) ----",
                self.log.display()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}
