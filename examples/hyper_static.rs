//! The smallest hyper 1 + Tokio server: answers every request with one fixed body. A benchmark
//! reference (`bench/bench.py`), not part of the broker: it shows what the HTTP stack the
//! broker is built on costs by itself, next to nginx, so a gap between the broker and nginx
//! can be split into "the stack" and "the broker's own work".
//!
//! Usage: `hyper_static --port N --body FILE` (prints `ready` on stdout once listening).

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut port = 0u16;
    let mut body = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().ok_or("--port needs a value")?.parse()?,
            "--body" => body = Some(std::fs::read(args.next().ok_or("--body needs a file")?)?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let body = Bytes::from(body.ok_or("--body FILE is required")?);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("ready");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                let mut resp = Response::new(Full::new(body.clone()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json; charset=utf-8"),
                );
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
