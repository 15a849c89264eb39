//! hyper answers a request it cannot parse (a garbled request line or header, a head over the
//! buffer cap) itself, with a bare `400`/`431`/`414`/`505` and an empty body, before any
//! handler runs. SDK clients expect a JSON error body from every answer, and the answer should
//! be counted like any other. This wraps a connection's IO: when hyper writes such a head, a
//! complete response with the body the server's [`FramingErrorBody`] renders goes out instead.
//!
//! The server's own answers always carry a body, so a head with `content-length: 0` and one of
//! these statuses can only be hyper's.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Renders the JSON body for a framing error's status (and counts it).
#[derive(Clone)]
pub struct FramingErrorBody(pub Arc<dyn Fn(u16) -> String + Send + Sync>);

impl std::fmt::Debug for FramingErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FramingErrorBody")
    }
}

/// The statuses hyper's HTTP/1 server answers parse errors with.
const FRAMING_STATUSES: [u16; 4] = [400, 414, 431, 505];

pub struct FramingErrors<IO> {
    inner: IO,
    render: Option<FramingErrorBody>,
    /// A replacement being written, and how many bytes of hyper's head it stands for.
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<IO> FramingErrors<IO> {
    pub fn new(inner: IO, render: Option<FramingErrorBody>) -> Self {
        FramingErrors {
            inner,
            render,
            pending: None,
        }
    }
}

/// The status of a bodiless error head written by hyper, if `head` is one.
fn framing_status(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.1 ")?;
    let status: u16 = std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()?;
    let is_bare = head.ends_with(b"\r\n\r\n")
        && head
            .windows(b"\r\ncontent-length: 0\r\n".len())
            .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0\r\n"));
    (FRAMING_STATUSES.contains(&status) && is_bare).then_some(status)
}

fn response(status: u16, body: &str) -> Vec<u8> {
    let reason = hyper::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl<IO: AsyncWrite + Unpin> FramingErrors<IO> {
    /// Writes what remains of a replacement; `Ready(Some(n))` with the length it stands for
    /// once it is all out, `Ready(None)` when there is none.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Option<usize>>> {
        while let Some((bytes, written, stands_for)) = &mut self.pending {
            if *written == bytes.len() {
                let n = *stands_for;
                self.pending = None;
                return Poll::Ready(Ok(Some(n)));
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(None))
    }

    /// Starts a replacement if `head` is a framing error and a renderer is set.
    fn intercept(&mut self, head: &[u8], total: usize) -> bool {
        if self.pending.is_some() {
            return true;
        }
        let (Some(render), Some(status)) = (&self.render, framing_status(head)) else {
            return false;
        };
        self.pending = Some((response(status, &(render.0)(status)), 0, total));
        true
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FramingErrors<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingErrors<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.intercept(buf, buf.len()) {
            return this.drain(cx).map_ok(|n| n.unwrap_or(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let total = bufs.iter().map(|b| b.len()).sum();
        // hyper queues the head as one slice; a bare error head has nothing after it.
        let head = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if this.intercept(head, total) {
            return this.drain(cx).map_ok(|n| n.unwrap_or(total));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_error_heads_are_framing_errors() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(framing_status(bare), Some(431));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 52\r\n\r\n";
        assert_eq!(framing_status(ours), None);
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(framing_status(ok), None);
    }

    #[tokio::test]
    async fn a_bare_error_head_goes_out_with_a_json_body() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(64);
        let render = FramingErrorBody(Arc::new(|s| format!("{{\"error\":\"e{s}\"}}")));
        let mut io = FramingErrors::new(server, Some(render));
        let head = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let writer = tokio::spawn(async move {
            // A 64-byte pipe forces partial writes of the replacement.
            let n = io.write(head).await.unwrap();
            io.shutdown().await.unwrap();
            n
        });
        let mut got = String::new();
        let mut client = client;
        client.read_to_string(&mut got).await.unwrap();
        assert_eq!(writer.await.unwrap(), head.len());
        assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got}");
        assert!(got.contains("content-type: application/json"), "{got}");
        assert!(got.ends_with("\r\n\r\n{\"error\":\"e400\"}"), "{got}");
    }
}
