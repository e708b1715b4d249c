//! The shared HTTP client of the Point backends: rustls only, built-in web roots plus
//! `point.extra_ca_file`, bearer token from its file, per-request timeout, and every
//! failure mapped to `ApiError` with status, Mercado Pago's error body and `x-request-id`.
//!
//! Trust. The rustls `ClientConfig` is built here, not by reqwest: its roots are exactly
//! the webpki-roots set compiled into the binary (Mozilla's list) plus the PEM
//! certificates of `point.extra_ca_file` (the simulator's CA, a store's TLS-inspecting
//! proxy). The machine's CA bundle is never consulted, so what the agent trusts does not
//! change with the box's `ca-certificates` package, and the tests exercise the same
//! verifier as production. The crypto provider is ring, passed explicitly to the config;
//! the process-wide default is also installed (idempotently) for other rustls users.
//!
//! Invariants:
//! - The token only ever travels over TLS to `base_url`'s host: the base URL must be
//!   `https`, the client is `https_only`, and redirects are not followed (a 3xx is an
//!   `ApiError::Status`), so the `Authorization` header cannot be replayed elsewhere.
//!   An `HTTPS_PROXY` from the environment is honoured; TLS then runs end to end
//!   through the proxy's CONNECT tunnel.
//! - The token is never logged nor shown by `Debug` (`<redacted>`), and its header is
//!   marked sensitive. A token file that is group- or world-writable or world-readable is
//!   refused, at start and on `reload_token`.
//! - `ApiError::Connect` only for failures where no request byte can have reached the
//!   server (TCP connect, DNS, TLS handshake, connect timeout). Everything that fails
//!   after that point is `NoAnswer`, which callers treat as ambiguous.
//! - Ids go into URLs as single percent-encoded path segments; an empty, `.` or `..`
//!   segment is refused (the `url` crate would silently drop the last two).

// `ApiError` (the shared seam in `point`) is large because `Status` keeps everything an
// operator needs; errors are rare next to the request they describe, so it is not boxed.
#![allow(clippy::result_large_err)]

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, Url};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use time::format_description::well_known::Rfc2822;
use time::OffsetDateTime;

use crate::config::PointSection;
use crate::point::{ApiError, MpErrorBody};

/// `User-Agent` of every request.
pub const USER_AGENT: &str = concat!("pointgate/", env!("CARGO_PKG_VERSION"));

/// How much of a non-2xx body `ApiError::Status::raw_body` keeps.
pub const MAX_RAW_BODY: usize = 2 * 1024;
/// How much of a non-2xx body is read to parse Mercado Pago's error object.
const MAX_ERROR_BODY_READ: usize = 64 * 1024;
/// Larger 2xx bodies are refused as `Decode` (a device list or a payment is far smaller).
const MAX_SUCCESS_BODY: usize = 8 * 1024 * 1024;
/// Token files are a few hundred bytes; this bounds what a wrong path could make us read.
const MAX_TOKEN_FILE: u64 = 16 * 1024;
/// Idle pooled connections are dropped before a server is likely to close them, so that a
/// request rarely lands on a connection the server is closing (that would be `NoAnswer`).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// What the client is built from. `HttpConfig::from_point` takes it from `[point]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// `https://api.mercadopago.com`, or the simulator. Must be `https`.
    pub base_url: String,
    pub token_file: PathBuf,
    /// PEM certificates trusted besides the built-in web roots.
    pub extra_ca_file: Option<PathBuf>,
    /// Whole-request timeout (connect, send, answer).
    pub request_timeout: Duration,
}

impl HttpConfig {
    /// The `[point]` section's values; an empty `extra_ca_file` means none.
    pub fn from_point(point: &PointSection) -> Self {
        let extra = &point.extra_ca_file;
        HttpConfig {
            base_url: point.base_url.clone(),
            token_file: point.access_token_file.clone(),
            extra_ca_file: (!extra.as_os_str().is_empty()).then(|| extra.clone()),
            request_timeout: point.request_timeout,
        }
    }
}

/// Why the client could not be built. Each message names the config key at fault.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SetupError {
    /// The token file is missing, unreadable, too open, empty or not a header value.
    #[error("point.access_token_file: {0}")]
    Token(String),
    #[error("point.extra_ca_file {path}: {message}")]
    ExtraCa { path: PathBuf, message: String },
    #[error("point.base_url {url:?}: {message}")]
    BaseUrl { url: String, message: String },
    /// reqwest or rustls refused the configuration (not expected with these settings).
    #[error("HTTP client: {0}")]
    Client(String),
}

/// The `Authorization: Bearer ...` header value. Debug never shows it.
#[derive(Clone)]
struct BearerHeader(HeaderValue);

impl std::fmt::Debug for BearerHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The HTTP client shared by the Point backends. Cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: reqwest::Client,
    base_url: Url,
    token_file: PathBuf,
    /// Replaced whole by `reload_token`; never held across an `.await`.
    bearer: RwLock<BearerHeader>,
}

impl HttpClient {
    /// Builds the client and reads the token file once.
    pub fn new(config: &HttpConfig) -> Result<HttpClient, SetupError> {
        // Err only means a provider is already installed (ours or another's): fine,
        // because the config below names its provider explicitly anyway.
        let _ = rustls::crypto::ring::default_provider().install_default();

        let base_url = parse_base_url(&config.base_url)?;
        let tls = tls_config(config.extra_ca_file.as_deref())?;
        let bearer = read_token(&config.token_file).map_err(SetupError::Token)?;

        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .timeout(config.request_timeout)
            // Below the whole-request timeout, so that a stalled connect or handshake
            // ends as a connect error (nothing sent) rather than an ambiguous timeout.
            .connect_timeout(config.request_timeout / 2)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build()
            .map_err(|e| SetupError::Client(error_chain(&e)))?;

        Ok(HttpClient {
            inner: Arc::new(Inner {
                client,
                base_url,
                token_file: config.token_file.clone(),
                bearer: RwLock::new(bearer),
            }),
        })
    }

    /// Re-reads the token file (SIGHUP). On error the previous token stays in use.
    pub fn reload_token(&self) -> Result<(), ApiError> {
        let fresh = read_token(&self.inner.token_file).map_err(ApiError::Token)?;
        let mut slot = self.inner.bearer.write().unwrap_or_else(|p| p.into_inner());
        *slot = fresh;
        tracing::info!(file = %self.inner.token_file.display(), "access token reloaded");
        Ok(())
    }

    /// The base URL requests are made against.
    pub fn base_url(&self) -> &Url {
        &self.inner.base_url
    }

    /// `base_url` followed by `segments`, each percent-encoded as one path segment
    /// (`/` inside an id becomes `%2F`). Refuses empty, `.` and `..` segments.
    pub fn url(&self, segments: &[&str]) -> Result<Url, ApiError> {
        if let Some(bad) = segments.iter().find(|s| matches!(**s, "" | "." | "..")) {
            return Err(ApiError::Invalid(format!(
                "refusing {bad:?} as a URL path segment"
            )));
        }
        let mut url = self.inner.base_url.clone();
        // `path_segments_mut` fails only for cannot-be-a-base URLs; `parse_base_url`
        // admitted only https URLs with a host, which always can be a base.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        Ok(url)
    }

    /// `url(segments)` with a query string, each pair form-encoded.
    pub fn url_with_query(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<Url, ApiError> {
        let mut url = self.url(segments)?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// `GET url`, the 2xx body decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, url: Url) -> Result<T, ApiError> {
        self.send(Method::GET, url, None, None).await
    }

    /// `POST url` with a JSON body.
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        url: Url,
        body: &B,
    ) -> Result<T, ApiError> {
        let body = encode(body)?;
        self.send(Method::POST, url, Some(body), None).await
    }

    /// `POST url` with a JSON body and an `X-Idempotency-Key` header.
    pub async fn post_idempotent<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        url: Url,
        body: &B,
        idempotency_key: &str,
    ) -> Result<T, ApiError> {
        let body = encode(body)?;
        self.send(Method::POST, url, Some(body), Some(idempotency_key))
            .await
    }

    /// `PATCH url` with a JSON body.
    pub async fn patch<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        url: Url,
        body: &B,
    ) -> Result<T, ApiError> {
        let body = encode(body)?;
        self.send(Method::PATCH, url, Some(body), None).await
    }

    /// `DELETE url`.
    pub async fn delete<T: DeserializeOwned>(&self, url: Url) -> Result<T, ApiError> {
        self.send(Method::DELETE, url, None, None).await
    }

    /// One request. An empty 2xx body (204) is decoded as JSON `null`, so `T = ()` or
    /// `Option<_>` accept it.
    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        idempotency_key: Option<&str>,
    ) -> Result<T, ApiError> {
        let method_name = method_name(&method);
        let path = url.path().to_string();
        let bearer = self
            .inner
            .bearer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone();

        let mut request = self
            .inner
            .client
            .request(method, url)
            .header(AUTHORIZATION, bearer);
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        if let Some(key) = idempotency_key {
            let value = HeaderValue::from_str(key).map_err(|_| {
                ApiError::Invalid("idempotency key is not a valid header value".to_string())
            })?;
            request = request.header("X-Idempotency-Key", value);
        }

        let started = Instant::now();
        let response = request.send().await.map_err(|e| {
            let err = classify_send_error(method_name, &path, &e);
            tracing::warn!(method = method_name, path = %path, error = %err, "api request failed");
            err
        })?;
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        tracing::debug!(
            method = method_name,
            path = %path,
            status = status.as_u16(),
            api_request_id = request_id.as_deref().unwrap_or(""),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "api answered"
        );

        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, OffsetDateTime::now_utc()));
            // The status is the answer; a body cut short only loses detail.
            let raw = read_capped(response, MAX_ERROR_BODY_READ)
                .await
                .unwrap_or_else(|e| e.partial);
            return Err(ApiError::Status {
                method: method_name,
                path,
                status: status.as_u16(),
                body: parse_error_body(&raw),
                raw_body: truncate_lossy(&raw, MAX_RAW_BODY),
                request_id,
                retry_after,
            });
        }

        let bytes = read_capped(response, MAX_SUCCESS_BODY)
            .await
            .map_err(|e| match e.kind {
                ReadErrorKind::TooLarge => ApiError::Decode {
                    method: method_name,
                    path: path.clone(),
                    message: format!("answer larger than {MAX_SUCCESS_BODY} bytes"),
                },
                ReadErrorKind::Io(message) => ApiError::NoAnswer {
                    method: method_name,
                    path: path.clone(),
                    message,
                },
            })?;
        decode_json(&bytes).map_err(|message| ApiError::Decode {
            method: method_name,
            path,
            message,
        })
    }
}

/// Decodes a 2xx body; an empty (or all-blank) body reads as `null`.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"null".as_slice()
    } else {
        bytes
    };
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

fn encode<B: Serialize + ?Sized>(body: &B) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(body).map_err(|e| ApiError::Invalid(format!("request body: {e}")))
}

fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

/// Connect-phase failures (nothing sent) versus the rest (maybe sent: ambiguous).
fn classify_send_error(method: &'static str, path: &str, e: &reqwest::Error) -> ApiError {
    let message = error_chain(e);
    let path = path.to_string();
    if e.is_connect() {
        ApiError::Connect {
            method,
            path,
            message,
        }
    } else if e.is_builder() {
        // reqwest refused the request before any IO (e.g. a non-https URL).
        ApiError::Invalid(format!("{method} {path}: {message}"))
    } else {
        ApiError::NoAnswer {
            method,
            path,
            message,
        }
    }
}

/// An error and its sources on one line (reqwest's own Display hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

struct ReadError {
    kind: ReadErrorKind,
    /// What arrived before the failure.
    partial: Vec<u8>,
}

enum ReadErrorKind {
    TooLarge,
    Io(String),
}

/// Reads the body, up to `cap` bytes.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if out.len() + chunk.len() > cap {
                    let room = cap - out.len();
                    out.extend_from_slice(&chunk[..room]);
                    return Err(ReadError {
                        kind: ReadErrorKind::TooLarge,
                        partial: out,
                    });
                }
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(out),
            Err(e) => {
                return Err(ReadError {
                    kind: ReadErrorKind::Io(error_chain(&e)),
                    partial: out,
                })
            }
        }
    }
}

/// Mercado Pago's error object, read leniently: any of `message`, `error`, `status`,
/// `cause` may be missing or of another type; a body that is not a JSON object gives the
/// empty `MpErrorBody` (the raw text is kept separately).
pub fn parse_error_body(raw: &[u8]) -> MpErrorBody {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(raw)
    else {
        return MpErrorBody::default();
    };
    let text = |key: &str| match map.get(key) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    let status = match map.get("status") {
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    let cause = match map.get("cause") {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => Some(value.to_string()),
    };
    MpErrorBody {
        message: text("message"),
        error: text("error"),
        status,
        cause,
    }
}

/// `Retry-After` as delta-seconds or an HTTP date (IMF-fixdate, as RFC 2822 parses it).
/// A date in the past gives zero. Anything else is ignored (`None`).
pub fn parse_retry_after(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = OffsetDateTime::parse(value, &Rfc2822).ok()?;
    Some(Duration::try_from(when - now).unwrap_or(Duration::ZERO))
}

/// At most `max` bytes of `raw` as text, cut at a character boundary.
fn truncate_lossy(raw: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(raw);
    if text.len() <= max {
        return text.into_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn parse_base_url(raw: &str) -> Result<Url, SetupError> {
    let fail = |message: &str| SetupError::BaseUrl {
        url: raw.to_string(),
        message: message.to_string(),
    };
    let url = Url::parse(raw).map_err(|e| fail(&e.to_string()))?;
    if url.scheme() != "https" {
        return Err(fail(
            "must be an https URL: the access token is never sent in clear",
        ));
    }
    if url.host().is_none() || url.cannot_be_a_base() {
        return Err(fail("needs a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(fail("must not have a query or fragment"));
    }
    Ok(url)
}

/// The rustls client config: webpki roots plus the extra CA file, ring, TLS 1.2 and 1.3.
fn tls_config(extra_ca_file: Option<&Path>) -> Result<rustls::ClientConfig, SetupError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca_file {
        let fail = |message: String| SetupError::ExtraCa {
            path: path.to_path_buf(),
            message,
        };
        let mut added = 0usize;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| fail(e.to_string()))? {
            let cert = cert.map_err(|e| fail(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| fail(format!("not a usable CA certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(fail("holds no PEM certificate".to_string()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // reqwest is built without HTTP/2.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// Reads, checks and trims the token; returns the ready `Authorization` value. Error
/// messages name the file and never include its content.
fn read_token(path: &Path) -> Result<BearerHeader, String> {
    let shown = path.display();
    let file = File::open(path).map_err(|e| format!("cannot open {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 || mode & 0o004 != 0 {
        return Err(format!(
            "{shown} has mode {mode:04o}: a token file must not be group- or world-writable \
             nor world-readable (chmod 600 or 640)"
        ));
    }
    let mut content = String::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut content)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if content.len() as u64 > MAX_TOKEN_FILE {
        return Err(format!("{shown} is larger than {MAX_TOKEN_FILE} bytes"));
    }
    let token = content.trim();
    if token.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| format!("{shown} holds characters not allowed in an HTTP header"))?;
    value.set_sensitive(true);
    Ok(BearerHeader(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use time::macros::datetime;

    fn token_file(content: &str, mode: u32) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    fn client(token: &tempfile::NamedTempFile, base: &str) -> HttpClient {
        HttpClient::new(&HttpConfig {
            base_url: base.to_string(),
            token_file: token.path().to_path_buf(),
            extra_ca_file: None,
            request_timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    #[test]
    fn token_is_trimmed_and_never_shown_by_debug() {
        let f = token_file("  APP_USR-canary-123\n", 0o600);
        let c = client(&f, "https://api.mercadopago.com");
        let shown = format!("{c:?}");
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        let bearer = c.inner.bearer.read().unwrap().0.clone();
        assert_eq!(bearer.to_str().unwrap(), "Bearer APP_USR-canary-123");
        assert!(bearer.is_sensitive());
    }

    #[test]
    fn token_file_modes_follow_the_contract() {
        for (mode, ok) in [
            (0o600, true),
            (0o640, true),
            (0o400, true),
            (0o644, false),
            (0o620, false),
            (0o602, false),
            (0o660, false),
            (0o604, false),
        ] {
            let f = token_file("s3cr3t", mode);
            let got = read_token(f.path());
            assert_eq!(got.is_ok(), ok, "mode {mode:o}: {got:?}");
            if let Err(message) = got {
                assert!(!message.contains("s3cr3t"), "{message}");
            }
        }
    }

    #[test]
    fn empty_or_missing_token_file_is_refused() {
        let f = token_file(" \n", 0o600);
        assert!(read_token(f.path()).unwrap_err().contains("empty"));
        assert!(read_token(Path::new("/nonexistent/token"))
            .unwrap_err()
            .contains("cannot open"));
        let f = token_file("bad\ntoken", 0o600);
        let message = read_token(f.path()).unwrap_err();
        assert!(message.contains("not allowed"), "{message}");
        assert!(!message.contains("bad"), "{message}");
    }

    #[test]
    fn reload_token_keeps_the_old_token_when_the_new_file_is_refused() {
        let f = token_file("first", 0o600);
        let c = client(&f, "https://api.mercadopago.com");
        std::fs::write(f.path(), "second\n").unwrap();
        c.reload_token().unwrap();
        assert_eq!(
            c.inner.bearer.read().unwrap().0.to_str().unwrap(),
            "Bearer second"
        );
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(f.path(), "third\n").unwrap();
        assert!(matches!(c.reload_token(), Err(ApiError::Token(_))));
        assert_eq!(
            c.inner.bearer.read().unwrap().0.to_str().unwrap(),
            "Bearer second"
        );
    }

    #[test]
    fn base_url_must_be_https_with_a_host() {
        assert!(parse_base_url("https://api.mercadopago.com").is_ok());
        assert!(parse_base_url("https://127.0.0.1:8443/prefix/").is_ok());
        assert!(parse_base_url("http://api.mercadopago.com").is_err());
        assert!(parse_base_url("https://x/?a=b").is_err());
        assert!(parse_base_url("mailto:a@b").is_err());
    }

    #[test]
    fn extra_ca_file_without_certificates_is_refused() {
        let f = token_file("not a pem", 0o600);
        assert!(matches!(
            tls_config(Some(f.path())),
            Err(SetupError::ExtraCa { .. })
        ));
        assert!(matches!(
            tls_config(Some(Path::new("/nonexistent.pem"))),
            Err(SetupError::ExtraCa { .. })
        ));
        assert!(tls_config(None).is_ok());
    }

    #[test]
    fn ids_are_one_percent_encoded_path_segment() {
        let f = token_file("t", 0o600);
        let c = client(&f, "https://api.mercadopago.com");
        let url = c
            .url(&["point", "integration-api", "devices", "a/b c?#%\\x"])
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://api.mercadopago.com/point/integration-api/devices/a%2Fb%20c%3F%23%25%5Cx"
        );
        for bad in ["", ".", ".."] {
            assert!(
                matches!(c.url(&["devices", bad]), Err(ApiError::Invalid(_))),
                "{bad:?}"
            );
        }
        let c = client(&f, "https://sim.local:8443/base/");
        let url = c
            .url_with_query(
                &["v1", "payments", "search"],
                &[("external_reference", "a&b=c")],
            )
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://sim.local:8443/base/v1/payments/search?external_reference=a%26b%3Dc"
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = datetime!(2026-11-05 12:00:00 UTC);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Thu, 05 Nov 2026 12:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Thu, 05 Nov 2026 11:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
    }

    #[test]
    fn error_bodies_are_read_leniently() {
        let body = br#"{"message":"channel not allowed. Supported channels are: email","error":"bad_request","status":400,"cause":[]}"#;
        assert_eq!(
            parse_error_body(body),
            MpErrorBody {
                message: Some("channel not allowed. Supported channels are: email".into()),
                error: Some("bad_request".into()),
                status: Some(400),
                cause: Some("[]".into()),
            }
        );
        let odd = br#"{"message":null,"error":404,"status":"409","cause":{"code":"x","description":"y"},"extra":1}"#;
        let parsed = parse_error_body(odd);
        assert_eq!(parsed.message, None);
        assert_eq!(parsed.error.as_deref(), Some("404"));
        assert_eq!(parsed.status, Some(409));
        assert_eq!(
            parsed.cause.as_deref(),
            Some(r#"{"code":"x","description":"y"}"#)
        );
        assert_eq!(
            parse_error_body(b"<html>502 Bad Gateway</html>"),
            MpErrorBody::default()
        );
        assert_eq!(parse_error_body(b""), MpErrorBody::default());
        assert_eq!(parse_error_body(b"[1,2]"), MpErrorBody::default());
        assert_eq!(parse_error_body(br#"{"status":70000}"#).status, None);
    }

    #[test]
    fn raw_body_is_cut_at_a_character_boundary() {
        let long = "é".repeat(2000);
        let cut = truncate_lossy(long.as_bytes(), MAX_RAW_BODY);
        assert_eq!(cut.len(), MAX_RAW_BODY);
        let cut = truncate_lossy(format!("x{long}").as_bytes(), MAX_RAW_BODY);
        assert_eq!(cut.len(), MAX_RAW_BODY - 1);
        assert_eq!(truncate_lossy(b"\xff ok", 10), "\u{fffd} ok");
    }

    #[test]
    fn empty_success_body_decodes_as_null() {
        decode_json::<()>(b"").unwrap();
        assert_eq!(decode_json::<Option<u8>>(b" \n").unwrap(), None);
        assert!(decode_json::<u8>(b"{").is_err());
    }
}
