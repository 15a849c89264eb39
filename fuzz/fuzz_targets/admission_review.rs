//! The webhook's AdmissionReview handling: the body the API server POSTs (envelope, then the
//! pod), the decision and the serialised response, with a reviewer that has an identity for
//! every pod carrying its label (so the mutation path runs).
//!
//! Beyond "no panic": an accepted review is `admission.k8s.io/v1` with a uid; the response
//! carries that uid, is allowed unless denied, and its patch applies to the pod as the API
//! server holds it (a patch that does not apply fails the pod's creation) and leaves it
//! injected; the IDENTITY_HEADER secret is only ever in the patch.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use imds_broker::fuzzing::{now_or_never, reviewer, IDENTITY_HEADER};
use imds_broker::webhook::metrics::Outcome;
use imds_broker::webhook::patch::{is_injected, SIDECAR_NAME};
use imds_broker::webhook::review::{parse_review, Reviewer};
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::OnceLock;

/// The envelope's identification, read independently of the webhook's parser (the object is
/// left unread: strings in a pod the webhook skips need not decode).
#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

/// Longest message of a refused review: the fixed text and excerpts of the body.
const MAX_MESSAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    static REVIEWER: OnceLock<Reviewer> = OnceLock::new();
    let reviewer = REVIEWER.get_or_init(reviewer);
    let answer = match now_or_never(reviewer.review(data)) {
        Ok(answer) => answer,
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.len() <= MAX_MESSAGE,
                "a {}-byte refusal: {message:.300}…",
                message.len()
            );
            return;
        }
    };
    let request = parse_review(data).expect("a reviewed body parses");
    let envelope: Envelope = serde_json::from_slice(data).expect("a reviewed body is JSON");
    assert_eq!(envelope.api_version.as_deref(), Some("admission.k8s.io/v1"));
    assert_eq!(envelope.kind.as_deref(), Some("AdmissionReview"));
    assert!(!request.uid.is_empty());

    let out: Value = serde_json::from_slice(&answer.body).expect("the response is JSON");
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    let response = &out["response"];
    assert_eq!(response["uid"], request.uid.as_str());
    assert_eq!(response["allowed"], answer.response.status.is_none());
    let denial = answer
        .response
        .status
        .as_ref()
        .and_then(|s| s["message"].as_str());
    for text in answer
        .response
        .warnings
        .iter()
        .map(String::as_str)
        .chain(denial)
    {
        assert!(
            !text.contains(IDENTITY_HEADER),
            "the identity header is in {text}"
        );
    }
    let Some(patch) = &answer.response.patch else {
        assert_ne!(answer.outcome, Outcome::Mutated, "mutated without a patch");
        return;
    };
    assert_eq!(answer.response.patch_type.as_deref(), Some("JSONPatch"));
    let ops: json_patch::Patch = serde_json::from_slice(&STANDARD.decode(patch).expect("base64"))
        .expect("the patch is a JSONPatch");
    // The API server applies the patch to its own serialisation of the pod.
    let object = request
        .object
        .as_ref()
        .expect("a patched review has an object");
    let typed: Pod = serde_json::from_str(object.get()).expect("a patched object is a Pod");
    let mut pod = serde_json::to_value(&typed).expect("a Pod serialises");
    json_patch::patch(&mut pod, &ops).unwrap_or_else(|e| panic!("the patch does not apply: {e}"));
    let patched: Pod = serde_json::from_value(pod).expect("the patched pod is a Pod");
    assert!(is_injected(&patched), "the patched pod is not injected");
    if answer.outcome == Outcome::Mutated {
        let sidecars = patched
            .spec
            .iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .filter(|c| c.name == SIDECAR_NAME)
            .count();
        assert_eq!(sidecars, 1, "{sidecars} sidecars after the patch");
    }
});
