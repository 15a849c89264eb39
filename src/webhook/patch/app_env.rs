//! `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` for the app containers. Azure SDKs use the App
//! Service protocol only with both, so a container gets them as a pair, from one place:
//!
//! - its own `env` names both (a literal or `valueFrom`): it keeps its own pair, untouched;
//! - otherwise it gets the injected pair: each variable is added, or, where its `env` names
//!   one without the other, replaced (with a warning: half a pair answers 401 on every call
//!   or reaches no endpoint at all).
//!
//! `envFrom` (ConfigMaps, Secrets) cannot be read at admission without access to them, and an
//! `env` entry wins over it in Kubernetes, so an injected pair overrides any pair there; each
//! container whose `envFrom` could hold one (a source without a prefix, or with a prefix the
//! names start with) gets a warning saying so, and how to keep its own.

use super::sidecar::env;
use super::{add, SIDECAR_NAME};
use json_patch::jsonptr::PointerBuf;
use json_patch::{PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{Container, EnvVar};

const ENDPOINT: &str = "IDENTITY_ENDPOINT";
const HEADER: &str = "IDENTITY_HEADER";

/// What one app container has of the pair.
struct Plan<'a> {
    container: &'a Container,
    /// The one variable of the pair its `env` names, when it names only one.
    lone: Option<&'static str>,
    /// Its `env` names both: it keeps its own pair.
    own: bool,
    /// Its `envFrom` sources that could hold either variable.
    env_from: Vec<String>,
}

fn plans(containers: &[Container]) -> impl Iterator<Item = (usize, Plan<'_>)> {
    containers
        .iter()
        .enumerate()
        .filter(|(_, c)| c.name != SIDECAR_NAME)
        .map(|(i, container)| {
            let names = |var| container.env.iter().flatten().any(|e| e.name == var);
            let (endpoint, header) = (names(ENDPOINT), names(HEADER));
            let lone = match (endpoint, header) {
                (true, false) => Some(ENDPOINT),
                (false, true) => Some(HEADER),
                _ => None,
            };
            let env_from = container
                .env_from
                .iter()
                .flatten()
                .filter(|source| {
                    let prefix = source.prefix.as_deref().unwrap_or("");
                    ENDPOINT.starts_with(prefix) || HEADER.starts_with(prefix)
                })
                .filter_map(|source| {
                    let config_map = source.config_map_ref.as_ref();
                    let secret = source.secret_ref.as_ref();
                    config_map
                        .map(|c| format!("ConfigMap {}", c.name))
                        .or_else(|| secret.map(|s| format!("Secret {}", s.name)))
                })
                .collect();
            let plan = Plan {
                container,
                lone,
                own: endpoint && header,
                env_from,
            };
            (i, plan)
        })
}

/// The operations that give every app container without a pair of its own the injected one.
pub(super) fn ops(containers: &[Container], endpoint: &str, header: &str) -> Vec<PatchOperation> {
    let mut ops = Vec::new();
    for (i, plan) in plans(containers).filter(|(_, p)| !p.own) {
        let index = i.to_string();
        let ours = [env(ENDPOINT, endpoint), env(HEADER, header)];
        let Some(existing) = &plan.container.env else {
            ops.push(add(&["spec", "containers", &index, "env"], ours));
            continue;
        };
        for var in ours {
            let named: Vec<usize> = (0..existing.len())
                .filter(|&j| existing[j].name == var.name)
                .collect();
            for &j in &named {
                ops.push(replace(
                    &["spec", "containers", &index, "env", &j.to_string()],
                    &var,
                ));
            }
            if named.is_empty() {
                ops.push(add(&["spec", "containers", &index, "env", "-"], var));
            }
        }
    }
    ops
}

/// What the user is told about the containers whose own settings the pair replaces.
pub fn warnings(containers: &[Container]) -> Vec<String> {
    let mut out = Vec::new();
    for (_, plan) in plans(containers).filter(|(_, p)| !p.own) {
        let name = &plan.container.name;
        if let Some(lone) = plan.lone {
            let other = if lone == ENDPOINT { HEADER } else { ENDPOINT };
            out.push(format!(
                "imds-broker: container {name} sets {lone} without {other}; Azure SDKs use \
                 them only as a pair, so the injected pair replaces it (to use your own, set \
                 both in the container's env)"
            ));
        }
        if !plan.env_from.is_empty() {
            out.push(format!(
                "imds-broker: container {name} takes environment variables from {} \
                 (envFrom); an {ENDPOINT} or {HEADER} there is overridden by the injected pair \
                 (to use your own, set both in the container's env)",
                plan.env_from.join(", ")
            ));
        }
    }
    out
}

fn replace(path: &[&str], var: &EnvVar) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        // Serialising an EnvVar cannot fail.
        value: serde_json::to_value(var).unwrap_or_default(),
    })
}
