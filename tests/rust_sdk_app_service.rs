//! The real Rust Azure SDK (`azure_identity::ManagedIdentityCredential`) as a client of the
//! broker's App Service endpoint. One test per binary: the SDK reads IDENTITY_ENDPOINT and
//! IDENTITY_HEADER from the process environment, which must not change under other tests.

use azure_core::credentials::TokenCredential;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use std::process::Command;
use std::time::Duration;
use testkit::fake_entra::{FakeAccessToken, FakeEntra};
use testkit::process::{bound_addr, Process};

const STORAGE: &str = "https://storage.azure.com/";
const IDENTITY_HEADER: &str = "test-identity-header-5ecr3t";

fn credential(id: Option<UserAssignedId>) -> std::sync::Arc<ManagedIdentityCredential> {
    // azure_core is built without a default TLS provider (see examples/rust_mi_client.rs).
    imds_broker::crypto::install_default();
    ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
        user_assigned_id: id,
        ..Default::default()
    }))
    .expect("credential from IDENTITY_ENDPOINT/IDENTITY_HEADER")
}

#[tokio::test]
async fn rust_managed_identity_credential_gets_tokens_from_app_service_endpoint() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    fake.issuer().write_to(&token_file).unwrap();
    // The broker binary on testkit's harness (tests/e2e/support has the full builder).
    let mut broker = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_imds-broker"))
            .args(["--log-format", "json", "serve"])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--client-id", &fake.client_id()])
            .args(["--tenant-id", &fake.tenant_id()])
            .args(["--authority-host", &fake.authority()])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--ca-file")
            .arg(fake.ca_file())
            .args(["--allow-resource", STORAGE])
            .env_clear()
            .env("IDENTITY_HEADER", IDENTITY_HEADER),
    );
    let listening = broker
        .expect_json_line("imds-broker listening", Duration::from_secs(20))
        .await;
    std::env::set_var(
        "IDENTITY_ENDPOINT",
        format!("http://{}/msi/token", bound_addr(&listening, "listen")),
    );
    std::env::set_var("IDENTITY_HEADER", IDENTITY_HEADER);

    // System-assigned style (no selector) and by client id.
    for id in [None, Some(UserAssignedId::ClientId(fake.client_id()))] {
        let token = credential(id)
            .get_token(&["https://storage.azure.com/.default"], None)
            .await
            .expect("token from the broker");
        let claims = FakeAccessToken::decode(token.token.secret()).expect("fake Entra token");
        assert_eq!(claims.appid, fake.client_id());
        let expected = time::OffsetDateTime::from_unix_timestamp(claims.exp).unwrap();
        assert!(
            (token.expires_on - expected).abs() <= time::Duration::seconds(2),
            "expiry seen by the SDK {} vs issued {}",
            token.expires_on,
            expected
        );
    }
    assert_eq!(
        fake.calls(),
        1,
        "the second credential was served from the cache"
    );

    // An identity this pod does not have: a clear failure, no Entra call.
    let err = credential(Some(UserAssignedId::ClientId(
        "00000000-1111-2222-3333-444444444444".into(),
    )))
    .get_token(&["https://storage.azure.com/.default"], None)
    .await
    .expect_err("unknown client id");
    // The SDK maps IMDS/App Service 400 to its own wording for an unassigned identity.
    let msg = err.to_string();
    assert!(
        msg.contains("has not been assigned") || msg.contains("Identity not found"),
        "{msg}"
    );

    // A resource outside the policy.
    let started = std::time::Instant::now();
    let err = credential(None)
        .get_token(&["https://vault.azure.net/.default"], None)
        .await
        .expect_err("refused resource");
    assert!(err.to_string().contains("not allowed"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "403 is not retried"
    );
    assert_eq!(fake.calls(), 1);
}
