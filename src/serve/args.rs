//! The flags of `imds-broker serve`, and the checks that refuse a value the broker would
//! otherwise change silently or that would hand tokens to the wrong audience.

use crate::listener::MAX_CONNECTIONS;
use crate::values::{duration_in, hours, millis, mins, number_in, secs, show_duration};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
/// Flags of `imds-broker serve`.
pub struct ServeArgs {
    /// Token listener(s). Loopback only by default. Every token listener serves only callers
    /// inside this pod's network namespace; others get 403. Repeat (or comma-separate) to
    /// listen on several addresses, e.g. `169.254.169.254:80` in transparent mode.
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

    /// Lifetime of the emulator's tokens (1s–24h: Entra's own live 1-24 h; seconds let tests
    /// watch refreshes). Under 5 minutes SDKs treat every token as expiring and ask again on
    /// each call.
    #[arg(long, env = "IMDS_BROKER_EMULATOR_TOKEN_LIFETIME", default_value = "1h", value_parser = duration_in(secs(1), hours(24)))]
    pub emulator_token_lifetime: Duration,

    /// Entra attempts per exchange for transient failures (5xx, 429, timeouts, resets), 1–10.
    #[arg(long, env = "IMDS_BROKER_RETRY_MAX_ATTEMPTS", default_value_t = 4, value_parser = number_in(1u32, 10))]
    pub retry_max_attempts: u32,

    /// First retry delay; doubles per attempt, with jitter (50ms–1m: at 0s an outage made the
    /// refresher call Entra back to back).
    #[arg(long, env = "IMDS_BROKER_RETRY_INITIAL_BACKOFF", default_value = "500ms", value_parser = duration_in(millis(50), mins(1)))]
    pub retry_initial_backoff: Duration,

    /// Cap of the retry delay between Entra calls while Entra keeps failing (50ms–10m, and at
    /// least --retry-initial-backoff).
    #[arg(long, env = "IMDS_BROKER_RETRY_MAX_BACKOFF", default_value = "8s", value_parser = duration_in(millis(50), mins(10)))]
    pub retry_max_backoff: Duration,

    /// After a permanent Entra failure (e.g. AADSTS70021), how long the error is answered from
    /// memory before Entra is asked again (1s–1h).
    #[arg(long, env = "IMDS_BROKER_ERROR_BACKOFF", default_value = "30s", value_parser = duration_in(secs(1), hours(1)))]
    pub error_backoff: Duration,

    /// Longest wait honoured from Entra's Retry-After; a longer one is cut to this (1s–1h).
    #[arg(long, env = "IMDS_BROKER_MAX_RETRY_AFTER", default_value = "5m", value_parser = duration_in(secs(1), hours(1)))]
    pub max_retry_after: Duration,

    /// Token exchanges in flight at once, over all resources (Entra throttles per app), 1–64.
    #[arg(long, env = "IMDS_BROKER_ENTRA_CONCURRENCY", default_value_t = 4, value_parser = number_in(1u16, 64))]
    pub entra_concurrency: u16,

    /// Timeout of one Entra request (connect + response), 1s–5m.
    #[arg(long, env = "IMDS_BROKER_ENTRA_TIMEOUT", default_value = "10s", value_parser = duration_in(secs(1), mins(5)))]
    pub entra_timeout: Duration,

    /// Maximum concurrent connections over all token listeners (one cap shared by every
    /// --listen address); at the cap the connection idle longest (500 ms or more) is closed to
    /// make room. 1024 lets a burst of 1,000 first requests in at once; with every one holding
    /// a full 8 KiB head, and the admin listener full too, the broker stays inside the 32 Mi
    /// limit the webhook injects (bench/RESULTS.md, bench/broker_load.py). 1–65536: more
    /// would be gigabytes of heads, and past 2^61 the slot semaphore panics.
    #[arg(long, env = "IMDS_BROKER_MAX_CONNECTIONS", default_value_t = 1024, value_parser = number_in(1usize, MAX_CONNECTIONS))]
    pub max_connections: usize,

    /// Time allowed to receive a request's headers, and to answer it: a caller waiting on
    /// Entra (an exchange, a backoff, a throttle) is held at most this long, then answered 503
    /// with a Retry-After of at most 20 s (1s–5m).
    #[arg(long, env = "IMDS_BROKER_REQUEST_TIMEOUT", default_value = "30s", value_parser = duration_in(secs(1), mins(5)))]
    pub request_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests get to finish (1s–10m: waiting callers
    /// are answered 250 ms before its end).
    #[arg(long, env = "IMDS_BROKER_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration_in(secs(1), mins(10)))]
    pub shutdown_grace: Duration,
}

/// SDKs (azidentity, azure-identity, @azure/identity) refresh a token with less left than this.
const SDK_REFRESH_WINDOW: Duration = Duration::from_secs(300);

impl ServeArgs {
    /// Refuses values that would otherwise be changed or ignored without a word.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(header) = &self.identity_header {
            anyhow::ensure!(
                !header.trim().is_empty(),
                "--identity-header / IDENTITY_HEADER is set but empty: give the shared secret \
                 the app containers send as X-IDENTITY-HEADER, or unset it to serve IMDS only"
            );
        }
        if let Some(tenant) = self.tenant_id.as_deref().filter(|t| !t.trim().is_empty()) {
            check_tenant(tenant.trim())?;
        }
        if !self.emulate {
            crate::authority::authority_url(&self.authority_host)
                .map_err(|e| anyhow::anyhow!("--authority-host / AZURE_AUTHORITY_HOST {e}"))?;
        }
        // Otherwise the cap would silently win over the first delay.
        anyhow::ensure!(
            self.retry_max_backoff >= self.retry_initial_backoff,
            "--retry-max-backoff {} is below --retry-initial-backoff {}: the cap must be at \
             least the first delay",
            show_duration(self.retry_max_backoff),
            show_duration(self.retry_initial_backoff)
        );
        Ok(())
    }

    /// Settings that are allowed but worth a warning line at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for addr in &self.listen {
            if !addr.ip().is_loopback() && !is_link_local(addr) {
                out.push(format!(
                    "--listen {addr} is not a loopback address: other pods and the node can \
                     connect to it; they are answered 403 (only callers inside this pod get \
                     tokens) but take connection slots; use 127.0.0.1 unless a NetworkPolicy \
                     keeps it private"
                ));
            }
        }
        out.extend(self.broker_warnings());
        out
    }

    /// The warnings about the broker's own settings (not its listeners), which `node` shares.
    pub fn broker_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.emulate && self.emulator_token_lifetime < SDK_REFRESH_WINDOW {
            out.push(format!(
                "--emulator-token-lifetime {:?} is under 5 minutes: Azure SDKs consider such a \
                 token expiring and ask the broker again on every call",
                self.emulator_token_lifetime
            ));
        }
        out
    }
}

/// 169.254.169.254 in transparent mode lives on the pod's own loopback (init-network).
fn is_link_local(addr: &SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_link_local(),
        std::net::IpAddr::V6(_) => false,
    }
}

/// The tenant becomes a path segment of the authority URL; the check is the one the webhook
/// applies to what it injects.
fn check_tenant(tenant: &str) -> anyhow::Result<()> {
    crate::authority::check_tenant(tenant)
        .map_err(|e| anyhow::anyhow!("--tenant-id / AZURE_TENANT_ID {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut argv = vec!["x", "--emulate"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn values_that_would_be_changed_silently_are_refused() {
        assert!(parse(&["--retry-max-attempts", "0"]).is_err());
        assert!(parse(&["--retry-max-attempts", "11"]).is_err());
        assert!(parse(&["--retry-max-attempts", "1"]).is_ok());
        let empty_header = parse(&["--identity-header", " "]).unwrap();
        let err = empty_header.validate().unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let zero = parse(&["--emulator-token-lifetime", "0s"]).unwrap_err();
        assert!(zero.to_string().contains("allowed range 1s–24h"), "{zero}");
        assert!(parse(&["--emulator-token-lifetime", "25h"]).is_err());
        let short = parse(&["--emulator-token-lifetime", "2s"]).unwrap();
        assert!(short.validate().is_ok());
        assert!(short
            .warnings()
            .iter()
            .any(|w| w.contains("under 5 minutes")));
    }

    #[test]
    fn numbers_and_durations_outside_their_range_are_refused_with_the_range() {
        for (flag, value, range) in [
            ("--max-connections", "3000000000000000000", "1–65536"),
            ("--max-connections", "0", "1–65536"),
            ("--retry-initial-backoff", "0s", "50ms–1m"),
            ("--retry-max-backoff", "0s", "50ms–10m"),
            ("--error-backoff", "0s", "1s–1h"),
            ("--max-retry-after", "0s", "1s–1h"),
            ("--entra-timeout", "0s", "1s–5m"),
            ("--request-timeout", "0s", "1s–5m"),
            ("--request-timeout", "500000000000y", "1s–5m"),
            ("--shutdown-grace", "0s", "1s–10m"),
            ("--entra-concurrency", "65", "1–64"),
        ] {
            let err = parse(&[flag, value]).unwrap_err().to_string();
            crate::values::assert_out_of_range(&err, flag, value, range);
        }
        assert_eq!(
            parse(&["--max-connections", "65536"])
                .unwrap()
                .max_connections,
            65_536
        );
        let inverted = parse(&[
            "--retry-initial-backoff",
            "10s",
            "--retry-max-backoff",
            "5s",
        ]);
        let err = inverted.unwrap().validate().unwrap_err().to_string();
        assert!(
            err.contains("--retry-max-backoff 5s is below --retry-initial-backoff 10s"),
            "{err}"
        );
    }

    #[test]
    fn tenants_are_guids_or_domains() {
        for ok in [
            "72f988bf-86f1-41af-91ab-2d7cd011db47",
            "contoso.onmicrosoft.com",
            "fabrikam.com",
        ] {
            assert!(check_tenant(ok).is_ok(), "{ok}");
        }
        for bad in [
            "bad tenant/../",
            "t",
            "contoso",
            "a..b",
            "-x.com",
            "x.com/oauth2",
            "x.com?q",
        ] {
            let err = check_tenant(bad).unwrap_err().to_string();
            assert!(err.contains("--tenant-id"), "{bad}: {err}");
        }
    }

    #[test]
    fn non_loopback_listeners_are_warned_about() {
        let quiet = parse(&["--listen", "127.0.0.1:8400,169.254.169.254:80"]).unwrap();
        assert!(quiet.warnings().is_empty(), "{:?}", quiet.warnings());
        let open = parse(&["--listen", "0.0.0.0:8400"]).unwrap();
        let w = open.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("0.0.0.0:8400"), "{w:?}");
    }
}
