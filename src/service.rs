//! The systemd service protocol (`sd_notify(3)`): `READY=1` once the agent can do its
//! job, `WATCHDOG=1` while the engine loop is alive, `STOPPING=1` when it drains.
//!
//! Invariants:
//! - Readiness does not wait for the broker or the API: once the store is open, open
//!   requests are resumed and the tasks run, the agent is doing its job (an offline store
//!   must still expire its charges; the broker and API health go to the status topic).
//! - A watchdog ping is sent only after the engine loop itself answered a probe
//!   ([`ToEngine::Ping`]): a stalled engine is not hidden by a healthy timer task, and
//!   systemd restarts it (the store makes a restart safe).
//! - Outside systemd (`NOTIFY_SOCKET` unset) every call here does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::engine::port::{EngineHandle, ToEngine};

/// Tells systemd the agent is ready, with a human status line (`systemctl status`).
pub fn notify_ready(resumed: usize) {
    let status = format!("running; {resumed} open request(s) resumed at start");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Tells systemd the agent is stopping (draining).
pub fn notify_stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Half the watchdog period systemd asked for (`WATCHDOG_USEC` for this process), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Every `interval`, probes the engine loop; pings the watchdog when it answered within
/// `interval`. Returns when `shutdown` is cancelled.
pub async fn watchdog(engine: EngineHandle, interval: Duration, shutdown: CancellationToken) {
    run_watchdog(engine, interval, shutdown, || {
        send(&[NotifyState::Watchdog]);
    })
    .await;
}

/// [`watchdog`] with the ping as a parameter (tests count pings).
async fn run_watchdog(
    engine: EngineHandle,
    interval: Duration,
    shutdown: CancellationToken,
    mut ping: impl FnMut(),
) {
    // The first probe one period after start: no ping before `READY=1`.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let alive = tokio::select! {
            _ = shutdown.cancelled() => return,
            alive = probe(&engine, interval) => alive,
        };
        if alive {
            ping();
        } else {
            tracing::warn!(
                timeout_ms = interval.as_millis() as u64,
                "engine did not answer the liveness probe; watchdog ping withheld"
            );
        }
    }
}

/// True when the engine loop answered a [`ToEngine::Ping`] within `timeout` (sending
/// counts: a full channel is a stalled engine too).
async fn probe(engine: &EngineHandle, timeout: Duration) -> bool {
    let (tx, rx) = oneshot::channel();
    tokio::time::timeout(timeout, async move {
        engine.send(ToEngine::Ping(tx)).await && rx.await.is_ok()
    })
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Runs the watchdog (20 ms period) against a fake engine loop that answers probes
    /// or holds them unanswered (stalled), until the engine saw `probes` probes; returns
    /// the pings sent by then.
    async fn pings_after(answer: bool, probes: usize) -> usize {
        let (handle, mut rx) = crate::engine::port::channel();
        let pings = Arc::new(AtomicUsize::new(0));
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let engine = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(m) = rx.recv().await {
                if let ToEngine::Ping(reply) = m {
                    if answer {
                        let _ = reply.send(());
                    } else {
                        held.push(reply);
                    }
                    let _ = seen_tx.send(());
                }
            }
        });
        let shutdown = CancellationToken::new();
        let p = pings.clone();
        let dog = tokio::spawn(run_watchdog(
            handle,
            Duration::from_millis(20),
            shutdown.clone(),
            move || {
                p.fetch_add(1, Ordering::SeqCst);
            },
        ));
        for _ in 0..probes {
            tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
                .await
                .expect("the watchdog keeps probing")
                .expect("the fake engine runs");
        }
        // The ping for the last answered probe follows its answer at once.
        tokio::time::sleep(Duration::from_millis(5)).await;
        shutdown.cancel();
        dog.await.expect("watchdog task joins");
        engine.abort();
        pings.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_live_engine_loop_feeds_the_watchdog_on_each_probe() {
        let n = pings_after(true, 5).await;
        assert!(n >= 4, "pings: {n}");
    }

    #[tokio::test]
    async fn a_stalled_engine_loop_gets_no_watchdog_ping() {
        assert_eq!(pings_after(false, 5).await, 0);
    }

    #[tokio::test]
    async fn a_gone_engine_gets_no_watchdog_ping() {
        let (handle, rx) = crate::engine::port::channel();
        drop(rx);
        let shutdown = CancellationToken::new();
        let pings = Arc::new(AtomicUsize::new(0));
        let p = pings.clone();
        let dog = tokio::spawn(run_watchdog(
            handle,
            Duration::from_millis(10),
            shutdown.clone(),
            move || {
                p.fetch_add(1, Ordering::SeqCst);
            },
        ));
        // Several periods pass; nothing can answer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        dog.await.expect("joins");
        assert_eq!(pings.load(Ordering::SeqCst), 0);
    }
}
