//! Entry points for the fuzz targets (fuzz/, its own crate): the parsers of outside input that
//! are private to their modules, reached here without widening the modules' own API. Not a
//! stable interface; nothing in the broker or the webhook uses it.

use crate::assertion::{AssertionError, TokenFile};
use crate::webhook::identity::{NoLookup, PartialIdentity};
use crate::webhook::patch::SidecarConfig;
use crate::webhook::review::{MissingIdentity, Reviewer, WebhookConfig};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// The label key the fuzzing reviewer injects on.
pub const MATCH_LABEL: &str = "azure.workload.identity/use";
/// The IDENTITY_HEADER value the fuzzing reviewer hands out: a target checks it never appears
/// in a warning, a denial or an error.
pub const IDENTITY_HEADER: &str = "fuzz-identity-header-6f1c0b9e2d";

/// The token file's claims checks ([`TokenFile::read`] without the file), as of `now`.
pub fn check_token_claims(token: &str, audience: &str, now: u64) -> Result<(), AssertionError> {
    TokenFile::new("/var/run/secrets/fuzz/token", audience).check_claims(token, now)
}

/// A reviewer as `imds-broker webhook` runs one with `--client-id`/`--tenant-id` and no API
/// server: every matching pod has an identity, so the mutation path runs.
pub fn reviewer() -> Reviewer {
    let config = WebhookConfig {
        match_labels: vec![MATCH_LABEL.into()],
        fallback: PartialIdentity::new(
            Some("00000000-0000-0000-0000-0000000000c1"),
            Some("00000000-0000-0000-0000-0000000000e1"),
        ),
        missing_identity: MissingIdentity::Refuse,
        sidecar: SidecarConfig::default(),
        token_expiration_seconds: crate::webhook::patch::DEFAULT_TOKEN_EXPIRATION,
    };
    Reviewer::new(
        config,
        Arc::new(NoLookup),
        Arc::new(|| Ok(IDENTITY_HEADER.to_owned())),
    )
}

/// `imds-broker inject` on `text`: the manifests as the webhook would admit them, and how
/// many pods it would refuse.
pub fn inject(reviewer: &Reviewer, text: &str) -> anyhow::Result<(String, usize)> {
    now_or_never(crate::inject::inject_text(
        reviewer,
        text,
        "default",
        MATCH_LABEL,
    ))
}

/// Runs a future that never waits (the fuzzing reviewer's lookups are answered at once), so
/// a target needs no runtime. Panics if it does wait: that is a finding too.
pub fn now_or_never<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a future that should complete at once is waiting"),
    }
}

#[cfg(test)]
mod tests {
    use crate::exchange::entra::parse_retry_after;

    /// Found by fuzz/fuzz_targets/retry_after.rs: `u64::from_str` takes a leading '+', so
    /// "+1" was read as 1 s, where RFC 9110's delta-seconds is `1*DIGIT`.
    #[test]
    fn retry_after_refuses_a_signed_number() {
        assert_eq!(parse_retry_after("+1"), None);
        assert_eq!(
            parse_retry_after("1"),
            Some(std::time::Duration::from_secs(1))
        );
    }

    /// The bound fuzz/fuzz_targets/admission_review.rs checks (4 KiB): a malformed review's
    /// reason repeated the apiVersion (or kind, or a string serde quotes) whole, and the
    /// webhook logs it at warn and answers it, up to the body limit.
    #[test]
    fn a_malformed_review_quotes_the_body_only_in_part() {
        let long = "v".repeat(100_000);
        for body in [
            format!(r#"{{"apiVersion":"{long}","kind":"AdmissionReview"}}"#),
            format!(r#"{{"apiVersion":"admission.k8s.io/v1","kind":"{long}"}}"#),
            format!(
                r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":"{long}"}}"#
            ),
        ] {
            let e = crate::webhook::review::parse_review(body.as_bytes()).unwrap_err();
            assert!(e.to_string().len() < 4096, "{} bytes", e.to_string().len());
        }
    }
}
