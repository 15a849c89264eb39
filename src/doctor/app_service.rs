//! `imds-broker doctor --app-service`: is this pod covered by its node's broker? Run from the
//! pod itself, as an ephemeral container (`kubectl debug POD --image <broker image>
//! --target <container> -- /imds-broker doctor --app-service --from-pid 1`). It checks, one
//! verdict line each: the App Service env (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`), that the
//! broker accepts a TCP connection, the broker's attestation verdict for this pod's address,
//! the header, and that a token is served. The token and the header are never printed.
//!
//! An ephemeral container shares the target's process namespace, not its env: `--from-pid`
//! reads the env of one of its processes from `/proc/PID/environ`.

use super::{fail, ok, Broken, STEP_TIMEOUT};
use serde_json::Value;
use std::net::SocketAddr;

const ENDPOINT: &str = "IDENTITY_ENDPOINT";
const HEADER: &str = "IDENTITY_HEADER";
/// An error answer is a few hundred bytes; a token answer is not read beyond its status.
const ANSWER_CAP: usize = 64 * 1024;

/// Where the App Service env comes from: this process, or another one's `/proc/PID/environ`.
struct Env {
    vars: Vec<(String, String)>,
    source: String,
}

impl Env {
    fn read(from_pid: Option<u32>) -> Result<Env, Broken> {
        let Some(pid) = from_pid else {
            return Ok(Env {
                vars: std::env::vars().collect(),
                source: "this container's env".into(),
            });
        };
        let path = format!("/proc/{pid}/environ");
        let raw = std::fs::read(&path).map_err(|e| {
            fail(
                "env",
                format!(
                    "cannot read {path}: {e}: run as an ephemeral container with --target \
                     <the app's container> (it shares that container's processes), as its user \
                     or root"
                ),
            )
        })?;
        let vars = raw
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect();
        Ok(Env {
            vars,
            source: format!("the env of process {pid}"),
        })
    }

    fn get(&self, key: &str) -> Result<&str, Broken> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                fail(
                    "env",
                    format!(
                        "{key} is not set in {}: Velero's env must point its pods at the node \
                         broker (imds-broker velero-env prints it)",
                        self.source
                    ),
                )
            })
    }
}

pub(super) async fn check(from_pid: Option<u32>, resource: &str) -> Result<(), Broken> {
    let env = Env::read(from_pid)?;
    let endpoint = env.get(ENDPOINT)?;
    let header = env.get(HEADER)?;
    let url = reqwest::Url::parse(endpoint)
        .ok()
        .filter(|u| u.scheme() == "http" && u.host_str().is_some())
        .ok_or_else(|| {
            fail(
                "env",
                format!("{ENDPOINT}={endpoint} is not an http:// URL with a host"),
            )
        })?;
    ok(
        "env",
        format!("{ENDPOINT}={endpoint}, {HEADER} set (from {})", env.source),
    );

    let me = reachable(&url).await?;
    let answer = ask(&url, header, resource).await?;
    verdict(&answer, me, resource)
}

/// TCP to the broker; the local address is the one the broker attests.
async fn reachable(url: &reqwest::Url) -> Result<SocketAddr, Broken> {
    let step = "broker reachable";
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(80);
    let connect = tokio::net::TcpStream::connect((host, port));
    match tokio::time::timeout(STEP_TIMEOUT, connect).await {
        Ok(Ok(s)) => {
            let me = s.local_addr().map_err(|e| fail(step, e))?;
            let peer = s.peer_addr().map_err(|e| fail(step, e))?;
            ok(step, format!("{peer} accepts connections"));
            Ok(me)
        }
        Ok(Err(e)) => Err(fail(
            step,
            format!(
                "{host}:{port}: {e}: is the imds-broker-node pod of this node running and ready? \
                 (kubectl get pods -o wide -l app.kubernetes.io/name=imds-broker-node)"
            ),
        )),
        Err(_) => Err(fail(
            step,
            format!("{host}:{port}: no answer in {STEP_TIMEOUT:?} (a NetworkPolicy?)"),
        )),
    }
}

struct Answer {
    status: u16,
    /// The error body (never read for a 200: it holds a token).
    error: Option<Value>,
}

async fn ask(url: &reqwest::Url, header: &str, resource: &str) -> Result<Answer, Broken> {
    let step = "token request";
    // reqwest needs the process's crypto provider even for plain http.
    crate::crypto::install_default();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(STEP_TIMEOUT)
        .build()
        .map_err(|e| fail(step, e))?;
    let mut url = url.clone();
    url.query_pairs_mut()
        .append_pair("api-version", "2019-08-01")
        .append_pair("resource", resource);
    let resp = client
        .get(url.clone())
        .header("X-IDENTITY-HEADER", header)
        .send()
        .await
        .map_err(|e| fail(step, format!("{url}: {e}")))?;
    let status = resp.status().as_u16();
    if status == 200 {
        return Ok(Answer {
            status,
            error: None,
        });
    }
    let body = crate::capped_read::body(resp, ANSWER_CAP)
        .await
        .map_err(|e| fail(step, format!("HTTP {status}, body unreadable: {e}")))?;
    Ok(Answer {
        status,
        error: serde_json::from_slice(&body).ok(),
    })
}

/// The broker judges the caller before the header: a 403/503 is the attestation, a 401 the
/// header, anything else the token itself.
fn verdict(answer: &Answer, me: SocketAddr, resource: &str) -> Result<(), Broken> {
    let why = answer
        .error
        .as_ref()
        .and_then(|e| {
            e["error_description"]
                .as_str()
                .or(e["message"].as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "(no error description)".into());
    let attested = format!("the broker serves this pod (its address {})", me.ip());
    match answer.status {
        403 => Err(fail("attestation", format!("refused (403): {why}"))),
        503 => Err(fail(
            "attestation",
            format!("the broker is not ready (503): {why}: it has not listed this node's pods yet; see its log"),
        )),
        401 => {
            ok("attestation", attested);
            Err(fail(
                "header",
                format!(
                    "refused (401): {HEADER} is not the broker's: Velero's env must take it from \
                     the Secret imds-broker-node (key identity-header); {why}"
                ),
            ))
        }
        200 => {
            ok("attestation", attested);
            ok("header", "accepted");
            ok("token", format!("served for {resource} (HTTP 200)"));
            Ok(())
        }
        status => {
            ok("attestation", attested);
            ok("header", "accepted");
            Err(fail("token", format!("HTTP {status}: {why}")))
        }
    }
}
