//! How long to wait before Entra is asked again: capped exponential backoff with jitter, and
//! the bounds on what Entra (`Retry-After`) and the broker (to its clients) may ask for.

use std::time::Duration;

/// The longest `Retry-After` handed to a client. Every SDK honours a wait up to its own cap
/// and fails at once past it; the smallest cap measured is 25 s (Go azidentity v1.13.1 over
/// IMDS, docs/client-compatibility.md). A shorter wait only costs the client one more request,
/// which the broker holds anyway.
pub const CLIENT_RETRY_AFTER_MAX: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Entra calls one caller's request may cause before it is answered with the error.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Wait after a permanent failure before Entra is asked again for that resource.
    pub error_backoff: Duration,
    /// Cap on Entra's own `Retry-After`: a hostile or broken answer must not block the broker
    /// until restart.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            error_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The backoff after the `failures`-th consecutive failure: capped exponential backoff
    /// with "equal jitter" (half fixed, half random, so many pods spread out but never
    /// collapse to zero).
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let half = exp.min(self.max_backoff) / 2;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_equal_jitter() {
        let p = RetryPolicy::default();
        for (failures, full) in [(1, 500), (2, 1000), (3, 2000), (5, 8000), (40, 8000)] {
            let w = p.backoff(failures);
            let full = Duration::from_millis(full);
            assert!(w >= full / 2 && w <= full, "{failures}: {w:?}");
        }
    }
}
