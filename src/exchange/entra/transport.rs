//! The Entra client's HTTP transport: reqwest, reading every response only up to a bound.
//!
//! The bound must sit here. azure_core's `Pipeline::send` marks each request for buffering,
//! and its transport policy then reads the whole response into memory before any policy (or
//! the credential) sees it; a cap in a policy would only ever look at a body already read.
//! Entra's answers, success or error, are a few KiB.

use crate::capped_read::{self, ReadError};
use azure_core::error::{Error, ErrorKind};
use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::request::Body;
use azure_core::http::{AsyncRawResponse, HttpClient, Method, Request};
use std::collections::HashMap;

/// The largest Entra answer read; more is cut (an error page) or refused (a success).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Set on an error response whose body was cut at the bound (its value says how large the body
/// was), so that the exchanger reports the size and treats the answer as transient while still
/// reading its status and headers.
pub const TRUNCATED_HEADER: &str = "x-imds-broker-oversized-body";

#[derive(Debug)]
pub struct CappedTransport {
    http: reqwest::Client,
    cap: usize,
}

impl CappedTransport {
    pub fn new(http: reqwest::Client, cap: usize) -> Self {
        CappedTransport { http, cap }
    }
}

#[async_trait::async_trait]
impl HttpClient for CappedTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let mut req = self
            .http
            .request(method(request.method()), request.url().clone());
        for (name, value) in request.headers().iter() {
            req = req.header(name.as_str(), value.as_str());
        }
        req = match request.body() {
            Body::Bytes(bytes) => req.body(bytes.clone()),
            // The token request is a small form; nothing here streams a request body.
            Body::SeekableStream(_) => {
                return Err(Error::with_message(
                    ErrorKind::Other,
                    "the Entra transport sends no streamed request bodies",
                ))
            }
        };
        let resp = req.send().await.map_err(|e| {
            let kind = if e.is_connect() {
                ErrorKind::Connection
            } else {
                ErrorKind::Io
            };
            Error::with_error(kind, e, "the request to Entra failed")
        })?;
        let status = resp.status();
        let mut headers = headers_of(resp.headers());
        let body = match capped_read::body(resp, self.cap).await {
            Ok(body) => body,
            // An error answer keeps its status and Retry-After (a throttle stays a throttle);
            // its body is cut, which the header tells the exchanger.
            Err(ReadError::TooLarge { head, cap, .. }) if !status.is_success() => {
                let cut = format!("more than {cap} bytes (read up to the limit)");
                headers.insert(
                    HeaderName::from_static(TRUNCATED_HEADER),
                    HeaderValue::from(cut),
                );
                head
            }
            Err(ReadError::Declared { declared, cap, .. }) if !status.is_success() => {
                let cut =
                    format!("{declared} bytes (declared; over the {cap}-byte limit, not read)");
                headers.insert(
                    HeaderName::from_static(TRUNCATED_HEADER),
                    HeaderValue::from(cut),
                );
                bytes::Bytes::new()
            }
            Err(e) => {
                return Err(Error::with_error(
                    ErrorKind::Io,
                    e,
                    format!("HTTP {} from Entra", status.as_u16()),
                ))
            }
        };
        Ok(AsyncRawResponse::from_bytes(
            status.as_u16().into(),
            headers,
            body,
        ))
    }
}

fn method(m: Method) -> reqwest::Method {
    // Every method azure_core names is a valid token; GET would be a safe fallback anyway.
    reqwest::Method::from_bytes(m.as_str().as_bytes()).unwrap_or(reqwest::Method::GET)
}

/// reqwest's headers as azure_core's; a value that is not text is dropped (nothing Entra
/// sends that the exchange reads is binary).
fn headers_of(map: &reqwest::header::HeaderMap) -> Headers {
    map.iter()
        .filter_map(|(k, v)| {
            let v = v.to_str().ok()?;
            Some((
                HeaderName::from(k.as_str().to_owned()),
                HeaderValue::from(v.to_owned()),
            ))
        })
        .collect::<HashMap<_, _>>()
        .into()
}
