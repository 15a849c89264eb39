//! The protocol-level error model: HTTP status, OAuth-style code, description, optional
//! `Retry-After`; each adapter renders it in its own format.

use crate::broker::BrokerError;
pub use crate::excerpt::excerpt;
use crate::listener::{json_response, Body};
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use std::time::Duration;

/// How much of a caller's string an error description repeats ([`excerpt`]).
pub const ECHO_CHARS: usize = 64;

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

    /// The broker stops before an exchange this caller waits for has finished.
    pub fn shutting_down() -> Self {
        ApiError {
            retry_after: Some(Duration::from_secs(1)),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "imds-broker is shutting down before the token arrived; retry",
            )
        }
    }

    /// The error answer: this error's status, `body` (the adapter's format of it) and, when
    /// it has one, `Retry-After` in whole seconds, at least 1.
    pub fn response(&self, body: String) -> Response<Body> {
        let mut resp = json_response(self.status, body);
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut num = itoa::Buffer::new();
            if let Ok(v) = HeaderValue::from_str(num.format(secs.max(1))) {
                resp.headers_mut().insert(RETRY_AFTER, v);
            }
        }
        resp
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
            // IMDS's own answer for a resource it does not know.
            BrokerError::InvalidResource(_) => (StatusCode::BAD_REQUEST, "invalid_resource"),
            BrokerError::ResourceRefused { .. } => (StatusCode::FORBIDDEN, "access_denied"),
            BrokerError::TooManyResources(_) | BrokerError::NewResourcesThrottled { .. } => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn retry_after_of(wait: Option<Duration>) -> Option<String> {
        let e = ApiError {
            retry_after: wait,
            ..ApiError::bad_request("x")
        };
        let resp = e.response("{}".into());
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        resp.headers()
            .get(RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_of(None), None);
        assert_eq!(retry_after_of(Some(Duration::ZERO)).as_deref(), Some("1"));
        assert_eq!(
            retry_after_of(Some(Duration::from_millis(1500))).as_deref(),
            Some("2")
        );
        assert_eq!(
            retry_after_of(Some(Duration::from_secs(7))).as_deref(),
            Some("7")
        );
    }
}
