//! The mutation itself: a pure function from (pod, identity, configuration, identity header)
//! to an RFC 6902 JSONPatch. No I/O, no randomness: the caller supplies the header value, so
//! the same inputs always give the same patch (the golden tests rely on it).
//!
//! What the patch adds to a pod:
//! - the broker as a native sidecar (an init container with `restartPolicy: Always`), first in
//!   `initContainers`, with a startup probe on its `/readyz` so the app containers start only
//!   once it is up, and a locked-down security context that holds even though Velero sets
//!   pod-level `runAsUser: 0`;
//! - a projected service-account token volume, mounted only into the sidecar;
//! - `IDENTITY_ENDPOINT` / `IDENTITY_HEADER` into every app container (`spec.containers`) that
//!   does not set both itself ([`app_env`]: the two come as a pair, from the container or from
//!   the webhook; other init containers are left alone: they run before the app and are
//!   usually infrastructure — mesh or volume setup — that should not be handed a credential);
//! - the annotation [`INJECTED_ANNOTATION`] as a marker for humans and tooling;
//! - the configured image pull secrets the pod does not list yet, so a sidecar image in a
//!   private registry can be pulled (the Secrets must exist in the pod's namespace).

mod app_env;
mod pod;
mod sidecar;

pub use app_env::warnings as app_env_warnings;
pub use pod::{is_host_network, is_injected, is_opted_out, is_windows, token_expiration};
pub use sidecar::{sidecar_container, token_volume};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::{LocalObjectReference, Pod, PodSpec};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// Name of the injected sidecar container; its presence marks a pod as already injected.
pub const SIDECAR_NAME: &str = "imds-broker";
/// Name of the projected token volume.
pub const TOKEN_VOLUME_NAME: &str = "imds-broker-token";
/// Directory the token volume is mounted at in the sidecar.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/imds-broker/serviceaccount";
/// File name of the token inside [`TOKEN_MOUNT_PATH`].
pub const TOKEN_FILE_NAME: &str = "token";
/// Pod annotation set on every injected pod.
pub const INJECTED_ANNOTATION: &str = "imds-broker.io/injected";
/// Pod annotation that opts a pod out (value `"false"`).
pub const INJECT_ANNOTATION: &str = "imds-broker.io/inject";
/// Pod annotation (shared with Azure Workload Identity) that overrides the token lifetime.
pub const TOKEN_EXPIRATION_ANNOTATION: &str =
    "azure.workload.identity/service-account-token-expiration";
/// Default audience of the federated token (Entra's public-cloud audience).
pub const DEFAULT_AUDIENCE: &str = "api://AzureADTokenExchange";
/// What the sidecar prefetches by default: the Storage audience Velero's uploader asks for (it
/// spells it without the slash; the broker's cache key ignores the difference).
pub const DEFAULT_PREFETCH: &str = "https://storage.azure.com/";
/// Default lifetime of the projected token, in seconds.
pub const DEFAULT_TOKEN_EXPIRATION: i64 = 3600;
/// Shortest token lifetime accepted in the annotation (Azure Workload Identity's bound).
pub const MIN_TOKEN_EXPIRATION: i64 = 3600;
/// Longest token lifetime accepted in the annotation.
pub const MAX_TOKEN_EXPIRATION: i64 = 86400;
/// The UID/GID the sidecar runs as (distroless `nonroot`).
pub const SIDECAR_UID: i64 = 65532;

/// The Azure identity a pod's tokens are issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub client_id: String,
    pub tenant_id: String,
}

/// Everything about the sidecar that comes from the webhook's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarConfig {
    pub image: String,
    pub image_pull_policy: String,
    /// Secrets in the pod's namespace added to its `imagePullSecrets` (when not listed yet)
    /// for the sidecar's image.
    pub image_pull_secrets: Vec<String>,
    /// Loopback port of the broker's token listener (and of `IDENTITY_ENDPOINT`).
    pub port: u16,
    /// Port of the broker's admin listener (probes, metrics), on all pod addresses.
    pub admin_port: u16,
    /// Audience of the projected service-account token.
    pub audience: String,
    /// Passed to the broker as `AZURE_AUTHORITY_HOST` when set.
    pub authority_host: Option<String>,
    /// Passed to the broker as `IMDS_BROKER_ALLOW_RESOURCES` when non-empty.
    pub allow_resources: Vec<String>,
    /// Passed to the broker as `IMDS_BROKER_PREFETCH` when non-empty: fetched while the pod's
    /// other init containers run, so the app's first request is a cache hit.
    pub prefetch: Vec<String>,
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        SidecarConfig {
            image: "imds-broker:latest".into(),
            image_pull_policy: "IfNotPresent".into(),
            image_pull_secrets: Vec::new(),
            port: 8400,
            admin_port: 8401,
            audience: DEFAULT_AUDIENCE.into(),
            authority_host: None,
            allow_resources: Vec::new(),
            prefetch: vec![DEFAULT_PREFETCH.into()],
            cpu_request: Some("10m".into()),
            memory_request: Some("16Mi".into()),
            cpu_limit: None,
            memory_limit: Some("32Mi".into()),
        }
    }
}

impl SidecarConfig {
    /// The App Service endpoint the app containers are pointed at.
    pub fn identity_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/msi/token", self.port)
    }
}

/// Per-pod inputs of one mutation.
#[derive(Debug, Clone)]
pub struct Injection<'a> {
    pub identity: &'a Identity,
    /// Shared secret between the app containers and the sidecar. Never logged.
    pub identity_header: &'a str,
    /// Lifetime of the projected token, already validated.
    pub token_expiration_seconds: i64,
}

/// Builds the JSONPatch that injects the broker. Returns an empty patch for a pod that is
/// already injected or has no spec.
pub fn build_patch(pod: &Pod, config: &SidecarConfig, inj: &Injection<'_>) -> Vec<PatchOperation> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    if is_injected(pod) {
        return Vec::new();
    }
    let mut ops = Vec::new();

    // Marker annotation.
    match &pod.metadata.annotations {
        None => ops.push(add(
            &["metadata", "annotations"],
            BTreeMap::from([(INJECTED_ANNOTATION, "true")]),
        )),
        Some(_) => ops.push(add(
            &["metadata", "annotations", INJECTED_ANNOTATION],
            "true",
        )),
    }

    // Token volume (appended; `add` on a missing array would fail, so create it whole).
    let volume = token_volume(config, inj.token_expiration_seconds);
    match &spec.volumes {
        None => ops.push(add(&["spec", "volumes"], [volume])),
        Some(_) => ops.push(add(&["spec", "volumes", "-"], volume)),
    }

    // The sidecar goes first, so it is up before any other init container or app container.
    let sidecar = sidecar_container(config, inj);
    match &spec.init_containers {
        None => ops.push(add(&["spec", "initContainers"], [sidecar])),
        Some(_) => ops.push(add(&["spec", "initContainers", "0"], sidecar)),
    }

    ops.extend(pull_secret_ops(spec, &config.image_pull_secrets));

    let endpoint = config.identity_endpoint();
    ops.extend(app_env::ops(
        &spec.containers,
        &endpoint,
        inj.identity_header,
    ));
    ops
}

/// The configured pull secrets the pod does not list yet, appended (its own stay first and
/// are never duplicated: the kubelet would try the same Secret twice).
fn pull_secret_ops(spec: &PodSpec, names: &[String]) -> Vec<PatchOperation> {
    let listed = |name: &String| {
        spec.image_pull_secrets
            .iter()
            .flatten()
            .any(|s| &s.name == name)
    };
    let missing: Vec<LocalObjectReference> = names
        .iter()
        .filter(|n| !listed(n))
        .map(|n| LocalObjectReference { name: n.clone() })
        .collect();
    match (&spec.image_pull_secrets, missing.is_empty()) {
        (_, true) => Vec::new(),
        (None, false) => vec![add(&["spec", "imagePullSecrets"], missing)],
        (Some(_), false) => missing
            .into_iter()
            .map(|s| add(&["spec", "imagePullSecrets", "-"], s))
            .collect(),
    }
}

/// For a pod that already has the sidecar: the env for app containers added after the
/// injection (by another webhook, seen on re-invocation), with the header the sidecar already
/// has. Empty when every app container is set up — so re-invocation of an unchanged pod
/// gives an empty patch.
pub fn late_container_patch(pod: &Pod, config: &SidecarConfig) -> Vec<PatchOperation> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    let header = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == SIDECAR_NAME)
        .and_then(|c| c.env.iter().flatten().find(|e| e.name == "IDENTITY_HEADER"))
        .and_then(|e| e.value.as_deref());
    match header {
        Some(header) => app_env::ops(&spec.containers, &config.identity_endpoint(), header),
        None => Vec::new(),
    }
}

/// An `add` operation; the path tokens are escaped per RFC 6901 (`/` → `~1`, `~` → `~0`).
fn add(path: &[&str], value: impl Serialize) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        // Serialising k8s-openapi types and string maps cannot fail.
        value: serde_json::to_value(value).unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests;
