//! `Retry-After` as Entra (or a proxy in front of it) sends it: delta-seconds or an HTTP date,
//! and the wait the broker derives from it.
//!
//! Beyond "no panic": a value is accepted only in one of the two forms RFC 9110 allows
//! (`1*DIGIT`, an HTTP date), delta-seconds are taken exactly, and whatever the value, the
//! wait the broker's gate sets stays under its cap.
#![no_main]

use imds_broker::broker::gate::{Gate, GateLimits};
use imds_broker::broker::RetryPolicy;
use imds_broker::exchange::entra::parse_retry_after;
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let before = SystemTime::now();
    let parsed = parse_retry_after(value);
    let t = value.trim();
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let digits = all_digits(t);
    match parsed {
        Some(wait) if digits => {
            assert_eq!(Some(wait.as_secs()), t.parse().ok(), "{value:?}");
            assert_eq!(wait.subsec_nanos(), 0);
        }
        Some(wait) => {
            let when = httpdate::parse_http_date(t)
                .unwrap_or_else(|_| panic!("accepted {value:?}: neither 1*DIGIT nor an HTTP date"));
            // The wait is the time to that date from some moment of the call.
            let most = when.duration_since(before).unwrap_or_default();
            assert!(
                wait <= most,
                "{value:?}: waits {wait:?}, the date is {most:?} away"
            );
        }
        None => {
            assert!(
                !(digits && t.parse::<u64>().is_ok()),
                "refused delta-seconds {value:?}"
            );
            assert!(
                httpdate::parse_http_date(t).is_err(),
                "refused the date {value:?}"
            );
        }
    }
    // What the broker's gate makes of it after one, two and many transient failures.
    let policy = RetryPolicy::default();
    let cap = policy.max_retry_after.max(policy.max_backoff);
    let gate = Gate::new(GateLimits::default());
    for _ in 0..3 {
        let (_, wait) = gate.record_transient(Instant::now(), "fuzz", parsed, &policy);
        assert!(wait <= cap, "{value:?} makes the broker wait {wait:?}");
    }
    assert!(cap <= Duration::from_secs(300));
});
