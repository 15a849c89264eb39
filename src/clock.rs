//! Wall-clock helpers. Tokens carry Unix times (what the wire formats need); the broker's own
//! rules run on Tokio's clock, which tests can pause, so expiries are also kept as `Instant`s.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Seconds since the Unix epoch (0 if the system clock is before it).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Time left until the Unix time `at` (seconds), with sub-second precision; zero if past.
pub fn until_unix(at: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(at).saturating_sub(now)
}

/// `now + d`, saturating at a far-away instant instead of panicking on overflow (a hostile
/// `Retry-After: 18446744073709551615` must not bring the process down).
pub fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_saturates() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn until_unix_is_zero_in_the_past() {
        assert_eq!(until_unix(0), Duration::ZERO);
        let d = until_unix(now_unix() + 100);
        assert!(
            d > Duration::from_secs(98) && d <= Duration::from_secs(100),
            "{d:?}"
        );
    }
}
