//! The ServiceAccount lookup against a fake API server on loopback: HTTPS with the cluster
//! CA, the bearer token re-read per request, the TTL cache, stale answers on errors, 404s,
//! untrusted certificates, timeouts and answers too large to be a ServiceAccount.

use imds_broker::webhook::identity::{
    ApiConfig, IdentitySource, LookupError, PartialIdentity, ServiceAccountLookup,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use testkit::kube_api::{ApiRequest, KubeApi};
use testkit::pki::TestPki;

/// HTTPS with `pki`'s certificate, serving velero/velero-server and velero/other (annotated).
async fn fake_api(pki: &TestPki) -> KubeApi {
    let annotations = [
        ("azure.workload.identity/client-id", "sa-client"),
        ("azure.workload.identity/tenant-id", "sa-tenant"),
        ("meta.helm.sh/release-name", "velero"),
    ];
    KubeApi::builder()
        .tls(pki)
        .service_account("velero", "velero-server", &annotations)
        .service_account("velero", "other", &annotations)
        .start()
        .await
}

fn lookup(api: &KubeApi, ca: &Path, token: &Path, ttl: Duration) -> ServiceAccountLookup {
    ServiceAccountLookup::new(
        ApiConfig {
            base_url: format!("{}/", api.url()),
            token_file: Some(token.to_path_buf()),
            ca_file: Some(ca.to_path_buf()),
            timeout: Duration::from_millis(1500),
        },
        ttl,
    )
    .unwrap()
}

fn files(pki: &TestPki) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    let token = dir.path().join("token");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    std::fs::write(&token, "token-one\n").unwrap();
    (dir, ca, token)
}

#[tokio::test]
async fn reads_annotations_over_https_with_the_cluster_ca_and_a_fresh_bearer_token() {
    let pki = TestPki::new();
    let api = fake_api(&pki).await;
    let (_dir, ca, token) = files(&pki);
    let sa = lookup(&api, &ca, &token, Duration::ZERO);

    let got = sa.lookup("velero", "velero-server").await.unwrap();
    assert_eq!(
        got,
        PartialIdentity::new(Some("sa-client"), Some("sa-tenant"))
    );

    std::fs::write(&token, "token-two").unwrap(); // kubelet rotated it
    sa.lookup("velero", "velero-server").await.unwrap();
    let request = |token: &str| ApiRequest {
        path: "/api/v1/namespaces/velero/serviceaccounts/velero-server".into(),
        authorization: Some(format!("Bearer {token}")),
    };
    assert_eq!(api.requests(), [request("token-one"), request("token-two")]);
}

#[tokio::test]
async fn answers_are_cached_for_the_ttl() {
    let pki = TestPki::new();
    let api = fake_api(&pki).await;
    let (_dir, ca, token) = files(&pki);
    let sa = lookup(&api, &ca, &token, Duration::from_secs(3600));
    for _ in 0..3 {
        sa.lookup("velero", "velero-server").await.unwrap();
    }
    sa.lookup("velero", "other").await.unwrap();
    assert_eq!(api.requests().len(), 2);
}

#[tokio::test]
async fn a_failed_refresh_uses_the_last_known_answer_and_no_answer_is_an_error() {
    let pki = TestPki::new();
    let api = fake_api(&pki).await;
    let (_dir, ca, token) = files(&pki);
    let sa = lookup(&api, &ca, &token, Duration::ZERO);
    let first = sa.lookup("velero", "velero-server").await.unwrap();
    api.answer_all(
        500,
        r#"{"kind":"Status","message":"etcdserver: request timed out"}"#,
    );
    assert_eq!(sa.lookup("velero", "velero-server").await.unwrap(), first);
    let err = sa.lookup("velero", "never-seen").await.unwrap_err();
    assert!(
        matches!(err, LookupError::Status { status: 500, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("etcdserver"), "{err}");
}

#[tokio::test]
async fn a_missing_account_has_no_identity() {
    let pki = TestPki::new();
    let api = fake_api(&pki).await;
    let (_dir, ca, token) = files(&pki);
    // The fake answers 404 (a `Status` object) for accounts it does not serve, as the API
    // server does.
    let sa = lookup(&api, &ca, &token, Duration::ZERO);
    assert_eq!(
        sa.lookup("velero", "gone").await.unwrap(),
        PartialIdentity::default()
    );
    assert_eq!(api.requests().len(), 1, "asked the API server");
}

#[tokio::test]
async fn an_untrusted_api_server_certificate_is_refused() {
    let pki = TestPki::new();
    let api = fake_api(&pki).await;
    let other = TestPki::new();
    let (_dir, ca, token) = files(&other);
    let sa = lookup(&api, &ca, &token, Duration::ZERO);
    let err = sa.lookup("velero", "velero-server").await.unwrap_err();
    assert!(matches!(err, LookupError::Request { .. }), "{err}");
    assert!(api.requests().is_empty());
}

#[tokio::test]
async fn a_hanging_api_server_times_out() {
    let pki = TestPki::new();
    let api = fake_api(&pki).await;
    let (_dir, ca, token) = files(&pki);
    api.hang();
    let sa = lookup(&api, &ca, &token, Duration::ZERO);
    let started = std::time::Instant::now();
    let err = sa.lookup("velero", "velero-server").await.unwrap_err();
    assert!(matches!(err, LookupError::Request { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn unusable_names_and_token_files_are_errors_not_requests() {
    let pki = TestPki::new();
    let api = fake_api(&pki).await;
    let (dir, ca, _token) = files(&pki);
    let sa = lookup(&api, &ca, &dir.path().join("missing-token"), Duration::ZERO);
    assert!(matches!(
        sa.lookup("velero", "velero-server").await.unwrap_err(),
        LookupError::Token { .. }
    ));
    assert!(matches!(
        sa.lookup("velero", "../../secrets").await.unwrap_err(),
        LookupError::InvalidName(_)
    ));
    assert!(api.requests().is_empty());
}

/// The API server's answer is sized by the peer: an 8-MiB "ServiceAccount" is refused, whether
/// it declares its length (refused before reading) or streams it chunked (refused once it
/// passes the cap), and never becomes an identity.
#[tokio::test]
async fn an_answer_larger_than_a_service_account_can_be_is_refused() {
    let pki = TestPki::new();
    let huge = "x".repeat(8 * 1024 * 1024);
    let api = KubeApi::builder()
        .tls(&pki)
        .service_account(
            "velero",
            "velero-server",
            &[
                ("azure.workload.identity/client-id", "sa-client"),
                ("padding", &huge),
            ],
        )
        .start()
        .await;
    let (_dir, ca, token) = files(&pki);
    let sa = lookup(&api, &ca, &token, Duration::ZERO);
    for framing in ["Content-Length", "chunked"] {
        if framing == "chunked" {
            api.chunked();
        }
        let err = sa.lookup("velero", "velero-server").await.unwrap_err();
        assert!(matches!(err, LookupError::TooLarge(_)), "{framing}: {err}");
        assert!(err.to_string().contains("524288-byte limit"), "{err}");
    }
    assert_eq!(api.requests().len(), 2);
}
