//! The IMDS managed-identity token endpoint, as Go and Rust SDKs call it at 169.254.169.254:
//! `GET /metadata/identity/oauth2/token?api-version=…&resource=…` with `Metadata: true`.

use super::checks::{require_get, Lookup};
use super::error::{excerpt, ECHO_CHARS};
use super::{ApiError, Query, SelectorParam};
use crate::broker::Selector;
use crate::listener::Body;
use hyper::header::HeaderName;
use hyper::{Request, Response};

// Looked up by a prepared name: a `&str` is parsed and validated as a header name on every
// lookup (~350 instructions each on the hot path, bench/RESULTS.md).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const METADATA: HeaderName = HeaderName::from_static("metadata");
/// Any of these means the request passed a proxy, so it did not come from inside the pod.
const PROXY_HEADERS: [(HeaderName, &str); 3] = [
    (X_FORWARDED_FOR, "X-Forwarded-For"),
    (HeaderName::from_static("forwarded"), "Forwarded"),
    (HeaderName::from_static("via"), "Via"),
];

/// API versions of the IMDS identity endpoint (newest first, as IMDS lists them).
pub const API_VERSIONS: &[&str] = &[
    "2025-04-07",
    "2024-07-17",
    "2024-03-15",
    "2023-11-15",
    "2023-07-01",
    "2022-11-01",
    "2022-09-01",
    "2022-08-01",
    "2022-07-01",
    "2022-03-01",
    "2022-02-01",
    "2021-12-13",
    "2021-11-15",
    "2021-11-01",
    "2021-10-01",
    "2021-08-01",
    "2021-05-01",
    "2021-03-01",
    "2021-02-01",
    "2021-01-01",
    "2020-12-01",
    "2020-10-01",
    "2020-09-01",
    "2020-07-15",
    "2020-06-01",
    "2019-11-01",
    "2019-08-15",
    "2019-08-01",
    "2019-06-04",
    "2019-06-01",
    "2019-04-30",
    "2019-03-11",
    "2019-02-01",
    "2018-10-01",
    "2018-04-02",
    "2018-02-01",
];

const SELECTORS: &[SelectorParam] = &[
    ("client_id", Selector::ClientId),
    ("object_id", Selector::ObjectId),
    ("principal_id", Selector::ObjectId),
    ("msi_res_id", Selector::ResourceId),
    // Older Go clients sent this name.
    ("mi_res_id", Selector::ResourceId),
];

/// The IMDS checks: method, no proxy, `Metadata: true`, a supported api-version.
pub fn check<B>(req: &Request<B>) -> Result<Lookup, ApiError> {
    require_get(req)?;
    // IMDS refuses proxied requests: a request that went through a proxy did not come from
    // inside the pod.
    if let Some((_, name)) = PROXY_HEADERS
        .iter()
        .find(|(h, _)| req.headers().contains_key(h))
    {
        return Err(ApiError::bad_request(format!(
            "Request contains a {name} header: proxied requests are refused"
        )));
    }
    let mut values = req.headers().get_all(&METADATA).iter();
    let (first, second) = (values.next(), values.next());
    if second.is_some() {
        return Err(ApiError::bad_request(
            "Request contains more than one Metadata header: send exactly one 'Metadata: true'",
        ));
    }
    let metadata = first
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if !metadata {
        return Err(ApiError::bad_request(
            "Required metadata header not specified: send 'Metadata: true'",
        ));
    }
    let query = Query::parse(req.uri().query())?;
    check_api_version(query.get("api-version"))?;
    Ok(Lookup {
        query,
        selectors: SELECTORS,
    })
}

fn check_api_version(v: Option<&str>) -> Result<(), ApiError> {
    let mut err = match v.map(str::trim) {
        None | Some("") => {
            ApiError::bad_request("Required query variable 'api-version' is missing")
        }
        // Binary search (the list is sorted newest first, see the test): a linear `contains`
        // made ~36 string compares for 2018-02-01, the version every SDK sends (hot path).
        Some(v) if API_VERSIONS.binary_search_by(|probe| v.cmp(probe)).is_ok() => return Ok(()),
        Some(v) => ApiError::bad_request(format!(
            "Invalid version '{}': see newest-versions for the supported ones",
            excerpt(v, ECHO_CHARS)
        )),
    };
    err.newest_versions = Some(&API_VERSIONS[..3]);
    Err(err)
}

/// IMDS error body: `{"error": …, "error_description": …}` (+ `newest-versions`).
pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut body = serde_json::json!({
        "error": e.code,
        "error_description": e.description,
    });
    if let Some(versions) = e.newest_versions {
        body["newest-versions"] = serde_json::json!(versions);
    }
    e.response(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_are_sorted_newest_first_for_binary_search() {
        assert!(API_VERSIONS.windows(2).all(|w| w[0] > w[1]));
        for v in API_VERSIONS {
            assert!(check_api_version(Some(v)).is_ok(), "{v}");
        }
        assert!(check_api_version(Some("2018-02-02")).is_err());
    }

    #[test]
    fn api_versions() {
        assert!(check_api_version(Some("2018-02-01")).is_ok());
        assert!(check_api_version(Some("2019-08-01")).is_ok());
        let e = check_api_version(None).unwrap_err();
        assert!(e.description.contains("api-version"));
        assert!(e.newest_versions.is_some());
        assert!(check_api_version(Some("2099-01-01")).is_err());
    }

    /// Found by fuzz/fuzz_targets/token_request.rs: the description echoed the whole value.
    #[test]
    fn an_unknown_version_is_echoed_only_in_part() {
        let e = check_api_version(Some(&"9".repeat(8000))).unwrap_err();
        assert!(e.description.len() < 200, "{} bytes", e.description.len());
        assert!(e.description.contains(&format!("'{}…'", "9".repeat(64))));
    }
}
