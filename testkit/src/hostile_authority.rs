//! A hostile (or broken) authority: an HTTPS server on 127.0.0.1 that answers every request
//! with one scripted answer — huge bodies with `Content-Length` or chunked, sent at once or
//! slowly, redirects, odd JSON — and counts what it managed to write, so a test can tell that
//! the client stopped reading. Unlike [`crate::fake_entra`], it speaks raw HTTP/1.1 so the
//! answer can be anything, and every answer closes its connection.

use crate::pki::TestPki;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

/// Size of each body write (and the unit of pacing).
pub const CHUNK: usize = 16 * 1024;

/// What every request gets.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    /// Extra header lines, e.g. `("Retry-After", "7")` or `("Location", url)`.
    pub headers: Vec<(String, String)>,
    /// The body starts with these bytes …
    pub prefix: Vec<u8>,
    /// … and is padded with `x` up to this length (at least the prefix).
    pub len: usize,
    /// `Transfer-Encoding: chunked` (one chunk of `len` bytes) instead of `Content-Length`.
    pub chunked: bool,
    /// Pause between body writes of [`CHUNK`] bytes; `None` writes as fast as the peer reads.
    pub pace: Option<Duration>,
}

impl Answer {
    /// A small JSON answer.
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        let prefix = body.to_string().into_bytes();
        Answer {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            len: prefix.len(),
            prefix,
            chunked: false,
            pace: None,
        }
    }

    /// `len` bytes of filler (a proxy's error page, a hostile endpoint).
    pub fn huge(status: u16, len: usize) -> Self {
        Answer {
            status,
            headers: vec![("Content-Type".into(), "text/html".into())],
            prefix: Vec::new(),
            len,
            chunked: false,
            pace: None,
        }
    }

    /// A redirect to `location` with an empty body.
    pub fn redirect(status: u16, location: &str) -> Self {
        Answer {
            status,
            headers: vec![("Location".into(), location.into())],
            prefix: Vec::new(),
            len: 0,
            chunked: false,
            pace: None,
        }
    }

    pub fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }

    pub fn paced(mut self, pause: Duration) -> Self {
        self.pace = Some(pause);
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

struct Shared {
    /// Request n gets answer n modulo the length.
    answers: Mutex<Vec<Answer>>,
    received: Mutex<Vec<Received>>,
    body_bytes_written: AtomicUsize,
}

pub struct HostileAuthority {
    shared: Arc<Shared>,
    port: u16,
    pki: Option<TestPki>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HostileAuthority {
    /// HTTPS on an ephemeral port of 127.0.0.1 (trust it with [`Self::ca_file`]).
    pub fn start(answer: Answer) -> Self {
        Self::start_with(vec![answer], Some(TestPki::new()))
    }

    /// HTTPS, answering the requests with `answers` in turn (then again from the first).
    pub fn start_cycling(answers: Vec<Answer>) -> Self {
        assert!(!answers.is_empty(), "hostile authority: no answer to give");
        Self::start_with(answers, Some(TestPki::new()))
    }

    /// Plain HTTP: a sink that records what reaches it (e.g. where a redirect points).
    pub fn start_plain(answer: Answer) -> Self {
        Self::start_with(vec![answer], None)
    }

    fn start_with(answers: Vec<Answer>, pki: Option<TestPki>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hostile-authority")
            .enable_all()
            .build()
            .expect("hostile authority: runtime");
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("hostile authority: bind");
        std_listener.set_nonblocking(true).expect("non-blocking");
        let port = std_listener.local_addr().expect("address").port();
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener).expect("register listener")
        };
        let shared = Arc::new(Shared {
            answers: Mutex::new(answers),
            received: Mutex::new(Vec::new()),
            body_bytes_written: AtomicUsize::new(0),
        });
        let acceptor = pki.as_ref().map(|p| TlsAcceptor::from(p.server_config()));
        runtime.spawn(accept_loop(listener, acceptor, shared.clone()));
        HostileAuthority {
            shared,
            port,
            pki,
            runtime: Some(runtime),
        }
    }

    /// `https://localhost:PORT` (or `http://127.0.0.1:PORT` for a plain sink).
    pub fn url(&self) -> String {
        match self.pki {
            Some(_) => format!("https://localhost:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    pub fn ca_file(&self) -> &std::path::Path {
        self.pki.as_ref().expect("a plain sink has no CA").ca_file()
    }

    pub fn set_answer(&self, answer: Answer) {
        *self.shared.answers.lock().unwrap() = vec![answer];
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Body bytes the peer (and the kernel's buffers) took, over all connections.
    pub fn body_bytes_written(&self) -> usize {
        self.shared.body_bytes_written.load(Ordering::SeqCst)
    }
}

impl Drop for HostileAuthority {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            match acceptor {
                Some(a) => {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(5), a.accept(tcp)).await
                    {
                        serve(tls, &shared).await;
                    }
                }
                None => serve(tcp, &shared).await,
            }
        });
    }
}

/// Reads one request (head, then a body of `Content-Length` up to 1 MiB) and writes the answer.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, shared: &Shared) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&byte[..n]),
            _ => return,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or_default().to_owned();
    let path = words.next().unwrap_or_default().to_owned();
    let declared = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0)
        .min(1 << 20);
    let mut body = buf[head_end..].to_vec();
    while body.len() < declared {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(n)) if n > 0 => body.extend_from_slice(&byte[..n]),
            _ => break,
        }
    }
    let n = {
        let mut received = shared.received.lock().unwrap();
        received.push(Received { method, path, body });
        received.len() - 1
    };
    let answer = {
        let answers = shared.answers.lock().unwrap();
        answers[n % answers.len()].clone()
    };
    let _ = write_answer(&mut s, &answer, shared).await;
}

async fn write_answer<S: AsyncWrite + Unpin>(
    s: &mut S,
    a: &Answer,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} Scripted\r\nConnection: close\r\n", a.status);
    for (k, v) in &a.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let len = a.len.max(a.prefix.len());
    if a.chunked {
        head.push_str(&format!("Transfer-Encoding: chunked\r\n\r\n{len:x}\r\n"));
    } else {
        head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
    }
    s.write_all(head.as_bytes()).await?;
    let filler = vec![b'x'; CHUNK];
    let mut sent = 0;
    while sent < len {
        let piece: &[u8] = if sent < a.prefix.len() {
            &a.prefix[sent..a.prefix.len().min(sent + CHUNK)]
        } else {
            &filler[..CHUNK.min(len - sent)]
        };
        s.write_all(piece).await?;
        s.flush().await?;
        sent += piece.len();
        shared
            .body_bytes_written
            .fetch_add(piece.len(), Ordering::SeqCst);
        if let Some(pause) = a.pace {
            tokio::time::sleep(pause).await;
        }
    }
    if a.chunked {
        s.write_all(b"\r\n0\r\n\r\n").await?;
    }
    s.flush().await?;
    s.shutdown().await
}
