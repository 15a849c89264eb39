//! A real Rust Azure SDK client for the conformance suite: `azure_identity`'s
//! `ManagedIdentityCredential`, exactly as an application would construct it.
//!
//! The SDK picks its source from the environment, as it does in production:
//! `IDENTITY_ENDPOINT` + `IDENTITY_HEADER` select the App Service protocol; without them it
//! calls IMDS at the hard-coded `http://169.254.169.254` (so IMDS is testable only in transparent
//! mode, inside a network namespace where `imds-broker init-network` ran).
//!
//! Prints ONE JSON line on stdout and exits 0 when a token was obtained, 1 otherwise:
//! `{"ok":true,"expires_on":1700000000,"token_len":1234,"elapsed_ms":12}` or
//! `{"ok":false,"error":"...","status":400,"elapsed_ms":12}`. The token itself is never printed.
//!
//! Usage: `rust_mi_client [--resource URI] [--client-id ID]`

use azure_core::credentials::TokenCredential;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use clap::Parser;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Get one token from azure_identity's ManagedIdentityCredential")]
struct Args {
    /// Resource to request (the SDK takes a scope: `/.default` is appended here).
    #[arg(long, default_value = "https://storage.azure.com/")]
    resource: String,
    /// User-assigned identity to request by client ID (default: system-assigned).
    #[arg(long)]
    client_id: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    let result = get_token(&args).await;
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (line, ok) = match result {
        Ok(token) => (
            serde_json::json!({
                "ok": true,
                "expires_on": token.expires_on.unix_timestamp(),
                "token_len": token.token.secret().len(),
                "elapsed_ms": elapsed_ms,
            }),
            true,
        ),
        Err(e) => (
            serde_json::json!({
                "ok": false,
                "error": error_chain(&e),
                "status": http_status(&e),
                "elapsed_ms": elapsed_ms,
            }),
            false,
        ),
    };
    println!("{line}");
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

async fn get_token(args: &Args) -> azure_core::Result<azure_core::credentials::AccessToken> {
    // This crate builds azure_core without its default TLS provider (the broker uses ring),
    // so the application picks one, as any `rustls-no-provider` application does. The
    // managed-identity endpoints are plain HTTP: the choice does not affect what is tested.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let options = ManagedIdentityCredentialOptions {
        user_assigned_id: args.client_id.clone().map(UserAssignedId::ClientId),
        ..Default::default()
    };
    let credential = ManagedIdentityCredential::new(Some(options))?;
    let scope = format!("{}/.default", args.resource.trim_end_matches('/'));
    credential.get_token(&[scope.as_str()], None).await
}

/// The error and all its sources, so the broker's description is visible to the test.
fn error_chain(e: &azure_core::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The first HTTP status anywhere in the error chain.
fn http_status(e: &azure_core::Error) -> Option<u16> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(status) = err
            .downcast_ref::<azure_core::Error>()
            .and_then(azure_core::Error::http_status)
        {
            return Some(u16::from(status));
        }
        current = err.source();
    }
    None
}
