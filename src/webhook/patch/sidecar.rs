//! The objects the patch adds: the native-sidecar container (probes, locked-down security
//! context, resources) and the projected service-account token volume it reads.

use super::{
    Injection, SidecarConfig, DEFAULT_AUDIENCE, SIDECAR_NAME, SIDECAR_UID, TOKEN_FILE_NAME,
    TOKEN_MOUNT_PATH, TOKEN_VOLUME_NAME,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

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

pub(super) fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}
