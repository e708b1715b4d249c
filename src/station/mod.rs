//! The station side: what kiosks, scales and lanes send and receive over MQTT.
//!
//! - `topics`: topic names and parsing, pure.
//! - `link`: the task that owns the MQTT connection (rumqttc, MQTT 5).

pub mod link;
pub mod topics;
