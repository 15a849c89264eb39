//! Hostile neighbours in the pod, against the real binary: floods of idle, slow and keep-alive
//! connections on both listeners, and signals. Each flood is bounded (a fixed number of
//! connections to 127.0.0.1, stopped when the test ends) and reconnects whatever the broker
//! closes, as slowloris tools do, so the broker's eviction is under steady pressure.

use crate::support::broker::{Broker, BrokerBuilder, STORAGE};
use crate::support::raw;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// What each flooding connection does after it connects, before it waits to be closed.
#[derive(Clone, Copy)]
enum Attack {
    /// Sends nothing.
    Idle,
    /// Sends most of a request head and never finishes it (slowloris).
    Slow,
    /// Sends one complete request, reads its answer, then idles on the kept-alive connection.
    KeepAlive,
}

/// `count` connections to `addr`, each reconnecting as soon as the broker closes it, until
/// dropped.
struct Flood {
    tasks: JoinSet<()>,
    /// How many flooding connections the broker has closed so far.
    closed: Arc<AtomicUsize>,
    /// How many flooding connections are open (connected and not yet closed).
    open: Arc<AtomicUsize>,
}

impl Flood {
    fn start(addr: SocketAddr, count: usize, attack: Attack) -> Flood {
        // This process holds the flood's sockets (two floods may run at once): the same raise
        // of the soft open-file limit the broker does for itself.
        let files = imds_broker::listener::open_files::ensure(4096).expect("RLIMIT_NOFILE");
        assert!(
            files.shortfall().is_none(),
            "the flood tests need a hard open-file limit of at least {} (ulimit -Hn): {files:?}",
            files.needed
        );
        let closed = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        for _ in 0..count {
            let (closed, open) = (closed.clone(), open.clone());
            tasks.spawn(async move {
                loop {
                    let Ok(mut s) = TcpStream::connect(addr).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    open.fetch_add(1, Ordering::Relaxed);
                    let sent = match attack {
                        Attack::Idle => Ok(()),
                        Attack::Slow => {
                            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: a")
                                .await
                        }
                        Attack::KeepAlive => {
                            s.write_all(
                                b"GET /metadata/identity/oauth2/token?api-version=2018-02-01\
                                  &resource=https%3A%2F%2Fstorage.azure.com%2F HTTP/1.1\r\n\
                                  Host: x\r\nMetadata: true\r\n\r\n",
                            )
                            .await
                        }
                    };
                    // Reads (the answer, if any) until the broker closes the connection.
                    let mut buf = [0u8; 4096];
                    if sent.is_ok() {
                        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                    closed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        Flood {
            tasks,
            closed,
            open,
        }
    }

    /// Waits (bounded) until the broker has closed `n` flooding connections: the flood has
    /// filled the cap and eviction is running, the state the tests measure in.
    async fn until_closed(&self, n: usize) {
        until(&self.closed, n, "flooding connections the broker closed").await;
    }

    /// Waits (bounded) until `n` flooding connections are open at once.
    async fn until_open(&self, n: usize) {
        until(&self.open, n, "flooding connections open at once").await;
    }
}

/// Waits until `counter` reaches `n`, failing the test after 30 s.
async fn until(counter: &AtomicUsize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} after 30 s",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// One request on a new connection (as kubelet and most SDK clients' first request do): the
/// status line and how long the whole answer took.
async fn timed_get(addr: SocketAddr, path: &str, headers: &str) -> (String, Duration) {
    let started = Instant::now();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
    let answer = raw(addr, request.as_bytes()).await;
    (
        answer.lines().next().unwrap_or("").to_owned(),
        started.elapsed(),
    )
}

/// `rounds` requests, one every 100 ms, each on a new connection; fails unless every one is
/// answered 200 within `limit`. Returns the slowest.
async fn all_answered_within(
    addr: SocketAddr,
    path: &str,
    headers: &str,
    rounds: usize,
    limit: Duration,
    during: &str,
) -> Duration {
    let mut slowest = Duration::ZERO;
    for _ in 0..rounds {
        let (status, took) = timed_get(addr, path, headers).await;
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "{path} during {during}: {status}"
        );
        assert!(took < limit, "{path} during {during} took {took:?}");
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    slowest
}

const IMDS_PATH: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com%2F";

/// kubelet's startup and liveness probes (1-s timeout) and Prometheus share the admin port with
/// the pod network: hundreds of idle and slow connections, reconnecting, must not starve them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_probes_answer_within_a_second_while_hundreds_of_connections_are_held() {
    let broker = BrokerBuilder::emulate().spawn().await;
    // A resource string the caller chose must not show up in /metrics.
    let chosen = broker.imds_token("api://caller-chosen-label-7f3a").await;
    assert_eq!(chosen.status, 200, "{}", chosen.raw);
    let idle = Flood::start(broker.admin_addr, 300, Attack::Idle);
    let slow = Flood::start(broker.admin_addr, 300, Attack::Slow);
    idle.until_open(150).await;
    slow.until_open(150).await;
    let slowest = all_answered_within(
        broker.admin_addr,
        "/readyz",
        "",
        20,
        Duration::from_secs(1),
        "600 idle and slow admin connections",
    )
    .await;
    let (status, took) = timed_get(broker.admin_addr, "/metrics", "").await;
    assert!(status.starts_with("HTTP/1.1 200"), "/metrics: {status}");
    assert!(took < Duration::from_secs(1), "/metrics took {took:?}");
    eprintln!("slowest probe {slowest:?}, /metrics {took:?}");
    drop((idle, slow));
    let (_, metrics) = broker.admin("/metrics").await;
    assert!(
        metrics.contains("imds_broker_http_requests_total"),
        "{metrics}"
    );
    assert!(!metrics.contains("caller-chosen-label"), "{metrics}");
}

/// Slowloris and idle keep-alive floods just past the token listener's cap (1024): a caller
/// with a real request still gets its token within 2 s. The broker starts with a soft
/// open-file limit of 256, as some container runtimes give: it raises it for its caps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_request_is_answered_within_two_seconds_during_slow_and_idle_floods() {
    let mut broker = BrokerBuilder::emulate().soft_open_files(256).spawn().await;
    let cap = 1024;
    for (attack, during) in [
        (Attack::Slow, "1,100 slowloris connections"),
        (Attack::KeepAlive, "1,100 idle keep-alive connections"),
    ] {
        let flood = Flood::start(broker.token_addr, 1100, attack);
        // Past the cap, the broker has had to close connections to make room.
        flood.until_closed(1100 - cap).await;
        let slowest = all_answered_within(
            broker.token_addr,
            IMDS_PATH,
            "Metadata: true\r\n",
            10,
            Duration::from_secs(2),
            during,
        )
        .await;
        eprintln!("slowest token request during {during}: {slowest:?}");
    }
    assert_eq!(broker.imds_token(STORAGE).await.status, 200);
    // 1,024 + 256 connections and the overhead, not the 256 it was given.
    broker.expect_log("\"open_files\":1344").await;
    assert!(
        !broker.logs().contains("accept failed"),
        "{}",
        broker.logs()
    );
}

/// Transparent mode's two token listeners share one connection cap (the memory budget is per
/// pod): idle connections holding the cap on one listener are evicted for a caller on the other.
#[tokio::test]
async fn token_listeners_share_one_connection_cap() {
    let broker = BrokerBuilder::emulate()
        .token_listeners(2)
        .set("--max-connections", "8")
        .spawn()
        .await;
    let (first, second) = (broker.token_addrs[0], broker.token_addrs[1]);
    let idle = Flood::start(first, 8, Attack::Idle);
    idle.until_open(8).await;
    let (status, took) = timed_get(second, IMDS_PATH, "Metadata: true\r\n").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // The caller on the second listener got a slot by evicting one of the first's.
    idle.until_closed(1).await;
    eprintln!("a caller on the second listener, the first holding the cap: {took:?}");
}

/// SIGHUP (a terminal closing, a careless `kill -HUP`) is logged and ignored, and a connection
/// still sending its head does not hold shutdown for the grace period.
#[tokio::test]
async fn sighup_is_ignored_and_a_half_sent_head_does_not_delay_shutdown() {
    let mut broker: Broker = BrokerBuilder::emulate()
        .set("--shutdown-grace", "20s")
        .spawn()
        .await;
    broker.signal("HUP");
    broker.expect_log("SIGHUP received and ignored").await;
    assert_eq!(
        broker.imds_token(STORAGE).await.status,
        200,
        "still serving after SIGHUP"
    );
    let mut half = TcpStream::connect(broker.token_addr).await.unwrap();
    half.write_all(b"GET /metadata/identity/oauth2/token HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A later connection, accepted after it, is answered: the half-sent head is one the broker
    // is reading, not one still in the kernel's accept queue.
    let (status, _) = timed_get(broker.token_addr, IMDS_PATH, "Metadata: true\r\n").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let signalled = Instant::now();
    broker.signal("TERM");
    let exit = broker
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits after SIGTERM");
    assert_eq!(exit.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "shutdown took {:?} with a half-sent head open (grace 20 s)",
        signalled.elapsed()
    );
    // Closed by the broker (end of stream), not reset by the listening socket's teardown.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(1), half.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the half-sent head's connection: {closed:?}"
    );
}
