//! Exchangers turn (client id, resource) into an access token: [`entra::EntraExchanger`] talks
//! to Entra ID with the federated assertion; [`emulator::Emulator`] signs fake tokens locally.

pub mod aadsts;
pub mod emulator;
pub mod entra;

use crate::assertion::AssertionError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// An access token. The secret is never printed by `Debug`.
#[derive(Clone)]
pub struct Token {
    pub access_token: Arc<str>,
    /// Unix seconds.
    pub expires_on: u64,
    /// Unix seconds: when the token was obtained (reported as `not_before`).
    pub not_before: u64,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"<redacted>")
            .field("expires_on", &self.expires_on)
            .field("not_before", &self.not_before)
            .finish()
    }
}

/// Why an exchange failed, classified by what the broker should do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    /// The local token file is missing or unusable; no request was sent.
    #[error(transparent)]
    Assertion(#[from] AssertionError),
    /// Worth retrying: 5xx, 429, timeout, reset, unreadable answer.
    #[error("Entra ID is unavailable: {message}")]
    Transient {
        message: String,
        /// From the `Retry-After` header: Entra must not be called again before it elapses.
        retry_after: Option<Duration>,
    },
    /// Entra refused the request; retrying will not help until configuration changes.
    #[error("Entra ID refused the token request: {description} — {hint}")]
    Permanent {
        /// OAuth error (`invalid_client`, …).
        error: String,
        /// AADSTS code(s), e.g. `AADSTS70021`; empty if Entra sent none.
        code: String,
        description: String,
        /// What to fix.
        hint: String,
    },
}

/// Exchanges an assertion for an access token.
#[async_trait::async_trait]
pub trait Exchanger: Send + Sync + 'static {
    async fn exchange(&self, client_id: &str, resource: &str) -> Result<Token, ExchangeError>;

    /// Readiness of the exchanger's local inputs (never the network).
    fn ready(&self) -> Result<(), String>;

    /// Opens a connection to the token service ahead of the first exchange, so that the
    /// first token request of a new pod does not also pay for DNS, TCP and TLS. Returns what
    /// answered (for the log); an error only means the first exchange will connect itself.
    async fn preconnect(&self) -> Result<String, String> {
        Ok("nothing to connect to".into())
    }
}

/// The v2 scope for an IMDS-style resource: `/.default` appended verbatim. Entra accepts the
/// double slash (`https://storage.azure.com//.default`), and ARM documents exactly that form.
pub fn scope_for(resource: &str) -> String {
    if resource.ends_with("/.default") {
        resource.to_owned()
    } else {
        format!("{resource}/.default")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_appends_default_verbatim() {
        assert_eq!(
            scope_for("https://storage.azure.com/"),
            "https://storage.azure.com//.default"
        );
        assert_eq!(
            scope_for("https://management.azure.com"),
            "https://management.azure.com/.default"
        );
        assert_eq!(scope_for("api://x/.default"), "api://x/.default");
    }

    #[test]
    fn token_debug_hides_secret() {
        let t = Token {
            access_token: "secret-value".into(),
            expires_on: 1,
            not_before: 0,
        };
        assert!(!format!("{t:?}").contains("secret-value"));
    }
}
