//! The pods of this node by address, kept from the watch events of each watched namespace
//! (kube-runtime's watcher: `Init`, `InitApply`… `InitDone` for a (re)list, then `Apply` and
//! `Delete`). A relist replaces the namespace's pods only once it is complete, as kube-runtime's
//! reflector does, so a restarting watch never empties the index under the callers' feet.
//!
//! Reading is a hash lookup under a read lock: attestation runs per request.

use super::pod::PodInfo;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// The pods of the watched namespaces on this node, by address.
pub struct PodIndex {
    /// The namespaces watched; the index is synced once each has completed a list.
    namespaces: Vec<String>,
    state: RwLock<State>,
    /// Set once every namespace has been listed (it never goes back): the per-request check
    /// is then one atomic load, no lock.
    all_synced: AtomicBool,
    /// Counts the events applied, so a watcher of the index can await a change.
    applied: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// `(namespace, name)` → the pod's entry.
    pods: HashMap<(String, String), Arc<PodInfo>>,
    /// Address → the pods holding it (one, except host-network pods and a reused address
    /// whose former holder has not been reported gone yet).
    by_ip: HashMap<IpAddr, Vec<Arc<PodInfo>>>,
    /// Namespaces whose first list has completed.
    synced: HashSet<String>,
    /// The pods of a list in progress, by namespace (between `Init` and `InitDone`).
    listing: HashMap<String, Vec<PodInfo>>,
}

impl PodIndex {
    pub fn new(namespaces: Vec<String>) -> PodIndex {
        PodIndex {
            namespaces,
            state: RwLock::default(),
            all_synced: AtomicBool::new(false),
            applied: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Ticks after every event applied (tests await a change through it).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Whether every watched namespace has been listed at least once.
    pub fn synced(&self) -> bool {
        self.all_synced.load(Ordering::Acquire)
    }

    /// The namespaces not listed yet.
    pub fn unsynced(&self) -> Vec<String> {
        let s = self.read();
        self.namespaces
            .iter()
            .filter(|ns| !s.synced.contains(*ns))
            .cloned()
            .collect()
    }

    /// Calls `f` with the pods holding `ip` (empty when none does), under the read lock.
    pub fn with_claims<T>(&self, ip: IpAddr, f: impl FnOnce(&[Arc<PodInfo>]) -> T) -> T {
        let s = self.read();
        f(s.by_ip.get(&ip.to_canonical()).map_or(&[], Vec::as_slice))
    }

    /// How many pods are indexed (for the start-up and sync log lines).
    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one event of the watch of `namespace`. Pods of any other namespace are
    /// ignored: the index answers only for the namespaces it was told to watch.
    pub fn apply(&self, namespace: &str, event: Event<Pod>) {
        if !self.namespaces.iter().any(|n| n == namespace) {
            return;
        }
        let ours = |pod: &Pod| pod.metadata.namespace.as_deref() == Some(namespace);
        let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            Event::Apply(pod) if ours(&pod) => match PodInfo::from_pod(&pod) {
                Some(info) => s.insert(info),
                // Finished, or no address yet: whatever it held is no longer its.
                None => s.remove(namespace, pod.metadata.name.as_deref().unwrap_or_default()),
            },
            Event::Delete(pod) if ours(&pod) => {
                s.remove(namespace, pod.metadata.name.as_deref().unwrap_or_default())
            }
            Event::Init => {
                s.listing.insert(namespace.to_owned(), Vec::new());
            }
            Event::InitApply(pod) if ours(&pod) => {
                if let Some(info) = PodInfo::from_pod(&pod) {
                    s.listing
                        .entry(namespace.to_owned())
                        .or_default()
                        .push(info);
                }
            }
            Event::InitDone => {
                let listed = s.listing.remove(namespace).unwrap_or_default();
                s.replace(namespace, listed);
                s.synced.insert(namespace.to_owned());
                if self.namespaces.iter().all(|ns| s.synced.contains(ns)) {
                    self.all_synced.store(true, Ordering::Release);
                }
            }
            Event::Apply(_) | Event::Delete(_) | Event::InitApply(_) => {}
        }
        drop(s);
        self.applied.send_modify(|n| *n += 1);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn insert(&mut self, info: PodInfo) {
        let key = (info.namespace.clone(), info.name.clone());
        self.remove(&key.0, &key.1);
        let info = Arc::new(info);
        for ip in &info.ips {
            self.by_ip.entry(*ip).or_default().push(info.clone());
        }
        self.pods.insert(key, info);
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        let Some(old) = self.pods.remove(&(namespace.to_owned(), name.to_owned())) else {
            return;
        };
        for ip in &old.ips {
            if let Some(holders) = self.by_ip.get_mut(ip) {
                holders.retain(|p| !Arc::ptr_eq(p, &old));
                if holders.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    /// A completed list of `namespace`: its pods become exactly these.
    fn replace(&mut self, namespace: &str, listed: Vec<PodInfo>) {
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, name)| name.clone())
            .collect();
        for name in gone {
            self.remove(namespace, &name);
        }
        for info in listed {
            self.insert(info);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::pod::fixture::*;
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn holders(index: &PodIndex, addr: &str) -> Vec<String> {
        index.with_claims(ip(addr), |c| c.iter().map(|p| p.id()).collect())
    }

    fn listed(index: &PodIndex, ns: &str, pods: Vec<Pod>) {
        index.apply(ns, Event::Init);
        for p in pods {
            index.apply(ns, Event::InitApply(p));
        }
        index.apply(ns, Event::InitDone);
    }

    #[test]
    fn the_index_follows_adds_modifications_and_deletes() {
        let index = PodIndex::new(vec!["velero".into()]);
        assert!(!index.synced());
        listed(
            &index,
            "velero",
            vec![pod("velero", "a", "sa", "10.0.0.1", 1)],
        );
        assert!(index.synced());
        assert_eq!(holders(&index, "10.0.0.1"), ["velero/a"]);

        index.apply(
            "velero",
            Event::Apply(pod("velero", "b", "sa", "10.0.0.2", 2)),
        );
        assert_eq!(holders(&index, "10.0.0.2"), ["velero/b"]);
        // Modified: a new address replaces the old one.
        index.apply(
            "velero",
            Event::Apply(pod("velero", "b", "sa", "10.0.0.3", 2)),
        );
        assert!(holders(&index, "10.0.0.2").is_empty());
        assert_eq!(holders(&index, "10.0.0.3"), ["velero/b"]);
        // Finished: dropped while its object still exists.
        let done = phase(pod("velero", "b", "sa", "10.0.0.3", 2), "Succeeded");
        index.apply("velero", Event::Apply(done));
        assert!(holders(&index, "10.0.0.3").is_empty());
        index.apply(
            "velero",
            Event::Delete(pod("velero", "a", "sa", "10.0.0.1", 1)),
        );
        assert!(holders(&index, "10.0.0.1").is_empty());
        assert!(index.is_empty());
    }

    #[test]
    fn a_relist_replaces_the_namespace_only_when_complete() {
        let index = PodIndex::new(vec!["velero".into(), "backup".into()]);
        listed(
            &index,
            "velero",
            vec![pod("velero", "a", "sa", "10.0.0.1", 1)],
        );
        assert!(!index.synced(), "backup has not been listed yet");
        assert_eq!(index.unsynced(), ["backup"]);
        listed(
            &index,
            "backup",
            vec![pod("backup", "x", "sa", "10.0.0.9", 1)],
        );
        assert!(index.synced());

        // The watch restarts: while the new list is being read, the old state still answers.
        index.apply("velero", Event::Init);
        index.apply(
            "velero",
            Event::InitApply(pod("velero", "c", "sa", "10.0.0.4", 3)),
        );
        assert_eq!(holders(&index, "10.0.0.1"), ["velero/a"]);
        assert!(holders(&index, "10.0.0.4").is_empty());
        index.apply("velero", Event::InitDone);
        // `a` was deleted while the watch was down: gone; `c` appeared; `backup` untouched.
        assert!(holders(&index, "10.0.0.1").is_empty());
        assert_eq!(holders(&index, "10.0.0.4"), ["velero/c"]);
        assert_eq!(holders(&index, "10.0.0.9"), ["backup/x"]);
    }

    #[test]
    fn pods_of_namespaces_not_watched_are_ignored() {
        let index = PodIndex::new(vec!["velero".into()]);
        listed(
            &index,
            "velero",
            vec![pod("other", "a", "sa", "10.0.0.1", 1)],
        );
        index.apply(
            "other",
            Event::Apply(pod("other", "b", "sa", "10.0.0.2", 1)),
        );
        assert!(index.is_empty());
    }

    #[test]
    fn host_network_pods_share_the_node_address() {
        let index = PodIndex::new(vec!["velero".into()]);
        listed(
            &index,
            "velero",
            vec![
                host_network(pod("velero", "broker", "imds-broker-node", "10.9.0.4", 1)),
                host_network(pod("velero", "agent", "velero-server", "10.9.0.4", 2)),
            ],
        );
        assert_eq!(
            holders(&index, "10.9.0.4"),
            ["velero/broker", "velero/agent"]
        );
        index.apply(
            "velero",
            Event::Delete(pod("velero", "broker", "x", "10.9.0.4", 1)),
        );
        assert_eq!(holders(&index, "10.9.0.4"), ["velero/agent"]);
    }
}
