//! The flags of `imds-broker webhook` (also read by `imds-broker inject`), and their checks:
//! the sidecar configuration is validated once, here, not in every injected pod.

use super::identity::{ApiConfig, IdentitySource, NoLookup, PartialIdentity, ServiceAccountLookup};
use super::{patch, review};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Label keys of the pods Velero creates for data movement and repository maintenance.
pub const DEFAULT_MATCH_LABELS: &[&str] = &[
    "velero.io/data-upload",
    "velero.io/data-download",
    "velero.io/pod-volume-backup",
    "velero.io/pod-volume-restore",
    "velero.io/repo-name",
];

use crate::broker::policy::{check_resource, same_resource};
use crate::values::{non_empty, parse_duration, parse_quantity, quantity_value};

fn parse_expiration(s: &str) -> Result<i64, String> {
    let v: i64 = s.parse().map_err(|e| format!("{e}"))?;
    if (patch::MIN_TOKEN_EXPIRATION..=patch::MAX_TOKEN_EXPIRATION).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "must be between {} and {} seconds",
            patch::MIN_TOKEN_EXPIRATION,
            patch::MAX_TOKEN_EXPIRATION
        ))
    }
}

#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// HTTPS listener for the API server's AdmissionReview calls (`POST /mutate`).
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_LISTEN",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: SocketAddr,

    /// Plain-HTTP admin listener: /healthz, /readyz, /metrics.
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_ADMIN_LISTEN",
        default_value = "0.0.0.0:8401"
    )]
    pub admin_listen: SocketAddr,

    /// PEM certificate chain served on --listen. Reloaded when it changes on disk.
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_TLS_CERT_FILE",
        default_value = "/etc/imds-broker/tls/tls.crt"
    )]
    pub tls_cert_file: PathBuf,

    /// PEM private key of --tls-cert-file. Reloaded when it changes on disk.
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_TLS_KEY_FILE",
        default_value = "/etc/imds-broker/tls/tls.key"
    )]
    pub tls_key_file: PathBuf,

    /// How often the certificate files are checked for changes.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,

    /// Inject pods that carry any of these label keys (repeatable; env comma-separated).
    /// Keep in step with the objectSelectors of the MutatingWebhookConfiguration.
    #[arg(
        long = "match-label",
        env = "IMDS_BROKER_WEBHOOK_MATCH_LABELS",
        value_delimiter = ',',
        default_values_t = DEFAULT_MATCH_LABELS.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    )]
    pub match_labels: Vec<String>,

    /// Image of the injected sidecar (the deploy manifests pass the webhook's own image).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE")]
    pub sidecar_image: String,

    /// imagePullPolicy of the injected sidecar.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
        value_parser = ["Always", "IfNotPresent", "Never"])]
    pub sidecar_image_pull_policy: String,

    /// Loopback port of the sidecar's token listener; IDENTITY_ENDPOINT is
    /// http://127.0.0.1:PORT/msi/token.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SIDECAR_PORT", default_value_t = 8400)]
    pub sidecar_port: u16,

    /// Port of the sidecar's admin listener (startup/liveness probes, metrics).
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_SIDECAR_ADMIN_PORT",
        default_value_t = 8401
    )]
    pub sidecar_admin_port: u16,

    /// CPU request of the sidecar (empty: none).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SIDECAR_CPU_REQUEST", default_value = "10m", value_parser = parse_quantity)]
    pub sidecar_cpu_request: String,

    /// Memory request of the sidecar (empty: none).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SIDECAR_MEMORY_REQUEST", default_value = "16Mi", value_parser = parse_quantity)]
    pub sidecar_memory_request: String,

    /// CPU limit of the sidecar (empty: none).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SIDECAR_CPU_LIMIT", default_value = "", value_parser = parse_quantity)]
    pub sidecar_cpu_limit: String,

    /// Memory limit of the sidecar (empty: none).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SIDECAR_MEMORY_LIMIT", default_value = "32Mi", value_parser = parse_quantity)]
    pub sidecar_memory_limit: String,

    /// Restrict the sidecar to these resources (repeatable; env comma-separated); passed to
    /// it as IMDS_BROKER_ALLOW_RESOURCES. Default: any resource.
    #[arg(
        long = "sidecar-allow-resource",
        env = "IMDS_BROKER_WEBHOOK_SIDECAR_ALLOW_RESOURCES",
        value_delimiter = ','
    )]
    pub sidecar_allow_resources: Vec<String>,

    /// Resources the sidecar fetches at start-up (repeatable; env comma-separated; "" for
    /// none); passed to it as IMDS_BROKER_PREFETCH. Each must pass --sidecar-allow-resource.
    #[arg(
        long = "sidecar-prefetch",
        env = "IMDS_BROKER_WEBHOOK_SIDECAR_PREFETCH",
        value_delimiter = ',',
        default_value = patch::DEFAULT_PREFETCH
    )]
    pub sidecar_prefetch: Vec<String>,

    /// Entra authority host passed to the sidecar as AZURE_AUTHORITY_HOST (sovereign clouds).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_AUTHORITY_HOST")]
    pub authority_host: Option<String>,

    /// Audience of the projected service-account token (the federated credential's audience).
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_TOKEN_AUDIENCE",
        default_value = patch::DEFAULT_AUDIENCE
    )]
    pub token_audience: String,

    /// Lifetime of the projected token in seconds (3600-86400); a pod's
    /// azure.workload.identity/service-account-token-expiration annotation overrides it.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_TOKEN_EXPIRATION", default_value = "3600", value_parser = parse_expiration)]
    pub token_expiration: i64,

    /// Client ID used when the pod's ServiceAccount has no azure.workload.identity/client-id
    /// annotation.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_CLIENT_ID")]
    pub client_id: Option<String>,

    /// Tenant ID used when the pod's ServiceAccount has no azure.workload.identity/tenant-id
    /// annotation.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_TENANT_ID")]
    pub tenant_id: Option<String>,

    /// API server base URL for ServiceAccount lookups. Default: the in-cluster address
    /// (KUBERNETES_SERVICE_HOST/PORT); `none` disables lookups (flags only).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_KUBE_API_URL")]
    pub kube_api_url: Option<String>,

    /// Bearer-token file for the API server. Default: the pod's service-account token when
    /// in-cluster, none with --kube-api-url.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_KUBE_TOKEN_FILE")]
    pub kube_token_file: Option<PathBuf>,

    /// PEM CA bundle of the API server. Default: the pod's service-account ca.crt when
    /// in-cluster, the system roots with --kube-api-url.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_KUBE_CA_FILE")]
    pub kube_ca_file: Option<PathBuf>,

    /// Timeout of one ServiceAccount lookup (the API server gives the webhook 5 s in all).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_KUBE_API_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub kube_api_timeout: Duration,

    /// How long a ServiceAccount's annotations are cached.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SERVICE_ACCOUNT_CACHE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub service_account_cache_ttl: Duration,

    /// Maximum concurrent HTTPS connections; at the cap the connection idle longest is
    /// closed to make room. An idle connection costs ~10 KiB, so 2048 of them (~20 MiB) and
    /// the large-review budget fit the 128 Mi limit.
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_MAX_CONNECTIONS",
        default_value_t = 2048
    )]
    pub max_connections: usize,

    /// Time allowed for the request head and the request body (the TLS handshake gets at
    /// most 3 s).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// After SIGTERM, keep serving (while /readyz fails) this long so the Service stops
    /// routing here before the listener closes.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// Then how long in-flight requests get to finish.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

impl WebhookArgs {
    /// The validated webhook policy.
    pub fn webhook_config(&self) -> anyhow::Result<review::WebhookConfig> {
        let labels: Vec<String> = self
            .match_labels
            .iter()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        anyhow::ensure!(
            !labels.is_empty(),
            "--match-label: at least one label key is needed"
        );
        anyhow::ensure!(
            !self.sidecar_image.trim().is_empty(),
            "--sidecar-image is empty"
        );
        anyhow::ensure!(
            self.sidecar_port != self.sidecar_admin_port,
            "--sidecar-port and --sidecar-admin-port must differ"
        );
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let allow_resources: Vec<String> = non_empty(&self.sidecar_allow_resources);
        let prefetch = non_empty(&self.sidecar_prefetch);
        for resource in &prefetch {
            // Checked here, once, because the sidecar refuses to start on a bad prefetch: a
            // mistake would otherwise surface as every injected pod failing its start-up probe.
            check_resource(resource)
                .map_err(|e| anyhow::anyhow!("--sidecar-prefetch {resource}: {e}"))?;
            anyhow::ensure!(
                allow_resources.is_empty()
                    || allow_resources.iter().any(|a| same_resource(a, resource)),
                "--sidecar-prefetch {resource} is not in --sidecar-allow-resource: the sidecar \
                 would refuse to start; allow it too, or set --sidecar-prefetch \"\" for no prefetch"
            );
        }
        let sidecar = patch::SidecarConfig {
            image: self.sidecar_image.trim().to_string(),
            image_pull_policy: self.sidecar_image_pull_policy.clone(),
            port: self.sidecar_port,
            admin_port: self.sidecar_admin_port,
            audience: self.token_audience.clone(),
            authority_host: self.authority_host.clone().filter(|h| !h.is_empty()),
            allow_resources,
            prefetch,
            cpu_request: opt(&self.sidecar_cpu_request),
            memory_request: opt(&self.sidecar_memory_request),
            cpu_limit: opt(&self.sidecar_cpu_limit),
            memory_limit: opt(&self.sidecar_memory_limit),
        };
        check_request_within_limit("cpu", &sidecar.cpu_request, &sidecar.cpu_limit)?;
        check_request_within_limit("memory", &sidecar.memory_request, &sidecar.memory_limit)?;
        Ok(review::WebhookConfig {
            match_labels: labels,
            fallback: PartialIdentity::new(self.client_id.as_deref(), self.tenant_id.as_deref()),
            sidecar,
            token_expiration_seconds: self.token_expiration,
        })
    }

    /// Where ServiceAccount annotations come from.
    pub(crate) fn identity_source(&self) -> anyhow::Result<Arc<dyn IdentitySource>> {
        let api = match self.kube_api_url.as_deref().map(str::trim) {
            Some("none") | Some("") => None,
            Some(url) => Some(ApiConfig {
                base_url: url.to_string(),
                token_file: self.kube_token_file.clone(),
                ca_file: self.kube_ca_file.clone(),
                timeout: self.kube_api_timeout,
            }),
            None => ApiConfig::in_cluster(self.kube_api_timeout).map(|mut api| {
                if let Some(t) = &self.kube_token_file {
                    api.token_file = Some(t.clone());
                }
                if let Some(c) = &self.kube_ca_file {
                    api.ca_file = Some(c.clone());
                }
                api
            }),
        };
        match api {
            Some(api) => {
                tracing::info!(api_server = %api.base_url, "ServiceAccount annotations are read from the API server");
                Ok(Arc::new(ServiceAccountLookup::new(
                    api,
                    self.service_account_cache_ttl,
                )?))
            }
            None => {
                tracing::warn!("no API server (not in a cluster, or --kube-api-url none): only --client-id/--tenant-id apply");
                Ok(Arc::new(NoLookup))
            }
        }
    }
}

fn check_request_within_limit(
    what: &str,
    request: &Option<String>,
    limit: &Option<String>,
) -> anyhow::Result<()> {
    if let (Some(r), Some(l)) = (request, limit) {
        let (rv, lv) = (quantity_value(r), quantity_value(l));
        if let (Some(rv), Some(lv)) = (rv, lv) {
            anyhow::ensure!(
                rv <= lv,
                "the sidecar {what} request {r} exceeds its limit {l}"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WebhookArgs,
    }

    fn parse(extra: &[&str]) -> Result<WebhookArgs, clap::Error> {
        let mut argv = vec!["x", "--sidecar-image", "img:1"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn defaults_give_the_documented_sidecar() {
        let cfg = parse(&[]).unwrap().webhook_config().unwrap();
        assert_eq!(cfg.match_labels.len(), 5);
        assert_eq!(cfg.sidecar.cpu_request.as_deref(), Some("10m"));
        assert_eq!(cfg.sidecar.memory_limit.as_deref(), Some("32Mi"));
        assert_eq!(cfg.sidecar.cpu_limit, None);
        assert_eq!(cfg.token_expiration_seconds, 3600);
        assert_eq!(cfg.fallback, PartialIdentity::default());
        assert_eq!(cfg.sidecar.prefetch, ["https://storage.azure.com/"]);
    }

    #[test]
    fn prefetch_must_be_allowed_and_empty_means_none() {
        let none = parse(&["--sidecar-prefetch", ""]).unwrap();
        assert!(none.webhook_config().unwrap().sidecar.prefetch.is_empty());
        // Velero's spelling (no slash) is the same resource as the allow-list entry.
        let ok = parse(&[
            "--sidecar-allow-resource",
            "https://storage.azure.com/",
            "--sidecar-prefetch",
            "https://storage.azure.com",
        ]);
        assert!(ok.unwrap().webhook_config().is_ok());
        let denied = parse(&["--sidecar-allow-resource", "https://management.azure.com/"]);
        let err = denied.unwrap().webhook_config().unwrap_err().to_string();
        assert!(err.contains("not in --sidecar-allow-resource"), "{err}");
        let invalid = parse(&["--sidecar-prefetch", "storage"]).unwrap();
        assert!(invalid.webhook_config().is_err());
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(parse(&["--token-expiration", "60"]).is_err());
        assert!(parse(&["--sidecar-memory-limit", "lots"]).is_err());
        assert!(parse(&["--sidecar-image-pull-policy", "Sometimes"]).is_err());
        let tight = parse(&["--sidecar-memory-request", "64Mi"]).unwrap();
        assert!(tight.webhook_config().is_err());
        let no_limit = parse(&[
            "--sidecar-memory-request",
            "64Mi",
            "--sidecar-memory-limit",
            "",
        ]);
        assert!(no_limit.unwrap().webhook_config().is_ok());
        let same_port = parse(&["--sidecar-port", "8401"]).unwrap();
        assert!(same_port.webhook_config().is_err());
    }
}
