//! Unit tests of the parent module.
use super::*;
use serde_json::json;

fn pod(v: Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

fn identity() -> Identity {
    Identity {
        client_id: "c".into(),
        tenant_id: "t".into(),
    }
}

fn apply(p: &Pod, ops: &[PatchOperation]) -> Value {
    let mut doc = serde_json::to_value(p).unwrap();
    json_patch::patch(&mut doc, ops).unwrap();
    doc
}

#[test]
fn annotation_keys_are_escaped_and_missing_arrays_created_whole() {
    let p = pod(json!({"metadata": {"annotations": {"a": "b"}},
        "spec": {"containers": [{"name": "app"}]}}));
    let id = identity();
    let inj = Injection {
        identity: &id,
        identity_header: "h",
        token_expiration_seconds: 3600,
    };
    let ops = build_patch(&p, &SidecarConfig::default(), &inj);
    let paths: Vec<String> = ops
        .iter()
        .map(|o| match o {
            PatchOperation::Add(a) => a.path.to_string(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        paths,
        [
            "/metadata/annotations/imds-broker.io~1injected",
            "/spec/volumes",
            "/spec/initContainers",
            "/spec/containers/0/env",
        ]
    );
    let doc = apply(&p, &ops);
    assert_eq!(doc["metadata"]["annotations"][INJECTED_ANNOTATION], "true");
    assert_eq!(
        doc["spec"]["containers"][0]["env"][1],
        json!({"name": "IDENTITY_HEADER", "value": "h"})
    );
    // Re-applying to the result is a no-op.
    let again: Pod = serde_json::from_value(doc).unwrap();
    assert!(build_patch(&again, &SidecarConfig::default(), &inj).is_empty());
}

/// The two variables come as a pair, from the container's own `env` or from the webhook;
/// never half of each (a container's own header with the sidecar's endpoint answered 401 on
/// every call).
#[test]
fn app_containers_get_the_identity_pair_whole_from_one_place() {
    let p = pod(json!({"spec": {"containers": [
        {"name": "own", "env": [
            {"name": "IDENTITY_ENDPOINT", "value": "http://x"},
            {"name": "IDENTITY_HEADER", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        {"name": "header-only", "env": [{"name": "A", "value": "1"},
            {"name": "IDENTITY_HEADER", "value": "mine"}]},
        {"name": "endpoint-only", "env": [{"name": "IDENTITY_ENDPOINT", "value": "http://arc"}]},
        {"name": "plain"},
        {"name": "from-config-map", "envFrom": [{"configMapRef": {"name": "node-agent-env"}}]},
        {"name": "prefixed", "envFrom": [{"prefix": "APP_", "secretRef": {"name": "app"}}]},
        {"name": "identity-prefixed", "envFrom": [{"prefix": "IDENTITY_", "secretRef": {"name": "id"}}]}
    ]}}));
    let id = identity();
    let inj = Injection {
        identity: &id,
        identity_header: "h",
        token_expiration_seconds: 3600,
    };
    let config = SidecarConfig::default();
    let doc = apply(&p, &build_patch(&p, &config, &inj));
    let pair = |i: usize| {
        let env = doc["spec"]["containers"][i]["env"].as_array().unwrap();
        let only = |name: &str| {
            let set: Vec<&Value> = env.iter().filter(|e| e["name"] == name).collect();
            assert_eq!(set.len(), 1, "{name} in {env:?}");
            set[0].clone()
        };
        (only("IDENTITY_ENDPOINT"), only("IDENTITY_HEADER"))
    };
    let ours = (
        json!({"name": "IDENTITY_ENDPOINT", "value": "http://127.0.0.1:8400/msi/token"}),
        json!({"name": "IDENTITY_HEADER", "value": "h"}),
    );
    // Its own complete pair: untouched, whatever the source of its values.
    assert_eq!(
        doc["spec"]["containers"][0],
        serde_json::to_value(&p.spec.as_ref().unwrap().containers[0]).unwrap()
    );
    for i in 1..7 {
        assert_eq!(pair(i), ours, "container {i}");
    }
    // The other variables stay, in order.
    assert_eq!(
        doc["spec"]["containers"][1]["env"][0],
        json!({"name": "A", "value": "1"})
    );

    let warnings = app_env_warnings(&p.spec.unwrap().containers);
    assert_eq!(warnings.len(), 4, "{warnings:#?}");
    assert!(warnings[0]
        .contains("container header-only sets IDENTITY_HEADER without IDENTITY_ENDPOINT"));
    assert!(warnings[1]
        .contains("container endpoint-only sets IDENTITY_ENDPOINT without IDENTITY_HEADER"));
    assert!(warnings[2].contains("container from-config-map takes environment variables from ConfigMap node-agent-env (envFrom)"));
    assert!(warnings[3]
        .contains("container identity-prefixed takes environment variables from Secret id"));
    assert!(warnings
        .iter()
        .all(|w| w.contains("set both in the container's env")));

    // Re-invocation: every container now has a pair; nothing to add and nothing to warn.
    let again: Pod = serde_json::from_value(doc).unwrap();
    assert!(late_container_patch(&again, &config).is_empty());
    assert!(app_env_warnings(&again.spec.unwrap().containers).is_empty());
}

#[test]
fn token_expiration_annotation_is_range_checked() {
    let with = |v: &str| {
        pod(
            json!({"metadata": {"annotations": {TOKEN_EXPIRATION_ANNOTATION: v}},
            "spec": {"containers": []}}),
        )
    };
    assert_eq!(token_expiration(&with("7200"), 3600), Ok(7200));
    assert_eq!(token_expiration(&with(" 86400 "), 3600), Ok(86400));
    assert!(token_expiration(&with("3599"), 3600).is_err());
    assert!(token_expiration(&with("86401"), 3600).is_err());
    assert!(token_expiration(&with("1h"), 3600).is_err());
    let none = pod(json!({"spec": {"containers": []}}));
    assert_eq!(token_expiration(&none, 4000), Ok(4000));
}

#[test]
fn opt_out_values() {
    for (v, out) in [
        ("false", true),
        ("False", true),
        (" off ", true),
        ("0", true),
        ("true", false),
        ("", false),
        ("maybe", false),
    ] {
        let p = pod(json!({"metadata": {"annotations": {INJECT_ANNOTATION: v}},
            "spec": {"containers": []}}));
        assert_eq!(is_opted_out(&p), out, "{v:?}");
    }
}

#[test]
fn optional_sidecar_settings_become_env_and_resources() {
    let cfg = SidecarConfig {
        authority_host: Some("https://login.microsoftonline.us".into()),
        allow_resources: vec!["https://storage.azure.com/".into(), "https://x/".into()],
        prefetch: vec!["https://x/".into()],
        audience: "api://AzureADTokenExchangeUSGov".into(),
        cpu_limit: Some("100m".into()),
        memory_limit: None,
        ..Default::default()
    };
    let c = sidecar_json(&cfg);
    let env: BTreeMap<String, String> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().into(),
                e["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        env["AZURE_AUTHORITY_HOST"],
        "https://login.microsoftonline.us"
    );
    assert_eq!(
        env["IMDS_BROKER_ALLOW_RESOURCES"],
        "https://storage.azure.com/,https://x/"
    );
    assert_eq!(
        env["IMDS_BROKER_TOKEN_AUDIENCE"],
        "api://AzureADTokenExchangeUSGov"
    );
    assert_eq!(env["IMDS_BROKER_PREFETCH"], "https://x/");
    assert_eq!(c["resources"]["limits"], json!({"cpu": "100m"}));
}

#[test]
fn no_prefetch_means_no_env() {
    let cfg = SidecarConfig {
        prefetch: Vec::new(),
        ..Default::default()
    };
    let c = sidecar_json(&cfg);
    let names: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"IMDS_BROKER_PREFETCH"), "{names:?}");
}

/// The sidecar container for `cfg`, as JSON.
fn sidecar_json(cfg: &SidecarConfig) -> serde_json::Value {
    let id = identity();
    let inj = Injection {
        identity: &id,
        identity_header: "h",
        token_expiration_seconds: 3600,
    };
    serde_json::to_value(sidecar_container(cfg, &inj)).unwrap()
}

/// The pull secrets for a private sidecar image: appended when missing (the array created
/// when the pod has none), never duplicated, the pod's own kept first; nothing on
/// re-invocation.
#[test]
fn image_pull_secrets_are_added_once_after_the_pods_own() {
    let id = identity();
    let inj = Injection {
        identity: &id,
        identity_header: "h",
        token_expiration_seconds: 3600,
    };
    let config = SidecarConfig {
        image_pull_secrets: vec!["acr-pull".into(), "mirror".into()],
        ..Default::default()
    };
    let secrets = |doc: &Value| -> Vec<String> {
        doc["spec"]["imagePullSecrets"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for (pod_secrets, expected) in [
        (None, vec!["acr-pull", "mirror"]),
        (Some(json!([])), vec!["acr-pull", "mirror"]),
        (
            Some(json!([{"name": "own"}, {"name": "mirror"}])),
            vec!["own", "mirror", "acr-pull"],
        ),
        (
            Some(json!([{"name": "mirror"}, {"name": "acr-pull"}])),
            vec!["mirror", "acr-pull"],
        ),
    ] {
        let mut v = json!({"spec": {"containers": [{"name": "app"}]}});
        if let Some(s) = &pod_secrets {
            v["spec"]["imagePullSecrets"] = s.clone();
        }
        let p = pod(v);
        let doc = apply(&p, &build_patch(&p, &config, &inj));
        assert_eq!(secrets(&doc), expected, "pod with {pod_secrets:?}");
        // Re-invocation: already injected, nothing more.
        let again: Pod = serde_json::from_value(doc).unwrap();
        assert!(build_patch(&again, &config, &inj).is_empty());
        assert!(late_container_patch(&again, &config).is_empty());
    }
    // Not configured: the pod's list is left alone (no op at all).
    let p = pod(json!({"spec": {"containers": [{"name": "app"}]}}));
    let ops = build_patch(&p, &SidecarConfig::default(), &inj);
    assert!(!serde_json::to_string(&ops)
        .unwrap()
        .contains("imagePullSecrets"));
}
