//! The HTTPS request handler: `POST /mutate` with an AdmissionReview body.

use super::metrics::{Outcome, WebhookMetrics};
use super::review::{ReviewError, Reviewer};
use crate::listener::{json_response, Body};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Largest AdmissionReview accepted (a pod object is at most ~1.5 MiB in etcd; the review
/// wraps it once for CREATE).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Bytes of review bodies being read or reviewed at once, in KiB. A review's peak memory is a
/// few times its size (body, typed pod, patch), so two maximal reviews at a time fit the
/// webhook's 128 Mi limit with room; further large ones wait their turn (bench/RESULTS.md).
/// Ordinary reviews (tens of KiB) never wait on each other.
const BODY_BUDGET_KIB: u32 = 8 * 1024;

/// Everything the handler needs, cloned into each request.
#[derive(Clone)]
pub struct MutateHandler {
    pub reviewer: Arc<Reviewer>,
    pub metrics: Arc<WebhookMetrics>,
    /// Time allowed to receive the body (and to wait for room in the body budget).
    pub body_timeout: Duration,
    pub body_budget: Arc<Semaphore>,
}

/// The shared budget for [`MutateHandler::body_budget`].
pub fn body_budget() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(BODY_BUDGET_KIB as usize))
}

impl MutateHandler {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path() != "/mutate" {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "the webhook serves POST /mutate",
            );
        }
        if req.method() != Method::POST {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "/mutate accepts POST only",
            );
        }
        let started = Instant::now();
        // Reserve the body's size (its Content-Length, else the maximum) before reading it.
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(MAX_BODY_BYTES)
            .min(MAX_BODY_BYTES);
        let kib = u32::try_from(declared.div_ceil(1024).max(1)).unwrap_or(BODY_BUDGET_KIB);
        let budget = self.body_budget.clone().acquire_many_owned(kib);
        let _reserved = match tokio::time::timeout(self.body_timeout, budget).await {
            Ok(Ok(permit)) => permit,
            _ => {
                self.metrics
                    .admission(Outcome::Error, started.elapsed().as_secs_f64());
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "too many large AdmissionReviews at once; the API server retries",
                );
            }
        };
        let body = match self.read_body(req).await {
            Ok(body) => body,
            Err(resp) => {
                self.metrics
                    .admission(Outcome::Error, started.elapsed().as_secs_f64());
                return resp;
            }
        };
        match self.reviewer.review(&body).await {
            Ok(answer) => {
                self.metrics
                    .admission(answer.outcome, started.elapsed().as_secs_f64());
                json_response(StatusCode::OK, answer.body)
            }
            Err(ReviewError::Malformed(reason)) => {
                self.metrics
                    .admission(Outcome::Error, started.elapsed().as_secs_f64());
                tracing::warn!(%reason, "malformed AdmissionReview");
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("malformed AdmissionReview: {reason}"),
                )
            }
        }
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<bytes::Bytes, Response<Body>> {
        let collect = Limited::new(req.into_body(), MAX_BODY_BYTES).collect();
        match tokio::time::timeout(self.body_timeout, collect).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("the AdmissionReview exceeds {MAX_BODY_BYTES} bytes"),
            )),
            Ok(Err(e)) => Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("cannot read the request body: {e}"),
            )),
            Err(_) => Err(error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time",
            )),
        }
    }
}

fn error(status: StatusCode, code: &str, description: &str) -> Response<Body> {
    json_response(
        status,
        serde_json::json!({"error": code, "error_description": description}).to_string(),
    )
}
