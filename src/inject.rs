//! `imds-broker inject -f pod.yaml`: prints manifests as the webhook would admit them, from the
//! webhook's own decision code (as `linkerd inject` and `istioctl kube-inject` do), for
//! reviewing what the webhook does and for debugging a label selector.
//!
//! Pods are mutated as the webhook mutates them at admission; workloads (Job, CronJob,
//! Deployment, …) have their pod template mutated, which is what the webhook will see when
//! their pods are created. Each object's outcome goes to stderr; the manifests go to stdout in
//! the input's format (YAML or JSON).

use crate::webhook::metrics::Outcome;
use crate::webhook::review::{AdmissionRequest, GroupVersionKind, Reviewer};
use crate::webhook::{review, WebhookArgs};
use anyhow::Context;
use clap::Args;
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

/// Largest manifest read: the API server's own request limit is 3 MiB.
const MAX_INPUT: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// Manifest to read (YAML, possibly several documents, or JSON; a `List` is walked);
    /// `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,

    /// Namespace for objects that name none (the API server would use the request's).
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,

    /// The webhook's own flags and env: the same policy as the deployed webhook.
    #[command(flatten)]
    pub webhook: WebhookArgs,
}

pub async fn run(args: InjectArgs) -> anyhow::Result<()> {
    let text = read_input(&args.file)?;
    let config = args.webhook.webhook_config()?;
    let labels = config.match_labels.join(", ");
    let reviewer = Reviewer::new(
        config,
        args.webhook.identity_source()?,
        Arc::new(review::random_identity_header),
    );
    let json = text.trim_start().starts_with(['{', '[']);
    let mut docs = parse(&text, json)?;
    let mut refused = 0;
    for doc in &mut docs {
        refused += inject_object(&reviewer, doc, &args.namespace, &labels).await?;
    }
    print!("{}", render(&docs, json)?);
    anyhow::ensure!(
        refused == 0,
        "the webhook would refuse {refused} pod(s) (see above)"
    );
    Ok(())
}

fn read_input(file: &PathBuf) -> anyhow::Result<String> {
    let mut text = String::new();
    let name = file.display().to_string();
    let read = if name == "-" {
        std::io::stdin()
            .take(MAX_INPUT + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("cannot open {name}"))?
            .take(MAX_INPUT + 1)
            .read_to_string(&mut text)
    };
    read.with_context(|| format!("cannot read {name} (it must be UTF-8 YAML or JSON)"))?;
    anyhow::ensure!(
        text.len() as u64 <= MAX_INPUT,
        "{name} is larger than {} MiB",
        MAX_INPUT >> 20
    );
    Ok(text)
}

/// The documents of a YAML stream or one JSON value; empty YAML documents are dropped.
fn parse(text: &str, json: bool) -> anyhow::Result<Vec<Value>> {
    if json {
        return Ok(vec![
            serde_json::from_str(text).context("the input is not valid JSON")?
        ]);
    }
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc: Value = serde::Deserialize::deserialize(de)
            .with_context(|| format!("YAML document {} is not valid", i + 1))?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    Ok(docs)
}

fn render(docs: &[Value], json: bool) -> anyhow::Result<String> {
    if json {
        let mut out = String::new();
        for doc in docs {
            out += &serde_json::to_string_pretty(doc)?;
            out.push('\n');
        }
        return Ok(out);
    }
    let yaml: Vec<String> = docs
        .iter()
        .map(serde_yaml_ng::to_string)
        .collect::<Result<_, _>>()?;
    Ok(yaml.join("---\n"))
}

/// Mutates one object (and a List's items) in place; returns how many pods would be refused.
async fn inject_object(
    reviewer: &Reviewer,
    doc: &mut Value,
    namespace: &str,
    labels: &str,
) -> anyhow::Result<usize> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let name = doc["metadata"]["name"]
        .as_str()
        .or_else(|| doc["metadata"]["generateName"].as_str())
        .unwrap_or("(unnamed)")
        .to_owned();
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or(namespace)
        .to_owned();
    if kind == "List" {
        let mut refused = 0;
        if let Some(items) = doc["items"].as_array_mut() {
            for item in items {
                refused += Box::pin(inject_object(reviewer, item, &namespace, labels)).await?;
            }
        }
        return Ok(refused);
    }
    let what = format!("{kind} {namespace}/{name}");
    let template = match kind.as_str() {
        "Pod" => None,
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ if doc.pointer("/spec/template/spec").is_some() => Some("/spec/template"),
        _ => {
            eprintln!("{what}: not a pod or a workload with a pod template; left as is");
            return Ok(0);
        }
    };
    let mut pod = match template {
        None => doc.clone(),
        Some(path) => {
            let t = doc.pointer(path).cloned().unwrap_or(Value::Null);
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": t.get("metadata").cloned().unwrap_or_else(|| serde_json::json!({})),
                "spec": t.get("spec").cloned().unwrap_or(Value::Null)})
        }
    };
    let refused = inject_pod(reviewer, &mut pod, &namespace, &what, labels).await?;
    if let Some(path) = template {
        if let Some(t) = doc.pointer_mut(path) {
            t["metadata"] = pod["metadata"].take();
            t["spec"] = pod["spec"].take();
        }
    } else {
        *doc = pod;
    }
    Ok(refused)
}

/// The webhook's decision for one pod, applied to it; the outcome goes to stderr.
async fn inject_pod(
    reviewer: &Reviewer,
    pod: &mut Value,
    namespace: &str,
    what: &str,
    labels: &str,
) -> anyhow::Result<usize> {
    let request = AdmissionRequest {
        uid: "imds-broker-inject".into(),
        kind: GroupVersionKind {
            group: String::new(),
            version: "v1".into(),
            kind: "Pod".into(),
        },
        namespace: Some(namespace.to_owned()),
        name: pod["metadata"]["name"].as_str().map(str::to_owned),
        operation: "CREATE".into(),
        object: Some(serde_json::value::to_raw_value(pod).context("serialising the pod")?),
    };
    let decision = reviewer
        .decide(&request)
        .await
        .with_context(|| format!("{what}: the webhook cannot read it"))?;
    for warning in &decision.warnings {
        eprintln!("{what}: warning: {warning}");
    }
    if let Some(denial) = &decision.denial {
        eprintln!("{what}: refused: {denial}");
        return Ok(1);
    }
    match decision.outcome {
        Outcome::Skipped => {
            eprintln!("{what}: skipped: it carries none of the label keys {labels}")
        }
        outcome => eprintln!("{what}: {}", outcome.as_str()),
    }
    if !decision.patch.is_empty() {
        json_patch::patch(pod, &decision.patch)
            .with_context(|| format!("{what}: the webhook's patch does not apply"))?;
    }
    Ok(0)
}
