//! The background refresh of one entry: at half the token's lifetime, if the entry was asked
//! for since the token was obtained; otherwise it parks until a use or the expiry, when the
//! entry is dropped. While Entra fails, it waits out the broker-wide gate as long as the old
//! token is still usable, and then leaves the entry to requests.

use super::entry::Entry;
use super::Broker;
use std::sync::Arc;
use tokio::time::{sleep_until, Instant};

impl Broker {
    pub(super) fn ensure_refresher(self: &Arc<Self>, entry: &Arc<Entry>) {
        if entry.start_refresher() {
            tokio::spawn(refresh_loop(self.clone(), entry.clone()));
        }
    }

    /// One refresh: done when the token is fresh again or no longer usable. The entry's fetch
    /// lock is held for an exchange, never across a wait for the gate: callers that come
    /// meanwhile take it and are answered with the old token (stale-while-error).
    async fn refresh_once(&self, entry: &Entry) {
        loop {
            let guard = entry.fetch.lock().await;
            let now = Instant::now();
            if entry.fresh(now).is_some() {
                return; // A caller refreshed it meanwhile.
            }
            let Some(plan) = entry.plan(now) else {
                return;
            };
            let blocked = entry.refused(now).or_else(|| self.gate.closed(now));
            if let Some((open_at, _)) = blocked {
                drop(guard);
                sleep_until(open_at.min(plan.usable_until)).await;
                continue;
            }
            // A gate that closed while waiting for the permit is looked at again above.
            if let Ok(_permit) = self.gate.permit().await {
                // Failures are recorded in the entry or the gate; the old token is still served.
                let _ = self.exchange_once(entry).await;
            }
        }
    }
}

/// Clears the entry's refresher flag however the task ends, so a later success can start a
/// new one.
struct Running(Arc<Entry>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.stop_refresher();
    }
}

async fn refresh_loop(broker: Arc<Broker>, entry: Arc<Entry>) {
    let _running = Running(entry.clone());
    while let Some(plan) = entry.plan(Instant::now()) {
        sleep_until(plan.refresh_at).await;
        if entry.park() {
            tokio::select! {
                () = entry.woken() => {}
                () = sleep_until(plan.usable_until) => {
                    if !entry.used() {
                        tracing::debug!(resource = %entry.resource, "unused cache entry dropped at expiry");
                        broker.remove(&entry);
                        break;
                    }
                }
            }
        }
        broker.refresh_once(&entry).await;
    }
    // No usable token and nothing scheduled: requests drive the entry from here.
}
