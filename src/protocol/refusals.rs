//! Refused token requests are logged at info with their reason, because "why does my pod get
//! a 401?" is answered from the sidecar's log. A looping client can send thousands a second,
//! so lines are rate-limited: at most [`PER_WINDOW`] per [`WINDOW`], and the next line logged
//! says how many were left out. The reason is the error description the caller also gets,
//! which never holds a secret (the identity header and tokens are not echoed).

use super::error::ApiError;
use crate::metrics::Endpoint;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

pub const WINDOW: Duration = Duration::from_secs(10);
pub const PER_WINDOW: u32 = 10;

/// The rate limiter of refusal log lines.
pub struct RefusalLog {
    state: Mutex<Window>,
}

struct Window {
    started: Option<Instant>,
    logged: u32,
    /// Refusals not logged since the last line that was.
    suppressed: u64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog {
            state: Mutex::new(Window {
                started: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }
}

impl RefusalLog {
    /// Logs one refusal, unless the window's budget is spent.
    pub fn refused(&self, endpoint: Endpoint, e: &ApiError) {
        if let Some(suppressed) = self.admit(Instant::now()) {
            tracing::info!(
                endpoint = ?endpoint,
                status = e.status.as_u16(),
                error = e.code,
                reason = %e.description,
                suppressed,
                "token request refused"
            );
        }
    }

    /// `Some(refusals left out before this one)` when this one may be logged.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if w.started.is_none_or(|s| now.duration_since(s) >= WINDOW) {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged < PER_WINDOW {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_budget_and_the_gap_is_reported() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..1000).filter_map(|_| log.admit(t0)).collect();
        assert_eq!(admitted, vec![0; PER_WINDOW as usize]);
        // Still inside the window: nothing more.
        assert_eq!(log.admit(t0 + WINDOW - Duration::from_millis(1)), None);
        // A new window: the first line reports everything left out.
        let gap = 1000 - u64::from(PER_WINDOW) + 1;
        assert_eq!(log.admit(t0 + WINDOW), Some(gap));
        assert_eq!(log.admit(t0 + WINDOW), Some(0));
    }
}
