//! What a pod says about itself: already injected, opted out, its token lifetime, and the two
//! kinds of pod the sidecar cannot serve (Windows, host network).

use super::{
    INJECT_ANNOTATION, MAX_TOKEN_EXPIRATION, MIN_TOKEN_EXPIRATION, SIDECAR_NAME,
    TOKEN_EXPIRATION_ANNOTATION,
};
use k8s_openapi::api::core::v1::{Container, Pod};

/// True when the pod already carries the sidecar (re-invocation, or a pod created from an
/// already-mutated spec).
pub fn is_injected(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    let named = |c: &Container| c.name == SIDECAR_NAME;
    spec.containers.iter().any(named) || spec.init_containers.iter().flatten().any(named)
}

/// True when the pod opts out with `imds-broker.io/inject: "false"` (also `0`, `no`, `off`,
/// any case). Any other value, or no annotation, means "inject".
pub fn is_opted_out(pod: &Pod) -> bool {
    annotation(pod, INJECT_ANNOTATION).is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "false" | "0" | "no" | "off"
        )
    })
}

/// The token lifetime for this pod: the annotation's value when present and valid, else
/// `default`. `Err` carries a warning for the user (and the default is to be used).
pub fn token_expiration(pod: &Pod, default: i64) -> Result<i64, String> {
    let Some(raw) = annotation(pod, TOKEN_EXPIRATION_ANNOTATION) else {
        return Ok(default);
    };
    match raw.trim().parse::<i64>() {
        Ok(v) if (MIN_TOKEN_EXPIRATION..=MAX_TOKEN_EXPIRATION).contains(&v) => Ok(v),
        _ => Err(format!(
            "imds-broker: annotation {TOKEN_EXPIRATION_ANNOTATION}={raw:?} is not a number of \
             seconds between {MIN_TOKEN_EXPIRATION} and {MAX_TOKEN_EXPIRATION}; using {default}"
        )),
    }
}

/// True for pods that will run on Windows nodes: the broker image is Linux-only.
pub fn is_windows(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    let os = spec.os.as_ref().map(|o| o.name.as_str());
    let selector = spec
        .node_selector
        .as_ref()
        .and_then(|s| s.get("kubernetes.io/os"))
        .map(String::as_str);
    os == Some("windows") || selector == Some("windows")
}

/// True for pods in the node's network namespace: the sidecar's loopback listener would be
/// the node's, shared with every other such pod, and its admin port would open on the node.
pub fn is_host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}
