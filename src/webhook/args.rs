//! The flags of `imds-broker webhook` (also read by `imds-broker inject`), and their checks:
//! the sidecar configuration is validated once, here, not in every injected pod.

use super::identity::{
    is_dns_name, ApiConfig, IdentitySource, NoLookup, PartialIdentity, ServiceAccountLookup,
};
use super::{patch, review};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Label keys of the pods the webhook injects by default: the pods Velero creates for data
/// movement and repository maintenance, every Job pod, and pods that opt in by label.
/// (tests/validate_k8s.py reads the keys from this array: no double quotes in its comments.)
pub const DEFAULT_MATCH_LABELS: &[&str] = &[
    "velero.io/data-upload",
    "velero.io/data-download",
    "velero.io/pod-volume-backup",
    "velero.io/pod-volume-restore",
    "velero.io/repo-name",
    // Every Job pod (the Job controller sets it since Kubernetes 1.27): Velero's repository
    // maintenance Jobs of every version, including those whose pods lack velero.io/repo-name
    // (velero#8974). The namespaceSelector limits it to Velero's namespace.
    "batch.kubernetes.io/job-name",
    // Opt-in: Velero's Helm values set it on the server and node-agent pods (podLabels,
    // nodeAgent.podLabels), so they get the sidecar too, without Azure Workload Identity.
    "imds-broker.io/sidecar",
];

use crate::authority;
use crate::broker::policy::{check_resource, same_resource};
use crate::listener::MAX_CONNECTIONS;
use crate::values::{
    duration_in, hours, millis, mins, non_empty, number_in, parse_quantity, quantity_value, secs,
};

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

    /// How often the certificate files are checked for changes (100ms–1h).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = duration_in(millis(100), hours(1)))]
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
    /// Required by `webhook`; `inject` shows a marked placeholder without it.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE")]
    pub sidecar_image: Option<String>,

    /// imagePullPolicy of the injected sidecar.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
        value_parser = ["Always", "IfNotPresent", "Never"])]
    pub sidecar_image_pull_policy: String,

    /// Secrets (docker-registry, in the pod's own namespace) added to the spec.imagePullSecrets
    /// of every injected pod that does not list them already, so a private sidecar image can
    /// be pulled (comma-separated; default none).
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE_PULL_SECRETS",
        value_name = "NAME",
        value_delimiter = ',',
        value_parser = parse_secret_name
    )]
    pub sidecar_image_pull_secrets: Vec<String>,

    /// Loopback port of the sidecar's token listener; IDENTITY_ENDPOINT is
    /// http://127.0.0.1:PORT/msi/token (1–65535).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SIDECAR_PORT", default_value_t = 8400, value_parser = number_in(1u16, u16::MAX))]
    pub sidecar_port: u16,

    /// Port of the sidecar's admin listener (startup/liveness probes, metrics), 1–65535.
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_SIDECAR_ADMIN_PORT",
        default_value_t = 8401,
        value_parser = number_in(1u16, u16::MAX)
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
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_TOKEN_EXPIRATION", default_value = "3600",
        value_parser = number_in(patch::MIN_TOKEN_EXPIRATION, patch::MAX_TOKEN_EXPIRATION))]
    pub token_expiration: i64,

    /// Client ID used when the pod's ServiceAccount has no azure.workload.identity/client-id
    /// annotation.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_CLIENT_ID")]
    pub client_id: Option<String>,

    /// Tenant ID used when the pod's ServiceAccount has no azure.workload.identity/tenant-id
    /// annotation.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_TENANT_ID")]
    pub tenant_id: Option<String>,

    /// What to do with a matched pod for which neither its ServiceAccount's annotations nor
    /// --client-id/--tenant-id give a client and a tenant ID: `refuse` it (admitted without the
    /// broker it would reach the node's IMDS), or `admit` it unchanged with a warning.
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_MISSING_IDENTITY",
        value_enum,
        default_value = "refuse"
    )]
    pub missing_identity: review::MissingIdentity,

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

    /// Timeout of one ServiceAccount lookup (the API server gives the webhook 5 s in all, and
    /// never more than 30 s), 100ms–30s.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_KUBE_API_TIMEOUT", default_value = "2s", value_parser = duration_in(millis(100), secs(30)))]
    pub kube_api_timeout: Duration,

    /// How long a ServiceAccount's annotations are cached (1s–1h: at 0s every admission
    /// would wait for the API server).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SERVICE_ACCOUNT_CACHE_TTL", default_value = "30s", value_parser = duration_in(secs(1), hours(1)))]
    pub service_account_cache_ttl: Duration,

    /// Maximum concurrent HTTPS connections; at the cap the connection idle longest is
    /// closed to make room. An idle connection costs ~10 KiB, so 2048 of them (~20 MiB) and
    /// the large-review budget fit the 128 Mi limit. 1–65536.
    #[arg(
        long,
        env = "IMDS_BROKER_WEBHOOK_MAX_CONNECTIONS",
        default_value_t = 2048,
        value_parser = number_in(1usize, MAX_CONNECTIONS)
    )]
    pub max_connections: usize,

    /// Time allowed for a request head, from the connection's opening or its last answer
    /// (the TLS handshake gets at most 3 s), 1s–5m.
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_REQUEST_TIMEOUT", default_value = "10s", value_parser = duration_in(secs(1), mins(5)))]
    pub request_timeout: Duration,

    /// Time allowed for a request body, from its head. The API server sends the body at once
    /// and waits for the answer only its timeoutSeconds (5 s in the chart): a body still
    /// arriving after this is cut (408) so it holds neither memory nor a connection.
    /// 100ms–30s (the API server's own limit).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_BODY_TIMEOUT", default_value = "2s", value_parser = duration_in(millis(100), secs(30)))]
    pub body_timeout: Duration,

    /// After SIGTERM, keep serving (while /readyz fails) this long so the Service stops
    /// routing here before the listener closes (0s–5m; 0s closes at once).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SHUTDOWN_DELAY", default_value = "5s", value_parser = duration_in(Duration::ZERO, mins(5)))]
    pub shutdown_delay: Duration,

    /// Then how long in-flight requests get to finish (1s–10m).
    #[arg(long, env = "IMDS_BROKER_WEBHOOK_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration_in(secs(1), mins(10)))]
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
        let image = self
            .sidecar_image
            .as_deref()
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--sidecar-image / IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE is required: the image \
                     of the sidecar to inject (the chart and the kustomize overlays pass the \
                     webhook's own image)"
                )
            })?;
        anyhow::ensure!(
            self.sidecar_port != self.sidecar_admin_port,
            "--sidecar-port and --sidecar-admin-port must differ"
        );
        // What the sidecar would refuse to start with is refused here, by the same checks.
        let fallback = PartialIdentity::new(self.client_id.as_deref(), self.tenant_id.as_deref());
        if let Some(tenant) = &fallback.tenant_id {
            authority::check_tenant(tenant)
                .map_err(|e| anyhow::anyhow!("--tenant-id / IMDS_BROKER_WEBHOOK_TENANT_ID {e}"))?;
        }
        let authority_host = self.authority_host.clone().filter(|h| !h.is_empty());
        if let Some(host) = &authority_host {
            authority::authority_url(host).map_err(|e| {
                anyhow::anyhow!("--authority-host / IMDS_BROKER_WEBHOOK_AUTHORITY_HOST {e}")
            })?;
        }
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
        let mut image_pull_secrets = non_empty(&self.sidecar_image_pull_secrets);
        dedup_in_order(&mut image_pull_secrets);
        let sidecar = patch::SidecarConfig {
            image: image.to_owned(),
            image_pull_policy: self.sidecar_image_pull_policy.clone(),
            image_pull_secrets,
            port: self.sidecar_port,
            admin_port: self.sidecar_admin_port,
            audience: self.token_audience.clone(),
            authority_host,
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
            fallback,
            missing_identity: self.missing_identity,
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

/// A Secret name for --sidecar-image-pull-secrets: a DNS-1123 subdomain, as the API server
/// requires of a Secret's name (an empty entry is dropped later, so `""` means none).
fn parse_secret_name(s: &str) -> Result<String, String> {
    let name = s.trim();
    if name.is_empty() || is_dns_name(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is not a Secret name (a DNS-1123 subdomain: lowercase letters, digits, \
             '-' and '.', starting and ending with a letter or digit, at most 253 characters)"
        ))
    }
}

/// Drops repeated entries, keeping the first of each.
fn dedup_in_order(list: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    list.retain(|s| seen.insert(s.clone()));
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
        assert_eq!(
            cfg.match_labels,
            [
                "velero.io/data-upload",
                "velero.io/data-download",
                "velero.io/pod-volume-backup",
                "velero.io/pod-volume-restore",
                "velero.io/repo-name",
                "batch.kubernetes.io/job-name",
                "imds-broker.io/sidecar",
            ]
        );
        assert_eq!(cfg.missing_identity, review::MissingIdentity::Refuse);
        assert!(cfg.sidecar.image_pull_secrets.is_empty());
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
    fn image_pull_secrets_are_secret_names_refused_at_parse_time() {
        let cfg = parse(&[
            "--sidecar-image-pull-secrets",
            "acr-pull,mirror.io,acr-pull",
        ]);
        let secrets = cfg
            .unwrap()
            .webhook_config()
            .unwrap()
            .sidecar
            .image_pull_secrets;
        assert_eq!(secrets, ["acr-pull", "mirror.io"]);
        let none = parse(&["--sidecar-image-pull-secrets", ""]).unwrap();
        assert!(none
            .webhook_config()
            .unwrap()
            .sidecar
            .image_pull_secrets
            .is_empty());
        for bad in ["ACR", "acr_pull", "-acr", "a..b", "acr/pull"] {
            let err = parse(&["--sidecar-image-pull-secrets", &format!("ok,{bad}")]).unwrap_err();
            // A usage error (exit 2) naming the flag and the value.
            assert_eq!(err.exit_code(), 2, "{bad}");
            let text = err.to_string();
            assert!(
                text.contains("--sidecar-image-pull-secrets")
                    && text.contains(bad)
                    && text.contains("DNS-1123"),
                "{text}"
            );
        }
    }

    #[test]
    fn missing_identity_is_refuse_or_admit() {
        let admit = parse(&["--missing-identity", "admit"]).unwrap();
        assert_eq!(
            admit.webhook_config().unwrap().missing_identity,
            review::MissingIdentity::Admit
        );
        let err = parse(&["--missing-identity", "warn"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("refuse, admit"), "{err}");
    }

    #[test]
    fn the_webhook_needs_a_sidecar_image() {
        for argv in [&["x"][..], &["x", "--sidecar-image", " "]] {
            let args = Cli::try_parse_from(argv).unwrap().args;
            let err = args.webhook_config().unwrap_err().to_string();
            assert!(
                err.contains("--sidecar-image") && err.contains("required"),
                "{err}"
            );
        }
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

    #[test]
    fn numbers_and_durations_outside_their_range_are_refused_with_the_range() {
        for (flag, value, range) in [
            ("--max-connections", "3000000000000000000", "1–65536"),
            ("--max-connections", "0", "1–65536"),
            ("--request-timeout", "0s", "1s–5m"),
            ("--body-timeout", "31s", "100ms–30s"),
            ("--kube-api-timeout", "0s", "100ms–30s"),
            ("--service-account-cache-ttl", "0s", "1s–1h"),
            ("--tls-reload-interval", "0s", "100ms–1h"),
            ("--shutdown-delay", "6m", "0s–5m"),
            ("--shutdown-grace", "0s", "1s–10m"),
            ("--sidecar-port", "0", "1–65535"),
            ("--sidecar-admin-port", "0", "1–65535"),
            ("--token-expiration", "60", "3600–86400"),
        ] {
            let err = parse(&[flag, value]).unwrap_err().to_string();
            crate::values::assert_out_of_range(&err, flag, value, range);
        }
        assert!(parse(&["--shutdown-delay", "0s"]).is_ok());
    }

    /// Whatever identity settings the webhook accepts, the sidecar it injects starts with: its
    /// env, given to `serve`'s own flag parser and checks (an env name `serve` does not read
    /// fails too).
    #[test]
    fn whatever_the_webhook_accepts_the_injected_sidecar_starts_with() {
        use clap::CommandFactory;
        #[derive(Parser)]
        struct Serve {
            #[command(flatten)]
            args: crate::serve::ServeArgs,
        }
        let serve = Serve::command();
        let tenants = [
            "organizations",
            "common",
            "contoso.onmicrosoft.com",
            "x/../y",
        ];
        let hosts = ["http://login.example", "https://login.microsoftonline.us/"];
        let mut accepted = 0;
        for (tenant, host) in tenants
            .iter()
            .flat_map(|t| hosts.iter().map(move |h| (t, h)))
        {
            let flags = [
                "--client-id",
                "c",
                "--tenant-id",
                tenant,
                "--authority-host",
                host,
            ];
            let Ok(cfg) = parse(&flags).unwrap().webhook_config() else {
                continue;
            };
            accepted += 1;
            let identity = cfg.fallback.complete().unwrap();
            let injection = patch::Injection {
                identity: &identity,
                identity_header: "h",
                token_expiration_seconds: 3600,
            };
            let sidecar = patch::sidecar_container(&cfg.sidecar, &injection);
            let mut argv = sidecar.args.clone().unwrap();
            for var in sidecar.env.unwrap() {
                let flag = serve
                    .get_arguments()
                    .find(|a| a.get_env().is_some_and(|e| e == var.name.as_str()))
                    .and_then(|a| a.get_long())
                    .unwrap_or_else(|| panic!("serve reads no {}", var.name));
                argv.push(format!("--{flag}={}", var.value.unwrap()));
            }
            let args = Serve::try_parse_from(&argv).unwrap().args;
            let started = args.validate();
            assert!(started.is_ok(), "{tenant} {host}: {started:?}");
        }
        assert_eq!(
            accepted, 1,
            "only the domain tenant with the https authority"
        );
    }

    /// The sidecar (`serve`) refuses these at start-up: injected, they would crash-loop it in
    /// every pod, so the webhook (and `inject`) refuses to start with them.
    #[test]
    fn identity_settings_the_sidecar_refuses_are_refused() {
        let tenant = parse(&["--tenant-id", "organizations"]).unwrap();
        let err = tenant.webhook_config().unwrap_err().to_string();
        assert!(
            err.contains("--tenant-id") && err.contains("\"organizations\""),
            "{err}"
        );
        let http = parse(&["--authority-host", "http://login.microsoftonline.us"]).unwrap();
        let err = http.webhook_config().unwrap_err().to_string();
        assert!(
            err.contains("--authority-host") && err.contains("https://"),
            "{err}"
        );
        let ok = parse(&[
            "--tenant-id",
            "contoso.onmicrosoft.com",
            "--authority-host",
            "https://login.microsoftonline.us/",
        ]);
        assert!(ok.unwrap().webhook_config().is_ok());
    }
}
