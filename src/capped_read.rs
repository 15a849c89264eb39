//! Reading an HTTP response body that a remote peer sizes (Entra, its discovery document, the
//! API server) into memory, only up to a bound. Past the bound reading stops and the response
//! is dropped, which closes the connection instead of draining the rest into the pool.

use bytes::{Bytes, BytesMut};

/// Why a body was not read whole.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer declared more than the bound; nothing was read.
    #[error("{what} declares {declared} bytes (Content-Length), over the {cap}-byte limit: not read, connection dropped")]
    Declared {
        what: String,
        declared: u64,
        cap: usize,
    },
    /// The body grew past the bound while being read (chunked or lying about its length).
    #[error(
        "{what} is larger than the {cap}-byte limit: reading stopped there, connection dropped"
    )]
    TooLarge {
        what: String,
        cap: usize,
        /// The first `cap` bytes, for callers that can still use a cut body (an error page's
        /// status and headers matter more than its end).
        head: Bytes,
    },
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: reqwest::Error,
    },
}

/// What a body is, for messages: the URL without its query (which may carry parameters that
/// are nobody's business in a log line).
pub fn describe(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    format!("the answer of {shown}")
}

/// The whole body of `resp` if it is at most `cap` bytes.
pub async fn body(mut resp: reqwest::Response, cap: usize) -> Result<Bytes, ReadError> {
    let what = describe(resp.url());
    if let Some(declared) = resp.content_length() {
        if declared > cap as u64 {
            return Err(ReadError::Declared {
                what,
                declared,
                cap,
            });
        }
    }
    let mut buf = BytesMut::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ok(buf.freeze()),
            Err(source) => return Err(ReadError::Read { what, source }),
        };
        let room = cap - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return Err(ReadError::TooLarge {
                what,
                cap,
                head: buf.freeze(),
            });
        }
        buf.extend_from_slice(&chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP/1.1 server on 127.0.0.1 that answers `head` and then `body_len` bytes
    /// in 16-KiB writes; returns its URL and a handle resolving to the bytes it got written
    /// before the client went away.
    async fn server(head: String, body_len: usize) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/doc?secret=1", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b'x'; 16 * 1024];
            let mut sent = 0;
            while sent < body_len {
                let n = chunk.len().min(body_len - sent);
                if s.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                sent += n;
            }
            sent
        });
        (url, task)
    }

    async fn get(url: &str) -> reqwest::Response {
        crate::crypto::install_default();
        reqwest::get(url).await.unwrap()
    }

    #[tokio::test]
    async fn a_small_body_is_read_whole() {
        let (url, _task) = server("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".into(), 5).await;
        let resp = get(&url).await;
        assert_eq!(&body(resp, 5).await.unwrap()[..], b"xxxxx");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_cap_is_not_read() {
        let big = 50_000_000;
        let (url, task) = server(
            format!("HTTP/1.1 500 Oops\r\nContent-Length: {big}\r\n\r\n"),
            big,
        )
        .await;
        let resp = get(&url).await;
        let err = body(resp, 64 * 1024).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ReadError::Declared { declared, .. } if declared == big as u64));
        assert!(msg.contains("50000000") && msg.contains("65536"), "{msg}");
        assert!(!msg.contains("secret"), "no query in messages: {msg}");
        // The connection was dropped: the server could not write anywhere near it all.
        // Kernel buffers on loopback hold a few MB at most.
        assert!(task.await.unwrap() < big / 4);
    }

    #[tokio::test]
    async fn a_chunked_body_is_cut_at_the_cap() {
        // A chunked answer of 50 MB: one chunk-size line for the whole body, which the client
        // reads in pieces as they come.
        let big = 50_000_000;
        let (url, task) = server(
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{big:x}\r\n"),
            big,
        )
        .await;
        let resp = get(&url).await;
        match body(resp, 64 * 1024).await.unwrap_err() {
            ReadError::TooLarge { head, cap, .. } => {
                assert_eq!(cap, 64 * 1024);
                assert_eq!(head.len(), cap);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Kernel buffers on loopback hold a few MB at most.
        assert!(task.await.unwrap() < big / 4);
    }
}
