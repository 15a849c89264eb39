//! Runs the test-support fake Entra server standalone, for benchmarks that drive the real broker
//! against it.
//!
//! Prints one JSON line to stdout, e.g.
//! `{"authority":"https://localhost:PORT","ca_file":"...","tenant_id":"...","client_id":"...",
//!   "token_file":"...","calls_url":"http://127.0.0.1:PORT/calls"}`
//! then serves until SIGINT/SIGTERM. The token file holds a valid service-account token and is
//! re-minted periodically (atomically, as kubelet does). `GET calls_url` returns the number of
//! token-endpoint calls so far as plain text.
//!
//! Usage: `cargo run --example fake_entra -- [--port N] [--calls-port N] [--delay-ms N]
//!         [--token-lifetime-secs N] [--remint-secs N]`
//!         `[--oidc-issuer URL [--oidc-issuer-ca PEM]] [--federated-subject SUB]` (a real OIDC
//!         issuer, e.g. a kube-apiserver: assertions are verified with its published JWKS)

// Only the support modules this needs, as top-level modules (they refer to each other through
// `super::`): the rest of tests/support, e.g. the broker launcher, relies on test-only build
// variables such as CARGO_BIN_EXE_*.
#[path = "../tests/support/fake_entra.rs"]
mod fake_entra;
#[path = "../tests/support/issuer.rs"]
mod issuer;
#[path = "../tests/support/tls.rs"]
mod tls;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use fake_entra::FakeEntra;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Parser, Debug)]
#[command(about = "Fake Entra ID token endpoint for benchmarks")]
struct Args {
    /// HTTPS port of the fake token endpoint on 127.0.0.1 (0 = ephemeral).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Plain-HTTP port on 127.0.0.1 serving `GET /calls` (0 = ephemeral).
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
        fake.set_federated_oidc_issuer(fake_entra::OidcIssuer { issuer, ca_pem });
    }
    if let Some(subject) = args.federated_subject.clone() {
        fake.set_federated_subject(subject);
    }

    let token_dir = tempfile::Builder::new()
        .prefix("fake-entra-token-")
        .tempdir()
        .context("creating the token directory")?;
    let token_file = token_dir.path().join("token");
    fake.issuer()
        .write_to(&token_file)
        .context("writing the first service-account token")?;
    let remint = {
        let issuer = fake.issuer().clone();
        let token_file = token_file.clone();
        let every = Duration::from_secs(args.remint_secs.max(1));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await; // The first tick is immediate; the file is already fresh.
            loop {
                ticker.tick().await;
                if let Err(e) = issuer.write_to(&token_file) {
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
    let calls_server = tokio::spawn(serve_calls(calls_listener, Arc::clone(&fake)));

    let ready = serde_json::json!({
        "authority": fake.authority(),
        "ca_file": fake.ca_file(),
        "tenant_id": fake.tenant_id(),
        "client_id": fake.client_id(),
        "token_file": token_file,
        "calls_url": format!("http://{calls_addr}/calls"),
    });
    println!("{ready}");

    wait_for_termination()
        .await
        .context("installing signal handlers")?;
    remint.abort();
    calls_server.abort();
    Ok(())
}

/// Plain-HTTP side server: `GET /calls` → total token-endpoint calls, as text.
async fn serve_calls(listener: tokio::net::TcpListener, fake: Arc<FakeEntra>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let fake = Arc::clone(&fake);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let fake = Arc::clone(&fake);
                async move {
                    let response = if req.uri().path() == "/calls" {
                        Response::new(Full::new(Bytes::from(fake.calls().to_string())))
                    } else {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"try /calls\n")));
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        r
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
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
