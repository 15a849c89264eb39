//! Runs the real `imds-broker serve` (or `node`) binary for end-to-end tests: ephemeral ports (read back
//! from the broker's "listening" log line, so there is no port race), captured JSON logs, and
//! helpers for both protocols.

use super::BIN;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;
use testkit::fake_entra::FakeEntra;

use testkit::process::{bound_addr, Process};

pub const STORAGE: &str = "https://storage.azure.com/";
pub const ARM: &str = "https://management.azure.com/";
pub const IDENTITY_HEADER: &str = "test-identity-header-5ecr3t";

/// Builder for a broker process.
pub struct BrokerBuilder {
    /// `serve`, or `node`.
    subcommand: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    identity_header: Option<String>,
    rust_log: String,
    soft_open_files: Option<u64>,
    token_listeners: usize,
}

impl BrokerBuilder {
    /// A broker on the built-in emulator.
    pub fn emulate() -> Self {
        BrokerBuilder {
            subcommand: "serve",
            args: vec!["--emulate".into()],
            env: Vec::new(),
            identity_header: Some(IDENTITY_HEADER.into()),
            rust_log: "info".into(),
            soft_open_files: None,
            token_listeners: 1,
        }
    }

    /// A broker exchanging with `fake` using the token file at `token_file`. Fast retry
    /// settings keep failure tests short; tests that need others override them.
    pub fn entra(fake: &FakeEntra, token_file: &Path) -> Self {
        let mut args = entra_args(fake, token_file);
        args.extend(
            [
                "--ca-file",
                &fake.ca_file().display().to_string(),
                "--retry-initial-backoff",
                "50ms",
                "--retry-max-backoff",
                "3s",
                "--entra-timeout",
                "3s",
            ]
            .map(String::from),
        );
        BrokerBuilder {
            subcommand: "serve",
            args,
            env: Vec::new(),
            identity_header: Some(IDENTITY_HEADER.into()),
            rust_log: "info".into(),
            soft_open_files: None,
            token_listeners: 1,
        }
    }

    /// `imds-broker node` for the pods of `node_name`, watched through the API server that
    /// `kubeconfig` names, instead of `serve`.
    pub fn node(mut self, kubeconfig: &Path, node_name: &str) -> Self {
        self.subcommand = "node";
        self.env("KUBECONFIG", kubeconfig.display().to_string())
            .set("--node-name", node_name)
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets `flag` to `value`, replacing the builder's own value when it has one.
    pub fn set(mut self, flag: &str, value: impl Into<String>) -> Self {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.into(),
            _ => self.args.extend([flag.to_owned(), value.into()]),
        }
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn no_identity_header(mut self) -> Self {
        self.identity_header = None;
        self
    }

    /// `n` token listeners (as transparent mode has two), all on ephemeral loopback ports.
    pub fn token_listeners(mut self, n: usize) -> Self {
        self.token_listeners = n;
        self
    }

    /// Starts the broker with this soft open-file limit (as a container runtime may), through
    /// util-linux's `prlimit`, which execs it: the PID is the broker's.
    pub fn soft_open_files(mut self, limit: u64) -> Self {
        self.soft_open_files = Some(limit);
        self
    }

    pub fn rust_log(mut self, level: impl Into<String>) -> Self {
        self.rust_log = level.into();
        self
    }

    /// Starts the broker and waits for its "listening" log line (an event, not a sleep).
    pub async fn spawn(self) -> Broker {
        // The harness's client is built below; reqwest needs the process crypto provider.
        imds_broker::crypto::install_default();
        let mut cmd = match self.soft_open_files {
            Some(limit) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={limit}:")).args(["--", BIN]);
                cmd
            }
            None => Command::new(BIN),
        };
        let listen = vec!["127.0.0.1:0"; self.token_listeners].join(",");
        let listen = match self.args.iter().position(|a| a == "--listen") {
            // The test's own address (e.g. a port another broker listens on too).
            Some(_) => Vec::new(),
            None => vec!["--listen".to_owned(), listen],
        };
        let admin = match self.args.iter().position(|a| a == "--admin-listen") {
            Some(_) => Vec::new(),
            None => vec!["--admin-listen".to_owned(), "127.0.0.1:0".to_owned()],
        };
        cmd.arg(self.subcommand)
            .args(listen)
            .args(admin)
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", &self.rust_log)
            .env("IMDS_BROKER_LOG_FORMAT", "json");
        if let Some(h) = &self.identity_header {
            cmd.env("IDENTITY_HEADER", h);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut process = Process::spawn(&mut cmd);
        let line = process
            .expect_json_line("imds-broker listening", Duration::from_secs(20))
            .await;
        let token_addrs = line["listen"]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        Broker {
            token_addr: bound_addr(&line, "listen"),
            token_addrs,
            admin_addr: bound_addr(&line, "admin_listen"),
            process,
            identity_header: self.identity_header,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }
}

/// A response: status, Retry-After header, JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Value,
    pub raw: String,
}

impl Reply {
    pub fn field(&self, name: &str) -> &str {
        self.body[name]
            .as_str()
            .unwrap_or_else(|| panic!("field {name} missing or not a string in {}", self.raw))
    }

    pub fn description(&self) -> String {
        self.body["error_description"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

pub struct Broker {
    process: Process,
    pub token_addr: SocketAddr,
    /// Every token listener's address (the first is `token_addr`).
    pub token_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub identity_header: Option<String>,
    pub http: reqwest::Client,
}

impl Broker {
    pub fn imds_url(&self, query: &str) -> String {
        format!(
            "http://{}/metadata/identity/oauth2/token?{query}",
            self.token_addr
        )
    }

    pub fn app_service_url(&self, query: &str) -> String {
        format!("http://{}/msi/token?{query}", self.token_addr)
    }

    /// IMDS request with `Metadata: true`.
    pub async fn imds(&self, query: &str) -> Reply {
        self.get(&self.imds_url(query), &[("Metadata", "true")])
            .await
    }

    /// IMDS query for `resource` with api-version 2018-02-01.
    pub async fn imds_token(&self, resource: &str) -> Reply {
        self.imds(&format!(
            "api-version=2018-02-01&resource={}",
            enc(resource)
        ))
        .await
    }

    /// App Service request with the right identity header.
    pub async fn app_service(&self, query: &str) -> Reply {
        let h = self.identity_header.clone().expect("identity header set");
        self.get(&self.app_service_url(query), &[("X-IDENTITY-HEADER", &h)])
            .await
    }

    /// App Service request with the right identity header, from a connection whose source
    /// address is `source` (any 127.x.y.z: Linux routes all of 127/8 to `lo`).
    pub async fn app_service_from(&self, source: IpAddr, query: &str) -> Reply {
        let h = self.identity_header.clone().expect("identity header set");
        self.get_from(
            source,
            &self.app_service_url(query),
            &[("X-IDENTITY-HEADER", &h)],
        )
        .await
    }

    /// A GET from a connection whose source address is `source`.
    pub async fn get_from(&self, source: IpAddr, url: &str, headers: &[(&str, &str)]) -> Reply {
        let client = reqwest::Client::builder()
            .no_proxy()
            .local_address(source)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut req = client.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        reply(req.send().await.expect("request to broker")).await
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.http.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request to broker");
        reply(resp).await
    }

    pub async fn admin(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("http://{}{path}", self.admin_addr))
            .send()
            .await
            .expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// The value of one metric sample line (`name{labels}`), 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.admin("/metrics").await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// Waits up to 10 s for a log line containing `needle`; fails the test with the logs
    /// otherwise.
    pub async fn expect_log(&mut self, needle: &str) {
        if !self.wait_log(needle, Duration::from_secs(10)).await {
            panic!("no log line with {needle:?}; logs:\n{}", self.logs());
        }
    }

    /// Waits up to 10 s for a log line containing every one of `needles`; fails the test with
    /// the logs otherwise.
    pub async fn expect_log_with(&mut self, needles: &[&str]) {
        let found = self
            .process
            .wait_for_line(
                |l| needles.iter().all(|n| l.contains(n)),
                Duration::from_secs(10),
            )
            .await;
        if found.is_none() {
            panic!("no log line with {needles:?}; logs:\n{}", self.logs());
        }
    }

    /// Waits for a log line containing `needle`.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) -> bool {
        self.process
            .wait_for_line(|l| l.contains(needle), timeout)
            .await
            .is_some()
    }

    pub fn signal(&self, sig: &str) {
        self.process.signal(sig);
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout).await
    }
}

async fn reply(resp: reqwest::Response) -> Reply {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let raw = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    Reply {
        status,
        retry_after,
        body,
        raw,
    }
}

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The flags that point a broker (or `doctor`) at `fake` with `token_file`: identity,
/// authority and token file; the fake's CA is left to the caller.
pub fn entra_args(fake: &FakeEntra, token_file: &Path) -> Vec<String> {
    vec![
        "--client-id".into(),
        fake.client_id(),
        "--tenant-id".into(),
        fake.tenant_id(),
        "--authority-host".into(),
        fake.authority(),
        "--token-file".into(),
        token_file.display().to_string(),
    ]
}

/// A temp dir with a valid token file minted by the fake's issuer.
pub fn token_dir(fake: &FakeEntra) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    fake.issuer()
        .write_to(&path)
        .expect("write service-account token");
    (dir, path)
}
