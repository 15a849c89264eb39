//! Command-line flags and their environment-variable bindings.
//!
//! Every flag can also be set through the environment variable named in its help, so the same
//! image can be configured from a pod spec (env) or a shell (flags). Durations take humantime
//! syntax: `500ms`, `30s`, `5m`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Sidecar that serves Entra workload-identity tokens on the Azure IMDS and App Service
/// managed-identity endpoints, so unmodified Azure SDK clients authenticate without the
/// Azure Workload Identity label.
#[derive(Debug, Parser)]
#[command(name = "imds-broker", version, about, long_about = None)]
pub struct Cli {
    /// Log format: `json` (one object per line, for log pipelines) or `text` (for humans).
    /// The level is set with RUST_LOG (default `info`).
    #[arg(
        long,
        global = true,
        env = "IMDS_BROKER_LOG_FORMAT",
        default_value = "json"
    )]
    pub log_format: LogFormat,

    /// Worker threads of the async runtime. Default: 2 (1 on a single CPU), or Tokio's
    /// TOKIO_WORKER_THREADS when that is set. One pod's token traffic needs no more, and
    /// Tokio's own default, one worker per CPU of the node, cost every pod on a 64-CPU node
    /// 64 threads and +0.9 MiB of memory.
    #[arg(
        long,
        global = true,
        env = "IMDS_BROKER_WORKER_THREADS",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub worker_threads: Option<u16>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The worker count to configure, or `None` to leave it to TOKIO_WORKER_THREADS.
    pub fn workers(&self) -> Option<usize> {
        if let Some(n) = self.worker_threads {
            return Some(n.into());
        }
        if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
            return None;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some(cpus.min(2))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the token broker (the sidecar).
    Serve(Box<ServeArgs>),
    /// Run the mutating admission webhook that injects the broker into matching pods.
    Webhook(Box<crate::webhook::WebhookArgs>),
    /// Route 169.254.169.254 to this pod's loopback interface (init container, needs NET_ADMIN).
    InitNetwork(crate::netns::InitNetworkArgs),
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 5m)"))
}

#[derive(Debug, Clone, Args)]
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

    /// Cap of the retry delay (also the longest Retry-After waited inside one request).
    #[arg(long, env = "IMDS_BROKER_RETRY_MAX_BACKOFF", default_value = "8s", value_parser = parse_duration)]
    pub retry_max_backoff: Duration,

    /// After a permanent Entra failure (e.g. AADSTS70021), how long the error is answered from
    /// memory before Entra is asked again.
    #[arg(long, env = "IMDS_BROKER_ERROR_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub error_backoff: Duration,

    /// Timeout of one Entra request (connect + response).
    #[arg(long, env = "IMDS_BROKER_ENTRA_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub entra_timeout: Duration,

    /// Maximum concurrent connections on the token listener; further connections wait.
    #[arg(long, env = "IMDS_BROKER_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Time allowed to receive a request's headers, and to answer it.
    #[arg(long, env = "IMDS_BROKER_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests get to finish.
    #[arg(long, env = "IMDS_BROKER_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_default_to_at_most_two_and_can_be_set() {
        let cli = Cli::try_parse_from(["imds-broker", "serve", "--emulate"]).unwrap();
        if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            let n = cli.workers().unwrap();
            assert!((1..=2).contains(&n), "{n}");
        }
        let cli =
            Cli::try_parse_from(["imds-broker", "serve", "--emulate", "--worker-threads", "3"])
                .unwrap();
        assert_eq!(cli.workers(), Some(3));
        let zero =
            Cli::try_parse_from(["imds-broker", "--worker-threads", "0", "serve", "--emulate"]);
        assert!(zero.is_err(), "0 workers is refused");
    }
}
