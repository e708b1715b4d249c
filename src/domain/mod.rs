//! The vocabulary every part of the agent speaks, at the bottom of the house: pure data
//! and pure functions, no IO, no tokio, sled, rumqttc or reqwest. It imports only
//! `money` and itself (`tests/layering.rs` checks it).
//!
//! - `command`: what a station asks for (`CommandBody` and its parts) and the contract's
//!   command grammar: bytes in, `ValidCommand` or `Refusal` out.
//! - `outcome`: what the agent answers: states, wait reasons, error codes, the event,
//!   agent-status and terminal-state payloads.
//! - `remote`: what the Point API said, in backend-neutral terms, and what a failed call
//!   means (`Failure`).
//! - `ids`: derived references, ticket numbers and hashed ids (a stored format).

pub mod command;
pub mod ids;
pub mod operator;
pub mod outcome;
pub mod remote;
