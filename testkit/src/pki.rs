//! Test PKI: a throw-away CA and a `localhost` / `127.0.0.1` server certificate signed by it.
//!
//! The CA certificate is written to a file so a spawned broker can be told to trust it with
//! `--ca-file PATH`; nothing here touches the system trust store.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Names the server certificate is valid for. Entra's authority is given to the broker as
/// `https://localhost:PORT`; the IP form is there for clients that dial the address directly.
const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// A CA plus one server certificate, the CA also as a PEM file in a private temp dir that lives as
/// long as this value.
pub struct TestPki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_cert_pem: String,
    server_cert_der: CertificateDer<'static>,
    server_key_der: PrivatePkcs8KeyDer<'static>,
    server_key_pem: String,
    ca_file: PathBuf,
    // Kept for its Drop: removes the CA file.
    _dir: tempfile::TempDir,
}

impl TestPki {
    /// Generates a fresh CA and server certificate (ECDSA P-256, fast) and writes the CA
    /// certificate to `ca.pem` in a new temp dir.
    ///
    /// Panics with context on failure: this is test set-up, there is nothing to recover.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// As [`TestPki::new`], with a server certificate whose notAfter is `not_after` (Unix
    /// seconds), for tests of what reads a certificate's expiry.
    pub fn with_server_not_after(not_after: i64) -> Self {
        Self::build(Some(not_after))
    }

    fn build(not_after: Option<i64>) -> Self {
        let ca_key = KeyPair::generate().expect("test PKI: generate CA key");
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).expect("test PKI: CA certificate params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name = dn("imds-broker test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .expect("test PKI: self-sign CA certificate");
        let ca = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("test PKI: generate server key");
        let mut server_params = CertificateParams::new(
            SERVER_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("test PKI: server certificate params");
        server_params.distinguished_name = dn("localhost");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if let Some(at) = not_after {
            server_params.not_after = time::OffsetDateTime::from_unix_timestamp(at)
                .expect("test PKI: notAfter within the representable range");
        }
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .expect("test PKI: sign server certificate");

        let dir = tempfile::Builder::new()
            .prefix("imds-broker-test-pki-")
            .tempdir()
            .expect("test PKI: create temp dir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem())
            .unwrap_or_else(|e| panic!("test PKI: write {}: {e}", ca_file.display()));

        TestPki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            server_cert_pem: server_cert.pem(),
            server_cert_der: server_cert.der().clone(),
            server_key_der: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
            server_key_pem: server_key.serialize_pem(),
            ca_file,
            _dir: dir,
        }
    }

    /// CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Path of the CA PEM file (what the broker gets as `--ca-file`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Server certificate (leaf only), PEM.
    pub fn server_cert_pem(&self) -> &str {
        &self.server_cert_pem
    }

    /// The server certificate, DER-encoded (to compare with what a server presents).
    pub fn server_cert_der(&self) -> &CertificateDer<'static> {
        &self.server_cert_der
    }

    /// The server's private key, PKCS#8 PEM (to write key files, e.g. a rotated webhook key).
    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }

    /// A rustls server config presenting the server certificate, HTTP/1.1 only (the ALPN
    /// answer keeps clients that offer h2 on HTTP/1.1, which is all the fake speaks).
    pub(crate) fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = imds_broker::crypto::provider();
        let key = PrivateKeyDer::Pkcs8(self.server_key_der.clone_key());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("test PKI: rustls protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert_der.clone()], key)
            .expect("test PKI: rustls server certificate");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A reqwest client that trusts only this CA (not the system roots), so a test proves the
    /// chain is actually used.
    pub(crate) fn reqwest_client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_der(self.ca_der.as_ref())
            .expect("test PKI: CA certificate for reqwest");
        imds_broker::crypto::install_default();
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .build()
            .expect("test PKI: build reqwest client")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "imds-broker tests");
    dn
}
