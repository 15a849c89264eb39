//! Prometheus metrics of the admission webhook (its own registry, served on its admin
//! listener's `/metrics`).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::fmt::Write;
use std::sync::atomic::AtomicI64;

/// What the webhook did with one AdmissionReview.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// The broker was injected.
    Mutated,
    /// Not a pod CREATE, or no matching label: admitted untouched.
    Skipped,
    /// `imds-broker.io/inject: "false"`.
    OptedOut,
    /// The pod already has the sidecar (re-invocation): empty patch.
    AlreadyInjected,
    /// No client/tenant ID from the ServiceAccount or the flags: refused (`--missing-identity
    /// refuse`, the default) or admitted unchanged with a warning (`admit`).
    NoIdentity,
    /// A pod the broker cannot serve (Windows, hostNetwork): admitted untouched with a warning.
    Unsupported,
    /// The pod was refused (ServiceAccount lookup failed) or the request was malformed.
    Error,
}

impl Outcome {
    /// The metric label value (and log field), snake_case.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Mutated => "mutated",
            Outcome::Skipped => "skipped",
            Outcome::OptedOut => "opted_out",
            Outcome::AlreadyInjected => "already_injected",
            Outcome::NoIdentity => "no_identity",
            Outcome::Unsupported => "unsupported",
            Outcome::Error => "error",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub result: Outcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReloadResult {
    Success,
    Failure,
}

impl EncodeLabelValue for ReloadResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

pub struct WebhookMetrics {
    pub registry: Registry,
    pub admissions: Family<OutcomeLabels, Counter>,
    pub duration: Histogram,
    pub tls_reloads: Family<ReloadLabels, Counter>,
    pub certificate_expiry: Gauge<i64, AtomicI64>,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WebhookMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("imds_broker_webhook");
        let admissions = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "admissions",
            "AdmissionReviews answered, by result",
            admissions.clone(),
        );
        let duration = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        registry.register(
            "admission_duration_seconds",
            "Time to answer one AdmissionReview (including the ServiceAccount lookup)",
            duration.clone(),
        );
        let tls_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Serving-certificate changes seen on disk, by whether they loaded",
            tls_reloads.clone(),
        );
        let certificate_expiry = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate in use, in Unix seconds (0: unreadable)",
            certificate_expiry.clone(),
        );
        WebhookMetrics {
            registry,
            admissions,
            duration,
            tls_reloads,
            certificate_expiry,
        }
    }

    pub fn admission(&self, result: Outcome, seconds: f64) {
        self.admissions
            .get_or_create(&OutcomeLabels { result })
            .inc();
        self.duration.observe(seconds);
    }

    pub fn tls_reload(&self, result: ReloadResult) {
        self.tls_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// The notAfter of the certificate now served (None: it could not be read).
    pub fn certificate_in_service(&self, not_after: Option<i64>) {
        self.certificate_expiry.set(not_after.unwrap_or(0));
    }

    pub fn render(&self) -> String {
        crate::metrics::render(&self.registry)
    }
}
