//! One cache entry: the token of one resource and what the broker knows about getting the next
//! one. A small state machine on Tokio's clock; it does no I/O, logging or metric work, so its
//! lock is held only for a few assignments.

use super::error::BrokerError;
use super::lock;
use crate::clock::{later, until_unix};
use crate::exchange::Token;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A token this close to expiry is not handed out: it could expire in flight. Capped at a
/// tenth of the lifetime so short-lived tokens stay usable.
const EXPIRY_SKEW: Duration = Duration::from_secs(10);

pub struct Entry {
    /// The spelling exchanged with Entra (the allow-list's, or the first caller's).
    pub resource: String,
    /// Bounded metric label (see `Policy::label`).
    pub label: String,
    state: Mutex<State>,
    /// Held for the duration of an exchange: concurrent cold requests wait here (coalescing).
    pub fetch: tokio::sync::Mutex<()>,
    /// Wakes a refresher parked until the entry is used again.
    wake: Notify,
    /// Told when an exchange for this entry ends, however it ended.
    attempts: Notify,
}

struct State {
    token: Option<Cached>,
    /// A permanent refusal for this resource and until when it is answered from memory.
    refused: Option<(Instant, BrokerError)>,
    /// Asked for since the current token was obtained: only such entries are refreshed.
    used: bool,
    /// A refresher task exists for this entry.
    refresher: bool,
    /// The refresher waits for a use before it refreshes (see [`Entry::park`]).
    parked: bool,
    /// A use woke the parked refresher: until the refresh is recorded, callers past the
    /// refresh point wait for it (or get the old token if Entra cannot be asked).
    woken: bool,
}

struct Cached {
    token: Arc<Token>,
    /// Half-life: tokens handed out keep at least half their lifetime while Entra is healthy.
    refresh_at: Instant,
    /// Expiry minus the skew: not handed out after this.
    usable_until: Instant,
}

/// What a lookup found.
pub enum Found {
    /// Before its refresh point.
    Fresh(Arc<Token>),
    /// Past its refresh point, still usable: a refresh is pending or failing.
    Stale(Arc<Token>),
    /// Nothing to hand out without an exchange.
    Miss,
}

/// When the refresher acts next.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub refresh_at: Instant,
    pub usable_until: Instant,
}

impl Entry {
    pub fn new(resource: String, label: String) -> Self {
        Entry {
            resource,
            label,
            state: Mutex::new(State {
                token: None,
                refused: None,
                used: false,
                refresher: false,
                parked: false,
                woken: false,
            }),
            fetch: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            attempts: Notify::new(),
        }
    }

    /// The hot-path lookup; counts as a use. A parked entry past its refresh point is a miss,
    /// so the caller waits for the refresh rather than taking a half-spent token.
    pub fn lookup(&self, now: Instant) -> Found {
        let mut state = lock(&self.state);
        state.used = true;
        let Some(c) = state.token.as_ref().filter(|c| now < c.usable_until) else {
            return Found::Miss;
        };
        if now < c.refresh_at {
            return Found::Fresh(c.token.clone());
        }
        if state.parked {
            state.parked = false;
            state.woken = true;
            drop(state);
            self.wake.notify_one();
            return Found::Miss;
        }
        if state.woken {
            return Found::Miss;
        }
        Found::Stale(c.token.clone())
    }

    /// A token before its refresh point, if any (what a waiter for an exchange accepts).
    pub fn fresh(&self, now: Instant) -> Option<Arc<Token>> {
        let state = lock(&self.state);
        state
            .token
            .as_ref()
            .filter(|c| now < c.refresh_at && now < c.usable_until)
            .map(|c| c.token.clone())
    }

    /// A token still fit to hand out, fresh or stale (stale-while-error).
    pub fn usable(&self, now: Instant) -> Option<Arc<Token>> {
        let state = lock(&self.state);
        state
            .token
            .as_ref()
            .filter(|c| now < c.usable_until)
            .map(|c| c.token.clone())
    }

    /// A recorded permanent refusal still in force at `now`, and until when.
    pub fn refused(&self, now: Instant) -> Option<(Instant, BrokerError)> {
        let state = lock(&self.state);
        state
            .refused
            .as_ref()
            .filter(|(until, _)| *until > now)
            .cloned()
    }

    /// Stores a new token; returns it shared, with its lifetime.
    pub fn record_token(&self, token: Token, now: Instant) -> (Arc<Token>, Duration) {
        let lifetime = until_unix(token.expires_on);
        let skew = EXPIRY_SKEW.min(lifetime / 10);
        let token = Arc::new(token);
        let mut state = lock(&self.state);
        state.token = Some(Cached {
            token: token.clone(),
            refresh_at: later(now, lifetime / 2),
            usable_until: later(now, lifetime - skew),
        });
        state.refused = None;
        state.used = false;
        state.parked = false;
        state.woken = false;
        (token, lifetime)
    }

    /// Records a permanent refusal, answered from memory for `backoff`.
    pub fn record_refusal(&self, err: BrokerError, now: Instant, backoff: Duration) {
        lock(&self.state).refused = Some((later(now, backoff), err));
    }

    /// Unix expiry of the current token, if any.
    pub fn expires_on(&self) -> Option<u64> {
        lock(&self.state).token.as_ref().map(|c| c.token.expires_on)
    }

    /// When the refresher should act, or `None` when there is no usable token to refresh.
    pub fn plan(&self, now: Instant) -> Option<Plan> {
        let state = lock(&self.state);
        let c = state.token.as_ref().filter(|c| now < c.usable_until)?;
        Some(Plan {
            refresh_at: c.refresh_at,
            usable_until: c.usable_until,
        })
    }

    /// Marks a refresher as started; `false` if one already runs.
    pub fn start_refresher(&self) -> bool {
        let mut state = lock(&self.state);
        !std::mem::replace(&mut state.refresher, true)
    }

    pub fn stop_refresher(&self) {
        let mut state = lock(&self.state);
        state.refresher = false;
        state.parked = false;
        state.woken = false;
    }

    /// At the refresh point: an entry not asked for since its token was obtained is not
    /// refreshed (a resource asked for once must not cost an Entra call every half-life);
    /// the refresher parks until a use wakes it. Returns whether it parked.
    pub fn park(&self) -> bool {
        let mut state = lock(&self.state);
        state.parked = !state.used;
        state.parked
    }

    /// Resolves when the next exchange for this entry ends (create it before looking at the
    /// state it is about, and `enable` it, so an end in between is not missed).
    pub fn attempted(&self) -> tokio::sync::futures::Notified<'_> {
        self.attempts.notified()
    }

    /// Marks the end of an exchange when dropped (after its outcome is recorded).
    pub fn attempt_done(&self) -> AttemptDone<'_> {
        AttemptDone(&self.attempts)
    }

    /// Resolves when a lookup wakes a parked refresher.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Whether the entry was asked for since its token was obtained.
    pub fn used(&self) -> bool {
        lock(&self.state).used
    }
}

/// See [`Entry::attempt_done`].
pub struct AttemptDone<'a>(&'a Notify);

impl Drop for AttemptDone<'_> {
    fn drop(&mut self) {
        self.0.notify_waiters();
    }
}
