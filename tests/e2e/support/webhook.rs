//! Runs the real `imds-broker webhook` binary: TLS files in a temp dir, ephemeral ports read
//! back from its `webhook serving` log line (no port race), captured JSON logs.

use super::BIN;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::Duration;
use testkit::pki::TestPki;
use testkit::process::{bound_addr, Process};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub struct Webhook {
    process: Process,
    /// The HTTPS (admission) listener, as bound.
    pub addr: SocketAddr,
    /// The plain-HTTP admin listener (`/readyz`, `/metrics`), as bound.
    pub admin_addr: SocketAddr,
    /// The certificate and key files it serves (replace them to rotate).
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Webhook {
    /// Starts the webhook with `pki`'s server certificate, fast certificate reloads, no
    /// shutdown delay and `extra` flags, and waits for its `webhook serving` line.
    pub async fn start(pki: &TestPki, extra: &[&str]) -> Webhook {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::fs::write(&cert, pki.server_cert_pem()).unwrap();
        std::fs::write(&key, pki.server_key_pem()).unwrap();
        let mut process = Process::spawn(
            Command::new(BIN)
                .args(["--log-format", "json", "webhook"])
                .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .args(["--tls-reload-interval", "100ms"])
                .args(["--sidecar-image", "registry.example/imds-broker:test"])
                .args(["--shutdown-delay", "0s"])
                .args(extra)
                .env_remove("KUBERNETES_SERVICE_HOST")
                .env("RUST_LOG", "info"),
        );
        let line = process
            .expect_json_line("webhook serving", Duration::from_secs(20))
            .await;
        Webhook {
            addr: bound_addr(&line, "listen"),
            admin_addr: bound_addr(&line, "admin_listen"),
            process,
            cert,
            key,
            _dir: dir,
        }
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// The first JSON log line with this `message`, awaited (panics after `timeout`).
    pub async fn expect_json_line(&mut self, message: &str, timeout: Duration) -> Value {
        self.process.expect_json_line(message, timeout).await
    }

    /// The admission endpoint.
    pub fn url(&self) -> String {
        format!("https://{}/mutate", self.addr)
    }

    /// SIGTERM and the exit status (within 15 s).
    pub async fn terminate(mut self) -> ExitStatus {
        self.process.terminate(Duration::from_secs(15)).await
    }
}

/// An AdmissionReview of Velero 1.15's data-upload pod (tests/fixtures/velero), as the API
/// server sends it at CREATE.
pub fn fixture_review() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/velero/velero-1.15-data-upload.json");
    let pod: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "e2e-uid-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "velero",
            "operation": "CREATE",
            "object": pod
        }
    })
}

/// Opens raw TLS connections to the webhook, trusting only `pki`'s CA: for requests no HTTP
/// client would send (a body that never comes).
#[derive(Clone)]
pub struct RawTls {
    connector: TlsConnector,
}

impl RawTls {
    pub fn new(pki: &TestPki) -> RawTls {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(imds_broker::crypto::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        RawTls {
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    /// A TLS connection to `addr` (the server certificate is checked for `localhost`).
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        self.connector.connect(name, tcp).await
    }
}
