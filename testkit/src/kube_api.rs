//! A fake Kubernetes API server for the one call the webhook makes:
//! `GET /api/v1/namespaces/{ns}/serviceaccounts/{name}`. It serves the ServiceAccounts it was
//! given (others are a 404 `Status`, as the real server answers), over TLS or plain HTTP,
//! optionally only to a given bearer token (else 401), and records every request. A test can
//! switch it to answer every request with one status and body, to send its answers chunked
//! (no `Content-Length`, as a streaming server does), or to never answer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use imds_broker::listener::{self, Limits, ShutdownTrigger};
use serde_json::{json, Value};
use tokio_rustls::TlsAcceptor;

use crate::pki::TestPki;

/// One request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRequest {
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// What the server answers; changed by the test while it runs.
struct Behaviour {
    /// `(path, ServiceAccount JSON)` of every account served.
    accounts: Vec<(String, String)>,
    bearer: Option<String>,
    /// Every request answered with this status and body instead.
    answer: Option<(u16, String)>,
    chunked: bool,
    hang: bool,
    requests: Vec<ApiRequest>,
}

/// Options of a [`KubeApi`]; start it with [`KubeApiBuilder::start`].
pub struct KubeApiBuilder {
    tls: Option<Arc<rustls::ServerConfig>>,
    accounts: Vec<(String, String)>,
    bearer: Option<String>,
}

impl KubeApiBuilder {
    /// Serves HTTPS with `pki`'s server certificate (else plain HTTP).
    pub fn tls(mut self, pki: &TestPki) -> Self {
        self.tls = Some(pki.server_config());
        self
    }

    /// Serves ServiceAccount `namespace/name` with these annotations.
    pub fn service_account(
        mut self,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> Self {
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        let account = json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations}
        });
        self.accounts.push((
            format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}"),
            account.to_string(),
        ));
        self
    }

    /// Answers only requests with `Authorization: Bearer {token}`; others get 401.
    pub fn bearer_token(mut self, token: &str) -> Self {
        self.bearer = Some(format!("Bearer {token}"));
        self
    }

    /// Binds an ephemeral port of 127.0.0.1 and serves on the current tokio runtime until the
    /// [`KubeApi`] is dropped.
    pub async fn start(self) -> KubeApi {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake API server: bind 127.0.0.1:0");
        let addr = tcp.local_addr().expect("fake API server: local address");
        let behaviour = Arc::new(Mutex::new(Behaviour {
            accounts: self.accounts,
            bearer: self.bearer,
            answer: None,
            chunked: false,
            hang: false,
            requests: Vec::new(),
        }));
        let (stop, shutdown) = listener::shutdown_channel();
        let state = behaviour.clone();
        let handler = move |req: Request<Incoming>, _peer| answer(state.clone(), req);
        let grace = Duration::from_millis(10);
        let scheme = if let Some(config) = self.tls {
            let acceptor = TlsAcceptor::from(config);
            let wrap = move |stream| {
                let acceptor = acceptor.clone();
                async move { acceptor.accept(stream).await }
            };
            tokio::spawn(listener::serve_with(
                tcp,
                wrap,
                handler,
                Limits::default(),
                shutdown,
                grace,
            ));
            "https"
        } else {
            tokio::spawn(listener::serve(
                tcp,
                handler,
                Limits::default(),
                shutdown,
                grace,
            ));
            "http"
        };
        KubeApi {
            url: format!("{scheme}://{addr}"),
            behaviour,
            _stop: stop,
        }
    }
}

/// The running fake; stops serving when dropped.
pub struct KubeApi {
    url: String,
    behaviour: Arc<Mutex<Behaviour>>,
    _stop: ShutdownTrigger,
}

impl KubeApi {
    pub fn builder() -> KubeApiBuilder {
        KubeApiBuilder {
            tls: None,
            accounts: Vec::new(),
            bearer: None,
        }
    }

    /// `http(s)://127.0.0.1:PORT`, what the webhook gets as `--kube-api-url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The requests so far, in order.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.behaviour.lock().unwrap().requests.clone()
    }

    /// From now on every request is answered with `status` and `body` (a `Status` object).
    pub fn answer_all(&self, status: u16, body: &str) {
        self.behaviour.lock().unwrap().answer = Some((status, body.to_owned()));
    }

    /// From now on answers are sent with `Transfer-Encoding: chunked` and no `Content-Length`:
    /// the client learns their size only by reading them.
    pub fn chunked(&self) {
        self.behaviour.lock().unwrap().chunked = true;
    }

    /// From now on requests are recorded and never answered.
    pub fn hang(&self) {
        self.behaviour.lock().unwrap().hang = true;
    }
}

async fn answer(state: Arc<Mutex<Behaviour>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, body, hang, chunked) = {
        let mut s = state.lock().unwrap();
        let reply = if let Some(answer) = &s.answer {
            answer.clone()
        } else if s.bearer.is_some() && s.bearer != authorization {
            (401, status_object(401, "Unauthorized"))
        } else if let Some((_, account)) = s.accounts.iter().find(|(p, _)| *p == path) {
            (200, account.clone())
        } else {
            (404, status_object(404, "NotFound"))
        };
        s.requests.push(ApiRequest {
            path,
            authorization,
        });
        (reply.0, reply.1, s.hang, s.chunked)
    };
    if hang {
        std::future::pending::<()>().await;
    }
    let mut resp = Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if chunked {
        // hyper then frames the body in chunks instead of declaring its length.
        resp = resp.header(hyper::header::TRANSFER_ENCODING, "chunked");
    }
    resp.body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// A Kubernetes `Status` object, the body of the API server's errors.
pub(crate) fn status_object(code: u16, reason: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code})
        .to_string()
}
