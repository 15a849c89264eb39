//! Runs testkit's hostile authority standalone for bench/broker_load.py: an HTTPS "Entra"
//! whose every answer (token endpoint and discovery document alike) is a huge body, in turn a
//! 500 with `Content-Length`, a 200 chunked, a 503 chunked and paced with `Retry-After: 1`,
//! and a 200 with `Content-Length`.
//!
//! Prints one JSON line, e.g. `{"authority":"https://localhost:PORT","ca_file":"...",
//! "tenant_id":"...","client_id":"...","token_file":"..."}`, then serves until SIGINT/SIGTERM.
//!
//! Usage: `cargo run --example hostile_authority -- [--len BYTES]` (default 50,000,000)

use clap::Parser;
use std::time::Duration;
use testkit::hostile_authority::{Answer, HostileAuthority};

#[derive(Parser, Debug)]
#[command(about = "An authority answering every request with a huge body")]
struct Args {
    /// Body length of every answer, in bytes.
    #[arg(long, default_value_t = 50_000_000)]
    len: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let args = Args::parse();
    let authority = HostileAuthority::start_cycling(vec![
        Answer::huge(500, args.len),
        Answer::huge(200, args.len).chunked(),
        Answer::huge(503, args.len)
            .chunked()
            .paced(Duration::from_millis(2))
            .header("Retry-After", "1"),
        Answer::huge(200, args.len),
    ]);
    let dir = tempfile::Builder::new()
        .prefix("hostile-authority-")
        .tempdir()
        .context("creating the token directory")?;
    let token_file = dir.path().join("token");
    testkit::issuer::TestIssuer::new()
        .write_to(&token_file)
        .context("writing the service-account token")?;
    let line = serde_json::json!({
        "authority": authority.url(),
        "ca_file": authority.ca_file(),
        "tenant_id": "22222222-2222-2222-2222-222222222222",
        "client_id": "11111111-1111-1111-1111-111111111111",
        "token_file": token_file,
    });
    println!("{line}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!(
        "hostile authority: {} requests, {} body bytes taken",
        authority.received().len(),
        authority.body_bytes_written()
    );
    Ok(())
}
