//! Small helpers: free ports, bounded polling for a condition, a scratch directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that was free a moment ago (the OS picked it for port 0). Whoever
/// binds it next may lose a rare race with another process: retry with a new port.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// The next pause of a polling loop: 1 ms doubling to 50 ms, never past `deadline`.
fn next_pause(backoff: &mut Duration, deadline: Instant) -> Duration {
    let pause = (*backoff).min(deadline.saturating_duration_since(Instant::now()));
    *backoff = (*backoff * 2).min(Duration::from_millis(50));
    pause
}

/// Polls `cond` (blocking, small backoff) until it holds or `timeout` passes; returns
/// whether it held. For conditions, not as a sleep: it returns as soon as `cond` is true.
/// In async tests, prefer [`wait_until_async`]: this one blocks the runtime's thread.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(next_pause(&mut backoff, deadline));
    }
}

/// [`wait_until`] for async tests: pauses with `tokio::time::sleep`, so other tasks (the
/// stations' event loops) keep running on a current-thread runtime.
pub async fn wait_until_async(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(next_pause(&mut backoff, deadline)).await;
    }
}

/// A scratch directory, removed on drop (set `KEEP_TEST_DIRS=1` to keep it and print
/// where it is, for a post-mortem).
pub struct Workdir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Workdir {
    pub fn new() -> Workdir {
        let dir = tempfile::Builder::new()
            .prefix("pointgate-test-")
            .tempdir()
            .expect("create a temporary directory");
        let path = dir.path().to_path_buf();
        Workdir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `contents` to `name` (creating parent directories) and returns its path.
    pub fn write(&self, name: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent directories");
        }
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Creates the directory `name` and returns its path.
    pub fn mkdir(&self, name: impl AsRef<Path>) -> PathBuf {
        let path = self.join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }

    /// The file's contents, or an empty string if it does not exist (logs not yet written).
    pub fn read_to_string(&self, name: impl AsRef<Path>) -> String {
        std::fs::read_to_string(self.join(name)).unwrap_or_default()
    }
}

impl Default for Workdir {
    fn default() -> Self {
        Workdir::new()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DIRS").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping test directory {}", dir.keep().display());
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
