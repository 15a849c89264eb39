//! The token listener's request checks: a request head (as hyper parses it off a connection)
//! through both protocol adapters, the query and selector parsing, the broker's resource
//! check, and both error formats.
//!
//! Beyond "no panic": a request is accepted only if an independent reading of the rules
//! accepts it too (GET, the protocol's header, a supported api-version, a query without
//! duplicates or excess parameters), every refusal is a 4xx in the protocol's JSON without
//! Retry-After, and its description is bounded whatever the input size. The identity header
//! a caller presents decides only whether it matches: with any other non-matching value the
//! answer is the same, so no error can quote it; the configured secret appears in an error
//! only if the caller put it in the request line (method, path, query), which errors quote.
#![no_main]

use hyper::header::{HeaderName, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request};
use imds_broker::broker::policy::check_resource;
use imds_broker::protocol::app_service::{self, IdentityHeader};
use imds_broker::protocol::{imds, query::MAX_PARAMS, ApiError, Lookup};
use libfuzzer_sys::fuzz_target;

/// The App Service secret the fuzzed broker is configured with.
const SECRET: &str = "fuzz-secret-4b7d2c9a1e";
/// Longest error description, whatever the request: descriptions echo only excerpts of what
/// the caller sent (they go to the caller and, rate-limited, to the log).
const MAX_DESCRIPTION: usize = 1024;
/// hyper's default limit on headers per request.
const MAX_HEADERS: usize = 100;

fuzz_target!(|data: &[u8]| {
    let Some(req) = request(data) else { return };
    let query = Pairs::of(&req);
    let imds_answer = imds::check(&req);
    match &imds_answer {
        Ok(lookup) => {
            assert_imds_rules(&req, &query);
            follow(lookup, &query);
        }
        Err(e) => assert_refusal(e, &query),
    }
    let secret = IdentityHeader::new(SECRET).expect("a non-empty secret");
    let app_service_answer = app_service::check(&secret, &req);
    match &app_service_answer {
        Ok(lookup) => {
            assert_app_service_rules(&req, &query);
            follow(lookup, &query);
        }
        Err(e) => assert_refusal(e, &query),
    }
    let other = other_identity_header(&req);
    assert_eq!(outline(&imds_answer), outline(&imds::check(&other)));
    assert_eq!(
        outline(&app_service_answer),
        outline(&app_service::check(&secret, &other)),
        "the answer depends on the non-matching identity header's value"
    );
});

/// The request with every non-matching identity header value replaced by another one.
fn other_identity_header(req: &Request<()>) -> Request<()> {
    let mut other = Request::builder()
        .method(req.method())
        .uri(req.uri())
        .body(())
        .expect("the same request line");
    for (name, value) in req.headers() {
        let value = if name == "x-identity-header" && value.as_bytes() != SECRET.as_bytes() {
            HeaderValue::from_static("another-non-matching-value")
        } else {
            value.clone()
        };
        other.headers_mut().append(name, value);
    }
    other
}

/// What a caller learns from a check: accepted, or the refusal's status and text.
fn outline(answer: &Result<Lookup, ApiError>) -> Option<(u16, &'static str, &str)> {
    answer
        .as_ref()
        .err()
        .map(|e| (e.status.as_u16(), e.code, e.description.as_str()))
}

/// The request hyper would hand the service for this head, or `None` where hyper refuses the
/// head itself (the listener answers those; tests/e2e/hostile.rs covers them).
fn request(data: &[u8]) -> Option<Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    // A head without its blank line is completed, so the fuzzer need not find "\r\n\r\n".
    let completed;
    let data = if data.windows(4).any(|w| w == b"\r\n\r\n") {
        data
    } else {
        completed = [data, b"\r\n\r\n"].concat();
        &completed
    };
    if !head.parse(data).ok()?.is_complete() {
        return None;
    }
    let mut req = Request::builder()
        .method(Method::from_bytes(head.method?.as_bytes()).ok()?)
        .uri(head.path?)
        .body(())
        .ok()?;
    for h in head.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        req.headers_mut().append(name, value);
    }
    Some(req)
}

/// The query as form_urlencoded decodes it; `ambiguous` when a name repeats (in any case) or
/// there are more than MAX_PARAMS parameters, which both adapters must refuse. Also what an
/// error may quote: the request line.
struct Pairs {
    pairs: Vec<(String, String)>,
    ambiguous: bool,
    request_line: String,
}

impl Pairs {
    fn of(req: &Request<()>) -> Pairs {
        let raw = req.uri().query();
        let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let duplicate = pairs.iter().enumerate().any(|(i, (k, _))| {
            pairs[..i]
                .iter()
                .any(|(seen, _)| seen.eq_ignore_ascii_case(k))
        });
        let mut request_line = format!("{} {}", req.method(), req.uri());
        for (k, v) in &pairs {
            request_line += &format!(" {k}={v}");
        }
        Pairs {
            ambiguous: duplicate || pairs.len() > MAX_PARAMS,
            pairs,
            request_line,
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn assert_imds_rules(req: &Request<()>, query: &Pairs) {
    assert_eq!(req.method(), Method::GET, "IMDS accepted a non-GET request");
    for proxy in ["x-forwarded-for", "forwarded", "via"] {
        assert!(
            !req.headers().contains_key(proxy),
            "IMDS accepted a proxied request ({proxy})"
        );
    }
    let metadata: Vec<_> = req.headers().get_all("metadata").iter().collect();
    assert_eq!(
        metadata.len(),
        1,
        "IMDS accepted {} Metadata headers",
        metadata.len()
    );
    let value = metadata[0]
        .to_str()
        .expect("an accepted Metadata header is text");
    assert!(
        value.trim().eq_ignore_ascii_case("true"),
        "IMDS accepted Metadata: {value:?}"
    );
    assert!(!query.ambiguous, "IMDS accepted an ambiguous query");
    let version = query
        .get("api-version")
        .expect("IMDS accepted no api-version");
    assert!(
        imds::API_VERSIONS.contains(&version.trim()),
        "IMDS accepted api-version {version:?}"
    );
}

fn assert_app_service_rules(req: &Request<()>, query: &Pairs) {
    assert_eq!(
        req.method(),
        Method::GET,
        "App Service accepted a non-GET request"
    );
    let presented: Vec<_> = req.headers().get_all("x-identity-header").iter().collect();
    assert_eq!(
        presented.len(),
        1,
        "App Service accepted {} identity headers",
        presented.len()
    );
    assert_eq!(
        presented[0].as_bytes(),
        SECRET.as_bytes(),
        "App Service accepted a wrong identity header"
    );
    assert!(!query.ambiguous, "App Service accepted an ambiguous query");
    assert_eq!(
        query.get("api-version").map(str::trim),
        Some(app_service::API_VERSION),
        "App Service accepted another api-version"
    );
}

/// What the service does with an accepted request before the broker: the resource and the
/// identity selector, then the broker's resource check.
fn follow(lookup: &Lookup, query: &Pairs) {
    let resource = match lookup.target() {
        Ok((resource, _selector)) => resource,
        Err(e) => return assert_refusal(&e, query),
    };
    assert_eq!(
        Some(resource),
        query.get("resource").map(str::trim),
        "the resource is not the one in the query"
    );
    assert!(!resource.is_empty(), "an empty resource was accepted");
    if let Err(e) = check_resource(resource) {
        return assert_refusal(&ApiError::from(e), query);
    }
    assert!(
        resource.is_ascii() && !resource.bytes().any(|b| b.is_ascii_control() || b == b' '),
        "the broker accepted resource {resource:?}"
    );
}

/// A refusal: specific, bounded, in both protocols' JSON, never carrying the secret.
fn assert_refusal(e: &ApiError, query: &Pairs) {
    assert!(e.status.is_client_error(), "{} for a bad request", e.status);
    assert!(e.retry_after.is_none(), "Retry-After on a refused request");
    assert!(!e.code.is_empty() && !e.description.is_empty());
    assert!(
        e.description.len() <= MAX_DESCRIPTION,
        "a {}-byte error description: {:.200}…",
        e.description.len(),
        e.description
    );
    assert!(
        !e.description.contains(SECRET) || query.request_line.contains(SECRET),
        "the identity header secret is in an error: {}",
        e.description
    );
    for (format, resp) in [
        ("IMDS", imds::error_response(e)),
        ("App Service", app_service::error_response(e)),
    ] {
        assert_eq!(resp.status(), e.status);
        assert!(resp.headers().get(RETRY_AFTER).is_none());
        let body =
            imds_broker::fuzzing::now_or_never(http_body_util::BodyExt::collect(resp.into_body()))
                .expect("a full body")
                .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|err| panic!("{format} error body is not JSON ({err})"));
        assert_eq!(json["error"], e.code, "{format}");
        assert_eq!(
            json["error_description"],
            e.description.as_str(),
            "{format}"
        );
    }
}
