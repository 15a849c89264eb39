//! Caller attestation for `imds-broker node`: which pod a connection comes from, and whether
//! it may have a token. The caller's source address is looked up in an index of the pods of
//! this node (kept from a watch, [`watch`] → [`index`]), and the pods holding it are judged
//! by the policy ([`policy`]); a refusal ([`refusal`]) is answered in the protocol's format.
//!
//! It works because traffic from a pod to its own node's address is not masqueraded by the
//! CNIs in use on AKS (Azure CNI, overlay or not, kubenet, Cilium): the broker sees the pod IP.
//! What that trusts, and the address-reuse window, are in docs/node-mode.md.

pub mod index;
pub mod pod;
pub mod policy;
pub mod refusal;
pub mod watch;

use index::PodIndex;
use policy::Policy;
use refusal::{Reason, Refusal, RefusalCounter};
use std::net::IpAddr;
use std::sync::Arc;

/// The policy over the index, counting refusals.
pub struct Attestor {
    pub index: Arc<PodIndex>,
    pub policy: Policy,
    pub node: String,
    refusals: RefusalCounter,
}

impl Attestor {
    pub fn new(
        index: Arc<PodIndex>,
        policy: Policy,
        node: String,
        refusals: RefusalCounter,
    ) -> Self {
        Attestor {
            index,
            policy,
            node,
            refusals,
        }
    }

    /// `Ok` when the caller at `ip` may ask; else the refusal, counted. A hash lookup: no
    /// API call, no allocation unless refused.
    pub fn attest(&self, ip: IpAddr) -> Result<(), Refusal> {
        let verdict = match self.ready() {
            Err(reason) => Err(Refusal::new(Reason::not_synced, reason)),
            Ok(()) => self
                .index
                .with_claims(ip, |holders| self.policy.judge(ip, holders).map(|_| ())),
        };
        if let Err(r) = &verdict {
            self.refusals.inc(r.reason);
        }
        verdict
    }

    /// `Err` with the reason until every watched namespace has been listed once.
    pub fn ready(&self) -> Result<(), String> {
        if self.index.synced() {
            return Ok(());
        }
        Err(format!(
            "the pods of namespace {} on node {} have not been listed yet (the broker's log \
             says why if the API server refuses); retry",
            self.index.unsynced().join(", "),
            self.node
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::pod::fixture::pod;
    use super::policy::AllowedAccount;
    use super::*;
    use kube::runtime::watcher::Event;
    use prometheus_client::registry::Registry;

    #[test]
    fn callers_wait_for_the_first_list_then_are_judged_by_the_index() {
        let index = Arc::new(PodIndex::new(vec!["velero".into()]));
        let mut registry = Registry::with_prefix("imds_broker");
        let attestor = Attestor::new(
            index.clone(),
            Policy {
                namespaces: vec!["velero".into()],
                accounts: vec![AllowedAccount::parse("velero-server").unwrap()],
                host_network: false,
            },
            "node-1".into(),
            RefusalCounter::register(&mut registry),
        );
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let early = attestor.attest(ip).unwrap_err();
        assert_eq!(early.reason, Reason::not_synced);
        assert!(
            early
                .description
                .contains("namespace velero on node node-1"),
            "{early:?}"
        );

        index.apply("velero", Event::Init);
        index.apply(
            "velero",
            Event::InitApply(pod("velero", "m", "velero-server", "10.0.0.1", 1)),
        );
        assert_eq!(attestor.attest(ip).unwrap_err().reason, Reason::not_synced);
        index.apply("velero", Event::InitDone);
        assert_eq!(attestor.attest(ip), Ok(()));
        let other = attestor.attest("10.0.0.2".parse().unwrap()).unwrap_err();
        assert_eq!(other.reason, Reason::unknown_caller);
        let text = crate::metrics::render(&registry);
        assert!(text.contains("reason=\"not_synced\"} 2"), "{text}");
        assert!(text.contains("reason=\"unknown_caller\"} 1"), "{text}");
    }
}
