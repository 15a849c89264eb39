//! Protocol adapters: translate the IMDS and App Service managed-identity wire formats to
//! broker calls and back. They know nothing of Entra.
//!
//! Rules that please every Azure SDK client (see README "Client compatibility"): every number
//! is a digit string, never empty; `error` + `error_description` on every error; a JSON body
//! even for "not found"; `Retry-After` only on 429/503, never on a 200.

pub mod app_service;
pub mod imds;

use crate::assertion::now_unix;
use crate::broker::{Broker, BrokerError, Selector};
use crate::exchange::Token;
use crate::metrics::{Endpoint, Metrics};
use crate::server::{json_response, Body};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::borrow::Cow;
use std::cell::RefCell;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub const IMDS_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
pub const APP_SERVICE_TOKEN_PATH: &str = "/msi/token";

/// A query parameter that selects an identity, and how it names it.
pub type SelectorParam = (&'static str, fn(String) -> Selector);

/// A protocol-level error: HTTP status, OAuth-style code, description, optional Retry-After.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub description: String,
    pub retry_after: Option<Duration>,
    /// IMDS lists supported versions on api-version errors.
    pub newest_versions: Option<&'static [&'static str]>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            description: description.into(),
            retry_after: None,
            newest_versions: None,
        }
    }

    pub fn bad_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// No token within the request timeout.
    pub fn timeout(limit: Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "no token within {}s; Entra ID is slow or unreachable",
                limit.as_secs()
            ),
        )
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let description = e.to_string();
        let retry_after = e.retry_after();
        let (status, code) = match &e {
            // IMDS's own answer for an identity that is not assigned.
            BrokerError::IdentityNotFound(..) => (StatusCode::BAD_REQUEST, "invalid_request"),
            BrokerError::ResourceRefused { .. } => (StatusCode::FORBIDDEN, "access_denied"),
            BrokerError::TooManyResources(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_resources")
            }
            BrokerError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            BrokerError::BadAssertion(_) => (StatusCode::UNAUTHORIZED, "invalid_assertion"),
            // A 4xx that no client retries: the fix is in configuration, and the message says it.
            BrokerError::EntraRefused { .. } => (StatusCode::UNAUTHORIZED, "unauthorized_client"),
            BrokerError::EntraUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable")
            }
        };
        ApiError {
            status,
            code,
            description,
            retry_after,
            newest_versions: None,
        }
    }
}

/// Query parameters, with duplicates rejected (IMDS does; a duplicate is ambiguous).
///
/// SDK clients send the same query string with every request, so each worker thread keeps
/// the last one it parsed: a repeat costs a string compare and a reference count, where
/// splitting and percent-decoding it again cost ~1,800 instructions (bench/RESULTS.md).
#[derive(Clone)]
pub struct Query(Arc<[(Box<str>, Box<str>)]>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Query, ApiError> {
        thread_local! {
            static LAST: RefCell<Option<(Box<str>, Query)>> = const { RefCell::new(None) };
        }
        let raw = raw.unwrap_or("");
        let seen = LAST.with(|last| {
            let last = last.borrow();
            last.as_ref()
                .filter(|(r, _)| **r == *raw)
                .map(|(_, q)| q.clone())
        });
        if let Some(query) = seen {
            return Ok(query);
        }
        let query = Self::parse_uncached(raw)?;
        LAST.with(|last| *last.borrow_mut() = Some((raw.into(), query.clone())));
        Ok(query)
    }

    fn parse_uncached(raw: &str) -> Result<Query, ApiError> {
        let mut pairs: Vec<(Box<str>, Box<str>)> = Vec::with_capacity(4);
        // Split as `form_urlencoded::parse` does: on '&', skipping empty pieces, name and
        // value at the first '='.
        for piece in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            let (k, v) = (form_decode(k), form_decode(v));
            if pairs.iter().any(|(seen, _)| seen.eq_ignore_ascii_case(&k)) {
                return Err(ApiError::bad_request(format!(
                    "Duplicate query parameter '{k}': each parameter may appear once"
                )));
            }
            pairs.push((k.into(), v.into()));
        }
        Ok(Query(pairs.into()))
    }

    /// Parameter names are matched case-insensitively, as IMDS does.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }

    /// The identity selector among `names` (each paired with its meaning). More than one
    /// non-empty selector is ambiguous; an empty `client_id=` means the default identity.
    pub fn selector(&self, names: &[SelectorParam]) -> Result<Selector, ApiError> {
        let mut found: Option<(&str, Selector)> = None;
        for (name, make) in names {
            if let Some(v) = self.get(name).map(str::trim).filter(|v| !v.is_empty()) {
                if let Some((other, _)) = &found {
                    return Err(ApiError::bad_request(format!(
                        "Multiple identity selectors ('{other}' and '{name}'): give at most one"
                    )));
                }
                found = Some((name, make(v.to_owned())));
            }
        }
        Ok(found.map_or(Selector::Default, |(_, s)| s))
    }

    pub fn resource(&self) -> Result<&str, ApiError> {
        match self.get("resource").map(str::trim) {
            Some(r) if !r.is_empty() => Ok(r),
            _ => Err(ApiError::bad_request(
                "Required query variable 'resource' is missing",
            )),
        }
    }
}

/// Decodes one `application/x-www-form-urlencoded` name or value exactly as
/// `form_urlencoded::parse` does ('+' is a space, `%XX` a byte, a malformed escape stays as
/// is, invalid UTF-8 becomes U+FFFD), but borrows when there is nothing to decode. Hand-rolled
/// because the crate's parser was 17% of the hot path's instructions (bench/RESULTS.md); the
/// tests check it against the crate.
fn form_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

/// Appends `n` in decimal (through `core::fmt` the four numbers of a token answer cost more
/// than a thousand instructions).
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or("0"));
}

/// Fields of a successful token response, rendered by each protocol.
pub struct TokenView<'a> {
    pub token: &'a Token,
    pub resource: &'a str,
    pub client_id: &'a str,
}

impl TokenView<'_> {
    /// Renders the JSON object as of `now` (Unix seconds); all values are strings.
    /// Hand-built because this is the hot path and the field set is fixed; values that need
    /// it are escaped by serde_json.
    fn render_at(&self, now: u64) -> String {
        let expires_in = self.token.expires_on.saturating_sub(now).max(1);
        let mut out = String::with_capacity(self.token.access_token.len() + 320);
        // Numbers go straight into `out`: no temporary Strings, no `core::fmt` (hot path).
        out.push_str("{\"access_token\":");
        push_json_str(&mut out, &self.token.access_token);
        out.push_str(",\"client_id\":");
        push_json_str(&mut out, self.client_id);
        out.push_str(",\"expires_in\":\"");
        push_u64(&mut out, expires_in);
        out.push_str("\",\"expires_on\":\"");
        push_u64(&mut out, self.token.expires_on);
        out.push_str("\",\"ext_expires_in\":\"");
        push_u64(&mut out, expires_in);
        out.push_str("\",\"not_before\":\"");
        push_u64(&mut out, self.token.not_before);
        out.push_str("\",\"refresh_token\":\"\",\"resource\":");
        push_json_str(&mut out, self.resource);
        out.push_str(",\"token_type\":\"Bearer\"}");
        out
    }
}

/// The body of a token answer as [`TokenView::render_at`] writes it, reused while nothing in it
/// changes. Each worker thread keeps its last body with the token, resource, client ID and
/// second it was rendered for (`expires_in` counts whole seconds): a repeat answer costs a
/// reference-count increment instead of rendering and allocating 1-2 KB (the largest cost
/// left on the hot path, bench/RESULTS.md). Holding the `Arc<Token>` keeps the identity
/// check sound: a token's address cannot be reused while it is cached.
pub fn token_body(token: &Arc<Token>, resource: &str, client_id: &str) -> Bytes {
    struct Rendered {
        token: Arc<Token>,
        resource: String,
        client_id: String,
        now: u64,
        body: Bytes,
    }
    thread_local! {
        static LAST: RefCell<Option<Rendered>> = const { RefCell::new(None) };
    }
    let now = now_unix();
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some(r) = last.as_ref().filter(|r| {
            r.now == now
                && Arc::ptr_eq(&r.token, token)
                && r.resource == resource
                && r.client_id == client_id
        }) {
            return r.body.clone();
        }
        let body = Bytes::from(
            TokenView {
                token,
                resource,
                client_id,
            }
            .render_at(now),
        );
        *last = Some(Rendered {
            token: token.clone(),
            resource: resource.to_owned(),
            client_id: client_id.to_owned(),
            now,
            body: body.clone(),
        });
        body
    })
}

fn push_json_str(out: &mut String, s: &str) {
    // Tokens and GUIDs need no escaping; anything else goes through serde_json.
    // A branch-free fold rather than `all()`: without the early exit the compiler vectorises
    // it. As a byte-at-a-time loop over the ~1 KB token it was 6% of the hot path's CPU.
    if s.bytes().fold(true, |ok, b| {
        ok & b.is_ascii_graphic() & (b != b'"') & (b != b'\\')
    }) {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::from(s).to_string());
    }
}

/// Adds `Retry-After` (whole seconds, at least 1) to an error response.
pub fn with_retry_after(mut resp: Response<Body>, wait: Option<Duration>) -> Response<Body> {
    if let Some(wait) = wait {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        if let Ok(v) = hyper::header::HeaderValue::from_str(&secs.max(1).to_string()) {
            resp.headers_mut().insert(hyper::header::RETRY_AFTER, v);
        }
    }
    resp
}

/// Routes token-listener requests to the protocol adapters.
pub struct TokenService {
    pub broker: Arc<Broker>,
    pub metrics: Arc<Metrics>,
    /// Enables the App Service endpoint.
    pub identity_header: Option<app_service::IdentityHeader>,
    /// Longest wait for a token before answering 504.
    pub request_timeout: Duration,
}

/// A token request that passed its protocol's checks: what remains is the broker lookup.
pub struct Lookup {
    pub query: Query,
    /// The query parameters that select an identity in this protocol.
    pub selectors: &'static [SelectorParam],
}

impl Lookup {
    /// The resource and the identity selector asked for.
    fn target(&self) -> Result<(&str, Selector), ApiError> {
        Ok((self.query.resource()?, self.query.selector(self.selectors)?))
    }
}

/// The answer to one token-listener request: ready at once (a cached token, or a refused
/// request), or a boxed wait for an exchange. Only a cache miss allocates a future, so the hot
/// path has no async state: hyper and Tokio move a request's future several times, and as
/// one `async` block it was over a kilobyte (~700 instructions of copying per request,
/// bench/RESULTS.md).
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
    /// The request is checked, and dropped, before this returns. hyper reads ahead on a
    /// keep-alive connection while an answer is pending, and a request still alive then (it
    /// holds its slice of the connection's read buffer) made that read allocate a new buffer
    /// for every request (bench/RESULTS.md).
    pub fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Answer {
        let (endpoint, checked) = self.check(&req);
        let logged = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        drop(req);
        let now = |resp| Answer::Ready(ready(self.finish(endpoint, resp, logged.clone())));
        let lookup = match checked {
            Ok(lookup) => lookup,
            Err(e) => return now(error_response(endpoint, &e)),
        };
        match self.cached(&lookup) {
            Ok(Some(body)) => now(token_response(body)),
            Err(e) => now(error_response(endpoint, &e)),
            Ok(None) => {
                let svc = self.clone();
                Answer::Waiting(Box::pin(async move {
                    let limit = svc.request_timeout;
                    let resp = match tokio::time::timeout(limit, svc.fetch(&lookup)).await {
                        Ok(Ok(body)) => token_response(body),
                        Ok(Err(e)) => error_response(endpoint, &e),
                        Err(_) => error_response(endpoint, &ApiError::timeout(limit)),
                    };
                    svc.finish(endpoint, resp, logged)
                }))
            }
        }
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
        let path = token_path(req.uri().path());
        if path == IMDS_TOKEN_PATH {
            (Endpoint::imds, imds::check(req))
        } else if path == APP_SERVICE_TOKEN_PATH {
            let checked = match &self.identity_header {
                Some(secret) => app_service::check(secret, req),
                None => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "the App Service endpoint is disabled: start imds-broker with \
                     --identity-header / IDENTITY_HEADER",
                )),
            };
            (Endpoint::app_service, checked)
        } else {
            (Endpoint::other, Err(not_served(req)))
        }
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
        let token = self.broker.token(&selector, resource).await?;
        Ok(self.body(&token, resource))
    }

    fn body(&self, token: &Arc<Token>, resource: &str) -> Bytes {
        token_body(token, resource, &self.broker.identity().client_id)
    }
}

/// An error in the format of the endpoint's protocol (IMDS's for unknown paths).
fn error_response(endpoint: Endpoint, e: &ApiError) -> Response<Body> {
    match endpoint {
        Endpoint::app_service => app_service::error_response(e),
        Endpoint::imds | Endpoint::other => imds::error_response(e),
    }
}

/// The request path with one trailing slash removed, for matching the token endpoints.
///
/// msal-node (under @azure/identity 4.x) builds its IMDS URL from
/// `AZURE_POD_IDENTITY_AUTHORITY_HOST` through msal-common's `UrlString`, which canonicalises
/// every URL with a trailing slash: it asks for `/metadata/identity/oauth2/token/`. Without
/// this, Node clients got a 404, which they retry five times with backoff (~20 s per call)
/// before failing. Found by tests/conformance (client-compatibility.md, "surprises").
fn token_path(path: &str) -> &str {
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
    let path = req.uri().path();
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

/// The shared "method must be GET" check.
pub fn require_get(req: &Request<Incoming>) -> Result<(), ApiError> {
    if req.method() == Method::GET {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not supported: use GET", req.method()),
        ))
    }
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

    #[test]
    fn query_decoding_matches_form_urlencoded() {
        for raw in [
            "api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com%2F",
            "resource=https://management.azure.com/&client_id=",
            "a+b=c+d&e=%41%42%zz%4&f=%&g=%e2%82%ac&h=%ff%fe&&=x&y&z=1=2&%2B=%2b",
            "",
            "&&&",
            "k=%F0%9F%98%80+%C3%A9",
        ] {
            let expected: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            let got: Vec<(String, String)> = raw
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| p.split_once('=').unwrap_or((p, "")))
                .map(|(k, v)| (form_decode(k).into_owned(), form_decode(v).into_owned()))
                .collect();
            assert_eq!(got, expected, "{raw}");
        }
        assert!(matches!(form_decode("https://x/"), Cow::Borrowed(_)));
    }

    #[test]
    fn numbers_render_in_decimal() {
        for n in [0, 7, 10, 1_795_556_356, u64::MAX] {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, n.to_string());
        }
    }

    #[test]
    fn duplicate_parameters_are_rejected() {
        let e = Query::parse(Some("resource=a&resource=b")).err().unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.description.contains("resource"));
    }

    #[test]
    fn a_repeated_query_is_reused_and_a_changed_one_parsed_again() {
        let raw = "api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
        let (a, b) = (
            Query::parse(Some(raw)).unwrap(),
            Query::parse(Some(raw)).unwrap(),
        );
        assert!(Arc::ptr_eq(&a.0, &b.0), "the second parse reuses the first");
        assert_eq!(b.resource().unwrap(), "https://vault.azure.net");
        let c = Query::parse(Some("api-version=2018-02-01&resource=r")).unwrap();
        assert_eq!(c.resource().unwrap(), "r");
        // A refused query is not remembered: the same string is refused again.
        let dup = "resource=a&resource=b";
        assert!(Query::parse(Some(dup)).is_err());
        assert!(Query::parse(Some(dup)).is_err());
        assert_eq!(Query::parse(None).unwrap().0.len(), 0);
    }

    #[test]
    fn empty_client_id_means_default() {
        let q = Query::parse(Some("resource=r&client_id=")).unwrap();
        let names: [SelectorParam; 1] = [("client_id", Selector::ClientId)];
        let s = q.selector(&names).unwrap();
        assert_eq!(s, Selector::Default);
    }

    #[test]
    fn two_selectors_are_ambiguous() {
        let q = Query::parse(Some("resource=r&client_id=a&object_id=b")).unwrap();
        let names: [SelectorParam; 2] = [
            ("client_id", Selector::ClientId),
            ("object_id", Selector::ObjectId),
        ];
        assert!(q.selector(&names).is_err());
    }

    /// A token expiring in 100 s, rendered for `resource`.
    fn rendered(resource: &str) -> serde_json::Value {
        let t = Token {
            access_token: "tok".into(),
            expires_on: now_unix() + 100,
            not_before: 5,
        };
        let body = TokenView {
            token: &t,
            resource,
            client_id: "c",
        }
        .render_at(now_unix());
        serde_json::from_str(&body).unwrap()
    }

    #[test]
    fn render_uses_strings_only() {
        let v = rendered("https://x/");
        for (k, val) in v.as_object().unwrap() {
            assert!(val.is_string(), "{k} is not a string");
        }
        let ei: u64 = v["expires_in"].as_str().unwrap().parse().unwrap();
        assert!((95..=100).contains(&ei));
        assert_eq!(v["not_before"], "5");
    }

    #[test]
    fn token_body_is_the_rendered_body_reused_within_a_second() {
        let t = Arc::new(Token {
            access_token: "tok".into(),
            expires_on: now_unix() + 100,
            not_before: 5,
        });
        let before = now_unix();
        let a = token_body(&t, "https://x/", "c");
        let b = token_body(&t, "https://x/", "c");
        let after = now_unix();
        let view = TokenView {
            token: &t,
            resource: "https://x/",
            client_id: "c",
        };
        // (Unless the clock crossed a second between the calls, which changes `expires_in`.)
        if before == after {
            assert_eq!(a, view.render_at(before));
            assert_eq!(a.as_ptr(), b.as_ptr(), "reused");
        }
        // Another resource, client ID or token is another body.
        let text = |b: Bytes| String::from_utf8(b.to_vec()).unwrap();
        assert!(text(token_body(&t, "https://y/", "c")).contains(r#""resource":"https://y/""#));
        assert!(text(token_body(&t, "https://x/", "d")).contains(r#""client_id":"d""#));
        let t2 = Arc::new(Token {
            access_token: "other".into(),
            ..(*t).clone()
        });
        assert!(text(token_body(&t2, "https://x/", "c")).starts_with(r#"{"access_token":"other""#));
    }

    #[test]
    fn render_escapes_odd_resources() {
        assert_eq!(rendered("a\"b")["resource"], "a\"b");
    }
}
