//! What both protocols' checks share: the method check they start with, and the [`Lookup`]
//! they hand the token service when a request passed.

use super::error::{excerpt, ApiError, ECHO_CHARS};
use super::query::{Query, SelectorParam};
use crate::broker::Selector;
use hyper::{Method, Request, StatusCode};

/// A token request that passed its protocol's checks: what remains is the broker lookup.
pub struct Lookup {
    pub query: Query,
    /// The query parameters that select an identity in this protocol.
    pub selectors: &'static [SelectorParam],
}

impl Lookup {
    /// The resource and the identity selector asked for.
    pub fn target(&self) -> Result<(&str, Selector), ApiError> {
        Ok((self.query.resource()?, self.query.selector(self.selectors)?))
    }
}

/// The "method must be GET" check. Generic over the body, which it never reads, so the
/// fuzzers can build requests without a connection.
pub fn require_get<B>(req: &Request<B>) -> Result<(), ApiError> {
    if req.method() == Method::GET {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{} is not supported: use GET",
                excerpt(req.method().as_str(), ECHO_CHARS)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzz/fuzz_targets/token_request.rs: an extension method of any length was
    /// echoed whole.
    #[test]
    fn only_get_passes_and_a_long_method_is_echoed_in_part() {
        assert!(require_get(&Request::get("/").body(()).unwrap()).is_ok());
        let method = Method::from_bytes("X".repeat(4000).as_bytes()).unwrap();
        let req = Request::builder().method(method).body(()).unwrap();
        let e = require_get(&req).unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(e.description.len() < 200, "{} bytes", e.description.len());
        assert!(e.description.ends_with("… is not supported: use GET"));
    }
}
