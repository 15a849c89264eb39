//! End to end: the real `imds-broker webhook` binary over HTTPS on loopback — admission,
//! malformed input, certificate hot reload, the ServiceAccount lookup through a fake API
//! server, metrics, and a clean exit on SIGTERM.

use crate::support::webhook::{fixture_review, Webhook};
use crate::support::BIN;
use base64::Engine;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use testkit::kube_api::{ApiRequest, KubeApi};
use testkit::pki::TestPki;

/// Writes like kubelet updates a Secret volume: a complete new file renamed into place.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A client trusting the given CAs, opening a fresh connection per request (so every
/// request does a TLS handshake) and exposing the served certificate.
fn client(cas: &[&str]) -> reqwest::Client {
    let certs = cas
        .iter()
        .map(|pem| reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    imds_broker::crypto::install_default();
    reqwest::Client::builder()
        .tls_certs_only(certs)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn patched_sidecar_env(response: &Value) -> Vec<(String, String)> {
    let patch = response["response"]["patch"].as_str().expect("a patch");
    let ops: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap(),
    )
    .unwrap();
    let init = ops
        .as_array()
        .unwrap()
        .iter()
        .find(|op| op["path"] == "/spec/initContainers")
        .expect("the sidecar op");
    init["value"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The certificate the server presents in a full handshake (a fresh client each time: a
/// reused client would resume its TLS session and never see a new certificate).
async fn served_certificate(cas: &[&str], url: &str) -> Option<Vec<u8>> {
    let resp = client(cas).get(url).send().await.ok()?;
    let info = resp.extensions().get::<reqwest::tls::TlsInfo>()?;
    info.peer_certificate().map(<[u8]>::to_vec)
}

/// The webhook's `/metrics` text.
async fn metrics_text(webhook: &Webhook) -> String {
    reqwest::get(format!("http://{}/metrics", webhook.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the unlabelled series `name` in a metrics text.
fn sample<'a>(metrics: &'a str, name: &str) -> Option<&'a str> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
}

const EXPIRY: &str = "imds_broker_webhook_certificate_expiry_timestamp_seconds";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admits_over_https_reloads_its_certificate_and_exits_cleanly_on_sigterm() {
    // Known notAfters (2031-01-02T03:04:05Z, 2051-06-07T08:09:10Z) for the expiry metric.
    let first = TestPki::with_server_not_after(1_925_089_445);
    let second = TestPki::with_server_not_after(2_569_738_150);
    let webhook = Webhook::start(
        &first,
        &[
            "--kube-api-url",
            "none",
            "--client-id",
            "flag-client",
            "--tenant-id",
            "66666666-7777-8888-9999-000000000000",
        ],
    )
    .await;
    let both = [first.ca_pem(), second.ca_pem()];
    let http = client(&both);
    let metrics = metrics_text(&webhook).await;
    assert_eq!(sample(&metrics, EXPIRY), Some("1925089445"), "{metrics}");

    // A Velero data-upload pod is mutated.
    let resp = http
        .post(webhook.url())
        .json(&fixture_review())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["kind"], "AdmissionReview");
    assert_eq!(body["response"]["uid"], "e2e-uid-1");
    assert_eq!(body["response"]["allowed"], true);
    assert_eq!(body["response"]["patchType"], "JSONPatch");
    let env = patched_sidecar_env(&body);
    assert!(env.contains(&("AZURE_CLIENT_ID".into(), "flag-client".into())));
    assert!(env.contains(&(
        "AZURE_TENANT_ID".into(),
        "66666666-7777-8888-9999-000000000000".into()
    )));
    let header = &env.iter().find(|(n, _)| n == "IDENTITY_HEADER").unwrap().1;
    assert!(header.len() >= 43);
    assert!(
        !webhook.logs().contains(header.as_str()),
        "the header must never be logged"
    );

    // Malformed reviews are 400s, and the server keeps serving.
    for bad in [
        &b"{not json"[..],
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
    ] {
        let resp = http
            .post(webhook.url())
            .body(bad.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"], "bad_request");
    }
    assert_eq!(http.get(webhook.url()).send().await.unwrap().status(), 405);

    // Certificate rotation: new files on disk are served without a restart.
    assert_eq!(
        served_certificate(&both, &webhook.url()).await,
        Some(first.server_cert_der().to_vec())
    );
    replace(&webhook.key, second.server_key_pem());
    replace(&webhook.cert, second.server_cert_pem());
    let mut rotated = false;
    for _ in 0..200 {
        if served_certificate(&both, &webhook.url()).await
            == Some(second.server_cert_der().to_vec())
        {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "new certificate not served:\n{}", webhook.logs());
    // Clients that trust only the old CA are now refused; admission still works on the new.
    assert!(client(&[first.ca_pem()])
        .post(webhook.url())
        .json(&fixture_review())
        .send()
        .await
        .is_err());
    let resp = client(&[second.ca_pem()])
        .post(webhook.url())
        .json(&fixture_review())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Readiness and metrics on the plain-HTTP admin listener.
    let ready = reqwest::get(format!("http://{}/readyz", webhook.admin_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = metrics_text(&webhook).await;
    // The expiry is the certificate's now served.
    assert_eq!(sample(&metrics, EXPIRY), Some("2569738150"), "{metrics}");
    assert!(
        metrics.contains(r#"imds_broker_webhook_admissions_total{result="mutated"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"imds_broker_webhook_admissions_total{result="error"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"imds_broker_webhook_tls_reloads_total{result="success"}"#),
        "{metrics}"
    );

    let status = webhook.terminate().await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_comes_from_the_service_account_and_its_absence_refuses_the_pod() {
    // Plain HTTP, one annotated ServiceAccount, only for the webhook's own token.
    let api = KubeApi::builder()
        .service_account(
            "velero",
            "velero-server",
            &[
                ("azure.workload.identity/client-id", "sa-client-id"),
                (
                    "azure.workload.identity/tenant-id",
                    "contoso.onmicrosoft.com",
                ),
            ],
        )
        .bearer_token("webhook-sa-token")
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "webhook-sa-token\n").unwrap();
    let pki = TestPki::new();
    let mut webhook = Webhook::start(
        &pki,
        &[
            "--kube-api-url",
            api.url(),
            "--kube-token-file",
            token.to_str().unwrap(),
        ],
    )
    .await;
    let http = client(&[pki.ca_pem()]);

    let body: Value = http
        .post(webhook.url())
        .json(&fixture_review())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let env = patched_sidecar_env(&body);
    assert!(env.contains(&("AZURE_CLIENT_ID".into(), "sa-client-id".into())));
    assert!(env.contains(&("AZURE_TENANT_ID".into(), "contoso.onmicrosoft.com".into())));

    // Another ServiceAccount without annotations, and no --client-id: refused (fail closed),
    // naming the account and both fixes; counted and logged as no_identity.
    let mut review = fixture_review();
    review["request"]["object"]["spec"]["serviceAccountName"] = json!("plain");
    let body: Value = http
        .post(webhook.url())
        .json(&review)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["response"]["allowed"], false);
    assert!(body["response"].get("patch").is_none());
    let message = body["response"]["status"]["message"].as_str().unwrap();
    for part in [
        "service account velero/plain (no client ID, no tenant ID)",
        "azure.workload.identity/client-id and azure.workload.identity/tenant-id",
        "--client-id/--tenant-id (Helm: identity.clientId/identity.tenantId)",
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    let metrics = metrics_text(&webhook).await;
    assert!(
        metrics.contains(r#"imds_broker_webhook_admissions_total{result="no_identity"} 1"#),
        "{metrics}"
    );
    let refused = webhook
        .expect_json_line("pod refused", Duration::from_secs(10))
        .await;
    assert_eq!(refused["result"], "no_identity", "{refused}");
    assert_eq!(refused["reason"], message, "{refused}");

    let request = |account: &str| ApiRequest {
        path: format!("/api/v1/namespaces/velero/serviceaccounts/{account}"),
        authorization: Some("Bearer webhook-sa-token".into()),
    };
    assert_eq!(api.requests(), [request("velero-server"), request("plain")]);
    assert_eq!(webhook.terminate().await.code(), Some(0));
}

#[test]
fn refuses_to_start_without_a_usable_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("missing.crt");
    let output = Command::new(BIN)
        .args(["--log-format", "text", "webhook", "--sidecar-image", "x:1"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(dir.path().join("missing.key"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("missing.crt"), "{text}");
}

/// A connection that never starts (or never finishes) its TLS handshake is closed after the
/// 3-s handshake limit, not the 10-s request timeout: idle TCP connections from the pod network
/// cannot pile up against the cap while the API server's admissions wait.
#[tokio::test]
async fn a_connection_without_a_tls_handshake_is_closed_within_seconds() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let webhook = Webhook::start(&pki, &["--kube-api-url", "none"]).await;
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(webhook.addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(webhook.addr).await.unwrap();
    // The first bytes of a ClientHello record, then nothing.
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let resp = client(&[pki.ca_pem()])
        .post(webhook.url())
        .json(&fixture_review())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "admission is answered meanwhile");
    for (what, conn) in [("silent", &mut silent), ("half a ClientHello", &mut half)] {
        let mut buf = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "{what}: still open after 10 s");
        let took = started.elapsed();
        assert!(
            (Duration::from_millis(2500)..Duration::from_secs(6)).contains(&took),
            "{what}: closed after {took:?}"
        );
    }
    webhook.terminate().await;
}
