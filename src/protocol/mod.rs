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
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
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
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Query, ApiError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            if pairs.iter().any(|(seen, _)| seen.eq_ignore_ascii_case(&k)) {
                return Err(ApiError::bad_request(format!(
                    "Duplicate query parameter '{k}': each parameter may appear once"
                )));
            }
            pairs.push((k.into_owned(), v.into_owned()));
        }
        Ok(Query(pairs))
    }

    /// Parameter names are matched case-insensitively, as IMDS does.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
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

/// Fields of a successful token response, rendered by each protocol.
pub struct TokenView<'a> {
    pub token: &'a Token,
    pub resource: &'a str,
    pub client_id: &'a str,
}

impl TokenView<'_> {
    /// Renders the JSON object; all values are strings. Hand-built because this is the hot
    /// path and the field set is fixed; values are escaped by serde_json.
    pub fn render(&self) -> String {
        let now = now_unix();
        let expires_in = self.token.expires_on.saturating_sub(now).max(1).to_string();
        let mut out = String::with_capacity(self.token.access_token.len() + 320);
        out.push_str("{\"access_token\":");
        push_json_str(&mut out, &self.token.access_token);
        out.push_str(",\"client_id\":");
        push_json_str(&mut out, self.client_id);
        out.push_str(",\"expires_in\":\"");
        out.push_str(&expires_in);
        out.push_str("\",\"expires_on\":\"");
        out.push_str(&self.token.expires_on.to_string());
        out.push_str("\",\"ext_expires_in\":\"");
        out.push_str(&expires_in);
        out.push_str("\",\"not_before\":\"");
        out.push_str(&self.token.not_before.to_string());
        out.push_str("\",\"refresh_token\":\"\",\"resource\":");
        push_json_str(&mut out, self.resource);
        out.push_str(",\"token_type\":\"Bearer\"}");
        out
    }
}

fn push_json_str(out: &mut String, s: &str) {
    // Tokens and GUIDs need no escaping; anything else goes through serde_json.
    if s.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
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
}

impl TokenService {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        let (endpoint, resp) = if path == IMDS_TOKEN_PATH {
            (Endpoint::imds, imds::handle(self, &req).await)
        } else if path == APP_SERVICE_TOKEN_PATH {
            let resp = match &self.identity_header {
                Some(secret) => app_service::handle(self, secret, &req).await,
                None => app_service::error_response(&ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "the App Service endpoint is disabled: start imds-broker with \
                     --identity-header / IDENTITY_HEADER",
                )),
            };
            (Endpoint::app_service, resp)
        } else {
            (Endpoint::other, not_served(&req))
        };
        self.metrics.request(endpoint, resp.status().as_u16());
        tracing::debug!(
            method = %req.method(),
            path = %req.uri().path(),
            status = resp.status().as_u16(),
            "request"
        );
        resp
    }

    /// Broker lookup shared by both protocols.
    pub async fn token(&self, selector: &Selector, resource: &str) -> Result<Arc<Token>, ApiError> {
        self.broker
            .token(selector, resource)
            .await
            .map_err(ApiError::from)
    }
}

/// Anything else — notably instance metadata — is refused with JSON, so nothing about the
/// node leaks and SDK probes still get a parseable answer.
fn not_served(req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let (status, description) = if path.starts_with("/metadata/") {
        (
            StatusCode::NOT_FOUND,
            format!(
                "{path} is not served by imds-broker: only the managed-identity token endpoint \
                 {IMDS_TOKEN_PATH} is (instance metadata is deliberately not exposed)"
            ),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            format!(
                "{path} is not served by imds-broker: token endpoints are {IMDS_TOKEN_PATH} \
                 (IMDS) and {APP_SERVICE_TOKEN_PATH} (App Service)"
            ),
        )
    };
    if req.method() != Method::GET {
        return imds::error_response(&ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not supported: use GET", req.method()),
        ));
    }
    imds::error_response(&ApiError::new(status, "not_found", description))
}

/// The shared "method must be GET" check.
pub fn require_get(req: &Request<Incoming>) -> Result<(), ApiError> {
    if req.method() == Method::GET {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{} is not supported on token endpoints: use GET",
                req.method()
            ),
        ))
    }
}

/// A JSON body for a successful token answer.
pub fn token_response(body: String) -> Response<Body> {
    json_response(StatusCode::OK, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_parameters_are_rejected() {
        let e = Query::parse(Some("resource=a&resource=b")).err().unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.description.contains("resource"));
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

    #[test]
    fn render_uses_strings_only() {
        let t = Token {
            access_token: "tok".into(),
            expires_on: now_unix() + 100,
            not_before: 5,
        };
        let body = TokenView {
            token: &t,
            resource: "https://x/",
            client_id: "c",
        }
        .render();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        for (k, val) in v.as_object().unwrap() {
            assert!(val.is_string(), "{k} is not a string");
        }
        let ei: u64 = v["expires_in"].as_str().unwrap().parse().unwrap();
        assert!((95..=100).contains(&ei));
        assert_eq!(v["not_before"], "5");
    }

    #[test]
    fn render_escapes_odd_resources() {
        let t = Token {
            access_token: "tok".into(),
            expires_on: now_unix() + 100,
            not_before: 5,
        };
        let body = TokenView {
            token: &t,
            resource: "a\"b",
            client_id: "c",
        }
        .render();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["resource"], "a\"b");
    }
}
