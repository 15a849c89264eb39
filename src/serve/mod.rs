//! `imds-broker serve`, the sidecar: the broker wiring shared with `node` ([`wiring`]) with
//! token listeners that serve only callers inside the pod's own network namespace.

mod args;
mod wiring;

use crate::assertion::TokenFile;
use crate::exchange::emulator::Emulator;
use crate::exchange::entra::{EntraConfig, EntraExchanger};
use crate::exchange::Exchanger;
use crate::listener::{self, OutsidePeer};
use crate::metrics::{Endpoint, Metrics};
use crate::protocol::{imds, ApiError, TokenService};
use std::sync::Arc;
use std::time::Instant;

pub(crate) use wiring::{Core, Front};

/// Client and tenant IDs the emulator uses when none are given.
pub const EMULATOR_CLIENT_ID: &str = "11111111-1111-1111-1111-111111111111";
pub const EMULATOR_TENANT_ID: &str = "22222222-2222-2222-2222-222222222222";
pub use args::ServeArgs;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    args.validate()?;
    for warning in args.warnings() {
        tracing::warn!("{warning}");
    }
    let core = Core::new(&args, Metrics::new())?;
    let mut listeners = Vec::new();
    for addr in &args.listen {
        listeners.push(listener::bind(*addr, "token")?);
    }
    let service = core.service.clone();
    let front = Front {
        listeners,
        // Checks the request at once (see `TokenService::handle`); only the lookup is awaited.
        handler: move |req, _peer| service.handle(req),
        // Tokens are for this pod's processes only, on every token listener: 169.254.169.254
        // on the pod's `lo` is reachable from a neighbour that routes it via the pod's IP.
        outside_peer: Some(outside_peer(core.service.clone())),
        reuse_port: false,
        readiness: core.broker_readiness(),
    };
    core.run(&args, front, started).await
}

/// The answer to a caller outside this pod's network namespace: 403 in IMDS's error format,
/// counted (`endpoint="other"`) and logged like any refusal.
fn outside_peer(service: Arc<TokenService>) -> OutsidePeer {
    OutsidePeer(Arc::new(move |peer| {
        let e = ApiError::new(
            hyper::StatusCode::FORBIDDEN,
            "access_denied",
            format!(
                "imds-broker serves only callers inside its own pod; this connection came \
                 from {}, outside the pod's network namespace",
                peer.ip().to_canonical()
            ),
        );
        service.metrics.request(Endpoint::other, 403);
        service.refusals.refused(Endpoint::other, &e);
        imds::error_response(&e)
    }))
}

pub(crate) fn exchanger(args: &ServeArgs) -> anyhow::Result<(Arc<dyn Exchanger>, String)> {
    if args.emulate {
        let tenant = args.tenant_id.as_deref().unwrap_or(EMULATOR_TENANT_ID);
        let client = args.client_id.as_deref().unwrap_or(EMULATOR_CLIENT_ID);
        tracing::warn!(
            "EMULATOR MODE: tokens are FAKE, signed by an ephemeral local key; no Azure service \
             accepts them. Do not use --emulate in production."
        );
        let emulator = Emulator::new(tenant, args.emulator_token_lifetime)?;
        return Ok((Arc::new(emulator), client.to_owned()));
    }
    let missing = |what: &str, flag: &str, env: &str| {
        anyhow::anyhow!("{what} is required: set {flag} or {env} (or use --emulate to try the broker without Azure)")
    };
    let client_id = args
        .client_id
        .clone()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| missing("the client ID", "--client-id", "AZURE_CLIENT_ID"))?;
    let tenant_id = args
        .tenant_id
        .clone()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| missing("the tenant ID", "--tenant-id", "AZURE_TENANT_ID"))?;
    let token_file = args.token_file.clone().ok_or_else(|| {
        missing(
            "the token file",
            "--token-file",
            "AZURE_FEDERATED_TOKEN_FILE",
        )
    })?;
    let exchanger = EntraExchanger::new(EntraConfig {
        tenant_id: tenant_id.trim(),
        authority_host: &args.authority_host,
        ca_file: args.ca_file.as_deref(),
        timeout: args.entra_timeout,
        token_file: TokenFile::new(token_file, args.token_audience.clone()),
    })?;
    Ok((Arc::new(exchanger), client_id.trim().to_owned()))
}
