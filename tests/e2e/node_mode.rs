//! `imds-broker node` against testkit's fake pod API: the real binary lists and watches the
//! pods of its node through kube-rs, and attests each caller by its source address. Every
//! "pod" is an address of 127/8 (Linux routes all of it to `lo`): the client binds its socket
//! to the pod's address before connecting, so the broker sees that source. No namespaces, no
//! root; all traffic stays on 127.0.0.0/8.

use crate::support::broker::{enc, Broker, BrokerBuilder, Reply, STORAGE};
use std::net::IpAddr;
use std::time::Duration;
use testkit::kube_pods::{FakePod, PodApi};

const NODE: &str = "node-1";
const LISTED: &str = "listed the pods of the namespace on this node";

/// A pod of namespace `velero` on this node running as `velero-server`, holding `ip`.
fn allowed(name: &str, ip: &str) -> FakePod {
    FakePod::new("velero", name, NODE, "velero-server", ip)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn token_query() -> String {
    format!("api-version=2019-08-01&resource={}", enc(STORAGE))
}

/// A node broker for namespace `velero` (its own, from POD_NAMESPACE) watching `api`, with
/// the pod index's updates logged.
async fn node_broker(api: &PodApi, dir: &tempfile::TempDir, extra: &[&str]) -> Broker {
    BrokerBuilder::emulate()
        .node(&api.kubeconfig(dir.path()), NODE)
        .env("POD_NAMESPACE", "velero")
        .rust_log("info,imds_broker::attest=debug")
        .args(extra.iter().copied())
        .spawn()
        .await
}

async fn token_from(broker: &Broker, source: &str) -> Reply {
    broker.app_service_from(ip(source), &token_query()).await
}

/// A 403 in the App Service format whose description contains `needle`.
fn assert_refused(reply: &Reply, needle: &str) {
    assert_eq!(reply.status, 403, "{}", reply.raw);
    assert_eq!(reply.field("error"), "access_denied", "{}", reply.raw);
    assert_eq!(
        reply.body["statusCode"], 403,
        "App Service format: {}",
        reply.raw
    );
    assert!(
        reply.description().contains(needle),
        "{needle:?} in {}",
        reply.raw
    );
}

#[tokio::test]
async fn pods_of_the_node_with_an_allowed_account_get_tokens_and_others_403_naming_why() {
    let api = PodApi::start().await;
    for pod in [
        allowed("mover", "127.77.0.1"),
        FakePod::new("velero", "curious", NODE, "default", "127.77.0.2"),
        FakePod::new("other", "stranger", NODE, "velero-server", "127.77.0.3"),
        allowed("hostnet", "127.77.0.4").host_network(),
        FakePod::new(
            "velero",
            "elsewhere",
            "node-2",
            "velero-server",
            "127.77.0.5",
        ),
    ] {
        api.apply(pod);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut broker = node_broker(&api, &dir, &[]).await;
    broker.expect_log(LISTED).await;

    let ok = token_from(&broker, "127.77.0.1").await;
    assert_eq!(ok.status, 200, "{}", ok.raw);
    assert!(!ok.field("access_token").is_empty());

    assert_refused(
        &token_from(&broker, "127.77.0.2").await,
        "caller 127.77.0.2 is pod velero/curious with ServiceAccount default; allowed: velero-server",
    );
    // Another namespace's pod: not watched (no RBAC there), so unknown, naming what is served.
    assert_refused(
        &token_from(&broker, "127.77.0.3").await,
        "caller 127.77.0.3 is no running pod of namespace velero on this node",
    );
    assert_refused(
        &token_from(&broker, "127.77.0.4").await,
        "--allow-host-network",
    );
    // A pod of another node, and an address no pod holds.
    assert_refused(&token_from(&broker, "127.77.0.5").await, "no running pod");
    assert_refused(&token_from(&broker, "127.77.0.9").await, "no running pod");

    // The identity header is still required of an attested pod (second wall), and IMDS's
    // secret-less endpoint is not served on the node's address.
    let wrong = broker
        .get_from(
            ip("127.77.0.1"),
            &broker.app_service_url(&token_query()),
            &[("X-IDENTITY-HEADER", "guess")],
        )
        .await;
    assert_eq!(wrong.status, 401, "{}", wrong.raw);
    let imds = broker
        .get_from(
            ip("127.77.0.1"),
            &broker.imds_url("api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com%2F"),
            &[("Metadata", "true")],
        )
        .await;
    assert_eq!(imds.status, 404, "{}", imds.raw);
    assert!(
        imds.description()
            .contains("App Service endpoint /msi/token only"),
        "{}",
        imds.raw
    );

    // Probes on the token listener answer anyone: they carry no secret.
    for probe in ["/healthz", "/readyz"] {
        let url = format!("http://{}{probe}", broker.token_addr);
        let r = broker.get_from(ip("127.77.0.9"), &url, &[]).await;
        assert_eq!(r.status, 200, "{probe}: {}", r.raw);
    }

    for (reason, n) in [
        ("service_account", 1.0),
        ("unknown_caller", 3.0),
        ("host_network", 1.0),
    ] {
        let sample = format!("imds_broker_attestation_refusals_total{{reason=\"{reason}\"}}");
        assert_eq!(broker.metric(&sample).await, n, "{sample}");
    }
    let refused = "imds_broker_http_requests_total{endpoint=\"app_service\",status=\"403\"}";
    assert_eq!(broker.metric(refused).await, 5.0);
    broker
        .expect_log("caller 127.77.0.2 is pod velero/curious")
        .await;

    // The broker asked as kube-runtime's watcher does: the node's pods only, a list, then a
    // watch from the list's version with bookmarks.
    let requests = api.requests();
    let selector = "fieldSelector=spec.nodeName%3Dnode-1";
    let list = requests.iter().find(|r| !r.contains("watch=true")).unwrap();
    assert!(
        list.starts_with("/api/v1/namespaces/velero/pods?"),
        "{list}"
    );
    assert!(list.contains(selector), "{list}");
    let watch = requests.iter().find(|r| r.contains("watch=true")).unwrap();
    assert!(watch.contains(selector), "{watch}");
    assert!(watch.contains("allowWatchBookmarks=true"), "{watch}");
    assert!(watch.contains("resourceVersion="), "{watch}");
}

#[tokio::test]
async fn before_the_first_list_callers_get_503_and_readyz_fails_on_both_listeners() {
    let api = PodApi::start().await;
    api.apply(allowed("mover", "127.77.1.1"));
    api.hold_lists();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = node_broker(&api, &dir, &[]).await;

    let early = token_from(&broker, "127.77.1.1").await;
    assert_eq!(early.status, 503, "{}", early.raw);
    assert_eq!(early.field("error"), "not_ready");
    assert_eq!(early.retry_after.as_deref(), Some("1"));
    assert!(
        early
            .description()
            .contains("namespace velero on node node-1"),
        "{}",
        early.raw
    );
    let token_readyz = format!("http://{}/readyz", broker.token_addr);
    let r = broker.get_from(ip("127.77.1.1"), &token_readyz, &[]).await;
    assert_eq!(r.status, 503, "{}", r.raw);
    assert!(r.raw.contains("not been listed yet"), "{}", r.raw);
    assert_eq!(broker.admin("/readyz").await.0, 503);
    let not_synced = "imds_broker_attestation_refusals_total{reason=\"not_synced\"}";
    assert_eq!(broker.metric(not_synced).await, 1.0);

    api.release_lists();
    broker.expect_log(LISTED).await;
    assert_eq!(token_from(&broker, "127.77.1.1").await.status, 200);
    assert_eq!(
        broker
            .get_from(ip("127.77.1.1"), &token_readyz, &[])
            .await
            .status,
        200
    );
    assert_eq!(broker.admin("/readyz").await.0, 200);
}

#[tokio::test]
async fn a_deleted_pod_is_refused_from_then_on_and_a_newer_pod_owns_a_reused_address() {
    let api = PodApi::start().await;
    api.apply(allowed("mover-a", "127.77.2.1").created(1000));
    let dir = tempfile::tempdir().unwrap();
    let mut broker = node_broker(&api, &dir, &[]).await;
    broker.expect_log(LISTED).await;
    assert_eq!(token_from(&broker, "127.77.2.1").await.status, 200);

    api.delete("velero", "mover-a");
    broker
        .expect_log_with(&["pod index updated", "\"mover-a\"", "deleted"])
        .await;
    assert_refused(&token_from(&broker, "127.77.2.1").await, "no running pod");

    // The address is handed to an allowed pod: served again.
    api.apply(allowed("mover-b", "127.77.2.1").created(2000));
    broker
        .expect_log_with(&["pod index updated", "\"mover-b\"", "applied"])
        .await;
    assert_eq!(token_from(&broker, "127.77.2.1").await.status, 200);
    // mover-b finished, but before its end reaches the broker a newer pod of another account
    // has the address: the newer pod is the caller.
    api.apply(FakePod::new("velero", "curious", NODE, "default", "127.77.2.1").created(3000));
    broker
        .expect_log_with(&["pod index updated", "\"curious\"", "applied"])
        .await;
    assert_refused(
        &token_from(&broker, "127.77.2.1").await,
        "is pod velero/curious with ServiceAccount default",
    );
    // A pod that finished (phase Succeeded) releases its address at once.
    api.apply(
        FakePod::new("velero", "curious", NODE, "default", "127.77.2.1")
            .created(3000)
            .phase("Succeeded"),
    );
    api.apply(allowed("mover-c", "127.77.2.3"));
    broker
        .expect_log_with(&["pod index updated", "\"mover-c\"", "applied"])
        .await;
    assert_eq!(
        token_from(&broker, "127.77.2.1").await.status,
        200,
        "mover-b again"
    );
}

#[tokio::test]
async fn two_node_brokers_share_the_token_port_for_a_rolling_update() {
    let api = PodApi::start().await;
    api.apply(allowed("mover", "127.77.3.1"));
    let dir = tempfile::tempdir().unwrap();
    let mut old = node_broker(&api, &dir, &[]).await;
    old.expect_log(LISTED).await;
    let shared = old.token_addr.to_string();
    // The chart gives both the node's address and fixed ports: the admin port is shared too.
    let admin = old.admin_addr.to_string();
    let mut new = node_broker(&api, &dir, &["--listen", &shared, "--admin-listen", &admin]).await;
    new.expect_log(LISTED).await;
    assert_eq!(new.token_addr, old.token_addr);
    assert_eq!(new.admin_addr, old.admin_addr);
    // The old one goes; the port keeps answering, through the new one.
    old.signal("TERM");
    let status = old.wait_exit(Duration::from_secs(15)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(token_from(&new, "127.77.3.1").await.status, 200);
}
