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
    /// A token file of the wrong shape (configuration, not timing).
    Malformed,
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
            Step::Malformed => Err(ExchangeError::Assertion(AssertionError::Malformed {
                path: "/var/run/token".into(),
                reason: "not a JWT".into(),
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

/// [`get`] on a task of its own: a caller that runs while the test goes on.
fn spawn_get(
    b: &Arc<Broker>,
    resource: &str,
    hold: Duration,
) -> tokio::task::JoinHandle<Result<Arc<Token>, BrokerError>> {
    let (b, resource) = (b.clone(), resource.to_owned());
    tokio::spawn(async move { get(&b, &resource, hold).await })
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

/// Sleeps until `at` seconds after the test's start (paused time starts at the same instant).
async fn sleep_until_secs(at: u64) {
    thread_local!(static START: Instant = Instant::now());
    let start = START.with(|s| *s);
    tokio::time::sleep_until(start + secs(at)).await;
}

mod cache;
mod failures;
mod limits;
mod recovery;
