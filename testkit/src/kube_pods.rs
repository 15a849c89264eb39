//! A fake Kubernetes API server for the pod list and watch that `imds-broker node` makes,
//! answering the way kube-runtime's watcher asks:
//! - `GET /api/v1/namespaces/{ns}/pods?fieldSelector=spec.nodeName=N&limit=500` → a `PodList`
//!   whose `metadata.resourceVersion` is the current one (one page, no `continue`);
//! - `GET …/pods?watch=true&resourceVersion=R&allowWatchBookmarks=true&…` → a chunked stream of
//!   JSON lines (`{"type":"ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR","object":…}`): the
//!   events after R, then new ones as the test makes them; a bookmark first when asked for; an
//!   R older than the kept history gets a 410 `Expired` ERROR event, as after compaction.
//!
//! The test adds, changes and deletes pods ([`PodApi::apply`], [`PodApi::delete`]), can hold
//! list answers back (to see a client before its first list), end every open watch (the client
//! watches again from its last version) or forget the history (the client must list again).
//! Only the `spec.nodeName` field selector is understood; any other is a 400, as the real
//! server answers an unsupported field label.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::kube_api::status_object;

/// A pod as the test describes it; [`PodApi`] renders it as the API server would.
#[derive(Clone, Debug)]
pub struct FakePod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    /// `status.podIP` / `podIPs`; `None` before the sandbox has one.
    pub ip: Option<String>,
    pub host_network: bool,
    pub phase: String,
    /// `metadata.creationTimestamp`, Unix seconds.
    pub created: i64,
}

impl FakePod {
    /// A running pod `namespace/name` on `node`, with ServiceAccount `sa` and address `ip`,
    /// created now.
    pub fn new(namespace: &str, name: &str, node: &str, sa: &str, ip: &str) -> FakePod {
        FakePod {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            service_account: sa.into(),
            ip: Some(ip.into()),
            host_network: false,
            phase: "Running".into(),
            created: time::OffsetDateTime::now_utc().unix_timestamp(),
        }
    }

    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.into();
        self
    }

    pub fn created(mut self, unix: i64) -> Self {
        self.created = unix;
        self
    }

    fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    fn to_json(&self, resource_version: u64) -> Value {
        let created = time::OffsetDateTime::from_unix_timestamp(self.created)
            .map(|t| crate::fake_entra::utc(t, 'T', ""))
            .unwrap_or_default();
        let mut status = json!({"phase": self.phase, "hostIP": "10.224.0.4"});
        if let Some(ip) = &self.ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "namespace": self.namespace,
                "name": self.name,
                "uid": format!("uid-{}-{}-{}", self.namespace, self.name, self.created),
                "resourceVersion": resource_version.to_string(),
                "creationTimestamp": created,
            },
            "spec": {
                "nodeName": self.node,
                "serviceAccountName": self.service_account,
                "hostNetwork": self.host_network,
                "containers": [{"name": "main", "image": "velero/velero"}],
            },
            "status": status,
        })
    }
}

/// One watch event as kept in the history.
struct Recorded {
    resource_version: u64,
    namespace: String,
    node: String,
    kind: &'static str,
    object: Value,
}

/// An open watch: its filter and where its lines go.
struct OpenWatch {
    namespace: String,
    node: Option<String>,
    lines: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Each pod with the version of its last change.
    pods: BTreeMap<(String, String), (FakePod, u64)>,
    history: Vec<Recorded>,
    /// A watch from a version before this one gets 410 Gone.
    oldest_kept: u64,
    watches: Vec<OpenWatch>,
    requests: Vec<String>,
}

/// The running fake; stops accepting when dropped (open watches end then too).
pub struct PodApi {
    url: String,
    state: Arc<Mutex<State>>,
    /// `true` while list requests are held unanswered.
    hold: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl PodApi {
    /// Binds an ephemeral port of 127.0.0.1 and serves plain HTTP on the current runtime.
    pub async fn start() -> PodApi {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake pod API: bind 127.0.0.1:0");
        let addr = tcp.local_addr().expect("fake pod API: local address");
        let state = Arc::new(Mutex::new(State {
            resource_version: 1,
            ..State::default()
        }));
        let (hold, held) = watch::channel(false);
        let accept = {
            let state = state.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = tcp.accept().await {
                    let (state, held) = (state.clone(), held.clone());
                    let service = service_fn(move |req| {
                        let (state, held) = (state.clone(), held.clone());
                        async move { Ok::<_, Infallible>(answer(state, held, req).await) }
                    });
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        PodApi {
            url: format!("http://{addr}"),
            state,
            hold,
            accept,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes a kubeconfig for this server into `dir` (what `KUBECONFIG` should name).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Adds `pod`, or replaces the pod of that name (ADDED or MODIFIED to the watches).
    pub fn apply(&self, pod: FakePod) {
        let mut s = self.state.lock().unwrap();
        let kind = if s.pods.contains_key(&pod.key()) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let version = s.record(kind, &pod);
        s.pods.insert(pod.key(), (pod, version));
    }

    /// Deletes `namespace/name` (DELETED to the watches); a no-op if there is none.
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        if let Some((pod, _)) = s.pods.remove(&(namespace.to_owned(), name.to_owned())) {
            s.record("DELETED", &pod);
        }
    }

    /// From now on list requests wait until [`PodApi::release_lists`].
    pub fn hold_lists(&self) {
        self.hold.send_replace(true);
    }

    pub fn release_lists(&self) {
        self.hold.send_replace(false);
    }

    /// Ends every open watch stream, as the API server does at its timeout or a restart.
    pub fn end_watches(&self) {
        self.state.lock().unwrap().watches.clear();
    }

    /// Forgets the history: a watch from any version seen so far gets 410 Gone (as after
    /// etcd compaction), and open watches end.
    pub fn compact(&self) {
        let mut s = self.state.lock().unwrap();
        s.history.clear();
        s.oldest_kept = s.resource_version + 1;
        s.watches.clear();
    }

    /// Every request so far, as `path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The number of watch streams open now.
    pub fn open_watches(&self) -> usize {
        let mut s = self.state.lock().unwrap();
        s.watches.retain(|w| !w.lines.is_closed());
        s.watches.len()
    }
}

impl Drop for PodApi {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut s) = self.state.lock() {
            s.watches.clear();
        }
    }
}

impl State {
    /// A new version with this event, kept and sent to the matching open watches.
    fn record(&mut self, kind: &'static str, pod: &FakePod) -> u64 {
        self.resource_version += 1;
        let event = Recorded {
            resource_version: self.resource_version,
            namespace: pod.namespace.clone(),
            node: pod.node.clone(),
            kind,
            object: pod.to_json(self.resource_version),
        };
        let line = event_line(event.kind, &event.object);
        self.watches.retain(|w| {
            !w.matches(&event.namespace, &event.node) || w.lines.send(line.clone()).is_ok()
        });
        self.history.push(event);
        self.resource_version
    }
}

impl OpenWatch {
    fn matches(&self, namespace: &str, node: &str) -> bool {
        self.namespace == namespace && self.node.as_deref().is_none_or(|n| n == node)
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

async fn answer(
    state: Arc<Mutex<State>>,
    mut held: watch::Receiver<bool>,
    req: Request<Incoming>,
) -> Response<FakeBody> {
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    state
        .lock()
        .unwrap()
        .requests
        .push(match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        });
    let namespace = path
        .strip_prefix("/api/v1/namespaces/")
        .and_then(|rest| rest.strip_suffix("/pods"))
        .filter(|ns| !ns.is_empty() && !ns.contains('/'));
    let Some(namespace) = namespace.map(str::to_owned) else {
        return respond(404, status_object(404, "NotFound"));
    };
    let node = match node_selector(query.get("fieldSelector").map(String::as_str)) {
        Ok(node) => node,
        Err(message) => {
            let mut status: Value =
                serde_json::from_str(&status_object(400, "BadRequest")).expect("a Status object");
            status["message"] = json!(message);
            return respond(400, status.to_string());
        }
    };
    if query.get("watch").map(String::as_str) == Some("true") {
        return start_watch(&state, namespace, node, &query);
    }
    // A held list is answered once released (or never, if the test ends first).
    let _ = held.wait_for(|hold| !*hold).await;
    let s = state.lock().unwrap();
    let items: Vec<Value> = s
        .pods
        .values()
        .filter(|(p, _)| p.namespace == namespace && node.as_deref().is_none_or(|n| p.node == n))
        .map(|(p, version)| p.to_json(*version))
        .collect();
    let list = json!({
        "apiVersion": "v1",
        "kind": "PodList",
        "metadata": {"resourceVersion": s.resource_version.to_string()},
        "items": items,
    });
    respond(200, list.to_string())
}

/// The node of a `spec.nodeName=N` field selector (`None`: no selector).
fn node_selector(selector: Option<&str>) -> Result<Option<String>, String> {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    match selector.split_once('=') {
        Some(("spec.nodeName", node)) if !node.contains(',') => Ok(Some(node.to_owned())),
        _ => Err(format!(
            "field label not supported by the fake: {selector} (only spec.nodeName=N)"
        )),
    }
}

fn start_watch(
    state: &Mutex<State>,
    namespace: String,
    node: Option<String>,
    query: &BTreeMap<String, String>,
) -> Response<FakeBody> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut s = state.lock().unwrap();
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(s.resource_version);
    let watch = OpenWatch {
        namespace,
        node,
        lines: tx,
    };
    if from < s.oldest_kept {
        let gone = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("too old resource version: {from} ({})", s.oldest_kept),
            "reason": "Expired", "code": 410,
        });
        let _ = watch.lines.send(event_line("ERROR", &gone));
        // Dropping the sender ends the stream after that line.
        return stream_response(rx);
    }
    if query.get("allowWatchBookmarks").map(String::as_str) == Some("true") {
        let bookmark = json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"resourceVersion": from.to_string()},
        });
        let _ = watch.lines.send(event_line("BOOKMARK", &bookmark));
    }
    for event in s.history.iter().filter(|e| e.resource_version > from) {
        if watch.matches(&event.namespace, &event.node) {
            let _ = watch.lines.send(event_line(event.kind, &event.object));
        }
    }
    s.watches.push(watch);
    stream_response(rx)
}

fn respond(status: u16, body: String) -> Response<FakeBody> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(FakeBody::Full(Some(Bytes::from(body))))
        .expect("a valid response")
}

fn stream_response(lines: mpsc::UnboundedReceiver<Bytes>) -> Response<FakeBody> {
    Response::builder()
        .status(200)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(FakeBody::Lines(lines))
        .expect("a valid response")
}

/// A whole body, or watch lines until the sender is dropped.
enum FakeBody {
    Full(Option<Bytes>),
    Lines(mpsc::UnboundedReceiver<Bytes>),
}

impl hyper::body::Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            FakeBody::Full(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
            FakeBody::Lines(lines) => lines.poll_recv(cx).map(|l| l.map(|b| Ok(Frame::data(b)))),
        }
    }
}
