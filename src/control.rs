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
//! This module owns the wire types, the server task (one short task per connection; the
//! engine answers every request, since it owns the store and the open requests) and the
//! client function. Invariants: an answer never carries the access token (the engine
//! builds answers from stored requests and events only, and neither holds it); a request
//! line is at most [`MAX_LINE`] bytes; a connection that sends nothing is dropped after
//! [`READ_TIMEOUT`].

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::domain::command::CommandType;
use crate::domain::outcome::{AgentStatus, TerminalState};
use crate::engine::{EngineHandle, ToEngine};

/// The protocol version, `v` of every line.
pub const VERSION: u8 = 1;
/// The longest request line accepted.
pub const MAX_LINE: usize = 16 * 1024;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server waits for the engine's answer.
pub const ENGINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait.
const MAX_CONNECTIONS: usize = 8;
/// The socket's mode: owner and group.
const SOCKET_MODE: u32 = 0o660;

/// What an operator asks. Ids are `<station>/<request_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The agent's status, its pending requests by state, its terminals and stations.
    Status,
    /// Open requests and those that ended in the last hour.
    List,
    /// One request: its stored fields and latest event.
    Show { id: String },
    /// Cancel a charge, as its station's `cancel` would.
    Cancel { id: String },
    /// End a `needs_attention` charge after checking the terminal.
    Resolve { id: String, outcome: Outcome },
}

/// An operator's verdict on a `needs_attention` charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Approved,
    Declined,
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum ControlReply {
    Status(StatusView),
    List(ListView),
    Show(RequestDetail),
    /// A cancel or resolve was applied and stored; `request` is where it stands now.
    Changed(ChangeView),
    Error(ControlFailure),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// As `agent/status` says it, computed now.
    pub agent: AgentStatus,
    pub pending: PendingSummary,
    pub terminals: Vec<TerminalState>,
    /// Station id → its bound terminals, as configured now (after any SIGHUP).
    pub stations: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSummary {
    /// Requests that are not final (charges and cancels).
    pub total: u64,
    /// Latest state → how many open requests are in it.
    pub by_state: BTreeMap<String, u64>,
    pub oldest_pending_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListView {
    /// Open requests first (oldest first), then recent final ones (newest first).
    pub requests: Vec<RequestRow>,
}

/// One request, as a line of `queue list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRow {
    /// `<station>/<request_id>`.
    pub id: String,
    pub station: String,
    pub request_id: String,
    #[serde(rename = "type")]
    pub kind: CommandType,
    /// The state of its latest event.
    pub state: String,
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Seconds since the agent received it.
    pub age_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    /// `reason` of a `waiting` event, or `error.code` of a `failed` one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The charge a cancel is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One request in full, for `queue show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestDetail {
    #[serde(flatten)]
    pub row: RequestRow,
    pub received_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_at: Option<String>,
    /// When a charge not yet sent expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<String>,
    /// The engine's internal stage (`queued`, `send_begun`, `live`, `confirming`,
    /// `needs_attention`, `done`), for a charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_reference: Option<String>,
    /// The MQTT 5 Response Topic its events go to, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_topic: Option<String>,
    /// The command as the agent accepted it (normalised).
    pub command: serde_json::Value,
    /// Every stored event of the request, oldest first; the store keeps only the latest
    /// one for now, so this holds that one.
    pub events: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeView {
    pub request: RequestRow,
    /// What happened, for a person.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlFailure {
    pub code: FailureCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// Not a request of this protocol.
    BadRequest,
    /// No such request.
    NotFound,
    /// The request is in a state where this cannot be done.
    NotAllowed,
    /// The engine or its store could not answer.
    Unavailable,
}

impl ControlReply {
    pub fn error(code: FailureCode, message: impl Into<String>) -> ControlReply {
        ControlReply::Error(ControlFailure::new(code, message))
    }
}

impl ControlFailure {
    pub fn new(code: FailureCode, message: impl Into<String>) -> ControlFailure {
        ControlFailure {
            code,
            message: message.into(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RequestLine {
    v: u8,
    #[serde(flatten)]
    request: ControlRequest,
}

#[derive(Serialize, Deserialize)]
struct ReplyLine {
    v: u8,
    #[serde(flatten)]
    reply: ControlReply,
}

/// Parse a request line; `Err` is the error to answer.
pub fn parse_request(line: &[u8]) -> Result<ControlRequest, ControlFailure> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        ControlFailure::new(FailureCode::BadRequest, format!("not a JSON object: {e}"))
    })?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        _ => {
            return Err(ControlFailure::new(
                FailureCode::BadRequest,
                format!("`v` must be {VERSION}"),
            ))
        }
    }
    serde_json::from_value::<RequestLine>(value)
        .map(|l| l.request)
        .map_err(|e| ControlFailure::new(FailureCode::BadRequest, e.to_string()))
}

/// The line a client sends (with its newline).
pub fn encode_request(request: &ControlRequest) -> Vec<u8> {
    let mut out = serde_json::to_vec(&RequestLine {
        v: VERSION,
        request: request.clone(),
    })
    // Plain enums of strings: JSON encoding cannot fail.
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// The line the server sends (with its newline).
pub fn encode_reply(reply: &ControlReply) -> Vec<u8> {
    let mut out = serde_json::to_vec(&ReplyLine {
        v: VERSION,
        reply: reply.clone(),
    })
    // Structs of strings, numbers and JSON values: encoding cannot fail.
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// Parse a reply line.
pub fn parse_reply(line: &[u8]) -> Result<ControlReply, serde_json::Error> {
    serde_json::from_slice::<ReplyLine>(line).map(|l| l.reply)
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("control.socket: {path} exists and is not a socket; not replacing it")]
    NotASocket { path: PathBuf },
    #[error("control.socket: another agent answers on {path}")]
    InUse { path: PathBuf },
    #[error("control.socket: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Bind the control socket at `path`: creates the parent directory if missing (0750),
/// replaces a stale socket left by a crash (but not a live one, nor any other file), and
/// sets mode 0660.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(parent)
                .map_err(io)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => {
            return Err(BindError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io)?;
    Ok(listener)
}

/// Serve the control socket until `shutdown`; then remove the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    engine: EngineHandle,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                continue;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &engine).await {
                tracing::debug!(error = %e, "control socket: connection ended early");
            }
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn serve_one(stream: UnixStream, engine: &EngineHandle) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64 + 1));
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let reply = match read {
        Err(_) => ControlReply::error(FailureCode::BadRequest, "no request line in time"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if line.len() > MAX_LINE => {
            ControlReply::error(FailureCode::BadRequest, "request line too long")
        }
        Ok(Ok(_)) => match parse_request(&line) {
            Err(failure) => ControlReply::Error(failure),
            Ok(request) => {
                tracing::info!(request = ?request, "control request");
                ask_engine(engine, request).await
            }
        },
    };
    write.write_all(&encode_reply(&reply)).await?;
    write.shutdown().await
}

async fn ask_engine(engine: &EngineHandle, request: ControlRequest) -> ControlReply {
    let (tx, rx) = oneshot::channel();
    if !engine.send(ToEngine::Control { request, reply: tx }).await {
        return ControlReply::error(FailureCode::Unavailable, "the engine has stopped");
    }
    match tokio::time::timeout(ENGINE_TIMEOUT, rx).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => ControlReply::error(FailureCode::Unavailable, "the engine did not answer"),
        Err(_) => ControlReply::error(FailureCode::Unavailable, "the engine is busy; try again"),
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the agent is not running (nothing answers on {})", path.display())]
    NotRunning { path: PathBuf },
    #[error("permission denied on {}: run this as root or as a member of the pointgate group", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent's answer could not be read: {0}")]
    BadAnswer(String),
}

/// Send one request to the agent listening on `path` and read its answer.
pub async fn call(
    path: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, ClientError> {
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning {
                path: path.to_path_buf(),
            }
        }
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            path: path.to_path_buf(),
        },
        _ => ClientError::Io {
            path: path.to_path_buf(),
            source,
        },
    };
    let exchange = async {
        let mut stream = UnixStream::connect(path).await.map_err(io)?;
        stream
            .write_all(&encode_request(request))
            .await
            .map_err(io)?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.map_err(io)?;
        parse_reply(answer.trim_ascii()).map_err(|e| ClientError::BadAnswer(e.to_string()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_line() {
        for r in [
            ControlRequest::Status,
            ControlRequest::List,
            ControlRequest::Show { id: "k/1".into() },
            ControlRequest::Cancel { id: "k/2".into() },
            ControlRequest::Resolve {
                id: "k/3".into(),
                outcome: Outcome::Declined,
            },
        ] {
            let line = encode_request(&r);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(parse_request(&line).expect("parses"), r);
        }
        let line = encode_request(&ControlRequest::Resolve {
            id: "k/3".into(),
            outcome: Outcome::Approved,
        });
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v":1,"op":"resolve","id":"k/3","outcome":"approved"})
        );
    }

    #[test]
    fn a_bad_line_or_version_is_a_bad_request() {
        for line in [
            &b"nope"[..],
            br#"{"op":"status"}"#,
            br#"{"v":2,"op":"status"}"#,
            br#"{"v":1,"op":"explode"}"#,
            br#"{"v":1,"op":"show"}"#,
        ] {
            match parse_request(line) {
                Err(f) => assert_eq!(f.code, FailureCode::BadRequest),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(line)),
            }
        }
    }

    #[test]
    fn replies_round_trip_through_their_line() {
        let row = RequestRow {
            id: "k/1".into(),
            station: "k".into(),
            request_id: "1".into(),
            kind: CommandType::Charge,
            state: "waiting".into(),
            is_final: false,
            age_s: 3,
            terminal: Some("T".into()),
            amount: Some("1.00".into()),
            detail: Some("terminal_busy".into()),
            target: None,
        };
        for reply in [
            ControlReply::List(ListView {
                requests: vec![row.clone()],
            }),
            ControlReply::Changed(ChangeView {
                request: row.clone(),
                message: "m".into(),
            }),
            ControlReply::Show(RequestDetail {
                row,
                received_at: "t".into(),
                final_at: None,
                deadline_at: None,
                stage: Some("queued".into()),
                external_reference: None,
                reply_topic: None,
                command: serde_json::json!({"a":1}),
                events: vec![serde_json::json!({"state":"accepted"})],
            }),
            ControlReply::error(FailureCode::NotFound, "no"),
        ] {
            let line = encode_reply(&reply);
            assert_eq!(parse_reply(line.trim_ascii()).expect("parses"), reply);
        }
        let v: serde_json::Value = serde_json::from_slice(&encode_reply(&ControlReply::error(
            FailureCode::NotAllowed,
            "x",
        )))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v":1,"answer":"error","code":"not_allowed","message":"x"})
        );
    }

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
