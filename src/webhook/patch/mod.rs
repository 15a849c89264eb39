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
//!   does not set `IDENTITY_ENDPOINT` itself (other init containers are left alone: they run
//!   before the app and are usually infrastructure — mesh or volume setup — that should not be
//!   handed a credential);
//! - the annotation [`INJECTED_ANNOTATION`] as a marker for humans and tooling.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Pod, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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

    ops.extend(app_env_ops(&spec.containers, config, inj.identity_header));
    ops
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
        Some(header) => app_env_ops(&spec.containers, config, header),
        None => Vec::new(),
    }
}

/// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` for every app container that does not configure
/// its own endpoint (it keeps its own header too, if it sets one).
fn app_env_ops(
    containers: &[Container],
    config: &SidecarConfig,
    header: &str,
) -> Vec<PatchOperation> {
    let endpoint = config.identity_endpoint();
    let mut ops = Vec::new();
    for (i, container) in containers.iter().enumerate() {
        if container.name == SIDECAR_NAME || sets_env(container, "IDENTITY_ENDPOINT") {
            continue;
        }
        let index = i.to_string();
        let mut vars = vec![env("IDENTITY_ENDPOINT", &endpoint)];
        if !sets_env(container, "IDENTITY_HEADER") {
            vars.push(env("IDENTITY_HEADER", header));
        }
        match &container.env {
            None => ops.push(add(&["spec", "containers", &index, "env"], vars)),
            Some(_) => {
                for var in vars {
                    ops.push(add(&["spec", "containers", &index, "env", "-"], var));
                }
            }
        }
    }
    ops
}

/// The native-sidecar container.
pub fn sidecar_container(config: &SidecarConfig, inj: &Injection<'_>) -> Container {
    let token_file = format!("{TOKEN_MOUNT_PATH}/{TOKEN_FILE_NAME}");
    let mut env_vars = vec![
        env("AZURE_CLIENT_ID", &inj.identity.client_id),
        env("AZURE_TENANT_ID", &inj.identity.tenant_id),
        env("AZURE_FEDERATED_TOKEN_FILE", &token_file),
        env("IDENTITY_HEADER", inj.identity_header),
        env("IMDS_BROKER_LISTEN", &format!("127.0.0.1:{}", config.port)),
        env(
            "IMDS_BROKER_ADMIN_LISTEN",
            &format!("0.0.0.0:{}", config.admin_port),
        ),
    ];
    if config.audience != DEFAULT_AUDIENCE {
        env_vars.push(env("IMDS_BROKER_TOKEN_AUDIENCE", &config.audience));
    }
    if let Some(host) = &config.authority_host {
        env_vars.push(env("AZURE_AUTHORITY_HOST", host));
    }
    if !config.allow_resources.is_empty() {
        env_vars.push(env(
            "IMDS_BROKER_ALLOW_RESOURCES",
            &config.allow_resources.join(","),
        ));
    }
    if !config.prefetch.is_empty() {
        env_vars.push(env("IMDS_BROKER_PREFETCH", &config.prefetch.join(",")));
    }
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(config.image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        args: Some(vec!["serve".into()]),
        restart_policy: Some("Always".into()),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("broker-admin".into()),
            container_port: i32::from(config.admin_port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        startup_probe: Some(http_probe("/readyz", config.admin_port, 1, 30)),
        liveness_probe: Some(http_probe("/healthz", config.admin_port, 10, 3)),
        resources: Some(resources(config)),
        security_context: Some(security_context()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME_NAME.into(),
            mount_path: TOKEN_MOUNT_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The projected service-account token volume. Its file mode is left to the API default
/// (0644): kubelet narrows it to 0600 owned by the pod's user only when every container runs
/// as the same user (or to group-readable with `fsGroup`), so the non-root sidecar can read
/// it in a pod whose app runs as root. Only the sidecar mounts it.
pub fn token_volume(config: &SidecarConfig, expiration_seconds: i64) -> Volume {
    Volume {
        name: TOKEN_VOLUME_NAME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(config.audience.clone()),
                    expiration_seconds: Some(expiration_seconds),
                    path: TOKEN_FILE_NAME.into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn security_context() -> SecurityContext {
    SecurityContext {
        // Explicit user and group: the pod-level `runAsUser: 0` Velero sets would otherwise
        // be inherited and make `runAsNonRoot` refuse to start the container.
        run_as_non_root: Some(true),
        run_as_user: Some(SIDECAR_UID),
        run_as_group: Some(SIDECAR_UID),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn resources(config: &SidecarConfig) -> ResourceRequirements {
    let list = |pairs: [(&str, &Option<String>); 2]| {
        let map: BTreeMap<String, Quantity> = pairs
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), Quantity(v.clone()))))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    ResourceRequirements {
        requests: list([
            ("cpu", &config.cpu_request),
            ("memory", &config.memory_request),
        ]),
        limits: list([("cpu", &config.cpu_limit), ("memory", &config.memory_limit)]),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(port)),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn sets_env(container: &Container, name: &str) -> bool {
    container.env.iter().flatten().any(|e| e.name == name)
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
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
