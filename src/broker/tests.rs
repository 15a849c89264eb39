//! The core's rules on paused Tokio time, against a scripted exchanger: each test runs in
//! milliseconds of real time whatever the virtual durations.

use super::*;
use crate::assertion::AssertionError;
use crate::clock::now_unix;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::time::{advance, sleep};

/// One scripted exchange result.
#[derive(Clone)]
enum Step {
    Token(Duration),
    Transient(Option<Duration>),
    Permanent,
    Missing,
}

const HOUR: Duration = Duration::from_secs(3600);

/// Replays `steps`, then `then` forever; counts calls and the most exchanges at once.
struct Script {
    steps: Mutex<VecDeque<Step>>,
    then: Mutex<Step>,
    delay: Duration,
    calls: AtomicUsize,
    running: AtomicUsize,
    most_running: AtomicUsize,
    resources: Mutex<Vec<String>>,
    serial: AtomicUsize,
}

impl Script {
    fn new(steps: impl IntoIterator<Item = Step>) -> Arc<Self> {
        Self::slow(steps, Duration::ZERO)
    }

    fn slow(steps: impl IntoIterator<Item = Step>, delay: Duration) -> Arc<Self> {
        Arc::new(Script {
            steps: Mutex::new(steps.into_iter().collect()),
            then: Mutex::new(Step::Token(HOUR)),
            delay,
            calls: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            most_running: AtomicUsize::new(0),
            resources: Mutex::new(Vec::new()),
            serial: AtomicUsize::new(0),
        })
    }

    fn then(self: &Arc<Self>, step: Step) -> Arc<Self> {
        *lock(&self.then) = step;
        self.clone()
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Exchanger for Script {
    async fn exchange(&self, _client_id: &str, resource: &str) -> Result<Token, ExchangeError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        lock(&self.resources).push(resource.to_owned());
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(running, Ordering::SeqCst);
        sleep(self.delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        let step = lock(&self.steps)
            .pop_front()
            .unwrap_or_else(|| lock(&self.then).clone());
        match step {
            Step::Token(lifetime) => {
                let n = self.serial.fetch_add(1, Ordering::SeqCst);
                Ok(Token {
                    access_token: format!("token-{n}").into(),
                    expires_on: now_unix() + lifetime.as_secs(),
                    not_before: now_unix(),
                })
            }
            Step::Transient(retry_after) => Err(ExchangeError::Transient {
                message: "HTTP 503".into(),
                retry_after,
            }),
            Step::Permanent => Err(ExchangeError::Permanent {
                error: "unauthorized_client".into(),
                code: "AADSTS70021".into(),
                description: "No matching federated identity record found".into(),
                hint: "fix the federated credential".into(),
            }),
            Step::Missing => Err(ExchangeError::Assertion(AssertionError::Missing {
                path: "/var/run/token".into(),
                audience: "api://AzureADTokenExchange".into(),
            })),
        }
    }

    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

const STORAGE: &str = "https://storage.azure.com/";
const ARM: &str = "https://management.azure.com/";

fn config() -> BrokerConfig {
    BrokerConfig {
        identity: Identity {
            client_id: "client".into(),
            object_id: None,
            resource_id: None,
        },
        allow_resources: None,
        retry: RetryPolicy::default(),
        gate: GateLimits::default(),
    }
}

fn broker(script: &Arc<Script>) -> Arc<Broker> {
    broker_with(script, config())
}

fn broker_with(script: &Arc<Script>, config: BrokerConfig) -> Arc<Broker> {
    Arc::new(Broker::new(
        config,
        script.clone(),
        Arc::new(Metrics::new()),
    ))
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

async fn get(b: &Arc<Broker>, resource: &str, hold: Duration) -> Result<Arc<Token>, BrokerError> {
    b.token(&Selector::Default, resource, Instant::now() + hold)
        .await
}

fn cached(b: &Broker, resource: &str) -> Option<Arc<Token>> {
    b.cached_token(&Selector::Default, resource).unwrap()
}

/// Lets spawned tasks (the refresher) run to their next wait.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_cold_callers_share_one_exchange() {
    let script = Script::slow([], Duration::from_millis(100));
    let b = broker(&script);
    let callers: Vec<_> = (0..200)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { get(&b, STORAGE, secs(30)).await })
        })
        .collect();
    for c in callers {
        assert_eq!(&*c.await.unwrap().unwrap().access_token, "token-0");
    }
    assert_eq!(script.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn spellings_of_one_resource_share_an_entry_and_callers_keep_theirs() {
    let script = Script::new([]);
    let b = broker(&script);
    get(&b, "https://storage.azure.com", secs(5)).await.unwrap();
    for spelling in ["https://storage.azure.com/", "HTTPS://Storage.Azure.com//"] {
        assert!(cached(&b, spelling).is_some(), "{spelling}");
    }
    assert_eq!(script.calls(), 1);
    assert_eq!(b.cached_resources(), 1);
    // Exchanged as the first caller spelled it.
    assert_eq!(lock(&script.resources)[0], "https://storage.azure.com");
}

#[tokio::test(start_paused = true)]
async fn allow_listed_spelling_is_exchanged() {
    let script = Script::new([]);
    let mut cfg = config();
    cfg.allow_resources = Some(vec![STORAGE.into()]);
    let b = broker_with(&script, cfg);
    get(&b, "https://storage.azure.com", secs(5)).await.unwrap();
    assert_eq!(lock(&script.resources)[0], STORAGE);
    assert!(matches!(
        get(&b, ARM, secs(5)).await,
        Err(BrokerError::ResourceRefused { .. })
    ));
    assert_eq!(script.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_used_token_is_refreshed_at_half_life_in_the_background() {
    let script = Script::new([Step::Token(secs(100))]).then(Step::Token(secs(100)));
    let b = broker(&script);
    let first = get(&b, STORAGE, secs(5)).await.unwrap();
    sleep(secs(10)).await;
    assert!(Arc::ptr_eq(&cached(&b, STORAGE).unwrap(), &first), "used");
    sleep(secs(39)).await;
    assert_eq!(script.calls(), 1, "not before half-life");
    sleep(secs(2)).await;
    settle().await;
    assert_eq!(script.calls(), 2, "refreshed at half-life");
    let second = cached(&b, STORAGE).unwrap();
    assert_eq!(&*second.access_token, "token-1");
}

#[tokio::test(start_paused = true)]
async fn a_token_asked_for_once_is_not_refreshed_and_is_dropped_at_expiry() {
    let script = Script::new([Step::Token(secs(100))]);
    let b = broker(&script);
    get(&b, STORAGE, secs(5)).await.unwrap();
    sleep(secs(300)).await;
    settle().await;
    assert_eq!(script.calls(), 1, "no refresh without a use");
    assert_eq!(b.cached_resources(), 0, "dropped at expiry");
}

#[tokio::test(start_paused = true)]
async fn a_parked_entry_used_again_is_refreshed_before_it_is_served() {
    let script = Script::new([Step::Token(secs(100))]).then(Step::Token(secs(100)));
    let b = broker(&script);
    get(&b, STORAGE, secs(5)).await.unwrap();
    sleep(secs(60)).await;
    assert!(
        cached(&b, STORAGE).is_none(),
        "a half-spent token is not handed out"
    );
    let t = get(&b, STORAGE, secs(5)).await.unwrap();
    assert_eq!(&*t.access_token, "token-1");
    settle().await;
    assert_eq!(
        script.calls(),
        2,
        "one refresh, by the caller or the woken refresher"
    );
}

#[tokio::test(start_paused = true)]
async fn stale_token_is_served_while_entra_fails_but_not_past_expiry_minus_skew() {
    let script = Script::new([Step::Token(secs(100))]).then(Step::Transient(None));
    let b = broker(&script);
    let t = get(&b, STORAGE, secs(5)).await.unwrap();
    for at in [30, 55, 70, 89] {
        sleep_until_secs(at).await;
        let served = cached(&b, STORAGE).expect("stale token served");
        assert!(Arc::ptr_eq(&served, &t), "at {at}s");
    }
    assert!(script.calls() > 1, "the refresh was tried");
    sleep_until_secs(91).await;
    assert!(
        cached(&b, STORAGE).is_none(),
        "not within the skew of expiry"
    );
    let err = get(&b, STORAGE, secs(1)).await.unwrap_err();
    assert!(matches!(err, BrokerError::EntraUnavailable { .. }), "{err}");
}

/// Sleeps until `at` seconds after the test's start (paused time starts at the same instant).
async fn sleep_until_secs(at: u64) {
    thread_local!(static START: Instant = Instant::now());
    let start = START.with(|s| *s);
    tokio::time::sleep_until(start + secs(at)).await;
}

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
    let first = {
        let b = b.clone();
        tokio::spawn(async move { get(&b, STORAGE, secs(60)).await })
    };
    sleep(secs(1)).await;
    assert_eq!(script.calls(), 1);
    let other = {
        let b = b.clone();
        tokio::spawn(async move { get(&b, ARM, secs(60)).await })
    };
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
async fn a_missing_token_file_is_not_ready_and_costs_no_backoff() {
    let script = Script::new([Step::Missing]);
    let b = broker(&script);
    let err = get(&b, STORAGE, secs(5)).await.unwrap_err();
    assert!(matches!(err, BrokerError::NotReady(_)), "{err}");
    assert!(get(&b, STORAGE, secs(5)).await.is_ok(), "retried at once");
}

#[tokio::test(start_paused = true)]
async fn the_entry_cap_counts_entries_being_fetched() {
    let script = Script::slow([], secs(1));
    let mut cfg = config();
    cfg.gate.new_burst = 1000;
    cfg.gate.max_in_flight = 1000;
    let b = broker_with(&script, cfg);
    let callers: Vec<_> = (0..100)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move { get(&b, &format!("https://r{i}.example/"), secs(30)).await })
        })
        .collect();
    let mut refused = 0;
    for c in callers {
        match c.await.unwrap() {
            Ok(_) => {}
            Err(BrokerError::TooManyResources(n)) => {
                assert_eq!(n, MAX_ENTRIES);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, 100 - MAX_ENTRIES);
    assert_eq!(script.calls(), MAX_ENTRIES);
}

#[tokio::test(start_paused = true)]
async fn failed_entries_make_room_for_new_ones() {
    let script = Script::new([]).then(Step::Permanent);
    let mut cfg = config();
    cfg.gate.new_burst = 1000;
    let b = broker_with(&script, cfg);
    for i in 0..MAX_ENTRIES {
        get(&b, &format!("https://r{i}.example/"), secs(1))
            .await
            .unwrap_err();
    }
    script.then(Step::Token(HOUR));
    assert!(
        get(&b, STORAGE, secs(1)).await.is_ok(),
        "a refused entry was evicted"
    );
}

#[tokio::test(start_paused = true)]
async fn new_resources_are_admitted_at_a_bounded_rate() {
    let script = Script::new([]);
    let b = broker(&script);
    let limits = GateLimits::default();
    let mut throttled = None;
    for i in 0..=limits.new_burst {
        match get(&b, &format!("https://r{i}.example/"), secs(1)).await {
            Ok(_) => {}
            Err(e @ BrokerError::NewResourcesThrottled { .. }) => {
                throttled = Some((i, e));
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let (i, e) = throttled.expect("throttled after the burst");
    assert_eq!(i, limits.new_burst);
    assert!(e.retry_after().unwrap() <= secs(1));
    assert_eq!(script.calls(), limits.new_burst as usize);
    advance(secs(1)).await;
    assert!(get(&b, "https://late.example/", secs(1)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn exchanges_in_flight_are_bounded() {
    let script = Script::slow([], secs(1));
    let b = broker(&script);
    let callers: Vec<_> = (0..12)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move { get(&b, &format!("https://r{i}.example/"), secs(30)).await })
        })
        .collect();
    for c in callers {
        c.await.unwrap().unwrap();
    }
    assert_eq!(
        script.most_running.load(Ordering::SeqCst),
        GateLimits::default().max_in_flight
    );
}

#[tokio::test(start_paused = true)]
async fn gauges_use_bounded_labels_and_go_with_their_entries() {
    let script = Script::new([Step::Token(secs(100)), Step::Token(secs(100))]);
    let b = broker(&script);
    get(&b, STORAGE, secs(1)).await.unwrap();
    get(&b, "https://weird.example/\u{7f}x", secs(1))
        .await
        .unwrap_err();
    get(&b, "https://weird.example/x", secs(1)).await.unwrap();
    b.update_gauges();
    let text = b.metrics.render();
    assert!(
        text.contains("resource=\"https://storage.azure.com/\""),
        "{text}"
    );
    assert!(text.contains("resource=\"other\""), "{text}");
    assert!(!text.contains("weird"), "{text}");
    sleep(secs(300)).await;
    settle().await;
    b.update_gauges();
    assert!(
        !b.metrics.render().contains("token_expiry_seconds{"),
        "series dropped with the entries"
    );
}
