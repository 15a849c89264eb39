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

fn inject(input: &str, extra: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(crate::support::BIN)
        .args([
            "inject",
            "-f",
            "-",
            "--sidecar-image",
            "example.azurecr.io/imds-broker:1",
            "--client-id",
            "11111111-2222-3333-4444-555555555555",
            "--tenant-id",
            "66666666-7777-8888-9999-000000000000",
            "--kube-api-url",
            "none",
        ])
        .args(extra)
        .env_clear()
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
