//! The control socket's server: binds the socket (mode 0660), serves one short task per
//! connection, and asks the engine (through its port) for every answer.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::protocol::{encode_reply, parse_request, MAX_LINE};
use crate::domain::operator::{ControlReply, ControlRequest, FailureCode};
use crate::engine::port::{EngineHandle, ToEngine};

/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server waits for the engine's answer.
pub const ENGINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait.
const MAX_CONNECTIONS: usize = 8;
/// The socket's mode: owner and group.
const SOCKET_MODE: u32 = 0o660;

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
