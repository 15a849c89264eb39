//! Wiring of `imds-broker serve`: builds the exchanger, broker and protocol service from the
//! flags, binds the listeners, and runs until SIGTERM.

use crate::admin::Admin;
use crate::assertion::TokenFile;
use crate::broker::{Broker, BrokerConfig, GateLimits, Identity, RetryPolicy, Selector};
use crate::exchange::emulator::Emulator;
use crate::exchange::entra::{EntraConfig, EntraExchanger};
use crate::exchange::Exchanger;
use crate::listener::{self, Limits};
use crate::metrics::Metrics;
use crate::protocol::app_service::IdentityHeader;
use crate::protocol::TokenService;
use crate::values::parse_duration;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// Client and tenant IDs the emulator uses when none are given.
pub const EMULATOR_CLIENT_ID: &str = "11111111-1111-1111-1111-111111111111";
pub const EMULATOR_TENANT_ID: &str = "22222222-2222-2222-2222-222222222222";
/// Longest wait for a complete request head on the token listener.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a start-up prefetch keeps trying before it leaves the resource to requests.
const PREFETCH_HOLD: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Args)]
/// Flags of `imds-broker serve`.
pub struct ServeArgs {
    /// Token listener(s). Loopback only by default: a pod-IP listener would hand this pod's
    /// tokens to any other pod. Repeat (or comma-separate) to listen on several addresses,
    /// e.g. `169.254.169.254:80` in transparent mode.
    #[arg(
        long = "listen",
        env = "IMDS_BROKER_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:8400"
    )]
    pub listen: Vec<SocketAddr>,

    /// Admin listener: /healthz, /readyz, /metrics. Serves no tokens.
    #[arg(long, env = "IMDS_BROKER_ADMIN_LISTEN", default_value = "0.0.0.0:8401")]
    pub admin_listen: SocketAddr,

    /// Projected service-account token used as the federated client assertion. Re-read
    /// before every Entra exchange because kubelet rotates it in place.
    #[arg(
        long,
        env = "AZURE_FEDERATED_TOKEN_FILE",
        required_unless_present = "emulate"
    )]
    pub token_file: Option<PathBuf>,

    /// Audience the service-account token must carry (the federated credential's audience).
    #[arg(
        long,
        env = "IMDS_BROKER_TOKEN_AUDIENCE",
        default_value = "api://AzureADTokenExchange"
    )]
    pub token_audience: String,

    /// Client (application) ID of the Entra app or user-assigned managed identity that holds
    /// the federated credential. Requests that name another client ID get "Identity not found".
    #[arg(long, env = "AZURE_CLIENT_ID", required_unless_present = "emulate")]
    pub client_id: Option<String>,

    /// Tenant (directory) ID.
    #[arg(long, env = "AZURE_TENANT_ID", required_unless_present = "emulate")]
    pub tenant_id: Option<String>,

    /// Entra authority host. China: https://login.chinacloudapi.cn; US Government:
    /// https://login.microsoftonline.us.
    #[arg(
        long,
        env = "AZURE_AUTHORITY_HOST",
        default_value = "https://login.microsoftonline.com"
    )]
    pub authority_host: String,

    /// Extra PEM CA certificates trusted for the authority host, on top of the system roots
    /// (TLS-inspecting proxies).
    #[arg(long, env = "IMDS_BROKER_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Shared secret that enables the App Service endpoint (/msi/token); callers must send it
    /// in X-IDENTITY-HEADER. Without it only the IMDS endpoint is served.
    #[arg(long, env = "IDENTITY_HEADER", hide_env_values = true)]
    pub identity_header: Option<String>,

    /// Object (principal) ID of the identity, so that `object_id`/`principal_id` selectors
    /// naming it are accepted. Without it such selectors get "Identity not found".
    #[arg(long, env = "IMDS_BROKER_OBJECT_ID")]
    pub object_id: Option<String>,

    /// ARM resource ID of the identity, so that `msi_res_id`/`mi_res_id` selectors naming it
    /// are accepted.
    #[arg(long, env = "IMDS_BROKER_RESOURCE_ID")]
    pub resource_id: Option<String>,

    /// Serve only these resources (repeatable; env comma-separated). Default: any resource.
    /// A Velero data mover needs only https://storage.azure.com/ (useAAD) and
    /// https://management.core.windows.net/ (storage account keys).
    #[arg(
        long = "allow-resource",
        env = "IMDS_BROKER_ALLOW_RESOURCES",
        value_delimiter = ','
    )]
    pub allow_resources: Vec<String>,

    /// Fetch a token for this resource at start-up (repeatable; env comma-separated).
    #[arg(long = "prefetch", env = "IMDS_BROKER_PREFETCH", value_delimiter = ',')]
    pub prefetch: Vec<String>,

    /// Replace Entra with a built-in local issuer of FAKE tokens (no Azure account, no token file).
    #[arg(long, env = "IMDS_BROKER_EMULATE")]
    pub emulate: bool,

    /// Lifetime of the emulator's tokens.
    #[arg(long, env = "IMDS_BROKER_EMULATOR_TOKEN_LIFETIME", default_value = "1h", value_parser = parse_duration)]
    pub emulator_token_lifetime: Duration,

    /// Entra attempts per exchange for transient failures (5xx, 429, timeouts, resets).
    #[arg(long, env = "IMDS_BROKER_RETRY_MAX_ATTEMPTS", default_value_t = 4)]
    pub retry_max_attempts: u32,

    /// First retry delay; doubles per attempt, with jitter.
    #[arg(long, env = "IMDS_BROKER_RETRY_INITIAL_BACKOFF", default_value = "500ms", value_parser = parse_duration)]
    pub retry_initial_backoff: Duration,

    /// Cap of the retry delay between Entra calls while Entra keeps failing.
    #[arg(long, env = "IMDS_BROKER_RETRY_MAX_BACKOFF", default_value = "8s", value_parser = parse_duration)]
    pub retry_max_backoff: Duration,

    /// After a permanent Entra failure (e.g. AADSTS70021), how long the error is answered from
    /// memory before Entra is asked again.
    #[arg(long, env = "IMDS_BROKER_ERROR_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub error_backoff: Duration,

    /// Longest wait honoured from Entra's Retry-After; a longer one is cut to this.
    #[arg(long, env = "IMDS_BROKER_MAX_RETRY_AFTER", default_value = "5m", value_parser = parse_duration)]
    pub max_retry_after: Duration,

    /// Token exchanges in flight at once, over all resources (Entra throttles per app).
    #[arg(long, env = "IMDS_BROKER_ENTRA_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub entra_concurrency: u16,

    /// Timeout of one Entra request (connect + response).
    #[arg(long, env = "IMDS_BROKER_ENTRA_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub entra_timeout: Duration,

    /// Maximum concurrent connections on the token listener; at the cap the connection idle
    /// longest is closed to make room. Memory budget: each connection costs at most its 8 KiB
    /// head buffer plus hyper's write buffer and task (~24 KiB), so 512 connections stay
    /// under 12 MiB, inside the 32 Mi limit the webhook injects.
    #[arg(long, env = "IMDS_BROKER_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,

    /// Time allowed to receive a request's headers, and to answer it: a caller waiting on
    /// Entra (an exchange, a backoff, a throttle) is held at most this long, then answered 503
    /// with a Retry-After of at most 20 s.
    #[arg(long, env = "IMDS_BROKER_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests get to finish.
    #[arg(long, env = "IMDS_BROKER_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

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

    let (trigger, shutdown) = listener::shutdown_channel();
    let limits = Limits {
        max_connections: args.max_connections,
        // A caller on loopback sends its head at once; seconds of waiting only serve slowloris.
        header_read_timeout: args.request_timeout.min(HEAD_TIMEOUT),
        max_header_bytes: 8 * 1024,
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
        // kubelet's probes and Prometheus: the idlest connection is evicted at the cap, and
        // a head must arrive within 2 s, so idle or slow clients cannot starve a probe.
        Limits {
            max_connections: 128,
            header_read_timeout: Duration::from_secs(2),
            max_header_bytes: 8 * 1024,
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
    for resource in prefetch {
        let broker = broker.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + PREFETCH_HOLD;
            if let Err(e) = broker.token(&Selector::Default, &resource, deadline).await {
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
        startup_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "imds-broker listening"
    );
    if let Err(reason) = broker.ready() {
        tracing::warn!(%reason, "not ready yet: token requests get 503 until this is fixed");
    }

    listener::termination_signal().await;
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
