//! Unit tests of the parent module, on paused time.
use super::*;
use hyper::body::Frame;
use std::convert::Infallible;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// A request body fed by the test: each message is one frame, dropping the sender ends it.
struct Fed(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for Fed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn body() -> (mpsc::UnboundedSender<Bytes>, Fed) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Fed(rx))
}

fn bytes(n: usize) -> Bytes {
    Bytes::from(vec![b' '; n])
}

const STALLED_AFTER: Duration = Duration::from_millis(500);
const DEADLINE: Duration = Duration::from_secs(2);
const MIB: usize = 1024 * 1024;

fn intake(max_connections: usize) -> Arc<Intake> {
    Arc::new(Intake::new(IntakeLimits {
        max_connections,
        deadline: DEADLINE,
        stalled_after: STALLED_AFTER,
    }))
}

/// Reads a fed body on a task, as the handler would, holding a connection slot meanwhile.
fn reader(
    intake: &Arc<Intake>,
    body: Fed,
) -> tokio::task::JoinHandle<(Result<usize, String>, Duration)> {
    let intake = intake.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let _busy = intake.enter();
        let read = intake.read(body).await;
        let outcome = read.map(|r| r.body.len()).map_err(|e| e.to_string());
        (outcome, started.elapsed())
    })
}

#[tokio::test(start_paused = true)]
async fn memory_is_charged_as_bytes_arrive_not_as_declared() {
    let intake = intake(64);
    let (tx, fed) = body();
    let read = reader(&intake, fed);
    tx.send(bytes(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(intake.budget.available_permits(), BUDGET_KIB - 1);
    tx.send(bytes(MIB)).unwrap();
    drop(tx);
    let (outcome, _) = read.await.unwrap();
    assert_eq!(outcome, Ok(MIB + 1));
    // The charge went with the body.
    assert_eq!(intake.budget.available_permits(), BUDGET_KIB);
}

#[tokio::test(start_paused = true)]
async fn stalled_bodies_holding_the_budget_give_way_to_a_review_that_needs_room() {
    let intake = intake(64);
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let (tx, fed) = body();
        tx.send(bytes(MAX_BODY_BYTES - 1)).unwrap();
        stalled.push((reader(&intake, fed), tx));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(intake.budget.available_permits(), 0, "the budget is full");

    // A review arriving while they have been stalled for 100 ms waits 400 ms more, no longer.
    let (tx, fed) = body();
    tx.send(bytes(16 * 1024)).unwrap();
    drop(tx);
    let (outcome, took) = reader(&intake, fed).await.unwrap();
    assert_eq!(outcome, Ok(16 * 1024));
    assert_eq!(took, STALLED_AFTER - Duration::from_millis(100));
    for (read, _tx) in stalled {
        let (outcome, took) = read.await.unwrap();
        let err = outcome.unwrap_err();
        assert!(err.contains("no progress"), "{err}");
        assert_eq!(took, STALLED_AFTER);
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_still_arriving_is_not_evicted_and_one_stalled_without_contention_waits() {
    let intake = intake(64);
    // Stalled, but nobody needs its room: it waits out its deadline.
    let (idle_tx, fed) = body();
    idle_tx.send(bytes(10)).unwrap();
    let idle = reader(&intake, fed);
    // Arrives slowly, a frame every 350 ms (never 500 ms without progress), and completes.
    let (slow_tx, fed) = body();
    let slow = reader(&intake, fed);
    tokio::spawn(async move {
        for _ in 0..3 {
            slow_tx.send(bytes(MIB)).unwrap();
            tokio::time::sleep(Duration::from_millis(350)).await;
        }
    });
    let (outcome, took) = slow.await.unwrap();
    assert_eq!(outcome, Ok(3 * MIB));
    assert_eq!(took, Duration::from_millis(1050));
    let (outcome, took) = idle.await.unwrap();
    let err = outcome.unwrap_err();
    assert!(err.contains("did not arrive within 2s"), "{err}");
    assert_eq!(took, DEADLINE);
}

#[tokio::test(start_paused = true)]
async fn at_the_connection_cap_each_new_request_makes_one_stalled_body_give_way() {
    let intake = intake(3);
    let start = Instant::now();
    let mut held = Vec::new();
    for _ in 0..2 {
        let (tx, fed) = body();
        held.push((reader(&intake, fed), tx));
    }
    // Two requests arrive, at 1 s and 1.2 s, each taking the last slot: each makes one body
    // stalled for 500 ms or more give way (as the listener evicts one idle connection per new
    // one), not every stalled body at once; the newcomers, stalled for less, stay.
    let mut newcomers = Vec::new();
    for at in [1000, 1200] {
        tokio::time::sleep_until(start + Duration::from_millis(at)).await;
        let (tx, fed) = body();
        newcomers.push((reader(&intake, fed), tx));
    }
    let mut ended = Vec::new();
    for (read, _tx) in held {
        let (outcome, took) = read.await.unwrap();
        let err = outcome.unwrap_err();
        assert!(err.contains("no progress"), "{err}");
        ended.push(took);
    }
    ended.sort();
    assert_eq!(
        ended,
        [Duration::from_millis(1000), Duration::from_millis(1200)]
    );
    for (read, tx) in newcomers {
        tx.send(bytes(100)).unwrap();
        drop(tx);
        assert_eq!(read.await.unwrap().0, Ok(100));
    }
}

#[tokio::test(start_paused = true)]
async fn an_oversized_body_is_refused_as_it_arrives() {
    let intake = intake(64);
    let (tx, fed) = body();
    tx.send(bytes(MAX_BODY_BYTES)).unwrap();
    tx.send(bytes(1)).unwrap();
    let (outcome, _) = reader(&intake, fed).await.unwrap();
    assert!(outcome.unwrap_err().contains("exceeds"));
    assert_eq!(intake.budget.available_permits(), BUDGET_KIB);
}
