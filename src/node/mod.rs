//! `imds-broker node`: one broker per node (a host-network DaemonSet) serving the pods of its
//! node on the node's address. The broker itself is `serve`'s ([`crate::serve::Core`]); in
//! front of its protocol adapters sits caller attestation ([`crate::attest`]): the caller's
//! source address must belong to a pod of this node that the `--allow-*` flags admit.
//!
//! - [`args`]: the flags ([`NodeArgs`]) and the policy they make;
//! - [`front`]: the token listener's requests (probes, attestation, then the protocols).

mod args;
pub mod front;

pub use args::{NodeArgs, POD_NAMESPACE};

use crate::admin::Readiness;
use crate::attest::index::PodIndex;
use crate::attest::refusal::RefusalCounter;
use crate::attest::{watch, Attestor};
use crate::listener;
use crate::metrics::Metrics;
use crate::serve::{Core, Front};
use anyhow::Context;
use front::AttestedService;
use std::sync::Arc;
use std::time::Instant;

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    args.serve.validate()?;
    let policy = args.policy()?;
    for warning in args.warnings() {
        tracing::warn!("{warning}");
    }
    // The API server as kubectl and client-go find it: KUBECONFIG (or ~/.kube/config), else
    // the in-cluster service account.
    crate::crypto::install_default();
    let client = kube::Client::try_default().await.context(
        "cannot configure the Kubernetes API client: run in a pod with a ServiceAccount token \
         (KUBERNETES_SERVICE_HOST set), or point KUBECONFIG at a kubeconfig",
    )?;

    let mut metrics = Metrics::new();
    let refusals = RefusalCounter::register(&mut metrics.registry);
    let core = Core::new(&args.serve, metrics)?;
    let index = Arc::new(PodIndex::new(policy.namespaces.clone()));
    let accounts: Vec<String> = policy.accounts.iter().map(ToString::to_string).collect();
    let namespaces = policy.namespaces.join(",");
    let host_network = policy.host_network;
    let attestor = Arc::new(Attestor::new(
        index.clone(),
        policy,
        args.node().to_owned(),
        refusals,
    ));

    let mut listeners = Vec::new();
    for addr in &args.serve.listen {
        listeners.push(listener::bind_reusing_port(*addr, "token")?);
    }
    // Ready once the pods are listed and the broker itself is.
    let readiness: Readiness = {
        let (attestor, broker) = (attestor.clone(), core.broker_readiness());
        Arc::new(move || attestor.ready().and_then(|()| broker()))
    };
    let service = Arc::new(AttestedService {
        attestor,
        tokens: core.service.clone(),
        probes: core.admin(readiness.clone()),
    });
    watch::spawn(&client, args.node(), &index);
    tracing::info!(
        node = args.node(),
        allow_namespaces = %namespaces,
        allow_service_accounts = %accounts.join(","),
        allow_host_network = host_network,
        "attesting callers: only pods of this node in these namespaces, running as these \
         ServiceAccounts, get tokens"
    );
    let front = Front {
        listeners,
        handler: move |req, peer| service.handle(req, peer),
        // Callers are other pods: attestation, not the sidecar's same-pod rule, decides.
        outside_peer: None,
        readiness,
        reuse_port: true,
    };
    core.run(&args.serve, front, started).await
}
