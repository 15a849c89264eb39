//! Runs testkit's fake pod API standalone, for the suites that drive `imds-broker node` from
//! Python (conformance, storage, bench): the pods a node broker attests its callers against.
//!
//! Prints one JSON line, `{"url":"http://127.0.0.1:PORT","kubeconfig":"...","control":"http://127.0.0.1:PORT"}`,
//! then serves until SIGINT/SIGTERM. `KUBECONFIG=<kubeconfig>` points a node broker at it.
//!
//! The control port (plain HTTP on 127.0.0.1):
//! - `POST /pods` with JSON `{"namespace","name","node","service_account","ip"}` (optional
//!   `"host_network": true`, `"phase": "Succeeded"`): adds or replaces that pod (ADDED or
//!   MODIFIED to the watches); a JSON list adds several.
//! - `DELETE /pods/<namespace>/<name>`: deletes it (DELETED to the watches).
//!
//! Usage: `cargo run --example fake_kube_pods -- [--pods FILE]` (FILE: a JSON list as for
//! `POST /pods`, applied before the line is printed)

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use testkit::kube_pods::{FakePod, PodApi};

#[derive(Parser, Debug)]
#[command(about = "Fake Kubernetes pod list/watch API for node-mode tests")]
struct Args {
    /// Pods to add before serving (a JSON list of pod specs, as for `POST /pods`).
    #[arg(long)]
    pods: Option<std::path::PathBuf>,
}

#[derive(serde::Deserialize)]
struct PodSpec {
    namespace: String,
    name: String,
    node: String,
    service_account: String,
    ip: String,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    phase: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(PodSpec),
    Many(Vec<PodSpec>),
}

fn apply(api: &PodApi, specs: OneOrMany) -> usize {
    let specs = match specs {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    for s in &specs {
        let mut pod = FakePod::new(&s.namespace, &s.name, &s.node, &s.service_account, &s.ip);
        if s.host_network {
            pod = pod.host_network();
        }
        if let Some(phase) = &s.phase {
            pod = pod.phase(phase);
        }
        api.apply(pod);
    }
    specs.len()
}

async fn control(api: Arc<PodApi>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, text: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(text)))
            .unwrap_or_default()
    };
    let path = req.uri().path().to_owned();
    match (req.method().as_str(), path.as_str()) {
        ("POST", "/pods") => {
            let body = match Limited::new(req.into_body(), 4 << 20).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return reply(StatusCode::BAD_REQUEST, format!("{{\"error\":\"{e}\"}}")),
            };
            match serde_json::from_slice::<OneOrMany>(&body) {
                Ok(specs) => {
                    let n = apply(&api, specs);
                    reply(StatusCode::OK, format!("{{\"applied\":{n}}}"))
                }
                Err(e) => reply(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": e.to_string() }).to_string(),
                ),
            }
        }
        ("DELETE", p) if p.starts_with("/pods/") => {
            match p.trim_start_matches("/pods/").split_once('/') {
                Some((ns, name)) => {
                    api.delete(ns, name);
                    reply(StatusCode::OK, "{}".into())
                }
                None => reply(StatusCode::NOT_FOUND, "{}".into()),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "{}".into()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let api = Arc::new(PodApi::start().await);
    if let Some(path) = &args.pods {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let specs: OneOrMany = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a list of pod specs", path.display()))?;
        apply(&api, specs);
    }
    let dir = tempfile::Builder::new()
        .prefix("fake-kube-pods-")
        .tempdir()
        .context("creating the kubeconfig directory")?;
    let kubeconfig = api.kubeconfig(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the control port")?;
    let control_url = format!("http://{}", listener.local_addr()?);
    println!(
        "{}",
        serde_json::json!({"url": api.url(), "kubeconfig": kubeconfig, "control": control_url})
    );
    let serve = {
        let api = api.clone();
        async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let api = api.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(control(api, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        () = serve => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
