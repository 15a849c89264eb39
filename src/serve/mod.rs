//! Wiring of `imds-broker serve`: builds the exchanger, broker and protocol service from the
//! flags, binds the listeners, and runs until SIGTERM.

mod args;

use crate::admin::Admin;
use crate::assertion::TokenFile;
use crate::broker::{Broker, BrokerConfig, GateLimits, Identity, RetryPolicy, Selector};
use crate::exchange::emulator::Emulator;
use crate::exchange::entra::{EntraConfig, EntraExchanger};
use crate::exchange::Exchanger;
use crate::listener::{self, Limits};
use crate::metrics::Metrics;
use crate::protocol::app_service::IdentityHeader;
use crate::protocol::refusals::RefusalLog;
use crate::protocol::service::framing_errors;
use crate::protocol::TokenService;
use crate::values::non_empty;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// Client and tenant IDs the emulator uses when none are given.
pub const EMULATOR_CLIENT_ID: &str = "11111111-1111-1111-1111-111111111111";
pub const EMULATOR_TENANT_ID: &str = "22222222-2222-2222-2222-222222222222";
pub use args::ServeArgs;

/// Longest wait for a complete request head on the token listener.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head on the token listener.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Time left of the shutdown grace period when callers still waiting are answered.
const GRACE_MARGIN: Duration = Duration::from_millis(250);
/// How long a start-up prefetch keeps trying before it leaves the resource to requests.
const PREFETCH_HOLD: Duration = Duration::from_secs(60);

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    args.validate()?;
    for warning in args.warnings() {
        tracing::warn!("{warning}");
    }
    let metrics = Arc::new(Metrics::new());
    let (exchanger, client_id) = exchanger(&args)?;
    let allow = (!args.allow_resources.is_empty()).then(|| non_empty(&args.allow_resources));
    let allow_shown = list_or(allow.as_deref().unwrap_or_default(), "any");
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
                max_attempts: args.retry_max_attempts,
                initial_backoff: args.retry_initial_backoff,
                max_backoff: args.retry_max_backoff,
                error_backoff: args.error_backoff,
                max_retry_after: args.max_retry_after,
            },
            gate: GateLimits {
                max_in_flight: args.entra_concurrency.into(),
                ..GateLimits::default()
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
        token_listeners.push(listener::bind(*addr, "token")?);
    }
    let admin_listener = listener::bind(args.admin_listen, "admin")?;
    let bound: Vec<String> = token_listeners
        .iter()
        .map(listener::bound_addr)
        .filter(|a| !a.is_empty())
        .collect();
    let admin_bound = listener::bound_addr(&admin_listener);

    let (grace_trigger, grace_over) = listener::shutdown_channel();
    let service = Arc::new(TokenService {
        broker: broker.clone(),
        metrics: metrics.clone(),
        identity_header: args
            .identity_header
            .as_deref()
            .and_then(IdentityHeader::new),
        request_timeout: args.request_timeout,
        refusals: RefusalLog::default(),
        grace_over: grace_over.clone(),
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

    let (trigger, shutdown) = listener::shutdown_channel();
    let open_files = listener::open_files::raise_for(args.max_connections);
    let limits = Limits {
        max_connections: args.max_connections,
        // One cap for all token listeners (transparent mode has two): the memory budget is
        // per pod, not per listener.
        shared_slots: Some(listener::Slots::new(args.max_connections)),
        // A caller on loopback sends its head at once; seconds of waiting only serve slowloris.
        header_read_timeout: args.request_timeout.min(HEAD_TIMEOUT),
        max_header_bytes: MAX_HEAD_BYTES,
        framing_error_body: Some(framing_errors(metrics.clone(), MAX_HEAD_BYTES)),
        ..Limits::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    for listener in token_listeners {
        let service = service.clone();
        // Checks the request at once (see `TokenService::handle`); only the lookup is awaited.
        let handler = move |req, _peer| service.handle(req);
        tasks.spawn(listener::serve(
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
    tasks.spawn(listener::serve(
        admin_listener,
        admin_handler,
        Limits::admin(),
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
                    latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "connected to Entra ID ahead of the first token request"
                ),
                Err(error) => tracing::warn!(
                    %error,
                    "cannot reach Entra ID yet; token requests will try again"
                ),
            }
        });
    }
    for resource in &prefetch {
        let (broker, resource) = (broker.clone(), resource.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + PREFETCH_HOLD;
            if let Err(e) = broker.token(&Selector::Default, &resource, deadline).await {
                tracing::warn!(%resource, error = %e, "prefetch failed; requests will retry");
            }
        });
    }

    // The effective configuration, so a log shows what this broker was actually given (no
    // secret: the identity header is reported only as where it came from).
    let identity = broker.identity();
    tracing::info!(
        listen = %bound.join(","),
        admin_listen = %admin_bound,
        app_service = app_service_source(&args),
        emulate = args.emulate,
        client_id = %identity.client_id,
        tenant_id = args.tenant_id.as_deref().unwrap_or(EMULATOR_TENANT_ID).trim(),
        object_id = identity.object_id.as_deref().unwrap_or("-"),
        resource_id = identity.resource_id.as_deref().unwrap_or("-"),
        authority = if args.emulate { "emulator" } else { args.authority_host.as_str() },
        token_file = %args.token_file.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
        token_audience = %args.token_audience,
        allow_resources = %allow_shown,
        prefetch = %list_or(&prefetch, "-"),
        max_connections = args.max_connections,
        open_files,
        request_timeout = ?args.request_timeout,
        entra_concurrency = args.entra_concurrency,
        retry_max_attempts = args.retry_max_attempts,
        max_retry_after = ?args.max_retry_after,
        startup_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "imds-broker listening"
    );
    if let Err(reason) = broker.ready() {
        tracing::warn!(%reason, "not ready yet: token requests get 503 until this is fixed");
    }

    listener::termination_signal().await;
    trigger.trigger();
    // Waiting callers get their 503 just before the listeners' grace period runs out, so the
    // answer is written before the connection is dropped.
    let answer_waiting_at = args.shutdown_grace.saturating_sub(GRACE_MARGIN);
    tokio::spawn(async move {
        tokio::time::sleep(answer_waiting_at).await;
        grace_trigger.trigger();
    });
    while tasks.join_next().await.is_some() {}
    tracing::info!("imds-broker stopped");
    Ok(())
}

/// Whether the App Service endpoint is on, and why: an inherited IDENTITY_HEADER turns it on
/// as surely as the flag, so the log says which.
fn app_service_source(args: &ServeArgs) -> &'static str {
    match &args.identity_header {
        None => "off (no --identity-header / IDENTITY_HEADER)",
        Some(h) if std::env::var("IDENTITY_HEADER").is_ok_and(|e| &e == h) => {
            "on (IDENTITY_HEADER from the environment)"
        }
        Some(_) => "on (--identity-header)",
    }
}

fn list_or(list: &[String], none: &str) -> String {
    if list.is_empty() {
        none.to_owned()
    } else {
        list.join(",")
    }
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
