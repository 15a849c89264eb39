//! `imds-broker doctor` names the broken link for each of the fake Entra's failure modes, and
//! passes a healthy chain end to end (with a running broker's listener).

use crate::support::broker::{entra_args, token_dir, BrokerBuilder};
use std::process::Output;
use testkit::fake_entra::FakeEntra;

/// Runs doctor against `fake` with `extra` flags; the environment is emptied so nothing of
/// the machine's (proxies, AZURE_*) leaks in.
fn doctor(fake: &FakeEntra, token_file: &std::path::Path, extra: &[&str]) -> Output {
    run(fake, token_file, true, extra)
}

fn run(fake: &FakeEntra, token_file: &std::path::Path, trust_ca: bool, extra: &[&str]) -> Output {
    let mut args = vec!["doctor".to_string()];
    args.extend(entra_args(fake, token_file));
    if trust_ca {
        args.extend(["--ca-file".into(), fake.ca_file().display().to_string()]);
    }
    // A flag given again replaces the default's value (clap refuses a repeated flag).
    let mut rest = extra.iter();
    while let Some(flag) = rest.next() {
        match args.iter().position(|a| a == flag) {
            Some(i) => args[i + 1] = rest.next().expect("a value").to_string(),
            None => args.push(flag.to_string()),
        }
    }
    std::process::Command::new(crate::support::BIN)
        .args(&args)
        .env_clear()
        .output()
        .unwrap()
}

/// A port nothing listens on (bound, then released).
fn unused_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The FAIL line, asserting the run failed and stopped there.
fn broken(out: &Output) -> String {
    let text = stdout(out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with("FAIL  "),
        "the last line is the broken link: {text}"
    );
    assert_eq!(text.matches("FAIL").count(), 1, "{text}");
    last.to_owned()
}

#[tokio::test]
async fn a_healthy_chain_passes_every_step_and_prints_no_secret() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let broker = BrokerBuilder::entra(&fake, &tf).spawn().await;
    let listen = broker.token_addr.to_string();
    let out = doctor(&fake, &tf, &["--listen", &listen]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    for step in [
        "configuration",
        "token file",
        "token claims",
        "DNS",
        "TCP",
        "TLS + HTTP",
        "exchange",
        "token listener",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok ") && l.contains(step)),
            "no ok line for {step}: {text}"
        );
    }
    assert!(
        text.contains("system:serviceaccount:"),
        "the subject is shown: {text}"
    );
    assert!(
        text.contains("IDENTITY_ENDPOINT=http://127.0.0.1:"),
        "{text}"
    );
    let sa = std::fs::read_to_string(&tf).unwrap();
    let sig = sa.trim().rsplit('.').next().unwrap();
    assert!(!text.contains(sig), "the token's signature is not printed");
    assert!(!text.contains("eyJ"), "no JWT is printed: {text}");
}

#[test]
fn a_federated_credential_with_another_subject_fails_the_exchange_with_its_code() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    fake.set_federated_subject("system:serviceaccount:other:sa");
    let line = broken(&doctor(&fake, &tf, &["--no-listener"]));
    assert!(line.contains("exchange"), "{line}");
    assert!(line.contains("AADSTS70021"), "{line}");
}

#[test]
fn a_token_with_the_wrong_audience_fails_at_its_claims() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let line = broken(&doctor(
        &fake,
        &tf,
        &["--token-audience", "api://SomethingElse", "--no-listener"],
    ));
    assert!(line.contains("token claims"), "{line}");
    assert!(line.contains("api://SomethingElse"), "{line}");
}

#[test]
fn an_unknown_client_fails_the_exchange_with_aadsts700016() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let out = doctor(
        &fake,
        &tf,
        &[
            "--client-id",
            "99999999-9999-9999-9999-999999999999",
            "--no-listener",
        ],
    );
    let line = broken(&out);
    assert!(
        line.contains("exchange") && line.contains("AADSTS700016"),
        "{line}"
    );
}

#[test]
fn an_unreachable_authority_fails_at_tcp() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let port = unused_port();
    let authority = format!("https://127.0.0.1:{port}");
    let line = broken(&doctor(
        &fake,
        &tf,
        &["--authority-host", &authority, "--no-listener"],
    ));
    assert!(
        line.contains("TCP") && line.contains(&port.to_string()),
        "{line}"
    );
}

#[test]
fn an_untrusted_certificate_fails_at_tls_and_names_the_ca_flag() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    // The system roots only: the fake's certificate is signed by its own test CA.
    let out = run(&fake, &tf, false, &["--no-listener"]);
    let line = broken(&out);
    assert!(
        line.contains("TLS + HTTP") && line.contains("--ca-file"),
        "{line}"
    );
}

#[test]
fn a_missing_token_file_fails_first() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let line = broken(&doctor(
        &fake,
        &dir.path().join("absent"),
        &["--no-listener"],
    ));
    assert!(
        line.contains("token file") && line.contains("does not exist"),
        "{line}"
    );
}

#[test]
fn no_broker_listening_fails_at_the_listener() {
    let fake = FakeEntra::start();
    let (_dir, tf) = token_dir(&fake);
    let port = unused_port();
    let listen = format!("127.0.0.1:{port}");
    let line = broken(&doctor(&fake, &tf, &["--listen", &listen]));
    assert!(
        line.contains("token listener") && line.contains("--no-listener"),
        "{line}"
    );
}

/// An authority (or proxy) answering the discovery request with 50 MB: doctor's read stops at
/// the limit and names it, instead of buffering the lot.
#[tokio::test]
async fn a_huge_answer_from_the_authority_is_named_not_read() {
    use testkit::hostile_authority::{Answer, HostileAuthority};
    let authority = HostileAuthority::start(Answer::huge(200, 50_000_000).chunked());
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("token");
    testkit::issuer::TestIssuer::new().write_to(&tf).unwrap();
    let out = std::process::Command::new(crate::support::BIN)
        .args([
            "doctor",
            "--client-id",
            "11111111-1111-1111-1111-111111111111",
            "--tenant-id",
            "22222222-2222-2222-2222-222222222222",
            "--authority-host",
            &authority.url(),
            "--token-file",
            &tf.display().to_string(),
            "--ca-file",
            &authority.ca_file().display().to_string(),
        ])
        .env_clear()
        .output()
        .unwrap();
    let line = broken(&out);
    assert!(line.contains("TLS + HTTP"), "{line}");
    assert!(line.contains("65536-byte limit"), "{line}");
    assert!(
        authority.body_bytes_written() < 12 * 1024 * 1024,
        "stopped reading: {}",
        authority.body_bytes_written()
    );
}

// --- `doctor --app-service`: is this pod covered by its node's broker (node mode)? ---------

/// A node broker on 127.0.0.1 serving namespace `velero` of node-1, with `pod` registered
/// (at 127.0.0.1: the source of doctor's connections); listed once it returns.
async fn node_broker(
    api: &testkit::kube_pods::PodApi,
    dir: &tempfile::TempDir,
    pod: testkit::kube_pods::FakePod,
) -> crate::support::broker::Broker {
    api.apply(pod);
    let mut broker = BrokerBuilder::emulate()
        .node(&api.kubeconfig(dir.path()), "node-1")
        .env("POD_NAMESPACE", "velero")
        .spawn()
        .await;
    broker
        .expect_log("listed the pods of the namespace on this node")
        .await;
    broker
}

/// `doctor --app-service` with exactly `env` (plus `extra` flags), as an ephemeral container
/// would run it; blocking, so off the runtime's threads.
async fn app_service_doctor(env: Vec<(String, String)>, extra: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::support::BIN)
            .args(["doctor", "--app-service"])
            .args(extra)
            .env_clear()
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn app_env(endpoint: &str, header: &str) -> Vec<(String, String)> {
    vec![
        ("IDENTITY_ENDPOINT".into(), endpoint.into()),
        ("IDENTITY_HEADER".into(), header.into()),
    ]
}

fn endpoint_of(broker: &crate::support::broker::Broker) -> String {
    format!("http://{}/msi/token", broker.token_addr)
}

#[tokio::test]
async fn app_service_a_covered_pod_passes_every_step_reading_the_env_of_its_process() {
    use crate::support::broker::IDENTITY_HEADER;
    let api = testkit::kube_pods::PodApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.0.1";
    let pod = testkit::kube_pods::FakePod::new("velero", "mover", "node-1", "velero-server", ip);
    let broker = node_broker(&api, &dir, pod).await;
    // The app's process holds the env; doctor's own env is empty, as in an ephemeral container.
    let mut app = std::process::Command::new("sleep")
        .arg("30")
        .env_clear()
        .envs(app_env(&endpoint_of(&broker), IDENTITY_HEADER))
        .spawn()
        .unwrap();
    let out = app_service_doctor(Vec::new(), vec!["--from-pid".into(), app.id().to_string()]).await;
    app.kill().unwrap();
    app.wait().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    for step in ["env", "broker reachable", "attestation", "header", "token"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok ") && l.contains(step)),
            "no ok line for {step}: {text}"
        );
    }
    assert!(text.contains(&format!("its address {ip}")), "{text}");
    assert!(
        !text.contains(IDENTITY_HEADER),
        "the header is not printed: {text}"
    );
    assert!(!text.contains("eyJ"), "no token is printed: {text}");
}

#[tokio::test]
async fn app_service_missing_env_names_the_variable() {
    let out = app_service_doctor(Vec::new(), Vec::new()).await;
    let line = broken(&out);
    assert!(
        line.contains("env") && line.contains("IDENTITY_ENDPOINT is not set"),
        "{line}"
    );
    let out = app_service_doctor(
        vec![(
            "IDENTITY_ENDPOINT".into(),
            "http://127.0.0.1:1/msi/token".into(),
        )],
        Vec::new(),
    )
    .await;
    assert!(broken(&out).contains("IDENTITY_HEADER is not set"));
}

#[tokio::test]
async fn app_service_a_wrong_header_fails_at_the_header_after_attestation() {
    let api = testkit::kube_pods::PodApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.0.1";
    let pod = testkit::kube_pods::FakePod::new("velero", "mover", "node-1", "velero-server", ip);
    let broker = node_broker(&api, &dir, pod).await;
    let out = app_service_doctor(app_env(&endpoint_of(&broker), "guess"), Vec::new()).await;
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok ") && l.contains("attestation")),
        "{text}"
    );
    let line = broken(&out);
    assert!(
        line.contains("header") && line.contains("401") && line.contains("imds-broker-node"),
        "{line}"
    );
    assert!(!text.contains("guess"), "the header is not printed: {text}");
}

#[tokio::test]
async fn app_service_a_refused_pod_shows_the_brokers_reason() {
    use crate::support::broker::IDENTITY_HEADER;
    let api = testkit::kube_pods::PodApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.0.1";
    let pod = testkit::kube_pods::FakePod::new("velero", "curious", "node-1", "default", ip);
    let broker = node_broker(&api, &dir, pod).await;
    let out = app_service_doctor(app_env(&endpoint_of(&broker), IDENTITY_HEADER), Vec::new()).await;
    let line = broken(&out);
    assert!(
        line.contains("attestation")
            && line.contains("403")
            && line.contains(&format!(
                "caller {ip} is pod velero/curious with ServiceAccount default; allowed: velero-server"
            )),
        "{line}"
    );
}

#[tokio::test]
async fn app_service_no_broker_fails_at_reachable() {
    let endpoint = format!("http://127.0.0.1:{}/msi/token", unused_port());
    let out = app_service_doctor(app_env(&endpoint, "h"), Vec::new()).await;
    let line = broken(&out);
    assert!(
        line.contains("broker reachable") && line.contains("imds-broker-node"),
        "{line}"
    );
}
