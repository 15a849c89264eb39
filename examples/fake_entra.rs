//! Runs the test-support fake Entra server standalone, for benchmarks and the conformance suite
//! (tests/conformance), which drive the real broker against it.
//!
//! Prints one JSON line to stdout, e.g.
//! `{"authority":"https://localhost:PORT","ca_file":"...","tenant_id":"...","client_id":"...",
//!   "token_file":"...","calls_url":"http://127.0.0.1:PORT/calls"}`
//! then serves until SIGINT/SIGTERM. The token file holds a valid service-account token and is
//! re-minted periodically (atomically, as kubelet does).
//!
//! The calls port (plain HTTP on 127.0.0.1) also lets a test change the fake's behaviour while it
//! runs (the conformance suite's throttling and outage cases):
//! - `GET /calls`: the number of token-endpoint calls so far, as plain text.
//! - `GET /call-log`: JSON `{"now_ms": N, "calls": [{"ms", "scope", "fault"}]}`, times in ms since
//!   the fake started.
//! - `POST /fault` with JSON `{"status": 429, "retry_after": 10, "for_secs": 30}`: every token
//!   request gets that status (with `Retry-After` if given) until `DELETE /fault`, or for
//!   `for_secs` seconds if given (timed here, so the window does not depend on the caller's
//!   scheduling). `{"reset": true}` instead drops each connection without an answer;
//!   `{"delay_ms": N}` only makes the next token request wait N ms before its normal answer. Answers
//!   `{"now_ms": N}`, the moment the fault began.
//! - `DELETE /fault`: normal answers again.
//!
//! Call-log entries also carry `jti`, the client assertion's `jti` claim (or null):
//! `--token-files N` writes N more token files (`token_files` in the JSON line), each with its
//! own `jti` (`fleet-1` … `fleet-N`), so a fleet of brokers, one file each, can be told apart.
//! `--rate-limit-per-sec R` throttles the token endpoint like Entra: a token bucket of
//! `--rate-limit-burst B` (default R, starts full) refilled at R per second; a request finding
//! it empty gets 429 with `Retry-After: --rate-limit-retry-after S` (default 1) and takes no
//! token (shown as that fault in the call log; `GET /throttled` counts them).
//!
//! Usage: `cargo run --example fake_entra -- [--port N] [--calls-port N] [--delay-ms N]
//!         [--token-lifetime-secs N] [--remint-secs N] [--token-files N]`
//!         `[--rate-limit-per-sec R [--rate-limit-burst B] [--rate-limit-retry-after S]]`
//!         `[--oidc-issuer URL [--oidc-issuer-ca PEM]] [--federated-subject SUB]` (a real OIDC
//!         issuer, e.g. a kube-apiserver: assertions are verified with its published JWKS)

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use testkit::fake_entra::{FakeEntra, Fault, OidcIssuer, RateLimit};

#[derive(Parser, Debug)]
#[command(about = "Fake Entra ID token endpoint for benchmarks and the conformance suite")]
struct Args {
    /// HTTPS port of the fake token endpoint on 127.0.0.1 (0 = ephemeral).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Plain-HTTP port on 127.0.0.1 of the calls/control API (0 = ephemeral).
    #[arg(long, default_value_t = 0)]
    calls_port: u16,
    /// Delay before every token-endpoint answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Lifetime of issued access tokens (`expires_in`), in seconds.
    #[arg(long, default_value_t = 3600)]
    token_lifetime_secs: u64,
    /// How often the service-account token file is re-minted, in seconds.
    #[arg(long, default_value_t = 300)]
    remint_secs: u64,
    /// Also write this many token files, each with its own `jti` claim (`fleet-1` …), re-minted
    /// with the main one: one per broker of a fleet, so the call log tells the callers apart.
    #[arg(long, default_value_t = 0)]
    token_files: usize,
    /// Throttle the token endpoint: a token bucket refilled at this many requests per second;
    /// a request finding it empty gets 429 + `Retry-After`.
    #[arg(long)]
    rate_limit_per_sec: Option<f64>,
    /// Capacity of the bucket (it starts full); default: the rate.
    #[arg(long, requires = "rate_limit_per_sec")]
    rate_limit_burst: Option<f64>,
    /// `Retry-After` seconds of a throttled answer.
    #[arg(long, default_value_t = 1, requires = "rate_limit_per_sec")]
    rate_limit_retry_after: u64,

    // -- Federated credential with a real OIDC issuer (tests/cluster: a kube-apiserver) --
    /// Trust this OIDC issuer (its discovery document and JWKS) instead of the built-in test key.
    #[arg(long)]
    oidc_issuer: Option<String>,
    /// PEM CA bundle for the OIDC issuer's HTTPS endpoints.
    #[arg(long, requires = "oidc_issuer")]
    oidc_issuer_ca: Option<std::path::PathBuf>,
    /// The federated credential's subject, e.g. system:serviceaccount:velero:velero-server.
    #[arg(long)]
    federated_subject: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use anyhow::Context as _;

    let args = Args::parse();
    let fake =
        Arc::new(FakeEntra::start_on_port(args.port).context("starting the fake Entra server")?);
    fake.set_response_delay(Duration::from_millis(args.delay_ms));
    fake.set_token_lifetime(Duration::from_secs(args.token_lifetime_secs));
    if let Some(issuer) = args.oidc_issuer.clone() {
        let ca_pem = match &args.oidc_issuer_ca {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            ),
            None => None,
        };
        fake.set_federated_oidc_issuer(OidcIssuer { issuer, ca_pem });
    }
    if let Some(subject) = args.federated_subject.clone() {
        fake.set_federated_subject(subject);
    }
    if let Some(per_sec) = args.rate_limit_per_sec {
        anyhow::ensure!(
            per_sec > 0.0 && per_sec.is_finite(),
            "--rate-limit-per-sec must be positive"
        );
        let burst = args.rate_limit_burst.unwrap_or(per_sec);
        anyhow::ensure!(burst >= 1.0, "--rate-limit-burst must be at least 1");
        fake.set_rate_limit(Some(RateLimit {
            per_sec,
            burst,
            retry_after_secs: args.rate_limit_retry_after,
        }));
    }

    let token_dir = tempfile::Builder::new()
        .prefix("fake-entra-token-")
        .tempdir()
        .context("creating the token directory")?;
    let token_file = token_dir.path().join("token");
    fake.issuer()
        .write_to(&token_file)
        .context("writing the first service-account token")?;
    let fleet_files: Vec<_> = (1..=args.token_files)
        .map(|i| token_dir.path().join(format!("token-{i}")))
        .collect();
    write_fleet_tokens(fake.issuer(), &fleet_files).context("writing the fleet token files")?;
    let remint = {
        let issuer = fake.issuer().clone();
        let token_file = token_file.clone();
        let fleet_files = fleet_files.clone();
        let every = Duration::from_secs(args.remint_secs.max(1));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await; // The first tick is immediate; the file is already fresh.
            loop {
                ticker.tick().await;
                if let Err(e) = issuer
                    .write_to(&token_file)
                    .and_then(|_| write_fleet_tokens(&issuer, &fleet_files))
                {
                    eprintln!("fake_entra: re-minting the token file failed: {e}");
                }
            }
        })
    };

    let calls_listener = tokio::net::TcpListener::bind(("127.0.0.1", args.calls_port))
        .await
        .with_context(|| format!("binding the calls port 127.0.0.1:{}", args.calls_port))?;
    let calls_addr = calls_listener
        .local_addr()
        .context("reading the calls port address")?;
    let control = Arc::new(Control {
        fake: Arc::clone(&fake),
        started: Instant::now(),
        generation: AtomicU64::new(0),
    });
    let calls_server = tokio::spawn(serve_calls(calls_listener, control));

    let mut ready = serde_json::json!({
        "authority": fake.authority(),
        "ca_file": fake.ca_file(),
        "tenant_id": fake.tenant_id(),
        "client_id": fake.client_id(),
        "token_file": token_file,
        "calls_url": format!("http://{calls_addr}/calls"),
    });
    if !fleet_files.is_empty() {
        ready["token_files"] = serde_json::json!(fleet_files);
    }
    println!("{ready}");

    wait_for_termination()
        .await
        .context("installing signal handlers")?;
    remint.abort();
    calls_server.abort();
    Ok(())
}

/// Writes `token-i` with `jti` = `fleet-i` (1-based, as the file names).
fn write_fleet_tokens(
    issuer: &testkit::issuer::TestIssuer,
    files: &[std::path::PathBuf],
) -> std::io::Result<()> {
    for (i, file) in files.iter().enumerate() {
        let claims = issuer
            .claims()
            .with_claim("jti", serde_json::json!(format!("fleet-{}", i + 1)));
        issuer.write_claims_to(file, claims)?;
    }
    Ok(())
}

/// State of the plain-HTTP control server.
struct Control {
    fake: Arc<FakeEntra>,
    /// Zero of every `ms` the control API reports.
    started: Instant,
    /// Bumped by every fault change, so a `for_secs` timer only clears the fault it set.
    generation: AtomicU64,
}

impl Control {
    fn now_ms(&self) -> u128 {
        self.started.elapsed().as_millis()
    }

    fn call_log(&self) -> serde_json::Value {
        let calls: Vec<_> = self
            .fake
            .call_log()
            .into_iter()
            .map(|c| {
                serde_json::json!({
                    "ms": c.at.saturating_duration_since(self.started).as_millis(),
                    "scope": c.scope,
                    "fault": c.fault.map(|f| format!("{f:?}")),
                    "jti": c.jti,
                })
            })
            .collect();
        serde_json::json!({"now_ms": self.now_ms(), "calls": calls})
    }

    /// `POST /fault`: parses the JSON body, sets the sticky fault, arms the `for_secs` timer.
    fn set_fault(self: &Arc<Self>, body: &[u8]) -> Result<serde_json::Value, String> {
        let spec: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
        if let Some(ms) = spec.get("delay_ms").and_then(|v| v.as_u64()) {
            // One-shot: only the next token request waits (the sticky fault stays as it is).
            self.fake
                .push_fault(Fault::Delay(Duration::from_millis(ms)));
            return Ok(serde_json::json!({"now_ms": self.now_ms()}));
        }
        let fault = if spec.get("reset").and_then(|v| v.as_bool()) == Some(true) {
            Fault::Reset
        } else {
            let status = spec
                .get("status")
                .and_then(|v| v.as_u64())
                .and_then(|s| u16::try_from(s).ok())
                .filter(|s| (400..600).contains(s))
                .ok_or("need \"status\" (400-599) or \"reset\": true")?;
            match spec.get("retry_after").and_then(|v| v.as_u64()) {
                Some(secs) => Fault::StatusRetryAfter(status, secs),
                None => Fault::Status(status),
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.fake.set_sticky_fault(fault);
        let began = self.now_ms();
        if let Some(secs) = spec.get("for_secs").and_then(|v| v.as_f64()) {
            let control = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs_f64(secs.max(0.0))).await;
                if control.generation.load(Ordering::SeqCst) == generation {
                    control.fake.clear_sticky_fault();
                }
            });
        }
        Ok(serde_json::json!({"now_ms": began}))
    }

    fn clear_fault(&self) -> serde_json::Value {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.fake.clear_sticky_fault();
        serde_json::json!({"now_ms": self.now_ms()})
    }
}

/// Plain-HTTP side server: `GET /calls`, `GET /call-log`, `POST /fault`, `DELETE /fault`
/// (see the module comment).
async fn serve_calls(listener: tokio::net::TcpListener, control: Arc<Control>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let control = Arc::clone(&control);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let control = Arc::clone(&control);
                async move { Ok::<_, Infallible>(control_response(req, &control).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn control_response(
    req: Request<hyper::body::Incoming>,
    control: &Arc<Control>,
) -> Response<Full<Bytes>> {
    let json = |v: serde_json::Value| {
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    };
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    let method = req.method().clone();
    match (method.as_str(), req.uri().path()) {
        ("GET", "/calls") => text(StatusCode::OK, control.fake.calls().to_string()),
        ("GET", "/call-log") => json(control.call_log()),
        ("GET", "/throttled") => text(StatusCode::OK, control.fake.throttled_calls().to_string()),
        ("POST", "/fault") => {
            let body = match Limited::new(req.into_body(), 4096).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("unreadable body: {e}\n")),
            };
            match control.set_fault(&body) {
                Ok(v) => json(v),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        ("DELETE", "/fault") => json(control.clear_fault()),
        _ => text(
            StatusCode::NOT_FOUND,
            "try GET /calls, GET /call-log, GET /throttled, POST /fault, DELETE /fault\n"
                .to_string(),
        ),
    }
}

/// Returns on SIGINT or SIGTERM, so the temp dirs (CA, token) are cleaned up on a normal kill.
async fn wait_for_termination() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
