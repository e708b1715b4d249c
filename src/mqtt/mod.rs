//! What every MQTT link of the agent shares (the station link today, the fleet link
//! next): the broker URL's scheme and port, rustls client configuration (the system's
//! web roots or a CA file, optional client certificate), keep-alive and the stall limit
//! that finds a dead connection, and the reconnect backoff. Pure helpers and rustls
//! only; each link owns its own connection task.

use std::path::Path;
use std::time::Duration;

/// A TLS file or setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// Where a broker URL points: host, port and whether it is TLS. `mqtt://`/`tcp://` are
/// plain (port 1883 by default), `mqtts://`/`ssl://` TLS (8883); `Err` says what is wrong.
pub fn broker_address(url: &str) -> Result<(String, u16, bool), String> {
    let url = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    let tls = match url.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => return Err(format!("unknown scheme `{other}`")),
    };
    let host = url.host_str().ok_or_else(|| "no host".to_string())?;
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    Ok((host.to_string(), port, tls))
}

/// The delay before reconnect attempt `attempts` (1, 2, ...): exponential from 100 ms,
/// capped at 10 s, with jitter over its upper half so that many clients of one broker
/// do not come back in step. `jitter` is in `[0, 1]`.
pub fn reconnect_delay_ms(attempts: u32, jitter: f64) -> u64 {
    let cap_ms = 10_000u64;
    let exp = 100u64.saturating_mul(1u64 << attempts.min(10)).min(cap_ms);
    exp / 2 + ((exp / 2) as f64 * jitter.clamp(0.0, 1.0)) as u64
}

fn read_pem_certs(path: &Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = rustls_pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?
        .collect();
    certs.map_err(|e| TlsError(format!("{}: {e}", path.display())))
}

pub fn tls_config(
    ca_file: Option<&Path>,
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<rustls::ClientConfig, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(ca) => {
            for c in read_pem_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match (cert_file, key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_pem_certs(cert)?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
                .map_err(|e| TlsError(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError(e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// How long one `poll` of the event loop may take before the link gives up on the
/// connection. rumqttc sends a PINGREQ every keep-alive whatever the traffic and fails
/// when the previous one got no PINGRESP, so a half-open connection (packets dropped,
/// nothing closed) fails within two keep-alives and `poll` returns at least once per
/// keep-alive. The one case its timer cannot see is a write that never completes (the
/// socket's send buffer full on a dead link): this limit catches that, and a connect or
/// TLS handshake that hangs.
pub fn stall_limit(keep_alive_cfg: Duration) -> Duration {
    keep_alive(keep_alive_cfg) * 2
}

/// rumqttc's smallest keep-alive (`set_keep_alive` panics below it); config validation
/// refuses less, this clamp keeps any other caller from panicking.
pub const MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);

pub fn keep_alive(configured: Duration) -> Duration {
    configured.max(MIN_KEEP_ALIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_grow_to_the_cap_and_keep_their_jitter_in_the_upper_half() {
        assert_eq!(reconnect_delay_ms(1, 0.0), 100);
        assert_eq!(reconnect_delay_ms(1, 1.0), 200);
        assert_eq!(reconnect_delay_ms(3, 0.0), 400);
        assert_eq!(reconnect_delay_ms(30, 0.0), 5_000);
        assert_eq!(reconnect_delay_ms(30, 1.0), 10_000);
    }

    #[test]
    fn broker_urls_choose_tls_by_scheme_and_default_ports() {
        assert_eq!(
            broker_address("mqtt://127.0.0.1").unwrap(),
            ("127.0.0.1".into(), 1883, false)
        );
        assert_eq!(
            broker_address("mqtts://broker.local:9000").unwrap(),
            ("broker.local".into(), 9000, true)
        );
        assert!(broker_address("http://x")
            .unwrap_err()
            .contains("unknown scheme"));
    }
}
