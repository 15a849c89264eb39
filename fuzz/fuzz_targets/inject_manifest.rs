//! `imds-broker inject -f`: a manifest file (YAML documents or JSON; Pods, workloads with a
//! pod template, Lists) through the webhook's own decision code and back to text.
//!
//! Beyond "no panic": the output is again a manifest of the same format, and injecting it a
//! second time changes nothing (the webhook's reinvocation must be idempotent too); a refused
//! manifest gets an error, never the IDENTITY_HEADER secret.
#![no_main]

use imds_broker::fuzzing::{inject, reviewer, IDENTITY_HEADER};
use imds_broker::webhook::review::Reviewer;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static REVIEWER: OnceLock<Reviewer> = OnceLock::new();
    let reviewer = REVIEWER.get_or_init(reviewer);
    let Ok(text) = std::str::from_utf8(data) else {
        return; // `inject` reads UTF-8 only, and says so.
    };
    let (out, refused) = match inject(reviewer, text) {
        Ok(done) => done,
        Err(e) => {
            // The header is the webhook's secret: an error never reveals it. An input that
            // already holds the string (a key of an earlier output, say) may see it quoted in
            // the error's path; that reveals nothing the caller did not write.
            let message = format!("{e:#}");
            assert!(
                !message.contains(IDENTITY_HEADER) || text.contains(IDENTITY_HEADER),
                "secret in: {message}"
            );
            return;
        }
    };
    let (again, refused_again) = inject(reviewer, &out)
        .unwrap_or_else(|e| panic!("inject's own output is refused: {e:#}\n{out}"));
    assert_eq!(refused_again, refused);
    assert_eq!(
        documents(&again),
        documents(&out),
        "a second inject changed the output"
    );
});

/// The documents of an output, numbers as f64 at 12 digits: a number past u64's range is
/// printed as the nearest f64 (serde_json has no arbitrary precision here), and the first
/// print of it may differ from the next in the last digits.
fn documents(text: &str) -> Vec<Value> {
    let mut docs: Vec<Value> = if text.trim_start().starts_with(['{', '[']) {
        vec![serde_json::from_str(text).expect("JSON output parses")]
    } else {
        serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).expect("YAML output parses"))
            .collect()
    };
    docs.iter_mut().for_each(round_numbers);
    docs
}

fn round_numbers(v: &mut Value) {
    match v {
        Value::Number(n) => *v = Value::String(format!("{:.11e}", n.as_f64().unwrap_or(0.0))),
        Value::Array(items) => items.iter_mut().for_each(round_numbers),
        Value::Object(map) => map.values_mut().for_each(round_numbers),
        _ => {}
    }
}
