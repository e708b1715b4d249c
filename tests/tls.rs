//! T1 of the reliability guide: bad TLS at the API is refused and the token is never
//! sent. Each test starts a small rustls HTTPS server (a std thread, `rustls::StreamOwned`)
//! on 127.0.0.1:0 with rcgen certificates, points the real `HttpClient` at it, and reads
//! back what the server saw: whether a TLS session completed, and every plaintext byte
//! that arrived. The positive control proves the recorder does see a request and its
//! bearer token when the certificate is good. The last tests use the same server to check
//! how failures after the handshake are classified (status, no answer, timeout, decode).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use pointgate::money::{Cents, Site};
use pointgate::point::http::{HttpClient, HttpConfig};
use pointgate::point::integrations::IntegrationsClient;
use pointgate::point::{ApiError, CreateCharge, Phase, PointBackend};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const TOKEN: &str = "APP_USR-canary-7f3a9e1c";
const WAIT: Duration = Duration::from_secs(10);

/// What the server saw on one connection.
#[derive(Debug, Default)]
struct Seen {
    handshake_done: bool,
    /// Every plaintext byte received (the request head, if one came).
    plaintext: Vec<u8>,
    tls_error: Option<String>,
}

/// What the server does once a request head has arrived.
#[derive(Clone)]
enum Reply {
    /// Answer with this raw HTTP response.
    Raw(String),
    /// Close the connection without answering.
    Close,
    /// Say nothing, keeping the connection open.
    Stall,
}

struct Server {
    port: u16,
    seen: mpsc::Receiver<Seen>,
}

impl Server {
    fn start(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        reply: Reply,
    ) -> Server {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, seen) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let seen = serve_one(stream, config.clone(), reply.clone());
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        Server { port, seen }
    }

    /// The record of the next connection, waiting for it (never a fixed sleep).
    fn next(&self) -> Seen {
        self.seen
            .recv_timeout(WAIT)
            .expect("the client never connected")
    }
}

fn serve_one(tcp: TcpStream, config: Arc<rustls::ServerConfig>, reply: Reply) -> Seen {
    let mut seen = Seen::default();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let conn = rustls::ServerConnection::new(config).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        match tls.conn.complete_io(&mut tls.sock) {
            Ok((0, 0)) => {
                seen.tls_error = Some("eof during handshake".into());
                return seen;
            }
            Ok(_) => {}
            Err(e) => {
                seen.tls_error = Some(e.to_string());
                return seen;
            }
        }
    }
    seen.handshake_done = true;
    let mut buf = [0u8; 4096];
    while !request_complete(&seen.plaintext) {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return seen,
            Ok(n) => seen.plaintext.extend_from_slice(&buf[..n]),
        }
    }
    match reply {
        Reply::Raw(response) => {
            let _ = tls.write_all(response.as_bytes());
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
        Reply::Close => {}
        Reply::Stall => {
            // Hold the connection open, unanswered, while the record goes back now.
            std::thread::spawn(move || {
                let _ = tls.read(&mut [0u8; 1]);
            });
        }
    }
    seen
}

/// The head has arrived, and as many body bytes as its `content-length` says.
fn request_complete(bytes: &[u8]) -> bool {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    bytes.len() >= end + 4 + length
}

/// The request as text: head lowercased (header names vary in case), body as sent.
fn split_request(bytes: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_ascii_lowercase(), body.to_string())
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(params, key),
        pem,
    }
}

enum Signer<'a> {
    Ca(&'a Ca),
    SelfSigned,
}

fn leaf(
    names: &[&str],
    signer: Signer<'_>,
    expired: bool,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = match signer {
        Signer::Ca(ca) => params.signed_by(&key, &ca.issuer).unwrap(),
        Signer::SelfSigned => params.self_signed(&key).unwrap(),
    };
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (vec![cert.der().clone()], key)
}

struct Files {
    _dir: tempfile::TempDir,
    token: std::path::PathBuf,
    ca: std::path::PathBuf,
}

fn files(trusted: &Ca) -> Files {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("access_token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ca = dir.path().join("extra-ca.pem");
    std::fs::write(&ca, &trusted.pem).unwrap();
    Files {
        _dir: dir,
        token,
        ca,
    }
}

fn client(host: &str, port: u16, files: &Files, extra_ca: bool, timeout: Duration) -> HttpClient {
    HttpClient::new(&HttpConfig {
        base_url: format!("https://{host}:{port}"),
        token_file: files.token.clone(),
        extra_ca_file: extra_ca.then(|| files.ca.clone()),
        request_timeout: timeout,
    })
    .unwrap()
}

async fn ping(client: &HttpClient) -> Result<serde_json::Value, ApiError> {
    client.get(client.url(&["ping"]).unwrap()).await
}

/// The client must fail with `Connect`, and the server must have seen no TLS session and
/// no plaintext byte: the token never left.
async fn assert_refused(server: &Server, client: &HttpClient) {
    let err = ping(client)
        .await
        .expect_err("the client accepted a bad certificate");
    assert!(
        matches!(err, ApiError::Connect { .. }),
        "expected Connect, got {err:?}"
    );
    assert!(!err.is_ambiguous());
    let seen = server.next();
    assert!(!seen.handshake_done, "a TLS session completed: {seen:?}");
    assert!(
        seen.plaintext.is_empty(),
        "the server received plaintext: {seen:?}"
    );
    assert!(!String::from_utf8_lossy(&seen.plaintext).contains(TOKEN));
    assert!(!err.to_string().contains(TOKEN));
}

#[tokio::test]
async fn self_signed_certificate_is_refused_and_the_token_never_sent() {
    let trusted = ca("pointgate test CA");
    let f = files(&trusted);
    let (chain, key) = leaf(&["localhost"], Signer::SelfSigned, false);
    let server = Server::start(chain, key, ok());
    assert_refused(&server, &client("localhost", server.port, &f, true, WAIT)).await;
}

#[tokio::test]
async fn certificate_for_another_host_is_refused_and_the_token_never_sent() {
    let trusted = ca("pointgate test CA");
    let f = files(&trusted);
    let (chain, key) = leaf(&["api.mercadopago.com"], Signer::Ca(&trusted), false);
    let server = Server::start(chain, key, ok());
    assert_refused(&server, &client("localhost", server.port, &f, true, WAIT)).await;
}

#[tokio::test]
async fn expired_certificate_is_refused_and_the_token_never_sent() {
    let trusted = ca("pointgate test CA");
    let f = files(&trusted);
    let (chain, key) = leaf(&["localhost"], Signer::Ca(&trusted), true);
    let server = Server::start(chain, key, ok());
    assert_refused(&server, &client("localhost", server.port, &f, true, WAIT)).await;
}

#[tokio::test]
async fn certificate_from_an_unknown_ca_is_refused_and_the_token_never_sent() {
    let trusted = ca("pointgate test CA");
    let stranger = ca("someone else's CA");
    let f = files(&trusted);
    let (chain, key) = leaf(&["localhost"], Signer::Ca(&stranger), false);
    let server = Server::start(chain, key, ok());
    assert_refused(&server, &client("localhost", server.port, &f, true, WAIT)).await;
}

#[tokio::test]
async fn without_extra_ca_file_only_the_built_in_roots_are_trusted() {
    let trusted = ca("pointgate test CA");
    let f = files(&trusted);
    let (chain, key) = leaf(&["localhost"], Signer::Ca(&trusted), false);
    let server = Server::start(chain, key, ok());
    assert_refused(&server, &client("localhost", server.port, &f, false, WAIT)).await;
}

/// A complete HTTP/1.1 response that closes the connection.
fn response(status: &str, headers: &[&str], body: &str) -> Reply {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    Reply::Raw(out)
}

fn ok() -> Reply {
    response(
        "200 OK",
        &["content-type: application/json"],
        r#"{"ok":true}"#,
    )
}

#[tokio::test]
async fn valid_certificate_from_the_trusted_ca_gets_the_request_with_the_bearer_token() {
    let trusted = ca("pointgate test CA");
    let f = files(&trusted);
    let (chain, key) = leaf(&["localhost"], Signer::Ca(&trusted), false);
    let server = Server::start(chain, key, ok());
    let answer = ping(&client("localhost", server.port, &f, true, WAIT))
        .await
        .unwrap();
    assert_eq!(answer, serde_json::json!({"ok": true}));
    let seen = server.next();
    assert!(seen.handshake_done);
    let head = String::from_utf8_lossy(&seen.plaintext).to_ascii_lowercase();
    assert!(head.starts_with("get /ping http/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!(
            "authorization: bearer {}\r\n",
            TOKEN.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(
        head.contains(&format!(
            "user-agent: pointgate/{}\r\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{head}"
    );
}

#[tokio::test]
async fn connection_refused_is_a_connect_error() {
    let trusted = ca("pointgate test CA");
    let f = files(&trusted);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = ping(&client("127.0.0.1", port, &f, true, WAIT))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Connect { .. }), "{err:?}");
}

fn good_server(reply: Reply) -> (Server, Files) {
    let trusted = ca("pointgate test CA");
    let f = files(&trusted);
    let (chain, key) = leaf(&["localhost"], Signer::Ca(&trusted), false);
    (Server::start(chain, key, reply), f)
}

#[tokio::test]
async fn error_status_keeps_body_request_id_and_retry_after() {
    let busy = response(
        "429 Too Many Requests",
        &[
            "content-type: application/json",
            "x-request-id: req-123",
            "retry-after: 7",
        ],
        r#"{"message":"slow down","error":"too_many_requests","status":429,"cause":[]}"#,
    );
    let (server, f) = good_server(busy);
    let err = ping(&client("localhost", server.port, &f, true, WAIT))
        .await
        .unwrap_err();
    let ApiError::Status {
        status,
        body,
        raw_body,
        request_id,
        retry_after,
        method,
        path,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!((*status, *method, path.as_str()), (429, "GET", "/ping"));
    assert_eq!(body.message.as_deref(), Some("slow down"));
    assert_eq!(body.cause.as_deref(), Some("[]"));
    assert!(raw_body.starts_with("{\"message\""));
    assert_eq!(request_id.as_deref(), Some("req-123"));
    assert_eq!(*retry_after, Some(Duration::from_secs(7)));
    assert!(err.is_unreachable());
    server.next();
}

#[tokio::test]
async fn non_json_error_body_is_kept_raw() {
    let (server, f) = good_server(response(
        "502 Bad Gateway",
        &["content-type: text/html"],
        "<html>upstream</html",
    ));
    let err = ping(&client("localhost", server.port, &f, true, WAIT))
        .await
        .unwrap_err();
    let ApiError::Status {
        status,
        body,
        raw_body,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!((*status, raw_body.as_str()), (502, "<html>upstream</html"));
    assert_eq!(body, &Default::default());
    assert!(err.is_ambiguous());
    server.next();
}

#[tokio::test]
async fn connection_closed_after_the_request_is_no_answer() {
    let (server, f) = good_server(Reply::Close);
    let err = ping(&client("localhost", server.port, &f, true, WAIT))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::NoAnswer { .. }), "{err:?}");
    assert!(err.is_ambiguous());
    assert!(server.next().handshake_done);
}

#[tokio::test]
async fn silence_after_the_request_is_no_answer_at_the_timeout() {
    let (server, f) = good_server(Reply::Stall);
    let err = ping(&client(
        "localhost",
        server.port,
        &f,
        true,
        Duration::from_millis(800),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, ApiError::NoAnswer { .. }), "{err:?}");
    assert!(server.next().handshake_done);
}

#[tokio::test]
async fn unreadable_success_body_is_a_decode_error() {
    let (server, f) = good_server(response(
        "200 OK",
        &["content-type: application/json"],
        "{oops",
    ));
    let err = ping(&client("localhost", server.port, &f, true, WAIT))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Decode { .. }), "{err:?}");
    assert!(err.is_ambiguous());
    server.next();
}

// The Integrations client over the same server: paths, headers and bodies as sent.

fn integrations(server: &Server, f: &Files, site: Site) -> IntegrationsClient {
    IntegrationsClient::new(client("localhost", server.port, f, true, WAIT), site)
}

#[tokio::test]
async fn create_charge_posts_the_site_body_to_the_encoded_device_path() {
    let answer =
        r#"{"id":"7d8c70b6-2ac8-4c57-a441-c319088ca3ca","device_id":"PAX/1","amount":1500}"#;
    let (server, f) = good_server(response(
        "200 OK",
        &["content-type: application/json"],
        answer,
    ));
    let req = CreateCharge {
        terminal: "PAX/1".into(),
        amount: Cents(1500),
        external_reference: "ref-1".into(),
        description: Some("not on MLA".into()),
        ticket_number: Some("T-1".into()),
        print_on_terminal: true,
        payment: None,
        idempotency_key: None,
    };
    let charge = integrations(&server, &f, Site::MLA)
        .create_charge(&req)
        .await
        .unwrap();
    assert_eq!(
        (charge.id.as_str(), charge.phase, charge.raw_state.as_str()),
        ("7d8c70b6-2ac8-4c57-a441-c319088ca3ca", Phase::Open, "OPEN")
    );
    let (head, body) = split_request(&server.next().plaintext);
    assert!(
        head.starts_with(
            "post /point/integration-api/devices/pax%2f1/payment-intents http/1.1\r\n"
        ),
        "{head}"
    );
    assert!(
        head.contains("\r\ncontent-type: application/json"),
        "{head}"
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"amount":1500,"additional_info":{"external_reference":"ref-1","print_on_terminal":true,"ticket_number":"T-1"}})
    );
}

#[tokio::test]
async fn an_invalid_charge_is_never_sent() {
    let (server, f) = good_server(ok());
    let req = CreateCharge {
        terminal: "PAX_1".into(),
        amount: Cents(1500),
        external_reference: "ref-1".into(),
        description: None,
        ticket_number: None,
        print_on_terminal: true,
        payment: None,
        idempotency_key: None,
    };
    let err = integrations(&server, &f, Site::MLA)
        .create_charge(&req)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Invalid(_)), "{err:?}");
    assert!(
        server.seen.try_recv().is_err(),
        "a request reached the server"
    );
}

#[tokio::test]
async fn intent_list_answering_404_means_not_served() {
    let (server, f) = good_server(response(
        "404 Not Found",
        &["content-type: application/json"],
        r#"{"message":"Payment intent doesn't exist"}"#,
    ));
    let day = time::macros::date!(2026 - 11 - 05);
    let listed = integrations(&server, &f, Site::MLB)
        .list_charges_on(day)
        .await
        .unwrap();
    assert_eq!(listed, None);
    let (head, _) = split_request(&server.next().plaintext);
    assert!(head.starts_with("get /point/integration-api/payment-intents/events?startdate=2026-11-05&enddate=2026-11-05 http/1.1\r\n"), "{head}");
}

#[tokio::test]
async fn intent_list_answering_500_is_an_error() {
    let (server, f) = good_server(response("500 Internal Server Error", &[], ""));
    let day = time::macros::date!(2026 - 11 - 05);
    let err = integrations(&server, &f, Site::MLB)
        .list_charges_on(day)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    server.next();
}

#[tokio::test]
async fn partial_refund_sends_major_units_and_the_idempotency_key() {
    let answer = r#"{"id":555,"payment_id":16499678033,"amount":12.34,"status":"approved"}"#;
    let (server, f) = good_server(response(
        "201 Created",
        &["content-type: application/json"],
        answer,
    ));
    let refund = integrations(&server, &f, Site::MLB)
        .refund_payment("16499678033", Some(Cents(1234)), "key-abc")
        .await
        .unwrap();
    assert_eq!(
        (refund.id.as_str(), refund.amount),
        ("555", Some(Cents(1234)))
    );
    let (head, body) = split_request(&server.next().plaintext);
    assert!(
        head.starts_with("post /v1/payments/16499678033/refunds http/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nx-idempotency-key: key-abc"), "{head}");
    assert_eq!(body, r#"{"amount":12.34}"#);
}
