//! Reading AdmissionReview bodies within the webhook's memory budget, so that a client that
//! declares a body and does not send it cannot hold memory or a connection slot that the API
//! server's reviews need.
//!
//! - Nothing is charged before a body's first byte: a head declaring 4 MiB holds no memory.
//!   With its first byte a body of declared length (the API server always declares it)
//!   reserves all of it at once, so concurrent large reviews cannot each hold a part of the
//!   budget and wait for the rest (they deadlocked until the deadline); a body without a
//!   declared length is charged as it arrives.
//! - A body has a deadline from its head (`--body-timeout`, 2 s): the API server writes the
//!   body right after the head, and waits for the answer only `timeoutSeconds` (5 s in the
//!   chart) in all.
//! - A body that has made no progress for `stalled_after` (the listener's eviction age, 500 ms)
//!   gives way when it is in the way: when another review waits for room in the budget, or when
//!   every connection slot is taken by a request being read or answered (the listener evicts
//!   only connections between requests, so these slots would otherwise stay held until the
//!   deadline). It is answered 408 and its connection closed.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
// Tokio's clock, so the unit tests can pause it.
use tokio::time::Instant;

/// Largest AdmissionReview accepted (a pod object is at most ~1.5 MiB in etcd; the review
/// wraps it once for CREATE).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Bytes of review bodies being read or reviewed at once, in KiB. A review's peak memory is a
/// few times its size (body, typed pod, patch), so two maximal reviews at a time fit the
/// webhook's 128 Mi limit with room; further large ones wait their turn (bench/RESULTS.md).
/// Ordinary reviews (tens of KiB) never wait on each other.
const BUDGET_KIB: usize = 8 * 1024;

/// A body declaring at most this much (a Velero pod's review is ~10 KiB) first takes its room
/// from a pool of its own, so ordinary reviews never queue behind large ones waiting for the
/// shared budget (nor behind bodies that got room and have not stalled long enough yet).
const SMALL_BODY_BYTES: usize = 64 * 1024;
const SMALL_POOL_KIB: usize = 1024;

/// Settings of an [`Intake`].
#[derive(Debug, Clone, Copy)]
pub struct IntakeLimits {
    /// Connection slots of the listener: with this many requests being read or answered, a new
    /// connection (the API server's next review) waits for one of them to finish.
    pub max_connections: usize,
    /// Time from the head to the end of the body.
    pub deadline: Duration,
    /// A body with no new byte for this long gives way when it is in the way.
    pub stalled_after: Duration,
}

/// The shared review budget and the requests holding connection slots.
pub struct Intake {
    limits: IntakeLimits,
    /// KiB of review bodies held.
    budget: Arc<Semaphore>,
    /// KiB held by small declared bodies (see [`SMALL_BODY_BYTES`]).
    small: Arc<Semaphore>,
    /// Requests being read or answered (each holds a slot the listener does not evict).
    busy: AtomicUsize,
    /// Readers waiting for room in the budget.
    waiting: AtomicUsize,
    /// Wakes stalled readers when a reader starts waiting for room or the slots fill up.
    contention: Notify,
}

/// Why a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the AdmissionReview exceeds {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("the request body did not arrive within {0:?} of its head")]
    Deadline(Duration),
    #[error(
        "the request body made no progress for {0:?} while other reviews needed its room; \
         it was dropped"
    )]
    Stalled(Duration),
    #[error("too many large AdmissionReviews at once; no room for this one within {0:?}")]
    Busy(Duration),
    #[error("cannot read the request body: {0}")]
    Read(String),
}

/// A complete body and its share of the budget, held until dropped (after the review).
pub struct Received {
    pub body: Bytes,
    _charge: Option<OwnedSemaphorePermit>,
}

/// Marks a request as holding its connection's slot until dropped.
pub struct Busy<'a>(&'a Intake);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a reader waiting for room until dropped.
struct Waiting<'a>(&'a Intake);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Intake {
    pub fn new(limits: IntakeLimits) -> Intake {
        Intake {
            limits,
            budget: Arc::new(Semaphore::new(BUDGET_KIB)),
            small: Arc::new(Semaphore::new(SMALL_POOL_KIB)),
            busy: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            contention: Notify::new(),
        }
    }

    /// A request has its head: it holds its connection's slot until the guard is dropped.
    pub fn enter(&self) -> Busy<'_> {
        let busy = self.busy.fetch_add(1, Ordering::Relaxed) + 1;
        if busy >= self.limits.max_connections {
            self.contention.notify_waiters();
        }
        Busy(self)
    }

    /// True while a stalled body is in the way of a review.
    fn contended(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
            || self.busy.load(Ordering::Relaxed) >= self.limits.max_connections
    }

    /// Reads `body` to its end, charging the budget as its bytes arrive.
    pub async fn read<B>(&self, body: B) -> Result<Received, BodyError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let declared = body
            .size_hint()
            .exact()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= MAX_BODY_BYTES);
        let mut body = pin!(body);
        let deadline = Instant::now() + self.limits.deadline;
        let mut frames: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        let mut charge: Option<OwnedSemaphorePermit> = None;
        let mut progress = Instant::now();
        loop {
            let frame = tokio::select! {
                biased;
                frame = body.frame() => frame,
                () = tokio::time::sleep_until(deadline) => {
                    return Err(BodyError::Deadline(self.limits.deadline));
                }
                () = self.in_the_way(progress + self.limits.stalled_after) => {
                    return Err(BodyError::Stalled(self.limits.stalled_after));
                }
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err(BodyError::Read(e.to_string())),
                // Trailers carry no review.
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
            };
            len += data.len();
            if len > MAX_BODY_BYTES {
                return Err(BodyError::TooLarge);
            }
            // A declared body is charged all of it with its first byte.
            let need = declared.unwrap_or(len).max(len);
            self.charge(&mut charge, need, declared.is_some(), deadline)
                .await?;
            frames.push(data);
            // After any wait for room: a body queued for the budget has not stalled.
            progress = Instant::now();
        }
        let body = match frames.len() {
            1 => frames.pop().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(len);
                for frame in frames {
                    all.extend_from_slice(&frame);
                }
                all.freeze()
            }
        };
        Ok(Received {
            body,
            _charge: charge,
        })
    }

    /// Resolves when a body stalled since `stalled_at` is in the way: at that moment if a
    /// review is already waiting (or the slots are full), else as soon as one is.
    async fn in_the_way(&self, stalled_at: Instant) {
        tokio::time::sleep_until(stalled_at).await;
        loop {
            let mut notified = pin!(self.contention.notified());
            // Registered before the check, so a notification in between is not lost.
            notified.as_mut().enable();
            if self.contended() {
                return;
            }
            notified.await;
        }
    }

    /// Makes `held` cover `len` bytes, waiting for room until `deadline`. A small `declared`
    /// body takes its room from the small pool when there is some (all of it at once: it never
    /// needs more), else from the shared budget.
    async fn charge(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
        len: usize,
        declared: bool,
        deadline: Instant,
    ) -> Result<(), BodyError> {
        let have = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        let Some(more) = len.div_ceil(1024).checked_sub(have).filter(|&m| m > 0) else {
            return Ok(());
        };
        // At most MAX_BODY_BYTES / 1024, so the conversion cannot fail.
        let more = u32::try_from(more).unwrap_or(u32::MAX);
        match held {
            // Room for the whole declared body is held; hyper refuses more than declared.
            Some(h) if Arc::ptr_eq(h.semaphore(), &self.small) => {
                return Err(BodyError::Read("more bytes than declared".into()));
            }
            None if declared && len <= SMALL_BODY_BYTES => {
                if let Ok(permit) = self.small.clone().try_acquire_many_owned(more) {
                    *held = Some(permit);
                    return Ok(());
                }
            }
            _ => {}
        }
        let permit = match self.budget.clone().try_acquire_many_owned(more) {
            Ok(permit) => permit,
            Err(_) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let _waiting = Waiting(self);
                self.contention.notify_waiters();
                let room = self.budget.clone().acquire_many_owned(more);
                match tokio::time::timeout_at(deadline, room).await {
                    Ok(Ok(permit)) => permit,
                    _ => return Err(BodyError::Busy(self.limits.deadline)),
                }
            }
        };
        match held {
            Some(held) => held.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
