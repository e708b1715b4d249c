//! The processes the benchmark runs besides itself: a Mosquitto broker on a free port (or
//! the embedded rumqttd broker, labelled as such) and the agent as a separate release
//! process, whose RSS, CPU time and open descriptors are read from `/proc/<pid>`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

pub const INSTALL_HINT: &str =
    "install Mosquitto (`sudo apt-get install -y mosquitto`), or pass --broker embedded";

/// The broker the run uses.
pub enum Broker {
    Mosquitto {
        child: Child,
        port: u16,
        version: String,
    },
    Embedded(pointgate::broker::EmbeddedBroker),
}

impl Broker {
    pub fn url(&self) -> String {
        match self {
            Broker::Mosquitto { port, .. } => format!("mqtt://127.0.0.1:{port}"),
            Broker::Embedded(b) => b.url(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Broker::Mosquitto { port, .. } => *port,
            Broker::Embedded(b) => b.addr().port(),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Broker::Mosquitto { version, .. } => format!("mosquitto {version}"),
            Broker::Embedded(_) => "embedded rumqttd (fallback: not a store's broker)".into(),
        }
    }

    pub fn start_embedded() -> Result<Broker> {
        Ok(Broker::Embedded(
            pointgate::broker::EmbeddedBroker::start().context("embedded broker")?,
        ))
    }

    /// Mosquitto on a free port, its config and log in `dir`.
    pub fn start_mosquitto(dir: &Path, extra: &[String]) -> Result<Broker> {
        let program = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .or_else(|| which("mosquitto"))
            .with_context(|| format!("mosquitto not found; {INSTALL_HINT}"))?;
        let version = Command::new(&program)
            .arg("-h")
            .output()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.lines()
                    .next()
                    .and_then(|l| {
                        l.split_whitespace()
                            .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
                    })
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "?".into());
        for _attempt in 0..5 {
            let port = free_port()?;
            let conf = dir.join("mosquitto.conf");
            // No persistence (a store's broker may persist, but that is the broker's
            // cost, not the agent's); queues large enough that a backlog is never dropped.
            std::fs::write(
                &conf,
                format!(
                    "user root\nlog_dest stderr\nlog_type error\nlog_type warning\n\
                     allow_anonymous true\nmax_queued_messages 1000000\n\
                     listener {port} 127.0.0.1\n{}\n",
                    extra.join("\n")
                ),
            )?;
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("mosquitto.log"))?;
            let child = Command::new(&program)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .spawn()
                .with_context(|| format!("spawn {}; {INSTALL_HINT}", program.display()))?;
            let mut broker = Broker::Mosquitto {
                child,
                port,
                version: version.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Broker::Mosquitto { child, .. } = &mut broker {
                    if child.try_wait()?.is_some() {
                        break;
                    }
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(broker);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            broker.stop();
        }
        bail!(
            "mosquitto did not start; its log: {}",
            dir.join("mosquitto.log").display()
        )
    }

    pub fn stop(&mut self) {
        if let Broker::Mosquitto { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Figures read from `/proc/<pid>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub fds: u64,
}

pub fn clock_ticks_per_s() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

pub fn sample(pid: u32) -> Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Ok(ProcSample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_ticks: num(11) + num(12),
        fds,
    })
}

/// Bytes of every file under `dir` (apparent size) and allocated on disk.
pub fn dir_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let mut apparent = 0;
    let mut allocated = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                apparent += m.len();
                allocated += m.blocks() * 512;
            }
        }
    }
    (apparent, allocated)
}

/// The agent as its own process: `pointgate run --config <file>`.
pub struct Agent {
    pub child: Child,
    pub spawned: Instant,
    /// When `READY=1` arrived on our NOTIFY_SOCKET, if the agent speaks sd-notify.
    pub ready: Arc<Mutex<Option<Instant>>>,
    pub log: PathBuf,
}

impl Agent {
    pub fn spawn(bin: &Path, config: &Path, workdir: &Path, tag: &str) -> Result<Agent> {
        let sock_path = workdir.join(format!("notify-{tag}.sock"));
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path).context("bind the notify socket")?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let ready = Arc::new(Mutex::new(None));
        let log = workdir.join(format!("agent-{tag}.log"));
        let log_file = File::create(&log)?;
        let spawned = Instant::now();
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &sock_path)
            // As the shipped unit runs it (systemd/pointgate.service).
            .env("MALLOC_ARENA_MAX", "2")
            .env_remove("RUST_LOG")
            .env_remove("POINTGATE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let pid = child.id();
        let slot = ready.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Until READY=1 or the process is gone.
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if text.lines().any(|l| l == "READY=1") {
                            if let Ok(mut s) = slot.lock() {
                                *s = Some(Instant::now());
                            }
                            return;
                        }
                    }
                    Err(_) => {
                        if !Path::new(&format!("/proc/{pid}")).exists() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Agent {
            child,
            spawned,
            ready,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sample(&self) -> Result<ProcSample> {
        sample(self.pid())
    }

    pub fn ready_at(&self) -> Option<Instant> {
        self.ready.lock().ok().and_then(|s| *s)
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGTERM, then wait (at most `timeout`) for the exit; SIGKILL after that.
    /// Returns how long the clean stop took, if it was clean.
    pub fn stop(&mut self, timeout: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        while t0.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Appends one line to a file (the soak log).
pub fn append_line(path: &Path, line: &str) {
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}
