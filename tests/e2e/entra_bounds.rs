//! What a hostile or broken authority can make the Entra exchanger do, through the path that
//! runs: `EntraExchanger::exchange` and `preconnect` (azure_identity's pipeline over the
//! broker's transport) against [`HostileAuthority`]. Bounded: each answer is at most 50 MB on
//! 127.0.0.1, and the client stops reading after 64 KiB.

use imds_broker::assertion::TokenFile;
use imds_broker::exchange::entra::{EntraConfig, EntraExchanger};
use imds_broker::exchange::{ExchangeError, Exchanger};
use std::time::{Duration, Instant};
use testkit::hostile_authority::{Answer, HostileAuthority};
use testkit::issuer::TestIssuer;

const BIG: usize = 50_000_000;
/// What the kernel's socket buffers on loopback can take beyond what the client read.
const BUFFERED: usize = 12 * 1024 * 1024;
const SCOPE_RESOURCE: &str = "https://storage.azure.com/";

struct Setup {
    authority: HostileAuthority,
    exchanger: EntraExchanger,
    _dir: tempfile::TempDir,
}

fn setup(answer: Answer) -> Setup {
    let authority = HostileAuthority::start(answer);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    TestIssuer::new().write_to(&path).unwrap();
    let exchanger = EntraExchanger::new(EntraConfig {
        tenant_id: "22222222-2222-2222-2222-222222222222",
        authority_host: &authority.url(),
        ca_file: Some(authority.ca_file()),
        timeout: Duration::from_secs(10),
        token_file: TokenFile::new(&path, "api://AzureADTokenExchange"),
    })
    .unwrap();
    Setup {
        authority,
        exchanger,
        _dir: dir,
    }
}

async fn exchange(s: &Setup) -> ExchangeError {
    s.exchanger
        .exchange("11111111-1111-1111-1111-111111111111", SCOPE_RESOURCE)
        .await
        .expect_err("a hostile answer is no token")
}

/// Every shape of a 50 MB answer: success and error, declared and chunked, at once and slowly.
#[tokio::test]
async fn a_huge_answer_is_cut_at_64_kib_and_reported_as_transient_with_its_size() {
    for status in [200u16, 500] {
        for chunked in [false, true] {
            for paced in [false, true] {
                let mut answer = Answer::huge(status, BIG).header("Retry-After", "7");
                if chunked {
                    answer = answer.chunked();
                }
                if paced {
                    answer = answer.paced(Duration::from_millis(5));
                }
                let case = format!("status {status}, chunked {chunked}, paced {paced}");
                let s = setup(answer);
                let started = Instant::now();
                let err = exchange(&s).await;
                let ExchangeError::Transient {
                    message,
                    retry_after,
                } = &err
                else {
                    panic!("{case}: {err:?}");
                };
                assert!(
                    message.contains("65536") || message.contains("64 KiB"),
                    "{case}: the message names the limit: {message}"
                );
                if !chunked {
                    // A declared length over the cap is refused before any body byte.
                    assert!(message.contains("50000000"), "{case}: {message}");
                }
                if status == 500 {
                    assert_eq!(
                        *retry_after,
                        Some(Duration::from_secs(7)),
                        "{case}: an error answer keeps its Retry-After"
                    );
                }
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "{case}: no waiting for the rest: {:?}",
                    started.elapsed()
                );
                // Give the writer a moment to notice the closed connection, then count.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let written = s.authority.body_bytes_written();
                assert!(
                    written < BUFFERED,
                    "{case}: the client stopped reading: {written} bytes taken"
                );
                assert_eq!(s.authority.received().len(), 1, "{case}: one request");
            }
        }
    }
}

#[tokio::test]
async fn an_aadsts_error_under_the_cap_is_still_classified() {
    let body = serde_json::json!({
        "error": "invalid_client",
        "error_description": "AADSTS70021: No matching federated identity record found for presented assertion.\r\nTrace ID: x",
        "error_codes": [70021],
    });
    let s = setup(Answer::json(400, &body));
    match exchange(&s).await {
        ExchangeError::Permanent { code, .. } => assert_eq!(code, "AADSTS70021"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_the_assertion_goes_nowhere_else() {
    let sink = HostileAuthority::start_plain(Answer::json(200, &serde_json::json!({})));
    let steal = format!("{}/steal", sink.url());
    for status in [301u16, 302, 307, 308] {
        let s = setup(Answer::redirect(status, &steal));
        let err = exchange(&s).await;
        let ExchangeError::Permanent {
            description, hint, ..
        } = &err
        else {
            panic!("{status}: {err:?}");
        };
        assert!(
            description.contains(&steal),
            "names the Location: {description}"
        );
        assert!(description.contains(&status.to_string()), "{description}");
        assert!(hint.contains("--authority-host"), "{hint}");
        assert_eq!(s.authority.received().len(), 1, "{status}: asked once");
        // The discovery document is not followed either.
        let pre = s.exchanger.preconnect().await.unwrap();
        assert!(pre.contains(&status.to_string()), "{pre}");
    }
    assert!(
        sink.received().is_empty(),
        "nothing reached the redirect's target: {:?}",
        sink.received()
    );
}

#[tokio::test]
async fn an_absurd_expires_in_is_a_transient_error_not_a_panic() {
    for expires_in in [
        serde_json::json!(100_000_000_000_000_000u64),
        serde_json::json!("100000000000000000"),
        serde_json::json!(-5),
        serde_json::json!(0),
        serde_json::json!(9_000_000),
    ] {
        let body = serde_json::json!({
            "token_type": "Bearer",
            "access_token": "eyJ0eXAiOiJKV1QifQ.e30.sig",
            "expires_in": expires_in,
        });
        let s = setup(Answer::json(200, &body));
        match exchange(&s).await {
            ExchangeError::Transient { message, .. } => {
                assert!(message.contains("expires_in"), "{expires_in}: {message}");
                assert!(
                    !message.contains("eyJ0eXAi"),
                    "no token in messages: {message}"
                );
            }
            other => panic!("{expires_in}: {other:?}"),
        }
    }
    // A normal lifetime passes the check (and the token comes back).
    let body = serde_json::json!({
        "token_type": "Bearer",
        "access_token": "eyJ0eXAiOiJKV1QifQ.e30.sig",
        "expires_in": 3599,
    });
    let s = setup(Answer::json(200, &body));
    let token = s
        .exchanger
        .exchange("11111111-1111-1111-1111-111111111111", SCOPE_RESOURCE)
        .await
        .unwrap();
    assert!(token.expires_on > token.not_before + 3500);
}

#[tokio::test]
async fn a_huge_discovery_document_fails_preconnect_without_reading_it() {
    for chunked in [false, true] {
        let mut answer = Answer::huge(200, BIG);
        if chunked {
            answer = answer.chunked();
        }
        let s = setup(answer);
        let err = s.exchanger.preconnect().await.unwrap_err();
        assert!(err.contains("65536"), "{err}");
        assert!(
            err.contains("openid-configuration"),
            "names what was read: {err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(s.authority.body_bytes_written() < BUFFERED);
    }
}
