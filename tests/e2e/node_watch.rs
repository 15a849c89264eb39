//! The pod index of `imds-broker node` kept by kube-runtime's watcher, in process, against
//! testkit's fake pod API: adds, changes and deletes arrive through the watch; a watch that
//! ends is resumed from the last version seen (no new list); a watch from a version the server
//! no longer keeps (410 Gone) makes the watcher list again, and the index then drops what was
//! deleted meanwhile. Each step awaits the index's change signal, bounded.

use imds_broker::attest::index::PodIndex;
use imds_broker::attest::watch;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use testkit::kube_pods::{FakePod, PodApi};

const NODE: &str = "node-1";

/// A pod of namespace `velero` on this node running as `velero-server`, holding `ip`.
fn allowed(name: &str, ip: &str) -> FakePod {
    FakePod::new("velero", name, NODE, "velero-server", ip)
}

/// The pods holding `ip` (as `namespace/name`).
fn holders(index: &PodIndex, ip: &str) -> Vec<String> {
    let ip: IpAddr = ip.parse().unwrap();
    index.with_claims(ip, |pods| pods.iter().map(|p| p.id()).collect())
}

/// Waits (at most 10 s) until `done` holds of the index, woken by each applied event.
async fn until(index: &PodIndex, what: &str, done: impl Fn(&PodIndex) -> bool) {
    let mut changes = index.changes();
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !done(index) {
            changes.changed().await.expect("the index lives");
        }
    })
    .await;
    assert!(waited.is_ok(), "index never got to: {what}");
}

fn lists(api: &PodApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count()
}

#[tokio::test]
async fn the_index_follows_the_watch_through_restarts_and_relists() {
    imds_broker::crypto::install_default();
    let api = PodApi::start().await;
    api.apply(allowed("a", "10.1.0.1"));
    api.apply(FakePod::new(
        "velero",
        "far",
        "node-2",
        "velero-server",
        "10.1.0.9",
    ));
    let config = kube::Config::new(api.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let index = Arc::new(PodIndex::new(vec!["velero".into()]));
    watch::spawn(&client, NODE, &index);

    until(&index, "synced", PodIndex::synced).await;
    assert_eq!(holders(&index, "10.1.0.1"), ["velero/a"]);
    assert!(holders(&index, "10.1.0.9").is_empty(), "another node's pod");

    // Add, modify (new address), finish.
    api.apply(allowed("b", "10.1.0.2"));
    until(&index, "b added", |i| {
        holders(i, "10.1.0.2") == ["velero/b"]
    })
    .await;
    api.apply(allowed("b", "10.1.0.3"));
    until(&index, "b moved", |i| {
        holders(i, "10.1.0.3") == ["velero/b"]
    })
    .await;
    assert!(holders(&index, "10.1.0.2").is_empty());
    api.apply(allowed("b", "10.1.0.3").phase("Failed"));
    until(&index, "b finished", |i| holders(i, "10.1.0.3").is_empty()).await;

    // The watch ends (API server timeout or restart): resumed from the last version, no list.
    api.end_watches();
    api.apply(allowed("c", "10.1.0.4"));
    until(&index, "c added after the restart", |i| {
        holders(i, "10.1.0.4") == ["velero/c"]
    })
    .await;
    assert_eq!(
        lists(&api),
        1,
        "resumed, not listed again: {:?}",
        api.requests()
    );

    // The history is gone (compaction): the resumed watch gets 410, the watcher lists again,
    // and what happened in between is in the index after the list.
    api.compact();
    api.delete("velero", "a");
    api.apply(allowed("d", "10.1.0.5"));
    until(&index, "relisted", |i| {
        holders(i, "10.1.0.1").is_empty() && holders(i, "10.1.0.5") == ["velero/d"]
    })
    .await;
    assert_eq!(
        lists(&api),
        2,
        "listed again after 410: {:?}",
        api.requests()
    );
    assert_eq!(holders(&index, "10.1.0.4"), ["velero/c"]);
    assert!(index.synced());
}
