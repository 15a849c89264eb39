//! Prometheus metrics of the token broker, rendered in the OpenMetrics text format on the
//! admin listener's `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicI64;

/// The content type of what [`render`] writes: prometheus-client encodes OpenMetrics text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: Endpoint,
    pub status: u16,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are Prometheus-style snake_case
pub enum Endpoint {
    imds,
    app_service,
    other,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub result: CacheResult,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are Prometheus-style snake_case
pub enum CacheResult {
    /// Served from a fresh cached token.
    hit,
    /// Served from a cached token past its refresh point (refresh pending or failing).
    stale,
    /// No usable token: the caller waited for an exchange.
    miss,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are Prometheus-style snake_case
pub enum Outcome {
    success,
    /// Throttled (429) or transiently failing (5xx, timeout, reset, unreadable answer).
    transient,
    /// Refused for good (AADSTS error): configuration needs fixing.
    permanent,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub client_id: String,
    pub resource: String,
}

/// All broker metrics, registered once.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub cache: Family<CacheLabels, Counter>,
    pub entra_calls: Family<OutcomeLabels, Counter>,
    pub entra_latency: Histogram,
    pub token_expiry: Family<TokenLabels, Gauge<i64, AtomicI64>>,
    /// The hot path's series, resolved once: `Family::get_or_create` takes a lock and hashes
    /// the labels on every call, twice per token answer. A `Counter` clone shares the atomic,
    /// so these count into the same series (which therefore show up as 0 from the start).
    hot: HotCounters,
}

struct HotCounters {
    imds_ok: Counter,
    app_service_ok: Counter,
    cache_hit: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("imds_broker");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Token-listener requests by endpoint and HTTP status",
            requests.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Token cache lookups by result (hit, stale, miss)",
            cache.clone(),
        );
        let entra_calls = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "entra_requests",
            "Token requests sent to Entra ID (or the emulator) by outcome",
            entra_calls.clone(),
        );
        // 5 ms .. ~20 s: Entra answers in tens of milliseconds, retries stretch it to seconds.
        let entra_latency = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
        ]);
        registry.register(
            "entra_request_duration_seconds",
            "Latency of one token request to Entra ID",
            entra_latency.clone(),
        );
        let token_expiry = Family::<TokenLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "token_expiry_seconds",
            "Seconds until the cached token expires, per client ID and resource",
            token_expiry.clone(),
        );
        let ok = |endpoint| {
            requests
                .get_or_create(&RequestLabels {
                    endpoint,
                    status: 200,
                })
                .clone()
        };
        let hot = HotCounters {
            imds_ok: ok(Endpoint::imds),
            app_service_ok: ok(Endpoint::app_service),
            cache_hit: cache
                .get_or_create(&CacheLabels {
                    result: CacheResult::hit,
                })
                .clone(),
        };
        Metrics {
            registry,
            requests,
            cache,
            entra_calls,
            entra_latency,
            token_expiry,
            hot,
        }
    }

    pub fn request(&self, endpoint: Endpoint, status: u16) {
        match (endpoint, status) {
            (Endpoint::imds, 200) => self.hot.imds_ok.inc(),
            (Endpoint::app_service, 200) => self.hot.app_service_ok.inc(),
            _ => self
                .requests
                .get_or_create(&RequestLabels { endpoint, status })
                .inc(),
        };
    }

    pub fn cache(&self, result: CacheResult) {
        match result {
            CacheResult::hit => self.hot.cache_hit.inc(),
            _ => self.cache.get_or_create(&CacheLabels { result }).inc(),
        };
    }

    pub fn entra(&self, outcome: Outcome, seconds: f64) {
        self.entra_calls
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.entra_latency.observe(seconds);
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// Renders any registry (the webhook has its own) in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
