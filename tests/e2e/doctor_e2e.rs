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
