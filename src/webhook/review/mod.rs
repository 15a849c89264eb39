//! AdmissionReview (`admission.k8s.io/v1`) in and out, and the decision for one pod: skip,
//! opt out, already injected, no identity (refuse, or warn), refuse, or mutate.
//!
//! The review types are declared here (k8s-openapi has no admission types); only the fields
//! the webhook reads or writes are modelled.

use super::identity::{
    IdentitySource, PartialIdentity, CLIENT_ID_ANNOTATION, TENANT_ID_ANNOTATION,
};
use super::metrics::Outcome;
use super::patch::{self, Injection, SidecarConfig};
use crate::excerpt::excerpt;
use base64::Engine;
use json_patch::PatchOperation;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use std::sync::Arc;

const API_VERSION: &str = "admission.k8s.io/v1";
const KIND: &str = "AdmissionReview";

/// The webhook's policy: which pods, which fallback identity, what sidecar.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// A pod carrying any of these label keys is injected.
    pub match_labels: Vec<String>,
    /// Used for the fields the pod's ServiceAccount does not annotate.
    pub fallback: PartialIdentity,
    /// What happens to a matched pod that neither gives a complete identity.
    pub missing_identity: MissingIdentity,
    pub sidecar: SidecarConfig,
    /// Projected-token lifetime unless the pod's annotation overrides it.
    pub token_expiration_seconds: i64,
}

/// What the webhook does with a matched pod for which it finds no complete identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingIdentity {
    /// Refuse the pod: admitted without the broker, it would ask the node's IMDS and get the
    /// kubelet identity's token (the wrong identity, silently) or "Identity not found", an
    /// error far from its cause. failurePolicy Fail makes the same choice when the webhook is
    /// down.
    Refuse,
    /// Admit it unchanged, with a warning (what earlier releases always did).
    Admit,
}

/// Produces a fresh IDENTITY_HEADER value per pod.
pub type HeaderSource = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// 32 random bytes, base64url without padding (43 characters).
pub fn random_identity_header() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for IDENTITY_HEADER: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The body is not a usable AdmissionReview: the caller answers HTTP 400.
    #[error("malformed AdmissionReview: {0}")]
    Malformed(String),
}

fn malformed(what: impl std::fmt::Display) -> ReviewError {
    ReviewError::Malformed(what.to_string())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionReview {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<AdmissionRequest>,
}

/// The part of `AdmissionReview.request` the webhook uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub namespace: Option<String>,
    /// Empty for pods created with generateName.
    #[serde(default)]
    pub name: Option<String>,
    pub operation: String,
    /// Kept as text: only a Pod is parsed, once, into its typed form (a `Value` of a 4-MB
    /// object costs ten times its size).
    #[serde(default)]
    pub object: Option<Box<RawValue>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    pub kind: String,
}

/// `AdmissionReview.response`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// Base64 of the JSONPatch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

/// What to do with one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    pub patch: Vec<PatchOperation>,
    pub warnings: Vec<String>,
    /// Set when the pod is refused.
    pub denial: Option<String>,
    /// The pod's name, else its generateName (for the log line), once it has been parsed.
    pub pod: Option<String>,
}

impl Decision {
    fn admit(outcome: Outcome) -> Self {
        Decision {
            outcome,
            patch: Vec::new(),
            warnings: Vec::new(),
            denial: None,
            pod: None,
        }
    }

    fn warn(outcome: Outcome, warning: String) -> Self {
        Decision {
            warnings: vec![warning],
            ..Decision::admit(outcome)
        }
    }

    fn deny(message: String) -> Self {
        Decision::deny_as(Outcome::Error, message)
    }

    fn deny_as(outcome: Outcome, message: String) -> Self {
        Decision {
            denial: Some(message),
            ..Decision::admit(outcome)
        }
    }
}

/// The answer to one review: the serialised AdmissionReview and what was decided.
#[derive(Debug, Clone)]
pub struct Answer {
    pub body: Vec<u8>,
    pub response: AdmissionResponse,
    pub outcome: Outcome,
}

pub struct Reviewer {
    config: WebhookConfig,
    identities: Arc<dyn IdentitySource>,
    header: HeaderSource,
}

impl Reviewer {
    pub fn new(
        config: WebhookConfig,
        identities: Arc<dyn IdentitySource>,
        header: HeaderSource,
    ) -> Self {
        Reviewer {
            config,
            identities,
            header,
        }
    }

    /// Parses a review, decides, and serialises the response review.
    pub async fn review(&self, body: &[u8]) -> Result<Answer, ReviewError> {
        let request = parse_review(body)?;
        let decision = self.decide(&request).await?;
        log_decision(&request, &decision);
        let response = respond(&request.uid, &decision);
        let body = serde_json::to_vec(&serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "response": &response,
        }))
        .map_err(malformed)?;
        Ok(Answer {
            body,
            response,
            outcome: decision.outcome,
        })
    }

    /// Decides what to do with the pod in `request`.
    pub async fn decide(&self, request: &AdmissionRequest) -> Result<Decision, ReviewError> {
        if request.operation != "CREATE"
            || request.kind.kind != "Pod"
            || !request.kind.group.is_empty()
        {
            return Ok(Decision::admit(Outcome::Skipped));
        }
        let object = request
            .object
            .as_ref()
            .ok_or_else(|| malformed("request.object is missing"))?;
        let pod: Pod = serde_json::from_str(object.get())
            .map_err(|e| malformed(format!("request.object is not a Pod: {e}")))?;
        let decision = match self.precheck(&pod) {
            Some(decision) => decision,
            None => {
                let namespace = request
                    .namespace
                    .clone()
                    .or_else(|| pod.metadata.namespace.clone())
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| malformed("request.namespace is missing"))?;
                self.mutate(&pod, &namespace).await?
            }
        };
        let meta = pod.metadata;
        Ok(Decision {
            pod: meta.name.filter(|n| !n.is_empty()).or(meta.generate_name),
            ..decision
        })
    }

    /// The decisions that need no identity: not ours, opted out, done already, unsupported.
    fn precheck(&self, pod: &Pod) -> Option<Decision> {
        let labels = pod.metadata.labels.as_ref();
        let matches = self
            .config
            .match_labels
            .iter()
            .any(|k| labels.is_some_and(|l| l.contains_key(k)));
        let unsupported = |what: &str| {
            Some(Decision::warn(
                Outcome::Unsupported,
                format!("imds-broker: {what} are not supported; not injected"),
            ))
        };
        if !matches || pod.spec.is_none() {
            Some(Decision::admit(Outcome::Skipped))
        } else if patch::is_opted_out(pod) {
            Some(Decision::admit(Outcome::OptedOut))
        } else if patch::is_injected(pod) {
            let patch = patch::late_container_patch(pod, &self.config.sidecar);
            Some(Decision {
                // Only containers that lack a pair get one, so only theirs are warned about.
                warnings: if patch.is_empty() {
                    Vec::new()
                } else {
                    app_env_warnings(pod)
                },
                patch,
                ..Decision::admit(Outcome::AlreadyInjected)
            })
        } else if patch::is_windows(pod) {
            unsupported("Windows pods")
        } else if patch::is_host_network(pod) {
            unsupported("hostNetwork pods")
        } else {
            None
        }
    }

    async fn mutate(&self, pod: &Pod, namespace: &str) -> Result<Decision, ReviewError> {
        let account = service_account_name(pod);
        let found = match self.identities.lookup(namespace, &account).await {
            Ok(found) => found,
            Err(e) => {
                return Ok(Decision::deny(format!(
                    "imds-broker: cannot read ServiceAccount {namespace}/{account} to find the \
                     pod's Azure identity: {e}"
                )))
            }
        };
        // The webhook's own flags were checked at start-up; an annotation is checked here,
        // with the sidecar's own check: injected, a value it refuses would crash-loop it in
        // every pod of this ServiceAccount while the app containers wait for it.
        if let Some(tenant) = &found.tenant_id {
            if let Err(e) = crate::authority::check_tenant(tenant) {
                return Ok(Decision::deny(format!(
                    "imds-broker: ServiceAccount {namespace}/{account}: annotation \
                     {TENANT_ID_ANNOTATION} {e}; the broker sidecar would refuse to start with \
                     it, so the pod is refused: fix the annotation"
                )));
            }
        }
        let merged = found.or(&self.config.fallback);
        let Some(identity) = merged.complete() else {
            return Ok(self.no_identity(namespace, &account, &merged));
        };
        let mut warnings = Vec::new();
        let expiration = patch::token_expiration(pod, self.config.token_expiration_seconds)
            .unwrap_or_else(|warning| {
                warnings.push(warning);
                self.config.token_expiration_seconds
            });
        let header = match (self.header)() {
            Ok(h) => h,
            Err(e) => return Ok(Decision::deny(format!("imds-broker: {e}"))),
        };
        let injection = Injection {
            identity: &identity,
            identity_header: &header,
            token_expiration_seconds: expiration,
        };
        warnings.extend(app_env_warnings(pod));
        Ok(Decision {
            patch: patch::build_patch(pod, &self.config.sidecar, &injection),
            warnings,
            ..Decision::admit(Outcome::Mutated)
        })
    }

    /// The decision for a matched pod without a complete identity (`merged`: what the
    /// ServiceAccount and the flags gave).
    fn no_identity(&self, namespace: &str, account: &str, merged: &PartialIdentity) -> Decision {
        match self.config.missing_identity {
            MissingIdentity::Refuse => {
                let missing = match (&merged.client_id, &merged.tenant_id) {
                    (None, None) => "no client ID, no tenant ID",
                    (None, Some(_)) => "no client ID",
                    _ => "no tenant ID",
                };
                Decision::deny_as(
                    Outcome::NoIdentity,
                    format!(
                        "imds-broker: no Azure identity for service account {namespace}/{account} \
                         ({missing}), so the pod is refused: without the broker it would \
                         reach the node's IMDS and get the kubelet identity's token or \
                         \"Identity not found\". Annotate the ServiceAccount with \
                         {CLIENT_ID_ANNOTATION} and {TENANT_ID_ANNOTATION}, or set the \
                         webhook's --client-id/--tenant-id (Helm: \
                         identity.clientId/identity.tenantId)"
                    ),
                )
            }
            MissingIdentity::Admit => Decision::warn(
                Outcome::NoIdentity,
                format!(
                    "imds-broker: no Azure identity for service account {namespace}/{account}: \
                     annotate it with azure.workload.identity/client-id and \
                     azure.workload.identity/tenant-id, or start the webhook with \
                     --client-id/--tenant-id"
                ),
            ),
        }
    }
}

/// What the user is told about the app containers' own `IDENTITY_*` settings the injected
/// pair replaces.
fn app_env_warnings(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .map(|spec| patch::app_env_warnings(&spec.containers))
        .unwrap_or_default()
}

/// One log line per pod; skipped pods only at debug level. Never logs the patch (it carries
/// the IDENTITY_HEADER secret).
fn log_decision(request: &AdmissionRequest, decision: &Decision) {
    let pod = request
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .or(decision.pod.as_deref())
        .unwrap_or("");
    let namespace = request.namespace.as_deref().unwrap_or("");
    let result = decision.outcome.as_str();
    match (&decision.denial, decision.outcome) {
        (Some(reason), _) => {
            tracing::warn!(uid = %request.uid, namespace, pod, result, %reason, "pod refused")
        }
        (None, Outcome::Skipped) => {
            tracing::debug!(uid = %request.uid, namespace, pod, result, "pod not matched")
        }
        (None, _) => tracing::info!(uid = %request.uid, namespace, pod, result,
            warnings = ?decision.warnings, "pod admitted"),
    }
}

/// The pod's ServiceAccount (the API server defaults it to `default` before webhooks run,
/// but a direct test call may not have).
pub fn service_account_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| {
            s.service_account_name
                .clone()
                .or_else(|| s.service_account.clone())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// Parses and checks the envelope of an AdmissionReview.
pub fn parse_review(body: &[u8]) -> Result<AdmissionRequest, ReviewError> {
    // Refusals are logged and answered: they quote the body only in part (serde's errors
    // quote a string value whole).
    let review: AdmissionReview = serde_json::from_slice(body)
        .map_err(|e| malformed(format!("invalid JSON: {}", excerpt(&e.to_string(), 300))))?;
    if review.api_version.as_deref() != Some(API_VERSION) {
        return Err(malformed(format!(
            "apiVersion must be {API_VERSION}, got {:?}",
            excerpt(&review.api_version.unwrap_or_default(), 64)
        )));
    }
    if review.kind.as_deref() != Some(KIND) {
        return Err(malformed(format!(
            "kind must be {KIND}, got {:?}",
            excerpt(&review.kind.unwrap_or_default(), 64)
        )));
    }
    let request = review
        .request
        .ok_or_else(|| malformed("request is missing"))?;
    if request.uid.is_empty() {
        return Err(malformed("request.uid is empty"));
    }
    Ok(request)
}

/// Builds the response for `uid` from a decision. An empty patch is left out entirely.
pub fn respond(uid: &str, decision: &Decision) -> AdmissionResponse {
    let patch = (!decision.patch.is_empty()).then(|| {
        let json = serde_json::to_vec(&decision.patch).unwrap_or_default();
        base64::engine::general_purpose::STANDARD.encode(json)
    });
    AdmissionResponse {
        uid: uid.to_string(),
        allowed: decision.denial.is_none(),
        patch_type: patch.as_ref().map(|_| "JSONPatch".to_string()),
        patch,
        warnings: decision.warnings.clone(),
        status: decision.denial.as_ref().map(|message| {
            serde_json::json!({"status": "Failure", "code": 500, "reason": "InternalError", "message": message})
        }),
    }
}

#[cfg(test)]
mod tests;
