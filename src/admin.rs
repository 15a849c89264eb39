//! The admin listener: liveness, readiness and metrics. It never serves tokens, so it can
//! listen on the pod IP for kubelet probes and Prometheus scrapes.

use crate::listener::{json_response, Body};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;

/// Checks readiness; `Err` carries the human-readable reason. Must not block on the network.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;
/// Produces the OpenMetrics text exposition.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
pub struct Admin {
    pub readiness: Readiness,
    pub metrics: MetricsRender,
}

impl Admin {
    /// Routes one admin request.
    pub fn handle(&self, req: &Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"error":"method_not_allowed","error_description":"admin endpoints accept GET only"}"#,
            );
        }
        match req.uri().path() {
            "/healthz" => json_response(StatusCode::OK, r#"{"status":"ok"}"#),
            "/readyz" => match (self.readiness)() {
                Ok(()) => json_response(StatusCode::OK, r#"{"status":"ready"}"#),
                Err(reason) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "not ready", "reason": reason}).to_string(),
                ),
            },
            "/metrics" => {
                let mut resp = Response::new(Full::new(Bytes::from((self.metrics)())));
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                );
                resp
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                r#"{"error":"not_found","error_description":"admin endpoints: /healthz, /readyz, /metrics"}"#,
            ),
        }
    }
}
