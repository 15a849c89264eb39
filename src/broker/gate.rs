//! One gate in front of Entra for the whole broker. Entra throttles per application and
//! tenant, and every pod of a Velero install shares one identity, so what one caller learns
//! about Entra holds for all of them:
//! - a transient failure (or a `Retry-After`) closes the gate for every resource until its
//!   backoff elapses, and consecutive failures keep growing that backoff across requests; an
//!   unusable token file closes it the same way (no exchange can succeed without it);
//! - a success ends the backoff but never shortens Entra's own `Retry-After`;
//! - at most a few exchanges are in flight at once, and only one after a failure (half-open):
//!   concurrency comes back when that probe succeeds, so a reopened gate does not send a burst
//!   into an Entra that may still be throttling;
//! - new resources are admitted at a bounded rate (a local process inventing resources must
//!   not turn into a stream of Entra calls).

use super::error::{unavailable, BrokerError};
use super::lock;
use super::retry::RetryPolicy;
use crate::clock::later;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// Bounds of the gate.
#[derive(Debug, Clone)]
pub struct GateLimits {
    /// Exchanges in flight at once, over all resources.
    pub max_in_flight: usize,
    /// New resources admitted at once, then `new_per_second`.
    pub new_burst: u32,
    pub new_per_second: u32,
}

impl Default for GateLimits {
    fn default() -> Self {
        GateLimits {
            max_in_flight: 4,
            new_burst: 16,
            new_per_second: 2,
        }
    }
}

pub struct Gate {
    limits: GateLimits,
    state: Mutex<State>,
    in_flight: Semaphore,
    /// Held by the one exchange that probes Entra after a failure.
    probe: Semaphore,
}

struct State {
    /// Entra is not called before this instant: the broker's backoff after failures.
    backoff_until: Option<Instant>,
    /// Nor before this one: Entra's own `Retry-After`, which only time lifts.
    throttled_until: Option<Instant>,
    /// The error that closed the gate, answered to callers while it is closed.
    last_error: Option<BrokerError>,
    /// Consecutive failures, over all resources; reset by a success. Non-zero means
    /// half-open: one exchange at a time.
    failures: u32,
    /// New-resource token bucket.
    tokens: f64,
    refilled: Instant,
}

/// Held for the duration of one exchange.
pub struct Permit<'a> {
    _slot: SemaphorePermit<'a>,
    _probe: Option<SemaphorePermit<'a>>,
}

impl State {
    fn open_at(&self) -> Option<Instant> {
        self.backoff_until.max(self.throttled_until)
    }
}

async fn acquire(semaphore: &Semaphore) -> SemaphorePermit<'_> {
    // The gate's semaphores are never closed, so acquire cannot fail.
    loop {
        if let Ok(p) = semaphore.acquire().await {
            return p;
        }
    }
}

impl Gate {
    pub fn new(limits: GateLimits) -> Self {
        let in_flight = Semaphore::new(limits.max_in_flight.max(1));
        Gate {
            state: Mutex::new(State {
                backoff_until: None,
                throttled_until: None,
                last_error: None,
                failures: 0,
                tokens: f64::from(limits.new_burst.max(1)),
                refilled: Instant::now(),
            }),
            limits,
            in_flight,
            probe: Semaphore::new(1),
        }
    }

    /// When Entra may be called again and why not now, if the gate is closed at `now`.
    pub fn closed(&self, now: Instant) -> Option<(Instant, BrokerError)> {
        let state = lock(&self.state);
        let open_at = state.open_at().filter(|at| *at > now)?;
        let err = state
            .last_error
            .clone()
            .unwrap_or_else(|| unavailable("waiting to retry Entra", open_at - now));
        Some((open_at, err))
    }

    /// After a failure, until a success: exchanges go one at a time.
    pub fn recovering(&self) -> bool {
        lock(&self.state).failures > 0
    }

    /// Ends the backoff and half-open state; a `Retry-After` still running stays in force
    /// (an exchange that left before the throttle must not cancel it).
    pub fn record_success(&self, now: Instant) {
        let mut state = lock(&self.state);
        state.failures = 0;
        state.backoff_until = None;
        if state.throttled_until.is_none_or(|t| t <= now) {
            state.throttled_until = None;
            state.last_error = None;
        }
    }

    /// Closes the gate after a transient failure; returns the consecutive failures and the
    /// wait in force before the next call.
    pub fn record_transient(
        &self,
        now: Instant,
        message: &str,
        retry_after: Option<Duration>,
        policy: &RetryPolicy,
    ) -> (u32, Duration) {
        self.record_failure(now, policy, retry_after, |wait| unavailable(message, wait))
    }

    /// Closes the gate after the token file could not be used: with no assertion no exchange
    /// can succeed, so it is retried on the same backoff, and callers get `err` meanwhile.
    pub fn record_unusable_assertion(
        &self,
        now: Instant,
        err: BrokerError,
        policy: &RetryPolicy,
    ) -> (u32, Duration) {
        self.record_failure(now, policy, None, |_| err)
    }

    fn record_failure(
        &self,
        now: Instant,
        policy: &RetryPolicy,
        retry_after: Option<Duration>,
        error: impl FnOnce(Duration) -> BrokerError,
    ) -> (u32, Duration) {
        let mut state = lock(&self.state);
        state.failures = state.failures.saturating_add(1);
        let before = state.open_at();
        // Never shorten a wait already set (a throttle stays a throttle).
        let backoff = later(now, policy.backoff(state.failures));
        state.backoff_until = state.backoff_until.max(Some(backoff));
        if let Some(ra) = retry_after {
            let throttle = later(now, ra.min(policy.max_retry_after));
            state.throttled_until = state.throttled_until.max(Some(throttle));
        }
        // What callers and the log are told is the wait in force, which may be a longer one.
        let open_at = state.open_at().unwrap_or(now);
        let wait = open_at.saturating_duration_since(now);
        if before.is_none_or(|b| b <= now || open_at > b) || state.last_error.is_none() {
            state.last_error = Some(error(wait));
        }
        (state.failures, wait)
    }

    /// A slot for one exchange (waits while `max_in_flight` run, or behind the probe while
    /// recovering), or why Entra may not be called now: the gate may have closed while this
    /// caller waited, and an exchange must not leave through a closed gate.
    pub async fn permit(&self) -> Result<Permit<'_>, (Instant, BrokerError)> {
        let probe = if self.recovering() {
            Some(acquire(&self.probe).await)
        } else {
            None
        };
        let slot = acquire(&self.in_flight).await;
        if let Some(closed) = self.closed(Instant::now()) {
            return Err(closed);
        }
        // The probe ahead may have succeeded meanwhile: then no longer one at a time.
        let probe = probe.filter(|_| self.recovering());
        Ok(Permit {
            _slot: slot,
            _probe: probe,
        })
    }

    /// Admits one new resource, or says how long until one can be.
    pub fn admit_new(&self, now: Instant) -> Result<(), Duration> {
        let mut state = lock(&self.state);
        let rate = f64::from(self.limits.new_per_second.max(1));
        let burst = f64::from(self.limits.new_burst.max(1));
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        state.tokens = (state.tokens + elapsed * rate).min(burst);
        state.refilled = now;
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - state.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed_for(gate: &Gate, now: Instant) -> Duration {
        gate.closed(now).map_or(Duration::ZERO, |(at, _)| at - now)
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_floor_and_is_clamped() {
        let p = RetryPolicy::default();
        let now = Instant::now();
        let gate = Gate::new(GateLimits::default());
        gate.record_transient(now, "429", Some(Duration::from_secs(20)), &p);
        assert_eq!(closed_for(&gate, now), Duration::from_secs(20));
        let gate = Gate::new(GateLimits::default());
        gate.record_transient(now, "429", Some(Duration::MAX), &p);
        assert_eq!(closed_for(&gate, now), p.max_retry_after);
        // A shorter Retry-After than the backoff does not shorten it.
        let gate = Gate::new(GateLimits::default());
        for _ in 0..5 {
            gate.record_transient(now, "503", None, &p);
        }
        gate.record_transient(now, "429", Some(Duration::ZERO), &p);
        assert!(closed_for(&gate, now) >= Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_ends_the_backoff_but_not_a_retry_after() {
        let p = RetryPolicy::default();
        let now = Instant::now();
        let gate = Gate::new(GateLimits::default());
        gate.record_transient(now, "503", None, &p);
        gate.record_success(now);
        assert!(gate.closed(now).is_none(), "backoff ended");
        assert!(!gate.recovering());
        gate.record_transient(now, "429", Some(Duration::from_secs(300)), &p);
        gate.record_success(now);
        assert_eq!(closed_for(&gate, now), Duration::from_secs(300));
        let later = now + Duration::from_secs(300);
        gate.record_success(later);
        assert!(gate.closed(later).is_none());
    }
}
