//! Unit tests of the parent module.
use super::*;

#[test]
fn lifetimes_outside_one_second_to_two_days_are_refused() {
    let body = |v: serde_json::Value| serde_json::json!({ "expires_in": v }).to_string();
    for ok in [
        serde_json::json!(1),
        serde_json::json!(3599),
        serde_json::json!("86399"),
    ] {
        assert!(check_lifetime(body(ok.clone()).as_bytes()).is_ok(), "{ok}");
    }
    for bad in [
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(172_801),
        serde_json::json!(1e17),
        serde_json::json!(u64::MAX),
        serde_json::json!("soon"),
    ] {
        let err = check_lifetime(body(bad.clone()).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("expires_in"), "{bad}: {err}");
    }
    // No field (an error body, a discovery document): left to the SDK.
    assert!(check_lifetime(b"{}").is_ok());
    assert!(check_lifetime(b"not json").is_ok());
}

#[test]
fn retry_after_seconds_and_dates() {
    assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
    assert_eq!(
        parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(Duration::ZERO)
    );
    assert_eq!(parse_retry_after("soon"), None);
    assert_eq!(parse_retry_after("+1"), None, "delta-seconds has no sign");
    assert_eq!(parse_retry_after("-1"), None);
    assert_eq!(parse_retry_after("99999999999999999999999"), None);
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
