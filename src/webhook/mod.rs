//! `imds-broker webhook`: a mutating admission webhook that injects the broker as a native
//! sidecar into the pods Velero creates (data movers, pod-volume backups/restores,
//! repository maintenance), because Velero copies env and volumes — but no containers — from
//! its node-agent template into those pods.
//!
//! - [`patch`]: pod + identity + configuration → JSONPatch (pure).
//! - [`review`]: AdmissionReview in/out and the skip/mutate/warn decision.
//! - [`identity`]: ServiceAccount annotation lookup with a TTL cache.
//! - [`tls`]: serving certificate with hot reload.
//! - [`http`]: the `POST /mutate` handler; [`body`]: reading its bodies within the memory
//!   budget; [`metrics`]: its Prometheus registry.
//! - `args`: the flags ([`WebhookArgs`]) and their checks.

mod args;
pub mod body;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod patch;
pub mod review;
pub mod tls;

pub use args::{WebhookArgs, DEFAULT_MATCH_LABELS};

use crate::admin::Admin;
use crate::listener::{self, Limits};
use anyhow::Context;
use metrics::{ReloadResult, WebhookMetrics};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsAcceptor;

/// Longest TLS handshake allowed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the webhook until SIGTERM/SIGINT.
pub async fn run(args: WebhookArgs) -> anyhow::Result<()> {
    let config = args.webhook_config()?;
    let cert = Arc::new(tls::ReloadingCert::load(
        &args.tls_cert_file,
        &args.tls_key_file,
    )?);
    let acceptor = TlsAcceptor::from(cert.server_config()?);
    let metrics = Arc::new(WebhookMetrics::new());
    let reviewer = Arc::new(review::Reviewer::new(
        config,
        args.identity_source()?,
        Arc::new(review::random_identity_header),
    ));

    let listener = listener::bind(args.listen, "webhook")?;
    let admin_listener = listener::bind(args.admin_listen, "admin")?;
    let (listen_bound, admin_bound) = (
        listener::bound_addr(&listener),
        listener::bound_addr(&admin_listener),
    );
    let (trigger, shutdown) = listener::shutdown_channel();
    let ready = Arc::new(AtomicBool::new(true));
    let open_files = listener::open_files::raise_for(args.max_connections);

    let admin = Admin {
        readiness: {
            let ready = ready.clone();
            Arc::new(move || {
                if ready.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("shutting down".to_string())
                }
            })
        },
        metrics: {
            let metrics = metrics.clone();
            let cert = cert.clone();
            // Read at each scrape from the certificate in service, so it changes exactly when
            // the served certificate does (start-up and every successful reload).
            Arc::new(move || {
                metrics.certificate_in_service(cert.not_after());
                metrics.render()
            })
        },
    };
    let admin_task = tokio::spawn(listener::serve(
        admin_listener,
        move |req, _peer| {
            let admin = admin.clone();
            async move { admin.handle(&req) }
        },
        Limits::admin(),
        shutdown.clone(),
        args.shutdown_grace,
    ));

    let limits = Limits {
        max_connections: args.max_connections,
        header_read_timeout: args.request_timeout,
        ..Limits::default()
    };
    let handler = http::MutateHandler {
        reviewer,
        metrics: metrics.clone(),
        intake: Arc::new(body::Intake::new(body::IntakeLimits {
            max_connections: args.max_connections,
            deadline: args.body_timeout,
            // A stalled body is as evictable as a connection idle between requests.
            stalled_after: limits.evictable_after,
        })),
    };
    // The API server's TLS handshake takes milliseconds; a connection that has not finished
    // one in a few seconds is idle or hostile.
    let handshake_timeout = args.request_timeout.min(HANDSHAKE_TIMEOUT);
    let webhook_task = tokio::spawn(listener::serve_with(
        listener,
        move |stream| {
            let acceptor = acceptor.clone();
            async move {
                tokio::time::timeout(handshake_timeout, acceptor.accept(stream))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })?
            }
        },
        move |req, _peer| {
            let handler = handler.clone();
            async move { handler.handle(req).await }
        },
        limits,
        shutdown.clone(),
        args.shutdown_grace,
    ));

    let reload_task = tokio::spawn(cert.clone().watch(
        args.tls_reload_interval,
        shutdown.clone(),
        move |outcome| {
            metrics.tls_reload(match outcome {
                tls::Reload::Reloaded => ReloadResult::Success,
                _ => ReloadResult::Failure,
            })
        },
    ));

    tracing::info!(listen = %listen_bound, admin_listen = %admin_bound, open_files, "webhook serving");
    listener::termination_signal().await;
    ready.store(false, Ordering::Relaxed);
    if !args.shutdown_delay.is_zero() {
        tracing::info!(delay = ?args.shutdown_delay, "draining before closing the listeners");
        tokio::time::sleep(args.shutdown_delay).await;
    }
    trigger.trigger();
    for (what, task) in [("admin", admin_task), ("webhook", webhook_task)] {
        task.await
            .with_context(|| format!("the {what} server task failed"))?;
    }
    reload_task.await.context("the TLS reload task failed")?;
    tracing::info!("webhook stopped");
    Ok(())
}
