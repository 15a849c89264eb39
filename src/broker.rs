//! The broker core: identity and resource policy, the token cache, request coalescing,
//! background refresh, retries with backoff, and stale-while-error. It knows nothing of HTTP.
//!
//! One cache entry per resource (the broker serves one identity). An entry's life:
//! 1. The first request for a resource takes the entry's fetch lock and exchanges; concurrent
//!    requests queue on that lock and find the token when they get it (one Entra call).
//! 2. A background task refreshes the token at half its lifetime, so callers never wait on
//!    Entra once warm; while the refresh fails, the old token is served until it expires.
//! 3. Failures set a "not before" instant (backoff, `Retry-After`, or the permanent-error
//!    backoff); Entra is not called again before it, and callers get the recorded error.
//! 4. An entry nobody asked for during a whole token lifetime stops refreshing and is dropped.

use crate::assertion::{now_unix, AssertionError};
use crate::exchange::{ExchangeError, Exchanger, Token};
use crate::metrics::{CacheResult, Metrics, Outcome, TokenLabels};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// Most distinct resources cached at once; bounds memory and Entra calls when no allow-list
/// restricts what a local process may ask for.
const MAX_ENTRIES: usize = 64;
/// A token this close to expiry is not handed out: it could expire in flight. Capped at a
/// tenth of the lifetime so short-lived tokens stay usable.
const EXPIRY_SKEW_SECS: u64 = 10;

fn servable(t: &Token) -> bool {
    let skew = EXPIRY_SKEW_SECS.min(t.expires_on.saturating_sub(t.not_before) / 10);
    t.expires_on > now_unix() + skew
}

/// The identity this broker serves and how callers may name it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub client_id: String,
    pub object_id: Option<String>,
    pub resource_id: Option<String>,
}

/// How a request names the identity it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// No selector, or an empty `client_id=` (Velero 1.15 sends one): the configured identity.
    Default,
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Wait after a permanent failure before Entra is asked again.
    pub error_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            error_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Capped exponential backoff with "equal jitter": half fixed, half random, so retries
    /// of many pods spread out but never collapse to zero.
    fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let capped = exp.min(self.max_backoff);
        let half = capped / 2;
        half + half.mul_f64(jitter())
    }
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

/// Why a token could not be served. Protocol adapters map these to their error formats.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("Identity not found: {0} does not name this pod's identity (client id {1})")]
    IdentityNotFound(String, String),
    #[error("resource {resource:?} is not allowed by this broker's policy (allowed: {allowed}); add it with --allow-resource / IMDS_BROKER_ALLOW_RESOURCES")]
    ResourceRefused { resource: String, allowed: String },
    #[error("too many distinct resources requested (limit {0}); restrict clients or use --allow-resource")]
    TooManyResources(usize),
    /// The token file is not there (yet); retry shortly.
    #[error("not ready: {0}")]
    NotReady(AssertionError),
    /// The token file is there but unusable; configuration must change.
    #[error("{0}")]
    BadAssertion(AssertionError),
    #[error("Entra ID refused the token request ({code}): {description}. Fix: {hint}")]
    EntraRefused {
        error: String,
        code: String,
        description: String,
        hint: String,
        /// When Entra will be asked again.
        retry_after: Duration,
    },
    #[error("Entra ID is unavailable ({message}); retry after {}s", retry_after.as_secs().max(1))]
    EntraUnavailable {
        message: String,
        retry_after: Duration,
    },
}

impl BrokerError {
    /// Seconds a client should wait before retrying, where retrying makes sense.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BrokerError::NotReady(_) => Some(Duration::from_secs(1)),
            BrokerError::EntraUnavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    fn with_retry_after(mut self, wait: Duration) -> Self {
        match &mut self {
            BrokerError::EntraRefused { retry_after, .. }
            | BrokerError::EntraUnavailable { retry_after, .. } => *retry_after = wait,
            _ => {}
        }
        self
    }
}

/// Broker configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub identity: Identity,
    /// `None` serves any resource.
    pub allow_resources: Option<Vec<String>>,
    pub retry: RetryPolicy,
}

pub struct Broker {
    identity: Identity,
    /// Allowed resources as [`resource_key`]s; compared case-insensitively.
    allow: Option<Vec<String>>,
    allow_display: String,
    retry: RetryPolicy,
    exchanger: Arc<dyn Exchanger>,
    metrics: Arc<Metrics>,
    entries: RwLock<HashMap<String, Arc<Entry>>>,
}

struct Entry {
    resource: String,
    state: Mutex<State>,
    /// Held for the duration of an exchange: concurrent cold requests wait here (coalescing).
    fetch: tokio::sync::Mutex<()>,
}

struct State {
    token: Option<Arc<Token>>,
    /// When the background refresh should run (half the token's lifetime).
    refresh_at: Instant,
    /// Entra is not called before this instant (backoff, Retry-After, permanent error).
    not_before: Option<Instant>,
    /// The error recorded with `not_before`, answered to callers until then.
    last_error: Option<BrokerError>,
    failures: u32,
    last_used: Instant,
    refresher: bool,
}

impl Broker {
    pub fn new(config: BrokerConfig, exchanger: Arc<dyn Exchanger>, metrics: Arc<Metrics>) -> Self {
        let allow = config
            .allow_resources
            .as_ref()
            .map(|list| list.iter().map(|r| resource_key(r).to_owned()).collect());
        let allow_display = config
            .allow_resources
            .as_ref()
            .map(|l| l.join(", "))
            .unwrap_or_else(|| "any".into());
        Broker {
            identity: config.identity,
            allow,
            allow_display,
            retry: config.retry,
            exchanger,
            metrics,
            entries: RwLock::new(HashMap::new()),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Readiness of the local inputs; never waits on Entra.
    pub fn ready(&self) -> Result<(), String> {
        self.exchanger.ready()
    }

    /// Checks the identity selector and the resource policy, without any Entra call.
    pub fn authorize(&self, selector: &Selector, resource: &str) -> Result<(), BrokerError> {
        let id = &self.identity;
        let matches = |configured: &Option<String>, asked: &str| {
            configured
                .as_deref()
                .is_some_and(|c| c.eq_ignore_ascii_case(asked))
        };
        // The description is built only for a refusal: this runs on every request.
        let refused = match selector {
            Selector::Default => None,
            Selector::ClientId(c) => {
                (!c.eq_ignore_ascii_case(&id.client_id)).then(|| format!("client_id {c}"))
            }
            Selector::ObjectId(o) => (!matches(&id.object_id, o)).then(|| format!("object_id {o}")),
            Selector::ResourceId(r) => {
                (!matches(&id.resource_id, r)).then(|| format!("resource id {r}"))
            }
        };
        if let Some(named) = refused {
            return Err(BrokerError::IdentityNotFound(named, id.client_id.clone()));
        }
        if let Some(allow) = &self.allow {
            // Compared in place (a handful of entries) rather than hashing a normalised copy
            // of the resource on every request.
            let asked = resource_key(resource);
            if !allow.iter().any(|a| a.eq_ignore_ascii_case(asked)) {
                return Err(BrokerError::ResourceRefused {
                    resource: resource.to_owned(),
                    allowed: self.allow_display.clone(),
                });
            }
        }
        Ok(())
    }

    /// A usable cached token for `resource`, without waiting; `None` when only
    /// [`Broker::token`] can get one. The hot path.
    pub fn cached_token(
        &self,
        selector: &Selector,
        resource: &str,
    ) -> Result<Option<Arc<Token>>, BrokerError> {
        self.find(selector, resource).map(|(_, token)| token)
    }

    /// A token for `resource`, from the cache when possible.
    pub async fn token(
        self: &Arc<Self>,
        selector: &Selector,
        resource: &str,
    ) -> Result<Arc<Token>, BrokerError> {
        let (entry, cached) = self.find(selector, resource)?;
        if let Some(token) = cached {
            return Ok(token);
        }
        // Boxed: the exchange's state is over a kilobyte and only a cache miss needs it.
        // Inline, it made every request's future that large, and hyper and Tokio move a
        // request's future several times (~800 instructions per cached answer,
        // bench/RESULTS.md).
        Box::pin(self.miss(entry)).await
    }

    /// The policy check, the resource's cache entry, and its usable token if any.
    fn find(
        &self,
        selector: &Selector,
        resource: &str,
    ) -> Result<(Arc<Entry>, Option<Arc<Token>>), BrokerError> {
        self.authorize(selector, resource)?;
        let entry = self.entry(resource)?;
        let token = self.cached(&entry);
        Ok((entry, token))
    }

    /// The slow path: wait for the entry's exchange, or run it (coalescing).
    async fn miss(self: &Arc<Self>, entry: Arc<Entry>) -> Result<Arc<Token>, BrokerError> {
        self.metrics.cache(CacheResult::miss);
        let _guard = entry.fetch.lock().await;
        // Whoever held the lock before us may have fetched the token (coalescing).
        if let Some(token) = self.usable(&entry) {
            return Ok(token);
        }
        let result = self.fetch_with_retries(&entry).await;
        if result.is_ok() {
            self.ensure_refresher(&entry);
        }
        result
    }

    /// The fast path: a valid cached token, counted as a hit or a stale hit.
    fn cached(&self, entry: &Entry) -> Option<Arc<Token>> {
        let now = Instant::now();
        let mut state = lock(&entry.state);
        state.last_used = now;
        let token = state.token.as_ref()?;
        if !servable(token) {
            return None;
        }
        let token = token.clone();
        let fresh = now < state.refresh_at;
        drop(state);
        self.metrics.cache(if fresh {
            CacheResult::hit
        } else {
            CacheResult::stale
        });
        Some(token)
    }

    /// A token still valid for handing out, without counting a cache lookup.
    fn usable(&self, entry: &Entry) -> Option<Arc<Token>> {
        let state = lock(&entry.state);
        state.token.as_ref().filter(|t| servable(t)).cloned()
    }

    fn entry(&self, resource: &str) -> Result<Arc<Entry>, BrokerError> {
        if let Some(e) = read(&self.entries).get(resource) {
            return Ok(e.clone());
        }
        let mut entries = write(&self.entries);
        if let Some(e) = entries.get(resource) {
            return Ok(e.clone());
        }
        if entries.len() >= MAX_ENTRIES {
            // Entries that never obtained a token (refused or failing resources) go first, so
            // junk requests cannot crowd out real ones. Waiters keep their own Arc.
            entries.retain(|_, e| lock(&e.state).token.is_some());
        }
        if entries.len() >= MAX_ENTRIES {
            return Err(BrokerError::TooManyResources(MAX_ENTRIES));
        }
        let now = Instant::now();
        let entry = Arc::new(Entry {
            resource: resource.to_owned(),
            state: Mutex::new(State {
                token: None,
                refresh_at: now,
                not_before: None,
                last_error: None,
                failures: 0,
                last_used: now,
                refresher: false,
            }),
            fetch: tokio::sync::Mutex::new(()),
        });
        entries.insert(resource.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Foreground exchange for a caller with no usable token: retries transient failures
    /// within the retry policy, never before a recorded `not_before`. Caller holds `fetch`.
    async fn fetch_with_retries(&self, entry: &Entry) -> Result<Arc<Token>, BrokerError> {
        let mut attempt = 0;
        loop {
            if let Some(wait) = self.gate(entry) {
                let recorded = lock(&entry.state).last_error.clone();
                // Short waits (a retry backoff) are waited out; long ones answered at once.
                if attempt == 0
                    || wait > self.retry.max_backoff
                    || attempt >= self.retry.max_attempts
                {
                    return Err(recorded
                        .unwrap_or_else(|| unavailable("waiting to retry Entra".into(), wait))
                        .with_retry_after(wait));
                }
                tokio::time::sleep(wait).await;
            }
            attempt += 1;
            match self.exchange_once(entry).await {
                Ok(token) => return Ok(token),
                Err(err @ (BrokerError::NotReady(_) | BrokerError::BadAssertion(_))) => {
                    return Err(err)
                }
                Err(err @ BrokerError::EntraRefused { .. }) => return Err(err),
                Err(err) => {
                    let wait = self.gate(entry).unwrap_or_default();
                    if attempt >= self.retry.max_attempts || wait > self.retry.max_backoff {
                        return Err(err.with_retry_after(wait));
                    }
                }
            }
        }
    }

    /// Time left before Entra may be called for this entry, if any.
    fn gate(&self, entry: &Entry) -> Option<Duration> {
        let state = lock(&entry.state);
        let nb = state.not_before?;
        let now = Instant::now();
        (nb > now).then(|| nb - now)
    }

    /// One exchange; records the outcome in the entry (token, or error and backoff).
    async fn exchange_once(&self, entry: &Entry) -> Result<Arc<Token>, BrokerError> {
        let started = Instant::now();
        let result = self
            .exchanger
            .exchange(&self.identity.client_id, &entry.resource)
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        let now = Instant::now();
        let mut state = lock(&entry.state);
        match result {
            Ok(token) => {
                self.metrics.entra(Outcome::success, elapsed);
                let lifetime = remaining(token.expires_on);
                let token = Arc::new(token);
                state.token = Some(token.clone());
                // Half-life: tokens handed out keep at least half their lifetime while Entra
                // is healthy (what SDK clients expect before they refresh on their own).
                state.refresh_at = now + lifetime / 2;
                state.not_before = None;
                state.last_error = None;
                state.failures = 0;
                drop(state);
                self.set_expiry_gauge(&entry.resource, token.expires_on);
                tracing::info!(
                    resource = %entry.resource,
                    client_id = %self.identity.client_id,
                    expires_on = token.expires_on,
                    lifetime_s = lifetime.as_secs(),
                    latency_ms = (elapsed * 1000.0) as u64,
                    "token obtained"
                );
                Ok(token)
            }
            Err(ExchangeError::Assertion(e)) => {
                // Local problem, no request was sent: not an Entra outcome, nothing to back off.
                tracing::warn!(resource = %entry.resource, error = %e, "service-account token unusable");
                Err(if e.is_transient() {
                    BrokerError::NotReady(e)
                } else {
                    BrokerError::BadAssertion(e)
                })
            }
            Err(ExchangeError::Permanent {
                error,
                code,
                description,
                hint,
            }) => {
                self.metrics.entra(Outcome::permanent, elapsed);
                let wait = self.retry.error_backoff;
                let err = BrokerError::EntraRefused {
                    error,
                    code,
                    description,
                    hint,
                    retry_after: wait,
                };
                tracing::error!(resource = %entry.resource, error = %err, next_attempt_s = wait.as_secs(), "Entra refused the exchange");
                state.failures += 1;
                state.not_before = Some(now + wait);
                state.last_error = Some(err.clone());
                Err(err)
            }
            Err(ExchangeError::Transient {
                message,
                retry_after,
            }) => {
                self.metrics.entra(Outcome::transient, elapsed);
                state.failures += 1;
                let backoff = self.retry.backoff(state.failures);
                // Retry-After is a floor: never call Entra again before it elapses.
                let wait = retry_after.map_or(backoff, |ra| ra.max(backoff));
                let err = unavailable(message, wait);
                tracing::warn!(resource = %entry.resource, error = %err, failures = state.failures, next_attempt_ms = wait.as_millis() as u64, "Entra exchange failed");
                state.not_before = Some(now + wait);
                state.last_error = Some(err.clone());
                Err(err)
            }
        }
    }

    fn set_expiry_gauge(&self, resource: &str, expires_on: u64) {
        let left = expires_on as i64 - now_unix() as i64;
        self.metrics
            .token_expiry
            .get_or_create(&TokenLabels {
                client_id: self.identity.client_id.clone(),
                resource: resource.to_owned(),
            })
            .set(left);
    }

    /// Refreshes the seconds-to-expiry gauges (called before a metrics scrape).
    pub fn update_gauges(&self) {
        let entries: Vec<Arc<Entry>> = read(&self.entries).values().cloned().collect();
        for entry in entries {
            let expires = lock(&entry.state).token.as_ref().map(|t| t.expires_on);
            if let Some(exp) = expires {
                self.set_expiry_gauge(&entry.resource, exp);
            }
        }
    }

    fn ensure_refresher(self: &Arc<Self>, entry: &Arc<Entry>) {
        let mut state = lock(&entry.state);
        if state.refresher {
            return;
        }
        state.refresher = true;
        drop(state);
        let broker = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move { broker.refresh_loop(entry).await });
    }

    /// Background refresh of one entry until it goes idle.
    async fn refresh_loop(self: Arc<Self>, entry: Arc<Entry>) {
        loop {
            let (wake, idle_since, lifetime) = {
                let state = lock(&entry.state);
                let Some(token) = state.token.as_ref() else {
                    break;
                };
                let wake = match state.not_before {
                    Some(nb) if nb > state.refresh_at => nb,
                    _ => state.refresh_at,
                };
                let lifetime = token.expires_on.saturating_sub(token.not_before);
                (wake, state.last_used, Duration::from_secs(lifetime.max(60)))
            };
            tokio::time::sleep_until(wake).await;
            // Nobody asked for a whole token lifetime: stop refreshing and forget it.
            let last_used = lock(&entry.state).last_used;
            if last_used == idle_since && last_used.elapsed() >= lifetime {
                tracing::debug!(resource = %entry.resource, "idle cache entry dropped");
                write(&self.entries).remove(&entry.resource);
                break;
            }
            let _guard = entry.fetch.lock().await;
            let due = {
                let state = lock(&entry.state);
                let now = Instant::now();
                now >= state.refresh_at && state.not_before.is_none_or(|nb| now >= nb)
            };
            if due {
                // Failures are recorded in the entry; the old token keeps being served.
                let _ = self.exchange_once(&entry).await;
            }
            let expired = lock(&entry.state)
                .token
                .as_ref()
                .is_none_or(|t| t.expires_on <= now_unix());
            if expired && self.gate(&entry).is_none() {
                // Expired with no token to serve and nothing scheduled: let requests drive it.
                lock(&entry.state).refresher = false;
                break;
            }
        }
    }
}

/// Time until `expires_on` (Unix seconds), with sub-second precision.
fn remaining(expires_on: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(expires_on).saturating_sub(now)
}

fn unavailable(message: String, wait: Duration) -> BrokerError {
    BrokerError::EntraUnavailable {
        message,
        retry_after: wait,
    }
}

/// Resource URIs compare without surrounding space or a trailing slash, and
/// case-insensitively, so an allow-list entry `https://storage.azure.com/` also admits
/// `https://storage.azure.com`.
fn resource_key(r: &str) -> &str {
    r.trim().trim_end_matches('/')
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data here (plain assignments).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}
