//! A real Mosquitto broker per test, and the Mosquitto command-line clients.
//!
//! Each [`Mosquitto`] runs its own `mosquitto` process on a free 127.0.0.1 port with its
//! config, log and persistence in its own scratch directory; it is killed on drop.
//! Readiness is observed, never slept for: its log says `running` and the port accepts.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::util::{free_port, wait_until, Workdir};

/// How long a broker gets to start or stop.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// How many ports `start` tries when the one it picked was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

const INSTALL_HINT: &str = "the end-to-end tests need Mosquitto: run .ci/run (it installs \
    what is missing), or `apt-get install -y mosquitto mosquitto-clients`";

/// Where an installed program is: `$ENV_VAR`, then the usual Debian paths, then `$PATH`.
/// Panics with the install hint when it is nowhere: these tests never skip silently.
pub fn find_program(name: &str, env_var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    let fixed = [Path::new("/usr/sbin"), Path::new("/usr/bin")];
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    fixed
        .iter()
        .map(|dir| dir.join(name))
        .chain(from_path.iter().map(|dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found (looked at ${env_var}, /usr/sbin, /usr/bin, $PATH): {INSTALL_HINT}"))
}

/// How to run the broker.
#[derive(Debug, Clone)]
pub struct MosquittoOpts {
    /// `allow_anonymous` (default true).
    pub allow_anonymous: bool,
    /// `persistence true` in the broker's own directory, saved every second and on SIGTERM.
    pub persistence: bool,
    /// Lines appended after the listener line: they may configure that listener (TLS),
    /// set global options (`acl_file`, `password_file`, `max_queued_messages`...) or add
    /// listeners (take their ports from [`free_port`]).
    pub extra_config: Vec<String>,
}

impl Default for MosquittoOpts {
    fn default() -> Self {
        MosquittoOpts {
            allow_anonymous: true,
            persistence: false,
            extra_config: Vec::new(),
        }
    }
}

impl MosquittoOpts {
    pub fn with_persistence(mut self) -> Self {
        self.persistence = true;
        self
    }

    pub fn with_line(mut self, line: impl Into<String>) -> Self {
        self.extra_config.push(line.into());
        self
    }
}

/// A running `mosquitto`. Killed (SIGKILL) on drop.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    opts: MosquittoOpts,
    dir: Workdir,
    /// A whole config of the test's own ([`Mosquitto::start_templated`]), used instead of
    /// the one built from `opts`.
    template: Option<String>,
}

impl Mosquitto {
    /// Starts a broker on a free port and waits (at most 10 s) until it accepts.
    pub fn start(opts: MosquittoOpts) -> Mosquitto {
        let mut broker = Mosquitto {
            child: None,
            port: 0,
            opts,
            dir: Workdir::new(),
            template: None,
        };
        broker.start_on_free_port();
        broker
    }

    /// Starts a broker whose config is `template`, with `{port}` replaced by a free port
    /// and `{dir}` by the broker's scratch directory (which holds an empty `persistence/`
    /// directory); the harness puts `user root` and logging to stderr in front. For the
    /// shipped config ([`shipped_config_template`]); `restart` keeps the template.
    pub fn start_templated(template: impl Into<String>) -> Mosquitto {
        let mut broker = Mosquitto {
            child: None,
            port: 0,
            opts: MosquittoOpts::default(),
            dir: Workdir::new(),
            template: Some(template.into()),
        };
        broker.start_on_free_port();
        broker
    }

    fn start_on_free_port(&mut self) {
        let broker = self;
        for attempt in 1..=PORT_ATTEMPTS {
            broker.port = free_port();
            match broker.spawn_and_wait() {
                Ok(()) => return,
                Err(log) if log.contains("Address already in use") && attempt < PORT_ATTEMPTS => {
                    continue
                }
                Err(log) => panic!(
                    "mosquitto did not start on port {}; its log:\n{log}",
                    broker.port
                ),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts a broker with the default options (anonymous, no persistence).
    pub fn start_default() -> Mosquitto {
        Mosquitto::start(MosquittoOpts::default())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's scratch directory (config, log, persistence); put ACL or certificate
    /// files here.
    pub fn dir(&self) -> &Workdir {
        &self.dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("mosquitto.log")
    }

    /// Everything the broker logged so far, across restarts.
    pub fn log(&self) -> String {
        self.dir.read_to_string("mosquitto.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, then wait (at most 10 s) for the exit: Mosquitto saves its persistence file.
    pub fn stop_term(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", child.id());
        let exited = wait_until(BROKER_TIMEOUT, || matches!(child.try_wait(), Ok(Some(_))));
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mosquitto ignored SIGTERM for {BROKER_TIMEOUT:?}; log:\n{}",
                self.log()
            );
        }
    }

    /// SIGKILL, then reap: whatever was not saved is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port, with the same config and persistence
    /// directory; stops it first (SIGTERM) if it still runs.
    pub fn restart(&mut self) {
        self.stop_term();
        // The port was ours a moment ago; another process taking it in between is not
        // worth a retry here: the test would have to learn the new port.
        if let Err(log) = self.spawn_and_wait() {
            panic!(
                "mosquitto did not restart on port {}; its log:\n{log}",
                self.port
            );
        }
    }

    fn write_config(&self) -> PathBuf {
        if let Some(template) = &self.template {
            self.dir.mkdir("persistence");
            let body = template
                .replace("{port}", &self.port.to_string())
                .replace("{dir}", &self.dir.path().display().to_string());
            let config = format!("user root\nlog_dest stderr\nlog_type all\n{body}\n");
            return self.dir.write("mosquitto.conf", config);
        }
        let mut config = vec![
            // Mosquitto run as root drops to the `mosquitto` user, which cannot write our
            // directory; `user root` keeps it as is (and does nothing for other users).
            "user root".to_owned(),
            "log_dest stderr".to_owned(),
            "log_type all".to_owned(),
            format!("allow_anonymous {}", self.opts.allow_anonymous),
        ];
        if self.opts.persistence {
            let location = self.dir.mkdir("persistence");
            config.push("persistence true".to_owned());
            config.push(format!("persistence_location {}/", location.display()));
            config.push("autosave_interval 1".to_owned());
        }
        config.push(format!("listener {} 127.0.0.1", self.port));
        config.extend(self.opts.extra_config.iter().cloned());
        config.push(String::new());
        self.dir.write("mosquitto.conf", config.join("\n"))
    }

    /// Spawns mosquitto on `self.port` and waits until it runs; on failure, returns its log.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let program = find_program("mosquitto", "MOSQUITTO");
        let config = self.write_config();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the mosquitto log");
        writeln!(
            log,
            "---- pointgate test harness: starting on port {} ----",
            self.port
        )
        .expect("write the mosquitto log");
        let log_start = std::fs::metadata(self.log_path())
            .map(|m| m.len())
            .unwrap_or(0);
        let stdout = log.try_clone().expect("clone the log handle");
        let child = Command::new(&program)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}; {INSTALL_HINT}", program.display()));
        self.child = Some(child);

        let port = self.port;
        let log_path = self.log_path();
        let this_run = || {
            let all = std::fs::read(&log_path).unwrap_or_default();
            String::from_utf8_lossy(all.get(log_start as usize..).unwrap_or_default()).into_owned()
        };
        let mut exited = false;
        let ready = wait_until(BROKER_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    exited = true;
                    return true;
                }
            }
            this_run().contains(" running") && TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if ready && !exited {
            return Ok(());
        }
        self.kill();
        Err(this_run())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- mosquitto log (port {}) ----\n{}",
                self.port,
                self.log()
            );
        }
    }
}

/// The shipped broker config (`packaging/mosquitto/pointgate.conf`) as a template for
/// [`Mosquitto::start_templated`]: its listener moved to `127.0.0.1:{port}`, its
/// persistence to `{dir}/persistence/`, and its password and ACL files to the given ones.
/// Everything else (persistence, autosave, anonymous access, limits) is as shipped.
pub fn shipped_config_template(password_file: &Path, acl_file: &Path) -> String {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/mosquitto/pointgate.conf");
    let text = std::fs::read_to_string(&shipped)
        .unwrap_or_else(|e| panic!("read {}: {e}", shipped.display()));
    let moved = [
        "persistence_location",
        "password_file",
        "acl_file",
        "listener",
        "protocol",
    ];
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !moved.iter().any(|k| l.trim_start().starts_with(k)))
        .map(str::to_owned)
        .collect();
    lines.push("persistence_location {dir}/persistence/".to_owned());
    lines.push(format!("password_file {}", password_file.display()));
    lines.push(format!("acl_file {}", acl_file.display()));
    lines.push("listener {port} 127.0.0.1".to_owned());
    // Options after a listener line configure that listener: keep `protocol` with it.
    lines.push("protocol mqtt".to_owned());
    lines.join("\n")
}

/// The shipped ACL (`packaging/mosquitto/acl`).
pub fn shipped_acl_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/mosquitto/acl")
}

/// Creates a Mosquitto password file with these `(username, password)` pairs, using
/// `mosquitto_passwd -b` (as the shipped config's recipe does).
pub fn write_password_file(path: &Path, users: &[(&str, &str)]) {
    let program = find_program("mosquitto_passwd", "MOSQUITTO_PASSWD");
    std::fs::write(path, "").unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    for (user, password) in users {
        let out = Command::new(&program)
            .arg("-b")
            .arg(path)
            .args([user, password])
            .output()
            .unwrap_or_else(|e| panic!("spawn {}: {e}; {INSTALL_HINT}", program.display()));
        assert!(
            out.status.success(),
            "mosquitto_passwd -b {user}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Publishes one message with `mosquitto_pub` (QoS 1, MQTT 3.1.1, payload from stdin so
/// any bytes go) and panics if it fails.
pub fn mosquitto_pub(port: u16, topic: &str, payload: impl AsRef<[u8]>) {
    mosquitto_pub_with(port, topic, payload, &[]);
}

/// [`mosquitto_pub`] with extra arguments (`-r`, `-V mqttv5`, `-u`, `--cafile`...).
pub fn mosquitto_pub_with(port: u16, topic: &str, payload: impl AsRef<[u8]>, extra: &[&str]) {
    if let Err(e) = try_mosquitto_pub(port, topic, payload, extra) {
        panic!("{e}");
    }
}

/// [`mosquitto_pub_with`] that returns its failure (exit status and stderr) instead of
/// panicking: for tests where the broker must refuse.
pub fn try_mosquitto_pub(
    port: u16,
    topic: &str,
    payload: impl AsRef<[u8]>,
    extra: &[&str],
) -> Result<(), String> {
    let program = find_program("mosquitto_pub", "MOSQUITTO_PUB");
    let mut child = Command::new(&program)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-s",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}; {INSTALL_HINT}", program.display()));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(payload.as_ref())
        .expect("write the payload to mosquitto_pub");
    // stdin is dropped above: mosquitto_pub sees the end of the message.
    let output = child.wait_with_output().expect("wait for mosquitto_pub");
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mosquitto_pub -t {topic} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// One message seen by [`MosquittoSub`]: the topic and the payload as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubMsg {
    pub topic: String,
    pub payload: String,
}

/// A `mosquitto_sub` process subscribed (QoS 1) to some topics. Its stdout is read by a
/// thread into a channel; killed on drop.
pub struct MosquittoSub {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<SubMsg>,
}

/// Marks message lines in mosquitto_sub's output, apart from its `-d` debug lines.
const MSG_MARK: &str = "MSG\t";

impl MosquittoSub {
    /// Subscribes to `topics` and returns once the broker acknowledged the subscription.
    pub fn start(port: u16, topics: &[&str]) -> MosquittoSub {
        MosquittoSub::start_with(port, topics, &[])
    }

    /// [`MosquittoSub::start`] with extra arguments (`-V mqttv5`, `-u`, `-i ID -c`...).
    pub fn start_with(port: u16, topics: &[&str], extra: &[&str]) -> MosquittoSub {
        let program = find_program("mosquitto_sub", "MOSQUITTO_SUB");
        // Into a pipe, mosquitto_sub's stdio buffers its debug lines (the SUBACK we wait
        // for) until a message comes: `stdbuf -oL` (coreutils) makes it line-buffered.
        let mut command = Command::new(find_program("stdbuf", "STDBUF"));
        command.arg("-oL").arg(&program);
        command.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-d"]);
        // A tab after the topic: topics have no tabs, so the split is unambiguous.
        command.args(["-F", &format!("{MSG_MARK}%t\t%p")]);
        for topic in topics {
            command.args(["-t", topic]);
        }
        let mut child = command
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}; {INSTALL_HINT}", program.display()));

        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        let mut sub = MosquittoSub {
            child,
            lines,
            seen: Vec::new(),
        };
        let deadline = Instant::now() + BROKER_TIMEOUT;
        let mut debug = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match sub.lines.recv_timeout(left) {
                Ok(line) if line.contains("received SUBACK") => return sub,
                Ok(line) => debug.push(line),
                Err(_) => {
                    let _ = sub.child.kill();
                    let stderr = sub
                        .child
                        .stderr
                        .take()
                        .map(|mut e| {
                            let mut s = String::new();
                            let _ = std::io::Read::read_to_string(&mut e, &mut s);
                            s
                        })
                        .unwrap_or_default();
                    panic!(
                        "mosquitto_sub got no SUBACK within {BROKER_TIMEOUT:?}; output: {debug:?}; stderr: {stderr}"
                    );
                }
            }
        }
    }

    /// The next message, or None after `timeout`.
    pub fn next_message(&mut self, timeout: Duration) -> Option<SubMsg> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            if let Some(rest) = line.strip_prefix(MSG_MARK) {
                let (topic, payload) = rest.split_once('\t').unwrap_or((rest, ""));
                let msg = SubMsg {
                    topic: topic.to_owned(),
                    payload: payload.to_owned(),
                };
                self.seen.push(msg.clone());
                return Some(msg);
            }
        }
    }

    /// The first message for which `pred` holds; panics after `timeout` with all it saw.
    pub fn wait_for(&mut self, mut pred: impl FnMut(&SubMsg) -> bool, timeout: Duration) -> SubMsg {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_message(left) {
                Some(msg) if pred(&msg) => return msg,
                Some(_) => continue,
                None => panic!(
                    "mosquitto_sub: no matching message within {timeout:?}; saw {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Every message returned so far.
    pub fn seen(&self) -> &[SubMsg] {
        &self.seen
    }
}

impl Drop for MosquittoSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
