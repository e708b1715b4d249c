//! The control socket: how `pointgate status` and `pointgate queue` talk to a running
//! agent. A unix stream socket (`control.socket`, by default
//! `/run/pointgate/control.sock` in the unit's `RuntimeDirectory`), mode 0660, so root
//! and the `pointgate` group may use it and nobody else.
//!
//! Protocol (version 1): the client writes one JSON object on one line,
//! `{"v":1,"op":"status"|"list"|"show"|"cancel"|"resolve",...}`, and reads one JSON
//! object on one line, `{"v":1,"answer":"status"|"list"|"show"|"changed"|"error",...}`;
//! then the connection closes. `docs/contract-notes.md` lists every field.
//!
//! `protocol` owns the line format (pure), `server` the socket task (one short task per connection; the
//! engine answers every request, since it owns the store and the open requests) and `client` the client function; the verbs themselves are `domain::operator`'s. Invariants: an answer never carries the access token (the engine
//! builds answers from stored requests and events only, and neither holds it); a request
//! line is at most [`MAX_LINE`] bytes; a connection that sends nothing is dropped after
//! [`READ_TIMEOUT`].

pub mod client;
pub mod protocol;
pub mod server;

pub use crate::domain::operator::*;
pub use client::{call, ClientError};
pub use protocol::{encode_reply, encode_request, parse_reply, parse_request, MAX_LINE, VERSION};
pub use server::{bind, serve, BindError, ENGINE_TIMEOUT, READ_TIMEOUT};

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn bind_makes_a_0660_socket_replaces_a_stale_one_and_refuses_a_live_one_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        let first = bind(&path).expect("binds, creating the directory");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(bind(&path), Err(BindError::InUse { .. })));
        drop(first);
        // The file stays behind, as after a crash: it is replaced.
        assert!(path.exists());
        let _second = bind(&path).expect("a stale socket is replaced");
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(bind(&file), Err(BindError::NotASocket { .. })));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    }

    #[tokio::test]
    async fn a_client_without_an_agent_is_told_it_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let err = call(
            &dir.path().join("none.sock"),
            &ControlRequest::Status,
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err}");
    }
}
