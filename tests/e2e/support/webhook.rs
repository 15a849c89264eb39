//! Runs the real `imds-broker webhook` binary: TLS files in a temp dir, ephemeral ports read
//! back from its `webhook serving` log line (no port race), captured JSON logs.

use super::BIN;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;
use testkit::pki::TestPki;
use testkit::process::{bound_addr, Process};

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

    /// The admission endpoint.
    pub fn url(&self) -> String {
        format!("https://{}/mutate", self.addr)
    }

    /// SIGTERM and the exit status (within 15 s).
    pub async fn terminate(mut self) -> ExitStatus {
        self.process.terminate(Duration::from_secs(15)).await
    }
}
