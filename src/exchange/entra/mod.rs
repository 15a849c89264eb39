//! Entra ID exchange through `azure_identity`'s `ClientAssertionCredential`: the projected
//! service-account token is the client assertion of the federated credential.

mod transport;

use super::{aadsts, scope_for, ExchangeError, Exchanger, Token};
use crate::assertion::{now_unix, TokenFile};
use crate::capped_read;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{
    AsyncRawResponse, ClientMethodOptions, ClientOptions, Context, Request, RetryOptions, Transport,
};
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
};
use futures_util::FutureExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use transport::{CappedTransport, MAX_RESPONSE_BYTES, TRUNCATED_HEADER};

/// Talks to `{authority}/{tenant}/oauth2/v2.0/token`.
pub struct EntraExchanger {
    tenant_id: String,
    cloud: Arc<CloudConfiguration>,
    /// The client under `transport` (a handle to the same connection pool).
    http: reqwest::Client,
    /// `{authority}/{tenant}/v2.0/.well-known/openid-configuration`, fetched by `preconnect`.
    discovery: String,
    transport: Transport,
    token_file: TokenFile,
}

/// Settings for [`EntraExchanger::new`].
pub struct EntraConfig<'a> {
    pub tenant_id: &'a str,
    pub authority_host: &'a str,
    pub ca_file: Option<&'a Path>,
    pub timeout: Duration,
    pub token_file: TokenFile,
}

impl EntraExchanger {
    pub fn new(config: EntraConfig<'_>) -> anyhow::Result<Self> {
        let authority = url_checked(config.authority_host)?;
        crate::crypto::install_default();
        let mut http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("imds-broker/", env!("CARGO_PKG_VERSION")))
            // Entra never redirects its token endpoint or discovery document, and following a
            // 307/308 would re-send the client assertion (the service-account token) to
            // whatever host the Location names.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90));
        if let Some(path) = config.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read --ca-file / IMDS_BROKER_CA_FILE {}: {e}",
                    path.display()
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "--ca-file {} holds no usable PEM certificate: {e}",
                    path.display()
                )
            })?;
            if certs.is_empty() {
                anyhow::bail!("--ca-file {} holds no PEM certificate", path.display());
            }
            // Merged with (not replacing) the system roots: a TLS-inspecting proxy's CA is
            // added, the public CAs stay trusted.
            http = http.tls_certs_merge(certs);
        }
        let http = http
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTPS client for Entra: {e}"))?;
        // `url_checked` already removed any trailing slash.
        let discovery = format!(
            "{authority}/{}/v2.0/.well-known/openid-configuration",
            config.tenant_id
        );
        let mut custom = CustomConfiguration::default();
        custom.authority_host = authority;
        Ok(EntraExchanger {
            tenant_id: config.tenant_id.to_owned(),
            cloud: Arc::new(custom.into()),
            transport: Transport::new(Arc::new(CappedTransport::new(
                http.clone(),
                MAX_RESPONSE_BYTES,
            ))),
            http,
            discovery,
            token_file: config.token_file,
        })
    }

    fn credential(
        &self,
        client_id: &str,
        assertion: String,
        capture: Arc<ErrorCapture>,
    ) -> Result<Arc<ClientAssertionCredential<FixedAssertion>>, ExchangeError> {
        let options = ClientAssertionCredentialOptions {
            client_options: ClientOptions {
                transport: Some(self.transport.clone()),
                cloud: Some(self.cloud.clone()),
                per_try_policies: vec![capture],
                // The broker retries with its own policy (Retry-After gate, metrics, stale
                // serving); retries inside the SDK would hide failures from it.
                retry: RetryOptions::none(),
                ..Default::default()
            },
        };
        ClientAssertionCredential::new(
            self.tenant_id.clone(),
            client_id.to_owned(),
            FixedAssertion(assertion),
            Some(options),
        )
        .map_err(|e| ExchangeError::Permanent {
            error: "invalid_configuration".into(),
            code: String::new(),
            description: e.to_string(),
            hint: "check --tenant-id, --client-id and --authority-host".into(),
        })
    }

    /// Classifies a failed exchange from the raw error response when there was one. The SDK's
    /// own error is not enough: azure_identity 1.0 parses Entra's error body into borrowed
    /// strings, which fails on the `\r\n` every real `error_description` contains, turning
    /// each AADSTS error into an opaque "invalid type" error without status or Retry-After.
    fn classify(
        &self,
        client_id: &str,
        err: &azure_core::Error,
        captured: Option<Captured>,
    ) -> ExchangeError {
        let Some(resp) = captured else {
            // No HTTP answer (connection refused/reset, timeout, TLS failure), or one the
            // exchanger refused to use (oversized, absurd lifetime).
            return ExchangeError::Transient {
                message: error_chain(err),
                retry_after: None,
            };
        };
        if let Some(size) = &resp.oversized {
            // A proxy's or a hostile endpoint's page, not Entra's JSON: say so, keep its wait.
            return ExchangeError::Transient {
                message: format!(
                    "HTTP {} with a body of {size}, connection dropped: not an answer from Entra ID; check --authority-host and any proxy in between",
                    resp.status
                ),
                retry_after: resp.retry_after,
            };
        }
        if (300..400).contains(&resp.status) {
            return ExchangeError::Permanent {
                error: format!("http_{}", resp.status),
                code: String::new(),
                description: format!(
                    "the token endpoint answered a redirect (HTTP {}) to {}; redirects are not followed, as they would re-send the service-account token",
                    resp.status,
                    resp.location.as_deref().unwrap_or("(no Location)")
                ),
                hint: "set --authority-host / AZURE_AUTHORITY_HOST to the authority itself (e.g. https://login.microsoftonline.com), not an address that redirects".into(),
            };
        }
        if resp.status == 408 || resp.status == 429 || resp.status >= 500 {
            return ExchangeError::Transient {
                message: format!("HTTP {}{}", resp.status, summary(&resp.body)),
                retry_after: resp.retry_after,
            };
        }
        permanent_from_body(resp.status, &resp.body, client_id, &self.tenant_id)
    }
}

/// An Entra error response, as received (its body already cut by the transport).
#[derive(Debug, Clone)]
struct Captured {
    status: u16,
    retry_after: Option<Duration>,
    /// Where a redirect pointed (it is not followed).
    location: Option<String>,
    /// The transport cut the body: how large it was.
    oversized: Option<String>,
    body: String,
}

/// Pipeline policy that records the last non-success response of one exchange, and refuses a
/// success whose lifetime the SDK cannot hold (see [`check_lifetime`]).
#[derive(Debug, Default)]
struct ErrorCapture(Mutex<Option<Captured>>);

impl ErrorCapture {
    fn take(&self) -> Option<Captured> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[async_trait::async_trait]
impl Policy for ErrorCapture {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let resp = next[0].send(ctx, request, &next[1..]).await?;
        // The transport has read (and bounded) the body: collecting it costs no I/O.
        let (status, headers, body) = resp.deconstruct();
        let bytes = body.collect().await?;
        if status.is_success() {
            check_lifetime(&bytes)?;
            return Ok(AsyncRawResponse::from_bytes(status, headers, bytes));
        }
        let header = |name: &'static str| {
            headers
                .get_optional_str(&azure_core::http::headers::HeaderName::from_static(name))
                .map(str::to_owned)
        };
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Captured {
            status: u16::from(status),
            retry_after: retry_after(&headers),
            location: header("location").map(|l| l.chars().take(200).collect()),
            oversized: header(TRUNCATED_HEADER),
            body: String::from_utf8_lossy(&bytes).into_owned(),
        });
        Ok(AsyncRawResponse::from_bytes(status, headers, bytes))
    }
}

/// The longest access-token lifetime accepted from Entra. Its tokens live 1–24 h (up to ~28 h
/// with continuous access evaluation); a larger `expires_in` is a broken or hostile answer,
/// and past ~10^11 s the SDK's expiry arithmetic panics.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(2 * 24 * 3600);

/// Refuses a token answer whose `expires_in` is not a lifetime between 1 s and
/// [`MAX_TOKEN_LIFETIME`], before the SDK parses it. An answer without the field is left to
/// the SDK, which reports it.
fn check_lifetime(body: &[u8]) -> azure_core::Result<()> {
    #[derive(serde::Deserialize)]
    struct Lifetime {
        expires_in: Option<serde_json::Value>,
    }
    let Ok(Lifetime {
        expires_in: Some(value),
    }) = serde_json::from_slice::<Lifetime>(body)
    else {
        return Ok(());
    };
    let secs = match &value {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    let max = MAX_TOKEN_LIFETIME.as_secs();
    match secs {
        Some(s) if s >= 1 && s.unsigned_abs() <= max => Ok(()),
        _ => {
            let shown: String = value.to_string().chars().take(40).collect();
            Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::DataConversion,
                format!(
                    "the token answer's expires_in is {shown}, not a lifetime of 1 to {max} seconds: a broken answer, not used"
                ),
            ))
        }
    }
}

#[async_trait::async_trait]
impl Exchanger for EntraExchanger {
    async fn exchange(&self, client_id: &str, resource: &str) -> Result<Token, ExchangeError> {
        // Re-read on every exchange: kubelet rotates the file in place.
        let assertion = self.token_file.read()?;
        // A fresh credential per exchange bypasses the SDK's own cache, which would hand back
        // the same token until 300 s before expiry and defeat the broker's earlier refresh.
        let capture = Arc::new(ErrorCapture::default());
        let credential = self.credential(client_id, assertion, capture.clone())?;
        let scope = scope_for(resource);
        let obtained = now_unix();
        // A panic inside the SDK (it has had them on odd answers) must reach neither the
        // caller's connection nor the refresher task: it is one failed exchange.
        let answer = std::panic::AssertUnwindSafe(credential.get_token(&[scope.as_str()], None))
            .catch_unwind()
            .await
            .map_err(|panic| ExchangeError::Transient {
                message: format!(
                    "the Azure SDK failed on Entra's answer ({})",
                    panic_text(&*panic)
                ),
                retry_after: None,
            })?;
        match answer {
            Ok(t) => Ok(Token {
                access_token: Arc::from(t.token.secret()),
                expires_on: u64::try_from(t.expires_on.unix_timestamp()).unwrap_or(0),
                not_before: obtained,
            }),
            Err(e) => Err(self.classify(client_id, &e, capture.take())),
        }
    }

    fn ready(&self) -> Result<(), String> {
        self.token_file.check_readable().map_err(|e| e.to_string())
    }

    /// Fetches the tenant's OpenID discovery document, which needs no credential: the
    /// connection then waits in the pool (90 s) for the first exchange. Whatever the status,
    /// the connection is open; only a network failure is an error. Any secret-free URL of the
    /// authority would do.
    async fn preconnect(&self) -> Result<String, String> {
        let resp = self
            .http
            .get(&self.discovery)
            .send()
            .await
            .map_err(|e| format!("{}: {}", self.discovery, error_chain(&e)))?;
        let status = resp.status().as_u16();
        // Read to the end, or the connection is closed instead of pooled; bounded, as the
        // authority (or a proxy) sizes it. The real document is about 2 KiB.
        match capped_read::body(resp, MAX_RESPONSE_BYTES).await {
            Ok(_) => Ok(format!("{} answered HTTP {status}", self.discovery)),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The assertion read just before the exchange.
#[derive(Clone)]
struct FixedAssertion(String);

impl std::fmt::Debug for FixedAssertion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FixedAssertion(<redacted>)")
    }
}

#[async_trait::async_trait]
impl ClientAssertion for FixedAssertion {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        Ok(self.0.clone())
    }
}

fn url_checked(host: &str) -> anyhow::Result<String> {
    crate::authority::authority_url(host)
        .map_err(|e| anyhow::anyhow!("--authority-host / AZURE_AUTHORITY_HOST {e}"))
}

fn retry_after(headers: &azure_core::http::headers::Headers) -> Option<Duration> {
    use azure_core::http::headers::HeaderName;
    const MS: [&str; 2] = ["retry-after-ms", "x-ms-retry-after-ms"];
    for name in MS {
        if let Some(v) = headers.get_optional_str(&HeaderName::from_static(name)) {
            if let Ok(ms) = v.trim().parse::<u64>() {
                return Some(Duration::from_millis(ms));
            }
        }
    }
    let v = headers.get_optional_str(&HeaderName::from_static("retry-after"))?;
    parse_retry_after(v)
}

/// `Retry-After` is delta-seconds or an HTTP date (a date in the past is no wait).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    // delta-seconds is 1*DIGIT (RFC 9110): no sign, which `u64::from_str` would take.
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is no wait anyone meant: ignored, the backoff applies.
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[derive(serde::Deserialize, Default)]
struct EntraError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    error_codes: Vec<u32>,
}

fn permanent_from_body(status: u16, body: &str, client_id: &str, tenant_id: &str) -> ExchangeError {
    let parsed: EntraError = serde_json::from_str(body).unwrap_or_default();
    let code = parsed
        .error_codes
        .first()
        .copied()
        .or_else(|| code_in(&parsed.error_description));
    let description = first_line(&parsed.error_description);
    ExchangeError::Permanent {
        error: if parsed.error.is_empty() {
            format!("http_{status}")
        } else {
            parsed.error
        },
        code: code.map(|c| format!("AADSTS{c}")).unwrap_or_default(),
        description: if description.is_empty() {
            format!("HTTP {status}{}", summary(body))
        } else {
            description
        },
        hint: match code {
            Some(c) => aadsts::hint(c, client_id, tenant_id),
            None => {
                "check the identity configuration (client id, tenant id, authority host)".into()
            }
        },
    }
}

/// The AADSTS number at the start of a description (`AADSTS70021: ...`).
fn code_in(description: &str) -> Option<u32> {
    let rest = description.strip_prefix("AADSTS")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Entra descriptions end with trace/correlation lines; the first line carries the meaning.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_owned()
}

fn summary(body: &str) -> String {
    let b = body.trim();
    if b.is_empty() {
        String::new()
    } else {
        let cut: String = b.chars().take(200).collect();
        format!(": {cut}")
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    text.chars().take(200).collect()
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests;
