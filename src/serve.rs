//! Wiring of `imds-broker serve`: builds the exchanger, broker and protocol service from the
//! flags, binds the listeners, and runs until SIGTERM.

use crate::admin::Admin;
use crate::assertion::TokenFile;
use crate::broker::{Broker, BrokerConfig, Identity, RetryPolicy, Selector};
use crate::cli::ServeArgs;
use crate::exchange::emulator::Emulator;
use crate::exchange::entra::{EntraConfig, EntraExchanger};
use crate::exchange::Exchanger;
use crate::metrics::Metrics;
use crate::protocol::app_service::IdentityHeader;
use crate::protocol::TokenService;
use crate::server::{self, Limits};
use std::sync::Arc;
use std::time::Instant;

/// Client and tenant IDs the emulator uses when none are given.
pub const EMULATOR_CLIENT_ID: &str = "11111111-1111-1111-1111-111111111111";
pub const EMULATOR_TENANT_ID: &str = "22222222-2222-2222-2222-222222222222";

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let (exchanger, client_id) = exchanger(&args)?;
    let allow = (!args.allow_resources.is_empty()).then(|| non_empty(&args.allow_resources));
    let preconnect = exchanger.clone();
    let broker = Arc::new(Broker::new(
        BrokerConfig {
            identity: Identity {
                client_id,
                object_id: args.object_id.clone().filter(|s| !s.is_empty()),
                resource_id: args.resource_id.clone().filter(|s| !s.is_empty()),
            },
            allow_resources: allow,
            retry: RetryPolicy {
                max_attempts: args.retry_max_attempts.max(1),
                initial_backoff: args.retry_initial_backoff,
                max_backoff: args.retry_max_backoff,
                error_backoff: args.error_backoff,
            },
        },
        exchanger,
        metrics.clone(),
    ));
    let prefetch = non_empty(&args.prefetch);
    for resource in &prefetch {
        broker
            .authorize(&Selector::Default, resource)
            .map_err(|e| anyhow::anyhow!("--prefetch {resource}: {e}"))?;
    }

    // Bind everything before reporting ready, so a port clash fails the start loudly.
    let mut token_listeners = Vec::new();
    for addr in &args.listen {
        token_listeners.push(server::bind(*addr, "token").await?);
    }
    let admin_listener = server::bind(args.admin_listen, "admin").await?;
    // Logged as bound (port 0 resolves to the real port), for people and test harnesses.
    let bound: Vec<String> = token_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    let admin_bound = admin_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();

    let service = Arc::new(TokenService {
        broker: broker.clone(),
        metrics: metrics.clone(),
        identity_header: args
            .identity_header
            .as_deref()
            .and_then(IdentityHeader::new),
        request_timeout: args.request_timeout,
    });
    let admin = Admin {
        readiness: {
            let broker = broker.clone();
            Arc::new(move || broker.ready())
        },
        metrics: {
            let broker = broker.clone();
            let metrics = metrics.clone();
            Arc::new(move || {
                broker.update_gauges();
                metrics.render()
            })
        },
    };

    let (trigger, shutdown) = server::shutdown_channel();
    let limits = Limits {
        max_connections: args.max_connections,
        header_read_timeout: args.request_timeout,
        ..Limits::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    for listener in token_listeners {
        let service = service.clone();
        // Checks the request at once (see `TokenService::handle`); only the lookup is awaited.
        let handler = move |req, _peer| service.handle(req);
        tasks.spawn(server::serve(
            listener,
            handler,
            limits.clone(),
            shutdown.clone(),
            args.shutdown_grace,
        ));
    }
    let admin_handler = move |req: hyper::Request<hyper::body::Incoming>, _peer| {
        let resp = admin.handle(&req);
        async move { resp }
    };
    tasks.spawn(server::serve(
        admin_listener,
        admin_handler,
        Limits {
            max_connections: 64,
            ..Limits::default()
        },
        shutdown.clone(),
        args.shutdown_grace,
    ));

    if prefetch.is_empty() && !args.emulate {
        // A prefetch connects anyway; without one, a data-mover pod's first token request
        // would also pay for DNS, TCP and TLS to Entra (bench/RESULTS.md, cold path).
        tokio::spawn(async move {
            let started = Instant::now();
            match preconnect.preconnect().await {
                Ok(answered) => tracing::info!(
                    %answered,
                    latency_ms = started.elapsed().as_millis() as u64,
                    "connected to Entra ID ahead of the first token request"
                ),
                Err(error) => tracing::warn!(
                    %error,
                    "cannot reach Entra ID yet; token requests will try again"
                ),
            }
        });
    }
    for resource in prefetch {
        let broker = broker.clone();
        tokio::spawn(async move {
            if let Err(e) = broker.token(&Selector::Default, &resource).await {
                tracing::warn!(%resource, error = %e, "prefetch failed; requests will retry");
            }
        });
    }

    tracing::info!(
        listen = %bound.join(","),
        admin_listen = %admin_bound,
        app_service = service.identity_header.is_some(),
        emulate = args.emulate,
        client_id = %broker.identity().client_id,
        startup_ms = started.elapsed().as_millis() as u64,
        "imds-broker listening"
    );
    if let Err(reason) = broker.ready() {
        tracing::warn!(%reason, "not ready yet: token requests get 503 until this is fixed");
    }

    server::termination_signal().await;
    trigger.trigger();
    while tasks.join_next().await.is_some() {}
    tracing::info!("imds-broker stopped");
    Ok(())
}

fn exchanger(args: &ServeArgs) -> anyhow::Result<(Arc<dyn Exchanger>, String)> {
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

fn non_empty(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}
