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
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
// Tokio's clock: the same as std's, except that tests can pause it.
use tokio::time::Instant;

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
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
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
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
    let local = listener.local_addr().ok();

    loop {
        // Take a connection slot before accepting, so excess clients queue in the backlog
        // instead of costing memory here.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.wait() => break,
        };
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
            _ = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let wrap = wrap.clone();
        let http = http.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let io = match wrap(stream).await {
                Ok(io) => io,
                Err(e) => {
                    tracing::debug!(error = %e, %peer, "connection setup failed");
                    return;
                }
            };
            let deadline = Arc::new(HeadDeadline::new());
            let service = {
                let deadline = deadline.clone();
                service_fn(move |req| {
                    deadline.answering();
                    let deadline = deadline.clone();
                    let fut = handler(req, peer);
                    async move {
                        let resp = fut.await;
                        deadline.answered();
                        Ok::<_, Infallible>(resp)
                    }
                })
            };
            let conn = watcher.watch(http.serve_connection(TokioIo::new(io), service));
            tokio::select! {
                biased;
                ended = conn => if let Err(e) = ended {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                },
                () = deadline.missed(head_limit) => {
                    tracing::debug!(%peer, limit = ?head_limit, "connection closed: no complete request head in time");
                }
            }
        });
    }
    drop(listener);
    // Signals every connection to finish its in-flight request and close; waits for them.
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = ?local, "in-flight connections did not finish within the grace period");
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
        let ms = self.opened.elapsed().as_millis() as u64;
        self.idle_since_ms.store(ms, Ordering::Relaxed);
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

/// Resolves on SIGTERM (kubelet stopping the pod) or SIGINT (Ctrl-C).
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
            }
        }
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
