//! `FakeEntra`: an in-process HTTPS stand-in for Entra ID's v2 token endpoint
//! (`POST /{tenant}/oauth2/v2.0/token`, client-credentials grant with a federated client
//! assertion).
//!
//! It validates the assertion the way Entra does for workload identity federation (RS256
//! signature by the test issuer key, `iss`/`sub`/`aud` against one federated identity record,
//! `exp`/`nbf` with a small skew) and answers in Entra's JSON shapes. Tests can inject faults,
//! count calls and await them, and throttle the endpoint with a token bucket (`RateLimit`). The server runs on its own small runtime so it keeps serving
//! whatever the test's runtime is doing (blocking, paused time, ...); dropping the value stops
//! it and closes every connection.
//!
//! Tokens (assertions or access tokens) are never logged.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

use crate::issuer::{TestIssuer, DEFAULT_AUDIENCE, DEFAULT_ISSUER, DEFAULT_SUBJECT};
use crate::pki::TestPki;

/// Tenant (directory) ID the fake serves by default.
const DEFAULT_TENANT_ID: &str = "5c8f1a2e-3b4d-4e6f-9a7b-1c2d3e4f5a6b";
/// Client (application) ID of the registered app by default.
const DEFAULT_CLIENT_ID: &str = "0e7d6c5b-4a39-4281-b7f6-e5d4c3b2a190";
/// Object ID of the app's service principal (the `oid`/`sub` of issued access tokens).
const SERVICE_PRINCIPAL_OBJECT_ID: &str = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a";
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Clock skew tolerated on the assertion's `exp` / `nbf`.
const ASSERTION_CLOCK_SKEW_SECS: i64 = 60;
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Request bodies above this are refused (a real assertion is ~1 KiB).
const MAX_BODY_BYTES: usize = 64 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One federated identity credential of the registered app. Entra requires all three to match
/// the assertion exactly (case-sensitive).
#[derive(Clone, Debug, PartialEq, Eq)]
struct FederatedCredential {
    issuer: String,
    subject: String,
    audience: String,
}

impl Default for FederatedCredential {
    fn default() -> Self {
        FederatedCredential {
            issuer: DEFAULT_ISSUER.to_string(),
            subject: DEFAULT_SUBJECT.to_string(),
            audience: DEFAULT_AUDIENCE.to_string(),
        }
    }
}

/// A fault the server applies to one token-endpoint request instead of (or before) the
/// normal answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// This HTTP status with an Entra-shaped JSON error body, no `Retry-After`.
    Status(u16),
    /// This HTTP status with `Retry-After: <secs>` (e.g. 429 or 503).
    StatusRetryAfter(u16, u64),
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Drop the TCP connection (RST) without any HTTP response.
    Reset,
    /// 200 with a body that is not JSON.
    Garbage,
    /// A permanent 400 Entra error with this AADSTS code (e.g. 70021, 700016), without
    /// changing the configuration.
    AadError(u32),
}

/// One request that reached the token endpoint (any method, any tenant).
#[derive(Clone, Debug)]
pub struct CallRecord {
    /// When the whole request had arrived (the log is in this order).
    pub at: Instant,
    pub scope: Option<String>,
    /// The fault applied to this call, if any (a [`RateLimit`] refusal shows as
    /// `StatusRetryAfter(429, secs)`).
    pub fault: Option<Fault>,
    /// The `jti` claim of the client assertion (unverified), which tells apart callers that
    /// each present their own service-account token (e.g. a fleet of brokers).
    pub jti: Option<String>,
}

/// A token bucket in front of the token endpoint, as Entra throttles an app: every request
/// takes one token; with the bucket empty it is answered 429 + `Retry-After` (and takes
/// none). The bucket holds at most `burst` tokens, starts full and refills at `per_sec`.
/// Queued and sticky faults apply first and do not touch the bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_sec: f64,
    pub burst: f64,
    pub retry_after_secs: u64,
}

struct Bucket {
    limit: RateLimit,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    /// Takes a token if there is one; `false` means throttle this request.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.per_sec).min(self.limit.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The claims of an access token issued by the fake that tests read (decode with
/// [`FakeAccessToken::decode`]; the token also carries `oid` and `nbf`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct FakeAccessToken {
    /// The resource: the requested scope without its `/.default` suffix.
    pub aud: String,
    /// The scope exactly as requested.
    pub scope: String,
    pub appid: String,
    pub tid: String,
    /// 1-based count of tokens issued by this server (distinct per successful call).
    pub seq: u64,
    /// 1-based number of the call (see [`FakeEntra::calls`]) that produced the token.
    pub call: u64,
    pub iat: i64,
    pub exp: i64,
}

impl FakeAccessToken {
    /// Decodes the payload of a token issued by [`FakeEntra`]; `None` for anything else.
    pub fn decode(access_token: &str) -> Option<Self> {
        let payload = access_token.split('.').nth(1)?;
        let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// [`FakeEntra::wait_for_calls`] and friends gave up.
#[derive(Debug, Clone)]
pub struct WaitTimeout {
    pub what: &'static str,
    pub wanted: usize,
    pub got: usize,
    pub waited: Duration,
}

impl fmt::Display for WaitTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fake Entra: waited {:?} for {} {}, saw {}",
            self.waited, self.wanted, self.what, self.got
        )
    }
}

impl std::error::Error for WaitTimeout {}

struct Config {
    tenant_id: String,
    client_id: String,
    federated: FederatedCredential,
    token_lifetime: Duration,
    response_delay: Duration,
    /// Set by `set_federated_oidc_issuer`: verify assertions with the issuer's published keys.
    oidc_issuer: Option<OidcIssuer>,
}

/// A federated credential's issuer whose signing keys are published the OIDC way, as Entra
/// reads them: `{issuer}/.well-known/openid-configuration` names `jwks_uri`, whose keys are
/// matched to the assertion by `kid`. A Kubernetes API server serves both
/// (`/openid/v1/jwks`). Fetched again for every token request, so key rotation is seen.
#[derive(Clone, Debug)]
pub struct OidcIssuer {
    /// The issuer URL exactly as in the tokens' `iss` (also the federated record's issuer).
    pub issuer: String,
    /// PEM CA bundle trusted for the discovery and JWKS requests (a test issuer's own CA).
    pub ca_pem: Option<String>,
}

/// Keys fetched from an `OidcIssuer` for the request being verified, or why fetching failed.
type OidcKeys = Result<Vec<(Option<String>, DecodingKey)>, String>;

#[derive(Default)]
struct Faults {
    queue: VecDeque<Fault>,
    sticky: Option<Fault>,
}

#[derive(Default)]
struct Stats {
    calls: Vec<CallRecord>,
    per_scope: HashMap<String, usize>,
    tokens_issued: usize,
    /// TLS connections established.
    connections: usize,
    /// Requests for the OpenID discovery document.
    discovery: usize,
    /// Requests refused by the [`RateLimit`] bucket.
    throttled: usize,
}

struct Shared {
    config: Mutex<Config>,
    faults: Mutex<Faults>,
    stats: Mutex<Stats>,
    /// Bumped after every change to `stats`; waiters re-check their condition on each bump.
    stats_version: watch::Sender<u64>,
    token_seq: AtomicU64,
    decoding_key: DecodingKey,
    oidc_keys: Mutex<Option<OidcKeys>>,
    rate_limit: Mutex<Option<Bucket>>,
}

impl Shared {
    fn config(&self) -> MutexGuard<'_, Config> {
        lock(&self.config)
    }

    fn bump_stats(&self) {
        self.stats_version.send_modify(|v| *v += 1);
    }
}

/// Poisoning only means another test thread panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fake Entra server. See the module docs.
pub struct FakeEntra {
    shared: Arc<Shared>,
    addr: SocketAddr,
    pki: TestPki,
    issuer: TestIssuer,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeEntra {
    /// Starts on an ephemeral port of 127.0.0.1. Panics with context if that fails.
    pub fn start() -> Self {
        Self::start_on_port(0).expect("fake Entra: start on an ephemeral port")
    }

    /// Starts on `127.0.0.1:port` (0 = ephemeral).
    pub fn start_on_port(port: u16) -> std::io::Result<Self> {
        let ctx = |what: &str, e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("fake Entra: {what}: {e}"))
        };
        let pki = TestPki::new();
        let issuer = TestIssuer::new();
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .map_err(|e| ctx(&format!("bind 127.0.0.1:{port}"), e))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| ctx("set listener non-blocking", e))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| ctx("listener address", e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-entra")
            .enable_all()
            .build()
            .map_err(|e| ctx("build runtime", e))?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)
                .map_err(|e| ctx("register listener", e))?
        };
        let shared = Arc::new(Shared {
            config: Mutex::new(Config {
                tenant_id: DEFAULT_TENANT_ID.to_string(),
                client_id: DEFAULT_CLIENT_ID.to_string(),
                federated: FederatedCredential {
                    issuer: issuer.issuer().to_string(),
                    ..FederatedCredential::default()
                },
                token_lifetime: DEFAULT_TOKEN_LIFETIME,
                response_delay: Duration::ZERO,
                oidc_issuer: None,
            }),
            faults: Mutex::new(Faults::default()),
            stats: Mutex::new(Stats::default()),
            stats_version: watch::Sender::new(0),
            token_seq: AtomicU64::new(0),
            decoding_key: issuer.decoding_key(),
            oidc_keys: Mutex::new(None),
            rate_limit: Mutex::new(None),
        });
        let acceptor = TlsAcceptor::from(pki.server_config());
        runtime.spawn(accept_loop(listener, acceptor, Arc::clone(&shared)));
        Ok(FakeEntra {
            shared,
            addr,
            pki,
            issuer,
            runtime: Some(runtime),
        })
    }

    // ---- addresses and identities ----

    /// `https://localhost:PORT` — what the broker gets as `--authority-host`.
    pub fn authority(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Full token URL for the currently configured tenant.
    pub fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority(),
            self.tenant_id()
        )
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// PEM file of the CA that signed the server certificate (`--ca-file`).
    pub fn ca_file(&self) -> &Path {
        self.pki.ca_file()
    }

    /// The issuer whose key the fake trusts; its default claims match the default record.
    pub fn issuer(&self) -> &TestIssuer {
        &self.issuer
    }

    /// A reqwest client trusting only the fake's CA.
    pub fn http_client(&self) -> reqwest::Client {
        self.pki.reqwest_client()
    }

    pub fn tenant_id(&self) -> String {
        self.shared.config().tenant_id.clone()
    }

    pub fn client_id(&self) -> String {
        self.shared.config().client_id.clone()
    }

    // ---- configuration, effective for the next request ----

    pub fn set_tenant_id(&self, tenant_id: impl Into<String>) {
        self.shared.config().tenant_id = tenant_id.into();
    }

    pub fn set_client_id(&self, client_id: impl Into<String>) {
        self.shared.config().client_id = client_id.into();
    }

    pub fn set_federated_subject(&self, subject: impl Into<String>) {
        self.shared.config().federated.subject = subject.into();
    }

    /// Trusts a real OIDC issuer (e.g. a Kubernetes API server's service-account issuer)
    /// instead of the built-in test key: the federated record's issuer becomes
    /// `issuer.issuer`, and each assertion is verified against the keys its discovery
    /// document's `jwks_uri` serves at that moment.
    pub fn set_federated_oidc_issuer(&self, issuer: OidcIssuer) {
        let mut c = self.shared.config();
        c.federated.issuer = issuer.issuer.clone();
        c.oidc_issuer = Some(issuer);
    }

    /// Lifetime of issued access tokens (`expires_in`). Whole seconds are used.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.config().token_lifetime = lifetime;
    }

    /// Fixed delay before every answer of the token endpoint (on top of any `Fault::Delay`).
    pub fn set_response_delay(&self, delay: Duration) {
        self.shared.config().response_delay = delay;
    }

    // ---- faults ----

    /// Queues a one-shot fault; queued faults are consumed one per request, in order, before
    /// any sticky fault applies.
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.shared.faults).queue.push_back(fault);
    }

    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.shared.faults).queue.extend(faults);
    }

    /// A fault applied to every request once the queue is empty, until cleared.
    pub fn set_sticky_fault(&self, fault: Fault) {
        lock(&self.shared.faults).sticky = Some(fault);
    }

    pub fn clear_sticky_fault(&self) {
        lock(&self.shared.faults).sticky = None;
    }

    /// Throttles the token endpoint with a token bucket (see [`RateLimit`]), starting full;
    /// `None` removes it.
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) {
        *lock(&self.shared.rate_limit) = limit.map(|limit| Bucket {
            limit,
            tokens: limit.burst.max(0.0),
            refilled: Instant::now(),
        });
    }

    /// Requests answered 429 by the rate limit.
    pub fn throttled_calls(&self) -> usize {
        lock(&self.shared.stats).throttled
    }

    /// One-shot faults not yet consumed.
    pub fn queued_faults(&self) -> usize {
        lock(&self.shared.faults).queue.len()
    }

    // ---- counters ----

    /// Requests that reached the token endpoint path (whatever the outcome).
    pub fn calls(&self) -> usize {
        lock(&self.shared.stats).calls.len()
    }

    /// Calls whose `scope` form field was exactly `scope`.
    pub fn calls_for_scope(&self, scope: &str) -> usize {
        lock(&self.shared.stats)
            .per_scope
            .get(scope)
            .copied()
            .unwrap_or(0)
    }

    /// Calls for `resource` (scope = resource + "/.default", as the broker maps it).
    pub fn calls_for_resource(&self, resource: &str) -> usize {
        self.calls_for_scope(&format!("{resource}/.default"))
    }

    pub fn calls_by_scope(&self) -> HashMap<String, usize> {
        lock(&self.shared.stats).per_scope.clone()
    }

    /// TLS connections established so far (a pooled connection is counted once).
    pub fn connections(&self) -> usize {
        lock(&self.shared.stats).connections
    }

    /// Requests for `/{tenant}/v2.0/.well-known/openid-configuration`.
    pub fn discovery_requests(&self) -> usize {
        lock(&self.shared.stats).discovery
    }

    /// Arrival time of each call, in order.
    pub fn call_times(&self) -> Vec<Instant> {
        lock(&self.shared.stats)
            .calls
            .iter()
            .map(|c| c.at)
            .collect()
    }

    pub fn call_log(&self) -> Vec<CallRecord> {
        lock(&self.shared.stats).calls.clone()
    }

    /// Successful (200 with a token) answers.
    pub fn tokens_issued(&self) -> usize {
        lock(&self.shared.stats).tokens_issued
    }

    /// Zeroes all counters and the call log (the token `seq` keeps increasing, so tokens stay
    /// distinct across a reset).
    pub fn reset_counters(&self) {
        *lock(&self.shared.stats) = Stats::default();
        self.shared.bump_stats();
    }

    /// Waits until at least `n` calls have arrived; returns the count seen.
    pub async fn wait_for_calls(&self, n: usize, timeout: Duration) -> Result<usize, WaitTimeout> {
        self.wait_until("calls", n, timeout, |f| f.calls()).await
    }

    /// Waits until at least `n` calls for `scope` have arrived.
    pub async fn wait_for_scope_calls(
        &self,
        scope: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<usize, WaitTimeout> {
        self.wait_until("calls for the scope", n, timeout, |f| {
            f.calls_for_scope(scope)
        })
        .await
    }

    /// Waits until at least `n` tokens have been issued.
    pub async fn wait_for_tokens_issued(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<usize, WaitTimeout> {
        self.wait_until("issued tokens", n, timeout, |f| f.tokens_issued())
            .await
    }

    async fn wait_until(
        &self,
        what: &'static str,
        wanted: usize,
        timeout: Duration,
        count: impl Fn(&Self) -> usize,
    ) -> Result<usize, WaitTimeout> {
        let start = Instant::now();
        // Subscribing before the first check means any later change wakes us: no lost wake-up.
        let mut version = self.shared.stats_version.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                let got = count(self);
                if got >= wanted {
                    return got;
                }
                if version.changed().await.is_err() {
                    // Sender lives in `self`; cannot happen while we borrow it.
                    return got;
                }
            }
        })
        .await;
        match waited {
            Ok(got) if got >= wanted => Ok(got),
            _ => Err(WaitTimeout {
                what,
                wanted,
                got: count(self),
                waited: start.elapsed(),
            }),
        }
    }
}

impl Drop for FakeEntra {
    fn drop(&mut self) {
        // Drops every task (listener and connections) without blocking; safe inside async code.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, _peer)) => {
                tokio::spawn(serve_connection(tcp, acceptor.clone(), Arc::clone(&shared)));
            }
            // E.g. EMFILE under a benchmark: back off briefly instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn serve_connection(tcp: tokio::net::TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    // A duplicate handle on the socket, so `Fault::Reset` can set SO_LINGER=0 (close = RST)
    // after hyper has taken ownership of the stream.
    let twin: Option<OwnedFd> = tcp.as_fd().try_clone_to_owned().ok();
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        _ => return,
    };
    lock(&shared.stats).connections += 1;
    shared.bump_stats();
    let reset = Arc::new(Notify::new());
    let service = {
        let reset = Arc::clone(&reset);
        hyper::service::service_fn(move |req| {
            let shared = Arc::clone(&shared);
            let reset = Arc::clone(&reset);
            async move { Ok::<_, Infallible>(handle(req, &shared, &reset).await) }
        })
    };
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        _ = conn => {}
        () = reset.notified() => {
            if let Some(fd) = twin {
                let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
                let _ = socket.set_zero_linger();
            }
            // `conn` (and with it the TLS stream and socket) is dropped here: no close_notify,
            // no HTTP response.
        }
    }
}

async fn handle(req: Request<Incoming>, shared: &Shared, reset: &Notify) -> Response<Full<Bytes>> {
    let arrived = Instant::now();
    if let Some(tenant) = discovery_tenant(req.uri().path()) {
        lock(&shared.stats).discovery += 1;
        shared.bump_stats();
        // The fields clients read (MSAL for Go refuses a document without any of the three);
        // the real document has many more.
        let host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let doc = serde_json::json!({
            "issuer": format!("https://{host}/{tenant}/v2.0"),
            "token_endpoint": format!("https://{host}/{tenant}/oauth2/v2.0/token"),
            "authorization_endpoint": format!("https://{host}/{tenant}/oauth2/v2.0/authorize"),
        });
        let ctx = ErrorContext {
            correlation_id: guid(),
        };
        return json_response(StatusCode::OK, &doc, &ctx, None);
    }
    if req.uri().path() == INSTANCE_DISCOVERY_PATH {
        return instance_discovery(req.uri().query().unwrap_or(""));
    }
    let Some(tenant) = token_endpoint_tenant(req.uri().path()) else {
        return plain(
            StatusCode::NOT_FOUND,
            "fake Entra serves only /{tenant}/oauth2/v2.0/token\n",
        );
    };
    let method = req.method().clone();
    let correlation_id = req
        .headers()
        .get("client-request-id")
        .or_else(|| req.headers().get("x-ms-client-request-id"))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(guid);
    let ctx = ErrorContext { correlation_id };

    let body = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await;
    let form = match body {
        Ok(collected) => parse_form(&collected.to_bytes()),
        Err(_) => Err(AadError::new(
            9002313,
            "invalid_request",
            "Invalid request. Request is malformed or invalid.".to_string(),
        )),
    };

    // Record the call before anything can fail or stall, so counts match what clients sent.
    let fault = {
        let mut faults = lock(&shared.faults);
        faults.queue.pop_front().or_else(|| faults.sticky.clone())
    };
    // The rate limit counts only requests no injected fault answers.
    let throttled = fault.is_none()
        && lock(&shared.rate_limit)
            .as_mut()
            .is_some_and(|bucket| !bucket.take(arrived));
    let fault = if throttled {
        let secs = lock(&shared.rate_limit)
            .as_ref()
            .map_or(1, |b| b.limit.retry_after_secs);
        Some(Fault::StatusRetryAfter(429, secs))
    } else {
        fault
    };
    let call_number = {
        let form_ref = form.as_ref().ok();
        let scope = form_ref.and_then(|f| f.get("scope").cloned());
        let jti = form_ref
            .and_then(|f| f.get("client_assertion"))
            .and_then(|a| decode_unverified(a))
            .and_then(|(_, claims)| claims.get("jti")?.as_str().map(str::to_string));
        let mut stats = lock(&shared.stats);
        if let Some(scope) = &scope {
            *stats.per_scope.entry(scope.clone()).or_insert(0) += 1;
        }
        if throttled {
            stats.throttled += 1;
        }
        // Stamped under the lock, so the log's order is the order of its times (concurrent
        // requests finish reading their bodies in any order).
        stats.calls.push(CallRecord {
            at: Instant::now(),
            scope,
            fault: fault.clone(),
            jti,
        });
        stats.calls.len() as u64
    };
    // Outside the stats lock: waiters take the stats lock while holding the watch.
    shared.bump_stats();

    if fault == Some(Fault::Reset) {
        reset.notify_one();
        // The connection task drops this future together with the connection.
        return std::future::pending().await;
    }
    let response_delay = shared.config().response_delay;
    if !response_delay.is_zero() {
        tokio::time::sleep(response_delay).await;
    }
    let oidc_issuer = shared.config().oidc_issuer.clone();
    if let Some(oidc_issuer) = oidc_issuer {
        *lock(&shared.oidc_keys) = Some(fetch_oidc_keys(&oidc_issuer).await);
    }
    match fault {
        Some(Fault::Status(status)) => status_fault(status, None, &ctx),
        Some(Fault::StatusRetryAfter(status, secs)) => status_fault(status, Some(secs), &ctx),
        Some(Fault::Garbage) => garbage(),
        Some(Fault::AadError(code)) => {
            let err = AadError::from_code(code, &shared.config());
            err.into_response(&ctx)
        }
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            exchange(shared, &method, &tenant, form, call_number, &ctx)
        }
        // Reset was handled above.
        Some(Fault::Reset) | None => exchange(shared, &method, &tenant, form, call_number, &ctx),
    }
}

/// Entra's instance discovery, which MSAL (e.g. MSAL for Go under azidentity) calls once per
/// authority before the tenant's openid-configuration, at login.microsoftonline.com for an
/// authority host it does not know (bench/peer.py routes that name here).
const INSTANCE_DISCOVERY_PATH: &str = "/common/discovery/instance";

/// `GET /common/discovery/instance?api-version=1.1&authorization_endpoint=https://HOST/TENANT/oauth2/v2.0/authorize`:
/// as Entra answers for a valid authority, the tenant discovery endpoint of that host and
/// tenant and the host as its own only alias; a missing or malformed authorization endpoint
/// gets Entra's `invalid_instance` 400.
fn instance_discovery(query: &str) -> Response<Full<Bytes>> {
    let ctx = ErrorContext {
        correlation_id: guid(),
    };
    let endpoint = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "authorization_endpoint")
        .map(|(_, v)| v.into_owned());
    let parsed = endpoint.as_deref().and_then(|e| {
        let rest = e.strip_prefix("https://")?;
        let (host, path) = rest.split_once('/')?;
        let tenant = path.strip_suffix("/oauth2/v2.0/authorize")?;
        (!host.is_empty() && !tenant.is_empty() && !tenant.contains('/'))
            .then(|| (host.to_string(), tenant.to_string()))
    });
    let Some((host, tenant)) = parsed else {
        let body = serde_json::json!({
            "error": "invalid_instance",
            "error_description": "AADSTS50049: Unknown or invalid instance.",
            "error_codes": [50049],
            "correlation_id": ctx.correlation_id,
        });
        return json_response(StatusCode::BAD_REQUEST, &body, &ctx, None);
    };
    let doc = serde_json::json!({
        "tenant_discovery_endpoint":
            format!("https://{host}/{tenant}/v2.0/.well-known/openid-configuration"),
        "api-version": "1.1",
        "metadata": [{
            "preferred_network": host,
            "preferred_cache": host,
            "aliases": [host],
        }],
    });
    json_response(StatusCode::OK, &doc, &ctx, None)
}

/// `Some(tenant)` for `/{tenant}/v2.0/.well-known/openid-configuration`.
fn discovery_tenant(path: &str) -> Option<&str> {
    path.strip_prefix('/')?
        .strip_suffix("/v2.0/.well-known/openid-configuration")
        .filter(|t| !t.is_empty() && !t.contains('/'))
}

/// `Some(tenant)` for `/{tenant}/oauth2/v2.0/token`.
fn token_endpoint_tenant(path: &str) -> Option<String> {
    let mut parts = path.strip_prefix('/')?.split('/');
    let tenant = parts.next().filter(|t| !t.is_empty())?;
    let rest: Vec<&str> = parts.collect();
    (rest == ["oauth2", "v2.0", "token"]).then(|| tenant.to_string())
}

fn parse_form(body: &[u8]) -> Result<HashMap<String, String>, AadError> {
    let mut form = HashMap::new();
    for (name, value) in form_urlencoded::parse(body) {
        if form.insert(name.to_string(), value.into_owned()).is_some() {
            return Err(AadError::new(
                9000411,
                "invalid_request",
                format!(
                    "The request is not properly formatted. The parameter '{name}' is duplicated."
                ),
            ));
        }
    }
    Ok(form)
}

/// The normal token-endpoint behaviour: validate and issue, or an Entra error.
fn exchange(
    shared: &Shared,
    method: &Method,
    tenant: &str,
    form: Result<HashMap<String, String>, AadError>,
    call_number: u64,
    ctx: &ErrorContext,
) -> Response<Full<Bytes>> {
    match validate_and_issue(shared, method, tenant, form, call_number) {
        Ok(body) => {
            lock(&shared.stats).tokens_issued += 1;
            shared.bump_stats();
            json_response(StatusCode::OK, &body, ctx, None)
        }
        Err(err) => err.into_response(ctx),
    }
}

fn validate_and_issue(
    shared: &Shared,
    method: &Method,
    tenant: &str,
    form: Result<HashMap<String, String>, AadError>,
    call_number: u64,
) -> Result<Value, AadError> {
    let (tenant_id, client_id, federated, lifetime) = {
        let c = shared.config();
        (
            c.tenant_id.clone(),
            c.client_id.clone(),
            c.federated.clone(),
            c.token_lifetime,
        )
    };
    if !tenant.eq_ignore_ascii_case(&tenant_id) {
        return Err(AadError::tenant_not_found(tenant));
    }
    if method != Method::POST {
        return Err(AadError::new(
            900561,
            "invalid_request",
            format!(
                "The endpoint only accepts POST, OPTIONS requests. Received a {method} request."
            ),
        ));
    }
    let form = form?;
    let field = |name: &'static str| {
        form.get(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| AadError::missing_parameter(name))
    };

    let grant_type = field("grant_type")?;
    if grant_type != "client_credentials" {
        return Err(AadError::new(
            70003,
            "unsupported_grant_type",
            format!("The app requested an unsupported grant type '{grant_type}'."),
        ));
    }
    let presented_client_id = field("client_id")?;
    if !presented_client_id.eq_ignore_ascii_case(&client_id) {
        return Err(AadError::app_not_found(presented_client_id, tenant));
    }
    let scope = field("scope")?;
    let resource = scope_resource(scope).ok_or_else(|| AadError::invalid_scope(scope))?;
    let Some(assertion) = form.get("client_assertion").filter(|v| !v.is_empty()) else {
        return Err(AadError::new(
            7000216,
            "invalid_client",
            "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.".to_string(),
        ));
    };
    if field("client_assertion_type")? != CLIENT_ASSERTION_TYPE {
        return Err(AadError::new(
            9002313,
            "invalid_request",
            "Invalid request. Request is malformed or invalid. The 'client_assertion_type' is not supported.".to_string(),
        ));
    }

    let oidc_keys = lock(&shared.oidc_keys).clone();
    let key = match oidc_keys {
        None => shared.decoding_key.clone(),
        Some(keys) => oidc_key_for(assertion, keys)?,
    };
    verify_assertion(&key, assertion, &federated)?;

    let seq = shared.token_seq.fetch_add(1, Ordering::Relaxed) + 1;
    let now = crate::issuer::unix_now();
    let lifetime_secs = lifetime.as_secs() as i64;
    let access_token = fake_access_token(&json!({
        "aud": resource,
        "iss": format!("https://sts.windows.net/{tenant_id}/"),
        "iat": now,
        "nbf": now,
        "exp": now + lifetime_secs,
        "appid": client_id,
        "appidacr": "2",
        "idtyp": "app",
        "oid": SERVICE_PRINCIPAL_OBJECT_ID,
        "sub": SERVICE_PRINCIPAL_OBJECT_ID,
        "tid": tenant_id,
        "ver": "1.0",
        "scope": scope,
        "seq": seq,
        "call": call_number,
    }));
    Ok(json!({
        "token_type": "Bearer",
        "expires_in": lifetime_secs,
        "ext_expires_in": lifetime_secs,
        "access_token": access_token,
    }))
}

/// `https://storage.azure.com//.default` → `https://storage.azure.com/`. Client-credential
/// requests must carry exactly one `<resource>/.default` scope. The OpenID Connect scopes
/// MSAL adds to every request (`openid offline_access profile`: MSAL for Go sends
/// `<resource>/.default openid offline_access profile`) are accepted and ignored, as Entra does
/// in this flow (it issues neither an ID token nor a refresh token for it).
fn scope_resource(scope: &str) -> Option<&str> {
    let mut scopes = scope
        .split_whitespace()
        .filter(|s| !matches!(*s, "openid" | "offline_access" | "profile"));
    let only = scopes.next()?;
    if scopes.next().is_some() {
        return None;
    }
    only.strip_suffix("/.default").filter(|r| !r.is_empty())
}

/// Discovery document, then JWKS, of an OIDC issuer: every RSA key with its `kid`.
async fn fetch_oidc_keys(oidc: &OidcIssuer) -> OidcKeys {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(5));
    if let Some(pem) = &oidc.ca_pem {
        let ca = reqwest::Certificate::from_pem(pem.as_bytes())
            .map_err(|e| format!("issuer CA bundle: {e}"))?;
        imds_broker::crypto::install_default();
        builder = builder.tls_certs_only([ca]);
    }
    let client = builder.build().map_err(|e| format!("HTTP client: {e}"))?;
    let get_json = |url: String| {
        let client = client.clone();
        async move {
            let resp = client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(format!("GET {url}: HTTP {status}"));
            }
            resp.json::<Value>()
                .await
                .map_err(|e| format!("GET {url}: not JSON: {e}"))
        }
    };
    let discovery_url = format!(
        "{}/.well-known/openid-configuration",
        oidc.issuer.trim_end_matches('/')
    );
    let discovery = get_json(discovery_url).await?;
    if discovery.get("issuer").and_then(Value::as_str) != Some(oidc.issuer.as_str()) {
        return Err(format!(
            "discovery document names issuer {:?}, expected {:?}",
            discovery.get("issuer"),
            oidc.issuer
        ));
    }
    let jwks_uri = discovery
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or("discovery document has no jwks_uri")?
        .to_string();
    let jwks = get_json(jwks_uri).await?;
    let mut keys = Vec::new();
    for jwk in jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no keys array")?
    {
        let field = |name: &str| jwk.get(name).and_then(Value::as_str);
        if field("kty") != Some("RSA") {
            continue;
        }
        let (Some(n), Some(e)) = (field("n"), field("e")) else {
            continue;
        };
        let key = DecodingKey::from_rsa_components(n, e).map_err(|e| format!("JWK: {e}"))?;
        keys.push((field("kid").map(str::to_string), key));
    }
    Ok(keys)
}

/// The published key the assertion's `kid` names (the only key, if it names none).
fn oidc_key_for(assertion: &str, keys: OidcKeys) -> Result<DecodingKey, AadError> {
    let keys = keys.map_err(|e| {
        AadError::new(
            50166,
            "invalid_client",
            format!("Request to External OIDC endpoint failed: {e}"),
        )
    })?;
    let (header, _) = decode_unverified(assertion).ok_or_else(AadError::malformed_jwt)?;
    let kid = header.get("kid").and_then(Value::as_str);
    let found = match kid {
        Some(kid) => keys.into_iter().find(|(k, _)| k.as_deref() == Some(kid)),
        None if keys.len() == 1 => keys.into_iter().next(),
        None => None,
    };
    found.map(|(_, key)| key).ok_or_else(|| {
        AadError::new(
            700027,
            "invalid_client",
            format!(
                "Client assertion failed signature validation. (No key with kid {kid:?} in the issuer's JWKS.)"
            ),
        )
    })
}

/// Entra's checks on a federated client assertion, in its order: find the federated record
/// (needs the unverified `iss`/`sub`/`aud`), verify the signature with that issuer's key, then
/// the validity window.
fn verify_assertion(
    key: &DecodingKey,
    assertion: &str,
    federated: &FederatedCredential,
) -> Result<(), AadError> {
    let (header, claims) = decode_unverified(assertion).ok_or_else(AadError::malformed_jwt)?;
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if iss != federated.issuer
        || sub != federated.subject
        || !auds.contains(&federated.audience.as_str())
    {
        return Err(AadError::no_matching_federated_record(
            iss,
            sub,
            &auds.join(","),
        ));
    }

    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if alg != "RS256" {
        return Err(AadError::new(
            5002738,
            "invalid_client",
            format!("Invalid JWT token. '{alg}' is not a supported signature algorithm. Supported signing algorithms are: 'RS256,RS384,RS512'"),
        ));
    }
    let mut validation = Validation::new(Algorithm::RS256);
    // Claims are checked by hand below so each failure maps to its own AADSTS code.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    if let Err(e) = jsonwebtoken::decode::<Value>(assertion, key, &validation) {
        use jsonwebtoken::errors::ErrorKind;
        return Err(match e.kind() {
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidAlgorithm => AadError::new(
                700027,
                "invalid_client",
                "Client assertion failed signature validation.".to_string(),
            ),
            _ => AadError::malformed_jwt(),
        });
    }

    let Some(exp) = claims.get("exp").and_then(Value::as_i64) else {
        return Err(AadError::malformed_jwt());
    };
    let nbf = claims.get("nbf").and_then(Value::as_i64);
    let now = crate::issuer::unix_now();
    let too_late = now > exp + ASSERTION_CLOCK_SKEW_SECS;
    let too_early = nbf.is_some_and(|nbf| now + ASSERTION_CLOCK_SKEW_SECS < nbf);
    if too_late || too_early {
        return Err(AadError::new(
            700024,
            "invalid_client",
            format!(
                "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}. Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
                iso_time(now),
                nbf.map(iso_time).unwrap_or_else(|| "(not set)".to_string()),
                iso_time(exp),
            ),
        ));
    }
    Ok(())
}

/// Header and claims of a compact JWS, without checking the signature.
fn decode_unverified(
    jwt: &str,
) -> Option<(
    serde_json::Map<String, Value>,
    serde_json::Map<String, Value>,
)> {
    let mut parts = jwt.split('.');
    let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || signature.is_empty() {
        return None;
    }
    let decode = |part: &str| -> Option<serde_json::Map<String, Value>> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
    };
    Some((decode(header)?, decode(payload)?))
}

/// An unsigned, JWT-shaped token: clients treat access tokens as opaque, tests decode it.
fn fake_access_token(claims: &Value) -> String {
    let header = json!({"typ": "JWT", "alg": "none", "kid": "fake-entra"});
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode("fake-entra-signature"),
    )
}

// ---------------------------------------------------------------------------------------------
// Responses

struct ErrorContext {
    correlation_id: String,
}

/// An Entra error: `error` string, AADSTS code and message (without the `AADSTSnnn: ` prefix).
#[derive(Debug)]
struct AadError {
    code: u32,
    error: &'static str,
    message: String,
}

impl AadError {
    fn new(code: u32, error: &'static str, message: String) -> Self {
        AadError {
            code,
            error,
            message,
        }
    }

    fn tenant_not_found(tenant: &str) -> Self {
        Self::new(
            90002,
            "invalid_request",
            format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."),
        )
    }

    fn app_not_found(client_id: &str, tenant: &str) -> Self {
        Self::new(
            700016,
            "unauthorized_client",
            format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."),
        )
    }

    fn no_matching_federated_record(iss: &str, sub: &str, aud: &str) -> Self {
        Self::new(
            70021,
            "invalid_client",
            format!("No matching federated identity record found for presented assertion. Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{aud}'. https://learn.microsoft.com/entra/workload-id/workload-identity-federation"),
        )
    }

    fn malformed_jwt() -> Self {
        Self::new(
            50027,
            "invalid_request",
            "JWT token is invalid or malformed.".to_string(),
        )
    }

    fn missing_parameter(name: &str) -> Self {
        Self::new(
            900144,
            "invalid_request",
            format!("The request body must contain the following parameter: '{name}'."),
        )
    }

    fn invalid_scope(scope: &str) -> Self {
        Self::new(
            1002012,
            "invalid_scope",
            format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
        )
    }

    /// For `Fault::AadError`: realistic texts for the codes tests care about.
    fn from_code(code: u32, config: &Config) -> Self {
        let fic = &config.federated;
        match code {
            70021 => Self::no_matching_federated_record(&fic.issuer, &fic.subject, &fic.audience),
            700016 => Self::app_not_found(&config.client_id, &config.tenant_id),
            90002 => Self::tenant_not_found(&config.tenant_id),
            50027 => Self::malformed_jwt(),
            700024 => Self::new(
                700024,
                "invalid_client",
                "Client assertion is not within its valid time range.".to_string(),
            ),
            700027 => Self::new(
                700027,
                "invalid_client",
                "Client assertion failed signature validation.".to_string(),
            ),
            7000215 => Self::new(
                7000215,
                "invalid_client",
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app.".to_string(),
            ),
            other => Self::new(other, "invalid_request", "Error injected by the fake Entra server.".to_string()),
        }
    }

    fn into_response(self, ctx: &ErrorContext) -> Response<Full<Bytes>> {
        error_response(
            StatusCode::BAD_REQUEST,
            self.error,
            self.code,
            &self.message,
            ctx,
            None,
        )
    }
}

/// Entra's error body: `error_description` repeats the ids and timestamp, as the service does.
fn error_response(
    status: StatusCode,
    error: &str,
    code: u32,
    message: &str,
    ctx: &ErrorContext,
    retry_after: Option<u64>,
) -> Response<Full<Bytes>> {
    let trace_id = guid();
    let timestamp = entra_timestamp(SystemTime::now());
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {}\r\nTimestamp: {timestamp}",
            ctx.correlation_id
        ),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": ctx.correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    json_response(status, &body, ctx, retry_after)
}

fn status_fault(
    status: u16,
    retry_after: Option<u64>,
    ctx: &ErrorContext,
) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (error, code, message) = match status.as_u16() {
        429 => (
            "temporarily_unavailable",
            90055,
            "TenantThrottlingError - There are too many incoming requests.",
        ),
        500 => (
            "server_error",
            90033,
            "A transient error has occurred. Please try again.",
        ),
        501..=599 => (
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again.",
        ),
        _ => (
            "invalid_request",
            9002313,
            "Invalid request. Request is malformed or invalid.",
        ),
    };
    error_response(status, error, code, message, ctx, retry_after)
}

fn garbage() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(
        b"<html><body>Service temporarily unavailable</body></html>",
    )));
    // Claims JSON on purpose: clients must survive a body that does not parse.
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

fn json_response(
    status: StatusCode,
    body: &Value,
    ctx: &ErrorContext,
    retry_after: Option<u64>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    if let Ok(v) = HeaderValue::from_str(&ctx.correlation_id) {
        headers.insert("client-request-id", v);
    }
    if let Some(secs) = retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A random (v4-style) GUID for trace / correlation ids.
fn guid() -> String {
    static FALLBACK: AtomicU64 = AtomicU64::new(1);
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // Uniqueness is all that matters here.
        b[..8].copy_from_slice(&FALLBACK.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Entra's `timestamp` format: `2024-05-01 12:34:56Z`.
fn entra_timestamp(t: SystemTime) -> String {
    utc(time::OffsetDateTime::from(t), ' ', "")
}

/// `2024-05-01T12:34:56.0000000Z`, as in AADSTS700024 messages.
fn iso_time(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => utc(t, 'T', ".0000000"),
        Err(_) => format!("{unix} (out of range)"),
    }
}

/// `2024-05-01{sep}12:34:56{fraction}Z`: the two formats Entra writes times in (and, with
/// `'T'` and no fraction, Kubernetes' timestamps).
pub(crate) fn utc(t: time::OffsetDateTime, sep: char, fraction: &str) -> String {
    format!(
        "{:04}-{:02}-{:02}{sep}{:02}:{:02}:{:02}{fraction}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}
