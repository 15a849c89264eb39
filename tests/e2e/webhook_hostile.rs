//! The webhook's admission port under hostile clients, against the real binary: request
//! bodies declared and never sent, bodies stalled after filling the review budget, heads
//! without bodies holding every connection slot, a body trickling in. Each attack is a fixed
//! number of TLS connections to 127.0.0.1 that reconnect whatever the webhook closes (stopped
//! when the test ends), while the API server's reviews must keep being answered within 1 s
//! (its own limit is the webhook configuration's `timeoutSeconds`, 5 s in the chart).

use crate::support::webhook::{fixture_review, RawTls, Webhook};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::pki::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

/// The largest AdmissionReview the webhook accepts (`MAX_BODY_BYTES`).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// What each attacking connection sends after its TLS handshake.
#[derive(Clone, Copy)]
enum Attack {
    /// A `POST /mutate` head declaring `declared` body bytes, then `sent` of them, then nothing.
    Stalled { declared: usize, sent: usize },
    /// A head declaring 1 MiB, then one body byte every 100 ms.
    Trickle,
}

/// `count` attacking connections, each reconnecting as soon as the webhook closes it, until
/// dropped.
struct Attackers {
    tasks: JoinSet<()>,
    /// Connections that have sent what their attack sends.
    sent: Arc<AtomicUsize>,
    /// The answers' status lines, with how long after its head each came.
    answers: Arc<std::sync::Mutex<Vec<(String, Duration)>>>,
}

impl Attackers {
    fn start(addr: SocketAddr, tls: &RawTls, count: usize, attack: Attack) -> Attackers {
        let sent = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        for _ in 0..count {
            let (tls, sent, answers) = (tls.clone(), sent.clone(), answers.clone());
            tasks.spawn(async move {
                loop {
                    let Ok(stream) = tls.connect(addr).await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let (mut rd, mut wr) = tokio::io::split(stream);
                    let declared = match attack {
                        Attack::Stalled { declared, .. } => declared,
                        Attack::Trickle => 1024 * 1024,
                    };
                    let head = format!(
                        "POST /mutate HTTP/1.1\r\nHost: localhost\r\n\
                         Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
                    );
                    let started = Instant::now();
                    if wr.write_all(head.as_bytes()).await.is_err() {
                        continue;
                    }
                    let writer = async {
                        match attack {
                            Attack::Stalled { sent: n, .. } => {
                                // Whitespace: valid JSON padding, if it ever were parsed.
                                let body = vec![b' '; n];
                                if wr.write_all(&body).await.is_ok() && wr.flush().await.is_ok() {
                                    sent.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Attack::Trickle => {
                                sent.fetch_add(1, Ordering::Relaxed);
                                for _ in 0..declared {
                                    if wr.write_all(b" ").await.is_err() {
                                        break;
                                    }
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        }
                        std::future::pending::<()>().await;
                    };
                    // Whatever the webhook answers, until it closes the connection.
                    let mut answer = Vec::new();
                    tokio::select! {
                        _ = rd.read_to_end(&mut answer) => {}
                        () = writer => {}
                    }
                    let status = String::from_utf8_lossy(&answer)
                        .lines()
                        .next()
                        .unwrap_or("(closed without an answer)")
                        .to_owned();
                    answers.lock().unwrap().push((status, started.elapsed()));
                }
            });
        }
        Attackers {
            tasks,
            sent,
            answers,
        }
    }

    /// Waits (bounded) until `n` connections have sent their part: the attack is in place.
    async fn until_sent(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sent.load(Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} attacking connections sent theirs in 30 s",
                self.sent.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn answers(&self) -> Vec<(String, Duration)> {
        self.answers.lock().unwrap().clone()
    }
}

impl Drop for Attackers {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// `rounds` reviews of a Velero pod, one every 100 ms, each on a new connection (a TLS
/// handshake each, as the API server's first call does): each must be mutated within `limit`.
/// Returns the slowest.
async fn reviews_answered_within(
    webhook: &Webhook,
    pki: &TestPki,
    rounds: usize,
    limit: Duration,
    during: &str,
) -> Duration {
    imds_broker::crypto::install_default();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap()])
        .pool_max_idle_per_host(0)
        .no_proxy()
        // Past the limit, to measure how late an answer comes rather than only that it is.
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let review = fixture_review();
    let mut slowest = Duration::ZERO;
    for round in 0..rounds {
        let started = Instant::now();
        let resp = http.post(webhook.url()).json(&review).send().await;
        let took = started.elapsed();
        let resp = resp.unwrap_or_else(|e| panic!("review {round} during {during}: {e}"));
        assert_eq!(resp.status(), 200, "review {round} during {during}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["response"]["patchType"], "JSONPatch", "{body}");
        assert!(took < limit, "review {round} during {during} took {took:?}");
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    slowest
}

async fn webhook(pki: &TestPki, extra: &[&str]) -> Webhook {
    let mut args = vec![
        "--kube-api-url",
        "none",
        "--client-id",
        "11111111-2222-3333-4444-555555555555",
        "--tenant-id",
        "66666666-7777-8888-9999-000000000000",
    ];
    args.extend_from_slice(extra);
    Webhook::start(pki, &args).await
}

/// Starts a webhook with `flags` and `count` connections running `attack`; once `in_place`
/// of them have sent theirs, 10 reviews must each be answered within `limit` (the slowest is
/// printed). Returns both for the test's own checks.
async fn reviews_during(
    pki: &TestPki,
    flags: &[&str],
    (count, in_place, limit): (usize, usize, Duration),
    attack: Attack,
    during: &str,
) -> (Webhook, Attackers) {
    let webhook = webhook(pki, flags).await;
    let attackers = Attackers::start(webhook.addr, &RawTls::new(pki), count, attack);
    attackers.until_sent(in_place).await;
    let slowest = reviews_answered_within(&webhook, pki, 10, limit, during).await;
    eprintln!("slowest review during {during}: {slowest:?}");
    (webhook, attackers)
}

/// The attack of issue 23: connections declaring a maximal body and sending one byte of it.
/// Nothing is charged before a body's first byte, and a body stalled after it gives way;
/// ordinary reviews take their room from a pool of their own and never queue behind these.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_that_never_comes_does_not_hold_up_reviews() {
    let pki = TestPki::new();
    let attack = Attack::Stalled {
        declared: MAX_BODY,
        sent: 1,
    };
    let during = "4 connections declaring 4 MiB and sending 1 byte";
    let (webhook, attackers) =
        reviews_during(&pki, &[], (4, 4, Duration::from_secs(1)), attack, during).await;
    drop(attackers);
    webhook.terminate().await;
}

/// Bodies that arrive up to their last byte and stall there fill the 8-MiB review budget; a
/// review that needs room evicts them (they made no progress for 500 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_filling_the_budget_give_way_to_a_review() {
    let pki = TestPki::new();
    let attack = Attack::Stalled {
        declared: MAX_BODY,
        sent: MAX_BODY - 1,
    };
    let during = "3 connections stalled one byte before the end of a 4-MiB body";
    // The third body is still queued for budget behind the two stalled ones when the reviews
    // start: a review waits for their eviction (500 ms stalled) and, on a loaded machine, at
    // worst for the body deadline (2 s): well inside the API server's 5 s (alone: ~0.5 s).
    let limit = Duration::from_secs(3);
    let (webhook, attackers) = reviews_during(&pki, &[], (3, 2, limit), attack, during).await;
    let evicted = attackers.answers();
    assert!(
        evicted
            .iter()
            .any(|(status, _)| status.starts_with("HTTP/1.1 408")),
        "stalled bodies are answered 408 when evicted: {evicted:?}"
    );
    drop(attackers);
    webhook.terminate().await;
}

/// Heads without bodies on every connection slot: at the cap, a connection whose body has
/// made no progress for 500 ms is as evictable as an idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_without_bodies_at_the_connection_cap_give_way_to_a_review() {
    let pki = TestPki::new();
    let attack = Attack::Stalled {
        declared: 1000,
        sent: 0,
    };
    let during = "40 connections holding heads without bodies at a cap of 32";
    let flags = ["--max-connections", "32"];
    let (webhook, attackers) = reviews_during(
        &pki,
        &flags,
        (40, 32, Duration::from_secs(1)),
        attack,
        during,
    )
    .await;
    drop(attackers);
    webhook.terminate().await;
}

/// A body that keeps coming, a byte every 100 ms, is not stalled, but it gets the body
/// deadline (2 s), far below the API server's timeout, and no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_is_cut_at_the_body_deadline() {
    let pki = TestPki::new();
    let webhook = webhook(&pki, &[]).await;
    let attackers = Attackers::start(webhook.addr, &RawTls::new(&pki), 1, Attack::Trickle);
    let deadline = Instant::now() + Duration::from_secs(15);
    let answer = loop {
        if let Some(first) = attackers.answers().first().cloned() {
            break first;
        }
        assert!(Instant::now() < deadline, "the trickle was never cut");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("trickling body answered {answer:?}");
    assert!(answer.0.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(3)).contains(&answer.1),
        "cut after {:?}",
        answer.1
    );
    drop(attackers);
    webhook.terminate().await;
}
