//! The open connections of one listener: each one's head deadline (slowloris, idle
//! keep-alive) and the eviction of the idlest at the connection cap and at shutdown.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::Notify;
// Tokio's clock: the same as std's, except that tests can pause it.
use tokio::time::Instant;

/// After an eviction, when the accept loop looks for the next idlest if no slot came free.
const RECHECK_AFTER_EVICTION: Duration = Duration::from_millis(10);

/// One connection's state, seen by the accept loop.
pub(super) struct Conn {
    pub(super) deadline: HeadDeadline,
    /// Closes the connection when it is not answering a request.
    pub(super) evict: Notify,
}

/// The open connections of one listener, for eviction at the cap and at shutdown.
#[derive(Default)]
pub(super) struct Conns(Mutex<Vec<Weak<Conn>>>);

impl Conns {
    pub(super) fn add(&self) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            deadline: HeadDeadline::new(),
            evict: Notify::new(),
        });
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|c| c.strong_count() > 0);
        all.push(Arc::downgrade(&conn));
        conn
    }

    /// Closes the connection that has waited longest for a request head, if any has waited
    /// `evictable_after`: a burst of new callers, whose heads arrive within milliseconds,
    /// waits for slots instead of evicting each other. Otherwise returns when the idlest will
    /// have waited that long (`None` if every connection is being answered).
    pub(super) fn evict_idlest(&self, evictable_after: Duration) -> Option<Instant> {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (since, idlest) = all
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|c| c.deadline.idle_since().map(|since| (since, c)))
            .min_by_key(|(since, _)| *since)?;
        let evictable_at = since + evictable_after;
        if evictable_at <= Instant::now() {
            idlest.evict.notify_one();
            // The permit it frees normally ends the caller's wait at once; look again soon in
            // case the connection turned busy and ignores the notice.
            return Some(Instant::now() + evictable_after.min(RECHECK_AFTER_EVICTION));
        }
        Some(evictable_at)
    }

    /// Closes every connection that is not answering a request.
    pub(super) fn evict_idle(&self) {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for conn in all.iter().filter_map(Weak::upgrade) {
            if conn.deadline.idle_since().is_some() {
                conn.evict.notify_one();
            }
        }
    }
}

/// The request-head deadline of one connection, kept without a timer per request.
///
/// hyper's own `header_read_timeout` boxes a sleep for every request head and registers and
/// cancels it in the timer wheel: ~1,600 instructions per request, a tenth of the broker's
/// whole hot path (bench/RESULTS.md). Here a request costs two stores and a clock read; the
/// connection's one sleep is moved only when it fires. While a request is being answered the
/// deadline does not run (the handler bounds its own time); once the answer is ready the
/// next head must arrive in time, so a client that stops reading answers is closed too.
pub(super) struct HeadDeadline {
    pub(super) opened: Instant,
    /// Milliseconds from `opened` to the moment the connection last became idle (opened, or
    /// an answer was ready); [`HeadDeadline::BUSY`] while a request is being answered.
    idle_since_ms: AtomicU64,
}

impl HeadDeadline {
    const BUSY: u64 = u64::MAX;

    pub(super) fn new() -> Self {
        HeadDeadline {
            opened: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    /// A complete request head arrived: the deadline stops.
    pub(super) fn answering(&self) {
        self.idle_since_ms.store(Self::BUSY, Ordering::Relaxed);
    }

    /// The answer is ready: the next head is due within the limit from now.
    pub(super) fn answered(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(Self::BUSY - 1);
        self.idle_since_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection last became idle; `None` while a request is being answered.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        match self.idle_since_ms.load(Ordering::Relaxed) {
            Self::BUSY => None,
            ms => Some(self.opened + Duration::from_millis(ms)),
        }
    }

    /// Resolves once the connection has been idle for `limit` without a complete head.
    pub(super) async fn missed(&self, limit: Duration) {
        let mut sleep = pin!(tokio::time::sleep_until(self.opened + limit));
        loop {
            sleep.as_mut().await;
            let now = Instant::now();
            let due = match self.idle_since_ms.load(Ordering::Relaxed) {
                Self::BUSY => now + limit,
                ms => self.opened + Duration::from_millis(ms) + limit,
            };
            if due <= now {
                return;
            }
            sleep.as_mut().reset(due);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_idlest_connection_is_evicted_once_it_has_waited_long_enough() {
        let conns = Conns::default();
        let after = Duration::from_millis(250);
        let old = conns.add();
        tokio::time::advance(Duration::from_millis(100)).await;
        let busy = conns.add();
        busy.deadline.answering();
        let _young = conns.add();
        // Nothing evictable yet: the caller is told when the oldest idle one will be.
        assert_eq!(conns.evict_idlest(after), Some(old.deadline.opened + after));
        tokio::time::advance(Duration::from_millis(150)).await;
        conns.evict_idlest(after);
        let evicted = tokio::time::timeout(Duration::ZERO, old.evict.notified()).await;
        assert!(evicted.is_ok(), "the idlest connection is told to close");
        // A connection being answered is never a candidate.
        drop((old, _young));
        assert_eq!(conns.evict_idlest(after), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_misses_its_deadline_after_the_limit() {
        let d = HeadDeadline::new();
        let limit = Duration::from_secs(30);
        d.missed(limit).await;
        assert_eq!(d.opened.elapsed(), limit);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_stops_while_answering_and_restarts_after_the_answer() {
        let d = HeadDeadline::new();
        let limit = Duration::from_secs(30);
        d.answering();
        // Busy for three limits: not missed.
        let busy = tokio::time::timeout(3 * limit, d.missed(limit)).await;
        assert!(
            busy.is_err(),
            "a request being answered must not close the connection"
        );
        d.answered();
        let answered_at = Instant::now();
        d.missed(limit).await;
        // Restarted from the answer (to the millisecond it is recorded with).
        let idle = answered_at.elapsed();
        assert!(
            idle >= limit - Duration::from_millis(1) && idle <= limit,
            "{idle:?}"
        );
    }
}
