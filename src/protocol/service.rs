//! The token listener's request handling: routes a request to its protocol's checks, answers
//! a cached token at once, and waits for the broker only on a cache miss.

use super::body::token_body;
use super::checks::{require_get, Lookup};
use super::error::{excerpt, ApiError};
use super::refusals::RefusalLog;
use super::{app_service, imds, APP_SERVICE_TOKEN_PATH, IMDS_TOKEN_PATH};
use crate::broker::{Broker, Token};
use crate::listener::{json_response, Body, FramingErrorBody, Shutdown};
use crate::metrics::{Endpoint, Metrics};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Routes token-listener requests to the protocol adapters.
pub struct TokenService {
    pub broker: Arc<Broker>,
    pub metrics: Arc<Metrics>,
    /// Enables the App Service endpoint.
    pub identity_header: Option<app_service::IdentityHeader>,
    /// Longest wait for a token; the broker holds a waiting caller at most this long.
    pub request_timeout: Duration,
    pub refusals: RefusalLog,
    /// Fires shortly before the shutdown grace period ends: callers still waiting for Entra
    /// are answered 503 then, rather than dropped unanswered when the process exits.
    pub grace_over: Shutdown,
}

/// The answer to one request: ready at once (a cached token, or a refused request), or a
/// boxed wait for an exchange. Only a cache miss allocates a future, so the hot path has no
/// async state to move around (bench/RESULTS.md).
pub enum Answer {
    Ready(Ready<Response<Body>>),
    Waiting(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
}

impl Future for Answer {
    type Output = Response<Body>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        match self.get_mut() {
            Answer::Ready(resp) => Pin::new(resp).poll(cx),
            Answer::Waiting(fut) => fut.as_mut().poll(cx),
        }
    }
}

/// Method and path of a request, kept only when debug logging is on.
type Logged = Option<(Method, String)>;

impl TokenService {
    /// Answers one token-listener request.
    ///
    /// The request is checked, and dropped, before this returns: a request still alive while
    /// hyper reads ahead on the connection made that read allocate a new buffer for every
    /// request (bench/RESULTS.md).
    pub fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Answer {
        let (endpoint, checked) = self.check(&req);
        let logged = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        drop(req);
        let now = |resp| Answer::Ready(ready(self.finish(endpoint, resp, logged.clone())));
        let lookup = match checked {
            Ok(lookup) => lookup,
            Err(e) => return now(self.refuse(endpoint, &e)),
        };
        match self.cached(&lookup) {
            Ok(Some(body)) => now(token_response(body)),
            Err(e) => now(self.refuse(endpoint, &e)),
            Ok(None) => {
                let svc = self.clone();
                Answer::Waiting(Box::pin(async move {
                    let limit = svc.request_timeout;
                    // The broker answers by the deadline itself; this only bounds an exchange
                    // that is still running then.
                    let backstop = limit + Duration::from_secs(1);
                    let mut grace_over = svc.grace_over.clone();
                    let resp = tokio::select! {
                        r = tokio::time::timeout(backstop, svc.fetch(&lookup)) => match r {
                            Ok(Ok(body)) => token_response(body),
                            Ok(Err(e)) => svc.refuse(endpoint, &e),
                            Err(_) => svc.refuse(endpoint, &ApiError::timeout(limit)),
                        },
                        () = grace_over.wait() => svc.refuse(endpoint, &ApiError::shutting_down()),
                    };
                    svc.finish(endpoint, resp, logged)
                }))
            }
        }
    }

    /// Answers `req` with the error `e` in its endpoint's format, logged (rate-limited) and
    /// counted like the protocol's own refusals: for checks made in front of the protocol
    /// adapters (`node`'s caller attestation).
    pub fn refuse_request(&self, req: Request<Incoming>, e: &ApiError) -> Answer {
        let endpoint = endpoint_of(req.uri().path());
        let logged = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        drop(req);
        Answer::Ready(ready(self.finish(
            endpoint,
            self.refuse(endpoint, e),
            logged,
        )))
    }

    /// The error answer, logged (rate-limited) with its reason.
    fn refuse(&self, endpoint: Endpoint, e: &ApiError) -> Response<Body> {
        self.refusals.refused(endpoint, e);
        error_response(endpoint, e)
    }

    /// Counts an answer, and logs it at debug level.
    fn finish(&self, endpoint: Endpoint, resp: Response<Body>, logged: Logged) -> Response<Body> {
        self.metrics.request(endpoint, resp.status().as_u16());
        if let Some((method, path)) = logged {
            tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
        }
        resp
    }

    /// Routes by path and runs the protocol's own checks.
    fn check(&self, req: &Request<Incoming>) -> (Endpoint, Result<Lookup, ApiError>) {
        let endpoint = endpoint_of(req.uri().path());
        let checked = match endpoint {
            Endpoint::imds => imds::check(req),
            Endpoint::app_service => match &self.identity_header {
                Some(secret) => app_service::check(secret, req),
                None => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "the App Service endpoint is disabled: start imds-broker with \
                     --identity-header / IDENTITY_HEADER",
                )),
            },
            Endpoint::other => Err(not_served(req)),
        };
        (endpoint, checked)
    }

    /// The hot path, shared by both protocols once their own checks passed: a cached token's
    /// body; `None` when the caller has to wait for an exchange.
    fn cached(&self, lookup: &Lookup) -> Result<Option<Bytes>, ApiError> {
        let (resource, selector) = lookup.target()?;
        let token = self.broker.cached_token(&selector, resource)?;
        Ok(token.map(|t| self.body(&t, resource)))
    }

    /// The slow path: the broker's exchange (or a wait for one already running).
    async fn fetch(&self, lookup: &Lookup) -> Result<Bytes, ApiError> {
        let (resource, selector) = lookup.target()?;
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let token = self.broker.token(&selector, resource, deadline).await?;
        Ok(self.body(&token, resource))
    }

    /// Each caller gets its own spelling of the resource back.
    fn body(&self, token: &Arc<Token>, resource: &str) -> Bytes {
        token_body(token, resource, &self.broker.identity().client_id)
    }
}

/// The endpoint a request path is for (`other` for every path but the two token paths).
pub fn endpoint_of(path: &str) -> Endpoint {
    match token_path(path) {
        IMDS_TOKEN_PATH => Endpoint::imds,
        APP_SERVICE_TOKEN_PATH => Endpoint::app_service,
        _ => Endpoint::other,
    }
}

/// An error in the format of the endpoint's protocol (IMDS's for unknown paths).
pub fn error_response(endpoint: Endpoint, e: &ApiError) -> Response<Body> {
    match endpoint {
        Endpoint::app_service => app_service::error_response(e),
        Endpoint::imds | Endpoint::other => imds::error_response(e),
    }
}

/// The answer to a request hyper could not parse: IMDS's error JSON (the path is unknown),
/// counted under endpoint `other`.
pub fn framing_errors(metrics: Arc<Metrics>, max_head_bytes: usize) -> FramingErrorBody {
    FramingErrorBody(Arc::new(move |status| {
        metrics.request(Endpoint::other, status);
        let description = match status {
            431 => format!(
                "the request head is larger than {} KiB",
                max_head_bytes / 1024
            ),
            414 => "the request URI is too long".to_owned(),
            505 => "HTTP version not supported: use HTTP/1.1".to_owned(),
            _ => "the request is not valid HTTP/1.1 (malformed request line or header)".to_owned(),
        };
        serde_json::json!({"error": "invalid_request", "error_description": description})
            .to_string()
    }))
}

/// The request path with one trailing slash removed, for matching the token endpoints.
///
/// msal-node (under @azure/identity 4.x) builds its IMDS URL from
/// `AZURE_POD_IDENTITY_AUTHORITY_HOST` through msal-common's `UrlString`, which canonicalises
/// every URL with a trailing slash: it asks for `/metadata/identity/oauth2/token/`. Without
/// this, Node clients got a 404, which they retry five times with backoff (~20 s per call)
/// before failing. Found by tests/conformance (client-compatibility.md, "surprises").
pub fn token_path(path: &str) -> &str {
    match path.strip_suffix('/') {
        Some(p) if p == IMDS_TOKEN_PATH || p == APP_SERVICE_TOKEN_PATH => p,
        _ => path,
    }
}

/// Anything else — notably instance metadata — is refused with JSON, so nothing about the
/// node leaks and SDK probes still get a parseable answer.
fn not_served(req: &Request<Incoming>) -> ApiError {
    if let Err(e) = require_get(req) {
        return e;
    }
    // A path's worth of context: more than a parameter's (ECHO_CHARS), still bounded.
    let path = excerpt(req.uri().path(), 200);
    let description = if path.starts_with("/metadata/") {
        format!(
            "{path} is not served by imds-broker: only the managed-identity token endpoint \
             {IMDS_TOKEN_PATH} is (instance metadata is deliberately not exposed)"
        )
    } else {
        format!(
            "{path} is not served by imds-broker: token endpoints are {IMDS_TOKEN_PATH} \
             (IMDS) and {APP_SERVICE_TOKEN_PATH} (App Service)"
        )
    };
    ApiError::new(StatusCode::NOT_FOUND, "not_found", description)
}

/// A JSON body for a successful token answer.
pub fn token_response(body: Bytes) -> Response<Body> {
    json_response(StatusCode::OK, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_paths_accept_one_trailing_slash() {
        assert_eq!(
            token_path("/metadata/identity/oauth2/token/"),
            IMDS_TOKEN_PATH
        );
        assert_eq!(
            token_path("/metadata/identity/oauth2/token"),
            IMDS_TOKEN_PATH
        );
        assert_eq!(token_path("/msi/token/"), APP_SERVICE_TOKEN_PATH);
        // Only the token endpoints, and only one slash.
        assert_eq!(token_path("/metadata/instance/"), "/metadata/instance/");
        assert_eq!(
            token_path("/metadata/identity/oauth2/token//"),
            "/metadata/identity/oauth2/token//"
        );
    }
}
