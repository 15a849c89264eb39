//! The App Service managed-identity endpoint (api-version 2019-08-01), selected by every SDK
//! from `IDENTITY_ENDPOINT` + `IDENTITY_HEADER` alone — no link-local address, no iptables.

use super::checks::{require_get, Lookup};
use super::error::{excerpt, ECHO_CHARS};
use super::{ApiError, Query, SelectorParam};
use crate::broker::Selector;
use crate::listener::Body;
use hyper::header::HeaderName;
use hyper::{Request, Response, StatusCode};
use subtle::ConstantTimeEq;

pub const API_VERSION: &str = "2019-08-01";

/// Prepared, so a lookup does not parse the name (see `imds`).
const X_IDENTITY_HEADER: HeaderName = HeaderName::from_static("x-identity-header");

const SELECTORS: &[SelectorParam] = &[
    ("client_id", Selector::ClientId),
    ("principal_id", Selector::ObjectId),
    ("object_id", Selector::ObjectId),
    ("mi_res_id", Selector::ResourceId),
    ("msi_res_id", Selector::ResourceId),
];

/// The shared secret callers must present. Not `Debug`-printable.
#[derive(Clone)]
pub struct IdentityHeader(Vec<u8>);

impl IdentityHeader {
    pub fn new(secret: &str) -> Option<Self> {
        let s = secret.trim();
        (!s.is_empty()).then(|| IdentityHeader(s.as_bytes().to_vec()))
    }

    /// Constant-time comparison, so response timing does not reveal the secret.
    fn matches(&self, presented: &[u8]) -> bool {
        self.0.ct_eq(presented).into()
    }
}

/// The App Service checks: method, the shared secret, api-version 2019-08-01.
pub fn check<B>(secret: &IdentityHeader, req: &Request<B>) -> Result<Lookup, ApiError> {
    require_get(req)?;
    let mut presented = req.headers().get_all(&X_IDENTITY_HEADER).iter();
    let (first, second) = (presented.next(), presented.next());
    if second.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Request contains more than one X-IDENTITY-HEADER: send exactly one",
        ));
    }
    match first {
        None => return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing X-IDENTITY-HEADER: send the value of the IDENTITY_HEADER environment variable",
        )),
        Some(v) if !secret.matches(v.as_bytes()) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "X-IDENTITY-HEADER does not match this broker's IDENTITY_HEADER",
            ))
        }
        Some(_) => {}
    }
    let query = Query::parse(req.uri().query())?;
    match query.get("api-version").map(str::trim) {
        Some(API_VERSION) => {}
        None | Some("") => {
            return Err(ApiError::bad_request(format!(
                "Required query variable 'api-version' is missing: use {API_VERSION}"
            )))
        }
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "Unsupported api-version '{}': this endpoint implements {API_VERSION}",
                excerpt(v, ECHO_CHARS)
            )))
        }
    }
    Ok(Lookup {
        query,
        selectors: SELECTORS,
    })
}

/// The App Service error body is undocumented and clients disagree: MSAL Python reads
/// `statusCode`/`message`, msal-node reads `error` and `error_description`/`message`.
/// This body satisfies all of them.
pub fn error_response(e: &ApiError) -> Response<Body> {
    let body = serde_json::json!({
        "statusCode": e.status.as_u16(),
        "message": e.description,
        "error": e.code,
        "error_description": e.description,
    });
    e.response(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_compare() {
        let h = IdentityHeader::new("s3cret").unwrap();
        assert!(h.matches(b"s3cret"));
        assert!(!h.matches(b"s3cre"));
        assert!(!h.matches(b"s3cret!"));
        assert!(IdentityHeader::new("  ").is_none());
    }

    /// Found by fuzz/fuzz_targets/token_request.rs: the description echoed the whole value.
    #[test]
    fn an_unsupported_version_is_echoed_only_in_part() {
        let h = IdentityHeader::new("s3cret").unwrap();
        let req = Request::get(format!(
            "/msi/token?resource=r&api-version={}",
            "7".repeat(8000)
        ))
        .header("x-identity-header", "s3cret")
        .body(())
        .unwrap();
        let e = check(&h, &req).err().unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.description.len() < 200, "{} bytes", e.description.len());
    }
}
