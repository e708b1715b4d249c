//! The charge engine.
