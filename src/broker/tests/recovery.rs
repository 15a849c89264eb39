//! Faults while a token is cached or Entra recovers: the refresher backs off on an unusable
//! token file, a usable token is served to every caller while Entra fails, a success does not
//! cancel a `Retry-After`, and a reopened gate sends one probe before it restores concurrency.

use super::*;

/// A 40-s token: refresh at 20 s, usable until 36 s (skew: a tenth of the lifetime).
const LIFE: Duration = Duration::from_secs(40);

/// The token of the first exchange, asked for again so that the refresher acts at 20 s.
async fn warm(b: &Arc<Broker>) {
    assert_eq!(
        &*get(b, STORAGE, secs(5)).await.unwrap().access_token,
        "token-0"
    );
    sleep(secs(5)).await;
    assert!(cached(b, STORAGE).is_some());
}

#[tokio::test(start_paused = true)]
async fn the_refresher_backs_off_when_the_token_file_is_unusable() {
    for bad in [Step::Missing, Step::Malformed] {
        let script = Script::new([Step::Token(LIFE)]).then(bad);
        let b = broker(&script);
        warm(&b).await;
        sleep(secs(25)).await; // t = 30 s: 10 s of failing refreshes.
                               // 0.25-0.5, 0.5-1, 1-2, 2-4, 4-8 s: at most 6 attempts in 10 s, at least 4.
        let calls = script.calls() - 1;
        assert!((4..=6).contains(&calls), "{calls} refresh attempts in 10 s");
        // The cached token is still served, to every caller, at once.
        for _ in 0..3 {
            let started = Instant::now();
            let t = get(&b, STORAGE, secs(3)).await.unwrap();
            assert_eq!(&*t.access_token, "token-0");
            assert_eq!(started.elapsed(), Duration::ZERO);
        }
        sleep(secs(10)).await; // t = 40 s: expired; the refresher has stopped.
        let calls = script.calls();
        sleep(secs(60)).await;
        assert_eq!(script.calls(), calls, "nothing runs without callers");
    }
}

#[tokio::test(start_paused = true)]
async fn a_usable_token_is_served_to_every_caller_while_entra_fails() {
    for failure in [Step::Transient(None), Step::Permanent] {
        let script = Script::new([Step::Token(LIFE)]).then(failure);
        let b = broker(&script);
        let start = Instant::now();
        // Asked for once: the refresher parks at 20 s until a use wakes it.
        get(&b, STORAGE, secs(5)).await.unwrap();
        tokio::time::sleep_until(start + secs(24)).await;
        for i in 0..3 {
            let t = get(&b, STORAGE, secs(3)).await;
            assert_eq!(&*t.unwrap().access_token, "token-0", "caller {i}");
        }
        // Concurrent callers too, while the refresher retries.
        let callers: Vec<_> = (0..5).map(|_| spawn_get(&b, STORAGE, secs(3))).collect();
        for c in callers {
            assert_eq!(&*c.await.unwrap().unwrap().access_token, "token-0");
        }
        tokio::time::sleep_until(start + secs(35)).await;
        assert!(get(&b, STORAGE, secs(1)).await.is_ok(), "until it expires");
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_refresh_holds_warm_callers_only_briefly() {
    let script = Script::slow([Step::Token(LIFE)], secs(10)).then(Step::Token(LIFE));
    let b = broker(&script);
    let start = Instant::now();
    get(&b, STORAGE, secs(30)).await.unwrap(); // t = 10 s; refresh point 30 s.
    tokio::time::sleep_until(start + secs(31)).await;
    let started = Instant::now();
    let t = get(&b, STORAGE, secs(30)).await.unwrap();
    assert_eq!(
        &*t.access_token, "token-0",
        "the old token, not a 10-s wait"
    );
    assert_eq!(started.elapsed(), REFRESH_WAIT);
}

#[tokio::test(start_paused = true)]
async fn a_success_in_flight_does_not_cancel_a_retry_after() {
    // Storage's exchange leaves first and is throttled; ARM's, in flight meanwhile, succeeds.
    let script = Script::slow(
        [Step::Transient(Some(secs(300))), Step::Token(HOUR)],
        secs(2),
    );
    let b = broker(&script);
    let start = Instant::now();
    let throttled = spawn_get(&b, STORAGE, secs(5));
    sleep(secs(1)).await;
    let ok = spawn_get(&b, ARM, secs(5));
    assert!(ok.await.unwrap().is_ok());
    assert_eq!(script.calls(), 2);
    // A third resource at t = 3 s: Entra said 300 s.
    let err = get(&b, "https://vault.azure.net", secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::EntraUnavailable { .. }), "{err}");
    assert_eq!(script.calls(), 2, "no call inside Entra's Retry-After");
    assert!(throttled.await.unwrap().is_err());
    tokio::time::sleep_until(start + secs(303)).await;
    assert!(get(&b, "https://vault.azure.net", secs(5)).await.is_ok());
    assert_eq!(script.calls(), 3);
}

/// Four resources held by a throttle: when it ends, one exchange probes Entra.
type Callers = Vec<tokio::task::JoinHandle<Result<Arc<Token>, BrokerError>>>;

async fn throttled_then_four_waiting(
    script: &Arc<Script>,
    start: Instant,
) -> (Arc<Broker>, Callers) {
    let b = broker(script);
    let resources = [
        STORAGE,
        ARM,
        "https://vault.azure.net",
        "https://graph.microsoft.com",
    ];
    let first = spawn_get(&b, resources[0], secs(60));
    sleep(secs(2)).await; // the 429 arrived at 1 s: closed until 21 s.
    let mut callers = vec![first];
    callers.extend(resources[1..].iter().map(|r| spawn_get(&b, r, secs(60))));
    tokio::time::sleep_until(start + secs(21)).await;
    settle().await;
    (b, callers)
}

#[tokio::test(start_paused = true)]
async fn a_reopened_gate_sends_one_probe_then_restores_concurrency() {
    let script = Script::slow([Step::Transient(Some(secs(20)))], secs(1));
    let (_b, callers) = throttled_then_four_waiting(&script, Instant::now()).await;
    sleep(Duration::from_millis(500)).await;
    assert_eq!(script.calls(), 2, "one probe at 21 s");
    assert_eq!(script.running.load(Ordering::SeqCst), 1);
    sleep(secs(1)).await; // The probe succeeded at 22 s: the other three leave together.
    assert_eq!(script.calls(), 5);
    assert_eq!(script.running.load(Ordering::SeqCst), 3);
    for c in callers {
        assert!(c.await.unwrap().is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_keeps_the_others_waiting() {
    let script = Script::slow(
        [
            Step::Transient(Some(secs(20))),
            Step::Transient(Some(secs(20))),
        ],
        secs(1),
    );
    let start = Instant::now();
    let (_b, callers) = throttled_then_four_waiting(&script, start).await;
    tokio::time::sleep_until(start + secs(40)).await;
    assert_eq!(
        script.calls(),
        2,
        "the probe failed at 22 s: closed until 42 s"
    );
    tokio::time::sleep_until(start + secs(42)).await;
    settle().await;
    sleep(Duration::from_millis(500)).await;
    assert_eq!(script.calls(), 3, "one probe again");
    for c in callers {
        assert!(c.await.unwrap().is_ok());
    }
    assert_eq!(script.calls(), 6);
}
