//! Which Azure identity a pod gets: the `azure.workload.identity/client-id` and `tenant-id`
//! annotations of its ServiceAccount, read through the API server with a plain GET (no
//! client library) and cached for a short TTL.
//!
//! The API base URL, the bearer-token file and the CA are injectable so tests can point the
//! lookup at a fake API server.

use crate::capped_read::{self, ReadError};
use async_trait::async_trait;
use k8s_openapi::api::core::v1::ServiceAccount;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// ServiceAccount annotation naming the client (application) ID.
pub const CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";
/// ServiceAccount annotation naming the tenant ID.
pub const TENANT_ID_ANNOTATION: &str = "azure.workload.identity/tenant-id";

/// In-cluster defaults.
pub const IN_CLUSTER_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const IN_CLUSTER_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// Largest number of ServiceAccounts kept in the cache.
const MAX_ENTRIES: usize = 1024;

/// Largest API-server answer read for one ServiceAccount. The API server caps an object's
/// annotations at 256 KiB in all, and a ServiceAccount carries little else; a larger answer
/// (a proxy's page, a hostile peer) is refused, not buffered.
pub const MAX_ANSWER_BYTES: usize = 512 * 1024;

/// An identity that may be incomplete: one source can give the client ID and another the
/// tenant ID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartialIdentity {
    pub client_id: Option<String>,
    pub tenant_id: Option<String>,
}

impl PartialIdentity {
    pub fn new(client_id: Option<&str>, tenant_id: Option<&str>) -> Self {
        let clean = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(String::from);
        PartialIdentity {
            client_id: clean(client_id),
            tenant_id: clean(tenant_id),
        }
    }

    /// Fills the fields this one lacks from `fallback`.
    pub fn or(self, fallback: &PartialIdentity) -> PartialIdentity {
        PartialIdentity {
            client_id: self.client_id.or_else(|| fallback.client_id.clone()),
            tenant_id: self.tenant_id.or_else(|| fallback.tenant_id.clone()),
        }
    }

    /// The complete identity, if both fields are known.
    pub fn complete(&self) -> Option<super::patch::Identity> {
        Some(super::patch::Identity {
            client_id: self.client_id.clone()?,
            tenant_id: self.tenant_id.clone()?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("invalid ServiceAccount reference {0}")]
    InvalidName(String),
    #[error("cannot read the API-server token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("GET {url} failed: {source}")]
    Request { url: String, source: reqwest::Error },
    #[error("GET {url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{0}; a ServiceAccount is far smaller (is --kube-api-url the API server?)")]
    TooLarge(ReadError),
    #[error("GET {url} returned an unreadable ServiceAccount: {source}")]
    Decode {
        url: String,
        source: serde_json::Error,
    },
}

/// Where the identity annotations of a ServiceAccount come from.
#[async_trait]
pub trait IdentitySource: Send + Sync {
    /// The identity annotations of `namespace/name` (empty when it has none or does not exist).
    async fn lookup(&self, namespace: &str, name: &str) -> Result<PartialIdentity, LookupError>;
}

/// No API server: every ServiceAccount looks unannotated, so only the webhook's own
/// `--client-id` / `--tenant-id` apply.
pub struct NoLookup;

#[async_trait]
impl IdentitySource for NoLookup {
    async fn lookup(&self, _: &str, _: &str) -> Result<PartialIdentity, LookupError> {
        Ok(PartialIdentity::default())
    }
}

/// How to reach the API server.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// e.g. `https://10.0.0.1:443`; no trailing slash needed.
    pub base_url: String,
    /// Bearer token, re-read for every request (kubelet rotates it). None: no Authorization.
    pub token_file: Option<PathBuf>,
    /// PEM bundle trusted for the API server instead of the system roots.
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

impl ApiConfig {
    /// The in-cluster configuration, when running in a pod (KUBERNETES_SERVICE_HOST set).
    pub fn in_cluster(timeout: Duration) -> Option<ApiConfig> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]") // IPv6 literal
        } else {
            host
        };
        Some(ApiConfig {
            base_url: format!("https://{host}:{port}"),
            token_file: Some(IN_CLUSTER_TOKEN_FILE.into()),
            ca_file: Some(IN_CLUSTER_CA_FILE.into()),
            timeout,
        })
    }
}

/// Reads ServiceAccounts from the API server, caching each answer for `ttl`. When a refresh
/// fails, the last known answer (of any age) is used, so a brief API-server hiccup does not
/// fail pod creation.
pub struct ServiceAccountLookup {
    client: reqwest::Client,
    base_url: String,
    token_file: Option<PathBuf>,
    ttl: Duration,
    cache: Mutex<HashMap<(String, String), Cached>>,
}

#[derive(Clone)]
struct Cached {
    at: Instant,
    identity: PartialIdentity,
}

impl ServiceAccountLookup {
    pub fn new(api: ApiConfig, ttl: Duration) -> anyhow::Result<Self> {
        use anyhow::Context;
        crate::crypto::install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(api.timeout)
            .connect_timeout(api.timeout)
            .no_proxy();
        if let Some(ca) = &api.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read the API-server CA {}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("cannot parse the API-server CA {}", ca.display()))?;
            builder = builder.tls_certs_only(certs);
        }
        let client = builder
            .build()
            .context("cannot build the API-server HTTP client")?;
        Ok(ServiceAccountLookup {
            client,
            base_url: api.base_url.trim_end_matches('/').to_string(),
            token_file: api.token_file,
            ttl,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, key: &(String, String)) -> Option<Cached> {
        self.cache.lock().ok()?.get(key).cloned()
    }

    fn remember(&self, key: (String, String), identity: PartialIdentity) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= MAX_ENTRIES && !cache.contains_key(&key) {
            if let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, c)| c.at)
                .map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(
            key,
            Cached {
                at: Instant::now(),
                identity,
            },
        );
    }

    async fn fetch(&self, namespace: &str, name: &str) -> Result<PartialIdentity, LookupError> {
        let url = format!(
            "{}/api/v1/namespaces/{namespace}/serviceaccounts/{name}",
            self.base_url
        );
        let mut req = self.client.get(&url).header("Accept", "application/json");
        if let Some(path) = &self.token_file {
            req = req.bearer_auth(read_token(path)?);
        }
        let resp = req.send().await.map_err(|source| LookupError::Request {
            url: url.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let body = capped_read::body(resp, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                ReadError::Read { source, .. } => LookupError::Request {
                    url: url.clone(),
                    source,
                },
                too_large => LookupError::TooLarge(too_large),
            })?;
        match status {
            200 => {
                let sa: ServiceAccount = serde_json::from_slice(&body)
                    .map_err(|source| LookupError::Decode { url, source })?;
                Ok(annotations_identity(&sa))
            }
            // The API server's ServiceAccount admission rejects pods naming a missing account
            // before webhooks run, so this is a race with its deletion: no identity.
            404 => Ok(PartialIdentity::default()),
            _ => Err(LookupError::Status {
                url,
                status,
                body: String::from_utf8_lossy(&body).chars().take(300).collect(),
            }),
        }
    }
}

#[async_trait]
impl IdentitySource for ServiceAccountLookup {
    async fn lookup(&self, namespace: &str, name: &str) -> Result<PartialIdentity, LookupError> {
        if !is_dns_name(namespace) || !is_dns_name(name) {
            return Err(LookupError::InvalidName(format!("{namespace}/{name}")));
        }
        let key = (namespace.to_string(), name.to_string());
        let cached = self.cached(&key);
        if let Some(c) = &cached {
            if c.at.elapsed() < self.ttl {
                return Ok(c.identity.clone());
            }
        }
        match self.fetch(namespace, name).await {
            Ok(identity) => {
                self.remember(key, identity.clone());
                Ok(identity)
            }
            Err(e) => match cached {
                Some(stale) => {
                    tracing::warn!(error = %e, namespace, service_account = name,
                        "ServiceAccount lookup failed; using the last known identity");
                    Ok(stale.identity)
                }
                None => Err(e),
            },
        }
    }
}

/// The identity annotations of a ServiceAccount.
pub fn annotations_identity(sa: &ServiceAccount) -> PartialIdentity {
    let get = |k: &str| {
        sa.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(k))
            .map(String::as_str)
    };
    PartialIdentity::new(get(CLIENT_ID_ANNOTATION), get(TENANT_ID_ANNOTATION))
}

fn read_token(path: &Path) -> Result<String, LookupError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|source| LookupError::Token {
            path: path.to_path_buf(),
            source,
        })
}

/// A DNS-1123 subdomain — dot-separated labels of lowercase letters, digits and '-', each
/// starting and ending with a letter or digit, 253 characters at most — as the API server
/// requires of ServiceAccount and Secret names (a namespace is one such label). So it is
/// also safe in a URL path.
pub(crate) fn is_dns_name(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let label = |l: &str| {
        let bytes = l.as_bytes();
        match (bytes.first(), bytes.last()) {
            (Some(&first), Some(&last)) => {
                alnum(first) && alnum(last) && bytes.iter().all(|&b| alnum(b) || b == b'-')
            }
            _ => false,
        }
    };
    s.len() <= 253 && s.split('.').all(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_identities_combine_field_by_field() {
        let sa = PartialIdentity::new(Some("sa-client"), Some("  "));
        let flags = PartialIdentity::new(Some("flag-client"), Some("flag-tenant"));
        let merged = sa.or(&flags);
        assert_eq!(merged.client_id.as_deref(), Some("sa-client"));
        assert_eq!(merged.tenant_id.as_deref(), Some("flag-tenant"));
        assert!(merged.complete().is_some());
        assert!(PartialIdentity::new(Some("c"), None).complete().is_none());
    }

    #[test]
    fn names_that_could_escape_the_url_path_are_refused() {
        assert!(is_dns_name("velero-server"));
        assert!(is_dns_name("a.b-c"));
        assert!(!is_dns_name(""));
        assert!(!is_dns_name("../x"));
        assert!(!is_dns_name("a/b"));
        assert!(!is_dns_name("A"));
        assert!(!is_dns_name(".."));
        assert!(!is_dns_name("-a"));
        assert!(!is_dns_name("a..b"));
        assert!(!is_dns_name("a.-b"));
        assert!(!is_dns_name("a."));
        assert!(!is_dns_name("a_b"));
        assert!(is_dns_name(&"a".repeat(253)));
        assert!(!is_dns_name(&"a".repeat(254)));
    }
}
