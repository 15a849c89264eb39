//! The running broker that `serve` and `node` share: exchanger, broker and protocol service
//! built from the serve flags, the admin listener, the token listeners' limits, prefetch and
//! preconnect, the effective-configuration log line, and the shutdown sequence. The two
//! commands differ only in how their token listeners are bound and whom they answer
//! ([`Front`]).

use super::{exchanger, ServeArgs, EMULATOR_TENANT_ID};
use crate::admin::{Admin, Readiness};
use crate::broker::{Broker, BrokerConfig, GateLimits, Identity, RetryPolicy, Selector};
use crate::exchange::Exchanger;
use crate::listener::{self, Body, Limits, OutsidePeer, ShutdownTrigger};
use crate::metrics::Metrics;
use crate::protocol::app_service::IdentityHeader;
use crate::protocol::refusals::RefusalLog;
use crate::protocol::service::framing_errors;
use crate::protocol::TokenService;
use crate::values::non_empty;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Longest wait for a complete request head on the token listener.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head on the token listener.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Time left of the shutdown grace period when callers still waiting are answered.
const GRACE_MARGIN: Duration = Duration::from_millis(250);
/// How long a start-up prefetch keeps trying before it leaves the resource to requests.
const PREFETCH_HOLD: Duration = Duration::from_secs(60);

/// The broker and its token service, built but not yet listening.
pub(crate) struct Core {
    pub metrics: Arc<Metrics>,
    pub broker: Arc<Broker>,
    pub service: Arc<TokenService>,
    preconnect: Arc<dyn Exchanger>,
    prefetch: Vec<String>,
    allow_shown: String,
    grace_trigger: ShutdownTrigger,
}

/// The token listeners and how they answer: what `serve` and `node` do differently.
pub(crate) struct Front<H> {
    pub listeners: Vec<TcpListener>,
    /// Answers each request, given its peer address.
    pub handler: H,
    /// `Some`: only peers inside this network namespace are served (see `listener::peers`).
    pub outside_peer: Option<OutsidePeer>,
    /// The admin listener's `/readyz`.
    pub readiness: Readiness,
    /// Bind the admin listener with SO_REUSEPORT too: a node broker's surge pod shares the
    /// node's ports with the one it replaces during a rolling update.
    pub reuse_port: bool,
}

impl Core {
    /// Builds the exchanger, the broker and the token service from `args` (already
    /// validated), with `metrics` (which a command may have added its own metrics to).
    pub fn new(args: &ServeArgs, metrics: Metrics) -> anyhow::Result<Core> {
        let metrics = Arc::new(metrics);
        let (exchanger, client_id) = exchanger(args)?;
        let allow = (!args.allow_resources.is_empty()).then(|| non_empty(&args.allow_resources));
        let allow_shown = list_or(allow.as_deref().unwrap_or_default(), "any");
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
            exchanger.clone(),
            metrics.clone(),
        ));
        let prefetch = non_empty(&args.prefetch);
        for resource in &prefetch {
            broker
                .authorize(&Selector::Default, resource)
                .map_err(|e| anyhow::anyhow!("--prefetch {resource}: {e}"))?;
        }
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
            grace_over,
        });
        Ok(Core {
            metrics,
            broker,
            service,
            preconnect: exchanger,
            prefetch,
            allow_shown,
            grace_trigger,
        })
    }

    /// `/readyz` of the broker alone (a usable token file, Entra not refusing).
    pub fn broker_readiness(&self) -> Readiness {
        let broker = self.broker.clone();
        Arc::new(move || broker.ready())
    }

    /// The probes and metrics, with `readiness` as `/readyz`.
    pub fn admin(&self, readiness: Readiness) -> Admin {
        let broker = self.broker.clone();
        let metrics = self.metrics.clone();
        Admin {
            readiness,
            metrics: Arc::new(move || {
                broker.update_gauges();
                metrics.render()
            }),
        }
    }

    /// Binds the admin listener, serves `front`'s token listeners and the admin listener,
    /// starts prefetch or preconnect, logs the effective configuration, and runs until
    /// SIGTERM/SIGINT; then drains within `--shutdown-grace`.
    pub async fn run<H, F>(
        self,
        args: &ServeArgs,
        front: Front<H>,
        started: Instant,
    ) -> anyhow::Result<()>
    where
        H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        // Bind everything before reporting ready, so a port clash fails the start loudly.
        let admin_listener = if front.reuse_port {
            listener::bind_reusing_port(args.admin_listen, "admin")?
        } else {
            listener::bind(args.admin_listen, "admin")?
        };
        let bound: Vec<String> = front
            .listeners
            .iter()
            .map(listener::bound_addr)
            .filter(|a| !a.is_empty())
            .collect();
        let admin_bound = listener::bound_addr(&admin_listener);
        let admin = self.admin(front.readiness);

        let (trigger, shutdown) = listener::shutdown_channel();
        let open_files = listener::open_files::raise_for(args.max_connections);
        let limits = Limits {
            max_connections: args.max_connections,
            // One cap for all token listeners (transparent mode has two): the memory budget is
            // per pod, not per listener.
            shared_slots: Some(listener::Slots::new(args.max_connections)),
            // A caller sends its head at once; seconds of waiting only serve slowloris.
            header_read_timeout: args.request_timeout.min(HEAD_TIMEOUT),
            max_header_bytes: MAX_HEAD_BYTES,
            framing_error_body: Some(framing_errors(self.metrics.clone(), MAX_HEAD_BYTES)),
            outside_peer: front.outside_peer,
            ..Limits::default()
        };
        let mut tasks = tokio::task::JoinSet::new();
        for listener in front.listeners {
            tasks.spawn(listener::serve(
                listener,
                front.handler.clone(),
                limits.clone(),
                shutdown.clone(),
                args.shutdown_grace,
            ));
        }
        let admin_handler = move |req: Request<Incoming>, _peer| {
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
        self.warm_up(args.emulate);

        // The effective configuration, so a log shows what this broker was actually given (no
        // secret: the identity header is reported only as where it came from).
        let identity = self.broker.identity();
        tracing::info!(
            listen = %bound.join(","),
            admin_listen = %admin_bound,
            app_service = app_service_source(args),
            emulate = args.emulate,
            client_id = %identity.client_id,
            tenant_id = args.tenant_id.as_deref().unwrap_or(EMULATOR_TENANT_ID).trim(),
            object_id = identity.object_id.as_deref().unwrap_or("-"),
            resource_id = identity.resource_id.as_deref().unwrap_or("-"),
            authority = if args.emulate { "emulator" } else { args.authority_host.as_str() },
            token_file = %args.token_file.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
            token_audience = %args.token_audience,
            allow_resources = %self.allow_shown,
            prefetch = %list_or(&self.prefetch, "-"),
            max_connections = args.max_connections,
            open_files,
            request_timeout = ?args.request_timeout,
            entra_concurrency = args.entra_concurrency,
            retry_max_attempts = args.retry_max_attempts,
            max_retry_after = ?args.max_retry_after,
            startup_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "imds-broker listening"
        );
        if let Err(reason) = self.broker.ready() {
            tracing::warn!(%reason, "not ready yet: token requests get 503 until this is fixed");
        }

        listener::termination_signal().await;
        trigger.trigger();
        // Waiting callers get their 503 just before the listeners' grace period runs out, so the
        // answer is written before the connection is dropped.
        let answer_waiting_at = args.shutdown_grace.saturating_sub(GRACE_MARGIN);
        let grace_trigger = self.grace_trigger;
        tokio::spawn(async move {
            tokio::time::sleep(answer_waiting_at).await;
            grace_trigger.trigger();
        });
        while tasks.join_next().await.is_some() {}
        tracing::info!("imds-broker stopped");
        Ok(())
    }

    /// Prefetches the `--prefetch` resources, or else connects to Entra ahead of the first
    /// request.
    fn warm_up(&self, emulate: bool) {
        if self.prefetch.is_empty() && !emulate {
            // A prefetch connects anyway; without one, a data-mover pod's first token request
            // would also pay for DNS, TCP and TLS to Entra (bench/RESULTS.md, cold path).
            let preconnect = self.preconnect.clone();
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
        for resource in &self.prefetch {
            let (broker, resource) = (self.broker.clone(), resource.clone());
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + PREFETCH_HOLD;
                if let Err(e) = broker.token(&Selector::Default, &resource, deadline).await {
                    tracing::warn!(%resource, error = %e, "prefetch failed; requests will retry");
                }
            });
        }
    }
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
