//! A caller attestation refused: its reason (a bounded metric label), the description the
//! caller and the log get, and the answer in the protocol's error model.

use crate::protocol::ApiError;
use hyper::StatusCode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Why a caller was refused; the `reason` label of `imds_broker_attestation_refusals_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are Prometheus-style snake_case
pub enum Reason {
    /// No running pod of the watched namespaces holds the caller's address.
    unknown_caller,
    /// The caller's pod runs as a ServiceAccount that is not allowed.
    service_account,
    /// The caller's address is the node's (a host-network pod), without --allow-host-network.
    host_network,
    /// The pods of this node have not been listed yet.
    not_synced,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::unknown_caller,
        Reason::service_account,
        Reason::host_network,
        Reason::not_synced,
    ];
}

/// One refused caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub description: String,
}

impl Refusal {
    pub fn new(reason: Reason, description: String) -> Refusal {
        Refusal {
            reason,
            description,
        }
    }

    /// The answer: 403 `access_denied` naming the reason, or 503 `not_ready` with
    /// `Retry-After: 1` before the first list (every SDK retries a 503).
    pub fn error(&self) -> ApiError {
        match self.reason {
            Reason::not_synced => ApiError {
                retry_after: Some(Duration::from_secs(1)),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    self.description.clone(),
                )
            },
            _ => ApiError::new(
                StatusCode::FORBIDDEN,
                "access_denied",
                self.description.clone(),
            ),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: Reason,
}

/// `imds_broker_attestation_refusals_total{reason}`, every reason present from the start.
#[derive(Clone)]
pub struct RefusalCounter(Family<ReasonLabels, Counter>);

impl RefusalCounter {
    /// Registers the counter in `registry` (the broker's, prefix `imds_broker`).
    pub fn register(registry: &mut Registry) -> RefusalCounter {
        let family = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "attestation_refusals",
            "Token-listener requests refused by caller attestation (node mode), by reason",
            family.clone(),
        );
        for reason in Reason::ALL {
            let _ = family.get_or_create(&ReasonLabels { reason });
        }
        RefusalCounter(family)
    }

    pub fn inc(&self, reason: Reason) {
        self.0.get_or_create(&ReasonLabels { reason }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_403_access_denied_and_not_synced_is_a_503_to_retry() {
        let r = Refusal::new(Reason::service_account, "caller x is pod y".into());
        let e = r.error();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert_eq!(
            (e.code, e.description.as_str()),
            ("access_denied", "caller x is pod y")
        );
        assert_eq!(e.retry_after, None);
        let e = Refusal::new(Reason::not_synced, "not yet".into()).error();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, "not_ready");
        assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
    }

    #[test]
    fn every_reason_is_exposed_from_the_start() {
        let mut registry = Registry::with_prefix("imds_broker");
        let counter = RefusalCounter::register(&mut registry);
        counter.inc(Reason::host_network);
        let text = crate::metrics::render(&registry);
        for (reason, n) in [
            ("unknown_caller", 0),
            ("service_account", 0),
            ("host_network", 1),
            ("not_synced", 0),
        ] {
            let line = format!("imds_broker_attestation_refusals_total{{reason=\"{reason}\"}} {n}");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
    }
}
