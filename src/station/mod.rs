//! The station side: what kiosks, scales and lanes send and receive over MQTT.
//!
//! - `wire`: the contract's Command and Event JSON, pure (no IO).
//! - `validate`: command parsing and validation into `ValidCommand` or a `Refusal`, pure.
//! - `topics`: topic names and parsing, pure.
//! - `link`: the task that owns the MQTT connection (rumqttc, MQTT 5).

pub mod link;
pub mod topics;
pub mod validate;
pub mod wire;
