//! pointgate: the in-store agent between MQTT checkout stations and Mercado Pago Point
//! terminals. See `docs/architecture.md` for which module owns what.

#![forbid(unsafe_code)]

pub mod broker;
pub mod config;
pub mod engine;
pub mod logging;
pub mod money;
pub mod point;
pub mod sim;
pub mod station;
pub mod store;

// placeholder until the engine lands: the lead replaces `RunError` and `run` below.

/// Why the agent stopped other than by request. `Config` means exit 78.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The configuration cannot be used (e.g. the token file is refused).
    #[error("{0}")]
    Config(String),
}

/// Runs the agent until `shutdown` is cancelled. (placeholder until the engine lands:
/// it only waits for the shutdown.)
pub async fn run(
    config: config::Config,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), RunError> {
    let _ = config;
    shutdown.cancelled().await;
    Ok(())
}
