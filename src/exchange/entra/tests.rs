//! Unit tests of the parent module.
use super::*;
use azure_core::http::{headers::Headers, Method, StatusCode, Url};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The next policy: a 502 whose body is 50 MB in 16-KiB chunks, counting chunks pulled.
#[derive(Debug)]
struct HugeErrorPage(Arc<AtomicUsize>);

#[async_trait::async_trait]
impl Policy for HugeErrorPage {
    async fn send(&self, _: &Context, _: &mut Request, _: &[Arc<dyn Policy>]) -> PolicyResult {
        let pulled = self.0.clone();
        let chunks = futures_util::stream::iter(0..3200).map(move |_| {
            pulled.fetch_add(1, Ordering::Relaxed);
            Ok(bytes::Bytes::from(vec![b'x'; 16 * 1024]))
        });
        Ok(AsyncRawResponse::new(
            StatusCode::BadGateway,
            Headers::new(),
            Box::pin(chunks),
        ))
    }
}

#[tokio::test]
async fn an_error_body_is_read_only_up_to_its_cap() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let capture = ErrorCapture::default();
    let next: Vec<Arc<dyn Policy>> = vec![Arc::new(HugeErrorPage(pulled.clone()))];
    let mut req = Request::new(Url::parse("https://login.example/t").unwrap(), Method::Post);
    let resp = capture
        .send(&Context::new(), &mut req, &next)
        .await
        .unwrap();
    let captured = capture.take().unwrap();
    assert_eq!(captured.status, 502);
    assert_eq!(captured.body.len(), MAX_ERROR_BODY);
    // The rest of the 50 MB was never pulled from the connection.
    assert_eq!(pulled.load(Ordering::Relaxed), MAX_ERROR_BODY / (16 * 1024));
    let handed_on = resp.into_body().collect().await.unwrap();
    assert_eq!(handed_on.len(), MAX_ERROR_BODY);
}

#[test]
fn retry_after_seconds_and_dates() {
    assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
    assert_eq!(
        parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(Duration::ZERO)
    );
    assert_eq!(parse_retry_after("soon"), None);
}

#[test]
fn permanent_error_names_code_and_fix() {
    let body = r#"{"error":"invalid_client","error_description":"AADSTS70021: No matching federated identity record found for presented assertion.\r\nTrace ID: x","error_codes":[70021]}"#;
    match permanent_from_body(400, body, "cid", "tid") {
        ExchangeError::Permanent {
            code,
            description,
            hint,
            error,
        } => {
            assert_eq!(code, "AADSTS70021");
            assert_eq!(error, "invalid_client");
            assert!(!description.contains("Trace ID"));
            assert!(hint.contains("cid"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn code_from_description_when_codes_missing() {
    let body =
        r#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant 'x' not found."}"#;
    match permanent_from_body(400, body, "cid", "tid") {
        ExchangeError::Permanent { code, .. } => assert_eq!(code, "AADSTS90002"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn authority_must_be_https() {
    assert!(url_checked("http://login.example").is_err());
    assert_eq!(
        url_checked("https://login.example/").unwrap(),
        "https://login.example"
    );
}
