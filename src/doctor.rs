//! `imds-broker doctor`: walks the chain a token travels — token file, its claims, the
//! authority (DNS, TCP, TLS), a real exchange per resource, the running broker's listener —
//! and prints one verdict line per link. It stops at the first broken link (exit 1), because
//! every later link depends on it. Run in the sidecar: `kubectl exec POD -c imds-broker --
//! /imds-broker doctor` (no shell needed; it reads the sidecar's own env).
//!
//! `doctor --app-service` checks instead whether a pod is covered by its node's broker (node
//! mode): [`app_service`].
//!
//! Nothing secret is printed: the token file's claims are, its signature and the access
//! tokens are not.

mod app_service;

use crate::assertion::TokenFile;
use crate::clock::now_unix;
use crate::exchange::Exchanger;
use crate::serve::{self, ServeArgs};
use crate::values::non_empty;
use clap::Args;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time allowed for each network step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// What Velero's uploader asks for, checked when no allow-list or prefetch names resources.
const DEFAULT_RESOURCE: &str = "https://storage.azure.com/";

#[derive(Debug, Clone, Args)]
// --app-service checks a pod against its node's broker: the broker's own identity is not needed.
#[command(mut_arg("token_file", |a| a.required_unless_present_any(["emulate", "app_service"])))]
#[command(mut_arg("client_id", |a| a.required_unless_present_any(["emulate", "app_service"])))]
#[command(mut_arg("tenant_id", |a| a.required_unless_present_any(["emulate", "app_service"])))]
pub struct DoctorArgs {
    /// Resources to exchange for (repeatable). Default: the allow-list and prefetch entries,
    /// or https://storage.azure.com/ when neither is set.
    #[arg(long = "resource")]
    pub resources: Vec<String>,

    /// Skip the check of the running broker's token listener (when doctor runs outside the
    /// sidecar, e.g. to test a configuration before deploying it).
    #[arg(long)]
    pub no_listener: bool,

    /// Check this pod against its node's broker instead (node mode): the App Service env
    /// (IDENTITY_ENDPOINT, IDENTITY_HEADER), the broker reachable, its attestation verdict for
    /// this pod, the header, a token served. Run as an ephemeral container of the pod.
    #[arg(long)]
    pub app_service: bool,

    /// With --app-service: read the env from /proc/PID/environ (an ephemeral container shares
    /// the target container's processes, not its env; `--from-pid 1` is its first process).
    #[arg(long, requires = "app_service")]
    pub from_pid: Option<u32>,

    /// The broker's own flags and env, as `serve` reads them.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// One broken link: its message is printed on the FAIL line.
struct Broken(String);

fn ok(step: &str, detail: impl std::fmt::Display) {
    println!("ok    {step:<16} {detail}");
}

fn info(step: &str, detail: impl std::fmt::Display) {
    println!("info  {step:<16} {detail}");
}

pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let checked = if args.app_service {
        app_service::check(args.from_pid, &resources(&args)[0]).await
    } else {
        check(&args).await
    };
    match checked {
        Ok(()) => {
            println!("doctor: every link works");
            Ok(())
        }
        Err(Broken(msg)) => {
            println!("{msg}");
            anyhow::bail!("doctor found a broken link (the FAIL line above)")
        }
    }
}

fn fail(step: &str, detail: impl std::fmt::Display) -> Broken {
    Broken(format!("FAIL  {step:<16} {detail}"))
}

async fn check(args: &DoctorArgs) -> Result<(), Broken> {
    let a = &args.serve;
    a.validate()
        .map_err(|e| fail("configuration", format!("{e:#}")))?;
    let (exchanger, client_id) =
        serve::exchanger(a).map_err(|e| fail("configuration", format!("{e:#}")))?;
    ok(
        "configuration",
        format!(
            "client {client_id}, tenant {}, authority {}",
            a.tenant_id.as_deref().unwrap_or("-"),
            if a.emulate {
                "emulator"
            } else {
                &a.authority_host
            }
        ),
    );
    if !a.emulate {
        token_file(a)?;
        authority(a, exchanger.as_ref()).await?;
    }
    let resources = resources(args);
    for resource in &resources {
        match exchanger.exchange(&client_id, resource).await {
            Ok(token) => ok(
                "exchange",
                format!(
                    "{resource}: token obtained, expires in {}s",
                    token.expires_on.saturating_sub(now_unix())
                ),
            ),
            Err(e) => return Err(fail("exchange", format!("{resource}: {e}"))),
        }
    }
    if !args.no_listener {
        for addr in &a.listen {
            listener(*addr, &resources[0]).await?;
        }
    }
    let port = a.listen.first().map_or(8400, SocketAddr::port);
    info(
        "app containers",
        format!(
            "need IDENTITY_ENDPOINT=http://127.0.0.1:{port}/msi/token and IDENTITY_HEADER = \
             this container's IDENTITY_HEADER (App Service), or \
             AZURE_POD_IDENTITY_AUTHORITY_HOST=http://127.0.0.1:{port} (IMDS); the webhook \
             sets the first pair"
        ),
    );
    Ok(())
}

fn resources(args: &DoctorArgs) -> Vec<String> {
    let mut list = non_empty(&args.resources);
    if list.is_empty() {
        list = non_empty(&args.serve.allow_resources);
        for p in non_empty(&args.serve.prefetch) {
            if !list
                .iter()
                .any(|r| crate::broker::policy::same_resource(r, &p))
            {
                list.push(p);
            }
        }
    }
    if list.is_empty() {
        list.push(DEFAULT_RESOURCE.to_owned());
    }
    list
}

/// The token file, its claims, and the federated credential those claims require.
fn token_file(a: &ServeArgs) -> Result<(), Broken> {
    let Some(path) = &a.token_file else {
        return Err(fail(
            "token file",
            "no --token-file / AZURE_FEDERATED_TOKEN_FILE",
        ));
    };
    let file = TokenFile::new(path, a.token_audience.clone());
    file.check_readable()
        .map_err(|e| fail("token file", e.to_string()))?;
    ok("token file", format!("{} is readable", path.display()));
    let token = file
        .read()
        .map_err(|e| fail("token claims", e.to_string()))?;
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&token)
        .map_err(|e| fail("token claims", e.to_string()))?;
    let text = |k: &str| match &claims[k] {
        Value::String(s) => s.clone(),
        Value::Array(v) => v
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    };
    let left = claims["exp"].as_u64().map_or("no expiry".into(), |exp| {
        format!("expires in {}s", exp.saturating_sub(now_unix()))
    });
    ok(
        "token claims",
        format!(
            "iss {}, sub {}, aud {}, {left}",
            text("iss"),
            text("sub"),
            text("aud")
        ),
    );
    info(
        "federated cred.",
        format!(
            "the app's federated credential must have issuer {}, subject {}, audience {}",
            text("iss"),
            text("sub"),
            a.token_audience
        ),
    );
    Ok(())
}

/// DNS, TCP, then TLS and HTTP through the exchanger's own client (proxy and CA included).
async fn authority(a: &ServeArgs, exchanger: &dyn Exchanger) -> Result<(), Broken> {
    let url = reqwest::Url::parse(&a.authority_host)
        .map_err(|e| fail("authority", format!("{}: {e}", a.authority_host)))?;
    let host = url.host_str().unwrap_or_default().to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let proxy = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
    if let Some(proxy) = proxy {
        // The proxy resolves and connects; only the end-to-end step below means anything.
        let shown = reqwest::Url::parse(&proxy).map_or("(unparsable)".into(), |u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or("?"),
                u.port_or_known_default().unwrap_or(0)
            )
        });
        info("proxy", format!("the authority is reached through {shown}"));
    } else {
        let addrs: Vec<SocketAddr> = match tokio::time::timeout(
            STEP_TIMEOUT,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                return Err(fail(
                    "DNS",
                    format!("{host}: {e}: check the pod's DNS and egress"),
                ))
            }
            Err(_) => {
                return Err(fail(
                    "DNS",
                    format!("{host}: no answer in {STEP_TIMEOUT:?}"),
                ))
            }
        };
        let first = *addrs
            .first()
            .ok_or_else(|| fail("DNS", format!("{host}: no address")))?;
        ok("DNS", format!("{host} is {}", first.ip()));
        match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(first)).await {
            Ok(Ok(_)) => ok("TCP", format!("{first} accepts connections")),
            Ok(Err(e)) => {
                return Err(fail(
                    "TCP",
                    format!("{first}: {e}: egress to the authority is blocked (NetworkPolicy, firewall) or needs HTTPS_PROXY"),
                ))
            }
            Err(_) => return Err(fail("TCP", format!("{first}: no answer in {STEP_TIMEOUT:?}"))),
        }
    }
    match exchanger.preconnect().await {
        Ok(answered) => {
            ok("TLS + HTTP", answered);
            Ok(())
        }
        Err(e) => Err(fail(
            "TLS + HTTP",
            format!("{e} (an untrusted certificate means a TLS-inspecting proxy: add its CA with --ca-file / IMDS_BROKER_CA_FILE)"),
        )),
    }
}

/// The running broker answers an IMDS token request. Only the status line is read out: the
/// body holds a token.
async fn listener(addr: SocketAddr, resource: &str) -> Result<(), Broken> {
    let step = "token listener";
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("api-version", "2018-02-01")
        .append_pair("resource", resource)
        .finish();
    let request = format!(
        "GET /metadata/identity/oauth2/token?{query} HTTP/1.1\r\nHost: {addr}\r\nMetadata: true\r\nConnection: close\r\n\r\n"
    );
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request.as_bytes()).await?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    let head = match tokio::time::timeout(STEP_TIMEOUT, exchange).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => {
            return Err(fail(
                step,
                format!("{addr}: {e}: is the broker running in this container? (--no-listener skips this check)"),
            ))
        }
        Err(_) => return Err(fail(step, format!("{addr}: no answer in {STEP_TIMEOUT:?}"))),
    };
    let status = head.split_whitespace().nth(1).unwrap_or("?").to_owned();
    if status == "200" {
        ok(
            step,
            format!("{addr} answers an IMDS token request for {resource}"),
        );
        Ok(())
    } else {
        Err(fail(
            step,
            format!("{addr} answered HTTP {status}: see the broker's log line \"token request refused\""),
        ))
    }
}
