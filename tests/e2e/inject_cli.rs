//! `imds-broker inject`: the webhook's mutation applied to manifests on the command line.

use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: data-upload-1
  namespace: velero
  labels:
    velero.io/data-upload: nightly-1
spec:
  containers:
    - name: uploader
      image: velero/velero:v1.15.0
---
apiVersion: batch/v1
kind: Job
metadata:
  name: repo-maintain-job-1
  namespace: velero
spec:
  template:
    metadata:
      labels:
        velero.io/repo-name: default-kopia
    spec:
      restartPolicy: Never
      containers:
        - name: maintenance
          image: velero/velero:v1.18.0
---
apiVersion: v1
kind: Pod
metadata:
  name: unrelated
spec:
  containers:
    - name: app
      image: nginx
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  a: b
"#;

const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const TENANT_ID: &str = "66666666-7777-8888-9999-000000000000";

/// `imds-broker inject -f -` with `args`, `input` on stdin, an empty environment: whether it
/// succeeded, its stdout and its stderr.
fn run(args: &[&str], input: &str) -> (bool, String, String) {
    run_with_env(args, &[], input)
}

/// [`run`] with these environment variables.
fn run_with_env(args: &[&str], env: &[(&str, &str)], input: &str) -> (bool, String, String) {
    let mut child = Command::new(crate::support::BIN)
        .args(["inject", "-f", "-"])
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// [`run`] with an image, an identity and no API server, plus `extra`.
fn inject(input: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "--sidecar-image",
        "example.azurecr.io/imds-broker:1",
        "--client-id",
        CLIENT_ID,
        "--tenant-id",
        TENANT_ID,
        "--kube-api-url",
        "none",
    ];
    args.extend_from_slice(extra);
    run(&args, input)
}

fn sidecar(pod_spec: &Value) -> Option<&Value> {
    pod_spec["initContainers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "imds-broker")
}

#[test]
fn yaml_pods_and_templates_are_injected_and_the_rest_left_alone() {
    let (ok, stdout, stderr) = inject(MANIFESTS, &[]);
    assert!(ok, "{stderr}");
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 4, "{stdout}");
    let pod = &docs[0];
    let side = sidecar(&pod["spec"]).expect("the data-upload pod gets the sidecar");
    assert_eq!(side["image"], "example.azurecr.io/imds-broker:1");
    assert_eq!(side["restartPolicy"], "Always");
    let app_env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(app_env.iter().any(|e| e["name"] == "IDENTITY_ENDPOINT"));
    let job = &docs[1]["spec"]["template"];
    assert!(
        sidecar(&job["spec"]).is_some(),
        "the Job's pod template gets it"
    );
    assert_eq!(docs[1]["kind"], "Job");
    assert!(docs[2]["spec"].get("initContainers").is_none());
    assert_eq!(docs[3]["data"]["a"], "b");
    assert!(
        stderr.contains("Pod velero/data-upload-1: mutated"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Job velero/repo-maintain-job-1: mutated"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Pod default/unrelated: skipped: it carries none of the label keys"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ConfigMap default/settings: not a pod"),
        "{stderr}"
    );
}

#[test]
fn json_in_json_out_and_opt_out_is_honoured() {
    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "velero",
            "labels": {"velero.io/data-upload": "x"},
            "annotations": {"imds-broker.io/inject": "false"}},
        "spec": {"containers": [{"name": "c", "image": "i"}]}});
    let (ok, stdout, stderr) = inject(&pod.to_string(), &[]);
    assert!(ok, "{stderr}");
    let out: Value = serde_json::from_str(&stdout).expect("JSON in, JSON out");
    assert_eq!(out, pod, "an opted-out pod is printed unchanged");
    assert!(stderr.contains("opted_out"), "{stderr}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let (ok, _, stderr) = inject("kind: [unclosed", &[]);
    assert!(!ok);
    assert!(stderr.contains("YAML document 1 is not valid"), "{stderr}");
}

/// `serve` refuses to start with these; `inject` (and the webhook) refuse them too instead of
/// printing a pod whose sidecar would crash-loop.
#[test]
fn settings_the_sidecar_would_refuse_are_an_error_not_a_pod() {
    for (flag, value) in [
        ("--tenant-id", "organizations"),
        ("--authority-host", "http://login.microsoftonline.us"),
    ] {
        let mut args = vec![
            "--sidecar-image",
            "example.azurecr.io/imds-broker:1",
            "--client-id",
            CLIENT_ID,
            "--kube-api-url",
            "none",
            flag,
            value,
        ];
        if flag != "--tenant-id" {
            args.extend(["--tenant-id", TENANT_ID]);
        }
        let (ok, stdout, stderr) = run(&args, MANIFESTS);
        assert!(!ok, "{flag} {value}: {stdout}");
        assert!(stdout.is_empty(), "{stdout}");
        assert!(
            stderr.contains(flag) && stderr.contains(value),
            "{flag} {value}: {stderr}"
        );
    }
}

fn docs_of(stdout: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

/// A newcomer's first run: no flags, no environment, no cluster. The pod is printed injected,
/// with marked placeholders for what only the deployed webhook knows, each announced on stderr.
#[test]
fn without_flags_it_prints_the_pod_with_marked_placeholders() {
    let (ok, stdout, stderr) = run(&[], MANIFESTS);
    assert!(ok, "{stderr}");
    let pod = &docs_of(&stdout)[0];
    let side = sidecar(&pod["spec"]).expect("the data-upload pod gets the sidecar");
    assert_eq!(
        side["image"],
        "sidecar-image-not-set.invalid/imds-broker:placeholder"
    );
    assert_eq!(
        env_value(side, "AZURE_CLIENT_ID"),
        Some("client-id-not-set")
    );
    assert_eq!(
        env_value(side, "AZURE_TENANT_ID"),
        Some("tenant-id-not-set.invalid")
    );
    for note in [
        "note: no sidecar image given (--sidecar-image, IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE or \
         --webhook-deployment)",
        "note: no API server here to read the pod's ServiceAccount annotations from",
        "Pod velero/data-upload-1: mutated",
    ] {
        assert!(stderr.contains(note), "{note:?} not in {stderr}");
    }

    // Given an identity, only the image is a placeholder; with `--kube-api-url none` the
    // outcome is the webhook's own: no identity, so both matched pods are refused (exit 1),
    // each with the webhook's message, and printed unchanged.
    let (ok, _, stderr) = run(
        &["--client-id", CLIENT_ID, "--tenant-id", TENANT_ID],
        MANIFESTS,
    );
    assert!(ok && !stderr.contains("placeholder IDs"), "{stderr}");
    let (ok, stdout, stderr) = run(&["--kube-api-url", "none"], MANIFESTS);
    assert!(!ok, "{stderr}");
    assert!(sidecar(&docs_of(&stdout)[0]["spec"]).is_none(), "{stdout}");
    for line in [
        "Pod velero/data-upload-1: refused: imds-broker: no Azure identity for service account \
         velero/default (no client ID, no tenant ID), so the pod is refused",
        "Job velero/repo-maintain-job-1: refused: imds-broker: no Azure identity",
        "or set the webhook's --client-id/--tenant-id",
        "the webhook would refuse 2 pod(s)",
    ] {
        assert!(stderr.contains(line), "{line:?} not in {stderr}");
    }
    // `--missing-identity admit`: printed unchanged with the warning, exit 0.
    let (ok, stdout, stderr) = run(
        &["--kube-api-url", "none", "--missing-identity", "admit"],
        MANIFESTS,
    );
    assert!(ok, "{stderr}");
    assert!(sidecar(&docs_of(&stdout)[0]["spec"]).is_none(), "{stdout}");
    assert!(
        stderr.contains("warning: imds-broker: no Azure identity for service account"),
        "{stderr}"
    );
}

/// The default keys beyond Velero's: a Job's pods carry the Job controller's
/// batch.kubernetes.io/job-name, so a maintenance Job whose template lacks velero.io/repo-name
/// (velero#8974) is injected as the webhook will inject its pods — the label itself is not
/// printed into the template (the API server sets it) — and a workload opted in with
/// imds-broker.io/sidecar is injected.
#[test]
fn job_templates_are_judged_with_the_job_controllers_label_and_the_opt_in_label_counts() {
    const WORKLOADS: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: default-kopia-maintain-job-1, namespace: velero}
spec:
  template:
    metadata:
      labels: {deploy: velero}
    spec:
      restartPolicy: Never
      containers: [{name: maintenance, image: velero/velero:v1.16.0}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: velero}
spec:
  schedule: "0 1 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: c, image: busybox}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: velero, namespace: velero}
spec:
  template:
    metadata:
      labels: {deploy: velero, imds-broker.io/sidecar: "true"}
    spec:
      containers: [{name: velero, image: velero/velero:v1.18.0}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: other, namespace: velero}
spec:
  template:
    metadata:
      labels: {app: other}
    spec:
      containers: [{name: app, image: app}]
"#;
    let (ok, stdout, stderr) = inject(WORKLOADS, &[]);
    assert!(ok, "{stderr}");
    let docs = docs_of(&stdout);
    let job = &docs[0]["spec"]["template"];
    assert!(sidecar(&job["spec"]).is_some(), "{stdout}");
    assert_eq!(
        job["metadata"]["labels"],
        serde_json::json!({"deploy": "velero"})
    );
    let cron = &docs[1]["spec"]["jobTemplate"]["spec"]["template"];
    assert!(sidecar(&cron["spec"]).is_some(), "{stdout}");
    assert!(cron["metadata"].get("labels").is_none(), "{stdout}");
    assert!(
        sidecar(&docs[2]["spec"]["template"]["spec"]).is_some(),
        "{stdout}"
    );
    assert!(
        sidecar(&docs[3]["spec"]["template"]["spec"]).is_none(),
        "{stdout}"
    );
    for line in [
        "Job velero/default-kopia-maintain-job-1: mutated",
        "CronJob velero/nightly: mutated",
        "Deployment velero/velero: mutated",
        "Deployment velero/other: skipped",
    ] {
        assert!(stderr.contains(line), "{line:?} not in {stderr}");
    }
    // The Job controller's label decides only with the default keys.
    let (ok, stdout, stderr) = inject(WORKLOADS, &["--match-label", "velero.io/repo-name"]);
    assert!(ok, "{stderr}");
    let docs = docs_of(&stdout);
    assert!(
        sidecar(&docs[0]["spec"]["template"]["spec"]).is_none(),
        "{stdout}"
    );
    assert_eq!(
        docs[0]["spec"]["template"]["metadata"]["labels"],
        serde_json::json!({"deploy": "velero"})
    );
}

/// The webhook's settings read from its Deployment (as `kubectl get -o yaml` or `helm
/// template` print it): its env and its flags, under the flags and env given to inject.
#[test]
fn the_webhook_deployment_supplies_the_settings_under_explicit_ones() {
    let deployment = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: imds-broker-webhook}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: imds-broker-webhook, namespace: imds-broker}}
spec:
  template:
    spec:
      containers:
        - name: webhook
          image: registry.example/imds-broker:0.1.0
          args: ["webhook", "--sidecar-memory-limit", "64Mi"]
          env:
            - {{name: IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE, value: "registry.example/imds-broker:0.1.0"}}
            - {{name: IMDS_BROKER_LOG_FORMAT, value: json}}
            - {{name: IMDS_BROKER_WEBHOOK_MATCH_LABELS, value: "velero.io/repo-name,example.com/custom"}}
            - {{name: IMDS_BROKER_WEBHOOK_SIDECAR_PREFETCH, value: ""}}
            - {{name: IMDS_BROKER_WEBHOOK_SIDECAR_CPU_LIMIT, value: "100m"}}
            - {{name: IMDS_BROKER_WEBHOOK_CLIENT_ID, value: "{CLIENT_ID}"}}
            - {{name: IMDS_BROKER_WEBHOOK_TENANT_ID, value: "{TENANT_ID}"}}
            - name: IMDS_BROKER_WEBHOOK_AUTHORITY_HOST
              valueFrom: {{configMapKeyRef: {{name: cloud, key: authority}}}}
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("webhook.yaml");
    std::fs::write(&path, deployment).unwrap();
    let custom = r#"
apiVersion: v1
kind: Pod
metadata: {name: custom, namespace: velero, labels: {example.com/custom: "1"}}
spec: {containers: [{name: app, image: app}]}
"#;
    let input = format!("{MANIFESTS}---{custom}");
    let (ok, stdout, stderr) = run_with_env(
        &[
            "--webhook-deployment",
            path.to_str().unwrap(),
            // Given to inject: wins over the Deployment's.
            "--sidecar-image",
            "mine.example/imds-broker:dev",
        ],
        &[("IMDS_BROKER_WEBHOOK_SIDECAR_CPU_LIMIT", "200m")],
        &input,
    );
    assert!(ok, "{stderr}");
    let docs = docs_of(&stdout);
    // Its match labels: the data-upload pod is not matched, the custom one is.
    assert!(sidecar(&docs[0]["spec"]).is_none(), "{stdout}");
    let job = sidecar(&docs[1]["spec"]["template"]["spec"]).expect("repo-name is matched");
    let side = sidecar(&docs[4]["spec"]).expect("example.com/custom is matched");
    for side in [job, side] {
        assert_eq!(side["image"], "mine.example/imds-broker:dev");
        assert_eq!(env_value(side, "AZURE_CLIENT_ID"), Some(CLIENT_ID));
        assert_eq!(
            env_value(side, "IMDS_BROKER_PREFETCH"),
            None,
            "prefetch \"\""
        );
        assert_eq!(
            side["resources"]["limits"]["cpu"], "200m",
            "inject's env wins"
        );
        assert_eq!(
            side["resources"]["limits"]["memory"], "64Mi",
            "the Deployment's flag"
        );
    }
    assert!(
        stderr.contains("IMDS_BROKER_WEBHOOK_AUTHORITY_HOST comes from valueFrom"),
        "{stderr}"
    );
    assert!(!stderr.contains("note:"), "nothing left to fill: {stderr}");

    // The kustomize base as it is in the repository: its image placeholder is taken as given.
    let base = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/base/deployment.yaml");
    let (ok, stdout, stderr) = run(
        &[
            "--webhook-deployment",
            base,
            "--client-id",
            CLIENT_ID,
            "--tenant-id",
            TENANT_ID,
        ],
        MANIFESTS,
    );
    assert!(ok, "{stderr}");
    let side = sidecar(&docs_of(&stdout)[0]["spec"]).cloned().unwrap();
    assert_eq!(side["image"], "imds-broker");

    let (ok, _, stderr) = run(&["--webhook-deployment", path.to_str().unwrap()], "{}");
    assert!(ok, "{stderr}");
    let not_one = dir.path().join("service.yaml");
    std::fs::write(&not_one, "kind: Service\nmetadata: {name: x}\n").unwrap();
    let (ok, _, stderr) = run(&["--webhook-deployment", not_one.to_str().unwrap()], "{}");
    assert!(!ok && stderr.contains("holds no Deployment"), "{stderr}");
}

/// Found by fuzz/fuzz_targets/inject_manifest.rs: a CronJob whose pod template is not an
/// object made `inject` panic ("cannot access key \"metadata\" in JSON string").
#[test]
fn a_cronjob_without_a_pod_template_object_is_left_as_is() {
    let manifest = "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: nightly}\n\
                    spec: {jobTemplate: {spec: {template: oops}}}\n";
    let (ok, stdout, stderr) = inject(manifest, &[]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("CronJob default/nightly: not a pod or a workload with a pod template"),
        "{stderr}"
    );
    let out: Value = serde_yaml_ng::from_str(&stdout).unwrap();
    assert_eq!(out["spec"]["jobTemplate"]["spec"]["template"], "oops");
}
