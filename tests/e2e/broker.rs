//! End-to-end tests of the real `imds-broker serve` binary against the fake Entra (HTTPS, test
//! CA) or the built-in emulator.

use crate::support::broker::{enc, token_dir, BrokerBuilder, ARM, IDENTITY_HEADER, STORAGE};
use crate::support::raw;
use futures::future::join_all;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use testkit::fake_entra::{FakeAccessToken, FakeEntra, Fault};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Asks the broker until it serves a token with sequence >= `n`: the fake counts a token as
/// issued before the broker has received and stored it. Bounded at 5 s.
async fn wait_served_seq(broker: &crate::support::broker::Broker, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = broker.imds_token(STORAGE).await;
        let s = seq(r.field("access_token"));
        if s >= n || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn seq(access_token: &str) -> u64 {
    FakeAccessToken::decode(access_token)
        .expect("a token issued by the fake Entra")
        .seq
}

// ---------------------------------------------------------------------------------------
// Wire formats

#[tokio::test]
async fn imds_success_body_has_every_field_as_a_string() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    for f in [
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "not_before",
        "resource",
        "token_type",
    ] {
        assert!(
            r.body[f].is_string(),
            "{f} must be a JSON string: {}",
            r.raw
        );
        assert!(!r.field(f).is_empty(), "{f} must not be empty");
    }
    assert_eq!(r.field("resource"), STORAGE);
    assert_eq!(r.field("token_type"), "Bearer");
    assert_eq!(r.field("client_id"), fake.client_id());
    let expires_on: u64 = r.field("expires_on").parse().unwrap();
    let expires_in: u64 = r.field("expires_in").parse().unwrap();
    assert!(
        expires_on.abs_diff(now() + 3600) <= 5,
        "expires_on {expires_on}"
    );
    assert!(expires_in.abs_diff(3600) <= 5, "expires_in {expires_in}");
    assert!(r.retry_after.is_none(), "no Retry-After on a 200");
    let tok = FakeAccessToken::decode(r.field("access_token")).unwrap();
    assert_eq!(tok.scope, "https://storage.azure.com//.default");
}

#[tokio::test]
async fn app_service_success_uses_unix_seconds_string() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let r = broker
        .app_service(&format!("api-version=2019-08-01&resource={}", enc(ARM)))
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let expires_on: u64 = r.field("expires_on").parse().expect("digits");
    assert!(expires_on.abs_diff(now() + 3600) <= 5);
    assert_eq!(r.field("client_id"), fake.client_id());
    assert_eq!(r.field("resource"), ARM);
    assert!(r.retry_after.is_none());
}

#[tokio::test]
async fn imds_request_errors_are_json_400s_and_cost_no_entra_call() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let res = enc(STORAGE);
    let ok_q = format!("api-version=2018-02-01&resource={res}");

    // No Metadata header.
    let r = broker.get(&broker.imds_url(&ok_q), &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"], "invalid_request");
    assert!(r.description().contains("metadata header"), "{}", r.raw);

    // Metadata: false is as good as none.
    let r = broker
        .get(&broker.imds_url(&ok_q), &[("Metadata", "false")])
        .await;
    assert_eq!(r.status, 400);

    // Proxied request.
    let r = broker
        .get(
            &broker.imds_url(&ok_q),
            &[("Metadata", "true"), ("X-Forwarded-For", "10.0.0.1")],
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.description().contains("X-Forwarded-For"));

    // api-version missing, then unknown: both list the supported versions.
    let r = broker.imds(&format!("resource={res}")).await;
    assert_eq!(r.status, 400);
    assert!(r.description().contains("api-version"));
    assert!(r.body["newest-versions"].is_array(), "{}", r.raw);
    let r = broker
        .imds(&format!("api-version=1999-01-01&resource={res}"))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.description().contains("1999-01-01"));

    // Missing / empty resource.
    let r = broker.imds("api-version=2018-02-01").await;
    assert_eq!(r.status, 400);
    assert!(r.description().contains("resource"));
    let r = broker.imds("api-version=2018-02-01&resource=").await;
    assert_eq!(r.status, 400);

    // Duplicated parameter.
    let r = broker
        .imds(&format!(
            "api-version=2018-02-01&resource={res}&resource={res}"
        ))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.description().contains("Duplicate"));

    // Unknown identities.
    for sel in [
        "client_id=00000000-1111-2222-3333-444444444444",
        "object_id=00000000-1111-2222-3333-444444444444",
        "msi_res_id=/subscriptions/x/resourceGroups/y/providers/Microsoft.ManagedIdentity/userAssignedIdentities/z",
        "mi_res_id=/subscriptions/x",
    ] {
        let r = broker.imds(&format!("{ok_q}&{sel}")).await;
        assert_eq!(r.status, 400, "{sel}");
        assert!(
            r.description().starts_with("Identity not found"),
            "{sel}: {}",
            r.raw
        );
    }

    // Two selectors at once.
    let r = broker
        .imds(&format!(
            "{ok_q}&client_id={}&object_id=abc",
            fake.client_id()
        ))
        .await;
    assert_eq!(r.status, 400);

    // Wrong method, other metadata paths, unknown paths: JSON, never instance metadata.
    let resp = broker
        .http
        .post(broker.imds_url(&ok_q))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    for path in [
        "/metadata/instance?api-version=2021-02-01",
        "/metadata/instance/compute",
        "/",
    ] {
        let r = broker
            .get(
                &format!("http://{}{path}", broker.token_addr),
                &[("Metadata", "true")],
            )
            .await;
        assert_eq!(r.status, 404, "{path}");
        assert!(
            r.description().contains("not served by imds-broker"),
            "{}",
            r.raw
        );
    }

    assert_eq!(fake.calls(), 0, "no request above may reach Entra");
}

#[tokio::test]
async fn empty_or_matching_client_id_selects_the_configured_identity() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let base = format!("api-version=2018-02-01&resource={}", enc(STORAGE));
    let r = broker.imds(&format!("{base}&client_id=")).await;
    assert_eq!(
        r.status, 200,
        "Velero 1.15 sends an empty client_id: {}",
        r.raw
    );
    let upper = fake.client_id().to_uppercase();
    let r = broker.imds(&format!("{base}&client_id={upper}")).await;
    assert_eq!(r.status, 200, "GUIDs compare case-insensitively: {}", r.raw);
}

#[tokio::test]
async fn app_service_checks_header_and_version() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let q = format!("api-version=2019-08-01&resource={}", enc(STORAGE));
    let url = broker.app_service_url(&q);

    let r = broker.get(&url, &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("X-IDENTITY-HEADER"));
    assert_eq!(r.body["statusCode"], 401);
    assert!(r.body["error"].is_string());

    let r = broker.get(&url, &[("X-IDENTITY-HEADER", "wrong")]).await;
    assert_eq!(r.status, 401);

    let r = broker
        .app_service(&format!("api-version=2017-09-01&resource={}", enc(STORAGE)))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.description().contains("2019-08-01"));

    let r = broker
        .app_service(&format!("{q}&principal_id=not-this-one"))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.description().starts_with("Identity not found"));
    assert_eq!(fake.calls(), 0);
}

#[tokio::test]
async fn app_service_is_disabled_without_identity_header() {
    let broker = BrokerBuilder::emulate().no_identity_header().spawn().await;
    let r = broker
        .get(
            &broker.app_service_url("api-version=2019-08-01&resource=x"),
            &[("X-IDENTITY-HEADER", IDENTITY_HEADER)],
        )
        .await;
    assert_eq!(r.status, 404);
    assert!(r.description().contains("IDENTITY_HEADER"));
}

// ---------------------------------------------------------------------------------------
// Cache, coalescing, refresh

#[tokio::test]
async fn hundreds_of_concurrent_cold_requests_cause_one_entra_call() {
    let fake = FakeEntra::start();
    fake.set_response_delay(Duration::from_millis(300));
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let replies = join_all((0..300).map(|i| {
        let b = &broker;
        async move {
            if i % 2 == 0 {
                b.imds_token(STORAGE).await
            } else {
                b.app_service(&format!("api-version=2019-08-01&resource={}", enc(STORAGE)))
                    .await
            }
        }
    }))
    .await;
    let first = replies[0].field("access_token").to_owned();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.raw);
        assert_eq!(
            r.field("access_token"),
            first,
            "all callers share the one token"
        );
    }
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn cached_tokens_cause_no_entra_call() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let first = broker.imds_token(STORAGE).await;
    for _ in 0..20 {
        let r = broker.imds_token(STORAGE).await;
        assert_eq!(r.field("access_token"), first.field("access_token"));
    }
    assert_eq!(fake.calls(), 1);
    assert_eq!(
        broker
            .metric("imds_broker_cache_lookups_total{result=\"hit\"}")
            .await,
        20.0
    );
    // A different resource is a different cache entry.
    broker.imds_token(ARM).await;
    assert_eq!(fake.calls(), 2);
    assert_eq!(fake.calls_for_resource(ARM), 1);
}

#[tokio::test]
async fn tokens_are_refreshed_in_the_background_before_expiry() {
    let fake = FakeEntra::start();
    fake.set_token_lifetime(Duration::from_secs(6));
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(seq(r.field("access_token")), 1);
    let first_call = fake.call_times()[0];
    // Asked for again: only entries used since their token was obtained are refreshed.
    assert_eq!(
        seq(broker.imds_token(STORAGE).await.field("access_token")),
        1
    );
    // Refresh at half-life (3 s), driven by the broker itself, with no request in between.
    fake.wait_for_tokens_issued(2, Duration::from_secs(10))
        .await
        .expect("a background refresh");
    let at = fake.call_times()[1] - first_call;
    // Half-life is 3 s. Expiry has whole-second resolution (as on the wire), so the refresh
    // may come up to 0.5 s early; a loaded CI machine may wake the refresher late, but never
    // after expiry.
    assert!(
        at >= Duration::from_millis(2400) && at < Duration::from_millis(6000),
        "refresh at half-life, not {at:?}"
    );
    assert!(
        wait_served_seq(&broker, 2).await >= 2,
        "the refreshed token is served"
    );
    let started = Instant::now();
    let r = broker.imds_token(STORAGE).await;
    assert!(seq(r.field("access_token")) >= 2);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "callers never wait once warm"
    );
}

#[tokio::test]
async fn prefetch_warms_the_cache_at_start() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf)
        .args(["--prefetch", STORAGE])
        .spawn()
        .await;
    fake.wait_for_calls(1, Duration::from_secs(10))
        .await
        .expect("prefetch calls Entra");
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 200);
    assert_eq!(fake.calls(), 1, "the request was a cache hit");
}

// ---------------------------------------------------------------------------------------
// Failures: retries, Retry-After, stale-while-error, permanent errors

#[tokio::test]
async fn transient_failures_are_retried_within_the_request() {
    let fake = FakeEntra::start();
    fake.push_faults([Fault::Status(500), Fault::Reset, Fault::Garbage]);
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(fake.calls(), 4);
    assert_eq!(
        broker
            .metric("imds_broker_entra_requests_total{outcome=\"transient\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn the_first_exchange_reuses_the_connection_opened_at_start() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let mut broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    broker.expect_log("connected to Entra ID").await;
    assert_eq!(fake.discovery_requests(), 1);
    assert_eq!(
        fake.calls(),
        0,
        "no token is requested before a caller asks"
    );
    assert_eq!(broker.imds_token(STORAGE).await.status, 200);
    assert_eq!(fake.calls(), 1);
    assert_eq!(
        fake.connections(),
        1,
        "the token request used the open connection"
    );
}

#[tokio::test]
async fn an_unreachable_entra_is_named_at_start_without_failing_readiness() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    // Nothing listens on port 1.
    let mut broker = BrokerBuilder::entra(&fake, &tf)
        .set("--authority-host", "https://127.0.0.1:1")
        .spawn()
        .await;
    broker.expect_log("cannot reach Entra ID yet").await;
    assert!(
        broker.logs().contains("127.0.0.1:1"),
        "the log names the address"
    );
    assert_eq!(broker.admin("/readyz").await.0, 200);
}

#[tokio::test]
async fn a_slow_entra_gets_504_in_each_protocols_format_and_is_counted() {
    let fake = FakeEntra::start();
    fake.push_faults([
        Fault::Delay(Duration::from_secs(3)),
        Fault::Delay(Duration::from_secs(3)),
    ]);
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf)
        .args(["--request-timeout", "1s"])
        .spawn()
        .await;
    let started = Instant::now();
    let imds = broker.imds_token(STORAGE).await;
    assert_eq!(imds.status, 504, "{}", imds.raw);
    assert_eq!(imds.field("error"), "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered at the request timeout"
    );
    let app = broker
        .app_service(&format!("api-version=2019-08-01&resource={ARM}"))
        .await;
    assert_eq!(app.status, 504, "{}", app.raw);
    // App Service's own error shape (MSAL reads statusCode/message).
    assert_eq!(app.body["statusCode"], 504, "{}", app.raw);
    assert!(app.body["message"]
        .as_str()
        .unwrap_or_default()
        .contains("no token within 1s"));
    for endpoint in ["imds", "app_service"] {
        let sample =
            format!("imds_broker_http_requests_total{{endpoint=\"{endpoint}\",status=\"504\"}}");
        assert_eq!(broker.metric(&sample).await, 1.0, "{sample}");
    }
}

#[tokio::test]
async fn retry_after_is_honoured_before_calling_entra_again() {
    let fake = FakeEntra::start();
    fake.push_fault(Fault::StatusRetryAfter(429, 2));
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let times = fake.call_times();
    assert_eq!(times.len(), 2);
    assert!(
        times[1] - times[0] >= Duration::from_secs(2),
        "second call after {:?}",
        times[1] - times[0]
    );
}

#[tokio::test]
async fn long_retry_after_holds_callers_and_answers_a_wait_clients_honour() {
    let fake = FakeEntra::start();
    fake.push_fault(Fault::StatusRetryAfter(503, 30));
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf)
        .args(["--request-timeout", "2s"])
        .spawn()
        .await;
    let started = Instant::now();
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 503, "{}", r.raw);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "held until the request timeout: {:?}",
        started.elapsed()
    );
    let ra: u64 = r.retry_after.as_deref().unwrap().parse().unwrap();
    // Entra's 30 s is more than the smallest client cap (25 s): capped at 20 s.
    assert!((1..=20).contains(&ra), "Retry-After {ra}");
    assert_eq!(r.body["error"], "temporarily_unavailable");
    for _ in 0..2 {
        let r = broker.imds_token(STORAGE).await;
        assert_eq!(r.status, 503);
        assert!(r.retry_after.is_some());
    }
    assert_eq!(
        fake.calls(),
        1,
        "Entra is not called before Retry-After elapses"
    );
}

#[tokio::test]
async fn stale_token_is_served_while_entra_fails() {
    let fake = FakeEntra::start();
    fake.set_token_lifetime(Duration::from_secs(20));
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let first = broker.imds_token(STORAGE).await;
    assert_eq!(first.status, 200);
    // Asked for again, so it is refreshed at half-life.
    assert_eq!(broker.imds_token(STORAGE).await.status, 200);
    fake.set_sticky_fault(Fault::Status(503));
    // The refresh at half-life (10 s) fails; the still-valid token keeps being served.
    fake.wait_for_calls(2, Duration::from_secs(20))
        .await
        .expect("background refresh attempted");
    for _ in 0..3 {
        let r = broker.imds_token(STORAGE).await;
        assert_eq!(r.status, 200, "{}", r.raw);
        assert_eq!(r.field("access_token"), first.field("access_token"));
    }
    assert!(
        broker
            .metric("imds_broker_cache_lookups_total{result=\"stale\"}")
            .await
            >= 3.0
    );
    // Once Entra recovers, the next background attempt replaces it.
    fake.clear_sticky_fault();
    fake.wait_for_tokens_issued(2, Duration::from_secs(15))
        .await
        .expect("refresh after recovery");
    assert_eq!(wait_served_seq(&broker, 2).await, 2);
}

#[tokio::test]
async fn wrong_subject_surfaces_aadsts70021_and_is_not_retried_in_a_loop() {
    let fake = FakeEntra::start();
    fake.set_federated_subject("system:serviceaccount:other:sa");
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 401, "{}", r.raw);
    let d = r.description();
    assert!(d.contains("AADSTS70021"), "{d}");
    assert!(
        d.contains("system:serviceaccount:"),
        "the fix is named: {d}"
    );
    assert!(
        r.retry_after.is_none(),
        "no Retry-After on a configuration error"
    );
    let r = broker
        .app_service(&format!("api-version=2019-08-01&resource={}", enc(STORAGE)))
        .await;
    assert_eq!(r.status, 401);
    assert!(r.body["message"].as_str().unwrap().contains("AADSTS70021"));
    for _ in 0..20 {
        broker.imds_token(STORAGE).await;
    }
    assert_eq!(fake.calls(), 1, "permanent errors are answered from memory");
}

#[tokio::test]
async fn unknown_client_and_tenant_name_what_to_fix() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    // The app the broker names no longer exists in the tenant.
    fake.set_client_id("99999999-9999-9999-9999-999999999999");
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 401);
    assert!(r.description().contains("AADSTS700016"), "{}", r.raw);
    assert!(r.description().contains("AZURE_CLIENT_ID"), "{}", r.raw);

    let fake = FakeEntra::start();
    let (_dir2, tf2) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf2).spawn().await;
    fake.set_tenant_id("88888888-8888-8888-8888-888888888888");
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 401);
    assert!(r.description().contains("AADSTS90002"), "{}", r.raw);
    assert!(
        r.description().contains("AZURE_AUTHORITY_HOST"),
        "{}",
        r.raw
    );
}

// ---------------------------------------------------------------------------------------
// Policy

#[tokio::test]
async fn refused_resources_get_403_and_no_entra_call() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf)
        .env("IMDS_BROKER_ALLOW_RESOURCES", format!("{STORAGE},{ARM}"))
        .spawn()
        .await;
    let r = broker.imds_token("https://vault.azure.net").await;
    assert_eq!(r.status, 403, "{}", r.raw);
    assert!(r.description().contains("--allow-resource"));
    let r = broker
        .app_service("api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net")
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(fake.calls(), 0);
    // Allowed ones work, with or without the trailing slash.
    assert_eq!(
        broker.imds_token("https://storage.azure.com").await.status,
        200
    );
    assert_eq!(broker.imds_token(ARM).await.status, 200);
}

// ---------------------------------------------------------------------------------------
// The token file

#[tokio::test]
async fn token_file_is_reread_on_every_exchange() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    assert_eq!(broker.imds_token(STORAGE).await.status, 200);
    // Rotate to a token for another service account: Entra refuses the new assertion.
    fake.issuer()
        .write_claims_to(
            &tf,
            fake.issuer().claims().with_sub("system:serviceaccount:x:y"),
        )
        .unwrap();
    let r = broker.imds_token(ARM).await;
    assert_eq!(r.status, 401, "the rotated file was used: {}", r.raw);
    // Rotate back: a new resource works again.
    fake.issuer().write_to(&tf).unwrap();
    let r = broker.imds_token("https://vault.azure.net").await;
    assert_eq!(r.status, 200, "{}", r.raw);
}

#[tokio::test]
async fn missing_token_file_is_not_ready_until_it_appears() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("token");
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let (status, body) = broker.admin("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains(tf.to_str().unwrap()), "{body}");
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    assert!(r.description().contains(tf.to_str().unwrap()), "{}", r.raw);
    assert!(r.description().contains("does not exist"));
    let (status, _) = broker.admin("/healthz").await;
    assert_eq!(status, 200, "alive even when not ready");

    fake.issuer().write_to(&tf).unwrap();
    let (status, _) = broker.admin("/readyz").await;
    assert_eq!(status, 200);
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn expired_or_misaddressed_token_files_are_named_without_calling_entra() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    fake.issuer()
        .write_claims_to(&tf, fake.issuer().claims().expired())
        .unwrap();
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 503, "{}", r.raw);
    assert!(r.description().contains("expired"), "{}", r.raw);
    assert!(r.description().contains(tf.to_str().unwrap()));

    fake.issuer()
        .write_claims_to(
            &tf,
            fake.issuer()
                .claims()
                .with_aud("https://kubernetes.default.svc"),
        )
        .unwrap();
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 401, "{}", r.raw);
    assert!(
        r.description().contains("api://AzureADTokenExchange"),
        "{}",
        r.raw
    );
    assert!(r.description().contains("https://kubernetes.default.svc"));

    std::fs::write(&tf, "").unwrap();
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 503);
    assert!(r.description().contains("empty"));
    assert_eq!(fake.calls(), 0);
}

// ---------------------------------------------------------------------------------------
// Operations

#[tokio::test]
async fn secrets_never_reach_the_logs_even_at_trace_level() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let sa_token = std::fs::read_to_string(&tf).unwrap();
    let mut broker = BrokerBuilder::entra(&fake, &tf)
        .rust_log("trace")
        .spawn()
        .await;
    let a = broker.imds_token(STORAGE).await;
    let b = broker
        .app_service(&format!("api-version=2019-08-01&resource={}", enc(ARM)))
        .await;
    assert_eq!((a.status, b.status), (200, 200));
    broker
        .get(
            &broker.app_service_url("api-version=2019-08-01&resource=x"),
            &[("X-IDENTITY-HEADER", "wrong-guess-header")],
        )
        .await;
    fake.set_federated_subject("system:serviceaccount:no:match");
    broker.imds_token("https://vault.azure.net").await;
    broker.signal("TERM");
    broker.wait_exit(Duration::from_secs(10)).await;
    assert!(
        broker
            .wait_log("imds-broker stopped", Duration::from_secs(5))
            .await
    );
    let logs = broker.logs();
    assert!(logs.len() > 1000, "trace logging produced output");
    for (what, secret) in [
        ("SA token", sa_token.trim()),
        ("IMDS access token", a.field("access_token")),
        ("App Service access token", b.field("access_token")),
        ("identity header", IDENTITY_HEADER),
        ("presented identity header", "wrong-guess-header"),
    ] {
        assert!(!logs.contains(secret), "{what} leaked into the logs");
    }
    // Token pieces too: the JWT signature part is the secret-bearing bit.
    let sig = sa_token.trim().rsplit('.').next().unwrap();
    assert!(!logs.contains(sig), "SA token signature leaked");
}

#[tokio::test]
async fn refusals_are_logged_at_info_with_their_reason_and_rate_limited() {
    let mut broker = BrokerBuilder::emulate()
        .set("--allow-resource", STORAGE)
        .rust_log("info")
        .spawn()
        .await;
    let wrong = broker
        .get(
            &broker.app_service_url(&format!("api-version=2019-08-01&resource={}", enc(STORAGE))),
            &[("X-IDENTITY-HEADER", "wrong-guess-header")],
        )
        .await;
    assert_eq!(wrong.status, 401);
    assert!(
        broker
            .wait_log(
                "does not match this broker's IDENTITY_HEADER",
                Duration::from_secs(5)
            )
            .await
    );
    assert_eq!(
        broker.imds_token("https://vault.azure.net").await.status,
        403
    );
    assert!(
        broker
            .wait_log("is not allowed by this broker", Duration::from_secs(5))
            .await,
        "{}",
        broker.logs()
    );
    // A looping client: 200 refusals give at most the window's budget of lines.
    for _ in 0..200 {
        broker.imds("api-version=2018-02-01").await;
    }
    let before_stop = broker.logs();
    let lines = before_stop.matches("token request refused").count();
    assert!((3..=10).contains(&lines), "{lines} refusal lines");
    assert!(!before_stop.contains("wrong-guess-header"));
}

#[tokio::test]
async fn a_caller_still_waiting_when_the_grace_period_ends_gets_503_with_retry_after() {
    let fake = FakeEntra::start();
    // Entra answers long after the 1-s grace period.
    fake.set_response_delay(Duration::from_secs(20));
    let (_dir, tf) = token_dir(&fake);
    let mut broker = BrokerBuilder::entra(&fake, &tf)
        .set("--shutdown-grace", "1s")
        .spawn()
        .await;
    let in_flight = {
        let url = broker.imds_url(&format!("api-version=2018-02-01&resource={}", enc(STORAGE)));
        let http = broker.http.clone();
        tokio::spawn(async move {
            let r = http.get(url).header("Metadata", "true").send().await?;
            let retry_after = r.headers().get("retry-after").cloned();
            let status = r.status().as_u16();
            Ok::<_, reqwest::Error>((status, retry_after, r.text().await?))
        })
    };
    fake.wait_for_calls(1, Duration::from_secs(5))
        .await
        .expect("request reached Entra");
    let signalled = std::time::Instant::now();
    broker.signal("TERM");
    let (status, retry_after, body) = in_flight
        .await
        .unwrap()
        .expect("the waiting caller is answered, not dropped");
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.unwrap(), "1");
    assert!(body.contains("shutting down"), "{body}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    let exit = broker
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let fake = FakeEntra::start();
    fake.set_response_delay(Duration::from_millis(800));
    let (_dir, tf) = token_dir(&fake);
    let mut broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let in_flight = {
        let url = broker.imds_url(&format!("api-version=2018-02-01&resource={}", enc(STORAGE)));
        let http = broker.http.clone();
        tokio::spawn(async move {
            http.get(url)
                .header("Metadata", "true")
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    fake.wait_for_calls(1, Duration::from_secs(5))
        .await
        .expect("request reached Entra");
    broker.signal("TERM");
    let status = in_flight
        .await
        .unwrap()
        .expect("in-flight request answered");
    assert_eq!(status, 200);
    let exit = broker
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("broker exits after SIGTERM");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn metrics_expose_requests_cache_entra_and_expiry() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    broker.imds_token(STORAGE).await;
    broker.imds_token(STORAGE).await;
    broker.imds("api-version=2018-02-01").await;
    let (status, text) = broker.admin("/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "imds_broker_http_requests_total{endpoint=\"imds\",status=\"200\"} 2",
        "imds_broker_http_requests_total{endpoint=\"imds\",status=\"400\"} 1",
        "imds_broker_cache_lookups_total{result=\"miss\"} 1",
        "imds_broker_cache_lookups_total{result=\"hit\"} 1",
        "imds_broker_entra_requests_total{outcome=\"success\"} 1",
        "imds_broker_entra_request_duration_seconds_count 1",
        "imds_broker_token_expiry_seconds{",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    let expiry = text
        .lines()
        .find(|l| l.starts_with("imds_broker_token_expiry_seconds{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap();
    assert!((3590..=3600).contains(&expiry), "{expiry}");
}

#[tokio::test]
async fn oversized_and_slow_requests_cannot_pin_the_broker() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = BrokerBuilder::emulate()
        .args(["--request-timeout", "1s"])
        .spawn()
        .await;
    // 64 KiB of headers: refused, not buffered.
    let big = "x".repeat(64 * 1024);
    let resp = broker
        .http
        .get(broker.imds_url("api-version=2018-02-01&resource=r"))
        .header("Metadata", "true")
        .header("X-Big", big)
        .send()
        .await;
    match resp {
        Ok(r) => assert_eq!(r.status().as_u16(), 431),
        Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
    }
    // A client that never finishes its headers is disconnected by the header timeout.
    let mut s = tokio::net::TcpStream::connect(broker.token_addr)
        .await
        .unwrap();
    s.write_all(b"GET /metadata/identity/oauth2/token HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection closed by the broker");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Still serving.
    assert_eq!(broker.imds_token(STORAGE).await.status, 200);
}

#[tokio::test]
async fn unparsable_requests_get_json_errors_and_are_counted() {
    let broker = BrokerBuilder::emulate().spawn().await;
    let garbled = raw(broker.token_addr, b"GARBAGE\r\n\r\n").await;
    let oversized = format!(
        "GET /metadata/identity/oauth2/token HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "x".repeat(9000)
    );
    let oversized = raw(broker.token_addr, oversized.as_bytes()).await;
    for (answer, status, says) in [
        (&garbled, "400", "not valid HTTP/1.1"),
        (&oversized, "431", "larger than 8 KiB"),
    ] {
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer}"
        );
        assert!(
            answer.contains("content-type: application/json"),
            "{answer}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "invalid_request");
        assert!(
            json["error_description"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
    for status in ["400", "431"] {
        let sample =
            format!("imds_broker_http_requests_total{{endpoint=\"other\",status=\"{status}\"}}");
        assert_eq!(broker.metric(&sample).await, 1.0, "{sample}");
    }
    // Still serving, with hyper's normal answers.
    assert_eq!(broker.imds_token(STORAGE).await.status, 200);
}

#[tokio::test]
async fn emulator_needs_no_token_file_and_issues_jwts() {
    let mut broker = BrokerBuilder::emulate().spawn().await;
    assert!(
        broker
            .wait_log("tokens are FAKE", Duration::from_secs(5))
            .await
    );
    let (status, _) = broker.admin("/readyz").await;
    assert_eq!(status, 200);
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 200);
    let parts: Vec<&str> = r.field("access_token").split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT");
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], STORAGE);
    assert_eq!(claims["imds_broker_emulated"], true);
}

/// Runs `imds-broker serve ARGS` with an empty environment; it must fail. Its stderr.
fn serve_fails(args: &[&str]) -> String {
    let out = std::process::Command::new(crate::support::BIN)
        .arg("serve")
        .args(args)
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn bad_configuration_fails_fast_with_a_clear_message() {
    let tenant = "contoso.onmicrosoft.com";
    let err = serve_fails(&["--client-id", "c", "--tenant-id", tenant]);
    assert!(err.contains("--token-file"), "{err}");

    let err = serve_fails(&[
        "--emulate",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--allow-resource",
        STORAGE,
        "--prefetch",
        "https://vault.azure.net",
    ]);
    assert!(err.contains("--prefetch https://vault.azure.net"), "{err}");

    let err = serve_fails(&[
        "--client-id",
        "c",
        "--tenant-id",
        tenant,
        "--token-file",
        "/x",
        "--authority-host",
        "http://login.example",
    ]);
    assert!(err.contains("https://"), "{err}");

    // A tenant that is neither a GUID nor a domain would be pasted into the authority URL.
    let err = serve_fails(&[
        "--client-id",
        "c",
        "--tenant-id",
        "bad tenant/../",
        "--token-file",
        "/x",
    ]);
    assert!(err.contains("neither a directory (tenant) ID"), "{err}");
}

/// A minimal HTTP CONNECT proxy that counts tunnels (enterprise egress proxies work this way).
async fn connect_proxy() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tunnels = std::sync::Arc::new(AtomicUsize::new(0));
    let count = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let Some(target) = head
                    .lines()
                    .next()
                    .and_then(|l| l.strip_prefix("CONNECT "))
                    .and_then(|l| l.split(' ').next())
                else {
                    return;
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                if client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (addr, tunnels)
}

#[tokio::test]
async fn https_proxy_and_no_proxy_are_honoured_for_entra() {
    use std::sync::atomic::Ordering;
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let (proxy, tunnels) = connect_proxy().await;
    let mut broker = BrokerBuilder::entra(&fake, &tf)
        .env("HTTPS_PROXY", format!("http://{proxy}"))
        .spawn()
        .await;
    // The start-up connection goes through the proxy too, and the exchange reuses it.
    broker.expect_log("connected to Entra ID").await;
    let r = broker.imds_token(STORAGE).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        tunnels.load(Ordering::SeqCst),
        1,
        "Entra was reached through the proxy, on one connection"
    );

    let (proxy2, tunnels2) = connect_proxy().await;
    let broker = BrokerBuilder::entra(&fake, &tf)
        .env("HTTPS_PROXY", format!("http://{proxy2}"))
        .env("NO_PROXY", "localhost")
        .spawn()
        .await;
    assert_eq!(broker.imds_token(STORAGE).await.status, 200);
    assert_eq!(
        tunnels2.load(Ordering::SeqCst),
        0,
        "NO_PROXY bypasses the proxy"
    );
}

#[tokio::test]
async fn ambiguous_security_headers_and_every_proxy_header_are_refused() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let imds = broker.imds_url(&format!("api-version=2018-02-01&resource={}", enc(STORAGE)));
    let twice = broker
        .get(&imds, &[("Metadata", "true"), ("Metadata", "false")])
        .await;
    assert_eq!(twice.status, 400, "{}", twice.raw);
    assert!(twice.body["error_description"]
        .as_str()
        .unwrap()
        .contains("more than one Metadata"));
    for proxy in ["Via", "Forwarded", "X-Forwarded-For"] {
        let r = broker
            .get(&imds, &[("Metadata", "true"), (proxy, "1.1 proxy")])
            .await;
        assert_eq!(r.status, 400, "{proxy}: {}", r.raw);
        assert!(r.raw.contains(proxy), "{}", r.raw);
    }
    let app = broker.app_service_url(&format!("api-version=2019-08-01&resource={}", enc(STORAGE)));
    let r = broker
        .get(
            &app,
            &[
                ("X-IDENTITY-HEADER", IDENTITY_HEADER),
                ("X-IDENTITY-HEADER", "guess"),
            ],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.raw);
    assert_eq!(fake.calls(), 0, "nothing refused reached Entra");
}

/// Numbers and durations outside their range are flag errors (exit 2, naming the flag, the
/// value and the allowed range), for serve and the webhook alike: `--max-connections
/// 3000000000000000000` made the slot semaphore panic, and `0s` delays and timeouts were
/// accepted (a `0s` retry delay made the refresher call Entra back to back). Loopback, ephemeral
/// ports: a start that should have been refused is stopped after 10 s, and the test fails.
#[tokio::test]
async fn out_of_range_numbers_and_durations_are_flag_errors_not_panics() {
    let serve = [
        "serve",
        "--emulate",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let webhook = [
        "webhook",
        "--sidecar-image",
        "registry.example/imds-broker:test",
        "--kube-api-url",
        "none",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let cases: &[(&[&str], &str, &str, &str)] = &[
        (
            &serve,
            "--max-connections",
            "3000000000000000000",
            "1–65536",
        ),
        (&serve, "--retry-initial-backoff", "0s", "50ms–1m"),
        (&serve, "--request-timeout", "0s", "1s–5m"),
        (&serve, "--request-timeout", "500000000000y", "1s–5m"),
        (
            &webhook,
            "--max-connections",
            "3000000000000000000",
            "1–65536",
        ),
        (&webhook, "--request-timeout", "0s", "1s–5m"),
        (&webhook, "--kube-api-timeout", "0s", "100ms–30s"),
    ];
    for (command, flag, value, range) in cases {
        let mut cmd = std::process::Command::new(crate::support::BIN);
        cmd.args(*command)
            .args([flag, value])
            .env_clear()
            .env("IMDS_BROKER_LOG_FORMAT", "text");
        let mut process = testkit::process::Process::spawn(&mut cmd);
        let status = process.wait_exit(Duration::from_secs(10)).await;
        let logs = process.logs();
        let shown = format!("{} {flag} {value}", command[0]);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{shown}: not a flag error; logs:\n{logs}"
        );
        assert!(!logs.contains("panicked"), "{shown}: {logs}");
        for needle in [*flag, *value, &format!("allowed range {range}")] {
            assert!(logs.contains(needle), "{shown}: no {needle:?} in:\n{logs}");
        }
    }
}
