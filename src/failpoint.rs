//! Fail points: named places where a test build of the agent can be made to crash, to
//! show that every window of the reliability table is closed (test C2).
//!
//! Compiled in only with the `failpoints` cargo feature, which only the crash tests
//! enable (`cargo test --features failpoints`); in every other build `hit` is an empty
//! inline function and the names cost nothing.
//!
//! `POINTGATE_FAILPOINT=<name>` aborts the process (SIGABRT, no unwinding, no flush, as
//! a `kill -9` would leave it) the first time `<name>` is hit; `<name>:<n>` on the n-th
//! hit. The names are the `pub const`s below.

/// A command was received and validated, before the batch holding it is written.
pub const COMMAND_BEFORE_STORE: &str = "command_before_store";
/// The batch holding a command is written and synced, before the command is acknowledged.
pub const STORED_BEFORE_ACK: &str = "stored_before_ack";
/// The write-ahead of a create (`SendBegun`) is durable, before the request leaves.
pub const CREATE_BEFORE_SEND: &str = "create_before_send";
/// The API answered the create (the intent exists), before the answer is stored.
pub const CREATE_AFTER_SEND: &str = "create_after_send";
/// A final state is stored and synced, before its event is handed to the link.
pub const FINAL_BEFORE_PUBLISH: &str = "final_before_publish";

/// Not a crash: while armed, every store write fails (a full or dead disk), so commands
/// are refused `storage_unavailable`. Checked with `armed`, not `hit`.
pub const STORE_WRITE_ERROR: &str = "store_write_error";

/// Every crash point, for tests that walk them all.
pub const ALL: &[&str] = &[
    COMMAND_BEFORE_STORE,
    STORED_BEFORE_ACK,
    CREATE_BEFORE_SEND,
    CREATE_AFTER_SEND,
    FINAL_BEFORE_PUBLISH,
];

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;

    static ARMED: OnceLock<Option<(String, u32)>> = OnceLock::new();
    static HITS: AtomicU32 = AtomicU32::new(0);

    fn armed_spec() -> &'static Option<(String, u32)> {
        ARMED.get_or_init(|| {
            let spec = std::env::var("POINTGATE_FAILPOINT").ok()?;
            let (name, n) = match spec.split_once(':') {
                Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some((name, n.max(1)))
        })
    }

    pub fn armed(name: &str) -> bool {
        armed_spec().as_ref().is_some_and(|(n, _)| n == name)
    }

    pub fn hit(name: &str) {
        if let Some((armed, n)) = armed_spec() {
            if armed == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
                eprintln!("failpoint {name}: aborting");
                std::process::abort();
            }
        }
    }
}

/// Crash here if this fail point is armed (test builds only).
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    imp::hit(name)
}

/// True if this (non-crash) fail point is armed (test builds only).
#[cfg(feature = "failpoints")]
pub fn armed(name: &str) -> bool {
    imp::armed(name)
}

/// True if this (non-crash) fail point is armed: never, outside test builds.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn armed(_name: &str) -> bool {
    false
}

/// Crash here if this fail point is armed (test builds only).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
