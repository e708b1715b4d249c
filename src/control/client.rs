//! The control socket's client: `pointgate status` and `pointgate queue`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::protocol::{encode_request, parse_reply};
use crate::domain::operator::{ControlReply, ControlRequest};

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
