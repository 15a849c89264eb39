//! Golden tests of the webhook's patch for pods as Velero 1.15–1.18 create them, plus the
//! review-level decisions (non-matching, opt-out, already injected, no identity, ...).
//!
//! Expected patches live in tests/fixtures/golden/; regenerate them with
//! `UPDATE_GOLDEN=1 cargo test --test e2e webhook_golden::` and review the diff. Every mutated
//! pod is also written to `<target>/webhook-mutated/` for the Kubernetes schema validation in
//! tests/validate_k8s.py.

use async_trait::async_trait;
use base64::Engine;
use imds_broker::webhook::identity::{IdentitySource, LookupError, PartialIdentity};
use imds_broker::webhook::metrics::Outcome;
use imds_broker::webhook::patch::{self, Identity, Injection, SidecarConfig};
use imds_broker::webhook::review::{self, MissingIdentity, Reviewer, WebhookConfig};
use imds_broker::webhook::DEFAULT_MATCH_LABELS;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const HEADER: &str = "golden-identity-header-0123456789abcdefghijk";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const TENANT_ID: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
const IMAGE: &str = "ghcr.io/example/imds-broker:0.1.0";
const ENDPOINT: &str = "http://127.0.0.1:8400/msi/token";

const FIXTURES: &[&str] = &[
    "velero-1.15-data-upload",
    "velero-1.16-data-download",
    "velero-1.17-pod-volume-backup",
    "velero-1.18-maintenance-job",
];

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> Value {
    let path = manifest_dir().join(format!("tests/fixtures/velero/{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn mutated_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target-dir>/tmp.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("webhook-mutated");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sidecar_config() -> SidecarConfig {
    SidecarConfig {
        image: IMAGE.into(),
        ..SidecarConfig::default()
    }
}

fn identity() -> Identity {
    Identity {
        client_id: CLIENT_ID.into(),
        tenant_id: TENANT_ID.into(),
    }
}

fn apply(pod: &Value, patch: &Value) -> Value {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone()).unwrap();
    let mut doc = pod.clone();
    json_patch::patch(&mut doc, &ops).expect("the patch applies to the pod");
    doc
}

fn env_of(container: &Value) -> Vec<(String, Option<String>)> {
    container["env"]
        .as_array()
        .map(|env| {
            env.iter()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap().to_string(),
                        e["value"].as_str().map(String::from),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn env_value(container: &Value, name: &str) -> Option<String> {
    let matching: Vec<_> = env_of(container)
        .into_iter()
        .filter(|(n, _)| n == name)
        .collect();
    assert!(
        matching.len() <= 1,
        "{name} set twice in {}",
        container["name"]
    );
    matching.into_iter().next().and_then(|(_, v)| v)
}

fn mounts_token(container: &Value) -> bool {
    container["volumeMounts"]
        .as_array()
        .is_some_and(|m| m.iter().any(|m| m["name"] == patch::TOKEN_VOLUME_NAME))
}

/// Everything a correctly injected pod must satisfy, given the pod it came from.
fn assert_injected(original: &Value, mutated: &Value, header: &str) {
    let spec = &mutated["spec"];
    let inits = spec["initContainers"].as_array().expect("initContainers");
    let sidecar = &inits[0];
    assert_eq!(
        sidecar["name"], "imds-broker",
        "the sidecar is the first init container"
    );
    assert_eq!(sidecar["restartPolicy"], "Always", "native sidecar");
    assert_eq!(sidecar["args"], json!(["serve"]));
    assert_eq!(sidecar["image"], IMAGE);
    let probe = &sidecar["startupProbe"]["httpGet"];
    assert_eq!(
        (probe["path"].as_str(), probe["port"].as_i64()),
        (Some("/readyz"), Some(8401))
    );
    assert!(
        sidecar["startupProbe"]["failureThreshold"]
            .as_i64()
            .unwrap()
            >= 10
    );

    let sc = &sidecar["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 65532, "overrides the pod's runAsUser: 0");
    assert_eq!(sc["runAsGroup"], 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        sidecar["resources"]["requests"],
        json!({"cpu": "10m", "memory": "16Mi"})
    );
    assert_eq!(sidecar["resources"]["limits"], json!({"memory": "32Mi"}));

    assert_eq!(
        env_value(sidecar, "AZURE_CLIENT_ID").as_deref(),
        Some(CLIENT_ID)
    );
    assert_eq!(
        env_value(sidecar, "AZURE_TENANT_ID").as_deref(),
        Some(TENANT_ID)
    );
    assert_eq!(
        env_value(sidecar, "IDENTITY_HEADER").as_deref(),
        Some(header)
    );
    assert_eq!(
        env_value(sidecar, "AZURE_FEDERATED_TOKEN_FILE").as_deref(),
        Some("/var/run/secrets/imds-broker/serviceaccount/token")
    );
    assert_eq!(
        env_value(sidecar, "IMDS_BROKER_LISTEN").as_deref(),
        Some("127.0.0.1:8400")
    );
    assert_eq!(
        env_value(sidecar, "IMDS_BROKER_ADMIN_LISTEN").as_deref(),
        Some("0.0.0.0:8401")
    );

    // The token volume: once, projected with the Entra audience, mounted only in the sidecar.
    let volumes = spec["volumes"].as_array().unwrap();
    let token: Vec<_> = volumes
        .iter()
        .filter(|v| v["name"] == patch::TOKEN_VOLUME_NAME)
        .collect();
    assert_eq!(token.len(), 1);
    let projection = &token[0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projection["audience"], "api://AzureADTokenExchange");
    assert_eq!(projection["path"], "token");
    assert!(mounts_token(sidecar));
    for c in spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(&inits[1..])
    {
        assert!(
            !mounts_token(c),
            "{} must not see the federated token",
            c["name"]
        );
    }

    // App containers: endpoint and header added, everything they had kept in order.
    let before = original["spec"]["containers"].as_array().unwrap();
    let after = spec["containers"].as_array().unwrap();
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(after) {
        assert_eq!(env_value(a, "IDENTITY_ENDPOINT").as_deref(), Some(ENDPOINT));
        assert_eq!(env_value(a, "IDENTITY_HEADER").as_deref(), Some(header));
        let kept = env_of(b);
        assert_eq!(
            env_of(a)[..kept.len()],
            kept[..],
            "existing env kept in order"
        );
        assert_eq!(a["volumeMounts"], b["volumeMounts"]);
        assert_eq!(a["command"], b["command"]);
    }
    // Nothing Velero relies on changed.
    for key in [
        "restartPolicy",
        "terminationGracePeriodSeconds",
        "securityContext",
        "serviceAccountName",
    ] {
        assert_eq!(spec[key], original["spec"][key], "{key}");
    }
    let original_volumes = original["spec"]["volumes"].as_array().unwrap();
    assert_eq!(&volumes[..original_volumes.len()], &original_volumes[..]);
    assert_eq!(
        mutated["metadata"]["annotations"]["imds-broker.io/injected"],
        "true"
    );
    for (k, v) in original["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert_eq!(&mutated["metadata"]["annotations"][k], v);
    }
    assert_eq!(
        mutated["metadata"]["labels"],
        original["metadata"]["labels"]
    );
}

#[test]
fn golden_patches_for_velero_pods() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let id = identity();
    let injection = Injection {
        identity: &id,
        identity_header: HEADER,
        token_expiration_seconds: 3600,
    };
    let mut mismatches = Vec::new();
    for name in FIXTURES {
        let original = fixture(name);
        let pod: Pod = serde_json::from_value(original.clone()).unwrap();
        let ops = patch::build_patch(&pod, &sidecar_config(), &injection);
        let actual = serde_json::to_value(&ops).unwrap();
        let golden_path = manifest_dir().join(format!("tests/fixtures/golden/{name}.json"));
        if update {
            let text = serde_json::to_string_pretty(&actual).unwrap() + "\n";
            std::fs::write(&golden_path, text).unwrap();
        }
        let expected: Value = std::fs::read_to_string(&golden_path)
            .map(|t| serde_json::from_str(&t).unwrap())
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (generate with UPDATE_GOLDEN=1)",
                    golden_path.display()
                )
            });
        if expected != actual {
            mismatches.push(name.to_string());
            continue;
        }

        let mutated = apply(&original, &actual);
        assert_injected(&original, &mutated, HEADER);
        let again: Pod = serde_json::from_value(mutated.clone()).unwrap();
        assert!(
            patch::build_patch(&again, &sidecar_config(), &injection).is_empty(),
            "{name}: re-invocation must give an empty patch"
        );
        let out = mutated_dir().join(format!("{name}.json"));
        std::fs::write(out, serde_json::to_string_pretty(&mutated).unwrap()).unwrap();
    }
    assert!(
        mismatches.is_empty(),
        "patches differ from the golden files for {mismatches:?}; if intended, rerun with \
         UPDATE_GOLDEN=1 and review the diff"
    );
}

#[test]
fn sidecar_goes_before_existing_init_containers_and_env_is_created_when_absent() {
    let mut pod = fixture("velero-1.15-data-upload");
    pod["spec"]["initContainers"] = json!([{"name": "istio-init", "image": "istio/proxyv2"}]);
    pod["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("env");
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "second", "image": "busybox"}));
    let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
    let id = identity();
    let injection = Injection {
        identity: &id,
        identity_header: HEADER,
        token_expiration_seconds: 7200,
    };
    let ops = patch::build_patch(&typed, &sidecar_config(), &injection);
    let mutated = apply(&pod, &serde_json::to_value(&ops).unwrap());
    assert_injected(&pod, &mutated, HEADER);
    let inits = mutated["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 2);
    assert_eq!(inits[1]["name"], "istio-init");
    assert!(
        inits[1].get("env").is_none(),
        "other init containers get no credential"
    );
    let token = mutated["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == patch::TOKEN_VOLUME_NAME)
        .unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"],
        7200
    );
    std::fs::write(
        mutated_dir().join("extra-init-container-and-second-app.json"),
        serde_json::to_string_pretty(&mutated).unwrap(),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------
// Review-level behaviour.

/// ServiceAccount annotations by "namespace/name"; records lookups.
#[derive(Default)]
struct FakeAccounts {
    accounts: HashMap<String, PartialIdentity>,
    fail: bool,
    lookups: Mutex<Vec<String>>,
}

#[async_trait]
impl IdentitySource for FakeAccounts {
    async fn lookup(&self, namespace: &str, name: &str) -> Result<PartialIdentity, LookupError> {
        let key = format!("{namespace}/{name}");
        self.lookups.lock().unwrap().push(key.clone());
        if self.fail {
            return Err(LookupError::Status {
                url: format!("https://api/{key}"),
                status: 503,
                body: "unavailable".into(),
            });
        }
        Ok(self.accounts.get(&key).cloned().unwrap_or_default())
    }
}

fn annotated_velero_sa() -> FakeAccounts {
    FakeAccounts {
        accounts: HashMap::from([(
            "velero/velero-server".to_string(),
            PartialIdentity::new(Some(CLIENT_ID), Some(TENANT_ID)),
        )]),
        ..Default::default()
    }
}

fn make_reviewer(
    accounts: FakeAccounts,
    fallback: PartialIdentity,
) -> (Reviewer, Arc<FakeAccounts>) {
    make_reviewer_with(accounts, fallback, MissingIdentity::Refuse)
}

fn make_reviewer_with(
    accounts: FakeAccounts,
    fallback: PartialIdentity,
    missing_identity: MissingIdentity,
) -> (Reviewer, Arc<FakeAccounts>) {
    let accounts = Arc::new(accounts);
    let config = WebhookConfig {
        match_labels: DEFAULT_MATCH_LABELS.iter().map(|s| s.to_string()).collect(),
        fallback,
        missing_identity,
        sidecar: sidecar_config(),
        token_expiration_seconds: 3600,
    };
    let header: review::HeaderSource = Arc::new(|| Ok(HEADER.to_string()));
    (Reviewer::new(config, accounts.clone(), header), accounts)
}

fn admission_review(pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "velero",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:velero:velero-server"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    }))
    .unwrap()
}

struct Reviewed {
    outcome: Outcome,
    response: Value,
    patch: Option<Value>,
}

async fn review_pod(reviewer: &Reviewer, pod: &Value) -> Reviewed {
    let answer = reviewer.review(&admission_review(pod)).await.unwrap();
    let body: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["kind"], "AdmissionReview");
    let response = body["response"].clone();
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    let patch = response["patch"].as_str().map(|p| {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    });
    Reviewed {
        outcome: answer.outcome,
        response,
        patch,
    }
}

#[tokio::test]
async fn every_velero_pod_is_mutated_through_the_review_path() {
    let (reviewer, accounts) = make_reviewer(annotated_velero_sa(), PartialIdentity::default());
    for name in FIXTURES {
        let pod = fixture(name);
        let r = review_pod(&reviewer, &pod).await;
        assert_eq!(r.outcome, Outcome::Mutated, "{name}");
        assert_eq!(r.response["allowed"], true);
        // Velero 1.16+ copies the node-agent's envFrom: what it could hold is overridden, and
        // the user is told so; the other pods carry nothing the injection changes.
        let expected = match *name {
            "velero-1.16-data-download" => json!([
                "imds-broker: container b1d4a0f2-8c3e-4d7a-a2f5-6e9c0b1a7d33 takes environment \
                 variables from ConfigMap velero-node-agent-env (envFrom); an IDENTITY_ENDPOINT \
                 or IDENTITY_HEADER there is overridden by the injected pair (to use your own, \
                 set both in the container's env)"
            ]),
            _ => Value::Null,
        };
        assert_eq!(r.response["warnings"], expected, "{name}");
        let mutated = apply(&pod, &r.patch.expect("a patch"));
        assert_injected(&pod, &mutated, HEADER);
    }
    assert!(accounts
        .lookups
        .lock()
        .unwrap()
        .iter()
        .all(|k| k == "velero/velero-server"));
}

#[tokio::test]
async fn non_matching_pods_are_admitted_untouched_without_a_lookup() {
    let (reviewer, accounts) = make_reviewer(annotated_velero_sa(), PartialIdentity::default());
    let mut server = fixture("velero-1.18-maintenance-job");
    server["metadata"]["labels"] =
        json!({"app.kubernetes.io/name": "velero", "component": "velero"});
    let r = review_pod(&reviewer, &server).await;
    assert_eq!(r.outcome, Outcome::Skipped);
    assert_eq!(r.response["allowed"], true);
    assert!(r.patch.is_none() && r.response.get("patchType").is_none());
    // A label *value* that looks like a match is not a key match.
    server["metadata"]["labels"] = json!({"x": "velero.io/data-upload"});
    assert_eq!(
        review_pod(&reviewer, &server).await.outcome,
        Outcome::Skipped
    );
    assert!(accounts.lookups.lock().unwrap().is_empty());
}

#[tokio::test]
async fn opt_out_annotation_false_is_honoured() {
    let (reviewer, _) = make_reviewer(annotated_velero_sa(), PartialIdentity::default());
    let mut pod = fixture("velero-1.16-data-download");
    pod["metadata"]["annotations"] = json!({"imds-broker.io/inject": "false"});
    let r = review_pod(&reviewer, &pod).await;
    assert_eq!(r.outcome, Outcome::OptedOut);
    assert_eq!(r.response["allowed"], true);
    assert!(r.patch.is_none());

    pod["metadata"]["annotations"] = json!({"imds-broker.io/inject": "true"});
    let r = review_pod(&reviewer, &pod).await;
    assert_eq!(r.outcome, Outcome::Mutated);
    let mutated = apply(&pod, &r.patch.unwrap());
    assert_eq!(
        mutated["metadata"]["annotations"]["imds-broker.io/inject"],
        "true"
    );
    assert_eq!(
        mutated["metadata"]["annotations"]["imds-broker.io/injected"],
        "true"
    );
}

#[tokio::test]
async fn already_injected_pods_get_an_empty_patch() {
    let (reviewer, _) = make_reviewer(annotated_velero_sa(), PartialIdentity::default());
    let pod = fixture("velero-1.17-pod-volume-backup");
    let first = review_pod(&reviewer, &pod).await;
    let mutated = apply(&pod, &first.patch.unwrap());
    // Re-invocation (reinvocationPolicy: IfNeeded) sees the mutated pod.
    let second = review_pod(&reviewer, &mutated).await;
    assert_eq!(second.outcome, Outcome::AlreadyInjected);
    assert_eq!(second.response["allowed"], true);
    assert!(second.patch.is_none());
}

#[tokio::test]
async fn containers_added_after_injection_get_the_env_on_reinvocation() {
    let (reviewer, _) = make_reviewer(annotated_velero_sa(), PartialIdentity::default());
    let pod = fixture("velero-1.16-data-download");
    let first = review_pod(&reviewer, &pod).await;
    let mut mutated = apply(&pod, &first.patch.unwrap());
    // Another webhook appends a container; the API server re-invokes this one (IfNeeded).
    mutated["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "late", "image": "busybox"}));
    let second = review_pod(&reviewer, &mutated).await;
    assert_eq!(second.outcome, Outcome::AlreadyInjected);
    let ops = second.patch.expect("env for the late container");
    assert_eq!(ops.as_array().unwrap().len(), 1, "{ops}");
    let after = apply(&mutated, &ops);
    assert_injected(&mutated, &after, HEADER);
    let late = &after["spec"]["containers"][1];
    assert!(!mounts_token(late));
    // And now there is nothing left to do.
    assert!(review_pod(&reviewer, &after).await.patch.is_none());
}

/// Fail closed: a matched pod admitted without the broker would ask the node's real IMDS and
/// get the kubelet identity's token or "Identity not found", far from the cause.
#[tokio::test]
async fn no_identity_refuses_the_pod_naming_the_service_account_and_both_fixes() {
    let (reviewer, _) = make_reviewer(FakeAccounts::default(), PartialIdentity::default());
    let r = review_pod(&reviewer, &fixture("velero-1.15-data-upload")).await;
    assert_eq!(r.outcome, Outcome::NoIdentity);
    assert_eq!(r.response["allowed"], false);
    assert!(r.patch.is_none());
    assert_eq!(
        r.response["status"]["message"],
        "imds-broker: no Azure identity for service account velero/velero-server (no client ID, \
         no tenant ID), so the pod is refused: without the broker it would reach the node's \
         IMDS and get the kubelet identity's token or \"Identity not found\". Annotate the \
         ServiceAccount with azure.workload.identity/client-id and \
         azure.workload.identity/tenant-id, or set the webhook's --client-id/--tenant-id \
         (Helm: identity.clientId/identity.tenantId)"
    );
    // Half an identity is no identity; the message says which half is missing.
    let half = FakeAccounts {
        accounts: HashMap::from([(
            "velero/velero-server".to_string(),
            PartialIdentity::new(Some(CLIENT_ID), None),
        )]),
        ..Default::default()
    };
    let (reviewer, _) = make_reviewer(half, PartialIdentity::default());
    let r = review_pod(&reviewer, &fixture("velero-1.15-data-upload")).await;
    assert_eq!(r.outcome, Outcome::NoIdentity);
    assert_eq!(r.response["allowed"], false);
    let message = r.response["status"]["message"].as_str().unwrap();
    assert!(message.contains("(no tenant ID)"), "{message}");
}

#[tokio::test]
async fn no_identity_with_missing_identity_admit_admits_unchanged_with_a_warning() {
    let (reviewer, _) = make_reviewer_with(
        FakeAccounts::default(),
        PartialIdentity::default(),
        MissingIdentity::Admit,
    );
    let r = review_pod(&reviewer, &fixture("velero-1.15-data-upload")).await;
    assert_eq!(r.outcome, Outcome::NoIdentity);
    assert_eq!(r.response["allowed"], true);
    assert!(r.patch.is_none());
    assert_eq!(
        r.response["warnings"],
        json!([
            "imds-broker: no Azure identity for service account velero/velero-server: \
                annotate it with azure.workload.identity/client-id and \
                azure.workload.identity/tenant-id, or start the webhook with \
                --client-id/--tenant-id"
        ])
    );
}

/// The default keys beyond Velero's own: any Job pod (Velero's maintenance Jobs whose pods
/// lack velero.io/repo-name, velero#8974) and the opt-in label Velero's values put on the
/// server and node-agent pods.
#[tokio::test]
async fn job_pods_and_opted_in_pods_are_mutated_by_default() {
    let (reviewer, _) = make_reviewer(annotated_velero_sa(), PartialIdentity::default());
    let mut job_pod = fixture("velero-1.18-maintenance-job");
    let labels = job_pod["metadata"]["labels"].as_object_mut().unwrap();
    labels.remove("velero.io/repo-name").unwrap();
    assert!(labels.contains_key("batch.kubernetes.io/job-name"));
    let server = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "velero-7d9f8b6c5-", "namespace": "velero",
            "labels": {"deploy": "velero", "imds-broker.io/sidecar": "true"}},
        "spec": {"serviceAccountName": "velero-server",
            "containers": [{"name": "velero", "image": "velero/velero:v1.18.0"}],
            "volumes": [{"name": "plugins", "emptyDir": {}}]}
    });
    for pod in [job_pod, server] {
        let r = review_pod(&reviewer, &pod).await;
        assert_eq!(r.outcome, Outcome::Mutated, "{}", pod["metadata"]);
        assert_injected(&pod, &apply(&pod, &r.patch.unwrap()), HEADER);
    }
    // Neither key, no Velero key: skipped.
    let plain = json!({"metadata": {"name": "p", "labels": {"deploy": "velero"}},
        "spec": {"containers": [{"name": "c"}]}});
    assert_eq!(
        review_pod(&reviewer, &plain).await.outcome,
        Outcome::Skipped
    );
}

#[tokio::test]
async fn service_account_annotations_win_and_flags_fill_the_gaps() {
    let sa = FakeAccounts {
        accounts: HashMap::from([(
            "velero/velero-server".to_string(),
            PartialIdentity::new(Some("sa-client"), None),
        )]),
        ..Default::default()
    };
    let (reviewer, _) = make_reviewer(
        sa,
        PartialIdentity::new(Some("flag-client"), Some("flag-tenant")),
    );
    let pod = fixture("velero-1.18-maintenance-job");
    let r = review_pod(&reviewer, &pod).await;
    let mutated = apply(&pod, &r.patch.unwrap());
    let sidecar = &mutated["spec"]["initContainers"][0];
    assert_eq!(
        env_value(sidecar, "AZURE_CLIENT_ID").as_deref(),
        Some("sa-client")
    );
    assert_eq!(
        env_value(sidecar, "AZURE_TENANT_ID").as_deref(),
        Some("flag-tenant")
    );

    // Flags alone are enough.
    let (reviewer, _) = make_reviewer(
        FakeAccounts::default(),
        PartialIdentity::new(Some("flag-client"), Some("flag-tenant")),
    );
    assert_eq!(review_pod(&reviewer, &pod).await.outcome, Outcome::Mutated);
}

#[tokio::test]
async fn a_failed_service_account_lookup_refuses_the_pod() {
    let failing = FakeAccounts {
        fail: true,
        ..Default::default()
    };
    let (reviewer, _) = make_reviewer(failing, PartialIdentity::new(Some("c"), Some("t")));
    let r = review_pod(&reviewer, &fixture("velero-1.15-data-upload")).await;
    assert_eq!(r.outcome, Outcome::Error);
    assert_eq!(r.response["allowed"], false);
    let message = r.response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("velero/velero-server") && message.contains("503"),
        "{message}"
    );
}

/// `serve` refuses to start with a tenant that is neither a GUID nor a domain: injecting one
/// from an annotation would crash-loop the sidecar in every pod of the ServiceAccount (the app
/// containers waiting behind it), so the pod is refused, naming the annotation to fix.
#[tokio::test]
async fn an_annotation_the_sidecar_would_refuse_refuses_the_pod() {
    for tenant in ["organizations", "common", "contoso/../x"] {
        let accounts = FakeAccounts {
            accounts: HashMap::from([(
                "velero/velero-server".to_string(),
                PartialIdentity::new(Some(CLIENT_ID), Some(tenant)),
            )]),
            ..Default::default()
        };
        // The flags' valid tenant does not paper over the annotation's.
        let (reviewer, _) = make_reviewer(accounts, PartialIdentity::new(None, Some(TENANT_ID)));
        let r = review_pod(&reviewer, &fixture("velero-1.15-data-upload")).await;
        assert_eq!(r.outcome, Outcome::Error, "{tenant}");
        assert_eq!(r.response["allowed"], false);
        assert!(r.patch.is_none());
        let message = r.response["status"]["message"].as_str().unwrap();
        for part in [
            "ServiceAccount velero/velero-server",
            "azure.workload.identity/tenant-id",
            &format!("{tenant:?}"),
            "refuse to start",
        ] {
            assert!(message.contains(part), "{tenant}: {part} not in {message}");
        }
    }
}

#[tokio::test]
async fn token_expiration_annotation_overrides_and_invalid_values_warn() {
    let (reviewer, _) = make_reviewer(annotated_velero_sa(), PartialIdentity::default());
    let expiration = |mutated: &Value| {
        mutated["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == patch::TOKEN_VOLUME_NAME)
            .unwrap()["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"]
            .as_i64()
            .unwrap()
    };
    let mut pod = fixture("velero-1.17-pod-volume-backup");
    pod["metadata"]["annotations"] =
        json!({"azure.workload.identity/service-account-token-expiration": "86400"});
    let r = review_pod(&reviewer, &pod).await;
    assert!(r.response.get("warnings").is_none());
    assert_eq!(expiration(&apply(&pod, &r.patch.unwrap())), 86400);

    pod["metadata"]["annotations"] =
        json!({"azure.workload.identity/service-account-token-expiration": "600"});
    let r = review_pod(&reviewer, &pod).await;
    assert_eq!(r.outcome, Outcome::Mutated);
    let warning = r.response["warnings"][0].as_str().unwrap();
    assert!(warning.contains("between 3600 and 86400"), "{warning}");
    assert_eq!(expiration(&apply(&pod, &r.patch.unwrap())), 3600);
}

#[tokio::test]
async fn windows_and_host_network_pods_are_left_alone_with_a_warning() {
    let (reviewer, _) = make_reviewer(annotated_velero_sa(), PartialIdentity::default());
    let mut pod = fixture("velero-1.16-data-download");
    pod["spec"]["os"] = json!({"name": "windows"});
    pod["spec"]["securityContext"] =
        json!({"windowsOptions": {"runAsUserName": "ContainerAdministrator"}});
    let r = review_pod(&reviewer, &pod).await;
    assert_eq!(r.outcome, Outcome::Unsupported);
    assert_eq!(r.response["allowed"], true);
    assert!(r.patch.is_none());
    assert!(r.response["warnings"][0]
        .as_str()
        .unwrap()
        .contains("Windows"));

    let mut pod = fixture("velero-1.17-pod-volume-backup");
    pod["spec"]["hostNetwork"] = json!(true);
    let r = review_pod(&reviewer, &pod).await;
    assert_eq!(r.outcome, Outcome::Unsupported);
    assert!(r.patch.is_none());
    let warning = r.response["warnings"][0].as_str().unwrap();
    assert!(warning.contains("hostNetwork"), "{warning}");
}

#[tokio::test]
async fn updates_and_other_kinds_are_skipped() {
    let (reviewer, _) = make_reviewer(annotated_velero_sa(), PartialIdentity::default());
    let pod = fixture("velero-1.15-data-upload");
    let mut review: Value = serde_json::from_slice(&admission_review(&pod)).unwrap();
    review["request"]["operation"] = json!("UPDATE");
    let answer = reviewer
        .review(&serde_json::to_vec(&review).unwrap())
        .await
        .unwrap();
    assert_eq!(answer.outcome, Outcome::Skipped);
    assert!(answer.response.patch.is_none());
}

#[tokio::test]
async fn malformed_reviews_are_errors_not_panics() {
    let (reviewer, _) = make_reviewer(annotated_velero_sa(), PartialIdentity::default());
    let mut not_a_pod: Value = serde_json::from_slice(&admission_review(&json!({}))).unwrap();
    not_a_pod["request"]["object"] = json!({"spec": {"containers": "nope"}});
    let mut no_object = not_a_pod.clone();
    no_object["request"]
        .as_object_mut()
        .unwrap()
        .remove("object");
    for body in [
        serde_json::to_vec(&not_a_pod).unwrap(),
        serde_json::to_vec(&no_object).unwrap(),
        b"{\"apiVersion\":\"admission.k8s.io/v1\"".to_vec(),
        vec![0xff, 0xfe, 0x00],
        Vec::new(),
    ] {
        assert!(reviewer.review(&body).await.is_err());
    }
}

#[tokio::test]
async fn each_pod_gets_a_fresh_random_header_shared_by_sidecar_and_app() {
    let config = WebhookConfig {
        match_labels: vec!["velero.io/data-upload".into()],
        fallback: PartialIdentity::new(Some("c"), Some("t")),
        missing_identity: MissingIdentity::Refuse,
        sidecar: sidecar_config(),
        token_expiration_seconds: 3600,
    };
    let reviewer = Reviewer::new(
        config,
        Arc::new(FakeAccounts::default()),
        Arc::new(review::random_identity_header),
    );
    let pod = fixture("velero-1.15-data-upload");
    let mut headers = Vec::new();
    for _ in 0..2 {
        let r = review_pod(&reviewer, &pod).await;
        let mutated = apply(&pod, &r.patch.unwrap());
        let sidecar = env_value(&mutated["spec"]["initContainers"][0], "IDENTITY_HEADER").unwrap();
        let app = env_value(&mutated["spec"]["containers"][0], "IDENTITY_HEADER").unwrap();
        assert_eq!(sidecar, app);
        assert!(sidecar.len() >= 43);
        headers.push(sidecar);
    }
    assert_ne!(headers[0], headers[1]);
}
