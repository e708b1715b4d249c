//! pointgate: the in-store agent between MQTT checkout stations and Mercado Pago Point
//! terminals. See `docs/architecture.md` for which module owns what.

#![forbid(unsafe_code)]

pub mod broker;
pub mod config;
pub mod engine;
pub mod money;
pub mod point;
pub mod sim;
pub mod station;
pub mod store;
