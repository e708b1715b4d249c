//! The Point Integrations API (payment intents), complete, and the payments API
//! endpoints the engine needs. Implements `PointBackend`.
