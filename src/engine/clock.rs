//! The engine's clock rules: the injected wall clock (`Clock`), what is known about the
//! clock at start (`TimeFacts`), and when it cannot be trusted (`clock_doubt`: contract,
//! "when in doubt, expire").

/// The wall clock, injected so tests can drive time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        d.as_millis() as i64
    }
}

/// What the agent knows about the clock at start (contract: time rules).
#[derive(Debug, Clone, Default)]
pub struct TimeFacts {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), if readable.
    pub boot_id: Option<String>,
    /// The system clock is synchronised (NTP).
    pub synchronized: bool,
}

impl TimeFacts {
    /// Read them from the system: the boot id, and whether systemd-timesyncd (or
    /// `timedatectl`) says the clock is synchronised.
    pub fn read() -> TimeFacts {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let synchronized = std::path::Path::new("/run/systemd/timesync/synchronized").exists()
            || std::process::Command::new("timedatectl")
                .args(["show", "-p", "NTPSynchronized", "--value"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "yes");
        TimeFacts {
            boot_id,
            synchronized,
        }
    }
}

/// Why the clock cannot be trusted for charges not yet sent, if it cannot (contract:
/// "when in doubt, expire").
pub fn clock_doubt(
    facts: &TimeFacts,
    stored_boot: Option<&str>,
    stored_last_ms: Option<i64>,
    now_ms: i64,
) -> Option<&'static str> {
    if stored_last_ms.is_some_and(|last| now_ms < last) {
        return Some("the clock reads earlier than the store's latest record");
    }
    let rebooted = match (stored_boot, facts.boot_id.as_deref()) {
        (Some(old), Some(new)) => old != new,
        // A store from an earlier run, and no way to tell the boot: assume a reboot.
        (Some(_), None) => true,
        (None, _) => false,
    };
    if rebooted && !facts.synchronized {
        return Some("the machine rebooted and the clock is not synchronised");
    }
    None
}
