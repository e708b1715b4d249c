//! Test certificates (rcgen): a CA, server and client certificates it signs, and the bad
//! ones TLS tests need (expired, self-signed, from another CA). PEM files in a scratch
//! directory; ECDSA P-256 keys (PKCS#8).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use super::util::Workdir;

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPaths {
    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(&self.cert).expect("read the certificate")
    }

    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(&self.key).expect("read the key")
    }
}

/// A test CA and the certificates it issued, in its own scratch directory.
pub struct TestPki {
    dir: Workdir,
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_path: PathBuf,
    issued: AtomicU32,
}

fn validity(params: &mut CertificateParams, expired: bool) {
    let now = OffsetDateTime::now_utc();
    if expired {
        params.not_before = now - Duration::days(30);
        params.not_after = now - Duration::days(1);
    } else {
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(30);
    }
}

fn leaf_params(
    names: &[&str],
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> CertificateParams {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).expect("valid subject alternative names");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, false);
    params
}

impl TestPki {
    /// A new CA ("pointgate test CA"), its certificate written as `ca.pem`.
    pub fn new() -> TestPki {
        TestPki::named("pointgate test CA")
    }

    /// A new CA with this common name (two CAs for "unknown CA" tests).
    pub fn named(common_name: &str) -> TestPki {
        let dir = Workdir::new();
        let mut params = CertificateParams::default();
        params.distinguished_name.remove(DnType::CommonName);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, false);
        let key = KeyPair::generate().expect("generate the CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-sign the CA");
        let ca_path = dir.write("ca.pem", ca.pem());
        TestPki {
            dir,
            ca,
            ca_path,
            issued: AtomicU32::new(0),
        }
    }

    /// The CA certificate (PEM file).
    pub fn ca_path(&self) -> PathBuf {
        self.ca_path.clone()
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn dir(&self) -> &Workdir {
        &self.dir
    }

    /// A server certificate for these DNS names / IP addresses (the first is also the CN).
    pub fn server_cert(&self, names: &[&str]) -> CertPaths {
        let params = leaf_params(
            names,
            names.first().copied().unwrap_or("server"),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        self.issue("server", params)
    }

    /// A server certificate whose validity ended yesterday.
    pub fn expired_server_cert(&self, names: &[&str]) -> CertPaths {
        let mut params = leaf_params(
            names,
            names.first().copied().unwrap_or("server"),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        validity(&mut params, true);
        self.issue("expired", params)
    }

    /// A client certificate with this common name (Mosquitto's `use_identity_as_username`
    /// takes it as the username).
    pub fn client_cert(&self, common_name: &str) -> CertPaths {
        let params = leaf_params(&[], common_name, ExtendedKeyUsagePurpose::ClientAuth);
        self.issue("client", params)
    }

    /// A self-signed server certificate (no CA vouches for it).
    pub fn self_signed_cert(&self, names: &[&str]) -> CertPaths {
        let params = leaf_params(
            names,
            names.first().copied().unwrap_or("server"),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let key = KeyPair::generate().expect("generate a key");
        let cert = params.self_signed(&key).expect("self-sign");
        self.write("selfsigned", &cert.pem(), &key.serialize_pem())
    }

    fn issue(&self, kind: &str, params: CertificateParams) -> CertPaths {
        let key = KeyPair::generate().expect("generate a key");
        let cert = params.signed_by(&key, &*self.ca).expect("sign with the CA");
        self.write(kind, &cert.pem(), &key.serialize_pem())
    }

    fn write(&self, kind: &str, cert_pem: &str, key_pem: &str) -> CertPaths {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        CertPaths {
            cert: self.dir.write(format!("{kind}-{n}.pem"), cert_pem),
            key: self.dir.write(format!("{kind}-{n}.key"), key_pem),
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
