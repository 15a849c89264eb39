//! Why a token could not be served. Protocol adapters map these to their own error formats.

use crate::assertion::AssertionError;
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("Identity not found: {0} does not name this pod's identity (client id {1})")]
    IdentityNotFound(String, String),
    #[error("{0}")]
    InvalidResource(String),
    #[error("resource {resource:?} is not allowed by this broker's policy (allowed: {allowed}); add it with --allow-resource / IMDS_BROKER_ALLOW_RESOURCES")]
    ResourceRefused { resource: String, allowed: String },
    #[error("too many distinct resources requested (limit {0}); restrict clients or use --allow-resource")]
    TooManyResources(usize),
    #[error("too many new resources requested at once; retry after {}s", retry_after.as_secs().max(1))]
    NewResourcesThrottled { retry_after: Duration },
    /// The token file is not there (yet); retry shortly.
    #[error("not ready: {0}")]
    NotReady(AssertionError),
    /// The token file is there but unusable; configuration must change.
    #[error("{0}")]
    BadAssertion(AssertionError),
    #[error("Entra ID refused the token request ({code}): {description}. Fix: {hint}")]
    EntraRefused {
        error: String,
        code: String,
        description: String,
        hint: String,
        /// When Entra will be asked again.
        retry_after: Duration,
    },
    #[error("Entra ID is unavailable ({message}); retry after {}s", retry_after.as_secs().max(1))]
    EntraUnavailable {
        message: String,
        retry_after: Duration,
    },
}

impl BrokerError {
    /// How long a client should wait before retrying, where retrying makes sense.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BrokerError::NotReady(_) => Some(Duration::from_secs(1)),
            BrokerError::EntraUnavailable { retry_after, .. }
            | BrokerError::NewResourcesThrottled { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// The same error with another wait (what is left of it, or a client's cap).
    pub(super) fn with_retry_after(mut self, wait: Duration) -> Self {
        match &mut self {
            BrokerError::EntraRefused { retry_after, .. }
            | BrokerError::EntraUnavailable { retry_after, .. }
            | BrokerError::NewResourcesThrottled { retry_after } => *retry_after = wait,
            _ => {}
        }
        self
    }
}

pub(super) fn unavailable(message: impl Into<String>, wait: Duration) -> BrokerError {
    BrokerError::EntraUnavailable {
        message: message.into(),
        retry_after: wait,
    }
}
