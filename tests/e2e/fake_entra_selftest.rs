//! Proves the fake Entra server behaves like Entra over real HTTPS (a client trusting only the
//! test CA), so broker tests built on it test the broker and not the fake.

use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::fake_entra::{FakeAccessToken, FakeEntra, Fault, RateLimit, CLIENT_ASSERTION_TYPE};
use testkit::issuer::{SaClaims, TestIssuer, DEFAULT_SUBJECT};

const STORAGE_SCOPE: &str = "https://storage.azure.com//.default";
const ARM_SCOPE: &str = "https://management.azure.com//.default";
const WAIT: Duration = Duration::from_secs(10);

/// One token request; every field can be overridden.
struct TokenRequest {
    tenant: String,
    client_id: String,
    scope: String,
    assertion: String,
}

impl TokenRequest {
    fn valid(fake: &FakeEntra) -> Self {
        TokenRequest {
            tenant: fake.tenant_id(),
            client_id: fake.client_id(),
            scope: STORAGE_SCOPE.to_string(),
            assertion: fake.issuer().mint_valid(),
        }
    }

    fn body(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &self.client_id)
            .append_pair("scope", &self.scope)
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_assertion_type", CLIENT_ASSERTION_TYPE)
            .append_pair("client_assertion", &self.assertion)
            .finish()
    }

    async fn send(
        &self,
        fake: &FakeEntra,
        client: &reqwest::Client,
    ) -> reqwest::Result<reqwest::Response> {
        post_raw(fake, client, &self.tenant, self.body()).await
    }
}

async fn post_raw(
    fake: &FakeEntra,
    client: &reqwest::Client,
    tenant: &str,
    body: String,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!("{}/{tenant}/oauth2/v2.0/token", fake.authority()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
}

/// Sends and returns (status, JSON body), failing the test with context otherwise.
async fn exchange(fake: &FakeEntra, req: &TokenRequest) -> (u16, Value) {
    let response = req
        .send(fake, &fake.http_client())
        .await
        .expect("token request should get an HTTP response");
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.expect("body should be JSON");
    (status, body)
}

/// Asserts an Entra-shaped error with `code`; returns the body.
async fn expect_aad_error(fake: &FakeEntra, req: &TokenRequest, code: u64, error: &str) -> Value {
    let (status, body) = exchange(fake, req).await;
    assert_eq!(status, 400, "body: {body}");
    assert_eq!(body["error"], error, "body: {body}");
    assert_eq!(
        body["error_codes"],
        serde_json::json!([code]),
        "body: {body}"
    );
    let description = body["error_description"]
        .as_str()
        .expect("error_description");
    assert!(
        description.starts_with(&format!("AADSTS{code}: ")),
        "description: {description}"
    );
    for field in ["timestamp", "trace_id", "correlation_id"] {
        assert!(
            body[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field} missing: {body}"
        );
    }
    body
}

#[tokio::test]
async fn valid_assertion_gets_distinct_tokens_per_call() {
    let fake = FakeEntra::start();
    let (status, first) = exchange(&fake, &TokenRequest::valid(&fake)).await;
    assert_eq!(status, 200, "body: {first}");
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 3600, "numbers, not strings");
    assert_eq!(first["ext_expires_in"], 3600);

    let token = first["access_token"].as_str().expect("access_token");
    let claims = FakeAccessToken::decode(token).expect("fake access token decodes");
    assert_eq!(claims.aud, "https://storage.azure.com/");
    assert_eq!(claims.scope, STORAGE_SCOPE);
    assert_eq!(claims.appid, fake.client_id());
    assert_eq!(claims.tid, fake.tenant_id());
    assert_eq!((claims.seq, claims.call), (1, 1));
    assert_eq!(claims.exp - claims.iat, 3600);

    let arm = TokenRequest {
        scope: ARM_SCOPE.to_string(),
        ..TokenRequest::valid(&fake)
    };
    let (status, second) = exchange(&fake, &arm).await;
    assert_eq!(status, 200, "body: {second}");
    assert_ne!(second["access_token"], first["access_token"]);
    let claims = FakeAccessToken::decode(second["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims.aud, "https://management.azure.com/");
    assert_eq!(claims.seq, 2);

    assert_eq!(fake.calls(), 2);
    assert_eq!(fake.tokens_issued(), 2);
    assert_eq!(fake.calls_for_scope(STORAGE_SCOPE), 1);
    assert_eq!(fake.calls_for_resource("https://management.azure.com/"), 1);
}

#[tokio::test]
async fn client_without_the_test_ca_is_refused() {
    let fake = FakeEntra::start();
    // Default roots only: the fake's certificate must not verify.
    imds_broker::crypto::install_default();
    let untrusting = reqwest::Client::builder().build().unwrap();
    let err = TokenRequest::valid(&fake)
        .send(&fake, &untrusting)
        .await
        .expect_err("a client without the test CA must fail the TLS handshake");
    assert!(
        err.is_connect(),
        "expected a connect (TLS) error, got {err:?}"
    );
    assert_eq!(fake.calls(), 0);
}

#[tokio::test]
async fn wrong_subject_is_70021_until_the_record_matches() {
    let fake = FakeEntra::start();
    let other = "system:serviceaccount:velero:someone-else";
    let req = TokenRequest {
        assertion: fake.issuer().mint(fake.issuer().claims().with_sub(other)),
        ..TokenRequest::valid(&fake)
    };
    let body = expect_aad_error(&fake, &req, 70021, "invalid_client").await;
    assert!(
        body["error_description"].as_str().unwrap().contains(other),
        "Entra names the presented subject: {body}"
    );

    // The record can be changed while running.
    fake.set_federated_subject(other);
    let (status, body) = exchange(&fake, &req).await;
    assert_eq!(status, 200, "body: {body}");
    expect_aad_error(&fake, &TokenRequest::valid(&fake), 70021, "invalid_client").await;
}

#[tokio::test]
async fn wrong_issuer_or_audience_is_70021() {
    let fake = FakeEntra::start();
    let foreign = TestIssuer::with_issuer("https://oidc.other.local");
    let req = TokenRequest {
        assertion: foreign.mint_valid(),
        ..TokenRequest::valid(&fake)
    };
    expect_aad_error(&fake, &req, 70021, "invalid_client").await;

    let req = TokenRequest {
        assertion: fake.issuer().mint(
            fake.issuer()
                .claims()
                .with_aud("api://AzureADTokenExchangeChina"),
        ),
        ..TokenRequest::valid(&fake)
    };
    expect_aad_error(&fake, &req, 70021, "invalid_client").await;
}

#[tokio::test]
async fn expired_or_future_assertion_is_700024() {
    let fake = FakeEntra::start();
    let expired = TokenRequest {
        assertion: fake.issuer().mint(fake.issuer().claims().expired()),
        ..TokenRequest::valid(&fake)
    };
    expect_aad_error(&fake, &expired, 700024, "invalid_client").await;

    let future = TokenRequest {
        assertion: fake.issuer().mint(fake.issuer().claims().not_yet_valid()),
        ..TokenRequest::valid(&fake)
    };
    expect_aad_error(&fake, &future, 700024, "invalid_client").await;
    assert_eq!(fake.tokens_issued(), 0);
}

#[tokio::test]
async fn unknown_client_is_700016_and_client_id_can_change() {
    let fake = FakeEntra::start();
    let stranger = "11111111-2222-4333-8444-555555555555";
    let req = TokenRequest {
        client_id: stranger.to_string(),
        ..TokenRequest::valid(&fake)
    };
    let body = expect_aad_error(&fake, &req, 700016, "unauthorized_client").await;
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains(stranger));

    fake.set_client_id(stranger);
    assert_eq!(exchange(&fake, &req).await.0, 200);
}

#[tokio::test]
async fn unknown_tenant_is_90002_and_tenant_can_change() {
    let fake = FakeEntra::start();
    let other_tenant = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
    let req = TokenRequest {
        tenant: other_tenant.to_string(),
        ..TokenRequest::valid(&fake)
    };
    expect_aad_error(&fake, &req, 90002, "invalid_request").await;
    assert_eq!(
        fake.calls(),
        1,
        "an unknown tenant still reached the endpoint"
    );

    fake.set_tenant_id(other_tenant);
    assert_eq!(exchange(&fake, &req).await.0, 200);
    assert!(fake.token_url().contains(other_tenant));
}

#[tokio::test]
async fn bad_signature_and_non_jwt_are_rejected() {
    let fake = FakeEntra::start();
    // Swap in a different payload under the original signature.
    let good = fake.issuer().mint_valid();
    let other = fake
        .issuer()
        .mint(fake.issuer().claims().with_claim("extra", "x".into()));
    let parts: Vec<&str> = good.split('.').collect();
    let other_payload = other.split('.').nth(1).unwrap();
    let tampered = format!("{}.{}.{}", parts[0], other_payload, parts[2]);
    let req = TokenRequest {
        assertion: tampered,
        ..TokenRequest::valid(&fake)
    };
    expect_aad_error(&fake, &req, 700027, "invalid_client").await;

    let req = TokenRequest {
        assertion: "not-a-jwt".to_string(),
        ..TokenRequest::valid(&fake)
    };
    expect_aad_error(&fake, &req, 50027, "invalid_request").await;
}

#[tokio::test]
async fn malformed_requests_get_entra_errors() {
    let fake = FakeEntra::start();
    let client = fake.http_client();

    let bad_scope = TokenRequest {
        scope: "https://storage.azure.com/user_impersonation".to_string(),
        ..TokenRequest::valid(&fake)
    };
    expect_aad_error(&fake, &bad_scope, 1002012, "invalid_scope").await;

    let response = post_raw(&fake, &client, &fake.tenant_id(), "client_id=x".to_string())
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error_codes"][0], 900144, "missing grant_type: {body}");

    let get = client.get(fake.token_url()).send().await.unwrap();
    assert_eq!(get.status(), 400);
    let body: Value = get.json().await.unwrap();
    assert_eq!(body["error_codes"][0], 900561, "GET: {body}");

    let not_found = client
        .get(format!("{}/metadata/identity", fake.authority()))
        .send()
        .await
        .unwrap();
    assert_eq!(not_found.status(), 404);
    assert_eq!(fake.calls(), 3, "the 404 path is not the token endpoint");
}

#[tokio::test]
async fn injected_503_carries_retry_after_then_recovers() {
    let fake = FakeEntra::start();
    fake.push_fault(Fault::StatusRetryAfter(503, 7));
    let response = TokenRequest::valid(&fake)
        .send(&fake, &fake.http_client())
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("7")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable");

    // One-shot: the next call is answered normally.
    assert_eq!(fake.queued_faults(), 0);
    assert_eq!(exchange(&fake, &TokenRequest::valid(&fake)).await.0, 200);
    let log = fake.call_log();
    assert_eq!(log[0].fault, Some(Fault::StatusRetryAfter(503, 7)));
    assert_eq!(log[1].fault, None);
}

#[tokio::test]
async fn queued_faults_run_in_order_before_the_sticky_one() {
    let fake = FakeEntra::start();
    fake.push_faults([Fault::Status(500), Fault::AadError(700016)]);
    fake.set_sticky_fault(Fault::Status(429));
    let req = TokenRequest::valid(&fake);
    assert_eq!(exchange(&fake, &req).await.0, 500);
    expect_aad_error(&fake, &req, 700016, "unauthorized_client").await;
    for _ in 0..2 {
        let response = req.send(&fake, &fake.http_client()).await.unwrap();
        assert_eq!(response.status(), 429);
        assert!(response.headers().get("retry-after").is_none());
    }
    fake.clear_sticky_fault();
    assert_eq!(exchange(&fake, &req).await.0, 200);
    assert_eq!(fake.calls(), 5);
    assert_eq!(fake.tokens_issued(), 1);
}

#[tokio::test]
async fn reset_drops_the_connection_without_a_response() {
    let fake = FakeEntra::start();
    fake.push_fault(Fault::Reset);
    let client = fake.http_client();
    let err = TokenRequest::valid(&fake)
        .send(&fake, &client)
        .await
        .expect_err("a reset connection must not yield a response");
    assert!(err.status().is_none(), "no HTTP status on a reset: {err:?}");
    // SO_LINGER=0 makes the close an RST, which the client sees as ECONNRESET.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    let mut reset_seen = false;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            reset_seen |= io.kind() == std::io::ErrorKind::ConnectionReset;
        }
        source = e.source();
    }
    assert!(
        reset_seen,
        "expected ECONNRESET in the error chain: {err:?}"
    );
    assert_eq!(fake.calls(), 1);
    // The same client recovers on a new connection.
    let ok = TokenRequest::valid(&fake)
        .send(&fake, &client)
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn garbage_is_a_200_that_is_not_json() {
    let fake = FakeEntra::start();
    fake.push_fault(Fault::Garbage);
    let response = TokenRequest::valid(&fake)
        .send(&fake, &fake.http_client())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(
        serde_json::from_str::<Value>(&text).is_err(),
        "body: {text}"
    );
    assert_eq!(fake.tokens_issued(), 0);
}

#[tokio::test]
async fn delays_really_delay() {
    let fake = FakeEntra::start();
    let delay = Duration::from_millis(300);
    fake.push_fault(Fault::Delay(delay));
    let started = Instant::now();
    assert_eq!(exchange(&fake, &TokenRequest::valid(&fake)).await.0, 200);
    assert!(started.elapsed() >= delay, "took {:?}", started.elapsed());

    let fixed = Duration::from_millis(150);
    fake.set_response_delay(fixed);
    let started = Instant::now();
    assert_eq!(exchange(&fake, &TokenRequest::valid(&fake)).await.0, 200);
    assert!(started.elapsed() >= fixed, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn rate_limit_throttles_past_the_bucket_then_refills() {
    let fake = FakeEntra::start();
    // A slow refill (1 per 2 s) so the burst, not the refill, decides the first answers.
    fake.set_rate_limit(Some(RateLimit {
        per_sec: 0.5,
        burst: 2.0,
        retry_after_secs: 3,
    }));
    let req = TokenRequest::valid(&fake);
    let client = fake.http_client();
    for _ in 0..2 {
        assert_eq!(exchange(&fake, &req).await.0, 200, "the bucket starts full");
    }
    let throttled_at = Instant::now();
    let response = req.send(&fake, &client).await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("3")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable");
    assert_eq!(body["error_codes"][0], 90055);
    assert_eq!(fake.throttled_calls(), 1);
    assert_eq!(fake.tokens_issued(), 2);
    assert_eq!(
        fake.call_log()[2].fault,
        Some(Fault::StatusRetryAfter(429, 3))
    );

    // Refused requests take no token: polling every 100 ms, the next token is issued once
    // one has refilled (~2 s after the burst was spent), not before.
    let deadline = Instant::now() + WAIT;
    loop {
        let response = req.send(&fake, &client).await.unwrap();
        if response.status() == 200 {
            break;
        }
        assert_eq!(response.status(), 429);
        assert!(Instant::now() < deadline, "the bucket never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = throttled_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "refilled after {waited:?}, faster than 0.5/s"
    );
    assert!(fake.throttled_calls() >= 10, "{}", fake.throttled_calls());
    assert_eq!(fake.tokens_issued(), 3);

    // Injected faults come first and leave the bucket alone; removing the limit ends it.
    fake.push_fault(Fault::Status(500));
    assert_eq!(exchange(&fake, &req).await.0, 500);
    fake.set_rate_limit(None);
    for _ in 0..3 {
        assert_eq!(exchange(&fake, &req).await.0, 200);
    }
}

#[tokio::test]
async fn call_log_names_the_assertion_jti() {
    let fake = FakeEntra::start();
    let mut req = TokenRequest::valid(&fake);
    assert_eq!(exchange(&fake, &req).await.0, 200);
    req.assertion = fake.issuer().mint(
        fake.issuer()
            .claims()
            .with_claim("jti", Value::from("fleet-7")),
    );
    assert_eq!(exchange(&fake, &req).await.0, 200);
    let log = fake.call_log();
    assert_eq!(log[0].jti, None);
    assert_eq!(log[1].jti.as_deref(), Some("fleet-7"));
}

#[tokio::test]
async fn token_lifetime_is_configurable() {
    let fake = FakeEntra::start();
    fake.set_token_lifetime(Duration::from_secs(120));
    let (status, body) = exchange(&fake, &TokenRequest::valid(&fake)).await;
    assert_eq!(status, 200);
    assert_eq!(body["expires_in"], 120);
    let claims = FakeAccessToken::decode(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims.exp - claims.iat, 120);
}

#[tokio::test]
async fn wait_for_calls_wakes_on_arrival_and_times_out() {
    let fake = FakeEntra::start();
    // Already satisfied: returns at once.
    assert_eq!(fake.wait_for_calls(0, WAIT).await.unwrap(), 0);

    // Run the waiter concurrently with the requests it waits for.
    let requests = async {
        futures::future::join_all((0..3).map(|_| async {
            TokenRequest::valid(&fake)
                .send(&fake, &fake.http_client())
                .await
                .map(|r| r.status().as_u16())
        }))
        .await
    };
    let (waited, statuses) = tokio::join!(fake.wait_for_calls(3, WAIT), requests);
    assert!(waited.expect("three calls arrive") >= 3);
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(200))),
        "{statuses:?}"
    );
    assert_eq!(
        fake.wait_for_scope_calls(STORAGE_SCOPE, 3, WAIT)
            .await
            .unwrap(),
        3
    );
    assert_eq!(fake.wait_for_tokens_issued(3, WAIT).await.unwrap(), 3);

    let err = fake
        .wait_for_calls(4, Duration::from_millis(100))
        .await
        .expect_err("no fourth call is made");
    assert_eq!((err.wanted, err.got), (4, 3));
    assert!(err.to_string().contains("calls"), "{err}");

    let times = fake.call_times();
    assert_eq!(times.len(), 3);
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "times are in arrival order"
    );

    fake.reset_counters();
    assert_eq!((fake.calls(), fake.tokens_issued()), (0, 0));
    assert!(fake.calls_by_scope().is_empty());
}

#[test]
fn works_without_an_async_runtime_and_writes_token_files() {
    // The fake runs its own runtime, so it can be started and dropped from sync code.
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    let token = fake.issuer().write_to(&path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), token);
    let claims = fake.issuer().claims();
    assert_eq!(claims.sub, DEFAULT_SUBJECT);
    // Rewriting replaces the content (atomic rename), leaving no temp files behind.
    let newer = fake
        .issuer()
        .write_claims_to(&path, SaClaims::new().with_sub("system:serviceaccount:a:b"))
        .unwrap();
    assert_ne!(newer, token);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), newer);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    assert!(fake.ca_file().exists());
    assert!(fake.authority().starts_with("https://localhost:"));
}

#[tokio::test]
async fn instance_discovery_names_the_tenant_discovery_endpoint_of_the_authority() {
    // MSAL for Go asks this before the openid-configuration when it does not know the host.
    let fake = FakeEntra::start();
    let client = fake.http_client();
    let host = fake.authority().trim_start_matches("https://").to_string();
    let tenant = fake.tenant_id();
    let url = format!("{}/common/discovery/instance", fake.authority());
    let authorize = format!("https://{host}/{tenant}/oauth2/v2.0/authorize");
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("api-version", "1.1")
        .append_pair("authorization_endpoint", &authorize)
        .finish();
    let r = client.get(format!("{url}?{query}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let doc: Value = r.json().await.unwrap();
    let tde = doc["tenant_discovery_endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        tde,
        format!("https://{host}/{tenant}/v2.0/.well-known/openid-configuration")
    );
    assert_eq!(doc["metadata"][0]["aliases"][0], host.as_str());
    // The endpoint it names is served and leads to the token endpoint.
    let oidc: Value = client.get(&tde).send().await.unwrap().json().await.unwrap();
    assert_eq!(oidc["token_endpoint"], fake.token_url().as_str());
    assert_eq!(
        oidc["authorization_endpoint"],
        authorize.as_str(),
        "MSAL for Go refuses a document without it"
    );
    // Without a valid authorization endpoint: Entra's invalid_instance.
    let bad = client
        .get(format!("{url}?authorization_endpoint=not-a-url"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let err: Value = bad.json().await.unwrap();
    assert_eq!(err["error"], "invalid_instance");
    // Neither is a token call.
    assert_eq!(fake.calls(), 0);
}

#[tokio::test]
async fn msal_openid_scopes_beside_the_resource_are_ignored() {
    let fake = FakeEntra::start();
    // MSAL's OpenID Connect scopes beside the resource are ignored (MSAL for Go always sends
    // them), but they are no resource on their own and do not make two resources valid.
    let msal = TokenRequest {
        scope: format!("{STORAGE_SCOPE} openid offline_access profile"),
        ..TokenRequest::valid(&fake)
    };
    assert_eq!(exchange(&fake, &msal).await.0, 200);
    for scope in [
        "openid offline_access profile",
        &format!("{STORAGE_SCOPE} {ARM_SCOPE} openid"),
    ] {
        let req = TokenRequest {
            scope: scope.to_string(),
            ..TokenRequest::valid(&fake)
        };
        expect_aad_error(&fake, &req, 1002012, "invalid_scope").await;
    }
}
