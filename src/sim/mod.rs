//! The Point API simulator: an HTTPS server (rustls, a certificate generated at start)
//! that behaves as Mercado Pago's docs describe the Integrations API and the payments
//! API, for tests, `pointgate demo` and integrators who develop offline (`pointgate sim`).
//!
//! It keeps a ledger of every create per `external_reference`, so tests can prove that
//! nothing was created twice. Terminal behaviour is scriptable (automatic with delays,
//! or step by step) and faults can be injected, in-process through `SimHandle` or over
//! the control endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::money::Site;

/// How the simulator starts.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where the API listens (port 0: any free port).
    pub listen: SocketAddr,
    /// Where the plain-HTTP control endpoint listens, if anywhere.
    pub control: Option<SocketAddr>,
    pub site: Site,
    /// The bearer token it accepts; anything else is 401.
    pub token: String,
    /// Devices in PDV mode.
    pub devices: Vec<String>,
    /// Devices in STANDALONE mode.
    pub standalone_devices: Vec<String>,
    /// Write the CA certificate (PEM) here.
    pub ca_out: Option<PathBuf>,
    /// Names the server certificate is valid for (default: `localhost`, `127.0.0.1`).
    pub hostnames: Vec<String>,
    /// Terminal behaviour at start.
    pub terminal: TerminalMode,
    /// Serve the intent list endpoints (`.../payment-intents/events`), which Mercado Pago
    /// no longer documents.
    pub serve_intent_lists: bool,
    /// Amounts (cents) that end in a reversed payment, a rejected payment, a terminal error.
    pub outcome_amounts: OutcomeAmounts,
}

/// How terminals behave once an intent is queued on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalMode {
    /// Each intent moves on by itself: OPEN → ON_TERMINAL after `pickup`, then through
    /// PROCESSING/PROCESSED to its end after `process`.
    Auto { pickup: Duration, process: Duration },
    /// Intents stay where they are until the control endpoint (or `SimHandle`) moves them.
    Manual,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeAmounts {
    pub reversed: u64,
    pub rejected: u64,
    pub error: u64,
}

impl Default for OutcomeAmounts {
    fn default() -> Self {
        OutcomeAmounts {
            reversed: 1100,
            rejected: 1200,
            error: 1300,
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            control: None,
            site: Site::MLA,
            token: "TEST-sim-token".to_string(),
            devices: vec!["SIM_A910__0001".to_string()],
            standalone_devices: Vec::new(),
            ca_out: None,
            hostnames: vec!["localhost".to_string(), "127.0.0.1".to_string()],
            terminal: TerminalMode::Auto {
                pickup: Duration::from_millis(200),
                process: Duration::from_millis(200),
            },
            serve_intent_lists: true,
            outcome_amounts: OutcomeAmounts::default(),
        }
    }
}
