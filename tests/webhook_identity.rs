//! The ServiceAccount lookup against a fake API server on loopback: HTTPS with the cluster
//! CA, the bearer token re-read per request, the TTL cache, stale answers on errors, 404s,
//! untrusted certificates and timeouts.

#[path = "support/tls.rs"]
mod tls;
use bytes::Bytes;
use http_body_util::Full;
use imds_broker::listener::{self as server, Limits};
use imds_broker::webhook::identity::{
    ApiConfig, IdentitySource, LookupError, PartialIdentity, ServiceAccountLookup,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tls::TestPki;

/// What the fake API server answers, and what it saw.
#[derive(Default)]
struct ApiState {
    status: u16,
    body: String,
    hang: bool,
    requests: Vec<(String, Option<String>)>,
}

struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<ApiState>>,
    _stop: server::ShutdownTrigger,
}

fn service_account(client: &str, tenant: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": "velero-server",
            "namespace": "velero",
            "annotations": {
                "azure.workload.identity/client-id": client,
                "azure.workload.identity/tenant-id": tenant,
                "meta.helm.sh/release-name": "velero"
            }
        }
    })
    .to_string()
}

async fn fake_api(pki: &TestPki) -> FakeApi {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c"), pki.server_cert_pem()).unwrap();
    std::fs::write(dir.path().join("k"), pki.server_key_pem()).unwrap();
    let cert = Arc::new(
        imds_broker::webhook::tls::ReloadingCert::load(
            &dir.path().join("c"),
            &dir.path().join("k"),
        )
        .unwrap(),
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(Mutex::new(ApiState {
        status: 200,
        body: service_account("sa-client", "sa-tenant"),
        ..Default::default()
    }));
    let (trigger, shutdown) = server::shutdown_channel();
    let handler_state = state.clone();
    tokio::spawn(server::serve_with(
        listener,
        move |stream| {
            let acceptor = acceptor.clone();
            async move { acceptor.accept(stream).await }
        },
        move |req: hyper::Request<hyper::body::Incoming>, _| {
            let state = handler_state.clone();
            async move {
                let auth = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string());
                let (status, body, hang) = {
                    let mut s = state.lock().unwrap();
                    s.requests.push((req.uri().path().to_string(), auth));
                    (s.status, s.body.clone(), s.hang)
                };
                if hang {
                    std::future::pending::<()>().await;
                }
                hyper::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap()
            }
        },
        Limits::default(),
        shutdown,
        Duration::from_millis(10),
    ));
    FakeApi {
        addr,
        state,
        _stop: trigger,
    }
}

fn lookup(api: &FakeApi, ca: &Path, token: &Path, ttl: Duration) -> ServiceAccountLookup {
    ServiceAccountLookup::new(
        ApiConfig {
            base_url: format!("https://{}/", api.addr),
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
    let requests = api.state.lock().unwrap().requests.clone();
    assert_eq!(
        requests,
        [
            (
                "/api/v1/namespaces/velero/serviceaccounts/velero-server".to_string(),
                Some("Bearer token-one".to_string())
            ),
            (
                "/api/v1/namespaces/velero/serviceaccounts/velero-server".to_string(),
                Some("Bearer token-two".to_string())
            ),
        ]
    );
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
    assert_eq!(api.state.lock().unwrap().requests.len(), 2);
}

#[tokio::test]
async fn a_failed_refresh_uses_the_last_known_answer_and_no_answer_is_an_error() {
    let pki = TestPki::new();
    let api = fake_api(&pki).await;
    let (_dir, ca, token) = files(&pki);
    let sa = lookup(&api, &ca, &token, Duration::ZERO);
    let first = sa.lookup("velero", "velero-server").await.unwrap();
    {
        let mut s = api.state.lock().unwrap();
        s.status = 500;
        s.body = r#"{"kind":"Status","message":"etcdserver: request timed out"}"#.into();
    }
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
    {
        let mut s = api.state.lock().unwrap();
        s.status = 404;
        s.body = r#"{"kind":"Status","reason":"NotFound"}"#.into();
    }
    let sa = lookup(&api, &ca, &token, Duration::ZERO);
    assert_eq!(
        sa.lookup("velero", "gone").await.unwrap(),
        PartialIdentity::default()
    );
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
    assert!(api.state.lock().unwrap().requests.is_empty());
}

#[tokio::test]
async fn a_hanging_api_server_times_out() {
    let pki = TestPki::new();
    let api = fake_api(&pki).await;
    let (_dir, ca, token) = files(&pki);
    api.state.lock().unwrap().hang = true;
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
    assert!(api.state.lock().unwrap().requests.is_empty());
}
