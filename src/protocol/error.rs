//! The protocol-level error model: HTTP status, OAuth-style code, description, optional
//! `Retry-After`; each adapter renders it in its own format.

use crate::broker::BrokerError;
use hyper::StatusCode;
use std::time::Duration;

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
