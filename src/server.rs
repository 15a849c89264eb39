//! HTTP/1.1 listeners shared by the token, admin and webhook servers: connection limits,
//! header-size and header-read timeouts, keep-alive, and graceful shutdown.
//!
//! The server knows nothing about tokens; it hands each request to a handler closure.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub type Body = Full<Bytes>;

/// Limits that stop a slow or huge request from pinning the process.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent connections; further connections wait in the kernel backlog.
    pub max_connections: usize,
    /// Time to receive a complete request head (slowloris guard; also the idle keep-alive limit).
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
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
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
            let service = service_fn(move |req| {
                let fut = handler(req, peer);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let conn = watcher.watch(http.serve_connection(TokioIo::new(io), service));
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
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
