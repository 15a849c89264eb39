//! `imds-broker inject -f pod.yaml`: prints manifests as the webhook would admit them, from the
//! webhook's own decision code (as `linkerd inject` and `istioctl kube-inject` do), for
//! reviewing what the webhook does and for debugging a label selector.
//!
//! Pods are mutated as the webhook mutates them at admission; workloads (Job, CronJob,
//! Deployment, …) have their pod template mutated, which is what the webhook will see when
//! their pods are created (a Job's with the Job controller's `batch.kubernetes.io/job-name`
//! label, which its pods carry). Each object's outcome goes to stderr; the manifests go to stdout in
//! the input's format (YAML or JSON).
//!
//! It takes the webhook's flags and env, or reads them from the webhook's Deployment
//! ([`webhook_deployment`]). What it still lacks to print a pod — the sidecar image, an
//! identity where no API server can be asked for ServiceAccount annotations — is filled with
//! clearly marked placeholders, each announced on stderr.

mod webhook_deployment;

use crate::webhook::identity::{ApiConfig, PartialIdentity};
use crate::webhook::metrics::Outcome;
use crate::webhook::review::{AdmissionRequest, GroupVersionKind, Reviewer};
use crate::webhook::{review, WebhookArgs};
use anyhow::Context;
use clap::Args;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest manifest read: the API server's own request limit is 3 MiB.
const MAX_INPUT: u64 = 4 * 1024 * 1024;

/// The sidecar image shown when none is given. `.invalid` never resolves (RFC 2606): a printed
/// pod applied as it is fails to pull instead of running something else.
pub const PLACEHOLDER_IMAGE: &str = "sidecar-image-not-set.invalid/imds-broker:placeholder";
/// The identity shown when there is neither one from the flags nor an API server to read the
/// ServiceAccount's annotations from (the tenant passes the sidecar's check: a domain).
pub const PLACEHOLDER_CLIENT_ID: &str = "client-id-not-set";
pub const PLACEHOLDER_TENANT_ID: &str = "tenant-id-not-set.invalid";

#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// Manifest to read (YAML, possibly several documents, or JSON; a `List` is walked);
    /// `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,

    /// Namespace for objects that name none (the API server would use the request's).
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,

    /// The webhook's Deployment (`kubectl get deployment -o yaml`, `helm template`, `kustomize
    /// build` output): its container's env and flags are used as the webhook settings, under
    /// any given here.
    #[arg(long, value_name = "FILE")]
    pub webhook_deployment: Option<PathBuf>,

    /// The webhook's own flags and env: the same policy as the deployed webhook.
    #[command(flatten)]
    pub webhook: WebhookArgs,
}

pub async fn run(args: InjectArgs) -> anyhow::Result<()> {
    let mut args = match &args.webhook_deployment {
        Some(file) => webhook_deployment::apply(file, std::env::args_os().collect())?,
        None => args,
    };
    fill_placeholders(&mut args.webhook);
    let text = read_input(&args.file)?;
    let config = args.webhook.webhook_config()?;
    let labels = config.match_labels.join(", ");
    let reviewer = Reviewer::new(
        config,
        args.webhook.identity_source()?,
        Arc::new(review::random_identity_header),
    );
    let (out, refused) = inject_text(&reviewer, &text, &args.namespace, &labels).await?;
    print!("{out}");
    anyhow::ensure!(
        refused == 0,
        "the webhook would refuse {refused} pod(s) (see above)"
    );
    Ok(())
}

/// The manifests in `text` (YAML or JSON) as the webhook would admit them, in the input's
/// format, and how many pods it would refuse.
pub(crate) async fn inject_text(
    reviewer: &Reviewer,
    text: &str,
    namespace: &str,
    labels: &str,
) -> anyhow::Result<(String, usize)> {
    let json = text.trim_start().starts_with(['{', '[']);
    let mut docs = parse(text, json)?;
    let mut refused = 0;
    for doc in &mut docs {
        refused += inject_object(reviewer, doc, namespace, labels).await?;
    }
    Ok((render(&docs, json)?, refused))
}

/// What a newcomer without the webhook's settings lacks to see a pod injected, filled with
/// marked placeholders, each announced on stderr.
fn fill_placeholders(webhook: &mut WebhookArgs) {
    if webhook
        .sidecar_image
        .as_deref()
        .is_none_or(|i| i.trim().is_empty())
    {
        eprintln!(
            "note: no sidecar image given (--sidecar-image, IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE \
             or --webhook-deployment): the sidecar is shown with the placeholder image \
             {PLACEHOLDER_IMAGE}; the webhook injects its own image"
        );
        webhook.sidecar_image = Some(PLACEHOLDER_IMAGE.into());
    }
    // Only when no API server can be asked: with one (or with --kube-api-url none) the
    // outcome is the webhook's own, "no identity" included.
    let no_api_server =
        webhook.kube_api_url.is_none() && ApiConfig::in_cluster(webhook.kube_api_timeout).is_none();
    let given = PartialIdentity::new(webhook.client_id.as_deref(), webhook.tenant_id.as_deref());
    if no_api_server && given.complete().is_none() {
        eprintln!(
            "note: no API server here to read the pod's ServiceAccount annotations from, and no \
             --client-id/--tenant-id: the sidecar is shown with the placeholder IDs \
             {PLACEHOLDER_CLIENT_ID} / {PLACEHOLDER_TENANT_ID}; the webhook takes them from the \
             ServiceAccount's azure.workload.identity/client-id and tenant-id annotations \
             (give them as --client-id/--tenant-id, or --kube-api-url, to see them here)"
        );
        let fill = |v: Option<String>, placeholder: &str| Some(v.unwrap_or(placeholder.into()));
        webhook.client_id = fill(given.client_id, PLACEHOLDER_CLIENT_ID);
        webhook.tenant_id = fill(given.tenant_id, PLACEHOLDER_TENANT_ID);
    }
}

fn read_input(file: &Path) -> anyhow::Result<String> {
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

const CRONJOB_TEMPLATE: &str = "/spec/jobTemplate/spec/template";

/// The label the Job controller puts on every pod of a Job (Kubernetes 1.27+), one of the
/// webhook's default keys: not in a Job's template, but on each pod the webhook sees.
const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";

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
        // The template is written back below, which needs an object there.
        "CronJob" if doc.pointer(CRONJOB_TEMPLATE).is_some_and(Value::is_object) => {
            Some(CRONJOB_TEMPLATE)
        }
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
    // A Job's (or CronJob's) pods carry the Job controller's label, so the webhook sees it:
    // the decision is taken with it, and it is taken off again (the API server sets it when
    // the Job is created; a CronJob's Jobs each have another name).
    let had_labels = pod["metadata"].get("labels").is_some();
    let job_label = matches!(kind.as_str(), "Job" | "CronJob")
        && pod["metadata"].is_object()
        && (!had_labels || pod["metadata"]["labels"].is_object())
        && pod["metadata"]["labels"].get(JOB_NAME_LABEL).is_none();
    if job_label {
        if !had_labels {
            pod["metadata"]["labels"] = serde_json::json!({});
        }
        pod["metadata"]["labels"][JOB_NAME_LABEL] = Value::String(name.clone());
    }
    let refused = inject_pod(reviewer, &mut pod, &namespace, &what, labels).await?;
    if let (true, Some(meta)) = (job_label, pod["metadata"].as_object_mut()) {
        match meta.get_mut("labels").and_then(Value::as_object_mut) {
            Some(labels) if had_labels => {
                labels.remove(JOB_NAME_LABEL);
            }
            _ => {
                meta.remove("labels");
            }
        }
    }
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
