//! The watches that feed the index: one kube-runtime watcher per watched namespace, for the
//! pods of this node only (field selector `spec.nodeName`), so the broker needs nothing but a
//! namespaced Role (list, watch pods) in each. The watcher lists, then watches from the list's
//! resourceVersion with bookmarks, watches again from the last one seen when a watch ends, and
//! lists again after a 410 Gone; errors are retried with kube-runtime's default backoff
//! (0.8 s doubling to 30 s, with jitter).

use super::index::PodIndex;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use std::sync::Arc;

/// Starts a watch of each namespace of `index` for the pods on `node`; they run until the
/// runtime stops.
pub fn spawn(client: &Client, node: &str, index: &Arc<PodIndex>) {
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    for namespace in index.namespaces() {
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        tokio::spawn(follow(
            api,
            config.clone(),
            namespace.clone(),
            node.to_owned(),
            index.clone(),
        ));
    }
}

async fn follow(
    api: Api<Pod>,
    config: watcher::Config,
    namespace: String,
    node: String,
    index: Arc<PodIndex>,
) {
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    let mut listed = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                let (kind, pod) = describe(&event);
                index.apply(&namespace, event);
                match kind {
                    "listed" if !listed => {
                        listed = true;
                        tracing::info!(
                            %namespace,
                            %node,
                            pods = index.len(),
                            all_listed = index.synced(),
                            "listed the pods of the namespace on this node; its callers are attested from now on"
                        );
                    }
                    "listed" | "applied" | "deleted" => {
                        tracing::debug!(%namespace, pod, event = kind, "pod index updated");
                    }
                    _ => {}
                }
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::debug!(%namespace, "the pod watch fell behind (410 Gone); listing again");
            }
            Err(error) => {
                // Backed off (at most one line per 30 s once it persists): no rate limit needed.
                tracing::warn!(
                    %namespace,
                    %node,
                    error = %error,
                    hint = hint(&error),
                    "cannot list or watch the pods of the namespace; retrying with backoff \
                     (callers keep the last known pods; before the first list they get 503)"
                );
            }
        }
    }
}

/// The event's kind and pod name, for the debug log (and the tests that await it).
fn describe(event: &Event<Pod>) -> (&'static str, String) {
    let name = |pod: &Pod| pod.metadata.name.clone().unwrap_or_default();
    match event {
        Event::Apply(pod) => ("applied", name(pod)),
        Event::Delete(pod) => ("deleted", name(pod)),
        Event::InitDone => ("listed", String::new()),
        Event::Init | Event::InitApply(_) => ("listing", String::new()),
    }
}

/// What to check for the usual causes.
fn hint(error: &watcher::Error) -> &'static str {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(&**s),
        watcher::Error::WatchError(s) => Some(&**s),
        _ => None,
    };
    match status {
        Some(s) if s.is_forbidden() => {
            "the broker's ServiceAccount needs a Role granting list and watch on pods in this \
             namespace, bound to it (docs/node-mode.md, RBAC)"
        }
        Some(s) if s.code == 401 => {
            "the API server refused the broker's credentials (its ServiceAccount token)"
        }
        Some(_) => "the API server refused the request",
        None => "the API server is unreachable or its answer unreadable",
    }
}
