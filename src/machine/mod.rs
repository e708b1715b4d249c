//! The pure state machines: `step(state, input, ctx) -> effects`, no IO, no clock reads,
//! no randomness of their own. The engine stores what they return and performs their
//! effects; the store keeps them as they are (`store::record`).
//!
//! - `charge`: a charge from acceptance to its final state.
//! - `live`: what both share: `Ctx`, `Timing`, `Emit`, and a live intent on a terminal
//!   (`on_remote`, `Remote`, `CancelMark`).
//! - `refund`: a refund, through the payments API or on the terminal.
//!
//! Imports only `domain`, `money` and itself (`tests/layering.rs` checks it).

pub mod charge;
pub mod live;
pub mod refund;
