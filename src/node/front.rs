//! The node's token listener: `/healthz` and `/readyz` for kubelet's probes (no secret, no
//! attestation), and every other request attested before the protocol adapters see it. Only
//! the App Service endpoint is served: its identity header is the second wall behind
//! attestation (a process sharing an attested address still needs the secret), and IMDS's
//! protocol has no secret at all.

use crate::admin::Admin;
use crate::attest::Attestor;
use crate::metrics::Endpoint;
use crate::protocol::service::{endpoint_of, Answer};
use crate::protocol::{ApiError, TokenService, APP_SERVICE_TOKEN_PATH, IMDS_TOKEN_PATH};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use std::future::ready;
use std::net::SocketAddr;
use std::sync::Arc;

/// Paths answered to every caller on the token listener.
const PROBES: [&str; 2] = ["/healthz", "/readyz"];

pub struct AttestedService {
    pub attestor: Arc<Attestor>,
    pub tokens: Arc<TokenService>,
    /// Answers the probes (its `/readyz` includes the first list of pods).
    pub probes: Admin,
}

impl AttestedService {
    /// Answers one token-listener request from `peer`.
    pub fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Answer {
        if PROBES.contains(&req.uri().path()) {
            return Answer::Ready(ready(self.probes.handle(&req)));
        }
        if let Err(refusal) = self.attestor.attest(peer.ip()) {
            return self.tokens.refuse_request(req, &refusal.error());
        }
        if endpoint_of(req.uri().path()) == Endpoint::imds {
            return self.tokens.refuse_request(req, &imds_not_served());
        }
        self.tokens.handle(req)
    }
}

fn imds_not_served() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "imds-broker node serves the App Service endpoint {APP_SERVICE_TOKEN_PATH} only (set \
             IDENTITY_ENDPOINT and IDENTITY_HEADER); {IMDS_TOKEN_PATH} has no shared secret, \
             so it is not served on a node-wide address"
        ),
    )
}
