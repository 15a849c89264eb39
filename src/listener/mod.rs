//! HTTP/1.1 listeners shared by the token, admin and webhook servers: connection limits,
//! header-size and header-read timeouts, keep-alive, and graceful shutdown.
//!
//! The server knows nothing about tokens; it hands each request to a handler closure.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
// Tokio's clock: the same as std's, except that tests can pause it.
use tokio::time::Instant;

mod framing_errors;
pub use framing_errors::FramingErrorBody;
use framing_errors::FramingErrors;

pub type Body = Full<Bytes>;

/// Limits that stop a slow or huge request from pinning the process.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent connections; further connections wait in the kernel backlog.
    pub max_connections: usize,
    /// Time a connection gets, while no request of it is being answered, to deliver a complete
    /// request head after it opened or after its last answer was ready; then it is closed.
    /// Guards against slow heads (slowloris), idle keep-alive connections, and clients that
    /// stop reading their answers. See [`HeadDeadline`].
    pub header_read_timeout: Duration,
    /// Read buffer cap, i.e. the largest request head accepted (hyper's minimum is 8 KiB).
    pub max_header_bytes: usize,
    /// Body of the answer to a request hyper cannot parse (else hyper's empty one).
    pub framing_error_body: Option<FramingErrorBody>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            framing_error_body: None,
        }
    }
}

/// Fires once when the process should stop accepting work.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// The sending half of [`Shutdown`].
pub struct ShutdownTrigger(watch::Sender<bool>);

pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Resolves when shutdown has been triggered (or the trigger dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Binds `addr`, with an error that names the address and the usual causes.
pub fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    listen(addr).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need CAP_NET_BIND_SERVICE or the pod sysctl \
                 net.ipv4.ip_unprivileged_port_start=0)"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                " (the address is not on any interface; for 169.254.169.254 run \
                 `imds-broker init-network` first)"
            }
            std::io::ErrorKind::AddrInUse => " (another process listens there)",
            _ => "",
        };
        anyhow::anyhow!("cannot bind the {what} listener on {addr}: {e}{hint}")
    })
}

/// Accept-queue length. `TcpListener::bind` asks for 128: a burst of more new connections
/// than that (bench/RESULTS.md, cold path: 1,000 callers) overflowed it and the kernel dropped
/// SYNs, which clients retransmit only after 1 s. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 1024;

/// What `TcpListener::bind` does (SO_REUSEADDR, bind, listen), with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves plain-HTTP connections from `listener` until `shutdown` fires, then lets in-flight
/// requests finish for up to `grace`.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    limits: Limits,
    shutdown: Shutdown,
    grace: Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(
        listener,
        |stream| async move { Ok::<_, std::io::Error>(stream) },
        handler,
        limits,
        shutdown,
        grace,
    )
    .await
}

/// Like [`serve`], with a per-connection `wrap` step (e.g. a TLS handshake) before HTTP.
pub async fn serve_with<W, WF, IO, H, F>(
    listener: TcpListener,
    wrap: W,
    handler: H,
    limits: Limits,
    mut shutdown: Shutdown,
    grace: Duration,
) where
    W: Fn(tokio::net::TcpStream) -> WF + Clone + Send + Sync + 'static,
    WF: Future<Output = std::io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    // No hyper timer: its `header_read_timeout` arms and cancels a timer for every request;
    // `HeadDeadline` enforces the limit instead.
    http.max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let head_limit = limits.header_read_timeout;
    let framing_error_body = limits.framing_error_body.clone();
    let local = listener.local_addr().ok();
    let conns = Conns::default();

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, listener = ?local, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => break,
        };
        // At the cap, the connection idle longest makes room: idle keep-alive connections and
        // slow heads must not lock out a caller (or a kubelet probe). If every connection is
        // being answered, the new one waits for a slot.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let mut slot = None;
                loop {
                    conns.evict_idlest();
                    tokio::select! {
                        p = permits.clone().acquire_owned() => {
                            slot = p.ok();
                            break;
                        }
                        // Connections idle too briefly now may be evictable soon.
                        () = tokio::time::sleep(EVICTABLE_AFTER / 4) => {}
                        () = shutdown.wait() => break,
                    }
                }
                match slot {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let wrap = wrap.clone();
        let http = http.clone();
        let framing_error_body = framing_error_body.clone();
        let watcher = graceful.watcher();
        let conn_state = conns.add();
        tokio::spawn(async move {
            let _permit = permit;
            let state = conn_state;
            let io = tokio::select! {
                wrapped = tokio::time::timeout(head_limit, wrap(stream)) => match wrapped {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, %peer, "connection setup failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "connection setup (TLS handshake) timed out");
                        return;
                    }
                },
                () = state.evict.notified() => return,
            };
            let service = {
                let state = state.clone();
                service_fn(move |req| {
                    state.deadline.answering();
                    let state = state.clone();
                    let fut = handler(req, peer);
                    async move {
                        let resp = fut.await;
                        state.deadline.answered();
                        Ok::<_, Infallible>(resp)
                    }
                })
            };
            let io = FramingErrors::new(io, framing_error_body.clone());
            let conn = watcher.watch(http.serve_connection(TokioIo::new(io), service));
            tokio::select! {
                biased;
                ended = conn => if let Err(e) = ended {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                },
                () = state.deadline.missed(head_limit) => {
                    tracing::debug!(%peer, limit = ?head_limit, "connection closed: no complete request head in time");
                }
                () = state.evict.notified() => {
                    tracing::debug!(%peer, "idle connection closed to make room or to shut down");
                }
            }
        });
    }
    drop(listener);
    // Connections reading a head or idle between requests close now; those being answered
    // finish their answer and close.
    conns.evict_idle();
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = ?local, "in-flight connections did not finish within the grace period");
    }
}

/// How long a connection must have been idle before it may be evicted at the cap.
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

/// One connection's state, seen by the accept loop.
struct Conn {
    deadline: HeadDeadline,
    /// Closes the connection when it is not answering a request.
    evict: Notify,
}

/// The open connections of one listener, for eviction at the cap and at shutdown.
#[derive(Default)]
struct Conns(Mutex<Vec<Weak<Conn>>>);

impl Conns {
    fn add(&self) -> Arc<Conn> {
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
    /// [`EVICTABLE_AFTER`]: a burst of new callers, whose heads arrive within milliseconds,
    /// waits for slots instead of evicting each other.
    fn evict_idlest(&self) {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let cutoff = Instant::now().checked_sub(EVICTABLE_AFTER);
        let idlest = all
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|c| c.deadline.idle_since().map(|since| (since, c)))
            .filter(|(since, _)| cutoff.is_some_and(|cut| *since <= cut))
            .min_by_key(|(since, _)| *since);
        if let Some((_, conn)) = idlest {
            conn.evict.notify_one();
        }
    }

    /// Closes every connection that is not answering a request.
    fn evict_idle(&self) {
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
struct HeadDeadline {
    opened: Instant,
    /// Milliseconds from `opened` to the moment the connection last became idle (opened, or
    /// an answer was ready); [`HeadDeadline::BUSY`] while a request is being answered.
    idle_since_ms: AtomicU64,
}

impl HeadDeadline {
    const BUSY: u64 = u64::MAX;

    fn new() -> Self {
        HeadDeadline {
            opened: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    /// A complete request head arrived: the deadline stops.
    fn answering(&self) {
        self.idle_since_ms.store(Self::BUSY, Ordering::Relaxed);
    }

    /// The answer is ready: the next head is due within the limit from now.
    fn answered(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(Self::BUSY - 1);
        self.idle_since_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection last became idle; `None` while a request is being answered.
    fn idle_since(&self) -> Option<Instant> {
        match self.idle_since_ms.load(Ordering::Relaxed) {
            Self::BUSY => None,
            ms => Some(self.opened + Duration::from_millis(ms)),
        }
    }

    /// Resolves once the connection has been idle for `limit` without a complete head.
    async fn missed(&self, limit: Duration) {
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

/// A JSON response with the given status.
pub fn json_response(status: hyper::StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    // Built directly with a static header value: `Response::builder().header(.., &str)`
    // copied and re-validated the content type for every token answer (hot path).
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// Resolves on SIGTERM (kubelet stopping the pod) or SIGINT (Ctrl-C). SIGHUP, which would
/// otherwise kill the process silently, is logged and ignored: there is no configuration file
/// to reload (the token file and certificates are re-read on their own).
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(mut term), Ok(mut int), Ok(mut hup)) => loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM received, shutting down");
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT received, shutting down");
                    break;
                }
                _ = hup.recv() => tracing::info!("SIGHUP received and ignored (nothing to reload)"),
            }
        },
        _ => {
            // Without signal handlers (should not happen on Linux) fall back to Ctrl-C only.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
