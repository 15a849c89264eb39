//! The broker core: identity and resource policy, the token cache, request coalescing,
//! background refresh, retries with backoff, and stale-while-error. It knows nothing of HTTP.
//!
//! One cache entry per resource (the broker serves one identity). An entry's life:
//! 1. The first request for a resource takes the entry's fetch lock and exchanges; concurrent
//!    requests queue on that lock and find the token when they get it (one Entra call).
//! 2. A background task refreshes the token at half its lifetime if it was asked for since it
//!    was obtained, so callers never wait on Entra once warm; while the refresh fails, the old
//!    token is served until it expires. An entry nobody asks for again is dropped at expiry.
//! 3. Transient failures close the broker-wide [`gate::Gate`] (backoff, `Retry-After`) and
//!    callers are held until it opens or their deadline passes; a permanent refusal is
//!    answered from the entry's memory for the error backoff.
//!
//! Files: [`policy`] (who may ask for what), [`entry`] (one entry's state), [`gate`] (the
//! broker-wide Entra gate), [`retry`] (backoff), [`refresh`] (the background task),
//! [`error`] (what callers get).

mod entry;
pub mod error;
pub mod gate;
pub mod policy;
mod refresh;
pub mod retry;
#[cfg(test)]
mod tests;

pub use crate::exchange::Token;
pub use error::BrokerError;
pub use gate::GateLimits;
pub use policy::{Identity, Selector};
pub use retry::{RetryPolicy, CLIENT_RETRY_AFTER_MAX};

use crate::exchange::{ExchangeError, Exchanger};
use crate::metrics::{CacheResult, Metrics, Outcome, TokenLabels};
use entry::{Entry, Found};
use error::unavailable;
use gate::Gate;
use policy::{same_resource, Policy};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// Most distinct resources cached at once (entries being fetched count); bounds memory and
/// Entra calls when no allow-list restricts what a local process may ask for.
pub const MAX_ENTRIES: usize = 64;

/// How long a caller with a still-usable token waits for the refresh it woke (or one in
/// flight) before it is handed the old token: a slow Entra must not hold warm callers.
pub const REFRESH_WAIT: Duration = Duration::from_secs(2);

/// Broker configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub identity: Identity,
    /// `None` serves any resource.
    pub allow_resources: Option<Vec<String>>,
    pub retry: RetryPolicy,
    pub gate: GateLimits,
}

pub struct Broker {
    policy: Policy,
    retry: RetryPolicy,
    gate: Gate,
    exchanger: Arc<dyn Exchanger>,
    metrics: Arc<Metrics>,
    max_entries: usize,
    /// A handful of entries, compared by [`same_resource`]: a linear scan allocates nothing,
    /// where a map keyed by the normalised resource would build a key per request.
    entries: RwLock<Vec<Arc<Entry>>>,
}

impl Broker {
    pub fn new(config: BrokerConfig, exchanger: Arc<dyn Exchanger>, metrics: Arc<Metrics>) -> Self {
        let max_entries = MAX_ENTRIES.max(config.allow_resources.as_ref().map_or(0, Vec::len));
        Broker {
            policy: Policy::new(config.identity, config.allow_resources),
            retry: config.retry,
            gate: Gate::new(config.gate),
            exchanger,
            metrics,
            max_entries,
            entries: RwLock::new(Vec::new()),
        }
    }

    pub fn identity(&self) -> &Identity {
        self.policy.identity()
    }

    /// Readiness of the local inputs; never waits on Entra.
    pub fn ready(&self) -> Result<(), String> {
        self.exchanger.ready()
    }

    /// Checks the identity selector and the resource policy, without any Entra call.
    pub fn authorize(&self, selector: &Selector, resource: &str) -> Result<(), BrokerError> {
        self.policy.authorize(selector, resource)
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

    /// A token for `resource`, from the cache when possible. A caller that has to wait for
    /// Entra (an exchange in flight, a backoff, a throttle) is held until `deadline` at most.
    pub async fn token(
        self: &Arc<Self>,
        selector: &Selector,
        resource: &str,
        deadline: Instant,
    ) -> Result<Arc<Token>, BrokerError> {
        let (entry, cached) = self.find(selector, resource)?;
        if let Some(token) = cached {
            return Ok(token);
        }
        // Boxed: the exchange's state is large and only a cache miss needs it; inline it
        // made every request's future that large (bench/RESULTS.md).
        Box::pin(self.miss(entry, deadline)).await
    }

    /// The policy check, the resource's cache entry, and its usable token if any.
    fn find(
        &self,
        selector: &Selector,
        resource: &str,
    ) -> Result<(Arc<Entry>, Option<Arc<Token>>), BrokerError> {
        self.policy.authorize(selector, resource)?;
        let now = Instant::now();
        let entry = self.entry(resource, now)?;
        let token = match entry.lookup(now) {
            Found::Fresh(t) => {
                self.metrics.cache(CacheResult::hit);
                Some(t)
            }
            Found::Stale(t) => {
                self.metrics.cache(CacheResult::stale);
                Some(t)
            }
            Found::Miss => None,
        };
        Ok((entry, token))
    }

    /// The entry for `resource`, created if there is room and the new-resource rate allows.
    fn entry(&self, resource: &str, now: Instant) -> Result<Arc<Entry>, BrokerError> {
        let find = |entries: &[Arc<Entry>]| {
            entries
                .iter()
                .find(|e| same_resource(&e.resource, resource))
                .cloned()
        };
        if let Some(e) = find(&read(&self.entries)) {
            return Ok(e);
        }
        let mut entries = write(&self.entries);
        if let Some(e) = find(&entries) {
            return Ok(e);
        }
        if entries.len() >= self.max_entries {
            // Entries without a usable token that nobody is fetching or waiting on (refused,
            // failing or expired resources) go first, so junk requests cannot crowd out real ones.
            // An entry being fetched or waited on is in use (someone else holds its Arc).
            entries.retain(|e| e.usable(now).is_some() || Arc::strong_count(e) > 1);
        }
        if entries.len() >= self.max_entries {
            return Err(BrokerError::TooManyResources(self.max_entries));
        }
        // Allow-listed resources are bounded by the list; anything else is rate-limited.
        if !self.policy.restricted() {
            self.gate
                .admit_new(now)
                .map_err(|wait| BrokerError::NewResourcesThrottled { retry_after: wait })?;
        }
        let entry = Arc::new(Entry::new(
            self.policy.canonical(resource),
            self.policy.label(resource),
        ));
        entries.push(entry.clone());
        Ok(entry)
    }

    fn remove(&self, entry: &Arc<Entry>) {
        write(&self.entries).retain(|e| !Arc::ptr_eq(e, entry));
    }

    /// The slow path: wait for the entry's exchange, or run it (coalescing).
    async fn miss(
        self: &Arc<Self>,
        entry: Arc<Entry>,
        deadline: Instant,
    ) -> Result<Arc<Token>, BrokerError> {
        self.metrics.cache(CacheResult::miss);
        if let Some(usable) = entry.usable(Instant::now()) {
            return Ok(self.refreshed_or(&entry, usable, deadline).await);
        }
        let Ok(guard) = tokio::time::timeout_at(deadline, entry.fetch.lock()).await else {
            let now = Instant::now();
            // The caller ahead may be waiting out a refusal, Entra's throttle or the backoff:
            // name that (with its wait) rather than an exchange that is not running.
            if let Some((open_at, err)) = entry.refused(now) {
                return Err(err.with_retry_after(client_wait(open_at, true)));
            }
            if let Some((open_at, err)) = self.gate.closed(now) {
                return Err(err.with_retry_after(client_wait(open_at, false)));
            }
            return Err(unavailable(
                "a token exchange for this resource is still running",
                Duration::from_secs(1),
            ));
        };
        // Whoever held the lock before us may have fetched the token (coalescing).
        if let Some(token) = entry.fresh(Instant::now()) {
            return Ok(token);
        }
        let result = self.fetch(&entry, deadline).await;
        drop(guard);
        if result.is_ok() {
            self.ensure_refresher(&entry);
        }
        result
    }

    /// A caller past the refresh point with a usable token in hand (its lookup woke the
    /// refresher): the refreshed token if the refresher's next attempt brings one soon, and
    /// otherwise the old one, at once when Entra cannot be asked (stale-while-error). Such a
    /// caller never exchanges itself: the refresher does, one exchange for all of them.
    async fn refreshed_or(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        usable: Arc<Token>,
        deadline: Instant,
    ) -> Arc<Token> {
        // Listening before looking, so an attempt that ends in between is not missed.
        let attempt = entry.attempted();
        tokio::pin!(attempt);
        attempt.as_mut().enable();
        self.ensure_refresher(entry);
        let now = Instant::now();
        if entry.refused(now).is_none() && self.gate.closed(now).is_none() {
            let _ = tokio::time::timeout_at(deadline.min(now + REFRESH_WAIT), attempt).await;
        }
        entry.fresh(Instant::now()).unwrap_or(usable)
    }

    /// Foreground exchange for a caller (who holds `entry.fetch`): waits out the gate while
    /// its deadline allows, within the attempt budget. A still-usable token is the answer
    /// whenever Entra cannot be asked or fails (stale-while-error).
    async fn fetch(&self, entry: &Entry, deadline: Instant) -> Result<Arc<Token>, BrokerError> {
        let mut attempts = 0;
        let mut last: Option<BrokerError> = None;
        loop {
            let now = Instant::now();
            let blocked = entry.refused(now).or_else(|| self.gate.closed(now));
            if let Some((open_at, err)) = blocked {
                if let Some(token) = entry.usable(now) {
                    return Ok(token);
                }
                // An unusable token file is read again when the gate opens (kubelet may have
                // rotated it, the operator fixed it); only Entra's refusal is answered from
                // memory.
                let permanent = matches!(err, BrokerError::EntraRefused { .. });
                if permanent || attempts >= self.retry.max_attempts || open_at > deadline {
                    if !permanent && attempts < self.retry.max_attempts {
                        // Hold the caller as long as its deadline allows: clients count
                        // their retry budget in requests, and a held one spends none.
                        tokio::time::sleep_until(deadline).await;
                    }
                    return Err(err.with_retry_after(client_wait(open_at, permanent)));
                }
                tokio::time::sleep_until(open_at).await;
                continue;
            }
            if attempts >= self.retry.max_attempts {
                return Err(
                    last.unwrap_or_else(|| unavailable("attempts exhausted", Duration::ZERO))
                );
            }
            let permit = match tokio::time::timeout_at(deadline, self.gate.permit()).await {
                Ok(Ok(permit)) => permit,
                // The gate closed while this caller waited: the top of the loop decides.
                Ok(Err(_closed)) => continue,
                Err(_) => {
                    let why = if self.gate.recovering() {
                        "Entra is being probed after a failure (one exchange at a time)"
                    } else {
                        "too many token exchanges in flight"
                    };
                    return Err(unavailable(why, Duration::from_secs(1)));
                }
            };
            attempts += 1;
            let result = self.exchange_once(entry).await;
            drop(permit);
            match result {
                Ok(token) => return Ok(token),
                // Stale-while-error, whatever the failure.
                Err(_) if entry.usable(Instant::now()).is_some() => continue,
                Err(err @ BrokerError::EntraUnavailable { .. }) => last = Some(err),
                Err(err) => return Err(err),
            }
        }
    }

    /// One exchange; records the outcome in the entry or the gate, then logs and counts it.
    async fn exchange_once(&self, entry: &Entry) -> Result<Arc<Token>, BrokerError> {
        let client_id = &self.identity().client_id;
        let started = Instant::now();
        let result = self.exchanger.exchange(client_id, &entry.resource).await;
        let elapsed = started.elapsed();
        let now = Instant::now();
        // Whatever the outcome, callers waiting on this entry's next attempt look again.
        let _attempted = entry.attempt_done();
        match result {
            Ok(token) => {
                let (token, lifetime) = entry.record_token(token, now);
                self.gate.record_success(now);
                self.metrics.entra(Outcome::success, elapsed.as_secs_f64());
                tracing::info!(
                    resource = %entry.resource,
                    %client_id,
                    expires_on = token.expires_on,
                    lifetime_s = lifetime.as_secs(),
                    latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                    "token obtained"
                );
                Ok(token)
            }
            Err(ExchangeError::Assertion(e)) => {
                // Local problem, no request was sent: not an Entra outcome. No exchange can
                // succeed without the file, so every resource waits out the same backoff (the
                // refresher too, which would otherwise retry at once, forever).
                let err = if e.is_transient() {
                    BrokerError::NotReady(e)
                } else {
                    BrokerError::BadAssertion(e)
                };
                let (failures, wait) =
                    self.gate
                        .record_unusable_assertion(now, err.clone(), &self.retry);
                tracing::warn!(
                    resource = %entry.resource,
                    error = %err,
                    failures,
                    next_attempt_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "service-account token unusable; no exchange for any resource before the next attempt"
                );
                Err(err)
            }
            Err(ExchangeError::Permanent {
                error,
                code,
                description,
                hint,
            }) => {
                let wait = self.retry.error_backoff;
                let err = BrokerError::EntraRefused {
                    error,
                    code,
                    description,
                    hint,
                    retry_after: wait,
                };
                entry.record_refusal(err.clone(), now, wait);
                self.metrics
                    .entra(Outcome::permanent, elapsed.as_secs_f64());
                tracing::error!(resource = %entry.resource, error = %err, next_attempt_s = wait.as_secs(), "Entra refused the exchange");
                Err(err)
            }
            Err(ExchangeError::Transient {
                message,
                retry_after,
            }) => {
                let (failures, wait) =
                    self.gate
                        .record_transient(now, &message, retry_after, &self.retry);
                self.metrics
                    .entra(Outcome::transient, elapsed.as_secs_f64());
                let err = unavailable(message, wait);
                tracing::warn!(
                    resource = %entry.resource,
                    error = %err,
                    failures,
                    next_attempt_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "Entra exchange failed; no exchange for any resource before the next attempt"
                );
                Err(err)
            }
        }
    }

    /// Sets the seconds-to-expiry gauges from the entries (called before a metrics scrape).
    /// Series go with their entries; entries sharing a label report the soonest expiry.
    pub fn update_gauges(&self) {
        let now = crate::clock::now_unix();
        let entries: Vec<Arc<Entry>> = read(&self.entries).clone();
        let gauges = &self.metrics.token_expiry;
        gauges.clear();
        let mut seen: Vec<(&str, u64)> = Vec::new();
        for entry in &entries {
            let Some(exp) = entry.expires_on() else {
                continue;
            };
            match seen.iter_mut().find(|(l, _)| *l == entry.label) {
                Some((_, soonest)) if *soonest <= exp => continue,
                Some((_, soonest)) => *soonest = exp,
                None => seen.push((&entry.label, exp)),
            }
            let left =
                i64::try_from(exp).unwrap_or(i64::MAX) - i64::try_from(now).unwrap_or(i64::MAX);
            gauges
                .get_or_create(&TokenLabels {
                    client_id: self.identity().client_id.clone(),
                    resource: entry.label.clone(),
                })
                .set(left);
        }
    }

    /// Resources with an entry (for tests and diagnostics).
    pub fn cached_resources(&self) -> usize {
        read(&self.entries).len()
    }
}

/// The `Retry-After` handed to a client for a gate that opens at `open_at`: what is left,
/// capped at what every client honours. A permanent refusal keeps its own backoff: no client
/// retries it.
fn client_wait(open_at: Instant, permanent: bool) -> Duration {
    let left = open_at.saturating_duration_since(Instant::now());
    if permanent {
        left
    } else {
        left.min(CLIENT_RETRY_AFTER_MAX)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data here (plain assignments).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}
