//! One gate in front of Entra for the whole broker. Entra throttles per application and
//! tenant, and every pod of a Velero install shares one identity, so what one caller learns
//! about Entra holds for all of them:
//! - a transient failure (or a `Retry-After`) closes the gate for every resource until its
//!   backoff elapses, and consecutive failures keep growing that backoff across requests;
//! - at most a few exchanges are in flight at once;
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
}

struct State {
    /// Entra is not called before this instant.
    not_before: Option<Instant>,
    /// The transient error that set `not_before`, answered to callers until then.
    last_error: Option<BrokerError>,
    /// Consecutive transient failures, over all resources; reset by a success.
    failures: u32,
    /// New-resource token bucket.
    tokens: f64,
    refilled: Instant,
}

impl Gate {
    pub fn new(limits: GateLimits) -> Self {
        let in_flight = Semaphore::new(limits.max_in_flight.max(1));
        Gate {
            state: Mutex::new(State {
                not_before: None,
                last_error: None,
                failures: 0,
                tokens: f64::from(limits.new_burst.max(1)),
                refilled: Instant::now(),
            }),
            limits,
            in_flight,
        }
    }

    /// When Entra may be called again and why not now, if the gate is closed at `now`.
    pub fn closed(&self, now: Instant) -> Option<(Instant, BrokerError)> {
        let state = lock(&self.state);
        let open_at = state.not_before.filter(|nb| *nb > now)?;
        let err = state
            .last_error
            .clone()
            .unwrap_or_else(|| unavailable("waiting to retry Entra", open_at - now));
        Some((open_at, err))
    }

    pub fn record_success(&self) {
        let mut state = lock(&self.state);
        state.failures = 0;
        state.not_before = None;
        state.last_error = None;
    }

    /// Closes the gate after a transient failure; returns the consecutive failures and the
    /// wait before the next call.
    pub fn record_transient(
        &self,
        now: Instant,
        message: &str,
        retry_after: Option<Duration>,
        policy: &RetryPolicy,
    ) -> (u32, Duration) {
        let mut state = lock(&self.state);
        state.failures = state.failures.saturating_add(1);
        let wait = policy.wait_after(state.failures, retry_after);
        let until = later(now, wait);
        // Never shorten a wait another failure already set (a throttle stays a throttle).
        if state.not_before.is_none_or(|nb| nb < until) {
            state.not_before = Some(until);
            state.last_error = Some(unavailable(message, wait));
        }
        // What callers and the log are told is the wait in force, which may be the longer one.
        let in_force = state
            .not_before
            .map_or(wait, |nb| nb.saturating_duration_since(now));
        (state.failures, in_force)
    }

    /// A slot for one exchange; waits while `max_in_flight` are running.
    pub async fn permit(&self) -> SemaphorePermit<'_> {
        // The semaphore is never closed, so acquire cannot fail.
        loop {
            if let Ok(p) = self.in_flight.acquire().await {
                return p;
            }
        }
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
