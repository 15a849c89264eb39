//! Entra failures: Retry-After floor and clamp, throttles, permanent errors, the attempt
//! budget and the broker-wide backoff, a missing token file.

use super::*;

#[tokio::test(start_paused = true)]
async fn retry_after_is_a_floor_and_the_caller_is_held_until_it_elapses() {
    let script = Script::new([Step::Transient(Some(secs(20)))]);
    let b = broker(&script);
    let started = Instant::now();
    let t = get(&b, STORAGE, secs(30)).await.unwrap();
    assert_eq!(&*t.access_token, "token-0");
    assert!(started.elapsed() >= secs(20), "{:?}", started.elapsed());
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_throttle_stops_exchanges_for_every_resource() {
    let script = Script::new([Step::Transient(Some(secs(20)))]);
    let b = broker(&script);
    let first = spawn_get(&b, STORAGE, secs(60));
    sleep(secs(1)).await;
    assert_eq!(script.calls(), 1);
    let other = spawn_get(&b, ARM, secs(60));
    sleep(secs(18)).await;
    assert_eq!(
        script.calls(),
        1,
        "no call for another resource while throttled"
    );
    assert!(first.await.unwrap().is_ok());
    assert!(other.await.unwrap().is_ok());
    assert_eq!(script.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_deadline_holds_the_caller_then_answers_a_wait_clients_honour() {
    let script = Script::new([Step::Transient(Some(secs(120)))]);
    let b = broker(&script);
    let started = Instant::now();
    let err = get(&b, STORAGE, secs(30)).await.unwrap_err();
    assert_eq!(started.elapsed(), secs(30), "held until the deadline");
    let wait = err.retry_after().unwrap();
    assert!(
        wait <= CLIENT_RETRY_AFTER_MAX && wait > Duration::ZERO,
        "{wait:?}"
    );
    assert_eq!(script.calls(), 1);
    // A client that retries after each Retry-After, as Go's App Service client does (3
    // retries), gets the token once the throttle ends: every request is held.
    sleep(wait).await;
    let mut requests = 1;
    let t = loop {
        requests += 1;
        match get(&b, STORAGE, secs(30)).await {
            Ok(t) => break t,
            Err(e) => sleep(e.retry_after().unwrap()).await,
        }
    };
    assert_eq!(&*t.access_token, "token-0");
    assert!(requests <= 4, "{requests} requests");
    assert!(started.elapsed() >= secs(120));
    assert_eq!(
        script.calls(),
        2,
        "Entra asked once more, after the throttle"
    );
}

#[tokio::test(start_paused = true)]
async fn a_caller_behind_one_waiting_out_a_throttle_is_told_of_the_throttle() {
    let script = Script::new([Step::Transient(Some(secs(120)))]);
    let b = broker(&script);
    // The first caller holds the resource's exchange while it waits at the gate.
    let first = spawn_get(&b, STORAGE, secs(60));
    sleep(secs(1)).await;
    let err = get(&b, STORAGE, secs(5)).await.unwrap_err();
    assert!(
        !err.to_string().contains("still running"),
        "the cause is the throttle: {err}"
    );
    let wait = err.retry_after().unwrap();
    assert!(
        wait > secs(1) && wait <= CLIENT_RETRY_AFTER_MAX,
        "a wait clients honour: {wait:?}"
    );
    assert!(
        first.await.unwrap().is_err(),
        "held to its deadline, then refused"
    );
    assert_eq!(script.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_is_clamped() {
    let script = Script::new([Step::Transient(Some(Duration::MAX))]);
    let b = broker(&script);
    let err = get(&b, STORAGE, secs(1)).await.unwrap_err();
    assert!(err.retry_after().unwrap() <= CLIENT_RETRY_AFTER_MAX);
    sleep(RetryPolicy::default().max_retry_after).await;
    assert!(
        get(&b, STORAGE, secs(1)).await.is_ok(),
        "asked again after the clamp"
    );
}

#[tokio::test(start_paused = true)]
async fn a_permanent_refusal_is_answered_from_memory_for_the_error_backoff() {
    let script = Script::new([Step::Permanent, Step::Permanent]);
    let b = broker(&script);
    let err = get(&b, STORAGE, secs(30)).await.unwrap_err();
    assert!(matches!(err, BrokerError::EntraRefused { .. }), "{err}");
    assert_eq!(script.calls(), 1, "not retried");
    sleep(secs(29)).await;
    let again = get(&b, STORAGE, secs(30)).await.unwrap_err();
    assert!(again.to_string().contains("AADSTS70021"));
    assert!(
        again.retry_after().is_none(),
        "clients must not retry a refusal"
    );
    assert_eq!(script.calls(), 1, "answered from memory");
    sleep(secs(2)).await;
    get(&b, STORAGE, secs(30)).await.unwrap_err();
    assert_eq!(script.calls(), 2, "asked again after the backoff");
    assert!(get(&b, STORAGE, secs(30)).await.is_err());
    sleep(secs(31)).await;
    assert!(get(&b, STORAGE, secs(30)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn one_caller_makes_at_most_the_attempt_budget_and_the_backoff_outlives_it() {
    let script = Script::new([]).then(Step::Transient(None));
    let b = broker(&script);
    let started = Instant::now();
    let err = get(&b, STORAGE, secs(120)).await.unwrap_err();
    assert!(matches!(err, BrokerError::EntraUnavailable { .. }));
    assert_eq!(script.calls(), 4, "max_attempts");
    // Backoffs 0.25-0.5, 0.5-1, 1-2 s between the four attempts: answered well before the deadline.
    assert!(started.elapsed() < secs(4), "{:?}", started.elapsed());
    // A new caller right away does not get a fresh burst: the gate is still closed.
    let err = get(&b, ARM, Duration::from_millis(1)).await.unwrap_err();
    assert!(err.retry_after().unwrap() > Duration::ZERO);
    assert_eq!(script.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn during_an_outage_entra_calls_follow_the_backoff_not_the_callers() {
    let script = Script::new([]).then(Step::Transient(None));
    let b = broker(&script);
    // 50 callers, each retrying as soon as it is answered, for 60 s.
    let end = Instant::now() + secs(60);
    let callers: Vec<_> = (0..50)
        .map(|i| {
            let b = b.clone();
            let resource = if i % 2 == 0 { STORAGE } else { ARM };
            tokio::spawn(async move {
                while Instant::now() < end {
                    let _ = get(&b, resource, secs(5)).await;
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }
    // 0.5, 1, 2, 4, 8, 8, ... s (jitter halves at most): at most ~16 calls in 60 s.
    assert!(script.calls() <= 16, "{} calls", script.calls());
    script.then(Step::Token(HOUR));
    sleep(secs(10)).await;
    assert!(
        get(&b, STORAGE, secs(10)).await.is_ok(),
        "recovers once Entra is back"
    );
}

#[tokio::test(start_paused = true)]
async fn a_missing_token_file_is_not_ready_and_the_next_caller_waits_out_a_short_backoff() {
    let script = Script::new([Step::Missing]);
    let b = broker(&script);
    let err = get(&b, STORAGE, secs(5)).await.unwrap_err();
    assert!(matches!(err, BrokerError::NotReady(_)), "{err}");
    let started = Instant::now();
    assert!(
        get(&b, STORAGE, secs(5)).await.is_ok(),
        "held, then retried"
    );
    assert!(
        started.elapsed() <= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_malformed_token_file_is_read_again_when_the_backoff_ends() {
    let script = Script::new([Step::Malformed, Step::Malformed]);
    let b = broker(&script);
    let err = get(&b, STORAGE, secs(5)).await.unwrap_err();
    assert!(matches!(err, BrokerError::BadAssertion(_)), "{err}");
    // Within the backoff the next caller is held, then the file is read again (still bad).
    let started = Instant::now();
    let err = get(&b, ARM, secs(5)).await.unwrap_err();
    assert!(matches!(err, BrokerError::BadAssertion(_)), "{err}");
    assert!(
        started.elapsed() <= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(script.calls(), 2, "one read per backoff step");
    // Fixed: the caller after the next backoff gets a token.
    let t = get(&b, ARM, secs(5)).await.unwrap();
    assert_eq!(&*t.access_token, "token-0");
}
