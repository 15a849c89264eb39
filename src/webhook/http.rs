//! The HTTPS request handler: `POST /mutate` with an AdmissionReview body.

use super::body::{BodyError, Intake, MAX_BODY_BYTES};
use super::metrics::{Outcome, WebhookMetrics};
use super::review::{ReviewError, Reviewer};
use crate::listener::{json_response, Body};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Instant;

/// Everything the handler needs, cloned into each request.
#[derive(Clone)]
pub struct MutateHandler {
    pub reviewer: Arc<Reviewer>,
    pub metrics: Arc<WebhookMetrics>,
    /// The review budget and the body deadline.
    pub intake: Arc<Intake>,
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
        let _busy = self.intake.enter();
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let read = if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            Err(BodyError::TooLarge)
        } else {
            self.intake.read(req.into_body()).await
        };
        let received = match read {
            Ok(received) => received,
            Err(e) => {
                self.metrics
                    .admission(Outcome::Error, started.elapsed().as_secs_f64());
                return body_error(&e);
            }
        };
        match self.reviewer.review(&received.body).await {
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
}

/// The answer to a body that was not read. The rest of the body is never read, so the
/// connection is closed after the answer.
fn body_error(e: &BodyError) -> Response<Body> {
    let (status, code) = match e {
        BodyError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        BodyError::Deadline(_) | BodyError::Stalled(_) => {
            (StatusCode::REQUEST_TIMEOUT, "request_timeout")
        }
        BodyError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        BodyError::Read(_) => (StatusCode::BAD_REQUEST, "bad_request"),
    };
    let mut resp = error(status, code, &e.to_string());
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn error(status: StatusCode, code: &str, description: &str) -> Response<Body> {
    json_response(
        status,
        serde_json::json!({"error": code, "error_description": description}).to_string(),
    )
}
