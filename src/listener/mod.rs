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
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

mod conns;
mod framing_errors;
pub mod open_files;
mod peers;
use conns::Conns;
pub use framing_errors::FramingErrorBody;
use framing_errors::FramingErrors;
pub use peers::OutsidePeer;

pub type Body = Full<Bytes>;

/// Upper bound of a connection cap (`--max-connections` of serve and the webhook): 65,536
/// connections holding full heads are already ~1 GiB, far past any pod's memory limit, and
/// Tokio's semaphore panics above 2^61 permits.
pub const MAX_CONNECTIONS: usize = 65_536;

/// Connection slots, and the open connections holding them, shared by every listener given
/// the same `Slots` (`serve`'s token listeners: one cap for all, so adding a listener does not
/// add a cap's worth of memory). Eviction at the cap picks the idlest of all of them.
#[derive(Clone)]
pub struct Slots {
    permits: Arc<Semaphore>,
    conns: Arc<Conns>,
}

impl Slots {
    pub fn new(max_connections: usize) -> Slots {
        Slots {
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            conns: Arc::default(),
        }
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("available", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

/// Limits that stop a slow or huge request from pinning the process.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent connections; further connections wait in the kernel backlog.
    pub max_connections: usize,
    /// Slots shared with other listeners; `None`: this listener's own `max_connections`.
    pub shared_slots: Option<Slots>,
    /// Time a connection gets, while no request of it is being answered, to deliver a complete
    /// request head after it opened or after its last answer was ready; then it is closed.
    /// Guards against slow heads (slowloris), idle keep-alive connections, and clients that
    /// stop reading their answers. See [`HeadDeadline`].
    pub header_read_timeout: Duration,
    /// Read buffer cap, i.e. the largest request head accepted (hyper's minimum is 8 KiB).
    pub max_header_bytes: usize,
    /// At the cap, a connection idle (no complete head) for this long may be closed to make
    /// room for a new one. Shorter evicts faster under a reconnecting flood (at the cap the
    /// listener accepts at most `max_connections / evictable_after` connections per second, so
    /// one queued behind N others waits about `N × evictable_after / max_connections`); longer
    /// spares the connections of a burst of real callers, whose heads are a few ms behind.
    pub evictable_after: Duration,
    /// Body of the answer to a request hyper cannot parse (else hyper's empty one).
    pub framing_error_body: Option<FramingErrorBody>,
    /// `Some`: only peers inside this network namespace are served; a connection from
    /// elsewhere gets this answer to its request, then is closed (see [`peers`]). `None`:
    /// every peer is served (the admin listeners, the webhook).
    pub outside_peer: Option<OutsidePeer>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            shared_slots: None,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            evictable_after: Duration::from_millis(500),
            framing_error_body: None,
            outside_peer: None,
        }
    }
}

impl Limits {
    /// The admin listeners (kubelet's probes with their 1-s timeout, Prometheus), reachable
    /// from the pod network. Their clients send a small head as soon as they connect, so a head
    /// gets 2 s and, at the cap, an idle connection is evictable after 200 ms: a flood of
    /// idle or slow connections that reconnect is drained at ~1,300 accepts/s, and a probe
    /// queued behind hundreds of them is answered well within its second
    /// (tests/e2e/hostile.rs). 256 connections of ≤ 14.5 KiB each (an 8-KiB head held) bound
    /// the listener to ~3.6 MiB of the sidecar's memory limit (bench/broker_load.py).
    pub fn admin() -> Limits {
        Limits {
            max_connections: 256,
            shared_slots: None,
            header_read_timeout: Duration::from_secs(2),
            max_header_bytes: 8 * 1024,
            evictable_after: Duration::from_millis(200),
            framing_error_body: None,
            outside_peer: None,
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
    bind_socket(addr, what, false)
}

/// Like [`bind`], with SO_REUSEPORT: another process of the same user that sets it too can
/// listen on the same address, and the kernel spreads new connections over both. `node` uses
/// it so that during a rolling update the old and the new broker pod of a node serve side by
/// side (host network, one port) and no connection is refused in between. Linux lets only
/// sockets of the same effective user share the port.
pub fn bind_reusing_port(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    bind_socket(addr, what, true)
}

fn bind_socket(addr: SocketAddr, what: &str, reuse_port: bool) -> anyhow::Result<TcpListener> {
    listen(addr, reuse_port).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need CAP_NET_BIND_SERVICE or the pod sysctl \
                 net.ipv4.ip_unprivileged_port_start=0)"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                " (the address is not on any interface; for 169.254.169.254 run \
                 `imds-broker init-network` first)"
            }
            std::io::ErrorKind::AddrInUse if reuse_port => {
                " (another process listens there without SO_REUSEPORT, or as another user)"
            }
            std::io::ErrorKind::AddrInUse => " (another process listens there)",
            _ => "",
        };
        anyhow::anyhow!("cannot bind the {what} listener on {addr}: {e}{hint}")
    })
}

/// The address a listener is bound to, for the start-up log line (port 0 shows the port the
/// system chose; people and test harnesses read it there). Empty if the socket cannot say.
pub fn bound_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// Accept-queue length. `TcpListener::bind` asks for 128: a burst of more new connections
/// than that (bench/RESULTS.md, cold path: 1,000 callers) overflowed it and the kernel dropped
/// SYNs, which clients retransmit only after 1 s. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 1024;

/// What `TcpListener::bind` does (SO_REUSEADDR, bind, listen), with [`LISTEN_BACKLOG`], and
/// SO_REUSEPORT if asked.
fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
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
    let Slots { permits, conns } = limits
        .shared_slots
        .clone()
        .unwrap_or_else(|| Slots::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    // No hyper timer: its `header_read_timeout` arms and cancels a timer for every request;
    // `HeadDeadline` enforces the limit instead.
    http.max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let head_limit = limits.header_read_timeout;
    let evictable_after = limits.evictable_after;
    let framing_error_body = limits.framing_error_body.clone();
    let local = listener.local_addr().ok();
    let outside_peer = limits.outside_peer.clone();

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
                    // Nothing evictable yet: look again when the idlest connection will be
                    // (or, if all are being answered, after `evictable_after`).
                    let retry = conns
                        .evict_idlest(evictable_after)
                        .unwrap_or_else(|| tokio::time::Instant::now() + evictable_after);
                    tokio::select! {
                        p = permits.clone().acquire_owned() => {
                            slot = p.ok();
                            break;
                        }
                        () = tokio::time::sleep_until(retry) => {}
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
        // Decided once per connection: its requests are all answered the same way.
        let refuse = outside_peer
            .as_ref()
            .filter(|_| !peers::from_inside(&stream, peer, local.map(|a| a.ip())))
            .cloned();
        let handler = handler.clone();
        let wrap = wrap.clone();
        let mut http = http.clone();
        if refuse.is_some() {
            // One answer, then the connection closes.
            http.keep_alive(false);
        }
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
                    let answer = match &refuse {
                        None => Ok(handler(req, peer)),
                        Some(refuse) => Err((refuse.0)(peer)),
                    };
                    async move {
                        let resp = match answer {
                            Ok(fut) => fut.await,
                            Err(refused) => refused,
                        };
                        state.deadline.answered();
                        Ok::<_, Infallible>(resp)
                    }
                })
            };
            let io = FramingErrors::new(io, framing_error_body.clone());
            let mut conn =
                std::pin::pin!(watcher.watch(http.serve_connection(TokioIo::new(io), service)));
            loop {
                tokio::select! {
                    biased;
                    ended = &mut conn => {
                        if let Err(e) = ended {
                            tracing::debug!(error = %e, %peer, "connection ended with an error");
                        }
                        break;
                    }
                    () = state.deadline.missed(head_limit) => {
                        tracing::debug!(%peer, limit = ?head_limit, "connection closed: no complete request head in time");
                        break;
                    }
                    () = state.evict.notified() => {
                        // A head may have completed since it was picked: that request is
                        // answered (the cap waits for the next idlest; shutdown for grace).
                        if state.deadline.idle_since().is_some() {
                            tracing::debug!(%peer, "idle connection closed to make room or to shut down");
                            break;
                        }
                    }
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
